//! LoRA adapters: for each targeted linear `W` (out × in), trainable `A` (r × in)
//! and `B` (out × r) so the layer computes `W x + s · B A dropout(x)` with
//! `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). Initialised as PEFT does — A
//! Kaiming-uniform, B zero — and saved in PEFT's file layout and key names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::fsx::{write_atomic, write_f32_safetensors};
use crate::model::ModelConfig;

/// Linear layers a LoRA can wrap, in the order they appear in a decoder layer.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// One adapted linear layer.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// Module path as in the HF checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub a: Var,
    pub b: Var,
}

/// All adapters of a model, in model order (deterministic for init and saving).
#[derive(Debug, Clone)]
pub struct LoraSet {
    pub config: LoraConfig,
    pub layers: Vec<LoraLayer>,
}

impl LoraSet {
    /// The factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        scale(&self.config)
    }

    /// Fresh adapters for every targeted linear of `model`.
    pub fn init(
        model: &ModelConfig,
        config: &LoraConfig,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        check_targets(config)?;
        let mut layers = Vec::new();
        for (module, out_f, in_f) in target_shapes(model, config) {
            // kaiming_uniform_(a=sqrt(5)) on (r, in) gives U(-1/sqrt(in), 1/sqrt(in)).
            let bound = 1.0 / (in_f as f64).sqrt();
            let a: Vec<f32> = (0..config.r * in_f)
                .map(|_| rng.gen_range(-bound..bound) as f32)
                .collect();
            let a = Tensor::from_vec(a, (config.r, in_f), device)?;
            let b = Tensor::zeros((out_f, config.r), DType::F32, device)?;
            layers.push(LoraLayer {
                module,
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            });
        }
        Ok(LoraSet {
            config: config.clone(),
            layers,
        })
    }

    pub fn find(&self, module: &str) -> Option<&LoraLayer> {
        self.layers.iter().find(|l| l.module == module)
    }

    pub fn trainable_parameters(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.a.elem_count() + l.b.elem_count())
            .sum()
    }

    /// Every trainable tensor with its PEFT key, A before B, in model order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    (peft_key(&l.module, "lora_A"), &l.a),
                    (peft_key(&l.module, "lora_B"), &l.b),
                ]
            })
            .collect()
    }

    /// Writes `adapter_model.safetensors` + `adapter_config.json` in PEFT's layout.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: Vec<(String, Tensor)> = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let path = dir.join("adapter_model.safetensors");
        write_safetensors(&path, &tensors)?;
        let config = PeftConfig::new(&self.config, base_model);
        let json = serde_json::to_string_pretty(&config).expect("PEFT config serializes");
        write_atomic(&dir.join("adapter_config.json"), json.as_bytes())
    }

    /// Loads adapters saved by us or by PEFT for `model`.
    pub fn load_peft(dir: &Path, model: &ModelConfig, device: &Device) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let peft: PeftConfig = serde_json::from_str(&text)
            .map_err(|e| Error::model(&config_path, format!("not a PEFT LoRA config: {e}")))?;
        if peft.peft_type != "LORA" {
            return Err(Error::model(
                &config_path,
                format!("peft_type is {}, only LORA is supported", peft.peft_type),
            ));
        }
        let config = LoraConfig {
            r: peft.r,
            alpha: peft.lora_alpha,
            dropout: peft.lora_dropout,
            rslora: peft.use_rslora,
            target_modules: peft.target_modules.clone(),
        };
        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
            Error::model(&weights_path, format!("cannot read adapter weights: {e}"))
        })?;
        let layers = load_layers(&tensors, model, &config, &weights_path)?;
        Ok(LoraSet { config, layers })
    }
}

fn load_layers(
    tensors: &HashMap<String, Tensor>,
    model: &ModelConfig,
    config: &LoraConfig,
    path: &Path,
) -> Result<Vec<LoraLayer>> {
    let mut layers = Vec::new();
    for (module, out_f, in_f) in target_shapes(model, config) {
        let get = |part: &str, shape: (usize, usize)| -> Result<Var> {
            let key = peft_key(&module, part);
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::model(path, format!("missing tensor `{key}`")))?;
            if t.dims2().ok() != Some(shape) {
                return Err(Error::model(
                    path,
                    format!(
                        "tensor `{key}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    ),
                ));
            }
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
        };
        let a = get("lora_A", (config.r, in_f))?;
        let b = get("lora_B", (out_f, config.r))?;
        layers.push(LoraLayer { module, a, b });
    }
    Ok(layers)
}

pub fn scale(config: &LoraConfig) -> f64 {
    if config.rslora {
        config.alpha / (config.r as f64).sqrt()
    } else {
        config.alpha / config.r as f64
    }
}

fn check_targets(config: &LoraConfig) -> Result<()> {
    for t in &config.target_modules {
        if !TARGETS.contains(&t.as_str()) {
            return Err(Error::InvalidOption(format!(
                "unknown LoRA target `{t}`; choose from {}",
                TARGETS.join(", ")
            )));
        }
    }
    Ok(())
}

/// (module path, out features, in features) of every targeted linear, in model order.
pub fn target_shapes(model: &ModelConfig, config: &LoraConfig) -> Vec<(String, usize, usize)> {
    let h = model.hidden_size;
    let q = model.num_heads * model.head_dim;
    let kv = model.num_kv_heads * model.head_dim;
    let i = model.intermediate_size;
    let mut out = Vec::new();
    for l in 0..model.num_layers {
        for t in TARGETS {
            if !config.target_modules.iter().any(|x| x == t) {
                continue;
            }
            let (group, out_f, in_f) = match t {
                "q_proj" => ("self_attn", q, h),
                "k_proj" | "v_proj" => ("self_attn", kv, h),
                "o_proj" => ("self_attn", h, q),
                "gate_proj" | "up_proj" => ("mlp", i, h),
                _ => ("mlp", h, i),
            };
            out.push((format!("model.layers.{l}.{group}.{t}"), out_f, in_f));
        }
    }
    out
}

/// PEFT's saved key: `base_model.model.<module>.lora_A.weight`.
pub fn peft_key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}.weight")
}

/// Writes tensors (converted to f32) to a safetensors file atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        data.push((name.clone(), t.dims().to_vec(), values));
    }
    write_f32_safetensors(path, &data)
}

/// The subset of PEFT's `adapter_config.json` we write and read.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default = "none_str")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    inference_mode: bool,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    peft_type: String,
    r: usize,
    target_modules: Vec<String>,
    #[serde(default = "causal_lm")]
    task_type: String,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

fn none_str() -> String {
    "none".into()
}

fn causal_lm() -> String {
    "CAUSAL_LM".into()
}

impl PeftConfig {
    fn new(config: &LoraConfig, base_model: &str) -> Self {
        PeftConfig {
            base_model_name_or_path: Some(base_model.to_string()),
            bias: none_str(),
            fan_in_fan_out: false,
            inference_mode: true,
            lora_alpha: config.alpha,
            lora_dropout: config.dropout,
            peft_type: "LORA".into(),
            r: config.r,
            target_modules: config.target_modules.clone(),
            task_type: causal_lm(),
            use_rslora: config.rslora,
            use_dora: false,
        }
    }
}
