//! `backprop serve` over real HTTP: the token rule, uploads, data check, a training job
//! streamed over SSE that is stopped and resumed, export, push to the Ollama stand-in,
//! and the static UI files (no path escapes). Then hostile clients: forged `Host` and
//! `Origin`, weak tokens, run ids that are paths, oversized and concurrent uploads,
//! oversized JSON, secrets in checked files, abandoned checks, and a burst of calls.

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

impl Server {
    fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// utime + stime of the server process, in seconds (Linux).
    fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    }

    /// A line of /proc/<pid>/status in KiB, e.g. "VmHWM" (Linux).
    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .parse()
            .unwrap()
    }
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
    let s = serve(
        &["--token", "s3cret-s3cret-s3cret"],
        "127.0.0.1:1",
        ui.path(),
    );
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
            .bearer_auth("s3cret-s3cret-s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .get(format!("{}/api/events?token=s3cret-s3cret-s3cret", s.url))
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

// ---- hostile clients -------------------------------------------------------------

/// One HTTP/1.1 exchange over a plain socket, so the test controls every header (a
/// forged `Host`, a raw `..` in the path) exactly as an attacker's browser or script
/// would send it. Returns the status and the body.
fn raw(addr: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    parse_response(&out)
}

fn parse_response(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn get_with_host(s: &Server, path: &str, host: &str) -> (u16, String) {
    raw(
        &s.addr(),
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
}

fn ui_dir() -> tempfile::TempDir {
    let ui = tempfile::tempdir().unwrap();
    std::fs::write(ui.path().join("index.html"), "app").unwrap();
    ui
}

#[test]
fn without_a_token_only_the_servers_own_loopback_names_are_answered() {
    let ui = ui_dir();
    let s = serve(&[], "127.0.0.1:1", ui.path());
    let port = s.port();
    // DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
    for forged in [
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        "127.0.0.1".to_string(),
        format!("localhost.evil.example:{port}"),
    ] {
        for path in ["/api/info", "/api/runs", "/"] {
            let (status, body) = get_with_host(&s, path, &forged);
            assert_eq!(status, 421, "Host {forged} {path}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("port {port}")),
                "{v}"
            );
            assert!(v["hint"].as_str().unwrap().contains("--token"), "{v}");
        }
    }
    for own in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (status, body) = get_with_host(&s, "/api/info", &own);
        assert_eq!(status, 200, "Host {own}: {body}");
    }
}

#[test]
fn cross_site_requests_change_nothing_and_same_site_ones_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "qwen2");
    let runs = tmp.path().join("runs");
    let ui = ui_dir();
    let s = serve(
        &["--runs-dir", runs.to_str().unwrap()],
        "127.0.0.1:1",
        ui.path(),
    );
    let own = format!("http://127.0.0.1:{}", s.port());
    let c = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", s.url);
    let datasets = tmp.path().join("datasets");
    rt().block_on(async {
        let mut config: Value = c
            .get(url("/api/config/defaults"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        config["model"] = json!(model);
        config["data"] = json!(common::samples().join("alpaca.jsonl"));
        config["steps"] = json!(100000);
        config["max_seq_len"] = json!(64);
        // A cross-site page cannot start a job...
        let r = c
            .post(url("/api/runs"))
            .header("Origin", "https://evil.example")
            .json(&json!({"config": config}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("evil.example"),
            "{body}"
        );
        assert!(body["hint"].as_str().unwrap().contains(&own), "{body}");
        let jobs: Value = c
            .get(url("/api/jobs"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(jobs, json!([]));
        // ...but the server's own page can.
        let job: Value = c
            .post(url("/api/runs"))
            .header("Origin", own.as_str())
            .json(&json!({"config": config}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = job["id"].as_str().unwrap().to_string();
        // A cross-site simple POST (a form, no preflight) cannot stop it, upload or check.
        for (path, ctype, body) in [
            (format!("/api/jobs/{id}/stop"), "text/plain", String::new()),
            (
                "/api/datasets?name=x.jsonl".to_string(),
                "text/plain",
                "{}\n".to_string(),
            ),
            (
                "/api/data/check".to_string(),
                "text/plain",
                json!({"data": "/etc/hostname", "model": model}).to_string(),
            ),
        ] {
            for origin in ["https://evil.example", "null", "http://127.0.0.1:1"] {
                let r = c
                    .post(url(&path))
                    .header("Origin", origin)
                    .header("Content-Type", ctype)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 403, "{path} from {origin}");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let jobs: Value = c
            .get(url("/api/jobs"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(jobs[0]["state"], "running", "{jobs}");
        assert!(!datasets.exists() || std::fs::read_dir(&datasets).unwrap().count() == 0);
        // Same-origin stop works; clients without an Origin (curl) are not web pages.
        let r = c
            .post(url(&format!("/api/jobs/{id}/stop")))
            .header("Origin", own.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let jobs: Value = c
                .get(url("/api/jobs"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if jobs[0]["state"] != "running" {
                assert_eq!(jobs[0]["state"], "stopped", "{jobs}");
                break;
            }
            assert!(Instant::now() < deadline, "the job did not stop: {jobs}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn short_or_blank_tokens_are_refused_at_startup() {
    for token in [
        "s3cret",
        "123456789012345",
        "                    ",
        "\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
    ] {
        let out = Command::new(bin())
            .args(["serve", "--port", "0", "--token", token])
            .env_remove("BACKPROP_TOKEN")
            .output()
            .unwrap();
        assert!(!out.status.success(), "token {token:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("16") && err.contains("--token"), "{err}");
    }
    let out = Command::new(bin())
        .args(["serve", "--port", "0"])
        .env("BACKPROP_TOKEN", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("too short"));
}

#[test]
fn a_token_in_the_address_is_accepted_only_by_the_event_stream() {
    let ui = ui_dir();
    let token = "0123456789abcdef-token";
    let s = serve(&["--token", token], "127.0.0.1:1", ui.path());
    let c = reqwest::Client::new();
    rt().block_on(async {
        for path in ["/api/info", "/api/runs", "/api/jobs"] {
            let r = c
                .get(format!("{}{path}?token={token}", s.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{path}");
            let body: Value = r.json().await.unwrap();
            assert!(
                body["hint"].as_str().unwrap().contains("only on /api/events"),
                "{body}"
            );
        }
        let r = c
            .post(format!("{}/api/jobs/j1/stop?token={token}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(format!("{}/api/events?token={token}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // With a token the Host is not the protection: a proxy or tunnel may rename it.
        let (status, _) = raw(
            &s.addr(),
            &format!(
                "GET /api/info HTTP/1.1\r\nHost: gpu-box.lan:443\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(status, 200);
    });
}

#[test]
fn run_ids_that_are_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A real run outside the server's runs dir: what `..` or an absolute path would reach.
    let victim = common::trained_run(tmp.path());
    let victim_id = std::path::Path::new(&victim)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let runs = tmp.path().join("served-runs");
    std::fs::create_dir_all(&runs).unwrap();
    let ui = ui_dir();
    let s = serve(
        &["--runs-dir", runs.to_str().unwrap()],
        "127.0.0.1:1",
        ui.path(),
    );
    let host = format!("127.0.0.1:{}", s.port());
    let abs = victim.replace('/', "%2F");
    for id in [
        "..".to_string(),
        "%2e%2e".to_string(),
        ".".to_string(),
        format!("..%2Fruns%2F{victim_id}"),
        format!("%2e%2e%2fruns%2f{victim_id}"),
        abs.clone(),
        "a%2Fb".to_string(),
        "a%5Cb".to_string(),
        ".hidden".to_string(),
        "x%00y".to_string(),
        "x".repeat(200),
    ] {
        for (method, suffix) in [("GET", ""), ("POST", "/resume"), ("POST", "/export")] {
            let body = if suffix == "/export" {
                r#"{"format":"adapter","quantization":"f32"}"#
            } else {
                ""
            };
            let (status, resp) = raw(
                &s.addr(),
                &format!(
                    "{method} /api/runs/{id}{suffix} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ),
            );
            assert_eq!(status, 400, "{method} {id}{suffix}: {resp}");
            let v: Value = serde_json::from_str(&resp).unwrap();
            assert!(v["error"].as_str().unwrap().contains("run id"), "{v}");
            assert!(v.get("info").is_none() && v.get("id").is_none(), "{v}");
        }
    }
    // Nothing was started or written next to the victim.
    let (_, jobs) = get_with_host(&s, "/api/jobs", &host);
    assert_eq!(jobs, "[]");
    assert!(!std::path::Path::new(&victim).join("exports").exists());
    let (status, _) = get_with_host(&s, &format!("/api/runs/{victim_id}"), &host);
    assert_eq!(status, 404);
}

/// Sends the request head, then `body_len` bytes of `b'x'` from another thread (a
/// client that keeps sending after the server refused), and returns the response.
fn upload_raw(s: &Server, head: &str, body_len: usize) -> (u16, String) {
    send_raw(s, head, vec![b'x'; body_len])
}

/// [`upload_raw`] with a given body.
fn send_raw(s: &Server, head: &str, body: Vec<u8>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(s.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(head.as_bytes()).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let chunked = head.contains("chunked");
    let sender = std::thread::spawn(move || {
        for chunk in body.chunks(64 << 10) {
            let ok = if chunked {
                writer
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .and_then(|()| writer.write_all(chunk))
                    .and_then(|()| writer.write_all(b"\r\n"))
            } else {
                writer.write_all(chunk)
            };
            if ok.is_err() {
                return;
            }
        }
        if chunked {
            let _ = writer.write_all(b"0\r\n\r\n");
        }
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the response head and its JSON body are in (the server may reset the
    // connection right after, since it stops reading a refused body).
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
            break;
        }
    }
    drop(conn);
    let _ = sender.join();
    parse_response(&out)
}

fn upload_files(datasets: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(datasets)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_upload_over_the_cap_is_refused_and_its_partial_file_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let datasets = tmp.path().join("datasets");
    let ui = ui_dir();
    let s = serve(
        &[
            "--runs-dir",
            runs.to_str().unwrap(),
            "--max-upload-mib",
            "1",
        ],
        "127.0.0.1:1",
        ui.path(),
    );
    let host = format!("127.0.0.1:{}", s.port());
    // Declared too large: refused before a byte of the body is read.
    let (status, body) = upload_raw(
        &s,
        &format!("POST /api/datasets?name=big.jsonl HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n", 5u64 << 30),
        0,
    );
    assert_eq!(status, 413, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("1 MiB"), "{v}");
    assert!(
        v["hint"].as_str().unwrap().contains("--max-upload-mib"),
        "{v}"
    );
    // No length given: the stream is cut at the cap, and its partial file goes away.
    let (status, body) = upload_raw(
        &s,
        &format!("POST /api/datasets?name=big.jsonl HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"),
        8 << 20,
    );
    assert_eq!(status, 413, "{body}");
    wait_until("the partial upload is removed", 10, || {
        upload_files(&datasets).is_empty()
    });
    // The server goes on serving, and an upload under the cap still works.
    let (status, _) = get_with_host(&s, "/api/info", &host);
    assert_eq!(status, 200);
    let (status, body) = upload_raw(
        &s,
        &format!("POST /api/datasets?name=ok.jsonl HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"),
        1000,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(upload_files(&datasets).len(), 1);
}

#[test]
fn uploads_stream_to_disk_instead_of_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let ui = ui_dir();
    let s = serve(
        &["--runs-dir", runs.to_str().unwrap()],
        "127.0.0.1:1",
        ui.path(),
    );
    let size: usize = 192 << 20;
    let before = s.status_kib("VmHWM");
    let c = reqwest::Client::new();
    let up: Value = rt().block_on(async {
        let chunks = futures_util::stream::iter(
            (0..size / (1 << 20)).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1 << 20])),
        );
        c.post(format!("{}/api/datasets?name=big.jsonl", s.url))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let path = up["path"].as_str().unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len(), size as u64);
    let grew_mib = (s.status_kib("VmHWM") - before) / 1024;
    eprintln!(
        "peak memory grew by {grew_mib} MiB for a {} MiB upload",
        size >> 20
    );
    assert!(grew_mib < 64, "peak memory grew by {grew_mib} MiB");
}

#[test]
fn uploads_beyond_the_concurrent_limit_are_refused_as_busy() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let datasets = tmp.path().join("datasets");
    let ui = ui_dir();
    let s = serve(
        &["--runs-dir", runs.to_str().unwrap()],
        "127.0.0.1:1",
        ui.path(),
    );
    let host = format!("127.0.0.1:{}", s.port());
    // Two slow uploads hold both slots.
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let mut conn = std::net::TcpStream::connect(s.addr()).unwrap();
            conn.write_all(
                format!("POST /api/datasets?name=slow{i}.jsonl HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n\r\n{{\"text\": ")
                    .as_bytes(),
            )
            .unwrap();
            conn
        })
        .collect();
    wait_until("both slow uploads are being written", 10, || {
        upload_files(&datasets)
            .iter()
            .filter(|f| f.ends_with(".tmp"))
            .count()
            == 2
    });
    let (status, body) = upload_raw(
        &s,
        &format!("POST /api/datasets?name=third.jsonl HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"),
        10,
    );
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("2 uploads"), "{v}");
    // Clients that go away free their slots and leave no partial files.
    drop(slow);
    wait_until("abandoned uploads are removed", 10, || {
        upload_files(&datasets).is_empty()
    });
    let (status, body) = upload_raw(
        &s,
        &format!("POST /api/datasets?name=fourth.jsonl HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"),
        10,
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn json_bodies_over_the_cap_or_malformed_are_refused_without_echoing_them() {
    let ui = ui_dir();
    let s = serve(&[], "127.0.0.1:1", ui.path());
    let c = reqwest::Client::new();
    rt().block_on(async {
        let marker = "SECRET-MARKER-0xDEADBEEF";
        let big = json!({"data": marker.repeat(100_000), "model": marker}).to_string();
        let (status, text) = send_raw(
            &s,
            &format!(
                "POST /api/data/check HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                s.port(),
                big.len()
            ),
            big.into_bytes(),
        );
        assert_eq!(status, 413);
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("1024 KiB"), "{text}");
        for (path, body) in [
            ("/api/data/check", json!({"data": "d", "model": "m", "show": marker})),
            ("/api/runs/x/export", json!({"format": ["a"], "quantization": marker})),
            ("/api/ollama/chat", json!({"model": "m", "messages": [{"role": marker}]})),
        ] {
            let r = c
                .post(format!("{}{path}", s.url))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 422, "{path}");
            let text = r.text().await.unwrap();
            assert!(!text.contains("SECRET"), "{path}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["error"].as_str().unwrap().contains("does not fit"), "{v}");
        }
    });
}

#[test]
fn a_data_check_of_a_file_that_is_no_dataset_shows_none_of_its_text() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "qwen2");
    let secrets = tmp.path().join("credentials");
    std::fs::write(
        &secrets,
        concat!(
            "aws_secret_access_key = SECRET-ONE-wJalrXUtnFEMI\n",
            "{\"SECRET-TWO-api-key\": \"SECRET-THREE-value\", \"token\": 1}\n",
            "{\"messages\": [{\"role\": \"SECRET-FOUR`x`y\", \"content\": \"hi\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"SECRET-FIVE\"}, {\"role\": \"assistant\", \"content\": 5}]}\n",
        ),
    )
    .unwrap();
    let ui = ui_dir();
    let s = serve(&[], "127.0.0.1:1", ui.path());
    let c = reqwest::Client::new();
    rt().block_on(async {
        let r = c
            .post(format!("{}/api/data/check", s.url))
            .json(&json!({"data": secrets, "model": model}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        eprintln!("{text}");
        assert!(!text.contains("SECRET"), "{text}");
        let report: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(report["ok"], false);
        let lines: Vec<u64> = report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["line"].as_u64().unwrap())
            .collect();
        assert!(lines.contains(&1) && lines.contains(&2) && lines.contains(&3), "{report}");
        // A real dataset shows its samples, but never more than a preview's worth.
        let r: Value = c
            .post(format!("{}/api/data/check", s.url))
            .json(&json!({"data": common::samples().join("alpaca.jsonl"), "model": model, "show": 100000}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["stats"]["samples"], 200);
        assert_eq!(r["samples"].as_array().unwrap().len(), 20);
    });
}

/// A dataset big enough that checking it takes a while.
fn big_dataset(dir: &std::path::Path, lines: usize) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("big.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let words = "the quick brown fox jumps over the lazy dog while seven tired engineers watch ";
    for i in 0..lines {
        writeln!(
            f,
            "{}",
            json!({"instruction": format!("question {i}: {}", words.repeat(4)), "output": words.repeat(8)})
        )
        .unwrap();
    }
    path
}

/// Waits until the server has used no CPU for a while; returns its CPU time then.
fn settled_cpu(s: &Server) -> f64 {
    let mut last = s.cpu_s();
    loop {
        std::thread::sleep(Duration::from_millis(700));
        let now = s.cpu_s();
        if now - last < 0.05 {
            return now;
        }
        last = now;
    }
}

#[test]
fn abandoned_data_checks_cannot_pile_up_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture(tmp.path(), "qwen2");
    let data = big_dataset(tmp.path(), 8_000);
    let ui = ui_dir();
    let s = serve(&[], "127.0.0.1:1", ui.path());
    let req = json!({"data": data, "model": model});
    let c = reqwest::Client::new();
    let start_cpu = settled_cpu(&s);
    let t = Instant::now();
    let full: Value = rt().block_on(async {
        c.post(format!("{}/api/data/check", s.url))
            .json(&req)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let wall = t.elapsed();
    assert_eq!(full["ok"], true, "{full}");
    let full_cpu = settled_cpu(&s) - start_cpu;
    eprintln!(
        "one full check: {full_cpu:.2} s CPU, {:.2} s wall",
        wall.as_secs_f64()
    );
    // Eight clients give up early, as a script with a short timeout would.
    rt().block_on(async {
        let give_up = wall / 10;
        let calls = (0..8).map(|_| {
            let c = reqwest::Client::builder().timeout(give_up).build().unwrap();
            let req = req.clone();
            let url = format!("{}/api/data/check", s.url);
            async move { c.post(url).json(&req).send().await.map(|r| r.status()) }
        });
        for r in futures_util::future::join_all(calls).await {
            // Refused as busy at once, or abandoned.
            assert!(r.as_ref().map_or(true, |s| *s == 503), "{r:?}");
        }
    });
    let abandoned_cpu = settled_cpu(&s) - start_cpu - full_cpu;
    eprintln!("eight abandoned checks: {abandoned_cpu:.2} s CPU");
    // At most two checks run at once, and those two stop tokenizing as soon as their
    // clients are gone: together they cost less than one check run to the end.
    assert!(
        abandoned_cpu < full_cpu,
        "eight abandoned checks used {abandoned_cpu:.2} s CPU, one full check {full_cpu:.2} s"
    );
    // A check after them is answered as usual.
    let again = rt().block_on(async {
        c.post(format!("{}/api/data/check", s.url))
            .json(&req)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(again, 200);
}

#[test]
fn two_hundred_concurrent_info_calls_finish_quickly() {
    let ui = ui_dir();
    let s = serve(&[], "127.0.0.1:1", ui.path());
    let c = reqwest::Client::new();
    rt().block_on(async {
        let t = Instant::now();
        let calls = (0..200).map(|_| {
            let c = c.clone();
            let url = format!("{}/api/info", s.url);
            async move { c.get(url).send().await.unwrap().status() }
        });
        let statuses = futures_util::future::join_all(calls).await;
        let took = t.elapsed();
        eprintln!("200 concurrent /api/info calls: {took:?}");
        assert!(statuses.iter().all(|s| *s == 200));
        assert!(took < Duration::from_secs(5), "{took:?}");
    });
}
