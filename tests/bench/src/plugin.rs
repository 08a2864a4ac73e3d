//! Driving the real `kms-plugin` binary: its CLI, a `serve` process that is killed on drop,
//! and a gRPC channel over its Unix socket as kube-apiserver dials it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tonic::transport::Channel;

/// A `Command` for the plugin that inherits no plugin settings from the environment and
/// keeps the TSS libraries quiet.
pub fn command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_remove("RUST_LOG").env("TSS2_LOG", "all+none");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KMS_PLUGIN_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs `kms-plugin ARGS` to completion; fails with its stderr. Returns how long the whole
/// process took and its trimmed stdout.
pub fn cli(bin: &Path, args: &[&str]) -> Result<(Duration, String)> {
    let t = Instant::now();
    let out = command(bin)
        .args(args)
        .output()
        .context("spawning kms-plugin")?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "kms-plugin {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// `key list --output json` of a key store: (number of keys, active key id).
pub fn key_ring(bin: &Path, key_store: &str) -> Result<(usize, String)> {
    let (_, out) = cli(
        bin,
        &["key", "list", "--key-store", key_store, "--output", "json"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing key list")?;
    let keys = v["keys"].as_array().map_or(0, Vec::len);
    let active = v["active_key_id"]
        .as_str()
        .ok_or_else(|| anyhow!("key list has no active_key_id"))?;
    Ok((keys, active.to_owned()))
}

/// Encryptions reserved under the active key (the keeper reserves nonces ahead, in blocks).
pub fn encryptions_reserved(bin: &Path, key_store: &str) -> Option<u64> {
    let (_, out) = cli(
        bin,
        &["key", "list", "--key-store", key_store, "--output", "json"],
    )
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let active = v["active_key_id"].as_str()?;
    v["keys"].as_array()?.iter().find(|k| k["id"] == active)?["encryptions_reserved"].as_u64()
}

/// A running `kms-plugin serve`: SIGKILLed and reaped on drop, also on error paths.
pub struct Serve {
    child: Child,
    pub socket: PathBuf,
    stderr_path: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Spawns `serve --key-store KS BACKEND --socket DIR/NAME.sock --http-addr off EXTRA`
    /// and returns at once (see [`Serve::wait_socket`]).
    pub fn spawn(
        bin: &Path,
        key_store: &str,
        backend: &[String],
        dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let name = format!("kms-{:08x}", rand::random::<u32>());
        let socket = dir.join(format!("{name}.sock"));
        let stderr_path = dir.join(format!("{name}.log"));
        let child = command(bin)
            .args(["serve", "--key-store", key_store])
            .args(backend)
            .arg("--socket")
            .arg(&socket)
            .args(["--http-addr", "off"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()
            .context("spawning kms-plugin serve")?;
        Ok(Self {
            child,
            socket,
            stderr_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the plugin wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("kms-plugin serve exited ({status}):\n{}", self.logs());
        }
        Ok(())
    }

    /// Waits until the socket accepts connections.
    pub async fn wait_socket(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive()?;
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kms-plugin did not open its socket within {within:?}:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGHUP: reload the key store now.
    pub fn hup(&self) -> Result<()> {
        let st = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .context("running kill -HUP")?;
        if !st.success() {
            bail!("kill -HUP {} failed", self.pid());
        }
        Ok(())
    }
}

/// A gRPC channel over a Unix socket, as kube-apiserver dials `unix://PATH`: one HTTP/2
/// connection, many multiplexed streams.
pub async fn connect(path: &Path) -> Result<Channel> {
    edgeseal_test_support::connect_unix(path)
        .await
        .context("connecting to the plugin socket")
}
