//! Hostile datasets, chat templates and model configs: each fails fast with an error
//! that names the file, line or field, instead of spinning, blocking or allocating
//! without bound.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backpropagate::data::{
    encode_all, read_jsonl, Content, EncodeOptions, Encoder, Message, PrepareOptions, ReadOptions,
    Role, Sample, Severity, TrainOn, IGNORE_INDEX,
};
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};
use backpropagate::model::{CausalLm, ModelConfig};
use common::fixture;

/// A copy of the qwen2 fixture whose chat template is `template`.
fn model_with_template(dir: &Path, template: &str) -> PathBuf {
    let model = dir.join("model");
    write_fixture_model(&model, &FixtureSpec::new(Family::Qwen2)).unwrap();
    std::fs::write(model.join("chat_template.jinja"), template).unwrap();
    model
}

fn chat(turns: &[(Role, &str)]) -> Sample {
    Sample {
        line: 3,
        content: Content::Chat(turns.iter().map(|(r, c)| Message::new(*r, *c)).collect()),
    }
}

fn encode_error(template: &str) -> (String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_template(dir.path(), template);
    let enc = Encoder::from_model_dir(&model).unwrap();
    let start = Instant::now();
    let d = enc
        .encode(
            &chat(&[(Role::User, "hi"), (Role::Assistant, "yo")]),
            &EncodeOptions::default(),
        )
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(d.line, 3, "{d}");
    assert!(d.message.contains("chat_template.jinja"), "{d}");
    (d.message, took)
}

/// Peak resident memory of this process so far, in bytes (Linux).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
fn list_doubling_template_fails_fast_naming_the_template_file() {
    let before = peak_rss();
    let (message, took) = encode_error(
        "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x|length }}",
    );
    assert!(message.contains("larger than"), "{message}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 1 << 30, "peak RSS grew by {} MiB", grown >> 20);
}

#[test]
fn string_doubling_template_fails_fast() {
    let (message, took) = encode_error(
        "{%- set ns = namespace(s='ab') -%}{%- for i in range(60) -%}{%- set ns.s = ns.s ~ ns.s -%}{%- endfor -%}{{ ns.s }}",
    );
    assert!(message.contains("larger than"), "{message}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn nested_loop_template_runs_out_of_fuel_naming_the_template_file() {
    let (message, took) = encode_error(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    );
    assert!(message.contains("instructions"), "{message}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn output_flood_template_stops_at_the_output_limit() {
    let (message, took) =
        encode_error("{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}");
    assert!(message.contains("wrote more than"), "{message}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn guarded_assignments_render_exactly_as_before() {
    // `set` and `with` values pass through the size guard unchanged: namespaces,
    // tuples, undefined values, whitespace control and filters all behave as jinja2
    // (the expected string is jinja2 3.1's output for this template).
    let dir = tempfile::tempdir().unwrap();
    let template = "{%- set ns = namespace(n=0, text='') -%}\n{%- set a, b = 1, 2 -%}\n{%- set missing = messages[0].nope %}{% if missing is defined %}DEFINED{% endif %}\n{%- for m in messages %}\n  {%- set ns.n = ns.n + 1 -%}\n  {%- set ns.text = ns.text ~ m.content|upper ~ ',' -%}\n  {%- with r = m.role, c = m.content %}[{{ r }}:{{ c }}]{% endwith %}\n{% endfor -%}\n{{ ns.n }}|{{ ns.text }}|{{ a + b }}";
    let model = model_with_template(dir.path(), template);
    let enc = Encoder::from_model_dir(&model).unwrap();
    let messages = vec![
        Message::new(Role::User, "q"),
        Message::new(Role::Assistant, "a"),
    ];
    assert_eq!(
        enc.template().render(&messages, false).unwrap(),
        "[user:q][assistant:a]2|Q,A,|3"
    );
}

#[test]
fn ten_thousand_turn_record_encodes_fast_with_the_same_masks() {
    let enc = Encoder::from_model_dir(fixture(Family::Qwen2)).unwrap();
    let mut turns = Vec::new();
    for i in 0..5_000 {
        turns.push(Message::new(Role::User, format!("question {i}")));
        turns.push(Message::new(Role::Assistant, format!("answer {i}")));
    }
    let sample = Sample {
        line: 1,
        content: Content::Chat(turns.clone()),
    };
    let options = EncodeOptions {
        max_seq_len: usize::MAX,
        train_on: TrainOn::Assistant,
    };
    let start = Instant::now();
    let e = enc.encode(&sample, &options).unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "10k turns took {took:?}");
    // Every reply and its end-of-turn marker is trained, nothing else.
    let trained: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    let text = enc.tokenizer().decode(&trained, false).unwrap();
    let want: String = (0..5_000)
        .map(|i| format!("answer {i}<|im_end|>\n"))
        .collect();
    assert_eq!(text, want);
    // The same spans as locating each reply by its own prefix renders.
    let rendered = enc.template().render_with_spans(&turns).unwrap();
    for k in [0usize, 17, 2_500, 4_999] {
        let i = 2 * k + 1;
        let p = enc.template().render(&turns[..i], true).unwrap();
        let u = enc.template().render(&turns[..=i], false).unwrap();
        assert_eq!(rendered.assistant[k], p.len()..u.len(), "reply {k}");
    }
}

#[test]
fn too_many_turns_are_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let turns: Vec<String> = (0..20_002)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(r#"{{"role":"{role}","content":"t{i}"}}"#)
        })
        .collect();
    let data = format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"a\"}},{{\"role\":\"assistant\",\"content\":\"b\"}}]}}\n{{\"messages\":[{}]}}\n",
        turns.join(",")
    );
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, data).unwrap();
    let e = read_jsonl(&path, &ReadOptions::default()).unwrap_err();
    let p = &e.problems()[0];
    assert_eq!(p.line, 2, "{p}");
    assert!(p.message.contains("20002 turns"), "{p}");
    assert!(p.hint.as_deref().unwrap().contains("split"), "{p}");
}

#[test]
fn dev_zero_and_a_fifo_are_refused_as_not_regular_files() {
    let start = Instant::now();
    let e = read_jsonl(Path::new("/dev/zero"), &ReadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("must be a regular file"), "{e}");
    assert!(e.to_string().contains("character device"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.jsonl");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = read_jsonl(&fifo, &ReadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("must be a regular file"), "{e}");
    assert!(e.to_string().contains("FIFO"), "{e}");
    let e = read_jsonl(dir.path(), &ReadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("a directory"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_15_mb_line_is_refused_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.jsonl");
    let mut data = String::from("{\"text\": \"short\"}\n{\"text\": \"");
    data.push_str(&"lorem ipsum ".repeat(15_000_000 / 12));
    data.push_str("\"}\n");
    std::fs::write(&path, &data).unwrap();
    drop(data);
    let before = peak_rss();
    let e = read_jsonl(&path, &ReadOptions::default()).unwrap_err();
    let grown = peak_rss().saturating_sub(before);
    let p = &e.problems()[0];
    assert_eq!(p.line, 2, "{p}");
    assert!(p.message.contains("above the limit"), "{p}");
    assert!(p.hint.as_deref().unwrap().contains("split"), "{p}");
    assert!(grown < 200 << 20, "peak RSS grew by {} MiB", grown >> 20);
}

#[test]
fn duplicate_keys_warn_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(
        &path,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"output\": \"b\", \"output\": \"c\"}\n",
    )
    .unwrap();
    let raw = read_jsonl(&path, &ReadOptions::default()).unwrap();
    let w: Vec<_> = raw
        .warnings
        .iter()
        .filter(|w| w.message.contains("more than once"))
        .collect();
    assert_eq!(w.len(), 1, "{:?}", raw.warnings);
    assert_eq!(w[0].line, 2);
    assert_eq!(w[0].severity, Severity::Warning);
    assert!(w[0].message.contains("`output`"), "{}", w[0].message);
}

#[test]
fn token_id_past_the_vocabulary_is_reported_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_fixture_model(&model, &FixtureSpec::new(Family::Qwen2)).unwrap();
    let tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap())
            .unwrap();
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    // Shrink the declared vocabulary below the ids the tokenizer produces.
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap().len();
    config["vocab_size"] = (vocab / 4).into();
    std::fs::write(&config_path, config.to_string()).unwrap();

    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hello world, this is a sample\"}\n").unwrap();
    let enc = Encoder::from_model_dir(&model).unwrap();
    let raw = read_jsonl(&data, &ReadOptions::default()).unwrap();
    let e = encode_all(raw, &enc, &PrepareOptions::default()).unwrap_err();
    let p = &e.problems()[0];
    assert_eq!(p.line, 1, "{p}");
    assert!(p.message.contains("outside the model's vocabulary"), "{p}");
    assert!(p.message.contains("vocab_size"), "{p}");
}

#[test]
fn huge_layer_count_is_refused_before_any_tensor_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_fixture_model(&model, &FixtureSpec::new(Family::Qwen2)).unwrap();
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 1_000_000_000u64.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let start = Instant::now();
    let e = ModelConfig::load(&config_path).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    assert!(e.contains("`num_hidden_layers`"), "{e}");
    assert!(start.elapsed() < Duration::from_millis(500));

    // Within the bounds but more than the checkpoint holds: one line naming the field.
    config["num_hidden_layers"] = 1000.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let parsed = ModelConfig::load(&config_path).unwrap();
    let e = CausalLm::validate(&model, &parsed).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    assert!(e.contains("`num_hidden_layers` is 1000"), "{e}");
}

#[test]
fn tokenizing_stops_when_its_caller_says_stop_naming_the_file() {
    let enc = Encoder::from_model_dir(fixture(Family::Qwen2)).unwrap();
    let path = common::samples_dir().join("alpaca.jsonl");
    let options = PrepareOptions::default();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let raw = read_jsonl(&path, &ReadOptions::default()).unwrap();
    let samples = raw.samples.len();
    let err = backpropagate::data::encode_all_until(raw, &enc, &options, &|| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 10
    })
    .unwrap_err();
    let backpropagate::data::DataError::Io {
        path: named,
        source,
    } = err
    else {
        panic!("expected an interruption, got {err}");
    };
    assert_eq!(named, path);
    assert_eq!(source.kind(), std::io::ErrorKind::Interrupted);
    // It stopped early instead of tokenizing every sample first.
    let asked = calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(asked < samples, "asked {asked} times for {samples} samples");
    // Without a stop, the same data encodes completely.
    let raw = read_jsonl(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        encode_all(raw, &enc, &options).unwrap().encoded.len(),
        samples
    );
}

#[test]
fn a_user_turn_ending_with_the_next_reply_is_never_taken_for_that_reply() {
    // Long conversations are located in one pass; a user turn whose text ends with
    // the reply that follows it (`… say OK` then `OK`) must not steal the reply's span.
    let enc = Encoder::from_model_dir(fixture(Family::Qwen2)).unwrap();
    let mut turns = Vec::new();
    for i in 0..40 {
        let question = if i == 10 {
            format!("question {i}: just say answer {i}")
        } else {
            format!("question {i}")
        };
        turns.push(Message::new(Role::User, question));
        turns.push(Message::new(Role::Assistant, format!("answer {i}")));
    }
    let rendered = enc.template().render_with_spans(&turns).unwrap();
    assert_eq!(rendered.assistant.len(), 40);
    for (k, span) in rendered.assistant.iter().enumerate() {
        let i = 2 * k + 1;
        let p = enc.template().render(&turns[..i], true).unwrap();
        let u = enc.template().render(&turns[..=i], false).unwrap();
        assert_eq!(*span, p.len()..u.len(), "reply {k}");
    }
}

#[test]
fn a_template_cannot_rebind_the_size_guard() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_template(
        dir.path(),
        "{% macro __backprop_bounded(v) %}{{ v }}{% endmacro %}{% set ns = namespace(x=[1]) %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
    );
    let Err(err) = Encoder::from_model_dir(&model) else {
        panic!("a template rebinding the guard was accepted");
    };
    let err = err.to_string();
    assert!(err.contains("reserved name"), "{err}");
    assert!(err.contains("chat_template.jinja"), "{err}");
}

#[cfg(unix)]
#[test]
fn model_files_that_are_devices_fifos_or_huge_are_refused_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_template(dir.path(), "{{ messages }}");
    let start = Instant::now();
    // A chat template that is a FIFO would block open(2); one that is /dev/zero would
    // be read forever; a config.json of 65 MiB is no config.
    std::fs::remove_file(model.join("chat_template.jinja")).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(model.join("chat_template.jinja"))
        .status()
        .unwrap();
    assert!(fifo.success());
    let Err(err) = Encoder::from_model_dir(&model) else {
        panic!("a FIFO chat template was accepted");
    };
    let err = err.to_string();
    assert!(err.contains("chat_template.jinja"), "{err}");
    assert!(err.contains("named pipe"), "{err}");
    std::fs::remove_file(model.join("chat_template.jinja")).unwrap();
    std::fs::remove_file(model.join("tokenizer_config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", model.join("tokenizer_config.json")).unwrap();
    let Err(err) = Encoder::from_model_dir(&model) else {
        panic!("/dev/zero as tokenizer_config.json was accepted");
    };
    assert!(err.to_string().contains("character device"), "{err}");
    let config = model.join("config.json");
    let mut big = std::fs::read(&config).unwrap();
    big.resize(65 << 20, b' ');
    std::fs::write(&config, big).unwrap();
    let err = ModelConfig::load(&config).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("64 MiB"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
