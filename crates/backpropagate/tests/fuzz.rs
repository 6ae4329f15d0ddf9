//! Bounded fuzzing of the three parsers that take files from strangers: the JSONL
//! dataset reader, chat-template compilation and rendering, and a model folder's
//! `config.json` and safetensors headers. Each property is "never panics, never
//! aborts, never hangs": every input ends in `Ok` or a typed error within a time
//! budget. CI runs a fixed number of cases from a fixed seed (`FUZZ_CASES`,
//! `FUZZ_SEED` change both), so a failure reproduces from the test's output.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use backpropagate::data::{read_jsonl, ChatTemplate, Message, ReadOptions, Role, TemplateSource};
use backpropagate::fixture::Family;
use backpropagate::model::{CausalLm, ModelConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};

/// How long one case may take. Generous: a debug-ish build on a loaded 2-core CI
/// machine; a hang or an exponential blow-up overshoots it by orders of magnitude.
const BUDGET: Duration = Duration::from_secs(10);

fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6261_636b_7072_6f70);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        // A failing case is printed as found; shrinking slow cases would take minutes.
        max_shrink_time: 20_000,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    )
}

fn within_budget<T>(what: &str, input: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(
        took < BUDGET,
        "{what} took {took:?} (budget {BUDGET:?}) on input:\n{input}"
    );
    out
}

// ---------------------------------------------------------------- JSONL reader

/// One line of a dataset as an attacker or a careless user writes it: a valid
/// record of each format, records with wrong types, duplicate keys, control
/// characters, deep nesting, invalid UTF-8, or noise.
fn jsonl_line() -> impl Strategy<Value = Vec<u8>> {
    let text = "[ -~\\u{1b}\\u{0}\\u{7f}\\u{85}\\u{2028}é中😀]{0,40}";
    prop_oneof![
        (text, text).prop_map(|(i, o)| {
            json!({"instruction": i, "output": o})
                .to_string()
                .into_bytes()
        }),
        (text, text).prop_map(|(u, a)| json!({"messages": [
            {"role": "user", "content": u}, {"role": "assistant", "content": a}
        ]})
        .to_string()
        .into_bytes()),
        (text, text).prop_map(|(u, a)| json!({"conversations": [
            {"from": "human", "value": u}, {"from": "gpt", "value": a}
        ]})
        .to_string()
        .into_bytes()),
        (text, text).prop_map(|(p, c)| {
            json!({"prompt": p, "completion": c})
                .to_string()
                .into_bytes()
        }),
        text.prop_map(|t| json!({ "text": t }).to_string().into_bytes()),
        // Wrong shapes and types where strings belong.
        (text, any::<i64>()).prop_map(|(k, n)| {
            format!(r#"{{"messages": [{{"role": {n}, "content": ["{k}"]}}]}}"#).into_bytes()
        }),
        (text, text).prop_map(|(a, b)| {
            format!(r#"{{"text": "{a}", "text": "{b}", "": null}}"#).into_bytes()
        }),
        (1usize..4000).prop_map(|depth| {
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(depth));
            format!(r#"{{"text": {s}}}"#).into_bytes()
        }),
        proptest::collection::vec(any::<u8>(), 0..64),
        Just(b"\xEF\xBB\xBF{\"text\": \"bom\"}\r".to_vec()),
        Just(b"[{\"text\": \"an array\"}]".to_vec()),
    ]
}

#[test]
fn jsonl_reader_never_panics_or_hangs_on_any_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let options = ReadOptions::default();
    runner(256)
        .run(&proptest::collection::vec(jsonl_line(), 0..24), |lines| {
            let bytes = lines.join(&b'\n');
            std::fs::write(&path, &bytes).unwrap();
            let shown = String::from_utf8_lossy(&bytes).into_owned();
            // Ok or a report of bad lines; either way, every line it names exists.
            match within_budget("read_jsonl", &shown, || read_jsonl(&path, &options)) {
                Ok(raw) => prop_assert!(raw.samples.len() <= lines.len().max(1)),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

// ------------------------------------------------------------- chat templates

/// Jinja built from the pieces real templates use and the ones hostile templates
/// abuse: loops over ranges and messages, growing lists and strings, string
/// repetition, recursion through macros, filters, raise_exception.
fn template_expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("messages".to_string()),
        Just("message.content".to_string()),
        Just("message['role']".to_string()),
        Just("bos_token".to_string()),
        Just("x".to_string()),
        Just("[1, 2]".to_string()),
        Just("'ab'".to_string()),
        Just("add_generation_prompt".to_string()),
        (0i64..100_000).prop_map(|n| n.to_string()),
        (0u64..1_000_000_000_000).prop_map(|n| format!("range({n})")),
    ];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} + {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} * {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} ~ {b})")),
            inner.clone().prop_map(|a| format!("({a} | length)")),
            inner.clone().prop_map(|a| format!("({a} | list)")),
            inner.clone().prop_map(|a| format!("({a} | tojson)")),
            inner.clone().prop_map(|a| format!("({a} | join(','))")),
            inner.clone().prop_map(|a| format!("{a}.strip()")),
            (inner.clone(), inner).prop_map(|(a, b)| format!("{a}[{b}]")),
        ]
    })
}

fn template_body() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        template_expr().prop_map(|e| format!("{{{{ {e} }}}}")),
        template_expr().prop_map(|e| format!("{{% set x = {e} %}}")),
        Just("<|im_start|>".to_string()),
        Just("{{ raise_exception('no') }}".to_string()),
        Just("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}".to_string()),
        Just("{{ '{%' }}".to_string()),
        Just("{% generation %}".to_string()),
        Just("{%".to_string()),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            (template_expr(), inner.clone())
                .prop_map(|(e, b)| format!("{{% for message in {e} %}}{b}{{% endfor %}}")),
            (template_expr(), inner.clone(), inner.clone())
                .prop_map(|(e, a, b)| format!("{{% if {e} %}}{a}{{% else %}}{b}{{% endif %}}")),
            (inner.clone(), inner).prop_map(|(a, b)| format!("{a}{b}")),
        ]
    })
}

#[test]
fn chat_templates_never_panic_hang_or_exhaust_memory() {
    let messages = vec![
        Message::new(Role::System, "be brief"),
        Message::new(Role::User, "hello"),
        Message::new(Role::Assistant, "hi"),
    ];
    let specials = || {
        vec![
            ("bos_token", "<s>".to_string()),
            ("eos_token", "</s>".to_string()),
        ]
    };
    runner(512)
        .run(&template_body(), |text| {
            within_budget("chat template", &text, || {
                let source = TemplateSource::File("fuzz/chat_template.jinja".into());
                if let Ok(t) = ChatTemplate::new(&text, source, specials()) {
                    let _ = t.render(&messages, true);
                    let _ = t.render_with_spans(&messages);
                }
            });
            Ok(())
        })
        .unwrap();
}

#[test]
fn chat_template_compiler_never_panics_on_arbitrary_text() {
    runner(256)
        .run(&"[{}%#a-z0-9 ()|.,'\"~+*\\[\\]=-]{0,80}", |text| {
            within_budget("template compile", &text, || {
                let source = TemplateSource::File("fuzz/chat_template.jinja".into());
                if let Ok(t) = ChatTemplate::new(&text, source, Vec::new()) {
                    let _ = t.render(&[Message::new(Role::User, "q")], false);
                }
            });
            Ok(())
        })
        .unwrap();
}

// ------------------------------------------------------ config and safetensors

/// A value that could sit in a config field: sizes from zero to absurd, wrong
/// types, nulls.
fn config_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..70_000).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!(1e9)),
        Just(json!(1e300)),
        Just(json!(-1)),
        Just(json!(0.5)),
        Just(Value::Null),
        Just(json!("32")),
        Just(json!([1, 2])),
        Just(json!({"type": "llama3", "factor": 1e308})),
    ]
}

#[test]
fn model_config_parsing_never_panics_on_hostile_fields() {
    let fixture = common::fixture(Family::Qwen2);
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
    let path = Path::new("fuzz/config.json");
    runner(512)
        .run(
            &proptest::collection::vec((0..keys.len(), config_value()), 1..6),
            |edits| {
                let mut cfg = base.clone();
                for (k, v) in &edits {
                    cfg[&keys[*k]] = v.clone();
                }
                let shown = cfg.to_string();
                within_budget("ModelConfig::from_json", &shown, || {
                    if let Ok(c) = ModelConfig::from_json(&cfg, path) {
                        // Whatever parses must be usable for sizing without overflow.
                        let _ = c.parameter_count();
                    }
                });
                Ok(())
            },
        )
        .unwrap();
}

/// A safetensors file whose JSON header lies: wrong dtypes, shapes that overflow,
/// offsets past the end or overlapping, and a header length that does not fit.
fn safetensors_bytes() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just("F32"),
        Just("F16"),
        Just("BF16"),
        Just("U8"),
        Just("I64"),
        Just("F8_E4M3"),
        Just("X"),
    ];
    let dim = prop_oneof![0u64..300, any::<u64>()];
    let tensor = (
        dtype,
        proptest::collection::vec(dim, 0..4),
        any::<u16>(),
        any::<u16>(),
    );
    (
        proptest::collection::vec(tensor, 0..4),
        0usize..512,
        any::<bool>(),
    )
        .prop_map(|(tensors, data_len, lie_about_length)| {
            let mut header = serde_json::Map::new();
            for (i, (dtype, shape, a, b)) in tensors.into_iter().enumerate() {
                let name = if i == 0 {
                    "model.embed_tokens.weight".to_string()
                } else {
                    format!("model.layers.{i}.self_attn.q_proj.weight")
                };
                header.insert(
                    name,
                    json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}),
                );
            }
            let header = Value::Object(header).to_string().into_bytes();
            let declared = if lie_about_length {
                u64::MAX - 7
            } else {
                header.len() as u64
            };
            let mut bytes = declared.to_le_bytes().to_vec();
            bytes.extend_from_slice(&header);
            bytes.resize(bytes.len() + data_len, 0);
            bytes
        })
}

#[test]
fn safetensors_headers_that_lie_are_refused_not_trusted() {
    let fixture = common::fixture(Family::Qwen2);
    let config = ModelConfig::load(&fixture.join("config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture.join("config.json"), dir.path().join("config.json")).unwrap();
    runner(256)
        .run(&safetensors_bytes(), |bytes| {
            std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
            let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(400)]).into_owned();
            let result = within_budget("CausalLm::validate", &shown, || {
                CausalLm::validate(dir.path(), &config)
            });
            // A random header never describes the whole fixture model.
            prop_assert!(result.is_err());
            Ok(())
        })
        .unwrap();
}
