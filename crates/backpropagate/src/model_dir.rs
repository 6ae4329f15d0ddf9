//! A local Hugging Face model folder and the files the pipeline needs from it, with
//! errors that say which file is missing and what a model folder must hold.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct ModelDir {
    path: PathBuf,
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::model(
                path,
                "not a model folder (it does not exist or is a file); pass the folder holding config.json, tokenizer.json and *.safetensors",
            ));
        }
        Ok(ModelDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file the model must have, or an error naming it.
    pub fn require(&self, name: &str, why: &str) -> Result<PathBuf> {
        let file = self.path.join(name);
        if file.is_file() {
            Ok(file)
        } else {
            Err(Error::model(
                &self.path,
                format!(
                    "missing {name} ({why}); download the full model folder, not just the weights"
                ),
            ))
        }
    }

    pub fn tokenizer_json(&self) -> Result<PathBuf> {
        self.require("tokenizer.json", "the fast tokenizer")
    }

    /// `config.json` parsed as JSON.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let path = self.require("config.json", "the model architecture")?;
        let text = crate::fsx::read_capped(&path, crate::fsx::MAX_MODEL_TEXT)?;
        serde_json::from_str(&text).map_err(|e| Error::model(&path, format!("not valid JSON: {e}")))
    }
}
