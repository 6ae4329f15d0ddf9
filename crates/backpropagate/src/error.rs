//! The engine's error type: every variant names the file involved and, where the user
//! can act, what to do about it.

use std::path::PathBuf;

use crate::data::DataError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("{path}: invalid configuration: {message}")]
    Config { path: PathBuf, message: String },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// A tensor operation failed (out of memory, a device error, a shape bug).
    #[error("compute error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    Run { path: PathBuf, message: String },
    /// Another job (in this process or another) holds the run's lock.
    #[error("run {} is in use by {holder}; wait for that job to finish or stop it, then try again", run.display())]
    RunInUse { run: PathBuf, holder: String },
    #[error(transparent)]
    Ollama(#[from] crate::ollama::OllamaError),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

impl Error {
    /// What the user can do about it, where the engine knows.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Ollama(e) => e.hint(),
            Error::Hub(e) => e.hint(),
            Error::RunInUse { .. } => Some("A run has one writer at a time (training, resuming, exporting or pushing). The lock goes away by itself when that process ends, even if it crashed or was killed.".into()),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// An error and its sources on one line (`a: b: c`), skipping a source whose text the
/// message already contains, for errors from HTTP and I/O stacks that nest them.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
