//! What goes wrong talking to Ollama, each with the sentence a user needs to act.

#[derive(Debug, thiserror::Error)]
pub enum OllamaError {
    #[error("Ollama is not running at {host}")]
    NotRunning { host: String },
    #[error("Ollama at {host} did not answer {what} within {secs} s")]
    Timeout {
        host: String,
        what: String,
        secs: f64,
    },
    /// The server sent more than any real Ollama would; reading stopped at the cap.
    #[error("Ollama at {host} sent too much for {what}: {detail}; stopped reading there")]
    TooLarge {
        host: String,
        what: String,
        detail: String,
    },
    #[error("Ollama {version} is too old: {what} needs {need} or newer (update Ollama)")]
    TooOld {
        version: String,
        need: String,
        what: String,
    },
    #[error("Ollama refused {what}: {message}")]
    Api {
        what: String,
        status: u16,
        message: String,
    },
    #[error("Ollama reported an error while creating the model: {message}")]
    Stream { message: String },
    #[error("`{name}` is not a valid Ollama model name: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("a model named `{name}` already exists in Ollama")]
    NameTaken { name: String },
    #[error("the connection to Ollama at {host} broke during {what}: {message}")]
    Connection {
        host: String,
        what: String,
        message: String,
    },
    #[error("the push was stopped during {what}")]
    Cancelled { what: String },
    #[error("OLLAMA_HOST `{value}` cannot be used: {reason}")]
    BadHost { value: String, reason: String },
    #[error(
        "Ollama at {host} sent a reply Backpropagate does not understand for {what}: {message}"
    )]
    Protocol {
        host: String,
        what: String,
        message: String,
    },
}

impl OllamaError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            OllamaError::NotRunning { .. } => Some(format!(
                "{} If Ollama runs on another machine or port, set OLLAMA_HOST (e.g. \
                 OLLAMA_HOST=http://192.168.1.20:11434). Install it from https://ollama.com/download.",
                start_hint()
            )),
            OllamaError::Timeout { .. } => Some(
                "Ollama is running but busy or stuck; check `ollama ps`, or restart it and try \
                 again (on a slow machine or link, allow more time: `backprop push --timeout`). \
                 Nothing was lost: the export stays in the run folder."
                    .into(),
            ),
            OllamaError::TooLarge { .. } => Some(
                "A real Ollama sends far less: check that OLLAMA_HOST points at Ollama and not \
                 another server, and see Ollama's log (`ollama serve` output)."
                    .into(),
            ),
            OllamaError::TooOld { .. } => {
                Some("Update Ollama from https://ollama.com/download and try again.".into())
            }
            OllamaError::InvalidName { .. } => Some(
                "Use letters, digits, `_`, `-` and `.`, starting with a letter or digit, \
                 optionally `namespace/name:tag` (e.g. `my-model:v1`)."
                    .into(),
            ),
            OllamaError::NameTaken { .. } => Some(
                "Pick another --name, or pass --overwrite to replace the existing model.".into(),
            ),
            OllamaError::Connection { .. } => Some(
                "Nothing was lost: the export stays in the run folder and a new push resumes \
                 (blobs Ollama already has are not sent again)."
                    .into(),
            ),
            OllamaError::Cancelled { .. } => Some(
                "The run is unchanged and its export is kept; push again to finish (blobs Ollama \
                 already has are not sent again)."
                    .into(),
            ),
            OllamaError::BadHost { .. } => {
                Some("Set OLLAMA_HOST to host:port or http://host:port.".into())
            }
            OllamaError::Api { message, .. } | OllamaError::Stream { message }
                if message.to_ascii_lowercase().contains("no space") =>
            {
                Some(
                    "The disk that holds Ollama's models (OLLAMA_MODELS) is full. Ollama needs \
                     about twice the GGUF's size free while creating (0.30+ validates a copy \
                     of the upload before it deletes the upload): free space there, or push a \
                     smaller --quant (q4_k_m is about a third of f16)."
                        .into(),
                )
            }
            OllamaError::Api { message, .. } | OllamaError::Stream { message }
                if message.starts_with("template:") =>
            {
                Some(
                    "Ollama could not parse the TEMPLATE as a Go template (text/template                      syntax: every `{{ if }}`, `{{ range }}` and `{{ with }}` needs its                      `{{ end }}`): fix the file given to --template, or push without                      --template to use the one derived from the model's chat template."
                        .into(),
                )
            }
            OllamaError::Api { .. } | OllamaError::Stream { .. } | OllamaError::Protocol { .. } => {
                Some("See Ollama's own log (`ollama serve` output) for details.".into())
            }
        }
    }
}

fn start_hint() -> &'static str {
    if cfg!(windows) {
        "Start Ollama from the Start menu (or run `ollama serve` in a terminal)."
    } else if cfg!(target_os = "macos") {
        "Open the Ollama app from Applications (or run `ollama serve` in a terminal)."
    } else {
        "Start it with `ollama serve` (or `sudo systemctl start ollama` if it was installed as a service)."
    }
}
