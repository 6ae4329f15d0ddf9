//! `tokenizer.ggml.pre`: which of llama.cpp's pre-tokenizers (the regexes that split
//! text before BPE) reproduces the model's own. It must come from the tokenizer, not
//! the architecture: a wrong name still loads, and then tokenizes some text
//! differently from the model's tokenizer (SmolLM2 under `llama-bpe`: 32 of our 1 122
//! test texts, indented code and CRLF among them), so an unknown tokenizer is refused,
//! never guessed.
//!
//! Two rules, in order. (1) The pre-tokenizer is literally one llama.cpp implements:
//! byte-level BPE with GPT-2's regex and nothing else (`gpt-2`), or Llama 3's or
//! Qwen2's split regex before it (`llama-bpe`, `qwen2`), with no normalizer but
//! Qwen's NFC. (2) As
//! llama.cpp's converter does: the ids of one fixed text ([`CHECK_TEXT`], encoded as
//! transformers encodes it: after the BOS when the model adds one) hashed as Python
//! prints the list, looked up in the converter's table (the entries for the families
//! we train). Rule 1 first because it is exact by construction: llama.cpp's converter
//! names SmolLM2's plain GPT-2 byte-level tokenizer `smollm` (by hash), whose extra
//! digit split disagrees with transformers on non-ASCII digits (`١٢٣`); `gpt-2` agrees
//! on every test text.

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// llama.cpp's check text (`chktxt` in `convert_hf_to_gguf.py`): whitespace runs,
/// emoji, digits, Khmer, CJK, Cyrillic, quotes and English contractions.
pub const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1f680} (normal) \u{1f636}\u{200d}\u{1f32b}\u{fe0f} (multiple emojis concatenated) \u{2705} \u{1f999}\u{1f999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17b6}\u{1793}\u{17cb}\u{178f}\u{17c2}\u{1796}\u{17b7}\u{179f}\u{17c1}\u{179f}\u{17a2}\u{17b6}\u{1785}\u{1f601} ?\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e} ------======= \u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{411}\u{44a}\u{43b}\u{433}\u{430}\u{440}\u{441}\u{43a}\u{438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// (hash of the check text's ids, llama.cpp's name, a model it was measured on).
const KNOWN: [(&str, &str, &str); 6] = [
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
        "meta-llama/Meta-Llama-3-8B (Llama 3.x)",
    ),
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
        "Qwen/Qwen1.5-7B (Qwen2, Qwen2.5)",
    ),
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
        "Qwen/Qwen3-Embedding-0.6B (Qwen3)",
    ),
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
        "HuggingFaceTB/SmolLM-135M (SmolLM, SmolLM2)",
    ),
    (
        "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e",
        "tekken",
        "mistralai/Mistral-Nemo-Base-2407 (Mistral tekken)",
    ),
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
        "openai-community/gpt2",
    ),
];

/// Llama 3's split regex, as its `tokenizer.json` writes it (digits in threes).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (every digit alone).
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split regexes of llama.cpp's pre-tokenizers as `tokenizer.json` writes them.
const BY_REGEX: [(&str, &str); 2] = [(LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2")];

/// The sha256 (hex) of `ids` printed as a Python list: `[1, 2, 3]`.
pub fn ids_hash(ids: &[u32]) -> String {
    let printed = format!(
        "[{}]",
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Sha256::digest(printed.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The check text's hash for `tokenizer`, with `bos` first when the model adds it.
pub fn check_hash(tokenizer: &tokenizers::Tokenizer, bos: Option<u32>) -> Result<String, String> {
    let enc = tokenizer
        .encode(CHECK_TEXT, false)
        .map_err(|e| format!("cannot encode the check text: {e}"))?;
    let ids: Vec<u32> = bos
        .into_iter()
        .chain(enc.get_ids().iter().copied())
        .collect();
    Ok(ids_hash(&ids))
}

/// llama.cpp's name for the pre-tokenizer of `tokenizer` (whose `tokenizer.json` is
/// `json`), or why there is none.
pub fn detect(
    tokenizer: &tokenizers::Tokenizer,
    json: &Json,
    bos: Option<u32>,
) -> Result<&'static str, String> {
    if let Some(name) = by_structure(json) {
        return Ok(name);
    }
    let hash = check_hash(tokenizer, bos)?;
    if let Some((_, name, _)) = KNOWN.iter().find(|(h, _, _)| *h == hash) {
        return Ok(name);
    }
    let known: Vec<String> = KNOWN
        .iter()
        .map(|(_, name, model)| format!("{name} ({model})"))
        .collect();
    Err(format!(
        "its pre-tokenizer is not one llama.cpp is known to reproduce (check-text hash {hash}; known: {}), so llama.cpp would split text differently from the model's tokenizer; export as merged safetensors instead, or convert with llama.cpp's convert_hf_to_gguf.py if it knows this tokenizer",
        known.join(", ")
    ))
}

/// Rule 1: the llama.cpp pre-tokenizer that is `json`'s own, when it is literally one.
fn by_structure(json: &Json) -> Option<&'static str> {
    // NFC is Qwen's: llama.cpp does not apply it, as its converter accepts for
    // Qwen, so only text that is not already composed (rare) can differ.
    let normalizer = &json["normalizer"];
    let plain = normalizer.is_null()
        || normalizer["type"] == "NFC"
        || (normalizer["type"] == "Sequence"
            && normalizer["normalizers"]
                .as_array()
                .is_some_and(|a| a.is_empty()));
    if !plain {
        return None;
    }
    let pre = &json["pre_tokenizer"];
    let parts: Vec<&Json> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    // ByteLevel's own regex is on unless `use_regex` says false; a prefix space
    // would be one more difference.
    let byte_level = |p: &Json, regex: bool| {
        p["type"] == "ByteLevel"
            && p["add_prefix_space"] != true
            && p["use_regex"].as_bool().unwrap_or(true) == regex
    };
    match parts.as_slice() {
        [only] if byte_level(only, true) => Some("gpt-2"),
        [split, bytes] if split["type"] == "Split" && byte_level(bytes, false) => {
            let regex = split["pattern"]["Regex"].as_str()?;
            let isolated = split["behavior"] == "Isolated" && split["invert"] != true;
            BY_REGEX
                .iter()
                .find(|(r, _)| *r == regex && isolated)
                .map(|(_, name)| *name)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check text is llama.cpp's to the byte (its sha256, computed from the text
    /// that reproduces the SmolLM2 hash with transformers), and ids print as Python
    /// prints a list.
    #[test]
    fn the_check_text_and_the_hash_rule_are_llama_cpps() {
        let text = Sha256::digest(CHECK_TEXT.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(
            text,
            "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
        );
        assert_eq!(
            ids_hash(&[1, 22, 333]),
            format!("{:x}", Sha256::digest(b"[1, 22, 333]"))
        );
        assert_eq!(ids_hash(&[]), format!("{:x}", Sha256::digest(b"[]")));
    }

    /// Only pre-tokenizers llama.cpp implements literally are named by structure: a
    /// normalizer (but NFC), a prefix space, another regex or another split behaviour
    /// is not.
    #[test]
    fn structures_are_named_only_when_exact() {
        let split = |regex: &str, behavior: &str| {
            serde_json::json!({"normalizer": null, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}
            ]}})
        };
        assert_eq!(
            by_structure(&split(LLAMA3_SPLIT, "Isolated")),
            Some("llama-bpe")
        );
        assert_eq!(by_structure(&split(QWEN2_SPLIT, "Isolated")), Some("qwen2"));
        assert_eq!(by_structure(&split(QWEN2_SPLIT, "Removed")), None);
        assert_eq!(by_structure(&split("a|b", "Isolated")), None);
        let gpt2 = serde_json::json!({"normalizer": {"type": "Sequence", "normalizers": []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}});
        assert_eq!(by_structure(&gpt2), Some("gpt-2"));
        let mut spaced = gpt2.clone();
        spaced["pre_tokenizer"]["add_prefix_space"] = true.into();
        assert_eq!(by_structure(&spaced), None);
        let mut normalized = gpt2;
        normalized["normalizer"] = serde_json::json!({"type": "NFC"});
        assert_eq!(by_structure(&normalized), Some("gpt-2"));
        normalized["normalizer"] = serde_json::json!({"type": "Lowercase"});
        assert_eq!(by_structure(&normalized), None);
    }
}
