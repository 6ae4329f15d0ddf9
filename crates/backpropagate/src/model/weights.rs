//! Base weights from safetensors — one file or shards listed in
//! `model.safetensors.index.json` — memory-mapped and converted to the compute dtype
//! one tensor at a time. Errors name the missing shard or tensor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use std::borrow::Cow;
use std::collections::HashMap;

use super::qlinear::FrozenWeight;
use crate::config::BaseQuant;
use crate::error::{Error, Result};
use crate::quant::nf4::{dequantize_weight, le_floats, weight_of_state, QuantState};
use crate::quant::{stored, GgmlType};

pub struct Weights {
    files: MmapedSafetensors,
    /// Quant states of bitsandbytes 4-bit weights, by weight name, parsed once.
    nf4: HashMap<String, QuantState>,
    /// Tensors kept as ggml blocks (a GGUF base: `quant::stored`), by name.
    blocks: HashMap<String, GgmlType>,
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
        let mut nf4 = HashMap::new();
        let mut blocks = HashMap::new();
        for (name, view) in files.tensors() {
            if let Some(weight) = weight_of_state(&name) {
                let state = QuantState::parse(view.data())
                    .map_err(|e| Error::model(dir, format!("`{weight}`: {e}")))?;
                nf4.insert(weight.to_string(), state);
            } else if let Some(weight) = stored::weight_of_type_tensor(&name) {
                let ty = stored::type_of(view.dtype(), view.data())
                    .map_err(|e| Error::model(dir, format!("`{weight}`: {e}")))?;
                blocks.insert(weight.to_string(), ty);
            }
        }
        Ok(Weights {
            files,
            nf4,
            blocks,
            dir: dir.to_path_buf(),
            dtype,
            device: device.clone(),
        })
    }

    /// Checks that a tensor exists with the expected shape and a trainable dtype,
    /// without loading it. A bitsandbytes 4-bit linear is checked against the shape its
    /// quant state records.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        if let Some(state) = self.nf4.get(name) {
            if state.shape != shape {
                return Err(Error::model(
                    &self.dir,
                    format!(
                        "4-bit tensor `{name}` has shape {:?} but config.json implies {shape:?}",
                        state.shape
                    ),
                ));
            }
            return Ok(());
        }
        let view = self.files.get(name).map_err(|_| {
            Error::model(
                &self.dir,
                format!("missing tensor `{name}` in the checkpoint (is config.json from another model?)"),
            )
        })?;
        if let Some(&ty) = self.blocks.get(name) {
            return stored::check(ty, view.dtype(), view.shape(), shape)
                .map_err(|e| Error::model(&self.dir, format!("tensor `{name}`: {e}")));
        }
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
                    "tensor `{name}` is {other:?}; only f32, f16 and bf16 checkpoints, and bitsandbytes 4-bit ones, can be trained"
                ),
            )),
        }
    }

    /// Whether 16-bit frozen linears are kept as stored: f32 compute on the CPU, where
    /// the fused ops widen them per call (elsewhere the compute dtype is used as is).
    fn keeps_half(&self) -> bool {
        self.dtype == DType::F32 && self.device.is_cpu()
    }

    /// Whether any linear is stored in bitsandbytes 4-bit.
    pub fn has_nf4(&self) -> bool {
        !self.nf4.is_empty()
    }

    /// The block type of each tensor stored as ggml blocks (a GGUF base), by name.
    pub fn block_types(&self) -> &HashMap<String, GgmlType> {
        &self.blocks
    }

    /// The block types of the linears stored as ggml blocks (a GGUF base's matrices,
    /// the embedding aside) with how many weights each holds, most weights first.
    pub fn linear_block_types(&self) -> Vec<(GgmlType, u64)> {
        let mut per_type: Vec<(GgmlType, u64)> = Vec::new();
        for (name, &ty) in &self.blocks {
            if !name.contains("_proj.") {
                continue;
            }
            let values = self.stored_elements(name).unwrap_or(0);
            match per_type.iter_mut().find(|(t, _)| *t == ty) {
                Some((_, n)) => *n += values,
                None => per_type.push((ty, values)),
            }
        }
        per_type.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.name().cmp(b.0.name())));
        per_type
    }

    /// How many values a tensor stored as ggml blocks holds.
    pub fn stored_elements(&self, name: &str) -> Option<u64> {
        let ty = self.blocks.get(name)?;
        let view = self.files.get(name).ok()?;
        let (n, b) = ty.block();
        Some((view.data().len() / b * n) as u64)
    }

    /// The f32 values of a tensor stored as ggml blocks.
    fn block_values(&self, name: &str, ty: GgmlType, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self
            .files
            .get(name)
            .map_err(|e| Error::model(&self.dir, format!("cannot load `{name}`: {e}")))?;
        stored::decode(ty, view.data(), shape.iter().product())
            .map_err(|e| Error::model(&self.dir, format!("tensor `{name}`: {e}")))
    }

    /// A tensor by its checkpoint name, checked, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.check(name, shape)?;
        if self.nf4.contains_key(name) {
            let values = self.nf4_values(name)?;
            return Ok(Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?);
        }
        if let Some(&ty) = self.blocks.get(name) {
            let values = self.block_values(name, ty, shape)?;
            return Ok(Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?);
        }
        let t = self
            .files
            .load(name, &self.device)
            .map_err(|e| Error::model(&self.dir, format!("cannot load `{name}`: {e}")))?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// A frozen linear weight (out, in), held as `quant` asks (QLoRA). Blocks of a
    /// GGUF base are kept as they are under `auto` (and under the `quant` of their own
    /// type): no requantization, the file's own rounding.
    pub fn frozen(&self, name: &str, shape: &[usize], quant: BaseQuant) -> Result<FrozenWeight> {
        if let Some(&ty) = self.blocks.get(name) {
            self.check(name, shape)?;
            let same = match quant {
                BaseQuant::Auto => true,
                BaseQuant::Q8_0 => ty == GgmlType::Q8_0,
                BaseQuant::Q4K => ty == GgmlType::Q4K,
                BaseQuant::F32 => false,
            };
            if same && shape.len() == 2 {
                let view = self
                    .files
                    .get(name)
                    .map_err(|e| Error::model(&self.dir, format!("cannot load `{name}`: {e}")))?;
                return Ok(FrozenWeight::from_blocks(
                    view.data(),
                    ty,
                    shape[0],
                    shape[1],
                    &self.device,
                )?);
            }
            let values = self.block_values(name, ty, shape)?;
            return Ok(match quant {
                BaseQuant::Auto | BaseQuant::F32 => FrozenWeight::Dense(
                    Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?,
                ),
                q => FrozenWeight::from_f32(values, shape[0], shape[1], q, &self.device)?,
            });
        }
        let dense = matches!(quant, BaseQuant::Auto | BaseQuant::F32);
        if dense && !self.nf4.contains_key(name) && self.keeps_half() {
            // f32 training on the CPU: a bf16/f16 checkpoint's linears stay in their
            // 16 bits and are widened block by block inside the fused op (exactly:
            // every bf16/f16 value is an f32), half the memory of an f32 copy.
            self.check(name, shape)?;
            let t = self
                .files
                .load(name, &self.device)
                .map_err(|e| Error::model(&self.dir, format!("cannot load `{name}`: {e}")))?;
            return Ok(FrozenWeight::Dense(match t.dtype() {
                DType::BF16 | DType::F16 => t,
                _ => t.to_dtype(self.dtype)?,
            }));
        }
        if quant == BaseQuant::F32 || (quant == BaseQuant::Auto && !self.nf4.contains_key(name)) {
            return Ok(FrozenWeight::Dense(self.get(name, shape)?));
        }
        let quant = if quant == BaseQuant::Auto {
            BaseQuant::Q4K
        } else {
            quant
        };
        self.check(name, shape)?;
        let values = if self.nf4.contains_key(name) {
            self.nf4_values(name)?
        } else {
            self.files
                .load(name, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| Error::model(&self.dir, format!("cannot load `{name}`: {e}")))?
        };
        Ok(FrozenWeight::from_f32(
            values,
            shape[0],
            shape[1],
            quant,
            &self.device,
        )?)
    }

    /// A bitsandbytes 4-bit weight, dequantized as bitsandbytes does.
    fn nf4_values(&self, name: &str) -> Result<Vec<f32>> {
        let state = &self.nf4[name];
        let view = |suffix: &str| {
            self.files
                .get(&format!("{name}{suffix}"))
                .map_err(|_| format!("missing companion tensor `{name}{suffix}`"))
        };
        dequantize_weight(
            state,
            |suffix| view(suffix).map(|v| Cow::Borrowed(v.data())),
            |suffix| {
                let v = view(suffix)?;
                le_floats(v.dtype(), v.data()).ok_or_else(|| {
                    format!("`{name}{suffix}` is {:?}, not a float tensor", v.dtype())
                })
            },
        )
        .map_err(|e| Error::model(&self.dir, format!("4-bit tensor `{name}`: {e}")))
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

/// Shard files named by the index, each checked to be a plain name inside `dir` (an
/// index is as untrusted as any downloaded file) and to exist.
fn shards(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    // Real indexes are a few hundred KB even for 400B-parameter models.
    let text = crate::fsx::read_capped(index, crate::fsx::MAX_MODEL_TEXT)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::model(index, "missing `weight_map`"))?;
    let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
    let mut paths = Vec::new();
    for f in files {
        let p = crate::safe_path::confined_join(dir, f).map_err(|why| {
            Error::model(
                index,
                format!(
                    "shard `{f}` listed in the index {why}; shards must be plain file names inside the model folder, so fix or re-download the index"
                ),
            )
        })?;
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
