//! Models by Hugging Face repo id: `org/name[@revision]` resolves to a folder in the HF
//! cache that Python tools share (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`: `refs/`, `snapshots/<commit>/` linking into `blobs/`).
//! config.json comes first and an unsupported architecture is refused before any
//! weights are fetched; large files resume where a broken download stopped and are
//! checked against their sha256; `HF_TOKEN` opens gated repos; offline mode
//! (`HF_HUB_OFFLINE=1`) uses the cache only. Nothing the hub answers can place a file
//! outside the repo's cache folder or grow past its declared size.

mod cache;
mod download;

use std::path::{Path, PathBuf};

pub use cache::{cache_dir, RepoCache};
use download::Want;
pub use download::{HubError, HubOptions};

use crate::error::Result;
use crate::event::EventSink;

/// A model as users give it: a local folder, or a repo id with an optional revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    Local(PathBuf),
    Repo { id: String, revision: String },
}

impl ModelSpec {
    /// A path that exists, or looks like one (`./x`, `/x`, `C:\x`, `~/x`), is local;
    /// `org/name` and `org/name@rev` are repo ids.
    pub fn parse(s: &str) -> ModelSpec {
        let p = Path::new(s);
        let looks_like_path = p.exists()
            || p.is_absolute()
            || s.starts_with('.')
            || s.starts_with('~')
            || s.contains('\\')
            || s.split('/').count() != 2;
        if looks_like_path {
            return ModelSpec::Local(p.to_path_buf());
        }
        let (id, revision) = match s.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, rev),
            _ => (s, "main"),
        };
        let valid = id.split('/').all(|part| {
            !part.is_empty()
                && part.len() <= 96
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !part.starts_with(['-', '.'])
        });
        if valid {
            ModelSpec::Repo {
                id: id.to_string(),
                revision: revision.to_string(),
            }
        } else {
            ModelSpec::Local(p.to_path_buf())
        }
    }
}

/// The local folder for `model`: itself when it is a folder, else the repo's snapshot
/// in the HF cache, downloaded (or completed) first unless offline.
pub fn resolve_model(model: &str, options: &HubOptions, sink: &dyn EventSink) -> Result<PathBuf> {
    resolve(model, Want::Everything, options, sink)
}

/// Like [`resolve_model`], but a repo's snapshot only gets its config and tokenizer
/// files (a few MB, never the weights): enough to tokenize and check data.
pub fn resolve_tokenizer(
    model: &str,
    options: &HubOptions,
    sink: &dyn EventSink,
) -> Result<PathBuf> {
    resolve(model, Want::Tokenizer, options, sink)
}

fn resolve(model: &str, want: Want, options: &HubOptions, sink: &dyn EventSink) -> Result<PathBuf> {
    use crate::gguf_base;
    if let Some(name) = model.strip_prefix(gguf_base::OLLAMA_PREFIX) {
        let stores = gguf_base::ollama_stores();
        return gguf_base::import_ollama(name, &stores, &gguf_base::bases_dir(), sink);
    }
    match ModelSpec::parse(model) {
        // A GGUF file is read once into a model folder (crate::gguf_base).
        ModelSpec::Local(p) if crate::gguf_base::is_gguf(&p) => {
            crate::gguf_base::import(&p, &crate::gguf_base::bases_dir(), sink)
        }
        ModelSpec::Local(p) => Ok(p),
        ModelSpec::Repo { id, revision } => download::snapshot(&id, &revision, want, options, sink),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert_eq!(
            ModelSpec::parse("Qwen/Qwen2.5-0.5B-Instruct"),
            ModelSpec::Repo {
                id: "Qwen/Qwen2.5-0.5B-Instruct".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSpec::parse("HuggingFaceTB/SmolLM2-135M@v1.0"),
            ModelSpec::Repo {
                id: "HuggingFaceTB/SmolLM2-135M".into(),
                revision: "v1.0".into()
            }
        );
        for local in [
            "./models/x",
            "/abs/x",
            "models/x/y",
            "~/m",
            "plain",
            "C:\\m\\x",
        ] {
            assert!(
                matches!(ModelSpec::parse(local), ModelSpec::Local(_)),
                "{local}"
            );
        }
    }
}
