//! The `backprop` binary end to end: help, honest stubs, fixture + data check on the
//! bundled samples and broken files, escape sequences in data printed escaped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn backprop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backprop"))
        .args(args)
        .output()
        .expect("run backprop")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples")
}

fn model() -> &'static str {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = backprop(&["fixture", dir.path().to_str().unwrap(), "--family", "llama"]);
        assert!(out.status.success(), "{}", text(&out));
        dir
    })
    .path()
    .to_str()
    .unwrap()
}

fn check(file: &str) -> Output {
    let path = samples().join(file);
    backprop(&["data", "check", path.to_str().unwrap(), "--model", model()])
}

#[test]
fn help_lists_every_planned_subcommand() {
    let out = backprop(&["--help"]);
    assert!(out.status.success());
    let help = text(&out);
    for cmd in [
        "data",
        "train",
        "multi-run",
        "export",
        "push",
        "runs",
        "ollama",
        "doctor",
        "serve",
        "config",
        "fixture",
    ] {
        assert!(
            help.contains(&format!("\n  {cmd}")),
            "{cmd} missing from:\n{help}"
        );
    }
}

#[test]
fn doctor_reports_the_machine_and_what_to_fix() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backprop"))
        .arg("doctor")
        .env("BACKPROP_HOME", home.path())
        .env("HF_HUB_CACHE", home.path().join("hf"))
        .env("OLLAMA_HOST", "127.0.0.1:1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // No Ollama here: doctor says so, with how to start it, and exits non-zero.
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FIX  ollama") && stdout.contains("ollama serve"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok   runs") && stdout.contains("ok   hf cache"),
        "{stdout}"
    );
    assert!(stdout.contains("gpu"), "{stdout}");
}

#[test]
fn data_check_reports_stats_for_good_samples() {
    for (file, format) in [
        ("alpaca.jsonl", "alpaca"),
        ("messages.jsonl", "messages"),
        ("sharegpt.jsonl", "sharegpt"),
        ("prompt_completion.jsonl", "prompt_completion"),
        ("text.jsonl", "text"),
    ] {
        let out = check(file);
        let t = text(&out);
        assert!(out.status.success(), "{file}: {t}");
        assert!(t.contains(&format!("format:           {format}")), "{t}");
        assert!(t.contains("OK: ready to train."), "{t}");
    }
}

#[test]
fn data_check_lists_every_bad_line_and_exits_1() {
    let out = check("broken/bad_lines.jsonl");
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("4 problems found"), "{t}");
    for needle in [
        "line 2: missing field `output`",
        "line 3: field `output` must be a string, found a number",
        "line 4: not valid JSON",
        "line 5: field `instruction` is empty",
        "Nothing was changed",
    ] {
        assert!(t.contains(needle), "{needle} not in:\n{t}");
    }
}

#[test]
fn data_check_on_each_broken_file() {
    let cases = [
        (
            "broken/mixed_formats.jsonl",
            "line 3: this record is messages but the file started as alpaca on line 1",
        ),
        (
            "broken/bad_roles.jsonl",
            "line 2: turn 2 has unknown role `bot`",
        ),
        ("broken/bad_roles.jsonl", "line 3: no assistant turn"),
        (
            "broken/bad_roles.jsonl",
            "line 4: turn 2 has empty `content`",
        ),
        ("broken/json_array.json", "JSONL needs one object per line"),
        ("broken/latin1.jsonl", "line 1: invalid UTF-8 at byte 14"),
        ("broken/empty.jsonl", "the file is empty"),
    ];
    for (file, needle) in cases {
        let out = check(file);
        assert_eq!(out.status.code(), Some(1), "{file}");
        assert!(
            text(&out).contains(needle),
            "{file}: `{needle}` not in:\n{}",
            text(&out)
        );
    }
}

#[test]
fn bom_and_crlf_files_train_with_warnings() {
    let out = check("broken/windows_bom_crlf.jsonl");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("warning: line 1: file starts with a UTF-8 byte-order mark"),
        "{t}"
    );
    assert!(t.contains("2 lines end with Windows line endings"), "{t}");
}

#[test]
fn a_missing_model_folder_is_a_clear_error() {
    let path = samples().join("alpaca.jsonl");
    let out = backprop(&[
        "data",
        "check",
        path.to_str().unwrap(),
        "--model",
        "/no/such/model",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("/no/such/model: not a model folder"),
        "{}",
        text(&out)
    );
}

#[test]
fn config_defaults_is_valid_toml_with_the_seed_defaults() {
    let out = backprop(&["config", "defaults"]);
    let t = String::from_utf8(out.stdout).unwrap();
    let c: backpropagate::TrainConfig = toml::from_str(&t).unwrap();
    assert_eq!(c, backpropagate::TrainConfig::default());
    assert!(t.contains("batch_size = \"auto\""), "{t}");
}

#[test]
fn data_check_prints_escape_sequences_from_the_data_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("esc.jsonl");
    // JSON escapes, so the file itself is plain text and the parsed strings hold ESC.
    std::fs::write(
        &good,
        "{\"instruction\": \"clear \\u001b[2J\", \"input\": \"\", \"output\": \"title \\u001b]0;owned\\u0007 done\"}\n",
    )
    .unwrap();
    let bad = dir.path().join("esc_keys.jsonl");
    std::fs::write(
        &bad,
        "{\"\\u001b[2Jkey\": 1, \"\\u001b]0;owned\\u0007\": 2}\n{\"messages\": [{\"role\": \"\\u001b[2Jbot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    for (file, code, needle) in [
        (&good, 0, "clear \\x1b[2J"),
        (&bad, 1, "\\x1b]0;owned\\x07"),
    ] {
        let out = backprop(&["data", "check", file.to_str().unwrap(), "--model", model()]);
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
        for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            assert!(
                !bytes.contains(&0x1b) && !bytes.contains(&0x07),
                "raw control bytes on {stream}: {}",
                text(&out)
            );
        }
        assert!(
            text(&out).contains(needle),
            "`{needle}` not in:\n{}",
            text(&out)
        );
    }
}
