//! The suite-wide log gate: no secret value or token used by a test may appear in any log
//! line of any process the tests run.
//!
//! Two layers:
//! - per process: the harnesses register every secret they hand out ([`watch_bytes`],
//!   [`watch_str`]: DEK seeds, vault secret values, client secrets, assertions) and call
//!   [`check`] on every log they collected when the process ends, so the test that leaked
//!   fails, naming the log and the kind of value (never the value itself);
//! - whole suite: [`check`] also archives each log with the encodings it was checked
//!   against under `target/tmp/suite-logs/`, and the `log_gate` test checks every archived
//!   log against the secrets of every test (a value from one test leaking into another's
//!   log is caught too). `.ci/run` runs it once more after the whole suite.
//!
//! A secret is looked for in the forms a careless log line would use: as text, lower and
//! upper hex, standard and URL-safe base64 (padded or not), and Rust's `{:?}` of a byte
//! slice. JWTs (access tokens, assertions: base64url JSON, so they start with `eyJ`) are
//! looked for by shape.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use aho_corasick::AhoCorasick;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// Where every checked log is archived for the whole-suite sweep.
pub fn archive_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("suite-logs")
}

/// One secret: what kind it is (named in failures) and the strings that betray it.
#[derive(Clone)]
pub struct Watched {
    pub label: String,
    pub forms: Vec<String>,
}

static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());
static ARCHIVED: AtomicUsize = AtomicUsize::new(0);

/// The encodings of `bytes` a log line could carry. Short values are skipped: they could
/// match by chance and are not realistic secrets.
pub fn forms_of_bytes(bytes: &[u8]) -> Vec<String> {
    if bytes.len() < 8 {
        return Vec::new();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut forms = vec![
        hex.to_uppercase(),
        hex,
        STANDARD.encode(bytes),
        STANDARD_NO_PAD.encode(bytes),
        URL_SAFE.encode(bytes),
        URL_SAFE_NO_PAD.encode(bytes),
        // `{:?}` of a byte slice or Vec<u8>: the first eight elements are enough.
        format!(
            "[{}",
            bytes[..8]
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ];
    if let Ok(s) = std::str::from_utf8(bytes)
        && s.trim().len() >= 8
    {
        // A multi-line value (a PEM) would be logged with its newlines escaped or split:
        // any of its distinctive lines betrays it; armour lines are not distinctive.
        if s.trim().contains('\n') {
            forms.extend(
                s.lines()
                    .map(str::trim)
                    .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                    .map(str::to_owned),
            );
        } else {
            forms.push(s.trim().to_owned());
        }
    }
    forms.sort();
    forms.dedup();
    forms
}

/// Registers secret bytes (e.g. a DEK seed) that no log may contain.
pub fn watch_bytes(label: &str, bytes: &[u8]) {
    let forms = forms_of_bytes(bytes);
    if !forms.is_empty() {
        WATCHED.lock().unwrap().push(Watched {
            label: label.to_owned(),
            forms,
        });
    }
}

/// Registers a secret string (a vault value, a client secret, a token) that no log may
/// contain, in any of its encodings.
pub fn watch_str(label: &str, s: &str) {
    watch_bytes(label, s.as_bytes());
}

/// Everything registered so far in this test process.
pub fn watched() -> Vec<Watched> {
    WATCHED.lock().unwrap().clone()
}

/// The first leak in `text`: `(line number, what leaked)`. `what` names the kind of value,
/// never the value.
pub fn find_leak(text: &str, watched: &[Watched]) -> Option<(usize, String)> {
    Detector::new(watched).find(text)
}

/// All forms of all secrets in one Aho-Corasick automaton: one pass per text.
pub struct Detector {
    ac: Option<AhoCorasick>,
    labels: Vec<String>,
}

impl Detector {
    pub fn new(watched: &[Watched]) -> Self {
        let mut forms = Vec::new();
        let mut labels = Vec::new();
        for w in watched {
            for f in &w.forms {
                forms.push(f.as_str());
                labels.push(w.label.clone());
            }
        }
        let ac = (!forms.is_empty())
            .then(|| AhoCorasick::new(&forms).expect("secret forms build an automaton"));
        Self { ac, labels }
    }

    pub fn find(&self, text: &str) -> Option<(usize, String)> {
        let line_of = |at: usize| text[..at].matches('\n').count() + 1;
        let mut first = self
            .ac
            .as_ref()
            .and_then(|ac| ac.find(text))
            .map(|m| (m.start(), self.labels[m.pattern().as_usize()].clone()));
        if let Some(at) = jwt_at(text)
            && first.as_ref().is_none_or(|(f, _)| at < *f)
        {
            first = Some((at, "a JWT (token or assertion)".to_owned()));
        }
        first.map(|(at, what)| (line_of(at), what))
    }
}

/// Where a JWT starts in `text`: `eyJ`, base64url, a dot, more base64url.
fn jwt_at(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let b64url = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let mut from = 0;
    while let Some(i) = text[from..].find("eyJ").map(|i| i + from) {
        let head = b[i..].iter().take_while(|&&c| b64url(c)).count();
        if head >= 10 && b.get(i + head) == Some(&b'.') {
            let body = b[i + head + 1..].iter().take_while(|&&c| b64url(c)).count();
            if body >= 4 {
                return Some(i);
            }
        }
        from = i + 3;
    }
    None
}

/// Checks `text` (the whole log of `origin`, e.g. "kms-plugin serve stderr") against every
/// secret registered in this process and for JWTs; archives it for the suite-wide sweep.
/// Panics naming the log, line and kind of secret.
pub fn check(origin: &str, text: &str) {
    let watched = watched();
    archive(origin, text, &watched);
    if let Some((line, what)) = find_leak(text, &watched) {
        panic!(
            "log gate: {what} is in {origin}, line {line} (value not shown). A secret must \
             never be logged: find the log statement that formats it."
        );
    }
}

/// Checks a log file (missing files are nothing to check).
pub fn check_file(origin: &str, path: &Path) {
    if let Ok(text) = fs::read_to_string(path) {
        check(&format!("{origin} ({})", path.display()), &text);
    }
}

/// Saves `text` as one `.log` and, rewritten each time, this process's secrets as its
/// `.watch` file (each form hex-encoded after its label) for the whole-suite sweep. The
/// first archive of a process removes the previous run's files of the same test binary.
/// Best effort: archiving must not fail a test.
fn archive(origin: &str, text: &str, watched: &[Watched]) {
    let dir = archive_dir();
    if fs::create_dir_all(&dir).is_err() {
        return;
    }
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "test".into());
    let pid = std::process::id();
    let n = ARCHIVED.fetch_add(1, Ordering::Relaxed);
    if n == 0
        && let Ok(rd) = fs::read_dir(&dir)
    {
        let mine = format!("{exe}-{pid}-");
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{exe}-")) && !name.starts_with(&mine) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::write(
        dir.join(format!("{exe}-{pid}-{n}.log")),
        format!("# origin: {origin}\n{text}"),
    );
    let mut w = String::new();
    for item in watched {
        w.push_str(&format!("label {}\n", item.label));
        for f in &item.forms {
            let hex: String = f.bytes().map(|b| format!("{b:02x}")).collect();
            w.push_str(&format!("form {hex}\n"));
        }
    }
    let tmp = dir.join(format!("{exe}-{pid}-{n}.watch.tmp"));
    if fs::write(&tmp, w).is_ok() {
        let _ = fs::rename(&tmp, dir.join(format!("{exe}-{pid}-all.watch")));
    }
}

/// Reads every archived `.watch` file back: all secrets of all test processes.
pub fn archived_watched(dir: &Path) -> Vec<Watched> {
    let mut all: Vec<Watched> = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return all;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|e| e.to_str()) != Some("watch") {
            continue;
        }
        let text = fs::read_to_string(&p).unwrap_or_default();
        for line in text.lines() {
            if let Some(label) = line.strip_prefix("label ") {
                all.push(Watched {
                    label: label.to_owned(),
                    forms: Vec::new(),
                });
            } else if let (Some(hex), Some(last)) = (line.strip_prefix("form "), all.last_mut()) {
                let bytes: Vec<u8> = (0..hex.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect();
                last.forms
                    .push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    // The same secret is archived with every log of its process: keep one copy.
    all.sort_by(|a, b| a.forms.cmp(&b.forms));
    all.dedup_by(|a, b| a.forms == b.forms);
    all
}
