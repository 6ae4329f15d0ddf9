//! A client for Ollama's REST API (docs/api.md of the ollama repository): version,
//! blobs, create, tags, show, delete and chat. Async on tokio; `push` wraps it for
//! callers that are not.
//!
//! The server is not trusted: every reply is read with a byte cap and under a deadline
//! (see [`MAX_REPLY_BYTES`] and [`OllamaClient::with_timeout`]), so a broken or hostile
//! host ends a call with an error naming the host and the phase instead of hanging it
//! or filling memory, and error bodies are cut before they reach a message.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::io::ReaderStream;

use super::OllamaError;
use crate::error::error_chain;

pub const DEFAULT_HOST: &str = "http://127.0.0.1:11434";
/// The first release whose `/api/create` takes `files` (digests of uploaded blobs).
pub const MIN_VERSION: (u32, u32, u32) = (0, 5, 7);

/// The first Ollama that runs models of `arch` (qwen3 arrived in 0.6.6).
pub fn min_version_for(arch: crate::model::Arch) -> (u32, u32, u32) {
    match arch {
        crate::model::Arch::Qwen3 => (0, 6, 6),
        _ => MIN_VERSION,
    }
}

/// Most bytes read of one whole reply (version, tags, show, delete, chat). Ollama's
/// `/api/show` leaves the vocabulary out unless asked (`verbose`), so real replies are
/// kilobytes; even a verbose one for a 128k-token vocabulary stays under this.
pub const MAX_REPLY_BYTES: usize = 32 << 20;
/// Longest line of `/api/create`'s status stream; real lines are under 200 bytes.
pub const MAX_STATUS_LINE_BYTES: usize = 1 << 20;
/// Most bytes of status one create may stream; a real create sends a few kilobytes.
pub const MAX_STATUS_BYTES: usize = 16 << 20;
/// A streamed create may take this many timeouts in all (each line still has to come
/// within one timeout).
pub const STREAM_TIMEOUTS: u32 = 10;
/// A create's status line may take this many timeouts: Ollama 0.30+ hashes its
/// validated copy of the GGUF without a word, minutes for a big model.
pub const CREATE_IDLE_TIMEOUTS: u32 = 5;
/// A chat may take this many timeouts: the first use of a model loads it.
pub const CHAT_TIMEOUTS: u32 = 5;
/// Most bytes read of an error reply; only its first [`SHOWN_ERROR_CHARS`] are shown.
const MAX_ERROR_BYTES: usize = 64 << 10;
const SHOWN_ERROR_CHARS: usize = 300;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upload chunk size: small enough that a stall is seen at this granularity.
const UPLOAD_CHUNK: usize = 256 << 10;

#[derive(Debug, Clone)]
pub struct OllamaClient {
    base: String,
    http: reqwest::Client,
    timeout: Duration,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateRequest {
    pub model: String,
    /// File name → `sha256:<hex>` of a blob already uploaded. Left out when empty:
    /// Ollama refuses an empty map ("unknown type").
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub adapters: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub parameters: serde_json::Map<String, Value>,
    pub stream: bool,
}

/// One line of a create's status stream.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateStatus {
    pub status: String,
    /// Bytes done and in all, on the lines of a phase that counts (validation).
    pub completed: Option<u64>,
    pub total: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub modified_at: String,
    #[serde(default)]
    pub digest: String,
}

/// `/api/show`: what Ollama will use when it runs the model.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ShowResponse {
    #[serde(default)]
    pub modelfile: String,
    /// One `name value` per line, as Ollama prints them.
    #[serde(default)]
    pub parameters: String,
    #[serde(default)]
    pub template: String,
    #[serde(default)]
    pub system: String,
    #[serde(default)]
    pub details: Value,
    #[serde(default)]
    pub model_info: Value,
}

impl ShowResponse {
    /// Values of every `stop` line in `parameters`: Ollama prints each as Go's `%#v`
    /// (a Go-quoted string), so the quoting is undone as Go would.
    pub fn stops(&self) -> Vec<String> {
        self.parameters
            .lines()
            .filter_map(|l| l.trim().strip_prefix("stop"))
            .filter(|v| v.starts_with(char::is_whitespace))
            .map(|v| go_unquote(v.trim()))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The Ollama address to use: `configured` when given, else `OLLAMA_HOST`, else the
/// local default (unparsed, as the user wrote it).
pub fn host_setting(configured: Option<&str>) -> String {
    match configured {
        Some(h) => h.to_string(),
        None => std::env::var("OLLAMA_HOST")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_HOST.to_string()),
    }
}

impl OllamaClient {
    /// The server named by `OLLAMA_HOST`, else the local default.
    pub fn from_env() -> Result<Self, OllamaError> {
        Self::new(&host_setting(None))
    }

    /// `host` as Ollama reads OLLAMA_HOST: `host`, `host:port`, `:port` or a URL;
    /// http and port 11434 unless given; 0.0.0.0 (a bind address) means this machine.
    pub fn new(host: &str) -> Result<Self, OllamaError> {
        let base = parse_host(host)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| OllamaError::BadHost {
                value: host.to_string(),
                reason: e.to_string(),
            })?;
        Ok(OllamaClient {
            base,
            http,
            timeout: Duration::from_secs(60),
        })
    }

    /// Bounds every phase of every call: a whole reply (headers and body) within
    /// `timeout`; an upload may never go `timeout` without sending a byte, and must be
    /// answered within `timeout` once the last byte is out; a create's status lines must
    /// each come within `timeout` and all within [`STREAM_TIMEOUTS`] of them; a chat
    /// within [`CHAT_TIMEOUTS`] of them.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn host(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn timed_out(&self, what: &str, limit: Duration) -> OllamaError {
        OllamaError::Timeout {
            host: self.base.clone(),
            what: what.to_string(),
            secs: limit.as_secs_f64(),
        }
    }

    fn too_large(&self, what: &str, detail: String) -> OllamaError {
        OllamaError::TooLarge {
            host: self.base.clone(),
            what: what.to_string(),
            detail,
        }
    }

    /// Runs one network step of `what`, giving up at `deadline` (which is `limit` after
    /// the phase began) with a timeout naming the phase.
    async fn step<T>(
        &self,
        what: &str,
        deadline: Instant,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T, reqwest::Error>>,
    ) -> Result<T, OllamaError> {
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(r) => r.map_err(|e| self.transport(what, e, limit)),
            Err(_) => Err(self.timed_out(what, limit)),
        }
    }

    fn transport(&self, what: &str, e: reqwest::Error, limit: Duration) -> OllamaError {
        if e.is_connect() && e.is_timeout() {
            // A host that drops the connection attempt: nothing listens, or a firewall.
            self.timed_out(
                &format!("the connection attempt (for {what})"),
                CONNECT_TIMEOUT,
            )
        } else if e.is_connect() {
            OllamaError::NotRunning {
                host: self.base.clone(),
            }
        } else if e.is_timeout() {
            self.timed_out(what, limit)
        } else {
            OllamaError::Connection {
                host: self.base.clone(),
                what: what.to_string(),
                message: error_chain(&e),
            }
        }
    }

    /// Reads the rest of `resp`'s body before `deadline`. Past `cap` bytes a reply is
    /// refused, and an error reply (whose start is all that is shown) is cut there.
    async fn read_body(
        &self,
        what: &str,
        mut resp: reqwest::Response,
        cap: usize,
        deadline: Instant,
        limit: Duration,
    ) -> Result<Vec<u8>, OllamaError> {
        let is_error = !resp.status().is_success();
        let mut body = Vec::new();
        while let Some(chunk) = self.step(what, deadline, limit, resp.chunk()).await? {
            if body.len() + chunk.len() > cap {
                if is_error {
                    body.extend_from_slice(&chunk[..cap - body.len()]);
                    break;
                }
                return Err(self.too_large(what, format!("a reply over {}", mib(cap))));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Sends `request` and reads the whole reply within `limit`: the status and body.
    async fn exchange(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
        limit: Duration,
    ) -> Result<(u16, Vec<u8>), OllamaError> {
        let deadline = Instant::now() + limit;
        let resp = self.step(what, deadline, limit, request.send()).await?;
        let status = resp.status().as_u16();
        let cap = if resp.status().is_success() {
            MAX_REPLY_BYTES
        } else {
            MAX_ERROR_BYTES
        };
        let body = self.read_body(what, resp, cap, deadline, limit).await?;
        Ok((status, body))
    }

    /// Turns a non-success status into Ollama's `{"error": ...}` message, cut short.
    fn check(&self, what: &str, status: u16, body: &[u8]) -> Result<(), OllamaError> {
        if (200..300).contains(&status) {
            return Ok(());
        }
        let text = String::from_utf8_lossy(body);
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
            .unwrap_or_else(|| format!("HTTP {status} {}", text.trim()));
        Err(OllamaError::Api {
            what: what.to_string(),
            status,
            message: shorten(&message, SHOWN_ERROR_CHARS),
        })
    }

    /// Reads a non-success reply of a streamed call into its error.
    async fn refused(&self, what: &str, resp: reqwest::Response, limit: Duration) -> OllamaError {
        let status = resp.status().as_u16();
        let deadline = Instant::now() + limit;
        match self
            .read_body(what, resp, MAX_ERROR_BYTES, deadline, limit)
            .await
        {
            Ok(body) => match self.check(what, status, &body) {
                Err(e) => e,
                Ok(()) => self.protocol(what, format!("HTTP {status}")),
            },
            Err(e) => e,
        }
    }

    fn protocol(&self, what: &str, message: String) -> OllamaError {
        OllamaError::Protocol {
            host: self.base.clone(),
            what: what.to_string(),
            message,
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        body: &[u8],
    ) -> Result<T, OllamaError> {
        serde_json::from_slice(body).map_err(|e| self.protocol(what, e.to_string()))
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        path: &str,
    ) -> Result<T, OllamaError> {
        let (status, body) = self
            .exchange(what, self.http.get(self.url(path)), self.timeout)
            .await?;
        self.check(what, status, &body)?;
        self.decode(what, &body)
    }

    /// `GET /api/version`; also the "is it running" probe.
    pub async fn version(&self) -> Result<String, OllamaError> {
        #[derive(Deserialize)]
        struct V {
            version: String,
        }
        let v: V = self.get_json("the version check", "/api/version").await?;
        Ok(v.version)
    }

    /// The version, refused when older than [`MIN_VERSION`].
    pub async fn check_version(&self) -> Result<String, OllamaError> {
        self.check_version_for(MIN_VERSION, "Backpropagate").await
    }

    /// The version, refused when older than `need` (what needs it named in the error).
    pub async fn check_version_for(
        &self,
        need: (u32, u32, u32),
        what: &str,
    ) -> Result<String, OllamaError> {
        let version = self.version().await?;
        if let Some(v) = parse_version(&version) {
            // 0.0.0 is a source build: trust it.
            if v < need.max(MIN_VERSION) && v != (0, 0, 0) {
                let (a, b, c) = need.max(MIN_VERSION);
                return Err(OllamaError::TooOld {
                    version,
                    need: format!("{a}.{b}.{c}"),
                    what: what.to_string(),
                });
            }
        }
        Ok(version)
    }

    /// `HEAD /api/blobs/sha256:<hex>`: does the server already hold this file?
    pub async fn has_blob(&self, digest: &str) -> Result<bool, OllamaError> {
        let what = "the blob check";
        let request = self.http.head(self.url(&format!("/api/blobs/{digest}")));
        let (status, body) = self.exchange(what, request, self.timeout).await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            _ => self.check(what, status, &body).map(|_| false),
        }
    }

    /// `POST /api/blobs/sha256:<hex>` with the file streamed as the body; `progress`
    /// gets (bytes sent, total) as chunks leave. Fails when no byte leaves for one
    /// timeout, or when the reply does not come within one timeout of the last byte.
    pub async fn upload_blob(
        &self,
        path: &Path,
        digest: &str,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<(), OllamaError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let what = format!("the upload of {name}");
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| OllamaError::Connection {
                host: self.base.clone(),
                what: what.clone(),
                message: format!("cannot read {}: {e}", path.display()),
            })?;
        let total = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        // Bytes handed to the connection, and when the last chunk was (ms since start).
        let sent = Arc::new(AtomicU64::new(0));
        let moved_ms = Arc::new(AtomicU64::new(0));
        let stream = {
            let (sent, moved_ms) = (sent.clone(), moved_ms.clone());
            ReaderStream::with_capacity(file, UPLOAD_CHUNK).map(move |chunk| {
                if let Ok(c) = &chunk {
                    let done = sent.fetch_add(c.len() as u64, Ordering::SeqCst) + c.len() as u64;
                    moved_ms.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
                    progress(done, total);
                }
                chunk
            })
        };
        let send = self
            .http
            .post(self.url(&format!("/api/blobs/{digest}")))
            .header(reqwest::header::CONTENT_LENGTH, total)
            .body(reqwest::Body::wrap_stream(stream))
            .send();
        tokio::pin!(send);
        let limit = self.timeout;
        let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let phase = |done: u64| {
            if done >= total {
                format!("{what} (all {} sent; no reply)", bytes(total))
            } else {
                format!("{what} (stuck after {} of {})", bytes(done), bytes(total))
            }
        };
        let resp = loop {
            tokio::select! {
                r = &mut send => {
                    let done = sent.load(Ordering::SeqCst);
                    let during = format!("{what} (after {} of {})", bytes(done), bytes(total));
                    break r.map_err(|e| self.transport(&during, e, limit))?;
                }
                _ = tokio::time::sleep(tick) => {
                    let moved = started + Duration::from_millis(moved_ms.load(Ordering::SeqCst));
                    if moved.elapsed() > limit {
                        return Err(self.timed_out(&phase(sent.load(Ordering::SeqCst)), limit));
                    }
                }
            }
        };
        let status = resp.status().as_u16();
        let deadline = Instant::now() + limit;
        let body = self
            .read_body(&phase(total), resp, MAX_ERROR_BYTES, deadline, limit)
            .await?;
        self.check(&what, status, &body)
    }

    /// `POST /api/create`, streaming: `on_status` sees every status line; an
    /// `{"error"}` line ends the call with [`OllamaError::Stream`]. Each line must come
    /// within one timeout, the whole stream within [`STREAM_TIMEOUTS`] timeouts, and no
    /// more than [`MAX_STATUS_BYTES`] (lines of at most [`MAX_STATUS_LINE_BYTES`]).
    pub async fn create(
        &self,
        request: &CreateRequest,
        mut on_status: impl FnMut(&CreateStatus),
    ) -> Result<(), OllamaError> {
        let what = "creating the model";
        let limit = self.timeout;
        let idle = limit * CREATE_IDLE_TIMEOUTS;
        let total_limit = limit * STREAM_TIMEOUTS.max(CREATE_IDLE_TIMEOUTS);
        let end = Instant::now() + total_limit;
        let resp = self
            .step(
                "creating the model (no reply to the request)",
                Instant::now() + limit,
                limit,
                self.http.post(self.url("/api/create")).json(request).send(),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(self.refused(what, resp, limit).await);
        }
        let mut body = resp.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut received = 0usize;
        let mut succeeded = false;
        loop {
            let line_deadline = Instant::now() + idle;
            let next = if line_deadline < end {
                tokio::time::timeout_at(line_deadline, body.next())
                    .await
                    .map_err(|_| self.timed_out("creating the model (no status line)", idle))?
            } else {
                tokio::time::timeout_at(end, body.next())
                    .await
                    .map_err(|_| {
                        self.timed_out(
                            "creating the model (status kept coming but no `success`)",
                            total_limit,
                        )
                    })?
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| self.transport(what, e, limit))?;
            received += chunk.len();
            if received > MAX_STATUS_BYTES {
                return Err(self.too_large(
                    what,
                    format!("over {} of status lines", mib(MAX_STATUS_BYTES)),
                ));
            }
            // Only the new bytes can hold a newline not seen yet.
            let mut from = pending.len();
            pending.extend_from_slice(&chunk);
            while let Some(i) = pending[from..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=from + i).collect();
                succeeded |= self.status_line(&line, &mut on_status)?;
                from = 0;
            }
            if pending.len() > MAX_STATUS_LINE_BYTES {
                return Err(self.too_large(
                    what,
                    format!("a status line over {}", mib(MAX_STATUS_LINE_BYTES)),
                ));
            }
        }
        if !pending.iter().all(u8::is_ascii_whitespace) {
            succeeded |= self.status_line(&pending, &mut on_status)?;
        }
        if !succeeded {
            return Err(OllamaError::Connection {
                host: self.base.clone(),
                what: what.into(),
                message: "the status stream ended before `success`".into(),
            });
        }
        Ok(())
    }

    /// Returns whether the line was the final `success`.
    fn status_line(
        &self,
        line: &[u8],
        on_status: &mut impl FnMut(&CreateStatus),
    ) -> Result<bool, OllamaError> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return Ok(false);
        }
        let v: Value = serde_json::from_str(text).map_err(|e| {
            self.protocol(
                "creating the model",
                format!("{e} in the status line `{}`", shorten(text, 120)),
            )
        })?;
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            return Err(OllamaError::Stream {
                message: shorten(err, SHOWN_ERROR_CHARS),
            });
        }
        let status = v.get("status").and_then(Value::as_str).unwrap_or_default();
        on_status(&CreateStatus {
            status: shorten(status, SHOWN_ERROR_CHARS),
            completed: v.get("completed").and_then(Value::as_u64),
            total: v.get("total").and_then(Value::as_u64),
        });
        Ok(status == "success")
    }

    /// `GET /api/tags`: the models Ollama has.
    pub async fn tags(&self) -> Result<Vec<ModelEntry>, OllamaError> {
        #[derive(Deserialize)]
        struct Tags {
            #[serde(default)]
            models: Vec<ModelEntry>,
        }
        let t: Tags = self.get_json("listing models", "/api/tags").await?;
        Ok(t.models)
    }

    /// Sends `{"model": name}` to a call that answers 404 for an unknown model;
    /// `None` then, else the checked reply's body.
    async fn by_name(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, OllamaError> {
        let request = request.json(&serde_json::json!({ "model": name }));
        let (status, body) = self.exchange(what, request, self.timeout).await?;
        if status == 404 {
            return Ok(None);
        }
        self.check(what, status, &body)?;
        Ok(Some(body))
    }

    /// `POST /api/show`; `None` when the model does not exist.
    pub async fn show(&self, name: &str) -> Result<Option<ShowResponse>, OllamaError> {
        let what = "showing the model";
        let request = self.http.post(self.url("/api/show"));
        match self.by_name(request, what, name).await? {
            Some(body) => self.decode(what, &body).map(Some),
            None => Ok(None),
        }
    }

    /// `DELETE /api/delete`; false when there was no such model.
    pub async fn delete(&self, name: &str) -> Result<bool, OllamaError> {
        let request = self.http.delete(self.url("/api/delete"));
        Ok(self
            .by_name(request, "deleting the model", name)
            .await?
            .is_some())
    }

    /// `POST /api/chat`, not streamed: the assistant's reply.
    pub async fn chat(
        &self,
        model: &str,
        messages: &[ChatMessage],
        max_tokens: u32,
    ) -> Result<ChatMessage, OllamaError> {
        #[derive(Deserialize)]
        struct Reply {
            message: ChatMessage,
        }
        let what = "the chat request";
        // A model with the thinking capability thinks by default and puts its reply
        // in `message.thinking`; the check wants the plain answer.
        let body = serde_json::json!({
            "model": model,
            "messages": messages,
            "stream": false,
            "think": false,
            "options": { "num_predict": max_tokens },
        });
        let request = self.http.post(self.url("/api/chat")).json(&body);
        let (status, body) = self
            .exchange(what, request, self.timeout * CHAT_TIMEOUTS)
            .await?;
        self.check(what, status, &body)?;
        let reply: Reply = self.decode(what, &body)?;
        Ok(reply.message)
    }
}

/// A Go-quoted string (`strconv.Quote`: `\"`, `\\`, `\n`, `\t`, `\r`, `\xNN`,
/// `\uNNNN`, `\UNNNNNNNN` and the other single-letter escapes) back to its text; text
/// that is not quoted is returned as it is.
pub fn go_unquote(quoted: &str) -> String {
    let Some(inner) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) else {
        return quoted.to_string();
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    let push = |out: &mut Vec<u8>, c: char| {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            push(&mut out, c);
            continue;
        }
        let hex = |chars: &mut std::str::Chars, n: usize| -> Option<u32> {
            let digits: String = chars.by_ref().take(n).collect();
            (digits.len() == n).then(|| u32::from_str_radix(&digits, 16).ok())?
        };
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('r') => out.push(b'\r'),
            Some('a') => out.push(0x07),
            Some('b') => out.push(0x08),
            Some('f') => out.push(0x0c),
            Some('v') => out.push(0x0b),
            // \xNN is one byte (Go quotes invalid UTF-8 that way).
            Some('x') => match hex(&mut chars, 2) {
                Some(b) => out.push(b as u8),
                None => return quoted.to_string(),
            },
            Some('u') => match hex(&mut chars, 4).and_then(char::from_u32) {
                Some(c) => push(&mut out, c),
                None => return quoted.to_string(),
            },
            Some('U') => match hex(&mut chars, 8).and_then(char::from_u32) {
                Some(c) => push(&mut out, c),
                None => return quoted.to_string(),
            },
            Some(other) => push(&mut out, other),
            None => return quoted.to_string(),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` cut to `max` characters, saying how long it was.
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}… ({} bytes in all)", &s[..i], s.len()),
    }
}

fn mib(n: usize) -> String {
    format!("{} MiB", n >> 20)
}

fn bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{n} bytes")
    }
}

/// `0.13.1-rc0` → (0, 13, 1).
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let core = v.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}

/// Normalizes OLLAMA_HOST to `scheme://host:port[/path]` without a trailing slash.
pub fn parse_host(value: &str) -> Result<String, OllamaError> {
    let bad = |reason: &str| OllamaError::BadHost {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let v = value.trim();
    // As Ollama reads it: no scheme is http on 11434; an explicit http:// or
    // https:// without a port is that scheme's own port (80, 443).
    let (scheme, rest, default_port) = match v.split_once("://") {
        Some((s, r)) => match s.to_ascii_lowercase().as_str() {
            "http" => ("http", r, "80"),
            "https" => ("https", r, "443"),
            other => {
                return Err(bad(&format!(
                    "unknown scheme `{other}` (use http or https)"
                )))
            }
        },
        None => ("http", v, "11434"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        // [ipv6]:port
        let end = stripped.find(']').ok_or_else(|| bad("unclosed `[`"))?;
        let h = &authority[..end + 2];
        let p = stripped[end + 1..].strip_prefix(':').unwrap_or("");
        (h.to_string(), p)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), ""),
        }
    };
    let host = match host.as_str() {
        "" | "0.0.0.0" => "127.0.0.1".to_string(),
        "[::]" => "[::1]".to_string(),
        _ => host,
    };
    let port = if port.is_empty() { default_port } else { port };
    port.parse::<u16>()
        .map_err(|_| bad(&format!("port `{port}` is not a number from 1 to 65535")))?;
    Ok(format!("{scheme}://{host}:{port}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ollama_host_like_ollama() {
        let cases = [
            ("", "http://127.0.0.1:11434"),
            ("0.0.0.0", "http://127.0.0.1:11434"),
            (":8080", "http://127.0.0.1:8080"),
            ("gpu-box", "http://gpu-box:11434"),
            ("gpu-box:1234", "http://gpu-box:1234"),
            ("http://10.0.0.2:11434/", "http://10.0.0.2:11434"),
            // An explicit scheme without a port is the scheme's port, as in Ollama.
            ("http://proxy/ollama/", "http://proxy:80/ollama"),
            (
                "https://ollama.example.com",
                "https://ollama.example.com:443",
            ),
            ("HTTPS://box:8443/api/", "https://box:8443/api"),
            ("[::1]:9000", "http://[::1]:9000"),
        ];
        for (input, want) in cases {
            assert_eq!(parse_host(input).unwrap(), want, "{input:?}");
        }
        assert!(parse_host("gpu-box:port").is_err());
        let ftp = parse_host("ftp://x").unwrap_err();
        assert!(ftp.to_string().contains("ftp://x"));
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(parse_version("0.13.1-rc0"), Some((0, 13, 1)));
        assert_eq!(parse_version("v0.5"), Some((0, 5, 0)));
        assert!(parse_version("0.5.6").unwrap() < MIN_VERSION);
        assert!(parse_version("0.10.0").unwrap() > MIN_VERSION);
        assert_eq!(parse_version("dev"), None);
    }

    #[test]
    fn long_server_messages_are_cut_and_say_their_length() {
        assert_eq!(shorten("short", 10), "short");
        let long = "é".repeat(1000);
        let cut = shorten(&long, 300);
        assert!(cut.starts_with(&"é".repeat(300)));
        assert!(cut.ends_with("… (2000 bytes in all)"), "{cut}");
    }

    #[test]
    fn show_parameters_list_stops() {
        let show = ShowResponse {
            parameters: "stop                           \"<|im_end|>\"\nstop \"<|endoftext|>\"\ntemperature 0.7".into(),
            ..Default::default()
        };
        assert_eq!(show.stops(), vec!["<|im_end|>", "<|endoftext|>"]);
        // Go's %#v: escapes undone, and a `stopper` parameter is not a stop.
        let show = ShowResponse {
            parameters: "stop \"User:\\n\"\nstop \"\\\"end\\\"\\t\\u00e9\\x41\"\nstopper 1".into(),
            ..Default::default()
        };
        assert_eq!(show.stops(), vec!["User:\n", "\"end\"\t\u{e9}A"]);
        assert_eq!(go_unquote("plain"), "plain");
        assert_eq!(go_unquote("\"broken\\u12\""), "\"broken\\u12\"");
    }
}
