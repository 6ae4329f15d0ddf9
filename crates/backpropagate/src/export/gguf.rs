//! GGUF export for llama.cpp and Ollama: architecture metadata, the tokenizer (vocab,
//! merges, token types, special ids, chat template) and every tensor under
//! llama.cpp's name, merged with the LoRA, permuted where llama.cpp's rotary layout
//! needs it, converted and streamed out one tensor at a time.

use std::path::Path;

use candle_core::Device;
use serde_json::Value as Json;

use super::base_reader::{add_lora, permute_rows, BaseReader};
use super::gguf_file::{GgmlType, GgufWriter, TensorInfo, Value};
use crate::data::ChatTemplate;
use crate::error::{Error, Result};
use crate::event::{Event, EventSink};
use crate::lora::LoraSet;
use crate::model::{expected_tensors, inv_freq, Arch, ModelConfig, RopeScaling};
use crate::quant::encode;

/// GGUF weight types we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    /// The base's own type when it was read from a quantized GGUF (its linears'
    /// commonest block type, as the nearest preset), else the caller's default:
    /// [`GgufQuant::resolve`].
    Auto,
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4KM,
    Q5KM,
    Q6K,
}

impl std::str::FromStr for GgufQuant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(GgufQuant::Auto),
            "f32" => Ok(GgufQuant::F32),
            "f16" => Ok(GgufQuant::F16),
            "bf16" => Ok(GgufQuant::Bf16),
            "q8_0" => Ok(GgufQuant::Q8_0),
            "q4_0" => Ok(GgufQuant::Q4_0),
            "q4_k_m" => Ok(GgufQuant::Q4KM),
            "q5_k_m" => Ok(GgufQuant::Q5KM),
            "q6_k" => Ok(GgufQuant::Q6K),
            other => Err(format!(
                "unknown GGUF quantization `{other}`; use auto, f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m or q4_0"
            )),
        }
    }
}

impl GgufQuant {
    /// [`GgufQuant::Auto`] made concrete for the base in `model_dir`: for a base read
    /// from a GGUF, the file's own preset (its `general.file_type`: q4_k_m, q5_k_m,
    /// q6_k, q8_0, q4_0, f16, bf16, f32; the `_s` k-quants as their `_m`, q4_1 as
    /// q4_k_m and q5_0/q5_1 as q5_k_m, the presets of about their size), else
    /// `otherwise`. Other types are returned as they are.
    pub fn resolve(self, model_dir: &Path, otherwise: GgufQuant) -> GgufQuant {
        if self != GgufQuant::Auto {
            return self;
        }
        match crate::gguf_base::source_file_type(model_dir) {
            Some(0) => GgufQuant::F32,
            Some(1) => GgufQuant::F16,
            Some(2) => GgufQuant::Q4_0,
            Some(3 | 14 | 15) => GgufQuant::Q4KM,
            Some(7) => GgufQuant::Q8_0,
            Some(8 | 9 | 16 | 17) => GgufQuant::Q5KM,
            Some(18) => GgufQuant::Q6K,
            Some(32) => GgufQuant::Bf16,
            _ => otherwise,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::Auto => "auto",
            GgufQuant::F32 => "f32",
            GgufQuant::F16 => "f16",
            GgufQuant::Bf16 => "bf16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4_0 => "q4_0",
            GgufQuant::Q4KM => "q4_k_m",
            GgufQuant::Q5KM => "q5_k_m",
            GgufQuant::Q6K => "q6_k",
        }
    }

    /// llama.cpp's `llama_ftype` for `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            // Resolved before writing; as q8_0 if not.
            GgufQuant::Auto | GgufQuant::Q8_0 => 7,
            GgufQuant::F32 => 0,
            GgufQuant::F16 => 1,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q4KM => 15,
            GgufQuant::Q5KM => 17,
            GgufQuant::Q6K => 18,
            GgufQuant::Bf16 => 32,
        }
    }

    /// Type of a tensor, following llama-quantize's choices for the preset
    /// (`llama_tensor_get_type` without an importance matrix): vectors and norms stay
    /// f32; the output (or a tied embedding) gets q6_K; the `_m` presets give attn_v
    /// and ffn_down q6_K on "more bits" layers; rows that do not fill whole blocks
    /// fall back (q4_K→q5_0, q5_K→q5_1, q6_K→q8_0, then f16).
    fn tensor_type(self, t: &TensorRole) -> GgmlType {
        if t.ne.len() < 2 || !t.name.ends_with("weight") || t.name.contains("_norm.weight") {
            return GgmlType::F32;
        }
        let default = match self {
            GgufQuant::F32 => return GgmlType::F32,
            GgufQuant::F16 => return GgmlType::F16,
            GgufQuant::Bf16 => return GgmlType::Bf16,
            GgufQuant::Auto | GgufQuant::Q8_0 => GgmlType::Q8_0,
            GgufQuant::Q4_0 => GgmlType::Q4_0,
            GgufQuant::Q4KM => GgmlType::Q4K,
            GgufQuant::Q5KM => GgmlType::Q5K,
            GgufQuant::Q6K => GgmlType::Q6K,
        };
        let nx = t.ne[0] as usize;
        let more_bits = |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        let m_preset = matches!(self, GgufQuant::Q4KM | GgufQuant::Q5KM);
        let chosen = if t.name == "output.weight" || (t.tied && t.name == "token_embd.weight") {
            if !nx.is_multiple_of(default.block().0) {
                GgmlType::Q8_0
            } else if default != GgmlType::Q8_0 {
                GgmlType::Q6K
            } else {
                default
            }
        } else if (t.name.contains("attn_v.weight") || t.name.contains("ffn_down.weight"))
            && m_preset
            && more_bits(t.index, t.count)
        {
            GgmlType::Q6K
        } else {
            default
        };
        if nx.is_multiple_of(chosen.block().0) {
            return chosen;
        }
        let fallback = match chosen {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            GgmlType::Q6K => GgmlType::Q8_0,
            other => other,
        };
        if nx.is_multiple_of(fallback.block().0) {
            fallback
        } else {
            GgmlType::F16
        }
    }
}

/// What the mixture rules look at: the GGUF name, dims, and the tensor's position
/// among the model's tensors of the same role (attn_v, ffn_down).
struct TensorRole<'a> {
    name: &'a str,
    ne: &'a [u64],
    tied: bool,
    index: usize,
    count: usize,
}

fn gguf_arch(arch: Arch) -> &'static str {
    match arch {
        // llama.cpp runs Mistral checkpoints as the llama architecture.
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    }
}

/// (HF name, llama.cpp's name) of the tensors outside the layers.
pub(crate) const MODEL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// (HF name, llama.cpp's name) of a layer's tensors, after `model.layers.N.` and
/// `blk.N.`.
pub(crate) const LAYER_NAMES: [(&str, &str); 18] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.gate_proj.bias", "ffn_gate.bias"),
    ("mlp.up_proj.bias", "ffn_up.bias"),
    ("mlp.down_proj.bias", "ffn_down.bias"),
];

/// llama.cpp's name for a HF tensor.
fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = MODEL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let (_, mapped) = LAYER_NAMES.iter().find(|(h, _)| *h == name)?;
    Some(format!("blk.{layer}.{mapped}"))
}

/// Writes the base with `adapter` merged in (or the base alone when `None`).
pub fn write(
    model_dir: &Path,
    adapter: Option<&Path>,
    out_file: &Path,
    quant: GgufQuant,
    name: &str,
    sink: &dyn EventSink,
) -> Result<()> {
    let config = ModelConfig::load(&model_dir.join("config.json"))?;
    let device = Device::Cpu;
    let lora = adapter
        .map(|a| LoraSet::load_peft(a, &config, &device))
        .transpose()?;
    let arch = gguf_arch(config.arch);
    let permute = arch == "llama";

    let mut meta = arch_metadata(&config, arch, name, quant);
    meta.extend(tokenizer_metadata(model_dir, &config)?);

    let base = BaseReader::open(model_dir)?;

    let mut plan: Vec<(Option<String>, TensorInfo)> = Vec::new();
    if let RopeScaling::Llama3 { .. } = config.rope_scaling {
        let n = (config.head_dim / 2) as u64;
        plan.push((
            None,
            TensorInfo {
                name: "rope_freqs.weight".into(),
                ne: vec![n],
                ty: GgmlType::F32,
            },
        ));
    }
    let (mut attn_v, mut ffn_down) = (0usize, 0usize);
    for (hf, shape) in expected_tensors(&config) {
        let gname = gguf_name(&hf)
            .ok_or_else(|| Error::model(model_dir, format!("no GGUF name for `{hf}`")))?;
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        // Position among tensors of the same role, counted in file order as
        // llama-quantize counts them.
        let counter = if gname.contains("attn_v.weight") {
            Some(&mut attn_v)
        } else if gname.contains("ffn_down.weight") {
            Some(&mut ffn_down)
        } else {
            None
        };
        let index = counter.as_ref().map_or(0, |c| **c);
        if let Some(c) = counter {
            *c += 1;
        }
        let ty = quant.tensor_type(&TensorRole {
            name: &gname,
            ne: &ne,
            tied: config.tie_word_embeddings,
            index,
            count: config.num_layers,
        });
        plan.push((
            Some(hf),
            TensorInfo {
                name: gname,
                ne,
                ty,
            },
        ));
    }
    let infos = plan.iter().map(|(_, i)| i.clone()).collect();
    let mut writer = GgufWriter::create(out_file, &meta, infos)?;
    let total = plan.len() as u64;
    for (done, (hf, info)) in plan.iter().enumerate() {
        let values: Vec<f32> = match hf {
            None => llama3_rope_factors(&config),
            Some(hf) => {
                let mut values = base.read_f32(hf)?;
                let module = hf.strip_suffix(".weight").unwrap_or(hf);
                if let Some((lora, layer)) = lora.as_ref().and_then(|l| Some((l, l.find(module)?)))
                {
                    add_lora(&mut values, layer, lora.scale())?;
                }
                if permute && (hf.contains("q_proj.") || hf.contains("k_proj.")) {
                    let heads = if hf.contains("q_proj.") {
                        config.num_heads
                    } else {
                        config.num_kv_heads
                    };
                    let (rows, cols) = (info.ne.get(1).copied().unwrap_or(1), info.ne[0]);
                    let (rows, cols) = if info.ne.len() == 1 {
                        (cols, 1)
                    } else {
                        (rows, cols)
                    };
                    values = permute_rows(&values, rows as usize, cols as usize, heads);
                }
                values
            }
        };
        writer.write_tensor(&encode(&values, info.ty))?;
        sink.emit(Event::Progress {
            stage: "gguf".into(),
            done: done as u64 + 1,
            total,
        });
    }
    writer.finish()
}

/// A GGUF LoRA adapter for llama.cpp's `--lora` and Ollama's `ADAPTER`: tensors
/// `<base tensor>.lora_a` (ne = [in, r]) and `.lora_b` (ne = [r, out]), with `lora_b`
/// permuted like the base weight for llama's q/k. llama.cpp scales by alpha / r, so
/// rsLoRA's alpha / √r is written as an equivalent alpha.
pub fn write_lora(
    model_dir: &Path,
    adapter: &Path,
    out_file: &Path,
    quant: GgufQuant,
    name: &str,
) -> Result<()> {
    let config = ModelConfig::load(&model_dir.join("config.json"))?;
    let lora = LoraSet::load_peft(adapter, &config, &Device::Cpu)?;
    let arch = gguf_arch(config.arch);
    let alpha = lora.scale() * lora.config.r as f64;
    let meta = vec![
        ("general.type".to_string(), Value::Str("adapter".into())),
        ("general.architecture".to_string(), Value::Str(arch.into())),
        ("general.name".to_string(), Value::Str(name.into())),
        ("adapter.type".to_string(), Value::Str("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
    ];
    let ty = match quant {
        GgufQuant::F16 => GgmlType::F16,
        _ => GgmlType::F32,
    };
    let mut plan = Vec::new();
    for layer in &lora.layers {
        let base = gguf_name(&format!("{}.weight", layer.module))
            .ok_or_else(|| Error::model(adapter, format!("no GGUF name for `{}`", layer.module)))?;
        let a = layer.a.as_tensor();
        let (out_f, r) = layer.b.as_tensor().dims2()?;
        let mut b = layer.b.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        if arch == "llama" && (layer.module.ends_with("q_proj") || layer.module.ends_with("k_proj"))
        {
            let heads = if layer.module.ends_with("q_proj") {
                config.num_heads
            } else {
                config.num_kv_heads
            };
            b = permute_rows(&b, out_f, r, heads);
        }
        let a_values = a.flatten_all()?.to_vec1::<f32>()?;
        let a_ne = a.dims().iter().rev().map(|&d| d as u64).collect::<Vec<_>>();
        for (suffix, t, ne) in [
            ("lora_a", a_values, a_ne),
            ("lora_b", b, vec![r as u64, out_f as u64]),
        ] {
            plan.push((
                TensorInfo {
                    name: format!("{base}.{suffix}"),
                    ne,
                    ty,
                },
                t,
            ));
        }
    }
    let mut writer = GgufWriter::create(
        out_file,
        &meta,
        plan.iter().map(|(i, _)| i.clone()).collect(),
    )?;
    for (info, t) in &plan {
        writer.write_tensor(&encode(t, info.ty))?;
    }
    writer.finish()
}

/// `rope_freqs.weight`: llama3 scaling as per-frequency divisors, as the converter
/// writes it (base inverse frequency over scaled inverse frequency).
fn llama3_rope_factors(config: &ModelConfig) -> Vec<f32> {
    let unscaled = ModelConfig {
        rope_scaling: RopeScaling::None,
        ..config.clone()
    };
    inv_freq(&unscaled)
        .iter()
        .zip(inv_freq(config))
        .map(|(base, scaled)| (base / scaled) as f32)
        .collect()
}

fn arch_metadata(
    c: &ModelConfig,
    arch: &str,
    name: &str,
    quant: GgufQuant,
) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".to_string(), Value::Str(arch.into())),
        ("general.name".to_string(), Value::Str(name.into())),
        (
            "general.file_type".to_string(),
            Value::U32(quant.file_type()),
        ),
        ("general.quantization_version".to_string(), Value::U32(2)),
        (
            k("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_layers as u32)),
        (
            k("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (k("attention.head_count"), Value::U32(c.num_heads as u32)),
        (
            k("attention.head_count_kv"),
            Value::U32(c.num_kv_heads as u32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.dimension_count"), Value::U32(c.head_dim as u32)),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
    ];
    if c.head_dim * c.num_heads != c.hidden_size {
        m.push((k("attention.key_length"), Value::U32(c.head_dim as u32)));
        m.push((k("attention.value_length"), Value::U32(c.head_dim as u32)));
    }
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        m.push((k("rope.scaling.type"), Value::Str("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    m
}

/// Token types of llama.cpp's vocab.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn tokenizer_metadata(dir: &Path, c: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let tok: Json = serde_json::from_str(&text)
        .map_err(|e| Error::model(&path, format!("not valid JSON: {e}")))?;
    let model = &tok["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(Error::model(
            &path,
            "only byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style) can be written to GGUF yet; SentencePiece-style vocabularies are planned",
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::model(&path, "missing model.vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; c.vocab_size];
    let mut types = vec![NORMAL; c.vocab_size];
    for (t, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(t.clone());
        }
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content.to_string());
            types[id as usize] = if added["special"] == true {
                CONTROL
            } else {
                USER_DEFINED
            };
        }
    }
    // Checkpoints often pad the embedding past the tokenizer; llama.cpp needs a name
    // for every row.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = USER_DEFINED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => Some(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            )),
            _ => None,
        })
        .collect();
    let template = ChatTemplate::from_model_dir(dir)?;
    let id_of = |t: &str| tokens.iter().position(|x| x == t).map(|i| i as u32);
    let bos = template.special("bos_token").and_then(id_of);
    let tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| Error::model(&path, format!("cannot load the tokenizer: {e}")))?;
    let adds_bos = adds_bos(dir, &tokenizer, bos);
    let pre = super::pre_tokenizer::detect(&tokenizer, &tok, bos.filter(|_| adds_bos))
        .map_err(|why| Error::model(&path, format!("cannot be written to GGUF: {why}")))?;
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::ArrStr(tokens.clone()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::ArrI32(types),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::ArrStr(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(adds_bos),
        ),
        (
            "tokenizer.chat_template".to_string(),
            Value::Str(template.text().to_string()),
        ),
    ];
    for (key, special) in [
        ("bos_token_id", "bos_token"),
        ("eos_token_id", "eos_token"),
        ("padding_token_id", "pad_token"),
    ] {
        if let Some(id) = template.special(special).and_then(id_of) {
            m.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    let eos = template.special("eos_token").and_then(id_of);
    let eos_ids = eos_token_ids(dir, eos, tokens.len());
    if !eos_ids.is_empty() {
        m.push((
            "tokenizer.ggml.eos_token_ids".to_string(),
            Value::ArrI32(eos_ids.into_iter().map(|i| i as i32).collect()),
        ));
    }
    Ok(m)
}

/// Whether the model puts `bos` in front of what it encodes, as transformers decides:
/// `add_bos_token` in `tokenizer_config.json` where it is set (it rewrites the
/// post-processor), else what `tokenizer.json`'s post-processor does.
fn adds_bos(dir: &Path, tokenizer: &tokenizers::Tokenizer, bos: Option<u32>) -> bool {
    let Some(bos) = bos else { return false };
    let configured = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Json>(&t).ok())
        .and_then(|c| c["add_bos_token"].as_bool());
    configured.unwrap_or_else(|| {
        tokenizer
            .encode("a", true)
            .is_ok_and(|enc| enc.get_ids().first() == Some(&bos))
    })
}

/// Every token that ends a reply: the tokenizer's EOS, then those of
/// `generation_config.json` (Llama 3.1 lists three), as Ollama reads them to stop.
fn eos_token_ids(dir: &Path, eos: Option<u32>, vocab: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    let generation = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Json>(&t).ok());
    let listed = match generation.as_ref().map(|g| &g["eos_token_id"]) {
        Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
        None => Vec::new(),
    };
    for id in listed {
        if (id as usize) < vocab && !ids.contains(&(id as u32)) {
            ids.push(id as u32);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").unwrap(),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.0.weird").is_none());
    }
}
