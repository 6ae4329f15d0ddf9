//! `backprop model pull org/name[@revision]`: download a model into the shared Hugging
//! Face cache (what `train --model org/name` does on first use), with byte progress.

use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Result;
use backpropagate::event::{Event, EventSink};
use backpropagate::hub::{resolve_model, HubOptions, ModelSpec};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download a model by repo id (HF_TOKEN for gated models, HF_ENDPOINT for a
    /// mirror, HF_HUB_CACHE / HF_HOME for the cache) and print its folder
    Pull {
        /// `org/name` or `org/name@revision`
        repo: String,
    },
    /// Read a GGUF file, or a model of the local Ollama store (`ollama:NAME[:TAG]`), into
    /// a model folder (what `--model` trains from, read once per file into the cache)
    /// and print the folder
    Import {
        /// A .gguf file, or `ollama:NAME[:TAG]` (llama, qwen2 or qwen3 with a byte-level
        /// BPE vocabulary)
        model: String,
    },
}

struct Bytes(Mutex<Option<(String, ProgressBar)>>);

impl EventSink for Bytes {
    fn emit(&self, event: Event) {
        let mut cur = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Progress { stage, done, total } => {
                if cur.as_ref().is_none_or(|(s, _)| *s != stage) {
                    if let Some((_, b)) = cur.take() {
                        b.finish();
                    }
                    let b = ProgressBar::new(total);
                    b.set_style(
                        ProgressStyle::with_template(&format!(
                            "{stage} {{bar:30}} {{bytes}}/{{total_bytes}} · {{bytes_per_sec}} · {{eta}}"
                        ))
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    *cur = Some((stage, b));
                }
                if let Some((_, b)) = cur.as_ref() {
                    b.set_position(done);
                }
            }
            Event::Log { level, message } => {
                let line = crate::log_line(level, message);
                match cur.as_ref() {
                    Some((_, b)) if !b.is_finished() => b.println(line),
                    _ => eprintln!("{line}"),
                }
            }
            _ => {}
        }
    }
}

pub fn run(cmd: &ModelCommand) -> Result<ExitCode> {
    match cmd {
        ModelCommand::Pull { repo } => {
            if let ModelSpec::Local(p) = ModelSpec::parse(repo) {
                anyhow::bail!(
                    "`{}` is not a repo id (give it as org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct)",
                    p.display()
                );
            }
            let sink = Bytes(Mutex::new(None));
            let dir = resolve_model(repo, &HubOptions::from_env(), &sink)
                .map_err(crate::ollama_cmd::with_hint)?;
            if let Some((_, b)) = sink.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
                b.finish();
            }
            println!("{}", crate::print::safe(&dir.display().to_string()));
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Import { model } => {
            use backpropagate::gguf_base;
            let bases = gguf_base::bases_dir();
            let sink = backpropagate::event::Silent;
            let dir = if let Some(name) = model.strip_prefix(gguf_base::OLLAMA_PREFIX) {
                gguf_base::import_ollama(name, &gguf_base::ollama_stores(), &bases, &sink)
            } else if gguf_base::is_gguf(std::path::Path::new(model)) {
                gguf_base::import(std::path::Path::new(model), &bases, &sink)
            } else {
                anyhow::bail!("{model} is neither a .gguf file nor ollama:NAME[:TAG]");
            }
            .map_err(crate::ollama_cmd::with_hint)?;
            println!("{}", crate::print::safe(&dir.display().to_string()));
            Ok(ExitCode::SUCCESS)
        }
    }
}
