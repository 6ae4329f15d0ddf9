//! Send to Ollama: a REST client, the Go chat template for a model, and the push that
//! ties export, upload and create together. See ../shared/notes/ollama.md.

mod client;
mod error;
mod name;
mod push;
mod template;

pub use client::{
    go_unquote, host_setting, min_version_for, parse_host, parse_version, ChatMessage,
    CreateRequest, CreateStatus, ModelEntry, OllamaClient, ShowResponse, CHAT_TIMEOUTS,
    CREATE_IDLE_TIMEOUTS, DEFAULT_HOST, MAX_REPLY_BYTES, MAX_STATUS_BYTES, MAX_STATUS_LINE_BYTES,
    MIN_VERSION, STREAM_TIMEOUTS,
};
pub use error::OllamaError;
pub use name::validate_name;
pub use push::{prefers_own_template, push_run, template_for_model, PushOptions, PushReport};
pub use template::{ollama_template, OllamaTemplate, TemplateFamily};
