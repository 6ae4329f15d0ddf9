//! One forward + backward pass on a fixed batch, exposing logits, loss and LoRA
//! gradients — what the reference tests compare with PyTorch + PEFT, and a tool for
//! debugging a model port.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::batch::{build, mean_loss, Row};
use crate::config::BaseQuant;
use crate::error::Result;
use crate::lora::LoraSet;
use crate::model::{CausalLm, ModelConfig};

pub struct ProbeOutput {
    /// (b, t, vocab), row-major, padded positions included.
    pub logits: Tensor,
    /// Mean cross-entropy over the batch's targets.
    pub loss: f64,
    /// Gradient of `loss` for every LoRA tensor, by PEFT key.
    pub grads: Vec<(String, Tensor)>,
}

/// `rows` are (input_ids, labels) pairs; labels use -100 for "no loss". Dropout off.
pub fn probe(
    model_dir: &Path,
    adapter_dir: &Path,
    rows: &[(Vec<u32>, Vec<i32>)],
) -> Result<ProbeOutput> {
    probe_with(model_dir, adapter_dir, rows, BaseQuant::Auto, DType::F32)
}

/// [`probe`] with the base held as `quant` (QLoRA checks) and computing in `dtype`.
pub fn probe_with(
    model_dir: &Path,
    adapter_dir: &Path,
    rows: &[(Vec<u32>, Vec<i32>)],
    quant: BaseQuant,
    dtype: DType,
) -> Result<ProbeOutput> {
    let device = Device::Cpu;
    let config = ModelConfig::load(&model_dir.join("config.json"))?;
    let lora = LoraSet::load_peft(adapter_dir, &config, &device)?;
    let max_len = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1);
    let model = CausalLm::load_with(
        model_dir,
        config,
        Some(&lora),
        max_len,
        &device,
        quant,
        dtype,
    )?;
    let rows: Vec<Row> = rows
        .iter()
        .map(|(ids, labels)| Row::single(ids.clone(), labels.clone()))
        .collect();
    let refs: Vec<&Row> = rows.iter().collect();
    let batch = build(&refs, 0, &device)?;
    let logits = model.logits(&batch)?;
    let loss_sum = model.loss_sum(&batch, None)?;
    let loss = (loss_sum / batch.target_count.max(1) as f64)?;
    let store = loss.backward()?;
    let mut grads = Vec::new();
    for (name, var) in lora.named_vars() {
        let g = match store.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        grads.push((name, g));
    }
    Ok(ProbeOutput {
        logits: logits.detach(),
        loss: loss.to_scalar::<f32>()? as f64,
        grads,
    })
}

/// Greedy continuation of `prompt` by the base with `adapter` (no KV cache: each
/// token re-runs the whole sequence; meant for short previews and reference checks).
pub fn generate_greedy(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    prompt: &[u32],
    max_new: usize,
) -> Result<Vec<u32>> {
    let device = Device::Cpu;
    let config = ModelConfig::load(&model_dir.join("config.json"))?;
    let lora = adapter_dir
        .map(|d| LoraSet::load_peft(d, &config, &device))
        .transpose()?;
    let model = CausalLm::load(
        model_dir,
        config,
        lora.as_ref(),
        prompt.len() + max_new,
        &device,
    )?;
    let mut ids = prompt.to_vec();
    for _ in 0..max_new {
        let row = Row::single(ids.clone(), vec![-100; ids.len()]);
        let batch = build(&[&row], 0, &device)?;
        let logits = model.logits(&batch)?;
        let last = logits.get(0)?.get(ids.len() - 1)?;
        let next = last.argmax(0)?.to_scalar::<u32>()?;
        ids.push(next);
    }
    Ok(ids[prompt.len()..].to_vec())
}

/// The model's greedy reply (base + `adapter` when given) to one user message, rendered
/// with its chat template, up to `max_new` tokens or its end-of-turn token: a quick
/// look at what training changed, without Ollama.
pub fn answer(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    prompt: &str,
    max_new: usize,
) -> Result<String> {
    use crate::data::{Encoder, Message, Role};
    let encoder = Encoder::from_model_dir(model_dir)?;
    let text = encoder
        .template()
        .render(&[Message::new(Role::User, prompt)], true)
        .map_err(|e| {
            crate::error::Error::model(model_dir, format!("chat template: {}", e.message))
        })?;
    let tok = encoder.tokenizer();
    let ids = tok
        .encode(text.as_str(), false)
        .map_err(|e| {
            crate::error::Error::model(model_dir, format!("cannot encode the prompt: {e}"))
        })?
        .get_ids()
        .to_vec();
    let mut out = generate_greedy(model_dir, adapter_dir, &ids, max_new)?;
    if let Some(end) = out.iter().position(|&t| Some(t) == encoder.eos_id()) {
        out.truncate(end);
    }
    tok.decode(&out, true)
        .map(|s| s.trim().to_string())
        .map_err(|e| crate::error::Error::model(model_dir, format!("cannot decode the reply: {e}")))
}

/// Mean token loss of base + `adapter` on every sample of `data` (dropout off), in
/// micro-batches of 8 — the held-out measure the forgetting comparison uses.
pub fn evaluate_adapter(
    model_dir: &Path,
    adapter_dir: &Path,
    data: &Path,
    max_seq_len: usize,
) -> Result<f64> {
    use crate::data::{prepare, EncodeOptions, PrepareOptions};
    let device = Device::Cpu;
    let config = ModelConfig::load(&model_dir.join("config.json"))?;
    let lora = LoraSet::load_peft(adapter_dir, &config, &device)?;
    let options = PrepareOptions {
        encode: EncodeOptions {
            max_seq_len,
            ..EncodeOptions::default()
        },
        ..PrepareOptions::default()
    };
    let prepared = prepare(data, model_dir, &options)?;
    let rows: Vec<Row> = prepared.encoded.iter().map(Row::from).collect();
    let max_len = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(1);
    let model = CausalLm::load(model_dir, config, Some(&lora), max_len, &device)?;
    Ok(mean_loss(&model, &rows, 8, 0)?)
}
