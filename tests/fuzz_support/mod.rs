//! Shared by the fuzz replay tests (`fuzz_replay_kms.rs`, `fuzz_replay_sidecar.rs`): runs
//! every committed input of `tests/fuzz/corpus/<target>/` and `tests/fuzz/regressions/<target>/`
//! through the library's fuzz target body, the same function the fuzzer calls, and writes
//! the generated seed corpus on request.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

pub type Target = (&'static str, fn(&[u8]));

/// `tests/fuzz`, the fuzzing workspace.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

/// Replays every corpus and regression input of each target; fails naming each input
/// that panicked (the panic message is printed above it).
pub fn replay(targets: &[Target]) {
    let root = fuzz_dir();
    let mut failures = Vec::new();
    for (name, body) in targets {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "no seed corpus for fuzz target {name} in {}",
            root.join("corpus").display()
        );
        let regressions = inputs(&root.join("regressions").join(name));
        for file in corpus.iter().chain(&regressions) {
            let data = fs::read(file).unwrap();
            if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                failures.push(file.display().to_string());
            }
        }
        eprintln!(
            "{name}: {} corpus and {} regression input(s) replayed",
            corpus.len(),
            regressions.len()
        );
    }
    assert!(failures.is_empty(), "fuzz inputs that fail: {failures:#?}");
}

/// Each target has its `[[bin]]` source, and that source calls this crate's target body
/// (so the fuzzer and this replay run the same code).
pub fn check_harness(crate_name: &str, targets: &[Target]) {
    let root = fuzz_dir();
    let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for (name, _) in targets {
        let src = root.join("fuzz_targets").join(format!("{name}.rs"));
        let text = fs::read_to_string(&src)
            .unwrap_or_else(|e| panic!("fuzz target {name}: {}: {e}", src.display()));
        let call = format!("{crate_name}::fuzzing::{name}");
        assert!(
            text.contains(&call),
            "{} does not call {call}",
            src.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "tests/fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
    // Every folder of inputs belongs to a target that exists.
    for kind in ["corpus", "regressions"] {
        for entry in fs::read_dir(root.join(kind)).unwrap() {
            let dir = entry.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                root.join("fuzz_targets")
                    .join(format!("{name}.rs"))
                    .exists(),
                "tests/fuzz/{kind}/{name} has no fuzz target"
            );
        }
    }
}

/// Writes generated seeds to `corpus/<target>/seed-<name>` (existing files are replaced).
pub fn write_seeds(target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = fuzz_dir().join("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for (name, bytes) in seeds {
        fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
