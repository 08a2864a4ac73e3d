//! Telling the app that its secrets changed: a signal to a process found by name (needs
//! `shareProcessNamespace: true`) and/or a command.

use std::time::Duration;

use crate::config::NotifyConfig;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "no process named {0:?} to signal: set shareProcessNamespace: true in the pod spec, and \
         check the name against /proc/PID/comm (at most 15 characters)"
    )]
    NoProcess(String),
    #[error("signalling process {pid} ({name}): {source}")]
    Signal {
        pid: i32,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("notify command {cmd:?}: {message}")]
    Command { cmd: String, message: String },
}

/// Runs every configured notification; returns the first failure after trying them all.
pub async fn notify(cfg: &NotifyConfig) -> Result<usize, NotifyError> {
    let mut done = 0;
    let mut first_err = None;
    if let (Some(sig), Some(name)) = (cfg.signal, &cfg.process_name) {
        match signal_by_name(sig, name) {
            Ok(n) => done += n,
            Err(e) => first_err = Some(e),
        }
    }
    if let Some(argv) = &cfg.command {
        match run(argv).await {
            Ok(()) => done += 1,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

fn signal_by_name(sig: i32, name: &str) -> Result<usize, NotifyError> {
    let me = std::process::id();
    // /proc/PID/comm holds at most 15 bytes of the name.
    let want: String = name.chars().take(15).collect();
    let signal =
        rustix::process::Signal::from_named_raw(sig).ok_or_else(|| NotifyError::Signal {
            pid: 0,
            name: name.to_owned(),
            source: std::io::Error::other("unknown signal"),
        })?;
    let mut sent = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(me) {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if comm.trim_end() != want {
            continue;
        }
        let Some(p) = rustix::process::Pid::from_raw(pid) else {
            continue;
        };
        rustix::process::kill_process(p, signal).map_err(|e| NotifyError::Signal {
            pid,
            name: name.to_owned(),
            source: e.into(),
        })?;
        tracing::info!(pid, process = name, signal = sig, "signalled the app");
        sent += 1;
    }
    if sent == 0 {
        return Err(NotifyError::NoProcess(name.to_owned()));
    }
    Ok(sent)
}

async fn run(argv: &[String]) -> Result<(), NotifyError> {
    let cmd = argv.join(" ");
    let Some((prog, args)) = argv.split_first() else {
        return Err(NotifyError::Command {
            cmd,
            message: "empty".into(),
        });
    };
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .map_err(|_| NotifyError::Command {
            cmd: cmd.clone(),
            message: "did not finish within 30 s".into(),
        })?
        .map_err(|e| NotifyError::Command {
            cmd: cmd.clone(),
            message: e.to_string(),
        })?;
    if out.status.success() {
        tracing::info!(command = %cmd, "ran the notify command");
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(NotifyError::Command {
            cmd,
            message: format!(
                "{} {}",
                out.status,
                stderr.lines().next().unwrap_or_default()
            ),
        })
    }
}
