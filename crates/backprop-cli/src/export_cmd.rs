//! `backprop export`: write a run's adapter, or the merged model, under its exports/.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use backpropagate::event::{Event, EventSink, LogLevel};
use backpropagate::export::{export, ExportFormat, ExportOptions, GgufQuant, WeightDtype};
use backpropagate::run::{default_runs_dir, resolve_run};
use clap::Args;

use crate::print::safe;

#[derive(Args)]
pub struct ExportArgs {
    /// The run (its id or folder)
    pub run: String,
    /// `adapter` (PEFT files), `merged` (base + LoRA as a Hugging Face checkpoint) or
    /// `gguf` (base + LoRA in one file for llama.cpp / Ollama)
    #[arg(long, default_value = "gguf")]
    pub format: ExportFormat,
    /// GGUF weight type: auto (a GGUF base's own type, else q8_0), f32, f16, bf16,
    /// q8_0, q4_0, q4_k_m, q5_k_m or q6_k
    #[arg(long, default_value = "auto")]
    pub quant: GgufQuant,
    /// Weight dtype of a merged export: f32, f16 or bf16
    #[arg(long, default_value = "f16")]
    pub dtype: WeightDtype,
    /// Where runs are kept [default: $BACKPROP_HOME/runs or the platform data folder]
    #[arg(long)]
    pub runs_dir: Option<PathBuf>,
}

struct Progress;

impl EventSink for Progress {
    fn emit(&self, event: Event) {
        match event {
            Event::Progress { stage, done, total } if done == total || done % 50 == 0 => {
                eprintln!("{stage}: {done}/{total} tensors")
            }
            Event::Log {
                level: LogLevel::Warn,
                message,
            } => eprintln!("warning: {}", safe(&message)),
            _ => {}
        }
    }
}

pub fn run(args: &ExportArgs) -> Result<ExitCode> {
    let runs_dir = args.runs_dir.clone().unwrap_or_else(default_runs_dir);
    let dir = resolve_run(&runs_dir, &args.run)?;
    let options = ExportOptions {
        format: args.format,
        dtype: args.dtype,
        quant: args.quant,
        ..ExportOptions::default()
    };
    let out = export(&dir, &options, &Progress)?;
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}
