//! Chat templates, tokenization and loss masks on the fixture models, checked against
//! strings written from the templates' semantics (and, in tests/python, against
//! transformers' own apply_chat_template).

mod common;

use std::path::Path;

use backpropagate::data::{
    encode_all, pack, prepare, read_jsonl, ChatTemplate, Content, DataError, EncodeOptions,
    Encoded, Encoder, Format, Message, PrepareOptions, ReadOptions, Role, Sample, TemplateSource,
    TrainOn, IGNORE_INDEX,
};
use backpropagate::fixture::Family;
use common::{fixture, samples_dir};

fn chat(turns: &[(Role, &str)]) -> Sample {
    Sample {
        line: 7,
        content: Content::Chat(turns.iter().map(|(r, c)| Message::new(*r, *c)).collect()),
    }
}

fn encoder(family: Family) -> Encoder {
    Encoder::from_model_dir(fixture(family)).unwrap()
}

/// The text of the tokens that carry loss, specials included.
fn trained_text(enc: &Encoder, e: &Encoded) -> String {
    let ids: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    enc.tokenizer().decode(&ids, false).unwrap()
}

fn render(enc: &Encoder, s: &Sample) -> String {
    match &s.content {
        Content::Chat(m) => enc.template().render(m, false).unwrap(),
        Content::Text(t) => t.clone(),
    }
}

#[test]
fn qwen2_template_matches_hf_rendering() {
    let enc = encoder(Family::Qwen2);
    assert!(
        matches!(enc.template().source(), TemplateSource::File(p) if p.ends_with("tokenizer_config.json"))
    );
    let s = chat(&[(Role::User, "Hi there"), (Role::Assistant, "Hello!")]);
    assert_eq!(
        render(&enc, &s),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
    let with_system = chat(&[
        (Role::System, "Be brief."),
        (Role::User, "Q"),
        (Role::Assistant, "A"),
    ]);
    assert_eq!(
        render(&enc, &with_system),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    );
    let Content::Chat(m) = &s.content else {
        unreachable!()
    };
    assert!(enc
        .template()
        .render(&m[..1], true)
        .unwrap()
        .ends_with("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"));
}

#[test]
fn llama3_template_matches_hf_rendering() {
    let enc = encoder(Family::Llama);
    let s = chat(&[
        (Role::System, "Be brief."),
        (Role::User, "  Hi there \n"),
        (Role::Assistant, "Hello!"),
    ]);
    assert_eq!(
        render(&enc, &s),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    );
}

#[test]
fn loss_mask_covers_only_assistant_replies_and_their_end_token() {
    let s = chat(&[
        (Role::User, "What is two plus two?"),
        (Role::Assistant, "Four."),
        (Role::User, "And three plus three?"),
        (Role::Assistant, "Six."),
    ]);
    let opts = EncodeOptions::default();
    let enc = encoder(Family::Qwen2);
    let e = enc.encode(&s, &opts).unwrap();
    assert_eq!(trained_text(&enc, &e), "Four.<|im_end|>\nSix.<|im_end|>\n");
    assert_eq!(e.line, 7);

    let enc = encoder(Family::Llama);
    let e = enc.encode(&s, &opts).unwrap();
    assert_eq!(trained_text(&enc, &e), "Four.<|eot_id|>Six.<|eot_id|>");
    // The template writes BOS itself; tokenizing must not add a second one.
    let bos = enc.tokenizer().token_to_id("<|begin_of_text|>").unwrap();
    assert_eq!(e.input_ids[0], bos);
    assert_eq!(e.input_ids.iter().filter(|&&t| t == bos).count(), 1);
    // Token ids decode back to exactly the rendered text.
    assert_eq!(
        enc.tokenizer().decode(&e.input_ids, false).unwrap(),
        render(&enc, &s)
    );
}

#[test]
fn train_on_all_keeps_every_label() {
    let enc = encoder(Family::Qwen2);
    let s = chat(&[(Role::User, "Q"), (Role::Assistant, "A")]);
    let e = enc
        .encode(
            &s,
            &EncodeOptions {
                train_on: TrainOn::All,
                ..EncodeOptions::default()
            },
        )
        .unwrap();
    assert_eq!(
        e.labels,
        e.input_ids.iter().map(|&t| t as i32).collect::<Vec<_>>()
    );
}

#[test]
fn text_samples_get_bos_from_the_tokenizer_and_eos_appended() {
    let enc = encoder(Family::Llama);
    let s = Sample {
        line: 1,
        content: Content::Text("A short story.".into()),
    };
    let e = enc.encode(&s, &EncodeOptions::default()).unwrap();
    let decoded = enc.tokenizer().decode(&e.input_ids, false).unwrap();
    assert_eq!(decoded, "<|begin_of_text|>A short story.<|eot_id|>");
    assert_eq!(e.trainable_tokens(), e.input_ids.len());

    let enc = encoder(Family::Qwen2);
    let e = enc.encode(&s, &EncodeOptions::default()).unwrap();
    assert_eq!(
        enc.tokenizer().decode(&e.input_ids, false).unwrap(),
        "A short story.<|im_end|>"
    );
}

#[test]
fn long_samples_are_truncated_and_counted() {
    let dir = samples_dir();
    let opts = PrepareOptions {
        encode: EncodeOptions {
            max_seq_len: 48,
            train_on: TrainOn::Assistant,
        },
        ..PrepareOptions::default()
    };
    let p = prepare(&dir.join("alpaca.jsonl"), fixture(Family::Qwen2), &opts).unwrap();
    assert!(p
        .encoded
        .iter()
        .all(|e| e.input_ids.len() <= 48 && e.labels.len() == e.input_ids.len()));
    let truncated = p.encoded.iter().filter(|e| e.full_len > 48).count();
    assert!(truncated > 0);
    assert_eq!(p.stats.truncated, truncated);
    // With the Qwen2 system prompt, 48 tokens leave no room for many answers.
    assert_eq!(
        p.stats.no_trainable,
        p.encoded
            .iter()
            .filter(|e| e.trainable_tokens() == 0)
            .count()
    );
    if p.stats.no_trainable > 0 {
        assert!(p
            .warnings
            .iter()
            .any(|w| w.message.contains("no trainable tokens")));
    }
}

#[test]
fn sample_stats_are_consistent() {
    let p = prepare(
        &samples_dir().join("messages.jsonl"),
        fixture(Family::Llama),
        &PrepareOptions::default(),
    )
    .unwrap();
    let s = &p.stats;
    assert_eq!(s.format, Format::Messages);
    assert_eq!(s.samples, 200);
    assert!(s.len_min <= s.len_median && s.len_median <= s.len_p95 && s.len_p95 <= s.len_max);
    assert!(s.len_min > 10, "{s}");
    assert_eq!(s.truncated, 0);
    assert_eq!(
        s.total_tokens,
        p.encoded.iter().map(|e| e.input_ids.len()).sum::<usize>()
    );
    assert!(s.trainable_tokens * 5 > s.total_tokens / 5 && s.trainable_tokens < s.total_tokens);
    let shown = s.to_string();
    assert!(shown.contains("samples:          200"), "{shown}");
}

#[test]
fn template_errors_are_reported_per_line() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(fixture(Family::Qwen2), dir.path());
    set_template(
        dir.path(),
        Some("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}"),
    );
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"output\": \"b\", \"system\": \"s\"}\n",
    )
    .unwrap();
    let err = prepare(&data, dir.path(), &PrepareOptions::default()).unwrap_err();
    let backpropagate::Error::Data(DataError::Invalid { problems, .. }) = err else {
        panic!("{err}")
    };
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, 2);
    assert_eq!(
        problems[0].message,
        "the chat template raised: System role not supported"
    );
}

#[test]
fn a_model_without_template_falls_back_to_chatml_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(fixture(Family::Qwen2), dir.path());
    set_template(dir.path(), None);
    let enc = Encoder::from_model_dir(dir.path()).unwrap();
    assert!(enc.template().is_fallback());
    let raw = read_jsonl(&samples_dir().join("alpaca.jsonl"), &ReadOptions::default()).unwrap();
    let p = encode_all(raw, &enc, &PrepareOptions::default()).unwrap();
    assert_eq!(p.template, TemplateSource::FallbackChatml);
    assert!(p
        .warnings
        .iter()
        .any(|w| w.message.contains("no chat template")));
    let e = &p.encoded[0];
    assert!(trained_text(&enc, e).ends_with("<|im_end|>\n"));
}

#[test]
fn a_chat_template_jinja_file_wins_over_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(fixture(Family::Qwen2), dir.path());
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
    assert_eq!(
        t.render(&[Message::new(Role::User, "x")], false).unwrap(),
        "<user>x"
    );
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Encoder::from_model_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing tokenizer.json"), "{err}");
    let err = Encoder::from_model_dir(&dir.path().join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a model folder"), "{err}");
}

#[test]
fn packing_real_samples_fills_rows() {
    let p = prepare(
        &samples_dir().join("alpaca.jsonl"),
        fixture(Family::Qwen2),
        &PrepareOptions::default(),
    )
    .unwrap();
    let rows = pack(&p.encoded, 512);
    let total: usize = p.encoded.iter().map(|e| e.input_ids.len()).sum();
    assert_eq!(rows.iter().map(|r| r.input_ids.len()).sum::<usize>(), total);
    assert!(rows.len() < p.encoded.len() / 3, "{} rows", rows.len());
    assert!(rows.iter().all(|r| r.input_ids.len() <= 512));
}

#[test]
fn fixture_models_are_deterministic() {
    for family in [Family::Llama, Family::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        backpropagate::fixture::write_fixture_model(
            dir.path(),
            &backpropagate::fixture::FixtureSpec::new(family),
        )
        .unwrap();
        for file in [
            "tokenizer.json",
            "model.safetensors",
            "config.json",
            "tokenizer_config.json",
        ] {
            assert_eq!(
                std::fs::read(dir.path().join(file)).unwrap(),
                std::fs::read(fixture(family).join(file)).unwrap(),
                "{family:?} {file}"
            );
        }
    }
}

#[test]
fn fixture_vocab_matches_the_tokenizer() {
    for family in [Family::Llama, Family::Qwen2] {
        let dir = fixture(family);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let enc = Encoder::from_model_dir(dir).unwrap();
        let vocab = enc.tokenizer().get_vocab_size(true);
        assert_eq!(config["vocab_size"], vocab);
        assert!(vocab > 500, "{vocab}");
    }
}

fn copy_model(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn set_template(dir: &Path, template: Option<&str>) {
    let path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    match template {
        Some(t) => config["chat_template"] = t.into(),
        None => {
            config.as_object_mut().unwrap().remove("chat_template");
        }
    }
    std::fs::write(&path, config.to_string()).unwrap();
}
