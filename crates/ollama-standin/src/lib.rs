//! A stand-in for Ollama's REST API on 127.0.0.1, for tests of "Send to Ollama" (Ollama
//! itself cannot be installed here). It behaves as Ollama's server code does where our
//! client depends on it: blobs are verified against their sha256 digest (400 on a
//! mismatch), `create` refuses unknown digests and adapters with Ollama's messages and
//! streams status lines, `show` returns what was stored, `delete` 404s on unknown
//! names. It does not run models: `chat` answers with a fixed sentence naming the model
//! and the template it would use.
//!
//! It plays one [`Profile`] at a time, one per Ollama release line whose behaviour our
//! client must meet (`legacy` ≤0.29, `llama-server` 0.30–0.33, `no-adapters` ≥0.34.1);
//! push tests run against each. Across all profiles, as Ollama's source has it: a
//! TEMPLATE is parsed as a Go template at create, a missing blob is an error line after
//! `parsing GGUF` (HTTP 200), errors after the first line are bare `{"error": …}` lines,
//! an empty `files` or `adapters` map is "unknown type", names resolve
//! case-insensitively, and `/api/show` reports `capabilities` and trims `model_info`.
//!
//! Faults for tests: a slow server, an error line in the create stream, dying (all
//! connections dropped) after some upload bytes, and hostile servers: replies that never
//! end, a status line that never ends, a status stream that never ends, an upload that
//! is read but never answered (or not read at all), a blob check, create or show that is
//! never answered, and a chat reply chosen by the test (e.g. one carrying terminal
//! escape sequences).

mod gguf_meta;
mod go_template;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The Ollama release line the stand-in behaves as (`../shared/notes/ollama.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// 0.12–0.29: the Modelfile's Go template is always used, adapters are accepted,
    /// and qwen3 runs on Ollama's Go engine, which cannot apply an adapter: the model is
    /// created and fails at its first load ("loras are not yet implemented").
    Legacy,
    /// 0.30–0.33: every GGUF runs in llama.cpp's llama-server. A GGUF chat template
    /// that mentions tools, `tool_call` or `<think>` is rendered natively and is what
    /// `/api/show` returns (`PreferChatTemplate`); create re-validates each GGUF
    /// (`llama-quantize … COPY`: [`VALIDATING_LINES`] counted status lines, `verifying
    /// conversion`, then a silent hash of the copy); adapters are accepted.
    LlamaServer,
    /// 0.34.1 and later: as `LlamaServer`, but adapters are refused.
    #[default]
    NoAdapters,
}

/// The `validating GGUF model` lines a llama-server-era create sends per GGUF.
pub const VALIDATING_LINES: u64 = 300;

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Legacy, Profile::LlamaServer, Profile::NoAdapters];

    /// The version `/api/version` reports.
    pub fn version(self) -> &'static str {
        match self {
            Profile::Legacy => "0.29.0",
            Profile::LlamaServer => "0.33.0",
            Profile::NoAdapters => "0.34.1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::Legacy => "legacy",
            Profile::LlamaServer => "llama-server",
            Profile::NoAdapters => "no-adapters",
        }
    }

    pub fn parse(name: &str) -> Option<Profile> {
        Profile::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn accepts_adapters(self) -> bool {
        self != Profile::NoAdapters
    }

    /// Runs GGUFs in llama-server: native chat templates, validation at create.
    pub fn llama_server(self) -> bool {
        self != Profile::Legacy
    }
}

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The Ollama release line to behave as.
    pub profile: Profile,
    /// Every reply waits this long first.
    pub delay: Option<Duration>,
    /// `create` streams a few status lines, then `{"error": this}`.
    pub create_error: Option<String>,
    /// The whole server dies (connections dropped) once this many upload bytes arrived.
    pub die_after_upload_bytes: Option<u64>,
    /// Reported by `/api/version` (default: the profile's version).
    pub version: Option<String>,
    /// `/api/tags`, `/api/show` and `/api/chat` answer 200 with a JSON body that never ends.
    pub endless_replies: bool,
    /// `/api/create` answers 200, then sends one status line that never ends.
    pub endless_status_line: bool,
    /// `/api/create` sends a valid status line every 20 ms and never finishes.
    pub endless_status: bool,
    /// `POST /api/blobs/...` reads the whole upload, then never answers.
    pub hang_after_upload: bool,
    /// `POST /api/blobs/...` reads nothing and never answers.
    pub hang_upload: bool,
    /// `/api/create` never answers, not even with headers.
    pub hang_create: bool,
    /// `HEAD /api/blobs/...` (does Ollama have this blob?) never answers.
    pub hang_blob_check: bool,
    /// `/api/show` of a model that exists never answers (a missing one still 404s), so
    /// the check after a create hangs.
    pub hang_show_of_existing: bool,
    /// `/api/chat` answers with this content instead of the fixed sentence.
    pub chat_reply: Option<String>,
    /// How long the silent hash after a llama-server-era validation takes (default
    /// 100 ms).
    pub silent_hash: Option<Duration>,
    /// The create stream ends silently (no `success`, no error) after writing the
    /// manifest: the model exists but the client hears nothing more.
    pub create_goes_silent: bool,
    /// `/api/chat` fails with this error (HTTP 500), as a model that was created but
    /// cannot be loaded.
    pub load_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Model {
    name: String,
    files: BTreeMap<String, String>,
    adapters: BTreeMap<String, String>,
    template: String,
    system: String,
    parameters: Map<String, Value>,
    model_info: Map<String, Value>,
    /// The GGUF's `tokenizer.chat_template` (kept out of `model_info`, as Ollama does).
    chat_template: String,
    size: u64,
    modified_at: String,
}

struct Inner {
    blobs: PathBuf,
    models: Mutex<BTreeMap<String, Model>>,
    faults: Faults,
    received: AtomicU64,
    kill: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

type Shared = Arc<Inner>;

/// A running stand-in; dropping it stops the server.
pub struct StandIn {
    pub addr: SocketAddr,
    blobs: PathBuf,
    _keep: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    /// Starts on a free port with a fresh blob store.
    pub fn start(faults: Faults) -> std::io::Result<StandIn> {
        let dir = tempfile::tempdir()?;
        let blobs = dir.path().to_path_buf();
        let mut s = Self::start_at("127.0.0.1:0".parse().expect("literal"), blobs, faults)?;
        s._keep = Some(dir);
        Ok(s)
    }

    /// Starts on `addr` with blobs kept in `blobs` (so a "restarted" server keeps them).
    pub fn start_at(addr: SocketAddr, blobs: PathBuf, faults: Faults) -> std::io::Result<StandIn> {
        std::fs::create_dir_all(&blobs)?;
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
        let inner = Arc::new(Inner {
            blobs: blobs.clone(),
            models: Mutex::new(BTreeMap::new()),
            faults,
            received: AtomicU64::new(0),
            kill: Mutex::new(Some(kill_tx)),
        });
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = router(inner);
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stop_rx => {}
                    _ = kill_rx => {}
                }
            });
            // Dropping the runtime here aborts every connection task mid-flight,
            // like a crashed server.
            rt.shutdown_background();
        });
        Ok(StandIn {
            addr,
            blobs,
            _keep: None,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn blobs_dir(&self) -> &std::path::Path {
        &self.blobs
    }

    /// Stops the server and waits until its port is closed.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// True once the server is gone (stopped or died from a fault).
    pub fn is_dead(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route("/api/version", get(version))
        .route("/api/blobs/{digest}", any(blob))
        .route("/api/create", post(create))
        .route("/api/tags", get(tags))
        .route("/api/show", post(show))
        .route("/api/delete", axum::routing::delete(delete))
        .route("/api/chat", post(chat))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn delay(s: &Inner) {
    if let Some(d) = s.faults.delay {
        tokio::time::sleep(d).await;
    }
}

async fn version(State(s): State<Shared>) -> Response {
    delay(&s).await;
    let v = s
        .faults
        .version
        .clone()
        .unwrap_or_else(|| s.faults.profile.version().into());
    Json(json!({ "version": v })).into_response()
}

/// `sha256:<64 hex>` → the blob file name Ollama uses (`sha256-<hex>`).
fn blob_file(s: &Inner, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| s.blobs.join(format!("sha256-{hex}")))
}

async fn blob(
    State(s): State<Shared>,
    method: Method,
    UrlPath(digest): UrlPath<String>,
    body: Body,
) -> Response {
    delay(&s).await;
    let Some(path) = blob_file(&s, &digest) else {
        return error(StatusCode::BAD_REQUEST, "invalid digest format");
    };
    match method {
        Method::HEAD => {
            if s.faults.hang_blob_check {
                return std::future::pending().await;
            }
            if path.is_file() {
                StatusCode::OK.into_response()
            } else {
                StatusCode::NOT_FOUND.into_response()
            }
        }
        Method::POST => {
            if s.faults.hang_upload {
                return std::future::pending().await;
            }
            if path.is_file() {
                // Ollama answers 200 without reading a body it already has.
                return StatusCode::OK.into_response();
            }
            let tmp = path.with_extension("partial");
            let Ok(mut file) = std::fs::File::create(&tmp) else {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot write blob");
            };
            let mut hasher = Sha256::new();
            let mut stream = body.into_data_stream();
            while let Some(chunk) = stream.next().await {
                let Ok(chunk) = chunk else {
                    let _ = std::fs::remove_file(&tmp);
                    return error(StatusCode::BAD_REQUEST, "upload interrupted");
                };
                hasher.update(&chunk);
                if file.write_all(&chunk).is_err() {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot write blob");
                }
                let got =
                    s.received.fetch_add(chunk.len() as u64, Ordering::SeqCst) + chunk.len() as u64;
                if s.faults.die_after_upload_bytes.is_some_and(|n| got >= n) {
                    if let Some(kill) = s.kill.lock().ok().and_then(|mut k| k.take()) {
                        let _ = kill.send(());
                    }
                    std::future::pending::<()>().await;
                }
            }
            drop(file);
            if s.faults.hang_after_upload {
                let _ = std::fs::remove_file(&tmp);
                return std::future::pending().await;
            }
            let got = format!("sha256:{:x}", hasher.finalize());
            if got != digest {
                let _ = std::fs::remove_file(&tmp);
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("digest mismatch, expected \"{digest}\", got \"{got}\""),
                );
            }
            if std::fs::rename(&tmp, &path).is_err() {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store blob");
            }
            StatusCode::CREATED.into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

#[derive(Deserialize)]
struct CreateReq {
    #[serde(default)]
    model: String,
    #[serde(default)]
    name: String,
    files: Option<BTreeMap<String, String>>,
    adapters: Option<BTreeMap<String, String>>,
    #[serde(default)]
    template: String,
    #[serde(default)]
    system: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    from: String,
}

fn valid_name(name: &str) -> bool {
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (name, None),
    };
    let ok = |p: &str, tag: bool| {
        !p.is_empty()
            && p.len() <= 80
            && p.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || (tag && c == '_'))
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let parts: Vec<&str> = path.split('/').collect();
    tag.is_none_or(|t| ok(t, true)) && parts.len() <= 3 && ok(parts[parts.len() - 1], false)
}

/// Ollama stores `name` as `name:latest` when no tag is given.
fn full_name(name: &str) -> String {
    match name.rsplit_once(':') {
        Some((_, t)) if !t.contains('/') => name.to_string(),
        _ => format!("{name}:latest"),
    }
}

/// Names resolve case-insensitively: the store's key of a name.
fn key(name: &str) -> String {
    full_name(name).to_lowercase()
}

async fn create(State(s): State<Shared>, body: axum::body::Bytes) -> Response {
    delay(&s).await;
    if s.faults.hang_create {
        return std::future::pending().await;
    }
    if s.faults.endless_status_line {
        return endless("{\"status\": \"", "x", "application/x-ndjson");
    }
    if s.faults.endless_status {
        let lines = futures_util::stream::unfold(0u64, |n| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let line = format!("{{\"status\": \"pulling layer {n}\"}}\n");
            Some((Ok::<_, std::io::Error>(line), n + 1))
        });
        return Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(Body::from_stream(lines))
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "stream"));
    }
    if body.is_empty() {
        return error(StatusCode::BAD_REQUEST, "missing request body");
    }
    let req: CreateReq = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Ollama tells the two kinds of create apart by which map is present: an empty
    // one matches neither.
    if req.files.as_ref().is_some_and(BTreeMap::is_empty)
        || req.adapters.as_ref().is_some_and(BTreeMap::is_empty)
    {
        return error(StatusCode::BAD_REQUEST, "unknown type");
    }
    let files = req.files.clone().unwrap_or_default();
    let adapters = req.adapters.clone().unwrap_or_default();
    if !adapters.is_empty() && !s.faults.profile.accepts_adapters() {
        return error(
            StatusCode::BAD_REQUEST,
            "LoRA adapters are no longer supported",
        );
    }
    for k in files.keys().chain(adapters.keys()) {
        if k.starts_with('/') || k.contains("..") {
            return error(StatusCode::BAD_REQUEST, "file path must be relative");
        }
    }
    let name = if req.model.is_empty() {
        req.name.clone()
    } else {
        req.model.clone()
    };
    if !valid_name(&name) {
        return error(StatusCode::BAD_REQUEST, "invalid model name");
    }
    if files.is_empty() && req.from.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "neither 'from' or 'files' was specified",
        );
    }
    let mut blobs = Vec::new();
    for (digest, adapter) in files
        .values()
        .map(|d| (d, false))
        .chain(adapters.values().map(|d| (d, true)))
    {
        let Some(path) = blob_file(&s, digest) else {
            return error(StatusCode::BAD_REQUEST, "invalid digest format");
        };
        blobs.push((path, digest.clone(), adapter));
    }

    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(16);
    let s2 = s.clone();
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(v).await.is_ok() }
        };
        send(json!({"status": "parsing GGUF"})).await;
        let profile = s2.faults.profile;
        let mut model_info = Map::new();
        let mut size = 0;
        for (path, digest, adapter) in &blobs {
            // A blob that was never uploaded fails here, after the first line: Ollama
            // opens it while parsing, so the error is a line, not an HTTP status.
            if !path.is_file() {
                let msg = format!("open {}: no such file or directory", path.display());
                send(json!({ "error": msg })).await;
                return;
            }
            match gguf_meta::read(path) {
                Ok(meta) if !adapter => {
                    model_info = meta.kv;
                    model_info.insert("general.tensor_count".into(), json!(meta.tensor_count));
                    model_info.insert("general.gguf_version".into(), json!(meta.version));
                }
                Ok(_) => {}
                Err(e) => {
                    send(json!({ "error": e.to_string() })).await;
                    return;
                }
            }
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            size += bytes;
            if profile.llama_server() {
                let n = VALIDATING_LINES;
                for i in 1..=n {
                    let line = json!({"status": "validating GGUF model",
                        "digest": "0000000000000000000", "total": bytes, "completed": bytes * i / n});
                    send(line).await;
                }
                send(json!({"status": "verifying conversion"})).await;
                let pause = s2.faults.silent_hash.unwrap_or(Duration::from_millis(100));
                tokio::time::sleep(pause).await;
            }
            send(json!({"status": format!("using existing layer {digest}")})).await;
        }
        if let Some(msg) = &s2.faults.create_error {
            send(json!({"error": msg})).await;
            return;
        }
        if !req.template.is_empty() {
            if let Err(msg) = go_template::check(&req.template) {
                send(json!({ "error": msg })).await;
                return;
            }
        }
        for what in ["template", "system", "params"] {
            send(json!({"status": format!("creating new layer sha256:{}", hex_of(what))})).await;
        }
        send(json!({"status": "writing manifest"})).await;
        // Ollama's model_info: no name, no chat template (arrays past 5 items are
        // empty already: gguf_meta).
        let chat_template = model_info
            .remove("tokenizer.chat_template")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        model_info.remove("general.name");
        let model = Model {
            name: full_name(&name),
            files,
            adapters,
            template: req.template.clone(),
            system: req.system.clone(),
            parameters: req.parameters.clone(),
            model_info,
            chat_template,
            size,
            modified_at: now(),
        };
        if let Ok(mut models) = s2.models.lock() {
            models.insert(key(&name), model);
        }
        if s2.faults.create_goes_silent {
            // Keep the stream open without a word, as a server stuck after the fact.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        send(json!({"status": "success"})).await;
    });
    let lines = tokio_stream(rx).map(|v| Ok::<_, std::io::Error>(format!("{v}\n")));
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "stream"))
}

/// A 200 reply that starts with `head` and repeats `item` forever, as fast as the
/// client reads.
fn endless(head: &'static str, item: &'static str, content_type: &str) -> Response {
    let chunk = axum::body::Bytes::from(item.repeat((64 << 10) / item.len()));
    let body = futures_util::stream::once(async move {
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(head.as_bytes()))
    })
    .chain(futures_util::stream::repeat_with(move || Ok(chunk.clone())));
    Response::builder()
        .header("content-type", content_type)
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "stream"))
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Value>,
) -> impl futures_util::Stream<Item = Value> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn hex_of(s: &str) -> String {
    format!("{:x}", Sha256::digest(s.as_bytes()))
}

/// The current time as RFC 3339 UTC, the form Ollama uses for `modified_at`.
fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's method).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn tags(State(s): State<Shared>) -> Response {
    delay(&s).await;
    if s.faults.endless_replies {
        return endless(
            "{\"models\": [",
            "{\"name\": \"m:latest\", \"size\": 1},",
            "application/json",
        );
    }
    let models = s.models.lock().map(|m| m.clone()).unwrap_or_default();
    let list: Vec<Value> = models
        .values()
        .map(|m| {
            json!({
                "name": m.name, "model": m.name, "modified_at": m.modified_at, "size": m.size,
                "digest": hex_of(&m.name),
                "details": {"format": "gguf", "family": m.model_info.get("general.architecture")},
            })
        })
        .collect();
    Json(json!({ "models": list })).into_response()
}

#[derive(Deserialize)]
struct NameReq {
    #[serde(default)]
    model: String,
    #[serde(default)]
    name: String,
}

impl NameReq {
    /// The store's key of the name asked for.
    fn get(&self) -> String {
        key(if self.model.is_empty() {
            &self.name
        } else {
            &self.model
        })
    }
}

fn lookup(s: &Inner, name: &str) -> Option<Model> {
    s.models.lock().ok()?.get(name).cloned()
}

/// A string as Go's `%#v` prints it (`strconv.Quote`): quotes and backslashes
/// escaped, `\n`, `\t`, `\r` and other control characters as escapes.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Ollama prints parameters one per line, name padded to 30 columns, values as Go's
/// `%#v` (strings Go-quoted).
fn parameters_text(p: &Map<String, Value>) -> String {
    let mut out = Vec::new();
    for (k, v) in p {
        let values = match v {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        for v in values {
            let shown = match &v {
                Value::String(s) => go_quote(s),
                other => other.to_string(),
            };
            out.push(format!("{k:<30} {shown}"));
        }
    }
    out.join("\n")
}

async fn show(State(s): State<Shared>, Json(req): Json<NameReq>) -> Response {
    delay(&s).await;
    if s.faults.endless_replies {
        return endless("{\"template\": \"", "{{ .Prompt }}", "application/json");
    }
    let name = req.get();
    let Some(m) = lookup(&s, &name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("model '{}' not found", req.model),
        );
    };
    if s.faults.hang_show_of_existing {
        return std::future::pending().await;
    }
    let params = parameters_text(&m.parameters);
    let template = template_in_use(&s, &m).to_string();
    let mut modelfile = format!(
        "FROM {}\nTEMPLATE \"\"\"{}\"\"\"\n",
        m.files.keys().next().cloned().unwrap_or_default(),
        template
    );
    for adapter in m.adapters.keys() {
        modelfile.push_str(&format!("ADAPTER {adapter}\n"));
    }
    if !m.system.is_empty() {
        modelfile.push_str(&format!("SYSTEM \"\"\"{}\"\"\"\n", m.system));
    }
    for line in params.lines() {
        let mut it = line.splitn(2, ' ');
        modelfile.push_str(&format!(
            "PARAMETER {} {}\n",
            it.next().unwrap_or(""),
            it.next().unwrap_or("").trim()
        ));
    }
    Json(json!({
        "modelfile": modelfile,
        "parameters": params,
        "template": template,
        "system": m.system,
        "details": {"format": "gguf", "family": m.model_info.get("general.architecture"),
                    "parameter_size": "", "quantization_level": m.model_info.get("general.file_type")},
        "model_info": m.model_info,
        "capabilities": capabilities(&template),
    }))
    .into_response()
}

/// The template Ollama renders prompts with: the Modelfile's Go template, except in
/// the llama-server era for a chat template that mentions tools or thinking, which
/// llama-server renders itself (`PreferChatTemplate`).
fn template_in_use<'a>(s: &Inner, m: &'a Model) -> &'a str {
    let native = s.faults.profile.llama_server()
        && ["tools", "tool_call", "<think>"]
            .iter()
            .any(|w| m.chat_template.contains(w));
    if native {
        &m.chat_template
    } else if m.template.is_empty() {
        "{{ .Prompt }}"
    } else {
        &m.template
    }
}

/// What `/api/show` says a model can do, read from its template as Ollama does.
fn capabilities(template: &str) -> Vec<&'static str> {
    let mut out = vec!["completion"];
    if template.contains(".Tools") || template.contains("tools") {
        out.push("tools");
    }
    if template.contains(".Think") || template.contains("<think>") {
        out.push("thinking");
    }
    out
}

async fn delete(State(s): State<Shared>, Json(req): Json<NameReq>) -> Response {
    delay(&s).await;
    let name = req.get();
    let removed = s.models.lock().ok().and_then(|mut m| m.remove(&name));
    match removed {
        Some(_) => StatusCode::OK.into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("model '{}' not found", req.model),
        ),
    }
}

#[derive(Deserialize)]
struct ChatReq {
    model: String,
    #[serde(default)]
    messages: Vec<Value>,
}

async fn chat(State(s): State<Shared>, Json(req): Json<ChatReq>) -> Response {
    delay(&s).await;
    if s.faults.endless_replies {
        return endless(
            "{\"message\": {\"role\": \"assistant\", \"content\": \"",
            "la ",
            "application/json",
        );
    }
    let Some(m) = lookup(&s, &key(&req.model)) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("model '{}' not found, try pulling it first", req.model),
        );
    };
    if let Some(msg) = &s.faults.load_error {
        return error(StatusCode::INTERNAL_SERVER_ERROR, msg.clone());
    }
    let family = m
        .model_info
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("?");
    if s.faults.profile == Profile::Legacy && family == "qwen3" && !m.adapters.is_empty() {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "llama runner process has terminated: loras are not yet implemented",
        );
    }
    let content = s.faults.chat_reply.clone().unwrap_or_else(|| {
        format!(
            "stand-in reply from {} ({family}, {} messages, template {} chars)",
            m.name,
            req.messages.len(),
            template_in_use(&s, &m).len()
        )
    });
    Json(json!({
        "model": m.name, "created_at": now(),
        "message": {"role": "assistant", "content": content},
        "done": true, "done_reason": "stop",
    }))
    .into_response()
}
