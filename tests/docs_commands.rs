//! Keeps the documentation honest. Every `kms-plugin ...` and `sidecar ...` command written
//! in README.md, SECURITY.md, docs/**/*.md and deploy/**/README.md (in fenced code blocks,
//! and in inline code spans that start with the binary's name) is checked against the real
//! binary's clap `--help`:
//!
//! - each subcommand on the path must exist (`kms-plugin key frobnicate` fails);
//! - each `--flag` and `-f` must be listed in the help of that subcommand;
//! - a value given to a flag with a fixed set of values must be one of them;
//! - the flags and positional arguments that the usage line marks as required must be
//!   there, and no more positional arguments than it allows, unless the line elides
//!   arguments with `...`;
//! - a `KMS_PLUGIN_*` / `SIDECAR_*` variable set in front of the command must be one that
//!   the help lists as `[env: NAME=]`.
//!
//! Lines continued with `\` are one command; `$ ` prompts, `sudo`, trailing `# comments`
//! and everything after a pipe or redirection are ignored; `[--flag value]` marks an
//! optional part; placeholders (`KEY_ID`, `DIR`, `<version>`, `$VAR`) need no markup, since
//! values and positional arguments are only checked against a flag's fixed set of values.
//! `cargo run -p NAME -- ARGS` counts as a `NAME ARGS` command, and commands inside `$(...)`
//! are checked too. Inline spans such as `key export --to` are checked as fragments (see
//! [`FRAGMENT_STARTS`]). A third test checks that relative links between these docs, and
//! their `#anchors`, resolve.
//!
//! Cargo tells an integration test where the binaries of its own package are
//! (`CARGO_BIN_EXE_<name>`), not those of other packages, so this one file is registered as
//! a test of both packages (kms-plugin/Cargo.toml and sidecar/Cargo.toml). Each build checks
//! the commands of the binary it has; `cargo test --workspace` checks them all.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The binaries the docs may name, and where this build of the test finds them.
const BINARIES: &[(&str, Option<&str>)] = &[
    ("kms-plugin", option_env!("CARGO_BIN_EXE_kms-plugin")),
    ("sidecar", option_env!("CARGO_BIN_EXE_sidecar")),
];

/// At least this many commands per binary must be found, so that a broken extractor (or
/// docs moved elsewhere) cannot make the test pass by checking nothing.
const MIN_COMMANDS: &[(&str, usize)] = &[("kms-plugin", 40), ("sidecar", 3)];

/// Inline code spans in prose often name a subcommand without the binary (`key promote`,
/// `serve --rotate-every 30d`, `key export --to`). Spans that start with one of these
/// words are checked as fragments of that binary's commands: the subcommands, flags and
/// values must exist, but required arguments may be left out. The test checks that these
/// words are subcommands of the binary, so the list cannot go stale.
const FRAGMENT_STARTS: &[(&str, &[&str])] = &[("kms-plugin", &["key", "node", "serve"])];

/// The environment variable prefix of each binary's settings.
const ENV_PREFIXES: &[(&str, &str)] = &[("kms-plugin", "KMS_PLUGIN_"), ("sidecar", "SIDECAR_")];

fn available() -> impl Iterator<Item = (&'static str, &'static str)> {
    BINARIES
        .iter()
        .filter_map(|(name, path)| path.map(|p| (*name, p)))
}

fn binary_path(name: &str) -> Option<&'static str> {
    available().find(|(n, _)| *n == name).map(|(_, p)| p)
}

fn repo_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is kms-plugin/ or sidecar/; the docs live one level up.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the package lives inside the workspace")
        .to_owned()
}

/// README.md, SECURITY.md, every .md under docs/, every README.md under deploy/.
fn doc_files(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["README.md", "SECURITY.md"]
        .iter()
        .map(|f| root.join(f))
        .filter(|p| p.is_file())
        .collect();
    walk(&root.join("docs"), &mut files, &|p| {
        p.extension().is_some_and(|e| e == "md")
    });
    walk(&root.join("deploy"), &mut files, &|p| {
        p.file_name().is_some_and(|n| n == "README.md")
    });
    files.sort();
    files
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, keep: &dyn Fn(&Path) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("reading a docs directory").path();
        if path.is_dir() {
            walk(&path, out, keep);
        } else if keep(&path) {
            out.push(path);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Extraction: markdown to commands
// ---------------------------------------------------------------------------------------

/// One command as a doc writes it.
#[derive(Debug, Clone)]
struct DocCommand {
    /// `file:line`.
    place: String,
    /// The command as written (continuations joined).
    text: String,
    binary: String,
    /// Names of the variables assigned in front of the command (`NAME=value cmd`).
    env: Vec<String>,
    /// The words after the binary's name.
    args: Vec<String>,
    /// A fragment in prose (`key export --to`): required arguments may be missing.
    fragment: bool,
}

/// Every command of a known binary in a markdown text.
fn commands_in(file: &str, text: &str) -> Vec<DocCommand> {
    let mut found = Vec::new();
    let mut emit = |line: usize, cmd: &str, fragment: bool| {
        // The line itself, and the commands inside its `$(...)` substitutions.
        for cmd in std::iter::once(cmd.to_owned()).chain(substitutions(cmd)) {
            if let Some((binary, env, args)) = parse_command_line(&cmd) {
                found.push(DocCommand {
                    place: format!("{file}:{line}"),
                    text: cmd.split_whitespace().collect::<Vec<_>>().join(" "),
                    binary,
                    env,
                    args,
                    fragment,
                });
            }
        }
    };
    // Inside a fence: (opening marker char, its length); a command being continued.
    let mut fence: Option<(char, usize)> = None;
    let mut pending: Option<(usize, String)> = None;
    // Outside fences: the lines of the current paragraph, for inline code spans.
    let mut paragraph: Vec<(usize, &str)> = Vec::new();

    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = raw.trim_start();
        let marker = fence_marker(trimmed);
        match fence {
            None => {
                if marker.is_some() {
                    for (line, span, fragment) in inline_spans(&paragraph) {
                        emit(line, &span, fragment);
                    }
                    paragraph.clear();
                    fence = marker;
                } else if trimmed.is_empty() {
                    for (line, span, fragment) in inline_spans(&paragraph) {
                        emit(line, &span, fragment);
                    }
                    paragraph.clear();
                } else {
                    paragraph.push((number, raw));
                }
            }
            Some((ch, len)) => {
                let closes = marker.is_some_and(|(c, l)| c == ch && l >= len)
                    && trimmed.trim_end().chars().all(|c| c == ch);
                if closes {
                    if let Some((line, cmd)) = pending.take() {
                        emit(line, &cmd, false);
                    }
                    fence = None;
                    continue;
                }
                let line = raw.trim_end();
                let (start, mut command) = pending.take().unwrap_or((number, String::new()));
                if let Some(continued) = line.strip_suffix('\\') {
                    command.push_str(continued);
                    command.push(' ');
                    pending = Some((start, command));
                } else {
                    command.push_str(line);
                    emit(start, &command, false);
                }
            }
        }
    }
    if let Some((line, cmd)) = pending.take() {
        emit(line, &cmd, false);
    }
    for (line, span, fragment) in inline_spans(&paragraph) {
        emit(line, &span, fragment);
    }
    found
}

/// ```` ``` ```` or `~~~` (three or more) opening a line: the fence character and length.
fn fence_marker(trimmed: &str) -> Option<(char, usize)> {
    let ch = trimmed.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let len = trimmed.chars().take_while(|c| *c == ch).count();
    (len >= 3).then_some((ch, len))
}

/// Inline code spans of a paragraph that start with a known binary's name, or with one of
/// [`FRAGMENT_STARTS`] (returned with the binary's name in front, as fragments), with the
/// line each starts on. A span may run over a line break, as in markdown.
fn inline_spans(paragraph: &[(usize, &str)]) -> Vec<(usize, String, bool)> {
    let Some(&(first_line, _)) = paragraph.first() else {
        return Vec::new();
    };
    let text: Vec<char> = paragraph
        .iter()
        .map(|(_, l)| *l)
        .collect::<Vec<_>>()
        .join("\n")
        .chars()
        .collect();
    let run_at = |i: usize| text[i..].iter().take_while(|c| **c == '`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i] != '`' {
            i += 1;
            continue;
        }
        let open = run_at(i);
        let start = i + open;
        // The closing run has the same length.
        let mut j = start;
        let mut end = None;
        while j < text.len() {
            if text[j] == '`' {
                let run = run_at(j);
                if run == open {
                    end = Some(j);
                    break;
                }
                j += run;
            } else {
                j += 1;
            }
        }
        let Some(end) = end else {
            break;
        };
        let content: String = text[start..end].iter().collect();
        let content = content.replace('\n', " ");
        let content = content.trim();
        let line = first_line + text[..start].iter().filter(|c| **c == '\n').count();
        if BINARIES
            .iter()
            .any(|(name, _)| content.starts_with(&format!("{name} ")))
        {
            spans.push((line, content.to_owned(), false));
        } else if let Some((binary, _)) = FRAGMENT_STARTS
            .iter()
            .find(|(_, words)| words.iter().any(|w| content.starts_with(&format!("{w} "))))
        {
            spans.push((line, format!("{binary} {content}"), true));
        }
        i = end + open;
    }
    spans
}

/// The commands inside `$(...)`, nested ones included.
fn substitutions(line: &str) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i + 1 < chars.len() {
        if chars[i] == '$' && chars[i + 1] == '(' {
            let mut depth = 0;
            let mut j = i + 1;
            while j < chars.len() {
                match chars[j] {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            let inner: String = chars[i + 2..j.min(chars.len())].iter().collect();
            let nested = substitutions(&inner);
            found.push(inner);
            found.extend(nested);
            i = j;
        }
        i += 1;
    }
    found
}

/// `(binary, env names, args)` if the line runs a known binary.
fn parse_command_line(line: &str) -> Option<(String, Vec<String>, Vec<String>)> {
    let words = shell_words(line.trim());
    let mut i = 0;
    let mut env = Vec::new();
    loop {
        match words.get(i).map(String::as_str) {
            Some("$") | Some("sudo") => i += 1,
            Some(w) if is_assignment(w) => {
                env.push(w.split('=').next().unwrap_or_default().to_owned());
                i += 1;
            }
            _ => break,
        }
    }
    let first = words.get(i)?;
    let base = first.rsplit('/').next().unwrap_or(first);
    if let Some((name, _)) = BINARIES.iter().find(|(name, _)| *name == base) {
        return Some(((*name).to_owned(), env, normalize(&words[i + 1..])));
    }
    // cargo run -p NAME [--release] -- ARGS
    if first == "cargo" && words.get(i + 1).is_some_and(|w| w == "run") {
        let rest = &words[i + 2..];
        let dashes = rest.iter().position(|w| w == "--")?;
        let package = rest[..dashes]
            .windows(2)
            .find(|w| w[0] == "-p" || w[0] == "--package" || w[0] == "--bin")
            .map(|w| w[1].clone())?;
        let (name, _) = BINARIES.iter().find(|(name, _)| *name == package)?;
        return Some(((*name).to_owned(), env, normalize(&rest[dashes + 1..])));
    }
    None
}

fn is_assignment(word: &str) -> bool {
    let Some((name, _)) = word.split_once('=') else {
        return false;
    };
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `[--output json]` marks an optional part: drop the brackets.
fn normalize(words: &[String]) -> Vec<String> {
    words
        .iter()
        .map(|w| {
            let w = w.strip_prefix('[').unwrap_or(w);
            let w = w.strip_suffix(']').unwrap_or(w);
            w.to_owned()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Splits like a POSIX shell would, enough for documentation: quotes, backslashes, `$(...)`;
/// a `# comment` ends the line, and so does a pipe, `;`, `&` or a redirection. `<...>` is a
/// placeholder (it may hold spaces), not a redirection.
fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            '<' => {
                in_word = true;
                word.push('<');
                for c in chars.by_ref() {
                    word.push(c);
                    if c == '>' {
                        break;
                    }
                }
            }
            '$' if chars.peek() == Some(&'(') => {
                in_word = true;
                word.push('$');
                let mut depth = 0;
                for c in chars.by_ref() {
                    word.push(c);
                    if c == '(' {
                        depth += 1;
                    } else if c == ')' {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
            }
            '#' if !in_word => break,
            '|' | ';' | '&' | '>' => {
                if c == '>' && word.chars().all(|d| d.is_ascii_digit()) {
                    // `2>file`: the digits are a file descriptor, not an argument.
                    in_word = false;
                }
                break;
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// `KEY_ID`, `DIR`, `<version>`, `$VAR`, `$(...)`, `{id}`, `...`: a value the reader fills in.
fn is_placeholder(s: &str) -> bool {
    s.contains('<')
        || s.contains('$')
        || s.contains('{')
        || is_elision(s)
        || (s.chars().any(|c| c.is_ascii_uppercase())
            && s.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_-.".contains(c)))
}

fn is_elision(s: &str) -> bool {
    s == "..." || s == "…"
}

// ---------------------------------------------------------------------------------------
// What the binary says: clap's --help
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opt {
    /// `--output`, `-o`.
    names: Vec<String>,
    takes_value: bool,
    /// `--auto-init [<BOOL>]`.
    optional_value: bool,
    /// The fixed set of values, if the help lists one.
    values: Vec<String>,
}

#[derive(Debug, Clone)]
struct Help {
    /// What was run, e.g. `kms-plugin key list --help`.
    invocation: String,
    text: String,
    subcommands: Vec<String>,
    options: Vec<Opt>,
    required_flags: Vec<String>,
    required_positionals: usize,
    /// `None`: no limit (`<FILE>...`).
    max_positionals: Option<usize>,
}

impl Help {
    fn option(&self, name: &str) -> Option<&Opt> {
        self.options
            .iter()
            .find(|o| o.names.iter().any(|n| n == name))
    }
}

#[derive(Default)]
struct HelpCache {
    helps: HashMap<(String, Vec<String>), Result<Help, String>>,
}

impl HelpCache {
    fn get(&mut self, binary: &str, path: &[String]) -> Result<Help, String> {
        let key = (binary.to_owned(), path.to_vec());
        if let Some(h) = self.helps.get(&key) {
            return h.clone();
        }
        let h = run_help(binary, path);
        self.helps.insert(key, h.clone());
        h
    }
}

fn run_help(binary: &str, path: &[String]) -> Result<Help, String> {
    let exe = binary_path(binary).ok_or_else(|| format!("{binary} is not built here"))?;
    let invocation = format!("{binary} {} --help", path.join(" "))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(exe);
    cmd.args(path).arg("--help");
    // Settings in the environment would show up in the help; keep it deterministic.
    for (k, _) in std::env::vars() {
        if ENV_PREFIXES.iter().any(|(_, p)| k.starts_with(p)) {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running `{invocation}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{invocation}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(parse_help(invocation, text, path.len()))
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// An option's definition line: little indentation, then a dash. Descriptions and
/// possible-value lists are indented further.
fn is_definition(line: &str) -> bool {
    indent(line) <= 6 && line.trim_start().starts_with('-')
}

fn parse_help(invocation: String, text: String, depth: usize) -> Help {
    let lines: Vec<&str> = text.lines().collect();

    // Commands: two-space indented names under "Commands:".
    let mut subcommands = Vec::new();
    if let Some(start) = lines.iter().position(|l| *l == "Commands:") {
        for l in &lines[start + 1..] {
            if l.trim().is_empty() || indent(l) == 0 {
                break;
            }
            if indent(l) == 2
                && let Some(name) = l.split_whitespace().next()
                && name != "help"
            {
                subcommands.push(name.to_owned());
            }
        }
    }

    // Options: each definition line and the description block under it.
    let mut options = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !is_definition(lines[i]) {
            i += 1;
            continue;
        }
        let def = lines[i].trim();
        // In the short help the description follows on the same line after 2+ spaces.
        let (def, same_line) = match def.find("  ") {
            Some(p) => (&def[..p], &def[p..]),
            None => (def, ""),
        };
        let mut block = vec![same_line];
        let mut j = i + 1;
        while j < lines.len()
            && !is_definition(lines[j])
            && (indent(lines[j]) != 0 || lines[j].trim().is_empty())
        {
            block.push(lines[j]);
            j += 1;
        }
        options.push(parse_definition(def, &block));
        i = j;
    }

    // Usage: what must be given (only meaningful where there are no subcommands).
    let mut usage = String::new();
    if let Some(start) = lines.iter().position(|l| l.starts_with("Usage:")) {
        usage.push_str(lines[start]);
        for l in &lines[start + 1..] {
            if l.trim().is_empty() || indent(l) == 0 {
                break;
            }
            usage.push(' ');
            usage.push_str(l.trim());
        }
    }
    let words: Vec<&str> = usage.split_whitespace().skip(2 + depth).collect();
    let mut required_flags = Vec::new();
    let mut required_positionals = 0;
    let mut max_positionals = Some(0usize);
    let mut k = 0;
    while k < words.len() {
        let w = words[k];
        if matches!(w, "[OPTIONS]" | "<COMMAND>" | "[COMMAND]") {
        } else if w.starts_with('-') {
            required_flags.push(w.to_owned());
            if words.get(k + 1).is_some_and(|n| n.starts_with('<')) {
                k += 1;
            }
        } else if w.starts_with('<') || w.starts_with('[') {
            if w.starts_with('<') {
                required_positionals += 1;
            }
            max_positionals = if w.ends_with("...") || w.ends_with("...]") {
                None
            } else {
                max_positionals.map(|m| m + 1)
            };
        }
        k += 1;
    }

    Help {
        invocation,
        text,
        subcommands,
        options,
        required_flags,
        required_positionals,
        max_positionals,
    }
}

/// `-o, --output <OUTPUT>`, `--auto-init [<BOOL>]`, `--once`, with its description block.
fn parse_definition(def: &str, block: &[&str]) -> Opt {
    let mut names = Vec::new();
    let mut takes_value = false;
    let mut optional_value = false;
    for part in def.split(", ") {
        let mut words = part.split_whitespace();
        if let Some(name) = words.next() {
            names.push(name.to_owned());
        }
        if let Some(value) = words.next() {
            takes_value = true;
            optional_value = value.starts_with('[');
        }
    }
    // "[possible values: a, b]" (possibly wrapped), or a "Possible values:" list of
    // "- a: ..." lines.
    let joined = block.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    let mut values = Vec::new();
    if let Some(p) = joined.find("[possible values: ") {
        let rest = &joined[p + "[possible values: ".len()..];
        let rest = &rest[..rest.find(']').unwrap_or(rest.len())];
        values.extend(rest.split(", ").map(|v| v.trim().to_owned()));
    }
    let mut in_list = false;
    for l in block {
        let t = l.trim();
        if t == "Possible values:" {
            in_list = true;
        } else if in_list
            && let Some(item) = t.strip_prefix("- ")
            && let Some((v, _)) = item.split_once(':')
        {
            values.push(v.trim().to_owned());
        }
    }
    Opt {
        names,
        takes_value,
        optional_value,
        values,
    }
}

// ---------------------------------------------------------------------------------------
// The check
// ---------------------------------------------------------------------------------------

/// Problems with one command (empty: it is fine).
fn check(cmd: &DocCommand, cache: &mut HelpCache) -> Vec<String> {
    let mut problems = Vec::new();
    let mut path: Vec<String> = Vec::new();
    let mut help = match cache.get(&cmd.binary, &path) {
        Ok(h) => h,
        Err(e) => return vec![e],
    };
    let mut elided = false;
    let mut asks_for_help = false;
    let mut positionals = Vec::new();
    let mut given_flags: Vec<String> = Vec::new();
    let mut only_positionals = false;

    let mut i = 0;
    while i < cmd.args.len() {
        let word = cmd.args[i].as_str();
        i += 1;
        if is_elision(word) {
            elided = true;
            continue;
        }
        if !only_positionals && word == "--" {
            only_positionals = true;
            continue;
        }
        if !only_positionals && word.starts_with('-') && word.len() > 1 {
            let (name, inline) = match word.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v)),
                _ => (word, None),
            };
            if matches!(name, "-h" | "--help" | "-V" | "--version") {
                asks_for_help = true;
            }
            let Some(opt) = help.option(name) else {
                problems.push(format!(
                    "{name} is not an option of `{}`",
                    help.invocation.trim_end_matches(" --help")
                ));
                continue;
            };
            given_flags.extend(opt.names.iter().cloned());
            let value = match inline {
                Some(v) => {
                    if !opt.takes_value {
                        problems.push(format!("{name} takes no value, but is given {v:?}"));
                    }
                    Some(v.to_owned())
                }
                None if opt.takes_value && !opt.optional_value => {
                    let v = cmd.args.get(i).cloned();
                    if v.is_none() && !cmd.fragment {
                        problems.push(format!("{name} needs a value"));
                    }
                    i += 1;
                    v
                }
                None if opt.optional_value => {
                    let v = cmd.args.get(i).filter(|v| !v.starts_with('-')).cloned();
                    if v.is_some() {
                        i += 1;
                    }
                    v
                }
                None => None,
            };
            if let Some(v) = value
                && !opt.values.is_empty()
            {
                for alt in v.split('|') {
                    if !is_placeholder(alt) && !opt.values.iter().any(|x| x == alt) {
                        problems.push(format!(
                            "{name} {alt:?} is not one of its values ({})",
                            opt.values.join(", ")
                        ));
                    }
                }
            }
            continue;
        }
        if !only_positionals && !help.subcommands.is_empty() {
            if help.subcommands.iter().any(|s| s == word) {
                path.push(word.to_owned());
                help = match cache.get(&cmd.binary, &path) {
                    Ok(h) => h,
                    Err(e) => return vec![e],
                };
            } else if is_placeholder(word) {
                // `kms-plugin key COMMAND`: some subcommand; nothing more can be checked.
                return problems;
            } else {
                problems.push(format!(
                    "`{word}` is not a subcommand of `{}` (it has: {})",
                    help.invocation.trim_end_matches(" --help"),
                    help.subcommands.join(", ")
                ));
                return problems;
            }
            continue;
        }
        positionals.push(word.to_owned());
    }

    let command = help.invocation.trim_end_matches(" --help").to_owned();
    let complete = !elided && !asks_for_help && !cmd.fragment;
    if !help.subcommands.is_empty() && complete {
        problems.push(format!(
            "`{command}` needs a subcommand ({})",
            help.subcommands.join(", ")
        ));
    }
    if help.subcommands.is_empty() && complete {
        for flag in &help.required_flags {
            if !given_flags.contains(flag) {
                problems.push(format!("`{command}` requires {flag}"));
            }
        }
        if positionals.len() < help.required_positionals {
            problems.push(format!(
                "`{command}` takes {} positional argument(s), the line gives {}",
                help.required_positionals,
                positionals.len()
            ));
        }
    }
    if let Some(max) = help.max_positionals.filter(|_| help.subcommands.is_empty())
        && positionals.len() > max
    {
        problems.push(format!(
            "`{command}` takes at most {max} positional argument(s), the line gives {}: {}",
            positionals.len(),
            positionals.join(" ")
        ));
    }
    let prefix = ENV_PREFIXES
        .iter()
        .find(|(b, _)| *b == cmd.binary)
        .map(|(_, p)| *p)
        .unwrap_or("\0");
    for var in cmd.env.iter().filter(|v| v.starts_with(prefix)) {
        if !help.text.contains(&format!("[env: {var}=")) {
            problems.push(format!("{var} is not a setting of `{command}`"));
        }
    }
    problems
}

fn check_all(commands: &[DocCommand], cache: &mut HelpCache) -> Vec<String> {
    commands
        .iter()
        .filter(|c| binary_path(&c.binary).is_some())
        .flat_map(|c| {
            check(c, cache)
                .into_iter()
                .map(move |p| format!("{}: `{}`\n    {p}", c.place, c.text))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn every_documented_command_exists() {
    let root = repo_root();
    let files = doc_files(&root);
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("docs/runbooks/rotate-keys.md")),
        "the runbooks were not found under {}",
        root.display()
    );
    let mut commands = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("reading a doc");
        let rel = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        commands.extend(commands_in(&rel, &text));
    }
    if std::env::var_os("DOCS_COMMANDS_LIST").is_some() {
        for c in &commands {
            eprintln!("{}: {}", c.place, c.text);
        }
    }
    let mut cache = HelpCache::default();
    for (binary, words) in FRAGMENT_STARTS {
        if binary_path(binary).is_none() {
            continue;
        }
        let top = cache.get(binary, &[]).expect("top-level help");
        for w in *words {
            assert!(
                top.subcommands.iter().any(|s| s == w),
                "FRAGMENT_STARTS: `{w}` is not a subcommand of {binary}"
            );
        }
    }
    let problems = check_all(&commands, &mut cache);

    assert!(
        problems.is_empty(),
        "{} documented command(s) do not match the CLI:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let mut report = String::new();
    for (name, _) in available() {
        let n = commands.iter().filter(|c| c.binary == name).count();
        let min = MIN_COMMANDS
            .iter()
            .find(|(b, _)| *b == name)
            .map_or(1, |(_, m)| *m);
        assert!(
            n >= min,
            "only {n} `{name}` commands found in the docs (expected at least {min}): \
             is the extraction broken, or did the docs move?"
        );
        report.push_str(&format!("{n} `{name}` commands checked; "));
    }
    eprintln!("{report}");
}

/// The checker itself: it must accept what the docs legitimately write and reject each
/// kind of mistake, for every binary this build can run.
#[test]
fn the_checker_rejects_what_it_must() {
    let samples: &[(&str, usize, &str, &[&str])] = &[
        (
            "kms-plugin",
            14,
            "Fragments: `key export --to`, `serve --rotate-every 30d` and\n\
             `key recover ... --pcr-policy sha256:7`; not one: `key_id`.\n\n\
             Inline: `kms-plugin key retire OLD --key-store DIR`, twice\n\
             over a line break: `kms-plugin key list\n--key-store DIR`.\n\n\
             ```sh\n\
             $ sudo kms-plugin key export KEY_ID --key-store /var/lib/edgeseal/kms \\\n\
             \x20   --backend tpm --to b.pub --out KEY_ID.bundle\n\
             kms-plugin key list --key-store DIR [--output json]   # a comment\n\
             KMS_PLUGIN_KEY_STORE=/x kms-plugin key list -o table | head\n\
             kms-plugin --log-level debug key rotate --key-store DIR --backend=insecure-software\n\
             kms-plugin serve --auto-init --http-addr off\n\
             kms-plugin key export ...\n\
             kms-plugin key --help\n\
             cargo run -p kms-plugin -- demo --dir /tmp/x\n\
             NEW=$(kms-plugin key list --key-store DIR --output json | jq -r .active_key_id)\n\
             ```\n",
            &[
                "kms-plugin key list --no-such-flag",
                "kms-plugin key frobnicate --key-store DIR",
                "kms-plugin key list --key-store DIR --backend tpm",
                "kms-plugin key init --backend software",
                "kms-plugin key export KEY_ID --to b.pub",
                "kms-plugin key retire --key-store DIR",
                "kms-plugin key retire A B",
                "kms-plugin key",
                "KMS_PLUGIN_NO_SUCH=1 kms-plugin key list",
                "kms-plugin serve --socket /s \\\n    --sokcet-mode 0660",
                "cargo run -p kms-plugin -- dmeo",
                "NEW=$(kms-plugin key list --outptu json | jq -r .active_key_id)",
                "Prose naming `key exprot` as a fragment.",
                "Prose naming `serve --rotate-evry 30d` as a fragment.",
            ],
        ),
        (
            "sidecar",
            4,
            "```sh\n\
             sidecar --vault-url https://myvault.vault.azure.net \\\n\
             \x20       --secret db-password=db-password.txt --secret api-key@<version> \\\n\
             \x20       --output-dir /mnt/secrets [--once]\n\
             SIDECAR_HTTP_ADDR=off sidecar --config /etc/sidecar/sidecar.yaml --identity workload-identity\n\
             sidecar --notify-command \"kill -HUP 1\" --log-format json 2>&1 | tee log\n\
             ```\n\
             and `sidecar --config sidecar.yaml --once`.\n",
            &[
                "sidecar --no-such-flag",
                "sidecar --identity magic",
                "sidecar --once=true",
                "sidecar frobnicate",
                "SIDECAR_NO_SUCH=1 sidecar --once",
            ],
        ),
    ];
    let mut cache = HelpCache::default();
    let mut checked = 0;
    for (binary, expected, good, bad) in samples {
        if binary_path(binary).is_none() {
            continue;
        }
        checked += 1;
        let commands = commands_in("good.md", good);
        assert_eq!(
            commands.len(),
            *expected,
            "{binary}: every sample command is found: {commands:#?}"
        );
        let problems = check_all(&commands, &mut cache);
        assert!(
            problems.is_empty(),
            "{binary}: false alarms:\n{}",
            problems.join("\n")
        );

        for line in *bad {
            let doc = if line.starts_with("Prose") {
                format!("{line}\n")
            } else {
                format!("```sh\n{line}\n```\n")
            };
            let commands = commands_in("bad.md", &doc);
            assert_eq!(commands.len(), 1, "{line:?} is found: {commands:#?}");
            let problems = check_all(&commands, &mut cache);
            assert!(!problems.is_empty(), "{line:?} should be rejected");
        }
    }
    assert!(checked > 0, "no binary to check against");

    // Not commands: other programs, the binary's name in prose or paths, cargo examples.
    let not_commands = "```sh\n\
        cargo run -p sidecar --example demo\n\
        kubectl get secrets -A -o json | kubectl replace -f -\n\
        kms-plugin: error: the TPM was cleared\n\
        ls /usr/local/bin/kms-plugin.d\n\
        ```\n\
        The `sidecar` container and `kms-plugin`.\n";
    assert!(commands_in("none.md", not_commands).is_empty());
}

/// Relative links in the same docs point at files that exist, and `#anchors` at headings
/// that exist (GitHub's heading slugs), so a renamed runbook or section fails here.
#[test]
fn relative_links_resolve() {
    let root = repo_root();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in doc_files(&root) {
        let text = std::fs::read_to_string(&file).expect("reading a doc");
        let rel = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a doc is in a directory").join(path)
            };
            if !dest.exists() {
                problems.push(format!("{rel}:{line}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor.filter(|_| dest.extension().is_some_and(|e| e == "md")) {
                let target_text = std::fs::read_to_string(&dest).expect("reading a linked doc");
                if !heading_slugs(&target_text).iter().any(|s| s == anchor) {
                    problems.push(format!("{rel}:{line}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(checked > 10, "only {checked} relative links found");
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// `(line, target)` of every `[text](target)` outside code.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if let Some((ch, len)) = fence {
            if fence_marker(trimmed).is_some_and(|(c, l)| c == ch && l >= len) {
                fence = None;
            }
            continue;
        }
        if let Some(m) = fence_marker(trimmed) {
            fence = Some(m);
            continue;
        }
        // Drop inline code: the odd-numbered pieces between backticks.
        let prose: String = raw.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(p) = rest.find("](") {
            let after = &rest[p + 2..];
            let Some(end) = after.find(')') else {
                break;
            };
            let target = after[..end].split_whitespace().next().unwrap_or("");
            if !target.is_empty() {
                found.push((index + 1, target.to_owned()));
            }
            rest = &after[end..];
        }
    }
    found
}

/// The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces
/// turned into hyphens.
fn heading_slugs(text: &str) -> Vec<String> {
    let mut slugs = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for raw in text.lines() {
        let trimmed = raw.trim_start();
        if let Some((ch, len)) = fence {
            if fence_marker(trimmed).is_some_and(|(c, l)| c == ch && l >= len) {
                fence = None;
            }
            continue;
        }
        if let Some(m) = fence_marker(trimmed) {
            fence = Some(m);
            continue;
        }
        let Some(heading) = raw.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#').trim();
        slugs.push(
            heading
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect(),
        );
    }
    slugs
}
