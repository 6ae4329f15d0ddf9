//! Models by repo id against a local stand-in of the hub: the HF cache layout, no
//! second download, resuming a broken download with Range, offline mode, refusing an
//! unsupported architecture before any weights, gated repos and HF_TOKEN; and against a
//! hostile one: commit ids and shard names that are paths, bodies past their declared
//! size or endless, endless or stalled answers. Also local sharded indexes that point
//! outside their folder.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backpropagate::event::Silent;
use backpropagate::fixture::Family;
use backpropagate::hub::{resolve_model, HubError, HubOptions};
use backpropagate::Error;
use common::fixture;
use hub_standin::{Faults, HubStandIn, Repo};

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
        symlinks: true,
    }
}

fn weights_requested(server: &HubStandIn) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.contains("/cdn/") || r.ends_with(".safetensors"))
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

/// A repo like the Qwen2 fixture whose weights are listed by an index naming `shard`;
/// the weights themselves are served as `outside.safetensors`, so a client that builds
/// a URL from a `../` name still gets bytes back from `answer_any_path`.
fn sharded_repo(dir: &Path, shard: &str) {
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture(Family::Qwen2).join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        fixture(Family::Qwen2).join("model.safetensors"),
        dir.join("outside.safetensors"),
    )
    .unwrap();
    let index =
        serde_json::json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// Everything directly in `parent` by name: a cache that stayed in its folder leaves
/// only that folder there.
fn entries(parent: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every file (and link) under `dir` with its size, for checking what a pull left.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let meta = p.symlink_metadata().unwrap();
        if meta.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push((p, meta.len()));
        }
    }
    out
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit`, so a client
/// that hangs fails here instead of hanging the suite.
fn within<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still running after {limit:?}"))
}

#[test]
fn a_commit_id_that_is_a_path_is_refused_and_nothing_lands_outside_the_cache() {
    for sha in [
        "../../../escaped",
        "../../../../escaped",
        "..",
        "/tmp/backprop-escaped-commit",
        "..\\..\\..\\escaped",
        "0123456789abcdef0123456789abcdef0123456", // 39 hex digits
    ] {
        for symlinks in [true, false] {
            let server = HubStandIn::start_with(
                [(
                    "org/hostile".to_string(),
                    repo(fixture(Family::Qwen2), None),
                )]
                .into(),
                Faults {
                    sha: Some(sha.into()),
                    answer_any_path: true,
                    ..Faults::default()
                },
            )
            .unwrap();
            let parent = tempfile::tempdir().unwrap();
            let cache = parent.path().join("cache");
            let mut o = options(&server, &cache);
            o.symlinks = symlinks;
            let err = resolve_model("org/hostile", &o, &Silent).unwrap_err();
            assert!(
                matches!(err, Error::Hub(HubError::BadCommit { .. })),
                "{sha}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains("org/hostile") && msg.contains(sha), "{msg}");
            assert!(err.hint().unwrap().contains("HF_ENDPOINT"));
            assert!(
                entries(parent.path()).iter().all(|e| e == "cache"),
                "{sha}: {:?}",
                entries(parent.path())
            );
            assert!(!Path::new("/tmp/backprop-escaped-commit").exists());
            assert_eq!(
                files_under(&cache),
                vec![],
                "{sha}: nothing is fetched for a bad commit"
            );
        }
    }
}

#[test]
fn shard_names_that_leave_the_snapshot_are_refused_naming_the_entry() {
    let parent = tempfile::tempdir().unwrap();
    let absolute = parent.path().join("absolute.safetensors");
    let absolute = absolute.to_str().unwrap();
    for shard in [
        "../../../../outside.safetensors",
        "../../../../../outside.safetensors",
        "sub/../../../../../outside.safetensors",
        absolute,
        "sub\\..\\..\\..\\..\\..\\outside.safetensors",
        "..\\outside.safetensors",
        "a//outside.safetensors",
        "./outside.safetensors",
        "",
    ] {
        for symlinks in [true, false] {
            let parent = tempfile::tempdir().unwrap();
            let repo_dir = parent.path().join("repo");
            std::fs::create_dir(&repo_dir).unwrap();
            sharded_repo(&repo_dir, shard);
            let server = HubStandIn::start_with(
                [("org/hostile".to_string(), repo(&repo_dir, None))].into(),
                Faults {
                    answer_any_path: true,
                    ..Faults::default()
                },
            )
            .unwrap();
            let cache = parent.path().join("cache");
            let mut o = options(&server, &cache);
            o.symlinks = symlinks;
            let err = resolve_model("org/hostile", &o, &Silent).unwrap_err();
            assert!(
                matches!(err, Error::Hub(HubError::BadEntry { .. })),
                "{shard:?}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("org/hostile")
                    && msg.contains(&format!("`{shard}`"))
                    && msg.contains("model.safetensors.index.json"),
                "{msg}"
            );
            assert_eq!(
                entries(parent.path()),
                ["cache", "repo"],
                "{shard:?}: something was written beside the cache"
            );
            assert!(!Path::new(absolute).exists());
            assert_eq!(weights_requested(&server), 0, "{:?}", server.requests());
        }
    }
}

#[test]
fn copied_snapshot_files_are_real_files_inside_the_snapshot() {
    let server = hub(
        vec![("org/tiny-qwen2", repo(fixture(Family::Qwen2), None))],
        None,
    );
    let parent = tempfile::tempdir().unwrap();
    let cache = parent.path().join("cache");
    let mut o = options(&server, &cache);
    o.symlinks = false;
    let dir = resolve_model("org/tiny-qwen2", &o, &Silent).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        let meta = dir.join(f).symlink_metadata().unwrap();
        assert!(meta.file_type().is_file(), "{f} is a copy, not a link");
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(fixture(Family::Qwen2).join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(entries(parent.path()), ["cache"]);
}

#[test]
fn a_download_longer_than_declared_is_cut_and_the_next_pull_starts_clean() {
    // One LFS file (through the CDN redirect) and one regular file.
    for file in ["model.safetensors", "tokenizer.json"] {
        let declared = std::fs::metadata(fixture(Family::Qwen2).join(file))
            .unwrap()
            .len();
        let bad = HubStandIn::start_with(
            [("org/tiny".to_string(), repo(fixture(Family::Qwen2), None))].into(),
            Faults {
                oversize_file: Some(file.into()),
                oversize_by: Some(8 << 20),
                ..Faults::default()
            },
        )
        .unwrap();
        let cache = tempfile::tempdir().unwrap();
        let err = resolve_model("org/tiny", &options(&bad, cache.path()), &Silent).unwrap_err();
        assert!(
            matches!(err, Error::Hub(HubError::Oversized { .. })),
            "{file}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("org/tiny") && msg.contains(file) && msg.contains(&declared.to_string()),
            "{msg}"
        );
        assert!(
            !err.hint().unwrap().contains("Check the network"),
            "{:?}",
            err.hint()
        );
        let left = files_under(cache.path());
        assert!(
            left.iter()
                .all(|(p, len)| *len <= declared && !p.to_string_lossy().ends_with(".incomplete")),
            "{file}: {left:?}"
        );
        drop(bad);

        let good = hub(vec![("org/tiny", repo(fixture(Family::Qwen2), None))], None);
        let dir = resolve_model("org/tiny", &options(&good, cache.path()), &Silent).unwrap();
        assert_eq!(
            std::fs::read(dir.join(file)).unwrap(),
            std::fs::read(fixture(Family::Qwen2).join(file)).unwrap()
        );
    }
}

#[test]
fn an_endless_download_stops_at_the_declared_size() {
    let server = HubStandIn::start_with(
        [("org/tiny".to_string(), repo(fixture(Family::Qwen2), None))].into(),
        Faults {
            oversize_file: Some("model.safetensors".into()),
            oversize_by: None,
            ..Faults::default()
        },
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = options(&server, cache.path());
    let path = cache.path().to_path_buf();
    let started = std::time::Instant::now();
    let err = within(std::time::Duration::from_secs(60), move || {
        resolve_model("org/tiny", &o, &Silent).unwrap_err()
    });
    assert!(
        matches!(err, Error::Hub(HubError::Oversized { .. })),
        "{err}"
    );
    let written: u64 = files_under(&path).iter().map(|(_, n)| n).sum();
    let fixture_total: u64 = files_under(fixture(Family::Qwen2))
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert!(
        written <= fixture_total,
        "{written} bytes written, the whole model is {fixture_total}"
    );
    eprintln!("endless body refused after {:?}", started.elapsed());
}

#[test]
fn a_leftover_partial_longer_than_the_file_does_not_wedge_the_next_pull() {
    let server = hub(vec![("org/tiny", repo(fixture(Family::Qwen2), None))], None);
    let cache = tempfile::tempdir().unwrap();
    let weights = fixture(Family::Qwen2).join("model.safetensors");
    let sha = backpropagate::run::sha256_file(&weights).unwrap();
    let blobs = cache.path().join("models--org--tiny").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // What an older version left after a server sent too much.
    let len = std::fs::metadata(&weights).unwrap().len() as usize;
    std::fs::write(blobs.join(format!("{sha}.incomplete")), vec![b'x'; len * 3]).unwrap();
    let dir = resolve_model("org/tiny", &options(&server, cache.path()), &Silent).unwrap();
    assert_eq!(
        backpropagate::run::sha256_file(&dir.join("model.safetensors")).unwrap(),
        sha
    );
    assert!(!blobs.join(format!("{sha}.incomplete")).exists());
}

#[test]
fn an_endless_revision_answer_is_cut_at_a_cap() {
    let server = HubStandIn::start_with(
        [("org/tiny".to_string(), repo(fixture(Family::Qwen2), None))].into(),
        Faults {
            endless_revision: true,
            ..Faults::default()
        },
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = options(&server, cache.path());
    let started = std::time::Instant::now();
    let err = within(std::time::Duration::from_secs(60), move || {
        resolve_model("org/tiny", &o, &Silent).unwrap_err()
    });
    assert!(
        matches!(err, Error::Hub(HubError::TooLarge { .. })),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("org/tiny") && msg.contains("/revision/main"),
        "{msg}"
    );
    eprintln!(
        "endless revision answer refused after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_stalled_download_times_out_and_says_so() {
    let server = HubStandIn::start_with(
        [("org/tiny".to_string(), repo(fixture(Family::Qwen2), None))].into(),
        Faults {
            stall_downloads: true,
            ..Faults::default()
        },
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut o = options(&server, cache.path());
    o.timeout = std::time::Duration::from_secs(1);
    o.attempts = 2;
    let started = std::time::Instant::now();
    let err = within(std::time::Duration::from_secs(60), move || {
        resolve_model("org/tiny", &o, &Silent).unwrap_err()
    });
    let took = started.elapsed();
    assert!(
        matches!(err, Error::Hub(HubError::Unreachable { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("no answer for 1"), "{err}");
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_local_index_pointing_outside_the_model_folder_is_refused_naming_the_entry() {
    let parent = tempfile::tempdir().unwrap();
    let model = parent.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture(Family::Qwen2).join(f), model.join(f)).unwrap();
    }
    // The file exists, so only the name can be the reason for refusing it.
    std::fs::copy(
        fixture(Family::Qwen2).join("model.safetensors"),
        parent.path().join("outside.safetensors"),
    )
    .unwrap();
    for shard in [
        "../outside.safetensors",
        parent.path().join("outside.safetensors").to_str().unwrap(),
    ] {
        let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": shard}});
        std::fs::write(
            model.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let err = backpropagate::model::safetensors_paths(&model).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("`{shard}`")) && msg.contains("model.safetensors.index.json"),
            "{msg}"
        );
    }
}

#[test]
fn two_pulls_of_one_model_at_once_both_succeed_with_one_download() {
    for symlinks in [true, false] {
        let server = Arc::new(
            HubStandIn::start_with(
                [("org/tiny".to_string(), repo(fixture(Family::Qwen2), None))].into(),
                Faults {
                    slow_downloads: true,
                    ..Faults::default()
                },
            )
            .unwrap(),
        );
        let cache = tempfile::tempdir().unwrap();
        let mut o = options(&server, cache.path());
        o.symlinks = symlinks;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let pulls: Vec<_> = (0..2)
            .map(|_| {
                let (o, barrier) = (o.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    resolve_model("org/tiny", &o, &Silent)
                })
            })
            .collect();
        let dirs: Vec<PathBuf> = pulls
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert_eq!(dirs[0], dirs[1]);
        let want =
            backpropagate::run::sha256_file(&fixture(Family::Qwen2).join("model.safetensors"))
                .unwrap();
        assert_eq!(
            backpropagate::run::sha256_file(&dirs[0].join("model.safetensors")).unwrap(),
            want
        );
        let downloads = server
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /cdn/"))
            .count();
        assert_eq!(downloads, 1, "{:?}", server.requests());
        let left = files_under(cache.path());
        assert!(
            left.iter()
                .all(|(p, _)| !p.to_string_lossy().contains(".incomplete")
                    && !p.to_string_lossy().contains(".tmp-")),
            "{left:?}"
        );
    }
}

#[test]
fn a_config_declared_larger_than_any_real_one_is_not_downloaded() {
    let server = HubStandIn::start_with(
        [("org/tiny".to_string(), repo(fixture(Family::Qwen2), None))].into(),
        Faults {
            declared_size: Some(("config.json".into(), 5 << 30)),
            ..Faults::default()
        },
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model("org/tiny", &options(&server, cache.path()), &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Hub(HubError::TooLarge { .. })),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("org/tiny") && msg.contains("config.json"),
        "{msg}"
    );
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET ") && r.contains("config.json")),
        "{:?}",
        server.requests()
    );
}

#[test]
fn a_revision_that_is_a_path_is_refused_before_any_request() {
    let server = hub(vec![("org/tiny", repo(fixture(Family::Qwen2), None))], None);
    let cache = tempfile::tempdir().unwrap();
    for spec in ["org/tiny@..", "org/tiny@.", "org/tiny@a:b"] {
        let err = resolve_model(spec, &options(&server, cache.path()), &Silent).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(spec) && msg.contains("revision"), "{msg}");
    }
    assert_eq!(server.requests(), Vec::<String>::new());
    assert_eq!(files_under(cache.path()), vec![]);
}
