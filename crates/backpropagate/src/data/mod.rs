//! The dataset pipeline: JSONL file → validated samples → chat template → token ids
//! and loss labels → stats, packing and a seeded train/validation split.

mod diagnostic;
mod encode;
mod pack;
mod reader;
mod record;
mod split;
mod stats;
mod template;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use rayon::prelude::*;
use serde::Serialize;

pub use diagnostic::{DataError, Diagnostic, Severity};
pub use encode::{EncodeOptions, Encoded, Encoder, TrainOn, IGNORE_INDEX};
pub use pack::{pack, PackedRow};
pub use reader::{read_jsonl, RawDataset, ReadOptions};
pub use record::{Content, Format, Message, Role, Sample};
pub use split::{split, Split};
pub use stats::DatasetStats;
pub use template::{
    civil_from_days, ChatTemplate, Rendered, TemplateError, TemplateSource, CHATML_TEMPLATE,
};

use diagnostic::Collector;

/// Text tokenized in parallel at once.
const PARALLEL_TEXT_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    pub read: ReadOptions,
    pub encode: EncodeOptions,
}

/// A dataset ready for training: every sample tokenized, in file order.
#[derive(Debug, Clone, Serialize)]
pub struct PreparedDataset {
    pub path: PathBuf,
    pub samples: Vec<Sample>,
    pub encoded: Vec<Encoded>,
    pub warnings: Vec<Diagnostic>,
    pub stats: DatasetStats,
    pub template: TemplateSource,
}

/// Reads, validates and tokenizes `data` for the model in `model_dir`.
pub fn prepare(
    data: &Path,
    model_dir: &Path,
    options: &PrepareOptions,
) -> crate::Result<PreparedDataset> {
    let encoder = Encoder::from_model_dir(model_dir)?;
    let raw = read_jsonl(data, &options.read)?;
    Ok(encode_all(raw, &encoder, options)?)
}

/// Tokenizes a validated dataset. Samples the chat template rejects are reported
/// like any other bad line.
pub fn encode_all(
    raw: RawDataset,
    encoder: &Encoder,
    options: &PrepareOptions,
) -> Result<PreparedDataset, DataError> {
    encode_all_until(raw, encoder, options, &|| false)
}

/// [`encode_all`] that stops between chunks of text once `stop()` is true (a caller
/// that went away, a deadline), with an `Interrupted` I/O error naming the file:
/// tokenizing is nearly all of a data check's time.
pub fn encode_all_until(
    raw: RawDataset,
    encoder: &Encoder,
    options: &PrepareOptions,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<PreparedDataset, DataError> {
    // Tokenizing holds ~100× a record's text in memory; chunks of bounded text keep
    // the records in flight at once (one per core) from adding up to gigabytes.
    let mut results: Vec<Result<Encoded, Diagnostic>> = Vec::with_capacity(raw.samples.len());
    let mut rest = &raw.samples[..];
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let interrupted = |path: PathBuf| DataError::Io {
        path,
        source: std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "tokenizing was stopped before it finished",
        ),
    };
    while !rest.is_empty() {
        let mut bytes = 0usize;
        let take = rest
            .iter()
            .position(|s| {
                bytes += reader::content_bytes(&s.content);
                bytes > PARALLEL_TEXT_BYTES
            })
            .map_or(rest.len(), |i| i.max(1));
        let (chunk, tail) = rest.split_at(take);
        results.par_extend(chunk.par_iter().filter_map(|s| {
            // Checked per sample: one chunk can hold a whole small dataset.
            if stopped.load(Ordering::Relaxed) || stop() {
                stopped.store(true, Ordering::Relaxed);
                return None;
            }
            Some(encoder.encode(s, &options.encode))
        }));
        if stopped.load(Ordering::Relaxed) {
            return Err(interrupted(raw.path));
        }
        rest = tail;
    }
    let mut found = Collector::new(options.read.max_problems);
    let mut encoded = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(e) => encoded.push(e),
            Err(d) => found.push(d),
        }
    }
    if found.has_errors() {
        return Err(found.into_error(raw.path));
    }
    let mut warnings = raw.warnings;
    if encoder.template().is_fallback() && raw.format != Format::Text {
        warnings.push(Diagnostic::warning(
            0,
            "the model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>). Export and Ollama will use the same template",
        ));
    }
    let stats = DatasetStats::compute(raw.format, &encoded, options.encode.max_seq_len);
    if stats.no_trainable > 0 {
        let first = encoded
            .iter()
            .find(|e| e.trainable_tokens() == 0)
            .map_or(0, |e| e.line);
        warnings.push(Diagnostic::warning(
            first,
            format!(
                "{} samples have no trainable tokens after truncation to {} tokens and will be skipped; raise max_seq_len",
                stats.no_trainable, options.encode.max_seq_len
            ),
        ));
    }
    Ok(PreparedDataset {
        path: raw.path,
        samples: raw.samples,
        encoded,
        warnings,
        stats,
        template: encoder.template().source().clone(),
    })
}
