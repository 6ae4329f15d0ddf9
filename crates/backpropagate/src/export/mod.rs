//! Exports of a trained run: the PEFT adapter as it is, or the base with the LoRA
//! merged in (`W + s·B·A`) as a Hugging Face checkpoint. Every export is written into
//! a temporary folder and renamed into `exports/<name>` when complete, so a crash or
//! a full disk never leaves a partial export under the final name. An export holds
//! the run's lock ([`RunLock`]) while it works, so two exports of one run, or an export
//! during training, never write the same files at once: the second fails fast.

pub(crate) mod base_reader;
pub(crate) mod gguf;
pub(crate) mod gguf_file;
mod merged;
pub(crate) mod pre_tokenizer;

pub use gguf::GgufQuant;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::run::{RunDir, RunLock, RunStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// PEFT `adapter_model.safetensors` + `adapter_config.json`.
    Adapter,
    /// Base + LoRA merged, HF safetensors (sharded above 5 GB) with config and tokenizer.
    Merged,
    /// Base + LoRA merged into one GGUF file for llama.cpp and Ollama.
    Gguf,
    /// The LoRA alone as a GGUF adapter (llama.cpp `--lora`, Ollama `ADAPTER`).
    GgufLora,
    /// The base model alone as GGUF, to run a GGUF adapter on.
    GgufBase,
}

impl FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "adapter" | "lora" | "peft" => Ok(ExportFormat::Adapter),
            "merged" | "hf" => Ok(ExportFormat::Merged),
            "gguf" => Ok(ExportFormat::Gguf),
            "gguf-lora" => Ok(ExportFormat::GgufLora),
            "gguf-base" => Ok(ExportFormat::GgufBase),
            other => Err(format!(
                "unknown export format `{other}`; use adapter, merged, gguf, gguf-lora or gguf-base"
            )),
        }
    }
}

/// Storage type of merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

impl FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "f16" | "float16" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            other => Err(format!("unknown dtype `{other}`; use f32, f16 or bf16")),
        }
    }
}

impl WeightDtype {
    fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::F16 => "float16",
            WeightDtype::Bf16 => "bfloat16",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: ExportFormat,
    pub dtype: WeightDtype,
    /// Merged checkpoints are split into shards of at most this many bytes.
    pub max_shard_bytes: u64,
    /// Weight type of a GGUF export.
    pub quant: GgufQuant,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            format: ExportFormat::Merged,
            dtype: WeightDtype::F16,
            max_shard_bytes: 5_000_000_000,
            quant: GgufQuant::Auto,
        }
    }
}

/// Exports `run_dir` and returns the export folder. Takes the run's lock for the
/// export's duration; fails with [`Error::RunInUse`] when another job holds it.
pub fn export(run_dir: &Path, options: &ExportOptions, sink: &dyn EventSink) -> Result<PathBuf> {
    // Checked before locking so that a path that is not a run gets no lock file.
    RunDir::open(run_dir)?;
    let lock = RunLock::acquire(run_dir, "export")?;
    export_locked(&lock, options, sink)
}

/// [`export`] for a job that already holds the run's lock (a push exports under the
/// lock it took for its whole life).
pub fn export_locked(
    lock: &RunLock,
    options: &ExportOptions,
    sink: &dyn EventSink,
) -> Result<PathBuf> {
    let run = RunDir::open(lock.run_dir())?;
    let info = run.info()?;
    crate::gguf_base::ensure_base(&info.model_dir, &run.config()?.model, sink)?;
    let adapter = adapter_source(&run, info.status, sink)?;
    let resolved = resolved(options, &info.model_dir);
    let options = &resolved;
    let name = export_name(options);
    let exports = run.path().join("exports");
    let final_dir = exports.join(&name);
    crate::fsx::write_dir(&final_dir, |tmp| match options.format {
        ExportFormat::Adapter => copy_files(&adapter, tmp, &ADAPTER_FILES),
        ExportFormat::Merged => merged::write(&info.model_dir, &adapter, tmp, options, sink),
        ExportFormat::Gguf | ExportFormat::GgufLora | ExportFormat::GgufBase => {
            let model_name = info
                .model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            let q = options.quant.name();
            match options.format {
                ExportFormat::GgufLora => {
                    let file = tmp.join(format!("{model_name}-lora-{q}.gguf"));
                    let title = format!("{model_name} LoRA ({})", info.id);
                    gguf::write_lora(&info.model_dir, &adapter, &file, options.quant, &title)
                }
                ExportFormat::GgufBase => {
                    let file = tmp.join(format!("{model_name}-{q}.gguf"));
                    gguf::write(
                        &info.model_dir,
                        None,
                        &file,
                        options.quant,
                        &model_name,
                        sink,
                    )
                }
                _ => {
                    let file = tmp.join(format!("{model_name}-lora-merged-{q}.gguf"));
                    let title = format!("{model_name} + LoRA ({})", info.id);
                    gguf::write(
                        &info.model_dir,
                        Some(&adapter),
                        &file,
                        options.quant,
                        &title,
                        sink,
                    )
                }
            }
        }
    })?;
    sink.emit(Event::Log {
        level: LogLevel::Info,
        message: format!("exported {name} to {}", final_dir.display()),
    });
    Ok(final_dir)
}

/// `options` with a GGUF quantization of `auto` made concrete for the base: its own
/// type for a base read from a quantized GGUF, else q8_0.
fn resolved(options: &ExportOptions, model_dir: &Path) -> ExportOptions {
    ExportOptions {
        quant: options.quant.resolve(model_dir, GgufQuant::Q8_0),
        ..options.clone()
    }
}

/// The folder under `exports/` that `options` writes (`auto` as it stands: see
/// [`fresh_export`] for the resolved one).
pub fn export_name(options: &ExportOptions) -> String {
    match options.format {
        ExportFormat::Adapter => "adapter".to_string(),
        ExportFormat::Merged => format!("merged-{}", options.dtype.name()),
        ExportFormat::Gguf => format!("gguf-{}", options.quant.name()),
        ExportFormat::GgufLora => format!("gguf-lora-{}", options.quant.name()),
        ExportFormat::GgufBase => format!("gguf-base-{}", options.quant.name()),
    }
}

/// An earlier export with these options that is newer than the run's adapter, so it
/// can be reused instead of written again (a resumed run makes it stale).
pub fn fresh_export(run_dir: &Path, options: &ExportOptions) -> Option<PathBuf> {
    let run = RunDir::open(run_dir).ok()?;
    let info = run.info().ok()?;
    let status = info.status;
    let dir = run_dir
        .join("exports")
        .join(export_name(&resolved(options, &info.model_dir)));
    let exported = std::fs::metadata(&dir).and_then(|m| m.modified()).ok()?;
    let adapter = adapter_source(&run, status, &crate::event::Silent).ok()?;
    let trained = std::fs::metadata(adapter.join("adapter_model.safetensors"))
        .and_then(|m| m.modified())
        .ok()?;
    (exported >= trained).then_some(dir)
}

/// The Python package's shape, `export("gguf", quantization="q4_k_m")`: a format
/// name (adapter, merged, gguf, gguf-lora, gguf-base) and a GGUF quantization (or a
/// dtype for `merged`).
pub fn export_as(run_dir: &Path, format: &str, quantization: &str) -> Result<PathBuf> {
    export(
        run_dir,
        &ExportOptions::parse(format, quantization)?,
        &crate::event::Silent,
    )
}

impl ExportOptions {
    /// Options from a format name and a GGUF quantization (or a dtype for `merged`),
    /// as the CLI flags and the UI form give them.
    pub fn parse(format: &str, quantization: &str) -> Result<Self> {
        let format: ExportFormat = format.parse().map_err(Error::InvalidOption)?;
        let mut options = ExportOptions {
            format,
            ..ExportOptions::default()
        };
        match format {
            ExportFormat::Merged => {
                options.dtype = quantization.parse().map_err(Error::InvalidOption)?
            }
            ExportFormat::Adapter => {}
            _ => options.quant = quantization.parse().map_err(Error::InvalidOption)?,
        }
        Ok(options)
    }
}

/// The two files of a complete PEFT adapter folder.
const ADAPTER_FILES: [&str; 2] = ["adapter_model.safetensors", "adapter_config.json"];

/// The finished adapter, or the newest checkpoint when the run is unfinished or its
/// `adapter/` is incomplete (left so by a process killed while writing it, before
/// adapters were written whole), with a notice saying which.
fn adapter_source(run: &RunDir, status: RunStatus, sink: &dyn EventSink) -> Result<PathBuf> {
    let finished = run.path().join("adapter");
    let missing: Vec<&str> = ADAPTER_FILES
        .into_iter()
        .filter(|f| !finished.join(f).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(finished);
    }
    let why = if missing.len() == ADAPTER_FILES.len() {
        format!("the run is {status:?} and has no final adapter")
    } else {
        format!(
            "{} is incomplete (no {})",
            finished.display(),
            missing.join(", ")
        )
    };
    match run.latest_checkpoint()? {
        Some((step, dir)) => {
            sink.emit(Event::Log {
                level: LogLevel::Warn,
                message: format!("{why}; exporting its checkpoint at step {step}"),
            });
            Ok(dir)
        }
        None => Err(Error::Run {
            path: run.path().to_path_buf(),
            message: "this run has no adapter or checkpoint yet; train it first (`backprop train --resume` continues it)".into(),
        }),
    }
}

fn copy_files(from: &Path, to: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let src = from.join(name);
        std::fs::copy(&src, to.join(name)).map_err(|e| Error::io(&src, e))?;
    }
    Ok(())
}

impl crate::train::RunSummary {
    /// Exports this run, e.g. `summary.export("gguf", "q4_k_m")`; see [`export_as`].
    pub fn export(&self, format: &str, quantization: &str) -> Result<PathBuf> {
        export_as(&self.run_dir, format, quantization)
    }
}
