//! The example workloads in deploy/sidecar work with this sidecar, checked with its own
//! CLI and config code rather than by eye:
//!
//! - its arguments, environment and mounted config file resolve to a valid configuration;
//! - the probes reach the port it listens on, on an address the kubelet can reach (the
//!   default, 127.0.0.1:8096, is loopback: a pod that probes it sets SIDECAR_HTTP_ADDR or
//!   --http-addr to 0.0.0.0 with the same port);
//! - a native sidecar (restartPolicy: Always) has a startupProbe on /readyz, and a plain
//!   init container runs with --once (or the pod would never start);
//! - secrets land in a memory-backed emptyDir with a size limit, mounted read-only by the app;
//! - security contexts are hardened, a signal to the app has a shared process namespace,
//!   and workload identity has its label and a ServiceAccount with a client id.
//!
//! The Kubernetes schemas themselves are checked by deploy/validate.py (tests/deploy_manifests.rs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;
use serde_yaml_ng::Value;
use sidecar::cli::Cli;
use sidecar::config::raw::RawConfig;
use sidecar::config::{Config, DEFAULT_HTTP_ADDR};

const IMAGE: &str = "ghcr.io/edgeseal/sidecar";

struct Doc {
    file: String,
    value: Value,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sidecar")
}

fn docs() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let file = format!(
            "deploy/sidecar/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}"));
            if !value.is_null() {
                out.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    out
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

fn path_of<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(v, |v, k| v.get(*k))
}

fn kind_name(d: &Doc) -> (&str, &str) {
    (
        s(&d.value, "kind").unwrap_or("?"),
        path_of(&d.value, &["metadata", "name"])
            .and_then(Value::as_str)
            .unwrap_or("?"),
    )
}

/// (pod template labels, pod spec) of a workload document.
fn pod_of(v: &Value) -> Option<(Option<&Value>, &Value)> {
    match s(v, "kind")? {
        "Pod" => Some((path_of(v, &["metadata", "labels"]), v.get("spec")?)),
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => {
            let t = path_of(v, &["spec", "template"])?;
            Some((path_of(t, &["metadata", "labels"]), t.get("spec")?))
        }
        "CronJob" => {
            let t = path_of(v, &["spec", "jobTemplate", "spec", "template"])?;
            Some((path_of(t, &["metadata", "labels"]), t.get("spec")?))
        }
        _ => None,
    }
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Doc> {
    docs.iter().find(|d| kind_name(d) == (kind, name))
}

/// The config file the container mounts from a ConfigMap in deploy/sidecar.
fn mounted_config(docs: &[Doc], spec: &Value, c: &Value, file: &Path, what: &str) -> RawConfig {
    let mount = list(c, "volumeMounts")
        .iter()
        .find(|m| s(m, "mountPath").is_some_and(|p| file.parent() == Some(Path::new(p))))
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", file.display()));
    let volume = list(spec, "volumes")
        .iter()
        .find(|v| s(v, "name") == s(mount, "name"))
        .unwrap_or_else(|| panic!("{what}: no volume {:?}", s(mount, "name")));
    let cm_name = path_of(volume, &["configMap", "name"])
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: the config volume is not a ConfigMap"));
    let cm = find(docs, "ConfigMap", cm_name)
        .unwrap_or_else(|| panic!("{what}: ConfigMap {cm_name} is not in deploy/sidecar"));
    let key = file.file_name().unwrap().to_str().unwrap();
    let text = path_of(&cm.value, &["data", key])
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: ConfigMap {cm_name} has no data.{key}"));
    serde_yaml_ng::from_str(text)
        .unwrap_or_else(|e| panic!("{}: data.{key} is not a sidecar config: {e}", cm.file))
}

/// What the sidecar would run with in this container: its arguments through the real CLI,
/// the manifest's SIDECAR_* environment, the mounted config file, through the real resolver.
fn resolve(docs: &[Doc], spec: &Value, c: &Value, what: &str) -> Config {
    let args: Vec<String> = list(c, "args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert!(
        c.get("command").is_none(),
        "{what}: keep the image's entry point (set args, not command)"
    );
    let cli = Cli::try_parse_from(std::iter::once("sidecar".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("{what}: the sidecar refuses its arguments {args:?}:\n{e}"));
    let mut overrides = cli.overrides();
    for e in list(c, "env") {
        let name = s(e, "name").unwrap();
        let value = s(e, "value");
        match name {
            // A flag wins over its variable, as clap does it.
            // A flag wins over its variable, as clap does it.
            "SIDECAR_HTTP_ADDR" => {
                overrides.http_addr = overrides.http_addr.take().or(value.map(str::to_owned));
            }
            n if n.starts_with("SIDECAR_") => panic!(
                "{what}: sets {n}, which this test does not model yet: teach resolve() about it"
            ),
            _ => {}
        }
    }
    let raw = match &cli.config {
        Some(file) => mounted_config(docs, spec, c, file, what),
        None => RawConfig::default(),
    };
    Config::resolve(raw, overrides)
        .unwrap_or_else(|e| panic!("{what}: the sidecar would refuse to start: {e}"))
}

fn http_probes(c: &Value) -> Vec<(&'static str, &Value)> {
    ["startupProbe", "livenessProbe", "readinessProbe"]
        .into_iter()
        .filter_map(|p| Some((p, c.get(p)?.get("httpGet")?)))
        .collect()
}

/// Where the sidecar runs in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// An init container with restartPolicy: Always.
    NativeSidecar,
    /// A plain init container.
    Init,
    /// A regular container next to the app.
    Container,
}

fn check_sidecar(
    docs: &[Doc],
    doc: &Doc,
    labels: Option<&Value>,
    spec: &Value,
    c: &Value,
    role: Role,
) {
    let (kind, name) = kind_name(doc);
    let what = format!(
        "{} {kind}/{name} container {}",
        doc.file,
        s(c, "name").unwrap_or("?")
    );
    let image = s(c, "image").unwrap();
    assert_eq!(
        image,
        format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION")),
        "{what}: the image is this release's"
    );
    let cfg = resolve(docs, spec, c, &what);

    // Native sidecar: keeps running, gates the app on /readyz. Plain init container: must
    // exit, so --once. Next to the app: keeps running.
    match role {
        Role::NativeSidecar => {
            let startup = path_of(c, &["startupProbe", "httpGet", "path"]).and_then(Value::as_str);
            assert_eq!(
                startup,
                Some("/readyz"),
                "{what}: a native sidecar needs a startupProbe on /readyz so the app starts after the first sync"
            );
            assert!(!cfg.once, "{what}: a native sidecar must not run --once");
        }
        Role::Init => assert!(
            cfg.once,
            "{what}: a plain init container must run --once, or the pod never starts"
        ),
        Role::Container => assert!(!cfg.once, "{what}: --once would exit and restart"),
    }

    // Probes go to the pod's IP, at the port the sidecar listens on.
    let probes = http_probes(c);
    if !probes.is_empty() {
        let default: SocketAddr = DEFAULT_HTTP_ADDR.parse().unwrap();
        let addr = cfg
            .http_addr
            .unwrap_or_else(|| panic!("{what}: has HTTP probes but its HTTP listener is off"));
        assert!(
            !addr.ip().is_loopback(),
            "{what}: listens on {addr}, which the kubelet's probes cannot reach (they go to the \
             pod IP): set SIDECAR_HTTP_ADDR or --http-addr to 0.0.0.0:{} (the default is {DEFAULT_HTTP_ADDR})",
            default.port()
        );
        for (probe, get) in probes {
            assert!(
                get.get("host").is_none(),
                "{what}: {probe} must probe the pod IP (no host)"
            );
            assert_eq!(
                get.get("port").and_then(Value::as_u64),
                Some(u64::from(addr.port())),
                "{what}: {probe} port must be the port the sidecar listens on ({addr})"
            );
            assert!(
                matches!(s(get, "path"), Some("/readyz" | "/healthz")),
                "{what}: {probe} path"
            );
        }
    }

    // Output: a memory-backed emptyDir with a size limit; the app mounts it read-only.
    let out = cfg.output_dir.to_str().unwrap();
    let mount = list(c, "volumeMounts")
        .iter()
        .find(|m| s(m, "mountPath") == Some(out))
        .unwrap_or_else(|| panic!("{what}: nothing mounted at the output directory {out}"));
    let vol_name = s(mount, "name").unwrap();
    assert_ne!(
        mount.get("readOnly").and_then(Value::as_bool),
        Some(true),
        "{what}: the sidecar writes the output volume"
    );
    let vol = list(spec, "volumes")
        .iter()
        .find(|v| s(v, "name") == Some(vol_name))
        .unwrap();
    let empty_dir = vol
        .get("emptyDir")
        .unwrap_or_else(|| panic!("{what}: volume {vol_name} must be an emptyDir"));
    assert_eq!(
        s(empty_dir, "medium"),
        Some("Memory"),
        "{what}: volume {vol_name} must be memory-backed (the sidecar refuses a disk)"
    );
    assert!(
        empty_dir.get("sizeLimit").is_some(),
        "{what}: volume {vol_name} needs a sizeLimit"
    );
    for other in list(spec, "containers") {
        for m in list(other, "volumeMounts") {
            if s(m, "name") == Some(vol_name) {
                assert_eq!(
                    m.get("readOnly").and_then(Value::as_bool),
                    Some(true),
                    "{what}: container {:?} must mount the secrets read-only",
                    s(other, "name")
                );
            }
        }
    }

    // Hardened: no privilege escalation, read-only root, no capability, non-root, seccomp.
    let sc = c
        .get("securityContext")
        .unwrap_or_else(|| panic!("{what}: no securityContext"));
    assert_eq!(
        sc.get("allowPrivilegeEscalation").and_then(Value::as_bool),
        Some(false),
        "{what}: allowPrivilegeEscalation"
    );
    assert_eq!(
        sc.get("readOnlyRootFilesystem").and_then(Value::as_bool),
        Some(true),
        "{what}: readOnlyRootFilesystem"
    );
    assert!(
        path_of(sc, &["capabilities", "drop"])
            .and_then(Value::as_sequence)
            .is_some_and(|d| d.iter().any(|c| c.as_str() == Some("ALL"))),
        "{what}: capabilities must drop ALL"
    );
    let pod_sc = spec.get("securityContext");
    let either = |key: &str| {
        sc.get(key)
            .or_else(|| pod_sc.and_then(|p| p.get(key)))
            .cloned()
    };
    assert_eq!(
        either("runAsNonRoot").and_then(|v| v.as_bool()),
        Some(true),
        "{what}: runAsNonRoot"
    );
    assert_eq!(
        either("seccompProfile")
            .as_ref()
            .and_then(|p| s(p, "type"))
            .map(str::to_owned),
        Some("RuntimeDefault".to_owned()),
        "{what}: seccompProfile RuntimeDefault"
    );

    // Signalling the app by process name needs its processes in view.
    if cfg.notify.signal.is_some() {
        assert_eq!(
            spec.get("shareProcessNamespace").and_then(Value::as_bool),
            Some(true),
            "{what}: --notify-signal needs shareProcessNamespace: true"
        );
    }

    // Workload identity: the webhook's label, and a ServiceAccount with a client id.
    let wi = labels
        .and_then(|l| s(l, "azure.workload.identity/use"))
        .is_some_and(|v| v == "true");
    assert!(
        wi,
        "{what}: label azure.workload.identity/use: \"true\" on the pod"
    );
    let sa = s(spec, "serviceAccountName")
        .unwrap_or_else(|| panic!("{what}: workload identity needs a serviceAccountName"));
    let sa_doc = find(docs, "ServiceAccount", sa)
        .unwrap_or_else(|| panic!("{what}: ServiceAccount {sa} is not in deploy/sidecar"));
    assert!(
        path_of(
            &sa_doc.value,
            &[
                "metadata",
                "annotations",
                "azure.workload.identity/client-id"
            ]
        )
        .and_then(Value::as_str)
        .is_some_and(|id| !id.is_empty()),
        "{}: ServiceAccount {sa} needs the azure.workload.identity/client-id annotation",
        sa_doc.file
    );
}

#[test]
fn sidecar_manifests_match_what_the_sidecar_accepts() {
    let docs = docs();
    let mut checked = Vec::new();
    for doc in &docs {
        let Some((labels, spec)) = pod_of(&doc.value) else {
            continue;
        };
        for list_name in ["initContainers", "containers"] {
            for c in list(spec, list_name) {
                if !s(c, "image").is_some_and(|i| i.starts_with(&format!("{IMAGE}:"))) {
                    continue;
                }
                let role = match (list_name, s(c, "restartPolicy")) {
                    ("containers", _) => Role::Container,
                    (_, Some("Always")) => Role::NativeSidecar,
                    _ => Role::Init,
                };
                check_sidecar(&docs, doc, labels, spec, c, role);
                checked.push(format!("{} {}", doc.file, s(c, "name").unwrap_or("?")));
            }
        }
    }
    // One native sidecar with a config file, one signalling the app, one Job init container.
    assert!(
        checked.len() >= 3,
        "expected the sidecar in at least 3 workloads under deploy/sidecar, found {checked:?}"
    );
    println!("checked: {checked:#?}");
}
