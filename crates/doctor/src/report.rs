//! Rendering findings: a readable report (coloured on a terminal) or JSON.

use serde::Serialize;

use crate::finding::{needs_action, Finding, Severity};

/// What `--output json` prints.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// `cluster` or `local`.
    pub scope: &'a str,
    /// The namespace diagnosed (cluster scope).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    /// The Helm release diagnosed, if one was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<&'a str>,
    /// No finding needs action.
    pub healthy: bool,
    /// Everything found, worst first.
    pub findings: &'a [Finding],
}

impl<'a> Report<'a> {
    /// A report of `findings` for `scope`.
    pub fn new(scope: &'a str, findings: &'a [Finding]) -> Self {
        Self {
            scope,
            namespace: None,
            release: None,
            healthy: !needs_action(findings),
            findings,
        }
    }

    /// The report as pretty-printed JSON (`--output json`).
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set (https://no-color.org).
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

struct Paint(bool);

impl Paint {
    fn wrap(&self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The report a person reads: a heading, then per finding its severity, title, evidence
/// and fix, then a one-line verdict.
pub fn render_text(heading: &str, findings: &[Finding], colour: bool) -> String {
    let paint = Paint(colour);
    let mut out = format!("{}\n\n", paint.wrap("1", heading));
    for finding in findings {
        let (label, code) = match finding.severity {
            Severity::Error => ("ERROR", "1;31"),
            Severity::Warning => ("WARN ", "1;33"),
            Severity::Info => ("info ", "32"),
        };
        out.push_str(&format!(
            "{} {}\n",
            paint.wrap(code, label),
            paint.wrap("1", &finding.title)
        ));
        for evidence in &finding.evidence {
            let reason = evidence
                .reason
                .as_deref()
                .map(|r| format!(" {r}:"))
                .unwrap_or_else(|| ":".into());
            out.push_str(&format!(
                "      {}{} {}\n",
                paint.wrap("2", &evidence.object),
                paint.wrap("2", &reason),
                evidence.message
            ));
        }
        let fix = &finding.fix;
        if !fix.advice.is_empty() {
            out.push_str(&format!(
                "      {} {}\n",
                paint.wrap("36", "fix:"),
                fix.advice
            ));
        }
        for command in &fix.commands {
            out.push_str(&format!(
                "        {}\n",
                paint.wrap("36", &format!("$ {command}"))
            ));
        }
        if let Some(values) = &fix.values {
            out.push_str(&format!("        {}\n", paint.wrap("36", "# values.yaml")));
            for line in values.lines() {
                out.push_str(&format!("        {}\n", paint.wrap("36", line)));
            }
        }
        out.push('\n');
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .count();
    let verdict = if needs_action(findings) {
        paint.wrap("1;31", &format!("{errors} error(s), {warnings} warning(s)"))
    } else {
        paint.wrap("1;32", "healthy: nothing to fix")
    };
    out.push_str(&verdict);
    out.push('\n');
    out
}
