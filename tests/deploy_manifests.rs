//! deploy/ and the container images agree with the code, so the docs cannot drift from it:
//!
//! - every YAML document under deploy/ validates against the Kubernetes schemas, offline
//!   (`python3 deploy/validate.py`, kubernetes-validate from tests/requirements.txt);
//! - the EncryptionConfiguration names the plugin's default socket and provider name, is
//!   KMS v2 with a timeout and no cache size, and lists `identity` only after the plugin;
//! - the static pod and the systemd unit pass the plugin arguments its CLI accepts, with the
//!   default socket, key store, TPM and HTTP address, and probe that address;
//! - both Dockerfiles are multi-stage, build with `--locked`, pin their base images and run
//!   as a non-root user.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use kms_plugin::backend::BackendKind;
use kms_plugin::cli::{Cli, Command as PluginCommand, ServeArgs};
use kms_plugin::defaults;
use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// `v[key]` that must be there.
fn get<'a>(v: &'a Value, key: &str, what: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("{what}: no `{key}` in {v:?}"))
}

fn str_of<'a>(v: &'a Value, key: &str, what: &str) -> &'a str {
    get(v, key, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not a string"))
}

fn seq<'a>(v: &'a Value, key: &str, what: &str) -> &'a Vec<Value> {
    get(v, key, what)
        .as_sequence()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not a list"))
}

fn http_addr() -> SocketAddr {
    defaults::HTTP_ADDR.parse().unwrap()
}

fn socket_dir() -> &'static Path {
    Path::new(defaults::SOCKET).parent().unwrap()
}

/// Parses a `kms-plugin serve ...` command line with the plugin's own CLI, so a flag the
/// plugin does not know fails here rather than on a node.
fn serve_args(args: &[String], what: &str) -> ServeArgs {
    let cli = Cli::try_parse_from(std::iter::once("kms-plugin".to_owned()).chain(args.to_vec()))
        .unwrap_or_else(|e| panic!("{what}: the plugin refuses its arguments {args:?}:\n{e}"));
    match cli.command {
        PluginCommand::Serve(s) => s,
        other => panic!("{what}: runs {other:?}, not `serve`"),
    }
}

/// The value of `--flag=value` (the form the manifests use) as written, not from the
/// environment, which clap would also consult.
fn flag<'a>(args: &'a [String], name: &str, what: &str) -> &'a str {
    let prefix = format!("--{name}=");
    let found: Vec<&str> = args
        .iter()
        .filter_map(|a| a.strip_prefix(&prefix))
        .collect();
    match found.as_slice() {
        [v] => v,
        _ => panic!("{what}: expected `--{name}=...` once in {args:?}"),
    }
}

/// The settings `serve` gets must be the defaults the code, the docs and kube-apiserver's
/// EncryptionConfiguration use.
fn assert_default_serve(args: &[String], what: &str) {
    let serve = serve_args(args, what);
    assert_eq!(
        flag(args, "socket", what),
        defaults::SOCKET,
        "{what}: socket"
    );
    assert_eq!(
        serve.socket.as_deref(),
        Some(Path::new(defaults::SOCKET)),
        "{what}: socket"
    );
    assert_eq!(
        flag(args, "key-store", what),
        defaults::KEY_STORE,
        "{what}: key store"
    );
    assert_eq!(
        serve.store.key_store.as_deref(),
        Some(Path::new(defaults::KEY_STORE)),
        "{what}: key store"
    );
    assert_eq!(
        flag(args, "http-addr", what),
        defaults::HTTP_ADDR,
        "{what}: HTTP address"
    );
    assert_eq!(
        serve.http_addr.as_deref(),
        Some(defaults::HTTP_ADDR),
        "{what}: HTTP address"
    );
    assert_eq!(flag(args, "tcti", what), defaults::TCTI, "{what}: TCTI");
    assert_eq!(flag(args, "backend", what), "tpm", "{what}: backend");
    assert!(
        matches!(serve.store.backend, Some(BackendKind::Tpm)),
        "{what}: backend"
    );
}

#[test]
fn every_deploy_yaml_validates_against_the_kubernetes_schemas() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = Command::new(&python)
        .arg("deploy/validate.py")
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} deploy/validate.py ({e}): install Python 3, then pip install -r tests/requirements.txt")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => println!("{stdout}"),
        Some(3) => panic!(
            "deploy/validate.py lacks a Python module; run: pip install -r tests/requirements.txt\n{stdout}{stderr}"
        ),
        _ => panic!(
            "deploy/validate.py: some deploy/ YAML is invalid ({}):\n{stdout}{stderr}",
            out.status
        ),
    }
}

#[test]
fn encryption_config_points_at_the_plugin_defaults() {
    const FILE: &str = "deploy/kms-plugin/encryption-config.yaml";
    let cfg = yaml(FILE);
    assert_eq!(
        str_of(&cfg, "apiVersion", FILE),
        "apiserver.config.k8s.io/v1"
    );
    assert_eq!(str_of(&cfg, "kind", FILE), "EncryptionConfiguration");

    let entries = seq(&cfg, "resources", FILE);
    let secrets: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            seq(e, "resources", FILE)
                .iter()
                .any(|r| r.as_str() == Some("secrets"))
        })
        .collect();
    assert_eq!(secrets.len(), 1, "{FILE}: one entry must cover secrets");
    let providers = seq(secrets[0], "providers", FILE);

    let kms_at: Vec<usize> = (0..providers.len())
        .filter(|&i| providers[i].get("kms").is_some())
        .collect();
    assert_eq!(
        kms_at,
        [0],
        "{FILE}: the plugin must be the first (writing) provider, once"
    );
    let kms = get(&providers[0], "kms", FILE);
    assert_eq!(str_of(kms, "apiVersion", FILE), "v2", "{FILE}: KMS v2");
    assert_eq!(
        str_of(kms, "name", FILE),
        defaults::PROVIDER_NAME,
        "{FILE}: the provider name is stored in every encrypted object's prefix"
    );
    assert_eq!(
        str_of(kms, "endpoint", FILE),
        format!("unix://{}", defaults::SOCKET),
        "{FILE}: the endpoint is the plugin's default socket"
    );
    let timeout = str_of(kms, "timeout", FILE);
    let timeout = humantime::parse_duration(timeout)
        .unwrap_or_else(|e| panic!("{FILE}: timeout {timeout:?}: {e}"));
    assert!(
        !timeout.is_zero(),
        "{FILE}: the timeout must be more than zero"
    );
    assert!(
        kms.get("cachesize").is_none(),
        "{FILE}: kube-apiserver refuses cachesize with KMS v2"
    );

    // identity, if there, reads data written before encryption was on: it must never be
    // first (it would write plaintext), and comes after the plugin.
    for (i, p) in providers.iter().enumerate() {
        if p.get("identity").is_some() {
            assert!(
                i > 0,
                "{FILE}: identity before the kms provider writes plaintext"
            );
        }
    }

    // The demo prints the same configuration for the same socket.
    let demo: Value = serde_yaml_ng::from_str(&kms_plugin::cli::encryption_configuration(
        Path::new(defaults::SOCKET),
    ))
    .unwrap();
    assert_eq!(
        demo, cfg,
        "{FILE} and `kms-plugin demo`'s EncryptionConfiguration differ"
    );
}

#[test]
fn static_pod_uses_the_plugin_defaults_and_probes_its_address() {
    const FILE: &str = "deploy/kms-plugin/static-pod.yaml";
    let pod = yaml(FILE);
    assert_eq!(str_of(&pod, "kind", FILE), "Pod");
    let spec = get(&pod, "spec", FILE);
    let containers = seq(spec, "containers", FILE);
    assert_eq!(containers.len(), 1, "{FILE}: one container");
    let c = &containers[0];

    let image = str_of(c, "image", FILE);
    assert_eq!(
        image,
        format!("ghcr.io/edgeseal/kms-plugin:{}", env!("CARGO_PKG_VERSION")),
        "{FILE}: the image is this release's"
    );
    let args: Vec<String> = seq(c, "args", FILE)
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_default_serve(&args, FILE);

    // Probes reach the loopback listener only from the host's network namespace.
    let addr = http_addr();
    if addr.ip().is_loopback() {
        assert_eq!(
            spec.get("hostNetwork").and_then(Value::as_bool),
            Some(true),
            "{FILE}: a loopback HTTP address needs hostNetwork for the kubelet's probes"
        );
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let what = format!("{FILE}: {probe}");
        let get_ = get(get(c, probe, &what), "httpGet", &what);
        assert_eq!(str_of(get_, "path", &what), path, "{what}");
        assert_eq!(
            str_of(get_, "host", &what),
            addr.ip().to_string(),
            "{what}: host must be the plugin's HTTP address ({})",
            defaults::HTTP_ADDR
        );
        assert_eq!(
            get(get_, "port", &what).as_u64(),
            Some(u64::from(addr.port())),
            "{what}: port must be the plugin's HTTP address ({})",
            defaults::HTTP_ADDR
        );
    }

    // The socket directory and the key store are the host's, at the same paths as on the
    // host (kube-apiserver mounts the same socket directory), and the TPM is the device the
    // TCTI names.
    let mounts = seq(c, "volumeMounts", FILE);
    let volumes = seq(spec, "volumes", FILE);
    let host_path_at = |mount_path: &Path| -> (String, Option<String>) {
        let m = mounts
            .iter()
            .find(|m| Path::new(str_of(m, "mountPath", FILE)) == mount_path)
            .unwrap_or_else(|| panic!("{FILE}: nothing mounted at {}", mount_path.display()));
        let name = str_of(m, "name", FILE);
        let v = volumes
            .iter()
            .find(|v| str_of(v, "name", FILE) == name)
            .unwrap_or_else(|| panic!("{FILE}: no volume {name}"));
        let hp = get(v, "hostPath", FILE);
        (
            str_of(hp, "path", FILE).to_owned(),
            hp.get("type").and_then(Value::as_str).map(str::to_owned),
        )
    };
    assert_eq!(
        host_path_at(socket_dir()).0,
        socket_dir().to_str().unwrap(),
        "{FILE}: socket directory"
    );
    assert_eq!(
        host_path_at(Path::new(defaults::KEY_STORE)).0,
        defaults::KEY_STORE,
        "{FILE}: key store"
    );
    let device = defaults::TCTI.strip_prefix("device:").unwrap();
    assert_eq!(
        host_path_at(Path::new(device)),
        (device.to_owned(), Some("CharDevice".to_owned())),
        "{FILE}: TPM device"
    );
}

#[test]
fn systemd_unit_uses_the_plugin_defaults() {
    const FILE: &str = "deploy/kms-plugin/edgeseal-kms.service";
    let unit = read(FILE).replace("\\\n", " ");
    let setting = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let exec = setting("ExecStart");
    assert_eq!(exec.len(), 1, "{FILE}: one ExecStart");
    let mut words = exec[0].split_whitespace().map(str::to_owned);
    assert_eq!(
        words.next().as_deref(),
        Some("/usr/local/bin/kms-plugin"),
        "{FILE}: ExecStart"
    );
    let args: Vec<String> = words.collect();
    assert_default_serve(&args, FILE);

    // systemd creates and opens exactly the directories the plugin uses.
    let state = setting("StateDirectory");
    assert_eq!(
        state
            .iter()
            .map(|s| format!("/var/lib/{s}"))
            .collect::<Vec<_>>(),
        [defaults::KEY_STORE],
        "{FILE}: StateDirectory is the key store"
    );
    let runtime = setting("RuntimeDirectory");
    assert_eq!(
        runtime
            .iter()
            .map(|s| format!("/var/run/{s}"))
            .collect::<Vec<_>>(),
        [socket_dir().to_str().unwrap()],
        "{FILE}: RuntimeDirectory holds the socket"
    );
    let writable: Vec<String> = setting("ReadWritePaths")
        .iter()
        .flat_map(|s| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    for dir in [Path::new(defaults::KEY_STORE), socket_dir()] {
        assert!(
            writable.iter().any(|w| dir.starts_with(w)),
            "{FILE}: {} is not under ReadWritePaths {writable:?}",
            dir.display()
        );
    }
    let device = defaults::TCTI.strip_prefix("device:").unwrap();
    assert!(
        setting("DeviceAllow")
            .iter()
            .any(|d| d.split_whitespace().next() == Some(device)),
        "{FILE}: DeviceAllow must let the plugin open {device}"
    );
}

#[test]
fn docs_name_the_same_socket_key_store_and_address() {
    let readme = read("README.md");
    for needle in [
        format!("endpoint: unix://{}", defaults::SOCKET),
        format!("name: {}", defaults::PROVIDER_NAME),
        format!("--key-store {}", defaults::KEY_STORE),
        format!("--socket {}", defaults::SOCKET),
        format!("--http-addr {}", defaults::HTTP_ADDR),
    ] {
        assert!(readme.contains(&needle), "README.md lacks {needle:?}");
    }
    const GUIDE: &str = "deploy/kms-plugin/README.md";
    let guide = read(GUIDE);
    let dir = socket_dir().to_str().unwrap();
    for needle in [
        format!("--key-store {}", defaults::KEY_STORE),
        format!("http://{}/readyz", defaults::HTTP_ADDR),
        format!("mountPath: {dir}"),
        format!("hostPath: {{path: {dir},"),
    ] {
        assert!(guide.contains(&needle), "{GUIDE} lacks {needle:?}");
    }
}

/// The instructions of a Dockerfile with their arguments, continuation lines joined and
/// comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (op, rest) = current.split_once(char::is_whitespace).unwrap();
                out.push((op.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfiles_are_multi_stage_locked_pinned_and_non_root() {
    for krate in ["kms-plugin", "sidecar"] {
        let file = format!("{krate}/Dockerfile");
        let text = read(&file);
        assert!(
            text.contains(&format!("docker build -f {krate}/Dockerfile")),
            "{file}: the header must say how to build it (from the repository root)"
        );
        let ins = instructions(&text);
        let froms: Vec<usize> = (0..ins.len()).filter(|&i| ins[i].0 == "FROM").collect();
        assert!(
            froms.len() >= 2,
            "{file}: multi-stage (builder, then runtime)"
        );
        for &i in &froms {
            let image = ins[i].1.split_whitespace().next().unwrap();
            let stage_ref = froms
                .iter()
                .any(|&j| j < i && ins[j].1.ends_with(&format!(" AS {image}")));
            let tag = image.rsplit_once('/').map_or(image, |(_, t)| t);
            assert!(
                stage_ref
                    || image.contains('@')
                    || (tag.contains(':') && !tag.ends_with(":latest")),
                "{file}: base image {image:?} must be pinned to a tag or digest, not latest"
            );
        }
        assert!(
            ins.iter().any(|(op, args)| op == "RUN"
                && args.contains(&format!("cargo build --release --locked -p {krate}"))),
            "{file}: must build with `cargo build --release --locked -p {krate}`"
        );

        // The runtime stage: a non-root user, an exec-form entry point, only the build's
        // output copied from the builder.
        let last = *froms.last().unwrap();
        let runtime = &ins[last..];
        let users: Vec<&str> = runtime
            .iter()
            .filter(|(op, _)| op == "USER")
            .map(|(_, a)| a.as_str())
            .collect();
        let user = users
            .last()
            .unwrap_or_else(|| panic!("{file}: the runtime stage must set USER"));
        let name = user.split(':').next().unwrap();
        assert!(
            name != "root" && name != "0" && !name.is_empty(),
            "{file}: the runtime user must not be root (is {user:?})"
        );
        let entry = runtime
            .iter()
            .find(|(op, _)| op == "ENTRYPOINT")
            .unwrap_or_else(|| panic!("{file}: no ENTRYPOINT in the runtime stage"));
        assert_eq!(
            entry.1,
            format!("[\"/usr/local/bin/{krate}\"]"),
            "{file}: exec-form ENTRYPOINT of the binary"
        );
        assert!(
            runtime
                .iter()
                .all(|(op, _)| !matches!(op.as_str(), "RUN" | "ADD")),
            "{file}: the runtime stage has no shell to RUN and fetches nothing"
        );
        for (op, args) in runtime.iter().filter(|(op, _)| op == "COPY") {
            assert!(
                args.starts_with("--from=builder /out/"),
                "{file}: {op} {args}: the runtime stage copies only the builder's /out"
            );
        }
        for label in ["title", "source", "licenses"] {
            assert!(
                runtime.iter().any(|(op, args)| op == "LABEL"
                    && args.contains(&format!("org.opencontainers.image.{label}="))),
                "{file}: label org.opencontainers.image.{label}"
            );
        }
    }

    let ignore = read(".dockerignore");
    for needed in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == needed),
            ".dockerignore must keep {needed} out of the build context"
        );
    }
}
