//! Samples to token ids and labels: chat samples go through the model's chat
//! template, then the fast tokenizer; labels are -100 outside what the model should
//! learn (assistant replies by default), and long samples are cut to `max_seq_len`.

use std::path::{Path, PathBuf};
use ts_rs::TS;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::diagnostic::Diagnostic;
use super::record::{Content, Sample};
use super::template::ChatTemplate;
use crate::error::{Error, Result};
use crate::model_dir::ModelDir;

/// Label value the loss ignores (the PyTorch / HF convention).
pub const IGNORE_INDEX: i32 = -100;

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum TrainOn {
    /// Only assistant replies (and their end-of-turn token): the model learns to
    /// answer, not to imitate users.
    #[default]
    Assistant,
    /// Every token, prompts included.
    All,
}

impl std::str::FromStr for TrainOn {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "assistant" => Ok(TrainOn::Assistant),
            "all" => Ok(TrainOn::All),
            _ => Err(format!("expected `assistant` or `all`, got `{s}`")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub max_seq_len: usize,
    pub train_on: TrainOn,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            max_seq_len: 2048,
            train_on: TrainOn::Assistant,
        }
    }
}

/// One tokenized sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Encoded {
    pub line: usize,
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; `IGNORE_INDEX` where no loss is taken.
    pub labels: Vec<i32>,
    /// Length before truncation.
    pub full_len: usize,
}

impl Encoded {
    pub fn truncated(&self) -> bool {
        self.full_len > self.input_ids.len()
    }

    pub fn trainable_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Tokenizer + chat template of one model.
pub struct Encoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eos_id: Option<u32>,
    tokenizer_path: PathBuf,
    /// `vocab_size` of the model's config.json: an id at or past it would fail on the
    /// first training step, so it is reported here, with the line.
    vocab_size: Option<usize>,
}

impl Encoder {
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let model = ModelDir::open(dir)?;
        let tokenizer_path = model.tokenizer_json()?;
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            Error::model(&tokenizer_path, format!("cannot load the tokenizer: {e}"))
        })?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let config = dir.join("config.json");
        let vocab_size = if config.is_file() {
            Some(crate::model::ModelConfig::load(&config)?.vocab_size)
        } else {
            None
        };
        let mut encoder = Self::new(tokenizer, template, tokenizer_path);
        encoder.vocab_size = vocab_size;
        Ok(encoder)
    }

    pub fn new(tokenizer: Tokenizer, template: ChatTemplate, tokenizer_path: PathBuf) -> Self {
        let eos_id = template
            .special("eos_token")
            .and_then(|t| tokenizer.token_to_id(t));
        Encoder {
            tokenizer,
            template,
            eos_id,
            tokenizer_path,
            vocab_size: None,
        }
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn tokenizer_path(&self) -> &Path {
        &self.tokenizer_path
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Tokenizes one sample. Problems come back as a diagnostic for the sample's line.
    pub fn encode(
        &self,
        sample: &Sample,
        options: &EncodeOptions,
    ) -> std::result::Result<Encoded, Diagnostic> {
        let (mut input_ids, mut labels) = match &sample.content {
            Content::Chat(messages) => {
                let rendered = self.template.render_with_spans(messages).map_err(|e| {
                    Diagnostic::error(
                        sample.line,
                        e.message,
                        "fix this conversation (roles, order), or use a model whose chat template accepts it",
                    )
                })?;
                // The template already wrote BOS where the model wants it, as HF's
                // apply_chat_template(tokenize=True) assumes.
                let enc = self
                    .tokenizer
                    .encode(rendered.text.as_str(), false)
                    .map_err(|e| tokenizer_failed(sample.line, &e))?;
                let ids = enc.get_ids().to_vec();
                // Spans are sorted and disjoint: the one that may hold a token is the
                // last starting at or before it (a search, not a scan per token).
                let spans = &rendered.assistant;
                let in_reply = |start: usize| {
                    let k = spans.partition_point(|s| s.start <= start);
                    k > 0 && spans[k - 1].contains(&start)
                };
                let labels: Vec<i32> = ids
                    .iter()
                    .zip(enc.get_offsets())
                    .map(|(&id, &(start, _))| {
                        let learn = options.train_on == TrainOn::All || in_reply(start);
                        if learn {
                            id as i32
                        } else {
                            IGNORE_INDEX
                        }
                    })
                    .collect();
                (ids, labels)
            }
            Content::Text(text) => {
                let enc = self
                    .tokenizer
                    .encode(text.as_str(), true)
                    .map_err(|e| tokenizer_failed(sample.line, &e))?;
                let mut ids = enc.get_ids().to_vec();
                if let Some(eos) = self.eos_id {
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                    }
                }
                let labels: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
                (ids, labels)
            }
        };
        if let Some(vocab) = self.vocab_size {
            if let Some(&id) = input_ids.iter().find(|&&id| id as usize >= vocab) {
                let token = self.tokenizer.id_to_token(id).unwrap_or_default();
                return Err(Diagnostic::error(
                    sample.line,
                    format!(
                        "the tokenizer gives token id {id} (`{token}`), outside the model's vocabulary of {vocab} (`vocab_size` in config.json)"
                    ),
                    format!(
                        "tokenizer.json does not match this model: use the tokenizer that came with it, or remove the added token from {}",
                        self.tokenizer_path.display()
                    ),
                ));
            }
        }
        let full_len = input_ids.len();
        input_ids.truncate(options.max_seq_len);
        labels.truncate(options.max_seq_len);
        Ok(Encoded {
            line: sample.line,
            input_ids,
            labels,
            full_len,
        })
    }
}

fn tokenizer_failed(line: usize, e: &tokenizers::Error) -> Diagnostic {
    Diagnostic::error(
        line,
        format!("the tokenizer failed on this sample: {e}"),
        "check the text for unusual characters",
    )
}
