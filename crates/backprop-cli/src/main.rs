//! `backprop`: fine-tune a local LLM with LoRA and run it in Ollama. A thin face over
//! the `backpropagate` engine; `--help` on any subcommand is its manual.

mod data_cmd;
mod debug_cmd;
mod doctor_cmd;
mod export_cmd;
mod model_cmd;
mod multi_run_cmd;
mod ollama_cmd;
mod print;
mod serve_cmd;
mod train_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// Training allocates and frees large activation buffers every step; an allocator
/// that hands them back to the OS page-faults them in again (a quarter of step time
/// in profiles). mimalloc with purging off keeps them (see `keep_freed_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns off mimalloc's purging of freed memory. mimalloc only fully honours this when
/// it is set before its first allocation (setting the option at run time leaves most
/// page faults in), so on Unix the process re-executes itself once with
/// `MIMALLOC_PURGE_DELAY=-1`; a user's own setting is kept. Elsewhere the option is set
/// at run time, which helps less.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    #[cfg(unix)]
    if let Ok(exe) = std::env::current_exe() {
        use std::os::unix::process::CommandExt;
        // `exec` only returns on failure; then we carry on with the default.
        let _ = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("MIMALLOC_PURGE_DELAY", "-1")
            .exec();
    }
    // `mi_option_purge_delay` is entry 15 of mimalloc's option enum (v2 and v3), which
    // libmimalloc-sys does not name; its documented default (10 ms in v2, 1000 ms in v3)
    // is checked first so that a renumbered enum changes nothing.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: reading and setting a mimalloc option is thread-safe and has no
    // preconditions; this runs before any worker thread starts.
    unsafe {
        if matches!(
            libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            10 | 1000
        ) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "backprop",
    version,
    about = "Fine-tune a local LLM with LoRA and run it in Ollama",
    long_about = "Fine-tune a local LLM with LoRA and run it in Ollama.\n\nTypical flow: `backprop data check` your JSONL, `backprop train`, `backprop export`, `backprop push` to Ollama.",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and validate training data
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a LoRA adapter on a model, or resume a run
    Train(Box<train_cmd::TrainArgs>),
    /// Staged multi-run (SLAO) training against forgetting
    MultiRun(Box<multi_run_cmd::MultiRunArgs>),
    /// Export a run: PEFT adapter, merged safetensors, GGUF (k-quants) or GGUF LoRA
    Export(export_cmd::ExportArgs),
    /// Send a run to Ollama as a model, with the right chat template and stop tokens
    Push(Box<ollama_cmd::PushArgs>),
    /// Models from the Hugging Face Hub: `backprop model pull org/name`
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// List runs, newest first (resume one with `backprop train --resume ID`)
    Runs(RunsArgs),
    /// Talk to Ollama (OLLAMA_HOST): status, list, show, chat, rm
    #[command(subcommand)]
    Ollama(ollama_cmd::OllamaCommand),
    /// Check this machine: GPU and driver, CPU, folders, Ollama
    Doctor,
    /// Serve the web UI and its HTTP API (for a headless GPU box, or a browser)
    Serve(serve_cmd::ServeArgs),
    /// Show configuration: `backprop config defaults` prints a run.toml with every default
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Write a tiny random-weight model folder (for demos and tests without a hub)
    Fixture(FixtureArgs),
    /// Developer tools (reference probes)
    #[command(subcommand, hide = true)]
    Debug(debug_cmd::DebugCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Validate a JSONL dataset against a model's tokenizer and chat template; print
    /// stats and every problem with its line
    Check(data_cmd::CheckArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default run configuration as TOML
    Defaults,
}

#[derive(Args)]
struct RunsArgs {
    #[command(subcommand)]
    command: Option<RunsCommand>,
    /// Where runs are kept [default: $BACKPROP_HOME/runs or the platform data folder]
    #[arg(long, global = true)]
    runs_dir: Option<PathBuf>,
    /// One JSON object per run
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Write a run's metrics.jsonl to an experiment tracker as one clean session (for
    /// a run trained without --report-to, or resumed several times); prints the folder
    ExportMetrics {
        /// The run (its id or folder)
        run: String,
        /// The tracker: tensorboard or wandb (written into RUN/exports/<tracker>)
        #[arg(long, default_value = "tensorboard")]
        to: backpropagate::config::ReportTo,
    },
}

#[derive(Args)]
struct FixtureArgs {
    /// Folder to write the model into
    out: PathBuf,
    /// Model family: llama (Llama 3 layout and template), qwen2 (ChatML), qwen3
    /// (q/k norm, ChatML) or mistral ([INST] template)
    #[arg(long, default_value = "qwen2")]
    family: backpropagate::fixture::Family,
    /// Random seed for the weights
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `tiny` (~0.2M parameters, for tests), `small` (~30M) or `medium` (~140M), for benchmarks
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "small", "medium"])]
    size: String,
}

fn main() -> ExitCode {
    // `backprop runs | head` should end quietly when the reader goes away, as other
    // Unix tools do, instead of panicking on a broken pipe.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    backpropagate::threads::use_physical_cores();
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The one place errors are printed; they may quote a file or a server.
            let message = format!("{e:#}");
            eprintln!("error: {}", print::safe(&message));
            // The engine's errors carry what to do; commands that already said it
            // (a `fix:` line in the message) are not repeated.
            let hint = e
                .chain()
                .find_map(|c| c.downcast_ref::<backpropagate::Error>())
                .and_then(|engine| engine.hint());
            if let Some(h) = hint.filter(|_| !message.contains("\n  fix: ")) {
                eprintln!("  fix: {}", print::safe(&h));
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Data(DataCommand::Check(args)) => data_cmd::check(&args),
        Command::Config(ConfigCommand::Defaults) => {
            print!("{}", backpropagate::TrainConfig::default().to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Fixture(args) => {
            let mut spec = match args.size.as_str() {
                "small" => backpropagate::fixture::FixtureSpec::small(args.family),
                "medium" => backpropagate::fixture::FixtureSpec::medium(args.family),
                _ => backpropagate::fixture::FixtureSpec::new(args.family),
            };
            spec.seed = args.seed;
            backpropagate::fixture::write_fixture_model(&args.out, &spec)?;
            println!(
                "wrote a tiny {:?} model to {}",
                args.family,
                args.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => train_cmd::train(&args),
        Command::Debug(cmd) => debug_cmd::run(&cmd),
        Command::MultiRun(args) => multi_run_cmd::run(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::Push(args) => ollama_cmd::push(&args),
        Command::Model(cmd) => model_cmd::run(&cmd),
        Command::Runs(args) => {
            let dir = args
                .runs_dir
                .unwrap_or_else(backpropagate::run::default_runs_dir);
            if let Some(RunsCommand::ExportMetrics { run, to }) = args.command {
                let run = backpropagate::run::resolve_run(&dir, &run)?;
                println!(
                    "{}",
                    backpropagate::track::export_metrics(&run, to)?.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let runs = backpropagate::run::list_runs(&dir)?;
            if args.json {
                for r in &runs {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else if runs.is_empty() {
                println!("no runs in {}", dir.display());
            } else {
                for r in &runs {
                    println!(
                        "{:<40} {:<9} step {:>6}  {}",
                        print::safe(&r.id),
                        format!("{:?}", r.status).to_lowercase(),
                        r.step,
                        print::safe(&r.created)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ollama(cmd) => ollama_cmd::run(&cmd),
        Command::Doctor => doctor_cmd::run(),
        Command::Serve(args) => serve_cmd::run(&args),
    }
}

/// An engine log event as the CLI prints it: warnings and errors say so up front, and
/// control characters in it (from data, model files or a server) are escaped.
pub(crate) fn log_line(level: backpropagate::event::LogLevel, message: String) -> String {
    use backpropagate::event::LogLevel;
    let message = print::safe(&message).into_owned();
    match level {
        LogLevel::Info => message,
        LogLevel::Warn => format!("warning: {message}"),
        LogLevel::Error => format!("error: {message}"),
    }
}
