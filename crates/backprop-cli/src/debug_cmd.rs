//! `backprop debug`: developer tools, hidden from the main help.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use backpropagate::lora::write_safetensors;
use backpropagate::train::probe::{generate_greedy, probe};
use candle_core::Tensor;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum DebugCommand {
    /// One forward/backward pass on a JSON batch; writes logits, loss and LoRA
    /// gradients to a safetensors file (used by the PyTorch reference tests)
    Probe(ProbeArgs),
    /// Greedy generation of token ids (prints them as a JSON array)
    Generate(GenerateArgs),
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompt token ids, comma-separated (prints the new ids as JSON)
    #[arg(long, value_delimiter = ',', required_unless_present = "prompt")]
    prompt_ids: Vec<u32>,
    /// A user message instead: rendered with the chat template, the reply printed as
    /// text (greedy, up to --max-new tokens or the end of the turn)
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_new: usize,
}

#[derive(Args)]
pub struct ProbeArgs {
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    #[arg(long)]
    adapter: PathBuf,
    /// JSON: {"input_ids": [[..], ..], "labels": [[..], ..]}
    #[arg(long)]
    batch: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: &DebugCommand) -> Result<ExitCode> {
    match cmd {
        DebugCommand::Probe(a) => {
            let text = std::fs::read_to_string(&a.batch)
                .with_context(|| format!("reading {}", a.batch.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let ids: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone())?;
            let labels: Vec<Vec<i32>> = serde_json::from_value(v["labels"].clone())?;
            let rows: Vec<_> = ids.into_iter().zip(labels).collect();
            let out = probe(&a.model, &a.adapter, &rows)?;
            let mut tensors = vec![
                ("logits".to_string(), out.logits),
                (
                    "loss".to_string(),
                    Tensor::new(&[out.loss as f32], &candle_core::Device::Cpu)?,
                ),
            ];
            tensors.extend(out.grads.into_iter().map(|(k, g)| (format!("grad.{k}"), g)));
            write_safetensors(&a.out, &tensors)?;
            Ok(ExitCode::SUCCESS)
        }
        DebugCommand::Generate(a) => {
            if let Some(prompt) = &a.prompt {
                let reply = backpropagate::train::probe::answer(
                    &a.model,
                    a.adapter.as_deref(),
                    prompt,
                    a.max_new,
                )
                .map_err(crate::ollama_cmd::with_hint)?;
                println!("{}", crate::print::safe(&reply));
                return Ok(ExitCode::SUCCESS);
            }
            let ids = generate_greedy(&a.model, a.adapter.as_deref(), &a.prompt_ids, a.max_new)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
