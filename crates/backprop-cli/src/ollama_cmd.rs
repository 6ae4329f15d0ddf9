//! `backprop push` (a run → an Ollama model) and `backprop ollama` (list, show, chat,
//! rm) over the engine's Ollama client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Result};
use backpropagate::event::{Event, EventSink};
use backpropagate::export::GgufQuant;
use backpropagate::ollama::{self, ChatMessage, OllamaClient, PushOptions};
use backpropagate::run::{default_runs_dir, resolve_run};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::print::safe;

#[derive(Args)]
pub struct PushArgs {
    /// The run (its id or folder)
    pub run: String,
    /// Name of the model in Ollama, e.g. `my-model` or `me/my-model:v1`
    #[arg(long)]
    pub name: String,
    /// GGUF weight type: auto (a GGUF base's own type, else q4_k_m: small, good),
    /// q4_k_m, q5_k_m, q6_k, q8_0, q4_0, f16 or f32
    #[arg(long, default_value = "auto")]
    pub quant: GgufQuant,
    /// Send the base and the LoRA as an Ollama ADAPTER instead of one merged file
    /// (recent Ollama releases refuse adapters; the merged default always works)
    #[arg(long)]
    pub as_adapter: bool,
    /// Replace a model that already has this name
    #[arg(long)]
    pub overwrite: bool,
    /// System prompt to bake in (default: the one in the model's chat template)
    #[arg(long)]
    pub system: Option<String>,
    /// A Go template file to use instead of the one derived from the chat template
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// After pushing, ask the model this and print the reply
    #[arg(long)]
    pub try_prompt: Option<String>,
    /// Seconds Ollama may stay silent in any phase: each reply (version, blob check,
    /// show) must come within it, an upload may not stall that long nor wait that long
    /// for its answer, each create status line must come within it (the whole create
    /// within 10 times it)
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Where runs are kept [default: $BACKPROP_HOME/runs or the platform data folder]
    #[arg(long)]
    pub runs_dir: Option<PathBuf>,
    /// Print events as JSON lines
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum OllamaCommand {
    /// Is Ollama running, and which version (reads OLLAMA_HOST)
    Status,
    /// List the models Ollama has
    List,
    /// Show the template, stop parameters and system prompt Ollama uses for a model
    Show { name: String },
    /// Send one message and print the reply: a smoke test after a push
    Chat {
        name: String,
        /// The message
        prompt: String,
        /// Most tokens to generate
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
    },
    /// Delete a model from Ollama
    Rm { name: String },
    /// Print the Modelfile a push would create (template, system prompt, stops,
    /// num_ctx) for a run or a model folder, for `ollama create NAME -f Modelfile`
    Modelfile {
        /// A run (its id or folder) or a model folder (config.json, tokenizer files)
        model: String,
        /// The GGUF that FROM names
        #[arg(long, default_value = "./model.gguf")]
        from: String,
        /// Print the template, system prompt and stops as JSON instead
        #[arg(long)]
        json: bool,
    },
}

/// Engine errors keep their hint as a `fix:` line.
pub fn with_hint(e: backpropagate::Error) -> anyhow::Error {
    match e.hint() {
        Some(h) => anyhow!("{e}\n  fix: {h}"),
        None => anyhow!(e),
    }
}

fn ollama_err(e: ollama::OllamaError) -> anyhow::Error {
    with_hint(e.into())
}

struct PushFace {
    json: bool,
    bar: Mutex<Option<(String, ProgressBar)>>,
}

impl EventSink for PushFace {
    fn emit(&self, event: Event) {
        if self.json {
            println!("{}", serde_json::to_string(&event).unwrap_or_default());
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Progress { stage, done, total } if stage == "upload" || stage == "hash" => {
                if bar.as_ref().is_none_or(|(s, _)| *s != stage) {
                    if let Some((_, b)) = bar.take() {
                        b.finish_and_clear();
                    }
                    let b = ProgressBar::new(total);
                    let label = if stage == "upload" {
                        "uploading"
                    } else {
                        "hashing  "
                    };
                    b.set_style(
                        ProgressStyle::with_template(&format!(
                            "{label} {{bar:30}} {{bytes}}/{{total_bytes}} · {{bytes_per_sec}}"
                        ))
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    *bar = Some((stage.clone(), b));
                }
                if let Some((_, b)) = bar.as_ref() {
                    b.set_position(done);
                    if done >= total {
                        b.finish_and_clear();
                    }
                }
            }
            Event::Progress { stage, done, total } if done == total && stage != "create" => {
                eprintln!("{stage}: {done}/{total}")
            }
            Event::Log { level, message } => {
                let line = crate::log_line(level, message);
                match bar.as_ref() {
                    Some((_, b)) if !b.is_finished() => b.println(line),
                    _ => eprintln!("{line}"),
                }
            }
            _ => {}
        }
    }
}

/// Real Go templates are a few kilobytes; a cap keeps `--template /dev/zero` from
/// filling memory.
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

fn read_template(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| anyhow!("cannot read the template {}: {e}", path.display());
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_TEMPLATE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_TEMPLATE_BYTES {
        return Err(anyhow!(
            "the template {} is over {} KiB; a Go chat template is a few KiB (pass the \
             template text, not a model file)",
            path.display(),
            MAX_TEMPLATE_BYTES >> 10
        ));
    }
    Ok(text)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn push(args: &PushArgs) -> Result<ExitCode> {
    let runs_dir = args.runs_dir.clone().unwrap_or_else(default_runs_dir);
    let dir = resolve_run(&runs_dir, &args.run)?;
    let mut options = PushOptions::new(args.name.clone());
    options.quant = args.quant;
    options.as_adapter = args.as_adapter;
    options.overwrite = args.overwrite;
    options.system = args.system.clone();
    options.timeout = Duration::from_secs(args.timeout.max(1));
    if let Some(t) = &args.template {
        options.template = Some(read_template(t)?);
    }
    let face = PushFace {
        json: args.json,
        bar: Mutex::new(None),
    };
    let report = ollama::push_run(&dir, &options, &face).map_err(with_hint)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"type": "Pushed", "report": report})
        );
    } else {
        println!("{}", safe(&report.name));
    }
    if let Some(prompt) = &args.try_prompt {
        let client = options.client().map_err(ollama_err)?;
        let reply = runtime()?
            .block_on(client.chat(
                &report.name,
                &[ChatMessage {
                    role: "user".into(),
                    content: prompt.clone(),
                }],
                128,
            ))
            .map_err(ollama_err)?;
        println!("{}", safe(&reply.content));
    }
    Ok(ExitCode::SUCCESS)
}

/// `backprop ollama modelfile`: needs no server.
fn modelfile(model: &str, from: &str, json: bool) -> Result<ExitCode> {
    let path = std::path::Path::new(model);
    let (model_dir, num_ctx) = if path.join("config.json").is_file() {
        (path.to_path_buf(), None)
    } else {
        let dir = resolve_run(&default_runs_dir(), model)?;
        let run = backpropagate::run::RunDir::open(&dir).map_err(with_hint)?;
        let info = run.info().map_err(with_hint)?;
        let ctx = run.config().map_err(with_hint)?.max_seq_len;
        (info.model_dir, Some(ctx))
    };
    let t = ollama::template_for_model(&model_dir).map_err(with_hint)?;
    if let Some(w) = &t.warning {
        eprintln!("warning: {w}");
    }
    if json {
        println!("{}", serde_json::to_string(&t)?);
    } else {
        print!("{}", t.modelfile(from, num_ctx));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: &OllamaCommand) -> Result<ExitCode> {
    if let OllamaCommand::Modelfile { model, from, json } = cmd {
        return modelfile(model, from, *json);
    }
    let client = OllamaClient::from_env().map_err(ollama_err)?;
    let rt = runtime()?;
    match cmd {
        OllamaCommand::Status => {
            let v = rt.block_on(client.check_version()).map_err(ollama_err)?;
            println!("Ollama {} at {}", safe(&v), safe(client.host()));
        }
        OllamaCommand::List => {
            let models = rt.block_on(client.tags()).map_err(ollama_err)?;
            if models.is_empty() {
                println!("Ollama at {} has no models yet", safe(client.host()));
            }
            for m in models {
                println!(
                    "{:<40} {:>10.1} MB  {}",
                    safe(&m.name),
                    m.size as f64 / 1e6,
                    safe(&m.modified_at)
                );
            }
        }
        OllamaCommand::Show { name } => {
            let show = rt
                .block_on(client.show(name))
                .map_err(ollama_err)?
                .ok_or_else(|| {
                    anyhow!("Ollama has no model named `{name}` (see `backprop ollama list`)")
                })?;
            println!("template:\n{}\n", safe(&show.template));
            if !show.system.is_empty() {
                println!("system: {}", safe(&show.system));
            }
            println!("parameters:\n{}", safe(&show.parameters));
        }
        OllamaCommand::Chat {
            name,
            prompt,
            max_tokens,
        } => {
            let reply = rt
                .block_on(client.chat(
                    name,
                    &[ChatMessage {
                        role: "user".into(),
                        content: prompt.clone(),
                    }],
                    *max_tokens,
                ))
                .map_err(ollama_err)?;
            println!("{}", safe(&reply.content));
        }
        OllamaCommand::Rm { name } => {
            if !rt.block_on(client.delete(name)).map_err(ollama_err)? {
                return Err(anyhow!("Ollama has no model named `{name}`"));
            }
            println!("deleted {}", safe(name));
        }
        OllamaCommand::Modelfile { model, from, json } => return modelfile(model, from, *json),
    }
    Ok(ExitCode::SUCCESS)
}
