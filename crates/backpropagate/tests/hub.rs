//! Models by repo id against a local stand-in of the hub: the HF cache layout, no
//! second download, resuming a broken download with Range, offline mode, refusing an
//! unsupported architecture before any weights, gated repos and HF_TOKEN.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use backpropagate::event::Silent;
use backpropagate::fixture::Family;
use backpropagate::hub::{resolve_model, HubError, HubOptions};
use backpropagate::Error;
use common::fixture;
use hub_standin::{HubStandIn, Repo};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn repo(dir: &Path, token: Option<&str>) -> Repo {
    Repo {
        dir: dir.to_path_buf(),
        commit: COMMIT.into(),
        token: token.map(String::from),
    }
}

fn hub(repos: Vec<(&str, Repo)>, break_after: Option<u64>) -> HubStandIn {
    let map: BTreeMap<String, Repo> = repos.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    HubStandIn::start(map, break_after).unwrap()
}

fn options(server: &HubStandIn, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: server.url(),
        cache: cache.to_path_buf(),
        token: None,
        offline: false,
        attempts: 3,
        timeout: std::time::Duration::from_secs(10),
    }
}

fn weights_requested(server: &HubStandIn) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.contains("/cdn/") || r.contains(".safetensors"))
        .count()
}

#[test]
fn downloads_into_the_hf_cache_layout_once() {
    let server = hub(
        vec![("org/tiny-qwen2", repo(fixture(Family::Qwen2), None))],
        None,
    );
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve_model("org/tiny-qwen2", &options(&server, cache.path()), &Silent).unwrap();
    let root = cache.path().join("models--org--tiny-qwen2");
    assert_eq!(dir, root.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        COMMIT
    );
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors",
    ] {
        let link = dir.join(f);
        let meta = link
            .symlink_metadata()
            .unwrap_or_else(|_| panic!("{f} missing"));
        #[cfg(unix)]
        assert!(meta.file_type().is_symlink(), "{f} should link into blobs/");
        assert_eq!(
            std::fs::read(&link).unwrap(),
            std::fs::read(fixture(Family::Qwen2).join(f)).unwrap(),
            "{f}"
        );
    }
    // The safetensors blob is named by its sha256, like the hub's LFS files.
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let sha = backpropagate::run::sha256_file(&dir.join("model.safetensors")).unwrap();
    assert!(root.join("blobs").join(&sha).is_file());
    assert!(!weights.is_empty());

    let before = server.requests().len();
    let again = resolve_model("org/tiny-qwen2", &options(&server, cache.path()), &Silent).unwrap();
    assert_eq!(again, dir);
    let new: Vec<_> = server.requests()[before..].to_vec();
    assert!(
        new.iter().all(|r| r.contains("/api/models/")),
        "only the revision is asked again: {new:?}"
    );

    // Offline, the cache answers without the network.
    let mut off = options(&server, cache.path());
    off.offline = true;
    let before = server.requests().len();
    assert_eq!(resolve_model("org/tiny-qwen2", &off, &Silent).unwrap(), dir);
    assert_eq!(server.requests().len(), before);
    let err = resolve_model("org/other", &off, &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Hub(HubError::NotCached { .. })),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("HF_HUB_OFFLINE"));
}

#[test]
fn a_broken_download_resumes_with_range() {
    let server = hub(
        vec![("org/tiny", repo(fixture(Family::Llama), None))],
        Some(100_000),
    );
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve_model("org/tiny", &options(&server, cache.path()), &Silent).unwrap();
    let got = backpropagate::run::sha256_file(&dir.join("model.safetensors")).unwrap();
    let want =
        backpropagate::run::sha256_file(&fixture(Family::Llama).join("model.safetensors")).unwrap();
    assert_eq!(got, want);
    let ranged: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.contains("/cdn/") && r.contains("bytes="))
        .collect();
    assert_eq!(ranged.len(), 1, "{:?}", server.requests());
    assert!(
        !ranged[0].contains("bytes=0-"),
        "resumed from where it broke: {ranged:?}"
    );
}

#[test]
fn unsupported_architectures_are_refused_before_any_weights() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture(Family::Qwen2).join(f), dir.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(Family::Qwen2).join("config.json")).unwrap())
            .unwrap();
    config["architectures"] = serde_json::json!(["PhiForCausalLM"]);
    config["model_type"] = serde_json::json!("phi");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let server = hub(vec![("org/phi", repo(dir.path(), None))], None);
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model("org/phi", &options(&server, cache.path()), &Silent).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("unsupported architecture `phi`") && msg.contains("supported: llama"),
        "{msg}"
    );
    assert_eq!(weights_requested(&server), 0, "{:?}", server.requests());
}

#[test]
fn gated_repos_need_the_token() {
    let server = hub(
        vec![(
            "org/gated",
            repo(fixture(Family::Mistral), Some("hf_secret")),
        )],
        None,
    );
    let cache = tempfile::tempdir().unwrap();
    let mut o = options(&server, cache.path());
    let err = resolve_model("org/gated", &o, &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Hub(HubError::NeedsToken { .. })),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("HF_TOKEN"));
    o.token = Some("wrong".into());
    let err = resolve_model("org/gated", &o, &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Hub(HubError::Forbidden { .. })),
        "{err}"
    );
    o.token = Some("hf_secret".into());
    let dir: PathBuf = resolve_model("org/gated", &o, &Silent).unwrap();
    assert!(dir.join("model.safetensors").is_file());
}

#[test]
fn unknown_repos_and_unreachable_hubs_say_what_to_do() {
    let server = hub(vec![], None);
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model("org/nope", &options(&server, cache.path()), &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Hub(HubError::NotFound { .. })),
        "{err}"
    );
    assert!(err
        .hint()
        .unwrap()
        .contains("https://huggingface.co/org/nope"));
    let mut o = options(&server, cache.path());
    o.endpoint = "http://127.0.0.1:1".into();
    let err = resolve_model("org/nope", &o, &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Hub(HubError::Unreachable { .. })),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("HF_HUB_OFFLINE"));
    // A local folder is used as it is, without the hub.
    let local = fixture(Family::Qwen2).to_str().unwrap().to_string();
    assert_eq!(
        resolve_model(&local, &o, &Silent).unwrap(),
        PathBuf::from(&local)
    );
}
