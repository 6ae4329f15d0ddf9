//! Errors of app calls: an HTTP-like kind for the server, and the same message and
//! hint the CLI prints, so every face says the same thing.

use crate::dto::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request cannot work as given (bad path, invalid config, bad data).
    BadRequest,
    NotFound,
    /// Another job holds what this one needs (one training job at a time).
    Conflict,
    /// Something outside the request failed (disk, Ollama down), or the server is busy
    /// with as many uploads or checks as it runs at once.
    Unavailable,
    /// The request body is over the server's size limit.
    TooLarge,
    Internal,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
}

impl ServiceError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ServiceError {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn to_api(&self) -> ApiError {
        ApiError {
            error: self.message.clone(),
            hint: self.hint.clone(),
        }
    }
}

impl From<backpropagate::Error> for ServiceError {
    fn from(e: backpropagate::Error) -> Self {
        use backpropagate::Error as E;
        let kind = match &e {
            E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            E::Io { .. } | E::Tensor(_) => ErrorKind::Internal,
            E::Ollama(_) => ErrorKind::Unavailable,
            E::RunInUse { .. } => ErrorKind::Conflict,
            _ => ErrorKind::BadRequest,
        };
        ServiceError {
            kind,
            hint: e.hint(),
            message: e.to_string(),
        }
    }
}

impl From<backpropagate::ollama::OllamaError> for ServiceError {
    fn from(e: backpropagate::ollama::OllamaError) -> Self {
        backpropagate::Error::from(e).into()
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
