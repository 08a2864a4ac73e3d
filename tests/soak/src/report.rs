//! The end-of-run summary: a table of figures and a table of pass/fail criteria, in
//! markdown (printed, and written to `--report FILE`).

use std::fmt::Write as _;

#[derive(Default)]
pub struct Report {
    pub title: String,
    rows: Vec<(String, String)>,
    criteria: Vec<Criterion>,
}

struct Criterion {
    name: String,
    ok: bool,
    detail: String,
}

impl Report {
    pub fn new(title: String) -> Self {
        Self {
            title,
            ..Self::default()
        }
    }

    pub fn row(&mut self, what: impl Into<String>, value: impl Into<String>) {
        self.rows.push((what.into(), value.into()));
    }

    pub fn criterion(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.criteria.push(Criterion {
            name: name.into(),
            ok,
            detail: detail.into(),
        });
    }

    pub fn passed(&self) -> bool {
        !self.criteria.is_empty() && self.criteria.iter().all(|c| c.ok)
    }

    pub fn failures(&self) -> impl Iterator<Item = String> + '_ {
        self.criteria
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## {}\n", self.title);
        let _ = writeln!(s, "| | |\n| --- | --- |");
        for (k, v) in &self.rows {
            let _ = writeln!(s, "| {} | {} |", cell(k), cell(v));
        }
        let _ = writeln!(s, "\n| criterion | result | detail |\n| --- | --- | --- |");
        for c in &self.criteria {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                cell(&c.name),
                if c.ok { "PASS" } else { "**FAIL**" },
                cell(&c.detail)
            );
        }
        let _ = writeln!(
            s,
            "\n**{}**",
            if self.passed() {
                "PASSED: every criterion holds"
            } else {
                "FAILED"
            }
        );
        s
    }
}

/// A table cell: no pipes or line breaks.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', "<br>")
}
