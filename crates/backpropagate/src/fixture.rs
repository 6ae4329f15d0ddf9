//! Tiny random-weight models in real Hugging Face layout, for tests and demos on a
//! machine without hub access: `config.json`, `model.safetensors`, a real byte-level
//! BPE `tokenizer.json` trained on our sample data, `tokenizer_config.json` with the
//! family's real chat template, and `generation_config.json`.

use std::path::Path;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::fsx::{write_atomic, write_f32_safetensors};
use crate::model::{expected_tensors, ModelConfig};

/// Qwen2-Instruct's chat template, verbatim (ChatML with a default system prompt).
pub const QWEN2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta-Llama-3-Instruct's chat template, verbatim.
pub const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Mistral-7B-Instruct-v0.2's chat template, verbatim (no system role: it raises).
pub const MISTRAL_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

/// Pre-tokenizer split of Llama 3 (digits in runs of up to three).
const LLAMA3_PATTERN: &str = crate::export::pre_tokenizer::LLAMA3_SPLIT;
/// Pre-tokenizer split of Qwen2 (every digit alone).
const QWEN2_PATTERN: &str = crate::export::pre_tokenizer::QWEN2_SPLIT;

/// Text the fixture tokenizers are trained on: our own sample datasets.
const CORPUS: [&str; 2] = [
    include_str!("../../../assets/samples/alpaca.jsonl"),
    include_str!("../../../assets/samples/messages.jsonl"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Mistral];
}

impl FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "llama" => Ok(Family::Llama),
            "qwen2" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            "mistral" => Ok(Family::Mistral),
            _ => Err(format!(
                "unknown fixture family `{s}`; use llama, qwen2, qwen3 or mistral"
            )),
        }
    }
}

/// Shape of a fixture model. The defaults make a ~0.2M-parameter model that trains
/// in seconds on a CPU yet exercises GQA, rope scaling and (for qwen2) qkv biases
/// and tied embeddings.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Target vocabulary size of the trained tokenizer (special tokens included).
    pub vocab_size: usize,
    pub seed: u64,
}

impl FixtureSpec {
    pub fn new(family: Family) -> Self {
        FixtureSpec {
            family,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 1024,
            seed: 0,
        }
    }

    /// A ~140M-parameter model (12 layers, width 1024) for export benchmarks, where
    /// tensor sizes start to look like a real model's.
    pub fn medium(family: Family) -> Self {
        FixtureSpec {
            hidden_size: 1024,
            intermediate_size: 2816,
            num_layers: 12,
            num_heads: 16,
            num_kv_heads: 4,
            ..Self::new(family)
        }
    }

    /// A ~30M-parameter model (8 layers, width 512) for benchmarks: big enough that
    /// matrix multiplies, not bookkeeping, dominate a training step.
    pub fn small(family: Family) -> Self {
        FixtureSpec {
            hidden_size: 512,
            intermediate_size: 1408,
            num_layers: 8,
            num_heads: 8,
            num_kv_heads: 4,
            ..Self::new(family)
        }
    }
}

struct FamilyInfo {
    specials: &'static [&'static str],
    bos: Option<&'static str>,
    eos: &'static str,
    pad: &'static str,
    template: &'static str,
    pattern: &'static str,
}

fn info(family: Family) -> FamilyInfo {
    match family {
        Family::Llama => FamilyInfo {
            specials: &[
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            bos: Some("<|begin_of_text|>"),
            eos: "<|eot_id|>",
            pad: "<|end_of_text|>",
            template: LLAMA3_TEMPLATE,
            pattern: LLAMA3_PATTERN,
        },
        Family::Qwen2 => FamilyInfo {
            specials: &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            bos: None,
            eos: "<|im_end|>",
            pad: "<|endoftext|>",
            template: QWEN2_TEMPLATE,
            pattern: QWEN2_PATTERN,
        },
        Family::Qwen3 => FamilyInfo {
            template: crate::data::CHATML_TEMPLATE,
            ..info(Family::Qwen2)
        },
        Family::Mistral => FamilyInfo {
            specials: &["<s>", "</s>", "[INST]", "[/INST]"],
            bos: Some("<s>"),
            eos: "</s>",
            pad: "</s>",
            template: MISTRAL_TEMPLATE,
            pattern: LLAMA3_PATTERN,
        },
    }
}

/// Writes a complete model folder into `dir` (created if needed).
pub fn write_fixture_model(dir: &Path, spec: &FixtureSpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let info = info(spec.family);
    let tokenizer = train_tokenizer(spec, &info)
        .map_err(|e| Error::model(dir, format!("training the fixture tokenizer failed: {e}")))?;
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| Error::model(dir, format!("cannot serialize the tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;

    let id = |t: &str| tokenizer.token_to_id(t);
    let vocab_size = tokenizer.get_vocab_size(true);
    let config = model_config(spec, vocab_size, info.bos.and_then(id), id(info.eos));
    let parsed = ModelConfig::from_json(&config, &dir.join("config.json"))?;
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &tokenizer_config(&tokenizer, &info),
    )?;
    let mut generation = json!({ "eos_token_id": id(info.eos), "do_sample": false });
    if let Some(bos) = info.bos.and_then(id) {
        generation["bos_token_id"] = json!(bos);
    }
    write_json(&dir.join("generation_config.json"), &generation)?;
    write_weights(&dir.join("model.safetensors"), spec, &parsed)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values always serialize");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

fn train_tokenizer(spec: &FixtureSpec, info: &FamilyInfo) -> tokenizers::Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    if matches!(spec.family, Family::Qwen2 | Family::Qwen3) {
        tokenizer.with_normalizer(Some(NFC));
    }
    let split = Split::new(
        SplitPattern::Regex(info.pattern.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    let specials: Vec<AddedToken> = info
        .specials
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(spec.vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer.train(&mut trainer, corpus_texts().into_iter())?;
    match info.bos {
        Some(bos) => {
            let bos_id = tokenizer
                .token_to_id(bos)
                .ok_or("BOS token missing after training")?;
            let template = TemplateProcessing::builder()
                .try_single(format!("{bos}:0 $A:0"))?
                .try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1"))?
                .special_tokens(vec![(bos, bos_id)])
                .build()?;
            tokenizer.with_post_processor(Some(template));
        }
        None => {
            tokenizer.with_post_processor(Some(ByteLevel::new(false, false, false)));
        }
    }
    Ok(tokenizer)
}

/// Every string value of the sample datasets, one training sequence each.
fn corpus_texts() -> Vec<String> {
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            Value::Object(o) => o.values().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for line in CORPUS.iter().flat_map(|c| c.lines()) {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            collect(&v, &mut out);
        }
    }
    out
}

fn tokenizer_config(tokenizer: &Tokenizer, info: &FamilyInfo) -> Value {
    let mut added = serde_json::Map::new();
    for s in info.specials {
        if let Some(id) = tokenizer.token_to_id(s) {
            added.insert(
                id.to_string(),
                json!({"content": s, "lstrip": false, "normalized": false,
                       "rstrip": false, "single_word": false, "special": true}),
            );
        }
    }
    json!({
        "added_tokens_decoder": added,
        "bos_token": info.bos,
        "eos_token": info.eos,
        "pad_token": info.pad,
        "chat_template": info.template,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

fn model_config(
    spec: &FixtureSpec,
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
) -> Value {
    let common = json!({
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": true,
        "attention_dropout": 0.0,
    });
    let specific = match spec.family {
        Family::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024
            },
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "pretraining_tp": 1,
        }),
        Family::Qwen2 => json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": true,
            "use_sliding_window": false,
            "sliding_window": 2048,
            "max_window_layers": spec.num_layers,
        }),
        Family::Qwen3 => json!({
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            // Wider heads than hidden/heads, as real Qwen3 checkpoints have.
            "head_dim": 2 * spec.hidden_size / spec.num_heads,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "attention_bias": false,
            "tie_word_embeddings": true,
            "use_sliding_window": false,
            "sliding_window": null,
            "max_window_layers": spec.num_layers,
        }),
        Family::Mistral => json!({
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": null,
            "tie_word_embeddings": false,
        }),
    };
    let mut config = common;
    if let (Value::Object(c), Value::Object(s)) = (&mut config, specific) {
        c.extend(s);
    }
    config
}

/// Random weights for every tensor the model code expects of `config`.
fn write_weights(path: &Path, spec: &FixtureSpec, config: &ModelConfig) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = expected_tensors(config)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            // RMSNorm gains near 1, as trained models have them. Embeddings and the
            // LM head get a larger spread than HF's 0.02 init so that a model this
            // narrow can express a skewed next-token distribution at all (with 0.02
            // its logits stay within about ±1 and training barely moves the loss).
            let std = if name.ends_with("norm.weight") {
                0.1
            } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
                0.08
            } else {
                0.05
            };
            let mean = if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            };
            let values: Vec<f32> = (0..n).map(|_| mean + std * normal(&mut rng)).collect();
            (name, shape, values)
        })
        .collect();
    write_f32_safetensors(path, &tensors)
}

/// Standard normal sample (Box-Muller), so weights depend only on the seed.
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Two tasks in sequence for forgetting measurements, from the bundled samples: task A
/// is the alpaca set (as chat records), task B the bike-shop conversations. Writes
/// `train.jsonl` (180 A then 180 B) and the held-out `held_a.jsonl` / `held_b.jsonl`
/// (20 each) into `dir` and returns their paths in that order.
pub fn write_two_tasks(
    dir: &Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let records = |text: &str| -> Vec<Value> {
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let a: Vec<String> = records(CORPUS[0])
        .iter()
        .map(|r| {
            let (instruction, input) = (r["instruction"].as_str().unwrap_or(""), r["input"].as_str().unwrap_or(""));
            let user = if input.is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
            json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]}).to_string()
        })
        .collect();
    let b: Vec<String> = records(CORPUS[1]).iter().map(Value::to_string).collect();
    let write = |name: &str, lines: &[String]| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        write_atomic(&p, (lines.join("\n") + "\n").as_bytes())?;
        Ok(p)
    };
    let train: Vec<String> = a[..180].iter().chain(&b[..180]).cloned().collect();
    Ok((
        write("train.jsonl", &train)?,
        write("held_a.jsonl", &a[180..])?,
        write("held_b.jsonl", &b[180..])?,
    ))
}

/// Copies the model in `src` to `dst` as a bitsandbytes 4-bit checkpoint, laid out as
/// transformers saves one: the seven projections of every layer in NF4 (blocks of 64,
/// with `double_quant` the scales as u8 codes in blocks of 256 around their mean), the
/// rest in bf16, and `quantization_config` in config.json. Tests load it as users load
/// `*-bnb-4bit` models from the Hub.
pub fn write_bnb_4bit(src: &Path, dst: &Path, double_quant: bool) -> Result<()> {
    use crate::quant::nf4::{le_floats, quantize, NF4};
    use safetensors::Dtype;

    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let path = entry.map_err(|e| Error::io(src, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name.filter(|n| n != "model.safetensors" && path.is_file()) {
            std::fs::copy(&path, dst.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
    }
    let config_path = dst.join("config.json");
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?,
    )
    .map_err(|e| Error::model(&config_path, e.to_string()))?;
    config["quantization_config"] = json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "bfloat16",
    });
    write_json(&config_path, &config)?;

    let weights = src.join("model.safetensors");
    let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::model(&weights, e.to_string()))?;
    let le = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let values = le_floats(view.dtype(), view.data()).ok_or_else(|| {
            Error::model(&weights, format!("tensor `{name}` is not a float tensor"))
        })?;
        let linear = crate::lora::TARGETS
            .iter()
            .any(|t| name.ends_with(&format!(".{t}.weight")));
        if !linear {
            let b: Vec<u8> = values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            out.push((name, Dtype::BF16, view.shape().to_vec(), b));
            continue;
        }
        let (packed, absmax) = quantize(&values, 64);
        let mut state = json!({
            "quant_type": "nf4",
            "blocksize": 64,
            "dtype": "bfloat16",
            "shape": view.shape(),
        });
        out.push((name.clone(), Dtype::U8, vec![packed.len(), 1], packed));
        if double_quant {
            let offset = absmax.iter().sum::<f32>() / absmax.len() as f32;
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            // A signed linear code book: the format stores its own map, so any works.
            let map: Vec<f32> = (0..256).map(|i| (i as f32 - 127.5) / 127.5).collect();
            let scales: Vec<f32> = centred
                .chunks(256)
                .map(|b| b.iter().fold(1e-12f32, |m, v| m.max(v.abs())))
                .collect();
            let codes: Vec<u8> = centred
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let x = v / scales[i / 256];
                    (0..256)
                        .min_by(|&a, &b| (map[a] - x).abs().total_cmp(&(map[b] - x).abs()))
                        .unwrap_or(0) as u8
                })
                .collect();
            state["nested_blocksize"] = json!(256);
            state["nested_offset"] = json!(offset);
            out.push((
                format!("{name}.absmax"),
                Dtype::U8,
                vec![codes.len()],
                codes,
            ));
            out.push((
                format!("{name}.nested_absmax"),
                Dtype::F32,
                vec![scales.len()],
                le(&scales),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                Dtype::F32,
                vec![256],
                le(&map),
            ));
        } else {
            out.push((
                format!("{name}.absmax"),
                Dtype::F32,
                vec![absmax.len()],
                le(&absmax),
            ));
        }
        out.push((format!("{name}.quant_map"), Dtype::F32, vec![16], le(&NF4)));
        let blob = state.to_string().into_bytes();
        out.push((
            format!("{name}.quant_state.bitsandbytes__nf4"),
            Dtype::U8,
            vec![blob.len()],
            blob,
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::model(dst, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let data = safetensors::serialize(views, None)
        .map_err(|e| Error::model(dst, format!("cannot serialize: {e}")))?;
    write_atomic(&dst.join("model.safetensors"), &data)
}
