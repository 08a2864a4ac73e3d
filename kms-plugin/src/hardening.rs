//! Process hardening applied before any key is unsealed: no core dumps, not dumpable.
//!
//! The plugin (and `key` commands that unseal) hold KEKs in clear in memory. A core file
//! written on a crash would put them on disk, readable later from a stolen node or a
//! backup. `RLIMIT_CORE = 0` stops the kernel writing one (also through a
//! `core_pattern` pipe helper, which honours the limit for non-root handlers like
//! systemd-coredump); `PR_SET_DUMPABLE = 0` also refuses ptrace attach and
//! `/proc/PID/mem` to other processes of the same user.

/// Applies both; a failure is logged (a sandbox may forbid it) and does not stop the
/// process, which then runs as it would have without this.
pub fn apply() {
    let zero = rustix::process::Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Core, zero) {
        tracing::warn!(error = %e, "could not disable core dumps (RLIMIT_CORE); a crash could write keys to disk");
    }
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "could not mark the process non-dumpable (PR_SET_DUMPABLE)");
    }
}
