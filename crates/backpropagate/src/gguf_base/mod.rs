//! A GGUF file as the base model of a run (`--model path/to/model.gguf`): the file is
//! read once into a model folder in the cache (config.json from the architecture's
//! metadata, tokenizer.json rebuilt from the vocabulary, tokenizer_config.json with the
//! chat template and BOS/EOS, the weights under Hugging Face names with llama.cpp's
//! Q/K permutation undone), and every later run reuses that folder while the file is
//! unchanged. The GGUF itself is only read.
//!
//! The weights are decoded to f32 (every ggml type the engine reads: f32/f16/bf16,
//! q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k), so training, resume and every export
//! work as for a Hugging Face folder; `--quant` trains a QLoRA base from them.

mod ollama_store;
mod reader;
mod tokenizer;

use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::quant::GgmlType;
pub use reader::{GgufFile, Meta, TensorEntry};

/// The folder GGUF bases are read into: `$BACKPROP_HOME/bases`, else the platform
/// cache (`~/.cache/backpropagate/bases` on Linux).
pub fn bases_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("BACKPROP_HOME") {
        return PathBuf::from(home).join("bases");
    }
    dirs::cache_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("backpropagate")
        .join("bases")
}

/// Whether `model` names a GGUF file.
pub fn is_gguf(model: &Path) -> bool {
    model
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && model.is_file()
}

/// What identifies the file a folder was read from: its full path, size and
/// modification time (hashing a 5 GB file on every run would cost seconds).
fn identity(gguf: &Path) -> Result<Json> {
    let full = std::fs::canonicalize(gguf).map_err(|e| Error::io(gguf, e))?;
    let meta = std::fs::metadata(&full).map_err(|e| Error::io(gguf, e))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Ok(json!({"path": full.to_string_lossy(), "size": meta.len(), "modified_ns": modified}))
}

/// The file in a folder read from a GGUF that keeps the file's `general.file_type`.
const FILE_TYPE: &str = "gguf.json";

/// The `general.file_type` (llama.cpp's `llama_ftype`: 15 for q4_k_m) of the GGUF a
/// model folder was read from; None for other folders, or a file without one.
pub fn source_file_type(model_dir: &Path) -> Option<u64> {
    let text = crate::fsx::read_capped(&model_dir.join(FILE_TYPE), 4096).ok()?;
    serde_json::from_str::<Json>(&text).ok()?["file_type"].as_u64()
}

/// The prefix of models in the local Ollama store: `ollama:NAME[:TAG]`.
pub const OLLAMA_PREFIX: &str = "ollama:";

/// The model folder for `ollama:NAME[:TAG]` (the GGUF blob of that model in the local
/// Ollama store, read like a GGUF file), looking in `stores` (default:
/// [`ollama_stores`]).
pub fn import_ollama(
    name: &str,
    stores: &[PathBuf],
    bases: &Path,
    sink: &dyn EventSink,
) -> Result<PathBuf> {
    let (blob, label, extras) = ollama_store::resolve(name, stores)?;
    let dir = import_as(&blob, &format!("ollama-{label}"), bases, sink)?;
    // Ollama's own template, system prompt and parameters for this model, for a push
    // of a run on it (`ollama::template_for_model`).
    let kept = dir.join(OLLAMA_EXTRAS);
    if extras.as_object().is_some_and(|m| !m.is_empty()) {
        crate::fsx::write_atomic(&kept, extras.to_string().as_bytes())?;
    } else if kept.exists() {
        std::fs::remove_file(&kept).map_err(|e| Error::io(&kept, e))?;
    }
    Ok(dir)
}

/// The file in a folder read from an Ollama model that keeps its manifest's template,
/// system prompt and parameters.
pub const OLLAMA_EXTRAS: &str = "ollama.json";

pub use ollama_store::stores as ollama_stores;

/// The GGUF file a run's model `spec` names (a `.gguf` path, or the blob of an
/// `ollama:` model in the local store); None for other models.
pub fn source_file(spec: &str) -> Result<Option<PathBuf>> {
    if let Some(name) = spec.strip_prefix(OLLAMA_PREFIX) {
        return Ok(Some(ollama_store::resolve(name, &ollama_stores())?.0));
    }
    let path = Path::new(spec);
    Ok(is_gguf(path).then(|| path.to_path_buf()))
}

/// A run's model folder read from a GGUF file or an Ollama model (`spec`, as the run
/// was started with) is only a cache: when it is gone, the file is read again. If the
/// file changed since, it would read into another folder, and the run (whose adapter
/// belongs to the old weights) is refused instead. Other models are left alone.
pub fn ensure_base(model_dir: &Path, spec: &str, sink: &dyn EventSink) -> Result<()> {
    if model_dir.join("config.json").is_file() {
        return Ok(());
    }
    let restored = if let Some(name) = spec.strip_prefix(OLLAMA_PREFIX) {
        import_ollama(name, &ollama_stores(), &bases_dir(), sink)?
    } else if is_gguf(Path::new(spec)) {
        import(Path::new(spec), &bases_dir(), sink)?
    } else {
        return Ok(());
    };
    if restored != model_dir {
        return Err(Error::model(
            model_dir,
            format!(
                "this run's base was read from {spec}, which has changed since the run started (it now reads into {}): the run's adapter belongs to the old weights; restore that file, or start a new run",
                restored.display()
            ),
        ));
    }
    Ok(())
}

/// The model folder for `gguf`, read into `bases` first unless a folder read from the
/// same unchanged file is there already.
pub fn import(gguf: &Path, bases: &Path, sink: &dyn EventSink) -> Result<PathBuf> {
    let stem = gguf
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    import_as(gguf, &stem, bases, sink)
}

/// [`import`] into a folder named after `label`.
fn import_as(gguf: &Path, label: &str, bases: &Path, sink: &dyn EventSink) -> Result<PathBuf> {
    let id = identity(gguf)?;
    let key: String = Sha256::digest(id.to_string().as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    let dest = bases.join(format!("{safe}-{key}"));
    let source = dest.join("source.json");
    if let Ok(text) = std::fs::read_to_string(&source) {
        if serde_json::from_str::<Json>(&text).ok().as_ref() == Some(&id) {
            return Ok(dest);
        }
    }
    std::fs::create_dir_all(bases).map_err(|e| Error::io(bases, e))?;
    sink.emit(Event::Log {
        level: LogLevel::Info,
        message: format!(
            "reading the GGUF base {} into {} (once per file)",
            gguf.display(),
            dest.display()
        ),
    });
    let file = GgufFile::open(gguf)?;
    crate::fsx::write_dir(&dest, |tmp| {
        write_folder(&file, tmp, sink)?;
        crate::fsx::write_atomic(&tmp.join("source.json"), id.to_string().as_bytes())
    })?;
    Ok(dest)
}

fn u(g: &GgufFile, key: &str) -> Option<u64> {
    g.get(key).and_then(Meta::as_u64)
}

fn f(g: &GgufFile, key: &str) -> Option<f64> {
    g.get(key).and_then(Meta::as_f64)
}

/// config.json as transformers writes it for the architecture.
fn config(g: &GgufFile) -> Result<(Json, &'static str)> {
    let path = g.path();
    let arch = g
        .get("general.architecture")
        .and_then(Meta::as_str)
        .unwrap_or("");
    let (hf_arch, model_type): (_, &'static str) = match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
        other => {
            return Err(Error::model(
                path,
                format!(
                    "its architecture is `{other}`; GGUF bases of llama (Llama, Mistral, SmolLM), qwen2 and qwen3 can be trained so far"
                ),
            ))
        }
    };
    let need = |key: &str| {
        u(g, &format!("{arch}.{key}")).ok_or_else(|| {
            Error::model(path, format!("`{arch}.{key}` is missing from its metadata"))
        })
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::model(path, "token_embd.weight is missing"))?;
    let vocab = embd.ne.get(1).copied().unwrap_or(0);
    let head_dim = u(g, &format!("{arch}.attention.key_length")).unwrap_or(hidden / heads.max(1));
    let mut c = json!({
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": need("block_count")?,
        "intermediate_size": need("feed_forward_length")?,
        "num_attention_heads": heads,
        "num_key_value_heads": u(g, &format!("{arch}.attention.head_count_kv")).unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": f(g, &format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": f(g, &format!("{arch}.rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": u(g, &format!("{arch}.context_length")).unwrap_or(2048),
        "vocab_size": vocab,
        "tie_word_embeddings": g.tensor("output.weight").is_none(),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    if arch == "qwen2" {
        c["attention_bias"] = json!(true);
    }
    if g.get(&format!("{arch}.rope.scaling.type"))
        .and_then(Meta::as_str)
        == Some("linear")
    {
        let factor = f(g, &format!("{arch}.rope.scaling.factor")).unwrap_or(1.0);
        c["rope_scaling"] = json!({"type": "linear", "factor": factor});
    }
    if let Some(t) = g.tensor("rope_freqs.weight") {
        c["rope_scaling"] = llama3_scaling(g, t, &c)?;
    }
    Ok((c, model_type))
}

/// Llama 3's rope scaling back from the per-frequency factors llama.cpp stores
/// (`rope_freqs.weight`): the factor is their largest value, and the other parameters
/// are the ones among Llama 3.x's (low 1; high 4, 2 or 8; original context a power of
/// two) whose factors equal the file's. Parameters that give the same factors give the
/// same model, so the first that fits is taken.
fn llama3_scaling(g: &GgufFile, t: &TensorEntry, config: &Json) -> Result<Json> {
    let path = g.path();
    let stored = g.read_f32(t)?;
    let factor = stored.iter().copied().fold(1f32, f32::max) as f64;
    let factors_of = |scaling: &Json| -> Option<Vec<f64>> {
        let mut c = config.clone();
        c["rope_scaling"] = scaling.clone();
        let scaled = crate::model::ModelConfig::from_json(&c, path).ok()?;
        c["rope_scaling"] = Json::Null;
        let plain = crate::model::ModelConfig::from_json(&c, path).ok()?;
        let (a, b) = (
            crate::model::inv_freq(&plain),
            crate::model::inv_freq(&scaled),
        );
        Some(a.iter().zip(&b).map(|(x, y)| x / y).collect())
    };
    for high in [4.0, 2.0, 8.0] {
        for log2 in 8..=18 {
            let scaling = json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": high, "original_max_position_embeddings": 1u64 << log2});
            let Some(want) = factors_of(&scaling) else {
                continue;
            };
            let fits = want.len() == stored.len()
                && want
                    .iter()
                    .zip(&stored)
                    .all(|(w, &s)| (w - s as f64).abs() <= 1e-4 * w.abs().max(1.0));
            if fits {
                return Ok(scaling);
            }
        }
    }
    Err(Error::model(
        path,
        "its rope-scaling factors (rope_freqs.weight) are not Llama 3's scaling with any usual parameters: use the model's Hugging Face folder instead",
    ))
}

/// Our (Hugging Face) name for a llama.cpp tensor name: the exporter's table, read the
/// other way.
fn hf_name(gguf: &str) -> Option<String> {
    use crate::export::gguf::{LAYER_NAMES, MODEL_NAMES};
    if let Some((h, _)) = MODEL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (mapped, _) = LAYER_NAMES.iter().find(|(_, g)| *g == name)?;
    Some(format!("model.layers.{layer}.{mapped}"))
}

/// Undoes llama.cpp's rotary permutation of a q or k weight (rows interleaved per head
/// as [first half, second half] pairs): the inverse of the exporter's `permute_rows`.
/// `cols` is the length of a row in `values`' elements: values for floats, bytes for
/// ggml blocks (rows of blocks move as wholes).
fn unpermute_rows<T: Copy + Default>(
    values: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Vec<T> {
    let head = rows / heads.max(1);
    let half = head / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for i in 0..half {
            for part in 0..2 {
                let src = h * head + 2 * i + part;
                let dst = h * head + part * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn write_folder(g: &GgufFile, dir: &Path, sink: &dyn EventSink) -> Result<()> {
    let path = g.path();
    let (config, arch) = config(g)?;
    let (tokenizer, bos, eos) = tokenizer::rebuild(g)?;
    let text = tokenizer.to_string();
    // The rebuilt tokenizer must load as the rest of the engine will load it.
    tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| {
        Error::model(
            path,
            format!("its vocabulary does not make a tokenizer: {e}"),
        )
    })?;
    let write = |name: &str, bytes: &[u8]| crate::fsx::write_atomic(&dir.join(name), bytes);
    write("config.json", config.to_string().as_bytes())?;
    write("tokenizer.json", text.as_bytes())?;
    let chat_template = g.get("tokenizer.chat_template").and_then(Meta::as_str);
    let adds_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Meta::as_bool)
        .unwrap_or(false);
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(Meta::as_array)
        .unwrap_or(&[]);
    let pad = u(g, "tokenizer.ggml.padding_token_id")
        .and_then(|i| tokens.get(i as usize))
        .and_then(Meta::as_str);
    let mut tc = json!({
        "bos_token": bos, "eos_token": eos, "add_bos_token": adds_bos,
        "add_eos_token": false, "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = chat_template {
        tc["chat_template"] = json!(t);
    }
    if let Some(p) = pad {
        tc["pad_token"] = json!(p);
    }
    write("tokenizer_config.json", tc.to_string().as_bytes())?;
    let eos_ids: Vec<u64> = match g
        .get("tokenizer.ggml.eos_token_ids")
        .and_then(Meta::as_array)
    {
        Some(ids) => ids.iter().filter_map(Meta::as_u64).collect(),
        None => u(g, "tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    let mut gen = json!({"eos_token_id": eos_ids});
    if let Some(b) = u(g, "tokenizer.ggml.bos_token_id") {
        gen["bos_token_id"] = json!(b);
    }
    write("generation_config.json", gen.to_string().as_bytes())?;
    // The file's preset (llama.cpp's `llama_ftype`), so an export can default to it.
    if let Some(ft) = u(g, "general.file_type") {
        write(FILE_TYPE, json!({ "file_type": ft }).to_string().as_bytes())?;
    }

    let heads = config["num_attention_heads"].as_u64().unwrap_or(1) as usize;
    let kv_heads = config["num_key_value_heads"].as_u64().unwrap_or(1) as usize;
    let wanted: Vec<(&TensorEntry, String)> = g
        .tensors
        .iter()
        .filter_map(|t| hf_name(&t.name).map(|n| (t, n)))
        .collect();
    // Every tensor is copied as the file stores it: floats as floats, 2-D quantized
    // tensors as their ggml blocks (`quant::stored`), so nothing is widened and the
    // folder is about the file's size. Only a quantized 1-D tensor (none in
    // llama.cpp's files) is decoded.
    let mut plan = Vec::new();
    let mut slots = Vec::new();
    for (t, name) in &wanted {
        let ty = g.value_type(t)?;
        // ggml dims are fastest first: (cols, rows) for a matrix.
        let shape: Vec<usize> = t.ne.iter().rev().map(|&d| d as usize).collect();
        let permute = arch == "llama"
            && shape.len() == 2
            && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight"));
        let permute = permute.then(|| {
            if name.contains("q_proj") {
                heads
            } else {
                kv_heads
            }
        });
        let (dtype, stored_shape, keep) = match ty {
            GgmlType::F32 => ("F32", shape.clone(), true),
            GgmlType::F16 => ("F16", shape.clone(), true),
            GgmlType::Bf16 => ("BF16", shape.clone(), true),
            _ if shape.len() == 2 => {
                let stored = crate::quant::stored::stored_shape(ty, &shape)
                    .map_err(|e| Error::model(path, format!("tensor `{}`: {e}", t.name)))?;
                ("U8", stored.to_vec(), true)
            }
            _ => ("F32", shape.clone(), false),
        };
        let bytes = if keep { t.bytes } else { 4 * t.elements() };
        slots.push(crate::fsx::TensorSlot {
            name: name.clone(),
            dtype,
            shape: stored_shape.clone(),
            bytes,
        });
        plan.push(Some((*t, keep, permute, stored_shape)));
        if dtype == "U8" {
            slots.push(crate::fsx::TensorSlot {
                name: format!("{name}{}", crate::quant::stored::TYPE_SUFFIX),
                dtype: "U8",
                shape: vec![1],
                bytes: 1,
            });
            plan.push(None);
        }
    }
    let total = wanted.len() as u64;
    let mut done = 0;
    crate::fsx::write_safetensors_streamed(&dir.join("model.safetensors"), &slots, |i, out| {
        let Some((t, keep, permute, stored_shape)) = &plan[i] else {
            // The companion of the blocks tensor just written.
            let ty = plan[i - 1].as_ref().map_or(0, |(t, ..)| t.ty) as u8;
            return out.write_all(&[ty]).map_err(|e| Error::io(path, e));
        };
        let bytes = if *keep {
            let raw = g.read_raw(t)?;
            match permute {
                Some(h) => {
                    let rows = stored_shape[0];
                    unpermute_rows(&raw, rows, raw.len() / rows.max(1), *h)
                }
                None => raw,
            }
        } else {
            g.read_f32(t)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        out.write_all(&bytes).map_err(|e| Error::io(path, e))?;
        done += 1;
        sink.emit(Event::Progress {
            stage: "read gguf".into(),
            done,
            total,
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_undoes_the_exporters_permutation() {
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let permuted = crate::export::base_reader::permute_rows(&v, 12, 2, 3);
        assert_eq!(unpermute_rows(&permuted, 12, 2, 3), v);
    }

    #[test]
    fn names_map_back_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
