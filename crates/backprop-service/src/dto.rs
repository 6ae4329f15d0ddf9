//! The request and response shapes of the app API (docs/http-api.md). The web UI's
//! TypeScript types are generated from these by ts-rs; change them here only.

use backpropagate::data::{DatasetStats, Diagnostic};
use backpropagate::event::Event;
use backpropagate::run::{MetricLine, RunInfo};
pub use backpropagate::train::TrainPlan;
use backpropagate::TrainConfig;
use serde::{Deserialize, Serialize};
use ts_rs::TS;

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct AppInfo {
    pub version: String,
    pub runs_dir: String,
    pub ollama_host: String,
    /// "cpu", "cuda:0 (NVIDIA ...)", ...: where training runs.
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct ModelRequest {
    pub model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct ModelInfo {
    /// The local folder the model resolved to.
    pub path: String,
    /// `architectures[0]` of config.json, e.g. "Qwen2ForCausalLM".
    pub architecture: String,
    pub hidden_size: usize,
    pub layers: usize,
    pub vocab_size: usize,
    pub parameters: f64,
    /// Name of the file the chat template comes from, or null for the ChatML fallback.
    pub chat_template: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct UploadedDataset {
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct DataCheckRequest {
    pub data: String,
    pub model: String,
    #[serde(default)]
    #[ts(optional)]
    pub max_seq_len: Option<usize>,
    /// How many samples to render through the chat template (default 3).
    #[serde(default)]
    #[ts(optional)]
    pub show: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct SamplePreview {
    pub line: usize,
    /// The sample as the chat template renders it (what the model sees).
    pub text: String,
    pub tokens: usize,
    pub trainable_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct DataReport {
    /// False when any line is unusable; `problems` then says which and how to fix it.
    pub ok: bool,
    pub path: String,
    pub stats: Option<DatasetStats>,
    /// Where the chat template comes from: a file name, or "ChatML (model has none)".
    pub template: String,
    pub warnings: Vec<Diagnostic>,
    pub problems: Vec<Diagnostic>,
    /// Problems beyond the reported ones.
    pub more_problems: usize,
    pub samples: Vec<SamplePreview>,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct ExportInfo {
    /// File or folder name under the run's `exports/`.
    pub name: String,
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct RunDetail {
    pub info: RunInfo,
    pub config: TrainConfig,
    pub metrics: Vec<MetricLine>,
    pub exports: Vec<ExportInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct StartTraining {
    pub config: TrainConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct ExportRequest {
    /// adapter | merged | gguf | gguf-lora | gguf-base
    pub format: String,
    /// GGUF: f32 | f16 | bf16 | q8_0 | q4_0 | q4_k_m | q5_k_m | q6_k; merged: the weight
    /// dtype f32 | f16 | bf16; ignored for adapter.
    pub quantization: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct PushRequest {
    /// Ollama model name, e.g. "my-model" or "my-model:v2".
    pub name: String,
    pub quantization: String,
    /// Push the GGUF LoRA on top of a base already in Ollama instead of a merged model.
    #[serde(default)]
    pub as_adapter: bool,
    /// Replace a model of the same name.
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum JobKind {
    Train,
    Export,
    Push,
    /// A model download from the Hugging Face Hub into the shared cache.
    Download,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum JobState {
    Running,
    Finished,
    Failed,
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct JobInfo {
    pub id: String,
    pub kind: JobKind,
    /// The run the job works on; known for training once its folder exists.
    pub run: Option<String>,
    pub state: JobState,
    pub error: Option<String>,
    /// Output of a finished job: the run folder, export path or Ollama model name.
    pub result: Option<String>,
}

/// One message of the event stream (SSE `/api/events`, Tauri `backprop://event`).
#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct JobEvent {
    pub job: Option<String>,
    pub kind: Option<JobKind>,
    pub run: Option<String>,
    pub event: Event,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct OllamaStatus {
    pub host: String,
    pub running: bool,
    pub version: Option<String>,
    pub error: Option<String>,
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct OllamaModel {
    pub name: String,
    pub size: u64,
    pub modified_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct ApiError {
    pub error: String,
    pub hint: Option<String>,
}
