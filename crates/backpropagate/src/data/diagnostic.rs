//! Problems found in a dataset, each tied to a line and carrying a fix the user can
//! apply. Faces render these as they are; the UI lists them, the CLI prints them.

use std::fmt;
use std::path::PathBuf;
use ts_rs::TS;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum Severity {
    /// The sample cannot be used; training refuses the file.
    Error,
    /// Handled automatically, but worth knowing (BOM, CRLF).
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct Diagnostic {
    /// 1-based line number; 0 when the problem is about the whole file.
    pub line: usize,
    pub severity: Severity,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn error(line: usize, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Diagnostic {
            line,
            severity: Severity::Error,
            message: message.into(),
            hint: Some(hint.into()).filter(|h: &String| !h.is_empty()),
        }
    }

    pub fn warning(line: usize, message: impl Into<String>) -> Self {
        Diagnostic {
            line,
            severity: Severity::Warning,
            message: message.into(),
            hint: None,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    fix: {hint}")?;
        }
        Ok(())
    }
}

/// A dataset that cannot be used, with every problem found (up to a cap).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: cannot read the file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", invalid_summary(.path, .problems, *.more))]
    Invalid {
        path: PathBuf,
        problems: Vec<Diagnostic>,
        /// Problems found beyond the reporting cap.
        more: usize,
    },
}

fn invalid_summary(path: &std::path::Path, problems: &[Diagnostic], more: usize) -> String {
    let total = problems.len() + more;
    let mut out = format!(
        "{}: {total} problem{} found",
        path.display(),
        if total == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    if more > 0 {
        out.push_str(&format!("\n  … and {more} more"));
    }
    out
}

impl DataError {
    /// The diagnostics of an invalid file; empty for I/O failures.
    pub fn problems(&self) -> &[Diagnostic] {
        match self {
            DataError::Invalid { problems, .. } => problems,
            DataError::Io { .. } => &[],
        }
    }
}

/// Collects diagnostics up to a cap so a million-line bad file stays readable.
#[derive(Debug)]
pub(crate) struct Collector {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
    pub more_errors: usize,
    cap: usize,
}

impl Collector {
    pub fn new(cap: usize) -> Self {
        Collector {
            errors: Vec::new(),
            warnings: Vec::new(),
            more_errors: 0,
            cap: cap.max(1),
        }
    }

    pub fn push(&mut self, d: Diagnostic) {
        match d.severity {
            Severity::Error if self.errors.len() < self.cap => self.errors.push(d),
            Severity::Error => self.more_errors += 1,
            Severity::Warning if self.warnings.len() < self.cap => self.warnings.push(d),
            Severity::Warning => {}
        }
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    pub fn into_error(self, path: PathBuf) -> DataError {
        DataError::Invalid {
            path,
            problems: self.errors,
            more: self.more_errors,
        }
    }
}
