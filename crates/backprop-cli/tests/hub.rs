//! Repo ids on the command line: `backprop model pull`, `train --model org/name` and
//! `data check --model org/name` against the hub stand-in, offline mode, and the
//! messages for a gated repo, an unreachable hub and a hostile one.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::bin;
use hub_standin::{Faults, HubStandIn, Repo};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HF_")) {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn server(model: &Path, token: Option<&str>) -> HubStandIn {
    let mut repos = BTreeMap::new();
    repos.insert(
        "test-org/tiny".to_string(),
        Repo {
            dir: model.to_path_buf(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            token: token.map(String::from),
        },
    );
    HubStandIn::start(repos, None).unwrap()
}

#[test]
fn pull_train_and_check_by_repo_id() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "qwen2");
    let hub = server(&model, None);
    let cache = tmp.path().join("hf");
    let cache_s = cache.to_str().unwrap();
    let url = hub.url();
    let online = [("HF_ENDPOINT", url.as_str()), ("HF_HUB_CACHE", cache_s)];

    let out = run(&["model", "pull", "test-org/tiny"], &online);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let dir = stdout.trim().to_string();
    assert!(
        dir.ends_with("snapshots/0123456789abcdef0123456789abcdef01234567"),
        "{dir}"
    );

    // Offline, with the hub unreachable, the cache is enough to check data and train.
    let offline = [
        ("HF_ENDPOINT", "http://127.0.0.1:1"),
        ("HF_HUB_CACHE", cache_s),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let data = common::samples().join("alpaca.jsonl");
    let out = run(
        &[
            "data",
            "check",
            data.to_str().unwrap(),
            "--model",
            "test-org/tiny",
        ],
        &offline,
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let runs = tmp.path().join("runs");
    let out = run(
        &[
            "train",
            "--model",
            "test-org/tiny",
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "2",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--json",
        ],
        &offline,
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let run_dir = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let info = std::fs::read_to_string(run_dir.join("run.json")).unwrap();
    assert!(info.contains("models--test-org--tiny"), "{info}");

    let out = run(&["model", "pull", "test-org/other"], &offline);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not in the cache") && stderr.contains("fix:"),
        "{stderr}"
    );
}

#[test]
fn gated_and_unreachable_hubs_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "llama");
    let hub = server(&model, Some("hf_abc"));
    let cache = tmp.path().join("hf");
    let url = hub.url();
    let env = [
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
    ];
    let out = run(&["model", "pull", "test-org/tiny"], &env);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("gated or private") && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );
    let mut with_token = env.to_vec();
    with_token.push(("HF_TOKEN", "hf_abc"));
    assert!(run(&["model", "pull", "test-org/tiny"], &with_token)
        .status
        .success());

    let out = run(
        &["model", "pull", "test-org/tiny"],
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:1"),
            ("HF_HUB_CACHE", tmp.path().join("empty").to_str().unwrap()),
        ],
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

#[test]
fn data_check_by_repo_id_fetches_the_tokenizer_but_no_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "qwen2");
    let hub = server(&model, None);
    let cache = tmp.path().join("hf");
    let url = hub.url();
    let env = [
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
    ];
    let data = common::samples().join("alpaca.jsonl");
    let out = run(
        &[
            "data",
            "check",
            data.to_str().unwrap(),
            "--model",
            "test-org/tiny",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let weights: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.contains(".safetensors") || r.contains("/cdn/"))
        .collect();
    assert_eq!(weights, Vec::<String>::new(), "no weights are asked for");
    let snapshot =
        cache.join("models--test-org--tiny/snapshots/0123456789abcdef0123456789abcdef01234567");
    assert!(snapshot.join("tokenizer.json").is_file());
    assert!(!snapshot.join("model.safetensors").exists());

    // Offline, that tokenizer-only snapshot is enough to check again.
    let offline = [
        ("HF_ENDPOINT", "http://127.0.0.1:1"),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let out = run(
        &[
            "data",
            "check",
            data.to_str().unwrap(),
            "--model",
            "test-org/tiny",
        ],
        &offline,
    );
    assert!(out.status.success(), "{}", text(&out).1);
}

#[test]
fn a_hub_answering_a_path_as_commit_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "llama");
    let mut repos = BTreeMap::new();
    repos.insert(
        "test-org/tiny".to_string(),
        Repo {
            dir: model,
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            token: None,
        },
    );
    let hub = HubStandIn::start_with(
        repos,
        Faults {
            sha: Some("../../../escaped".into()),
            answer_any_path: true,
            ..Faults::default()
        },
    )
    .unwrap();
    let cache = tmp.path().join("hf");
    let url = hub.url();
    let out = run(
        &["model", "pull", "test-org/tiny"],
        &[
            ("HF_ENDPOINT", url.as_str()),
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ],
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("test-org/tiny")
            && stderr.contains("`../../../escaped`")
            && stderr.contains("fix:")
            && stderr.contains("HF_ENDPOINT"),
        "{stderr}"
    );
    assert!(!tmp.path().join("escaped").exists());
}
