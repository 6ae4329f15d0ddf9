//! `config.json` of the supported decoder-only families, normalised into one
//! `ModelConfig`. Family differences (qkv bias, q/k norm, rope scaling, tied
//! embeddings) become flags; anything we cannot run is refused here, naming the field.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

pub const SUPPORTED: &str =
    "llama (Llama 2/3, TinyLlama, SmolLM), mistral, qwen2 (Qwen2/2.5), qwen3";

impl Arch {
    fn from_model_type(s: &str) -> Option<Arch> {
        match s {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            _ => None,
        }
    }

    fn from_architecture(s: &str) -> Option<Arch> {
        match s {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "MistralForCausalLM" => Some(Arch::Mistral),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (always on for Qwen2, `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama/Qwen3 `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// Checkpoint dtype as declared (`torch_dtype`), for exports.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fsx::read_capped(path, crate::fsx::MAX_MODEL_TEXT)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let fail = |msg: String| Error::model(path, msg);
        let arch = match v.get("model_type").and_then(Value::as_str) {
            Some(t) => Arch::from_model_type(t).ok_or_else(|| {
                fail(format!(
                    "unsupported architecture `{t}` (field `model_type`); supported: {SUPPORTED}"
                ))
            })?,
            None => {
                let name = v
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        fail("config.json has neither `model_type` nor `architectures`".into())
                    })?;
                Arch::from_architecture(name).ok_or_else(|| {
                    fail(format!(
                        "unsupported architecture `{name}` (field `architectures`); supported: {SUPPORTED}"
                    ))
                })?
            }
        };
        let usize_field = |key: &str| -> Result<usize> {
            match v.get(key) {
                Some(x) => bounded_size(key, x).map_err(fail),
                None => Err(fail(format!("missing field `{key}`"))),
            }
        };
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => bounded_size(key, x).map(Some).map_err(fail),
            }
        };
        let float = |key: &str, default: f64| -> Result<f64> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or_else(|| {
                        fail(format!(
                            "field `{key}` must be a positive finite number, found {x}; fix config.json"
                        ))
                    }),
            }
        };
        let flag =
            |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);

        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(fail(format!(
                "field `num_key_value_heads` ({num_kv_heads}) must divide `num_attention_heads` ({num_heads})"
            )));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(fail(format!(
                "head dimension {head_dim} (field `head_dim`, or `hidden_size` / `num_attention_heads`) must be even and positive for rotary embeddings"
            )));
        }
        let attention_bias = flag("attention_bias", false);
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_field("vocab_size")?,
            rms_norm_eps: float("rms_norm_eps", 1e-6)?,
            rope_theta: float("rope_theta", 10_000.0)?,
            rope_scaling: rope_scaling(v.get("rope_scaling"), path)?,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: flag("tie_word_embeddings", false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: flag("mlp_bias", false),
            qk_norm: arch == Arch::Qwen3,
            torch_dtype: v
                .get("torch_dtype")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Parameters of the base model.
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.o_bias {
            layer += h;
        }
        if self.mlp_bias {
            layer += 2 * i + h;
        }
        if self.qk_norm {
            layer += 2 * self.head_dim;
        }
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }
}

/// Upper bound of each size field: a few times the largest published model, so every
/// product of sizes (tensor shapes, parameter counts, memory plans) fits in a `usize`
/// and a hostile `config.json` cannot make us build a billion tensor names.
const SIZE_LIMITS: &[(&str, u64)] = &[
    ("hidden_size", 1 << 16),
    ("intermediate_size", 1 << 18),
    ("num_hidden_layers", 1 << 10),
    ("num_attention_heads", 1 << 10),
    ("num_key_value_heads", 1 << 10),
    ("head_dim", 1 << 11),
    ("vocab_size", 1 << 22),
    ("max_position_embeddings", 1 << 24),
];

/// A size field: a positive integer no larger than its limit in [`SIZE_LIMITS`].
fn bounded_size(key: &str, x: &Value) -> std::result::Result<usize, String> {
    let n = x.as_u64().filter(|&n| n > 0).ok_or_else(|| {
        format!("field `{key}` must be a positive integer, found {x}; fix config.json")
    })?;
    let limit = SIZE_LIMITS
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(1 << 24, |(_, l)| *l);
    if n > limit {
        return Err(format!(
            "field `{key}` is {n}, above the limit of {limit}; config.json is damaged or not a model we can train"
        ));
    }
    Ok(n as usize)
}

fn rope_scaling(v: Option<&Value>, path: &Path) -> Result<RopeScaling> {
    let Some(obj) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| {
        obj.get(key)
            .and_then(Value::as_f64)
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| {
                Error::model(
                    path,
                    format!("field `rope_scaling.{key}` is missing or not a positive number"),
                )
            })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(Error::model(
            path,
            format!("unsupported `rope_scaling.rope_type` `{other}`; supported: default, linear, llama3"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 100})
    }

    #[test]
    fn families_set_their_flags() {
        let c = parse(base()).unwrap();
        assert_eq!(
            (c.arch, c.head_dim, c.qkv_bias, c.qk_norm),
            (Arch::Llama, 16, false, false)
        );
        let mut q = base();
        q["model_type"] = "qwen2".into();
        let c = parse(q).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        let mut q3 = base();
        q3["model_type"] = "qwen3".into();
        q3["head_dim"] = 32.into();
        let c = parse(q3).unwrap();
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 32);
    }

    #[test]
    fn unsupported_architecture_names_the_field_and_the_list() {
        let mut v = base();
        v["model_type"] = "gpt2".into();
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("unsupported architecture `gpt2` (field `model_type`)"),
            "{e}"
        );
        assert!(e.contains("qwen3"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("model_type");
        v["architectures"] = json!(["PhiForCausalLM"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("`PhiForCausalLM` (field `architectures`)"),
            "{e}"
        );
    }

    #[test]
    fn missing_or_bad_fields_are_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("missing field `hidden_size`"));
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(v).unwrap_err().to_string().contains("`yarn`"));
    }

    #[test]
    fn huge_size_fields_are_refused_naming_the_field() {
        for (key, value) in [
            ("num_hidden_layers", json!(1_000_000_000u64)),
            ("hidden_size", json!(1u64 << 40)),
            ("intermediate_size", json!(u64::MAX)),
            ("vocab_size", json!(1_000_000_000u64)),
            ("num_attention_heads", json!(1u64 << 20)),
            ("head_dim", json!(1u64 << 30)),
            ("max_position_embeddings", json!(1u64 << 40)),
        ] {
            let mut v = base();
            v[key] = value;
            let start = std::time::Instant::now();
            let e = parse(v).unwrap_err().to_string();
            assert!(
                start.elapsed().as_millis() < 100,
                "{key} took {:?}",
                start.elapsed()
            );
            assert!(e.contains("config.json"), "{e}");
            assert!(e.contains(&format!("field `{key}`")), "{e}");
            assert!(e.contains("above the limit"), "{e}");
        }
    }

    #[test]
    fn non_integer_or_non_finite_fields_are_refused() {
        let mut v = base();
        v["num_key_value_heads"] = json!(1.5);
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("`num_key_value_heads` must be a positive integer"),
            "{e}"
        );
        let mut v = base();
        v["num_hidden_layers"] = json!(1e9);
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("num_hidden_layers"));
        let mut v = base();
        v["rms_norm_eps"] = json!(-1.0);
        assert!(parse(v).unwrap_err().to_string().contains("rms_norm_eps"));
        let mut v = base();
        v["num_attention_heads"] = json!(128);
        v["num_key_value_heads"] = json!(128);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("head dimension 0"), "{e}");
    }

    #[test]
    fn parameter_count_of_a_known_model() {
        // Qwen2.5-0.5B: 494,032,768 parameters (tied embeddings, qkv bias).
        let v = json!({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "tie_word_embeddings": true});
        assert_eq!(parse(v).unwrap().parameter_count(), 494_032_768);
    }
}
