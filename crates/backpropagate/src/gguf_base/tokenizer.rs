//! A Hugging Face `tokenizer.json` rebuilt from a GGUF's vocabulary, so the rest of the
//! engine (data checks, chat templates, masks, exports) reads a GGUF base as any model
//! folder. Byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizer its
//! `tokenizer.ggml.pre` names; SentencePiece vocabularies (`llama`) are refused with
//! what to use instead.

use serde_json::{json, Map, Value as Json};

use super::reader::{GgufFile, Meta};
use crate::error::{Error, Result};
use crate::export::pre_tokenizer::{LLAMA3_SPLIT, QWEN2_SPLIT};

/// Token types of llama.cpp's vocab.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The pre-tokenizer and normalizer of the HF tokenizers that llama.cpp's names stand
/// for. `smollm` is what llama.cpp's converter names SmolLM's plain GPT-2 byte-level
/// tokenizer (by its check hash), so it maps back to that.
fn pre_tokenizer(pre: &str) -> Option<(Json, Json, bool)> {
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]})
    };
    Some(match pre {
        "gpt-2" | "smollm" => (
            Json::Null,
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            false,
        ),
        // Llama 3's tokenizer takes a word that is in the vocabulary whole.
        "llama-bpe" => (Json::Null, split(LLAMA3_SPLIT), true),
        "qwen2" => (json!({"type": "NFC"}), split(QWEN2_SPLIT), false),
        _ => return None,
    })
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Option<Vec<&'a str>> {
    g.get(key)?.as_array()?.iter().map(Meta::as_str).collect()
}

/// `tokenizer.json` for the GGUF's vocabulary, and the BOS and EOS token texts.
pub fn rebuild(g: &GgufFile) -> Result<(Json, Option<String>, Option<String>)> {
    let path = g.path();
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Meta::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(Error::model(
            path,
            format!(
                "its vocabulary is `{model}` (SentencePiece-style); GGUF bases with byte-level BPE vocabularies (Llama 3, Qwen, SmolLM, GPT-2 style) can be trained so far: use the model's Hugging Face folder instead"
            ),
        ));
    }
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Meta::as_str)
        .unwrap_or("default");
    let Some((normalizer, pre_tokenizer, ignore_merges)) = pre_tokenizer(pre) else {
        return Err(Error::model(
            path,
            format!(
                "its pre-tokenizer `{pre}` is not one Backpropagate can rebuild (gpt-2, smollm, llama-bpe, qwen2), so text would be split differently from how the model was trained: use the model's Hugging Face folder instead"
            ),
        ));
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")
        .ok_or_else(|| Error::model(path, "tokenizer.ggml.tokens is missing"))?;
    let merges = strings(g, "tokenizer.ggml.merges")
        .ok_or_else(|| Error::model(path, "tokenizer.ggml.merges is missing"))?;
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(Meta::as_array)
        .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, &t) in tokens.iter().enumerate() {
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty != CONTROL, "special": ty == CONTROL,
            }));
        }
        if vocab.insert(t.to_string(), json!(id)).is_some() {
            return Err(Error::model(
                path,
                format!("token {t:?} appears twice in tokenizer.ggml.tokens"),
            ));
        }
    }
    let token_of = |key: &str| {
        g.get(key)
            .and_then(Meta::as_u64)
            .and_then(|id| tokens.get(id as usize))
            .map(|t| t.to_string())
    };
    let bos = token_of("tokenizer.ggml.bos_token_id");
    let eos = token_of("tokenizer.ggml.eos_token_id");
    let adds_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Meta::as_bool)
        .unwrap_or(false);
    let post_processor = match (&bos, adds_bos) {
        (Some(b), true) => {
            let id = tokens.iter().position(|t| t == b).unwrap_or(0);
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [id], "tokens": [b]}}})
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    });
    Ok((tokenizer, bos, eos))
}
