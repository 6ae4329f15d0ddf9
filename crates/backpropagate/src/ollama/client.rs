//! A client for Ollama's REST API (docs/api.md of the ollama repository): version,
//! blobs, create, tags, show, delete and chat. Async on tokio; `push` wraps it for
//! callers that are not.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::io::ReaderStream;

use super::OllamaError;
use crate::error::error_chain;

pub const DEFAULT_HOST: &str = "http://127.0.0.1:11434";
/// The first release whose `/api/create` takes `files` (digests of uploaded blobs).
pub const MIN_VERSION: (u32, u32, u32) = (0, 5, 7);

#[derive(Debug, Clone)]
pub struct OllamaClient {
    base: String,
    http: reqwest::Client,
    timeout: Duration,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateRequest {
    pub model: String,
    /// File name → `sha256:<hex>` of a blob already uploaded.
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
    /// Values of every `stop` line in `parameters`, unquoted.
    pub fn stops(&self) -> Vec<String> {
        self.parameters
            .lines()
            .filter_map(|l| l.trim().strip_prefix("stop"))
            .map(|v| v.trim().trim_matches('"').to_string())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl OllamaClient {
    /// The server named by `OLLAMA_HOST`, else the local default.
    pub fn from_env() -> Result<Self, OllamaError> {
        match std::env::var("OLLAMA_HOST") {
            Ok(v) if !v.trim().is_empty() => Self::new(&v),
            _ => Self::new(DEFAULT_HOST),
        }
    }

    /// `host` as Ollama reads OLLAMA_HOST: `host`, `host:port`, `:port` or a URL;
    /// http and port 11434 unless given; 0.0.0.0 (a bind address) means this machine.
    pub fn new(host: &str) -> Result<Self, OllamaError> {
        let base = parse_host(host)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
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

    /// How long a call without a body to stream may take (uploads are not limited).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn host(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn transport(&self, what: &str, e: reqwest::Error) -> OllamaError {
        if e.is_timeout() {
            OllamaError::Timeout {
                host: self.base.clone(),
                what: what.to_string(),
                secs: self.timeout.as_secs().max(1),
            }
        } else if e.is_connect() {
            OllamaError::NotRunning {
                host: self.base.clone(),
            }
        } else {
            OllamaError::Connection {
                host: self.base.clone(),
                what: what.to_string(),
                message: error_chain(&e),
            }
        }
    }

    /// Turns a non-success reply into Ollama's `{"error": ...}` message.
    async fn check(
        &self,
        what: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, OllamaError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
            .unwrap_or_else(|| format!("HTTP {status} {}", body.trim()));
        Err(OllamaError::Api {
            what: what.to_string(),
            status,
            message,
        })
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        path: &str,
    ) -> Result<T, OllamaError> {
        let resp = self
            .http
            .get(self.url(path))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.transport(what, e))?;
        let resp = self.check(what, resp).await?;
        resp.json().await.map_err(|e| self.body_error(what, e))
    }

    fn body_error(&self, what: &str, e: reqwest::Error) -> OllamaError {
        if e.is_timeout() || e.is_connect() {
            self.transport(what, e)
        } else if e.is_decode() {
            OllamaError::Protocol {
                what: what.to_string(),
                message: error_chain(&e),
            }
        } else {
            self.transport(what, e)
        }
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
        let version = self.version().await?;
        if let Some(v) = parse_version(&version) {
            // 0.0.0 is a source build: trust it.
            if v < MIN_VERSION && v != (0, 0, 0) {
                let (a, b, c) = MIN_VERSION;
                return Err(OllamaError::TooOld {
                    version,
                    need: format!("{a}.{b}.{c}"),
                });
            }
        }
        Ok(version)
    }

    /// `HEAD /api/blobs/sha256:<hex>`: does the server already hold this file?
    pub async fn has_blob(&self, digest: &str) -> Result<bool, OllamaError> {
        let what = "the blob check";
        let resp = self
            .http
            .head(self.url(&format!("/api/blobs/{digest}")))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.transport(what, e))?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => self.check(what, resp).await.map(|_| false),
        }
    }

    /// `POST /api/blobs/sha256:<hex>` with the file streamed as the body; `progress`
    /// gets (bytes sent, total) as chunks leave.
    pub async fn upload_blob(
        &self,
        path: &Path,
        digest: &str,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<(), OllamaError> {
        let what = "the upload";
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| OllamaError::Connection {
                host: self.base.clone(),
                what: what.into(),
                message: format!("cannot read {}: {e}", path.display()),
            })?;
        let total = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let mut sent = 0u64;
        let stream = ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
            if let Ok(c) = &chunk {
                sent += c.len() as u64;
                progress(sent, total);
            }
            chunk
        });
        let resp = self
            .http
            .post(self.url(&format!("/api/blobs/{digest}")))
            .header(reqwest::header::CONTENT_LENGTH, total)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| self.transport(what, e))?;
        self.check(what, resp).await?;
        Ok(())
    }

    /// `POST /api/create`, streaming: `on_status` sees every status line; an
    /// `{"error"}` line ends the call with [`OllamaError::Stream`].
    pub async fn create(
        &self,
        request: &CreateRequest,
        mut on_status: impl FnMut(&str),
    ) -> Result<(), OllamaError> {
        let what = "creating the model";
        let resp = self
            .http
            .post(self.url("/api/create"))
            .json(request)
            .send()
            .await
            .map_err(|e| self.transport(what, e))?;
        let resp = self.check(what, resp).await?;
        let mut body = resp.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut succeeded = false;
        loop {
            // Each line must come within the timeout; creation itself may take long.
            let next = tokio::time::timeout(self.timeout, body.next())
                .await
                .map_err(|_| OllamaError::Timeout {
                    host: self.base.clone(),
                    what: what.into(),
                    secs: self.timeout.as_secs().max(1),
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| self.transport(what, e))?;
            pending.extend_from_slice(&chunk);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                succeeded |= handle_status_line(&line, &mut on_status)?;
            }
        }
        if !pending.iter().all(u8::is_ascii_whitespace) {
            succeeded |= handle_status_line(&pending, &mut on_status)?;
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
    /// `None` then, else the checked reply.
    async fn by_name(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
        name: &str,
    ) -> Result<Option<reqwest::Response>, OllamaError> {
        let resp = request
            .timeout(self.timeout)
            .json(&serde_json::json!({ "model": name }))
            .send()
            .await
            .map_err(|e| self.transport(what, e))?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        self.check(what, resp).await.map(Some)
    }

    /// `POST /api/show`; `None` when the model does not exist.
    pub async fn show(&self, name: &str) -> Result<Option<ShowResponse>, OllamaError> {
        let what = "showing the model";
        let request = self.http.post(self.url("/api/show"));
        match self.by_name(request, what, name).await? {
            Some(resp) => resp
                .json()
                .await
                .map(Some)
                .map_err(|e| self.body_error(what, e)),
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
        let body = serde_json::json!({
            "model": model,
            "messages": messages,
            "stream": false,
            "options": { "num_predict": max_tokens },
        });
        let resp = self
            .http
            .post(self.url("/api/chat"))
            // Loading a model on first use can take a while.
            .timeout(self.timeout * 5)
            .json(&body)
            .send()
            .await
            .map_err(|e| self.transport(what, e))?;
        let resp = self.check(what, resp).await?;
        let reply: Reply = resp.json().await.map_err(|e| self.body_error(what, e))?;
        Ok(reply.message)
    }
}

/// Returns whether the line was the final `success`.
fn handle_status_line(line: &[u8], on_status: &mut impl FnMut(&str)) -> Result<bool, OllamaError> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return Ok(false);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| OllamaError::Protocol {
        what: "creating the model".into(),
        message: format!("{e} in line `{text}`"),
    })?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(OllamaError::Stream {
            message: err.to_string(),
        });
    }
    let status = v.get("status").and_then(Value::as_str).unwrap_or_default();
    on_status(status);
    Ok(status == "success")
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
    let (scheme, rest) = match v.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("http".to_string(), v),
    };
    match scheme.as_str() {
        "http" => {}
        "https" => {
            return Err(bad(
                "this build talks plain http to Ollama; reach a remote Ollama over an SSH tunnel \
                 (ssh -L 11434:127.0.0.1:11434 host) and use http://127.0.0.1:11434",
            ))
        }
        other => return Err(bad(&format!("unknown scheme `{other}`"))),
    }
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
    let port = if port.is_empty() { "11434" } else { port };
    port.parse::<u16>()
        .map_err(|_| bad(&format!("port `{port}` is not a number from 1 to 65535")))?;
    Ok(format!("http://{host}:{port}{path}"))
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
            ("http://proxy/ollama/", "http://proxy:11434/ollama"),
            ("[::1]:9000", "http://[::1]:9000"),
        ];
        for (input, want) in cases {
            assert_eq!(parse_host(input).unwrap(), want, "{input:?}");
        }
        assert!(parse_host("gpu-box:port").is_err());
        let https = parse_host("https://x").unwrap_err();
        assert!(https.to_string().contains("https://x"));
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
    fn show_parameters_list_stops() {
        let show = ShowResponse {
            parameters: "stop                           \"<|im_end|>\"\nstop \"<|endoftext|>\"\ntemperature 0.7".into(),
            ..Default::default()
        };
        assert_eq!(show.stops(), vec!["<|im_end|>", "<|endoftext|>"]);
    }
}
