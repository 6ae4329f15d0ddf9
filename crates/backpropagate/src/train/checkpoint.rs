//! Checkpoints: everything needed to continue a run bit for bit — LoRA weights (PEFT
//! layout), AdamW moments, the step, the dropout RNG position and the data cursor.
//! Written into a temporary directory, synced, then renamed to `step-N`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::batch::Cursor;
use super::optim::AdamW;
use crate::error::{Error, Result};
use crate::fsx::{write_atomic, write_f32_safetensors};
use crate::lora::LoraSet;
use crate::model::ModelConfig;

/// How many checkpoints to keep; older ones are removed once a newer one is durable.
pub const KEEP: usize = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub step: u64,
    pub cursor: Cursor,
    /// Dropout RNG: ChaCha8 seed and word position (u128 as a decimal string).
    pub rng_seed: u64,
    pub rng_word_pos: String,
    pub optimizer_t: u64,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    /// The micro-batch in use (smaller than planned after an out-of-memory back-off),
    /// so a resumed run keeps the size that fits. Absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
}

pub fn save(
    checkpoints: &Path,
    state: &State,
    lora: &LoraSet,
    opt: &AdamW,
    base_model: &str,
) -> Result<PathBuf> {
    let final_dir = checkpoints.join(format!("step-{}", state.step));
    // Replacing covers a resumed run re-reaching a step it had saved before the kill.
    crate::fsx::write_dir(&final_dir, |tmp| {
        lora.save_peft(tmp, base_model)?;
        let mut moments = Vec::with_capacity(2 * opt.m.len());
        for ((name, var), (m, v)) in lora.named_vars().into_iter().zip(opt.m.iter().zip(&opt.v)) {
            let shape = var.dims().to_vec();
            moments.push((format!("m.{name}"), shape.clone(), m.clone()));
            moments.push((format!("v.{name}"), shape, v.clone()));
        }
        write_f32_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
        let json = serde_json::to_string_pretty(state).expect("state serializes");
        write_atomic(&tmp.join("state.json"), json.as_bytes())
    })?;
    prune(checkpoints)?;
    Ok(final_dir)
}

fn prune(checkpoints: &Path) -> Result<()> {
    let all = crate::run::list_checkpoints(checkpoints)?;
    for (_, dir) in all.iter().rev().skip(KEEP) {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

pub struct Loaded {
    pub state: State,
    pub lora: LoraSet,
    pub opt: AdamW,
}

pub fn load(
    dir: &Path,
    model: &ModelConfig,
    opt_template: &AdamW,
    device: &Device,
) -> Result<Loaded> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| Error::Run {
        path: state_path.clone(),
        message: format!("unreadable checkpoint state: {e}"),
    })?;
    let lora = LoraSet::load_peft(dir, model, device)?;
    let opt_path = dir.join("optimizer.safetensors");
    let tensors = candle_core::safetensors::load(&opt_path, device)
        .map_err(|e| Error::model(&opt_path, format!("cannot read optimizer state: {e}")))?;
    let mut opt = opt_template.clone();
    opt.t = state.optimizer_t;
    opt.m.clear();
    opt.v.clear();
    for (name, _) in lora.named_vars() {
        let get = |k: String| -> Result<Vec<f32>> {
            let t: &Tensor = tensors
                .get(&k)
                .ok_or_else(|| Error::model(&opt_path, format!("missing tensor `{k}`")))?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        opt.m.push(get(format!("m.{name}"))?);
        opt.v.push(get(format!("v.{name}"))?);
    }
    Ok(Loaded { state, lora, opt })
}
