//! `backprop serve` over real HTTP: the token rule, uploads, data check, a training job
//! streamed over SSE that is stopped and resumed, export, push to the Ollama stand-in,
//! and the static UI files (no path escapes).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::bin;
use ollama_standin::{Faults, StandIn};

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str], ollama: &str, ui: &std::path::Path) -> Server {
    let mut child = Command::new(bin())
        .args(["serve", "--port", "0", "--ui-dir", ui.to_str().unwrap()])
        .args(args)
        .env("OLLAMA_HOST", ollama)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, url }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_network_address_needs_a_token() {
    let out = Command::new(bin())
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .env_remove("BACKPROP_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without a token") && err.contains("--token"),
        "{err}"
    );
}

#[test]
fn token_protects_every_api_call_and_the_event_stream() {
    let ui = tempfile::tempdir().unwrap();
    std::fs::write(
        ui.path().join("index.html"),
        "<!doctype html><title>app</title>",
    )
    .unwrap();
    let s = serve(&["--token", "s3cret"], "127.0.0.1:1", ui.path());
    let client = reqwest::Client::new();
    rt().block_on(async {
        let r = client
            .get(format!("{}/api/info", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert!(body["hint"].as_str().unwrap().contains("#token="));
        let r = client
            .get(format!("{}/api/info", s.url))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = client
            .get(format!("{}/api/info", s.url))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .get(format!("{}/api/events?token=s3cret", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        // The page itself loads without a token (it asks for one), with a strict CSP.
        let r = client.get(format!("{}/runs", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'"));
        assert!(r.text().await.unwrap().contains("<title>app</title>"));
        let r = client
            .get(format!("{}/..%2f..%2fetc/passwd", s.url))
            .send()
            .await
            .unwrap();
        assert!(!r.text().await.unwrap().contains("root:"));
    });
}

/// Reads SSE `data:` lines until `pred` accepts one or the deadline passes.
async fn wait_event(
    resp: &mut reqwest::Response,
    buf: &mut String,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            if let Some(data) = line.trim().strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                eprintln!("event: {}", v["event"]["type"]);
                if pred(&v) {
                    return v;
                }
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for an event");
        let chunk = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
            .await
            .expect("event stream stalled")
            .unwrap()
            .expect("event stream ended");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[test]
fn train_stop_resume_export_and_push_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "qwen2");
    let ollama = StandIn::start(Faults::default()).unwrap();
    let ui = tempfile::tempdir().unwrap();
    std::fs::write(ui.path().join("index.html"), "app").unwrap();
    let runs = tmp.path().join("runs");
    let s = serve(
        &["--runs-dir", runs.to_str().unwrap()],
        &ollama.url(),
        ui.path(),
    );
    let c = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", s.url);
    rt().block_on(async {
        // Upload as a browser does, then check it against the model.
        let data = std::fs::read(common::samples().join("alpaca.jsonl")).unwrap();
        let up: Value = c
            .post(url("/api/datasets?name=alpaca.jsonl"))
            .body(data)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data_path = up["path"].as_str().unwrap().to_string();
        assert!(data_path.ends_with("-alpaca.jsonl"), "{up}");
        let report: Value = c
            .post(url("/api/data/check"))
            .json(&json!({"data": data_path, "model": model}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(report["ok"], true);
        assert_eq!(report["stats"]["samples"], 200);
        assert!(report["samples"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("<|im_start|>"));
        let bad: Value = c
            .post(url("/api/data/check"))
            .json(
                &json!({"data": common::samples().join("broken/bad_lines.jsonl"), "model": model}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(bad["ok"], false);
        assert!(bad["problems"][0]["line"].as_u64().unwrap() > 0);

        let mut events = c.get(url("/api/events")).send().await.unwrap();
        let mut buf = String::new();
        let mut config: Value = c
            .get(url("/api/config/defaults"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        config["model"] = json!(model);
        config["data"] = json!(data_path);
        config["steps"] = json!(400);
        config["batch_size"] = json!(2);
        config["max_seq_len"] = json!(128);
        config["checkpoint_every"] = json!(5);
        let job: Value = c
            .post(url("/api/runs"))
            .json(&json!({"config": config}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let job_id = job["id"].as_str().unwrap().to_string();
        let started = wait_event(&mut events, &mut buf, |v| v["event"]["type"] == "Started").await;
        let run_id = started["run"].as_str().unwrap().to_string();
        wait_event(&mut events, &mut buf, |v| {
            v["event"]["type"] == "Step" && v["event"]["step"].as_u64() >= Some(3)
        })
        .await;
        // A second training job is refused while one runs.
        let busy = c
            .post(url("/api/runs"))
            .json(&json!({"config": config}))
            .send()
            .await
            .unwrap();
        assert_eq!(busy.status(), 409);
        c.post(url(&format!("/api/jobs/{job_id}/stop")))
            .send()
            .await
            .unwrap();
        let stopped = wait_event(&mut events, &mut buf, |v| v["event"]["type"] == "Stopped").await;
        let stop_step = stopped["event"]["step"].as_u64().unwrap();
        assert!(stop_step < 400);

        let detail: Value = c
            .get(url(&format!("/api/runs/{run_id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(detail["info"]["status"], "stopped");
        assert_eq!(
            detail["metrics"].as_array().unwrap().len() as u64,
            stop_step
        );

        let resumed: Value = c
            .post(url(&format!("/api/runs/{run_id}/resume")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(resumed["run"], run_id.as_str());
        let again = wait_event(&mut events, &mut buf, |v| v["event"]["type"] == "Started").await;
        assert_eq!(again["event"]["start_step"].as_u64(), Some(stop_step));
        c.post(url(&format!(
            "/api/jobs/{}/stop",
            resumed["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
        wait_event(&mut events, &mut buf, |v| v["event"]["type"] == "Stopped").await;

        let ex: Value = c
            .post(url(&format!("/api/runs/{run_id}/export")))
            .json(&json!({"format": "gguf", "quantization": "q8_0"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let done = wait_event(&mut events, &mut buf, |v| {
            v["job"] == ex["id"]
                && matches!(v["event"]["type"].as_str(), Some("Finished" | "Failed"))
        })
        .await;
        assert_eq!(done["event"]["type"], "Finished", "{done}");
        assert!(done["event"]["path"]
            .as_str()
            .unwrap()
            .ends_with("gguf-q8_0"));

        let push: Value = c
            .post(url(&format!("/api/runs/{run_id}/push")))
            .json(&json!({"name": "served", "quantization": "q8_0"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let done = wait_event(&mut events, &mut buf, |v| {
            v["job"] == push["id"]
                && matches!(v["event"]["type"].as_str(), Some("Finished" | "Failed"))
        })
        .await;
        assert_eq!(done["event"]["type"], "Finished", "{done}");
        let status: Value = c
            .get(url("/api/ollama/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["running"], true);
        let models: Value = c
            .get(url("/api/ollama/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models[0]["name"], "served:latest");
        let reply: Value = c
            .post(url("/api/ollama/chat"))
            .json(&json!({"model": "served", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(reply["role"], "assistant");

        let missing = c.get(url("/api/runs/nope")).send().await.unwrap();
        assert_eq!(missing.status(), 404);
        let body: Value = missing.json().await.unwrap();
        assert!(body["hint"].is_string());
    });
}

#[test]
fn a_repo_id_downloads_as_a_job_then_inspects_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "qwen2");
    let mut repos = std::collections::BTreeMap::new();
    repos.insert(
        "test-org/tiny".to_string(),
        hub_standin::Repo {
            dir: model.clone(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            token: None,
        },
    );
    let hub = hub_standin::HubStandIn::start(repos, None).unwrap();
    let ui = tempfile::tempdir().unwrap();
    std::fs::write(ui.path().join("index.html"), "app").unwrap();
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--port",
            "0",
            "--ui-dir",
            ui.path().to_str().unwrap(),
        ])
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HUB_CACHE", tmp.path().join("hf"))
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let s = Server {
        url: line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_string(),
        child,
    };
    let c = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", s.url);
    rt().block_on(async {
        let before = c
            .post(url("/api/models/inspect"))
            .json(&json!({"model": "test-org/tiny"}))
            .send()
            .await
            .unwrap();
        assert_eq!(before.status(), 404);
        let body: Value = before.json().await.unwrap();
        assert!(
            body["hint"].as_str().unwrap().contains("Download"),
            "{body}"
        );

        let mut events = c.get(url("/api/events")).send().await.unwrap();
        let mut buf = String::new();
        let job: Value = c
            .post(url("/api/models/download"))
            .json(&json!({"model": "test-org/tiny"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(job["kind"], "download");
        let progress = wait_event(&mut events, &mut buf, |v| {
            v["event"]["type"] == "Progress" && v["event"]["stage"] == "download model.safetensors"
        })
        .await;
        assert!(progress["event"]["total"].as_u64().unwrap() > 0);
        let done = wait_event(&mut events, &mut buf, |v| {
            v["job"] == job["id"]
                && matches!(v["event"]["type"].as_str(), Some("Finished" | "Failed"))
        })
        .await;
        assert_eq!(done["event"]["type"], "Finished", "{done}");
        let info: Value = c
            .post(url("/api/models/inspect"))
            .json(&json!({"model": "test-org/tiny"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(info["architecture"], "Qwen2ForCausalLM", "{info}");
    });
}
