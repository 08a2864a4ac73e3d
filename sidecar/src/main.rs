//! The Key Vault sidecar (issue 4). Not implemented yet: it exits with a clear message.

fn main() -> std::process::ExitCode {
    eprintln!("sidecar: not implemented yet in this build (see the project's issue tracker)");
    std::process::ExitCode::from(2)
}
