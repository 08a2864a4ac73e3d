//! `--check-config`: everything the sidecar checks at start-up, without a single network
//! request, then the plan (which identity, which objects into which files). For migrations
//! from the Secrets Store CSI driver and for CI pipelines that lint pod specs' configs.
//!
//! The plan names objects and files only: no credential, token or secret value is read.

use std::fmt::Write as _;

use crate::config::{Config, ObjectKind};
use crate::identity::{self, Env};
use crate::{http, runner};

/// One line per check; `Err` lists every failed check (not just the first).
pub fn check(cfg: &Config, env: &Env) -> Result<String, String> {
    let mut out = String::new();
    let mut failed = Vec::new();
    let mut line = |ok: bool, what: &str, detail: String| {
        let _ = writeln!(out, "{} {what}: {detail}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failed.push(what.to_owned());
        }
    };
    line(
        true,
        "config",
        format!(
            "vault {}, {} object(s), refresh every {}",
            cfg.vault_url,
            cfg.objects.len(),
            humantime::format_duration(cfg.refresh_interval)
        ),
    );
    match runner::check_output_dir(cfg) {
        Ok(()) => line(
            true,
            "output directory",
            format!("{} (in memory)", cfg.output_dir.display()),
        ),
        Err(e) => line(false, "output directory", crate::error_chain(&e)),
    }
    match http::build(cfg.ca_file.as_deref(), cfg.request_timeout) {
        Ok(clients) => {
            line(
                true,
                "TLS trust",
                match &cfg.ca_file {
                    Some(f) => format!("system roots + {}", f.display()),
                    None => "system roots".to_owned(),
                },
            );
            match identity::select(cfg, env, &clients) {
                Ok(source) => match source.preflight() {
                    Ok(()) => line(true, "identity", source.name().to_owned()),
                    Err(e) => line(false, "identity", e.to_string()),
                },
                Err(e) => line(false, "identity", e.to_string()),
            }
        }
        Err(e) => line(false, "TLS trust", e.to_string()),
    }
    for o in &cfg.objects {
        let kind = match o.kind {
            ObjectKind::Secret => "secret",
            ObjectKind::Cert => "cert",
            ObjectKind::Key => "key",
        };
        let version = o.version.as_deref().unwrap_or("latest");
        let files = o.file_names(cfg.split_cert_key).join(", ");
        let _ = writeln!(
            out,
            "     {kind} {}@{version} -> {files} (mode {:04o})",
            o.name, o.mode
        );
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        let _ = writeln!(
            out,
            "{} check(s) failed: {}",
            failed.len(),
            failed.join(", ")
        );
        Err(out)
    }
}
