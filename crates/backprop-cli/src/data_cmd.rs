//! `backprop data check`: the dataset report users read before training.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use backpropagate::data::{
    encode_all, read_jsonl, Content, DataError, EncodeOptions, Encoder, PrepareOptions,
    ReadOptions, Role, Severity, TemplateSource, TrainOn, IGNORE_INDEX,
};
use clap::Args;
use serde_json::json;

use crate::print::safe;

#[derive(Args)]
pub struct CheckArgs {
    /// JSONL file: alpaca, messages, sharegpt, prompt/completion or text records
    pub file: PathBuf,
    /// Model folder whose tokenizer and chat template to use
    #[arg(long)]
    pub model: PathBuf,
    /// Longest sample in tokens; longer ones are cut
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Train on `assistant` replies only, or on `all` tokens
    #[arg(long, default_value = "assistant")]
    pub train_on: TrainOn,
    /// How many samples to show rendered through the chat template
    #[arg(long, default_value_t = 1)]
    pub show: usize,
    /// Print one JSON report instead of text (for scripts and the UI)
    #[arg(long)]
    pub json: bool,
    /// Keep at most this many problems in the report
    #[arg(long, default_value_t = 100)]
    pub max_problems: usize,
}

pub fn check(args: &CheckArgs) -> Result<ExitCode> {
    // Checking needs the tokenizer only: a repo id fetches config and tokenizer files
    // into the HF cache (a few MB), never the weights.
    let model = backpropagate::hub::resolve_tokenizer(
        &args.model.to_string_lossy(),
        &backpropagate::hub::HubOptions::from_env(),
        &backpropagate::event::Silent,
    )
    .map_err(crate::ollama_cmd::with_hint)?;
    let encoder = Encoder::from_model_dir(&model)
        .with_context(|| format!("cannot use {} as the model", args.model.display()))?;
    let options = PrepareOptions {
        read: ReadOptions {
            max_problems: args.max_problems,
            ..ReadOptions::default()
        },
        encode: EncodeOptions {
            max_seq_len: args.max_seq_len,
            train_on: args.train_on,
        },
    };
    let result =
        read_jsonl(&args.file, &options.read).and_then(|raw| encode_all(raw, &encoder, &options));
    let prepared = match result {
        Ok(p) => p,
        Err(DataError::Io { path, source }) => {
            return Err(source).with_context(|| format!("cannot read {}", path.display()))
        }
        Err(e @ DataError::Invalid { .. }) => {
            if args.json {
                let more = match &e {
                    DataError::Invalid { more, .. } => *more,
                    DataError::Io { .. } => 0,
                };
                let report = json!({"ok": false, "path": args.file, "problems": e.problems(), "more_problems": more});
                println!("{report}");
            } else {
                // Problems quote the file's keys and values.
                eprintln!("{}", safe(&e.to_string()));
                eprintln!("\nNothing was changed. Fix the lines above and run `backprop data check` again.");
            }
            return Ok(ExitCode::FAILURE);
        }
    };

    let shown: Vec<_> = prepared
        .samples
        .iter()
        .zip(&prepared.encoded)
        .take(args.show)
        .map(|(sample, enc)| {
            let text = match &sample.content {
                Content::Chat(messages) => encoder.template().render(messages, false).ok(),
                Content::Text(t) => Some(t.clone()),
            };
            (sample, enc, text)
        })
        .collect();

    if args.json {
        let samples: Vec<_> = shown
            .iter()
            .map(|(sample, enc, text)| {
                json!({"line": sample.line, "content": sample.content, "text": text,
                       "input_ids": enc.input_ids, "labels": enc.labels})
            })
            .collect();
        let report = json!({"ok": true, "path": prepared.path, "stats": prepared.stats,
                            "template": prepared.template, "warnings": prepared.warnings,
                            "samples": samples});
        println!("{report}");
        return Ok(ExitCode::SUCCESS);
    }

    println!("{}", safe(&prepared.path.display().to_string()));
    println!("{}", safe(&prepared.stats.to_string()));
    match &prepared.template {
        TemplateSource::File(p) => println!("template:         {}", safe(&p.display().to_string())),
        TemplateSource::FallbackChatml => println!("template:         ChatML (model has none)"),
    }
    for w in &prepared.warnings {
        let tag = match w.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        println!("{tag}: {}", safe(&w.to_string()));
    }
    for (sample, enc, text) in &shown {
        println!("\n── sample from line {} ──", sample.line);
        if let Content::Chat(messages) = &sample.content {
            let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
            println!("turns: {}", safe(&roles.join(" → ")));
            debug_assert!(messages.iter().any(|m| m.role == Role::Assistant));
        }
        if let Some(text) = text {
            println!("{}", safe(text));
        }
        let trained: Vec<u32> = enc
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        let decoded = encoder
            .tokenizer()
            .decode(&trained, false)
            .unwrap_or_default();
        println!(
            "── {} tokens, {} trained on: {decoded:?}",
            enc.input_ids.len(),
            trained.len()
        );
    }
    println!("\nOK: ready to train.");
    Ok(ExitCode::SUCCESS)
}
