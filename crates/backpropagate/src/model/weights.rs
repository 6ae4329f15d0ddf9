//! Base weights from safetensors — one file or shards listed in
//! `model.safetensors.index.json` — memory-mapped and converted to the compute dtype
//! one tensor at a time. Errors name the missing shard or tensor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub struct Weights {
    files: MmapedSafetensors,
    dir: PathBuf,
    dtype: DType,
    device: Device,
}

impl Weights {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let paths = safetensors_paths(dir)?;
        // SAFETY: the files are mapped read-only; we never write to them while mapped.
        // A file truncated under us by another process would fault, as with any mmap
        // reader (transformers, llama.cpp); this is the documented trade-off for not
        // copying multi-GB checkpoints into RAM.
        let files = unsafe { MmapedSafetensors::multi(&paths) }
            .map_err(|e| Error::model(dir, format!("cannot read the safetensors files: {e}")))?;
        Ok(Weights {
            files,
            dir: dir.to_path_buf(),
            dtype,
            device: device.clone(),
        })
    }

    /// Checks that a tensor exists with the expected shape and a trainable dtype,
    /// without loading it.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        let view = self.files.get(name).map_err(|_| {
            Error::model(
                &self.dir,
                format!("missing tensor `{name}` in the checkpoint (is config.json from another model?)"),
            )
        })?;
        if view.shape() != shape {
            return Err(Error::model(
                &self.dir,
                format!(
                    "tensor `{name}` has shape {:?} but config.json implies {shape:?}",
                    view.shape()
                ),
            ));
        }
        match view.dtype() {
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 => Ok(()),
            other => Err(Error::model(
                &self.dir,
                format!(
                    "tensor `{name}` is {other:?}; only f32, f16 and bf16 checkpoints can be trained (quantized bases come with QLoRA)"
                ),
            )),
        }
    }

    /// A tensor by its checkpoint name, checked, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.check(name, shape)?;
        let t = self
            .files
            .load(name, &self.device)
            .map_err(|e| Error::model(&self.dir, format!("cannot load `{name}`: {e}")))?;
        Ok(t.to_dtype(self.dtype)?)
    }
}

/// The weight files of a model folder: `model.safetensors`, or the shards its index
/// lists (each checked to exist).
pub fn safetensors_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        Ok(vec![single])
    } else if index.is_file() {
        shards(&index, dir)
    } else {
        let hint = if dir.join("pytorch_model.bin").exists() {
            "; this model only has pytorch_model.bin: convert it to safetensors (e.g. with transformers' save_pretrained(safe_serialization=True))"
        } else {
            ""
        };
        Err(Error::model(
            dir,
            format!("no model.safetensors or model.safetensors.index.json{hint}"),
        ))
    }
}

/// Shard files named by the index, each checked to exist.
fn shards(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::model(index, "missing `weight_map`"))?;
    let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
    let mut paths = Vec::new();
    for f in files {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(Error::model(
                index,
                format!("shard `{f}` listed in the index is missing; download it again"),
            ));
        }
        paths.push(p);
    }
    Ok(paths)
}
