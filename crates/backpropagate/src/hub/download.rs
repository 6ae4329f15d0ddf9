//! Fetching a repo snapshot over the hub's file endpoints: the revision's file list
//! (`/api/models/<id>/revision/<rev>`), then each file from `/<id>/resolve/<commit>/<file>`
//! (a HEAD for its etag and size, a GET that may redirect to a CDN, resumed with
//! `Range` when a partial blob exists).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;

use super::cache::{cache_dir, RepoCache};
use crate::error::{error_chain, Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::model::ModelConfig;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{repo} was not found on {endpoint} (revision `{revision}`)")]
    NotFound {
        repo: String,
        revision: String,
        endpoint: String,
    },
    #[error("{repo} is gated or private and needs a Hugging Face token")]
    NeedsToken { repo: String },
    #[error("your Hugging Face token has no access to {repo}")]
    Forbidden { repo: String },
    #[error("{repo}@{revision} is not in the cache ({cache}) and offline mode is on")]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
    },
    #[error("cannot reach {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("{url}: HTTP {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{repo} has no safetensors weights (only {found})")]
    NoSafetensors { repo: String, found: String },
    #[error("{repo} has no {file}")]
    MissingFile { repo: String, file: String },
    #[error("{file} arrived corrupted: sha256 {got}, expected {expected}")]
    Checksum {
        file: String,
        expected: String,
        got: String,
    },
}

impl HubError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            HubError::NotFound { repo, .. } => format!(
                "Check the spelling and revision at https://huggingface.co/{repo}, or give a local model folder."
            ),
            HubError::NeedsToken { repo } => format!(
                "Accept the model's terms at https://huggingface.co/{repo}, create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN."
            ),
            HubError::Forbidden { repo } => format!(
                "Accept the model's terms at https://huggingface.co/{repo} with the account the token belongs to."
            ),
            HubError::NotCached { .. } => {
                "Unset HF_HUB_OFFLINE (or go online) to download it once, or give a local model folder.".into()
            }
            HubError::Unreachable { .. } => {
                "Check the network (HF_ENDPOINT sets a mirror); with HF_HUB_OFFLINE=1 models already in the cache still work. A partial download resumes next time.".into()
            }
            HubError::NoSafetensors { .. } => {
                "Pick a repo with .safetensors weights (most have them), or convert the .bin files with transformers and give the folder.".into()
            }
            HubError::Checksum { .. } => "Download again; the broken file was removed.".into(),
            HubError::Http { .. } | HubError::MissingFile { .. } => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct HubOptions {
    /// `HF_ENDPOINT`, default https://huggingface.co.
    pub endpoint: String,
    pub cache: PathBuf,
    /// `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: the cache only, no network.
    pub offline: bool,
    /// Tries per file when the connection breaks (each resumes the partial file).
    pub attempts: u32,
    pub timeout: Duration,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        HubOptions {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache: cache_dir(),
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            }),
            attempts: 5,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Tokenizer and config files a training run needs besides the weights; the first two
/// are required.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 4] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

pub(super) fn snapshot(
    id: &str,
    revision: &str,
    options: &HubOptions,
    sink: &dyn EventSink,
) -> Result<PathBuf> {
    let cache = RepoCache::new(&options.cache, id);
    if options.offline {
        return offline_snapshot(&cache, id, revision, options);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(&options.cache, e))?;
    runtime.block_on(Fetcher::new(id, options)?.snapshot(&cache, revision, sink))
}

fn offline_snapshot(
    cache: &RepoCache,
    id: &str,
    revision: &str,
    options: &HubOptions,
) -> Result<PathBuf> {
    let not_cached = || HubError::NotCached {
        repo: id.to_string(),
        revision: revision.to_string(),
        cache: options.cache.clone(),
    };
    let commit = cache.commit_for(revision).ok_or_else(not_cached)?;
    let dir = cache.snapshot(&commit);
    let complete = REQUIRED.iter().all(|f| dir.join(f).is_file())
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file());
    if complete {
        Ok(dir)
    } else {
        Err(not_cached().into())
    }
}

struct Fetcher {
    repo: String,
    endpoint: String,
    token: Option<String>,
    /// Follows redirects (file bodies come from a CDN).
    http: reqwest::Client,
    /// Does not: the hub's own headers (linked etag and size) are on the redirect.
    head: reqwest::Client,
    attempts: u32,
    timeout: Duration,
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

struct FileMeta {
    etag: String,
    size: Option<u64>,
}

impl Fetcher {
    fn new(repo: &str, options: &HubOptions) -> Result<Self> {
        let build = |redirects: bool| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .redirect(if redirects {
                    reqwest::redirect::Policy::limited(10)
                } else {
                    reqwest::redirect::Policy::none()
                })
                .user_agent(concat!("backpropagate/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| HubError::Unreachable {
                    endpoint: options.endpoint.clone(),
                    message: e.to_string(),
                })
        };
        Ok(Fetcher {
            repo: repo.to_string(),
            endpoint: options.endpoint.clone(),
            token: options.token.clone(),
            http: build(true)?,
            head: build(false)?,
            attempts: options.attempts.max(1),
            timeout: options.timeout,
        })
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> HubError {
        HubError::Unreachable {
            endpoint: self.endpoint.clone(),
            message: error_chain(&e),
        }
    }

    /// Maps the hub's refusals to errors that say what to do.
    async fn check(
        &self,
        url: &str,
        revision: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, HubError> {
        let status = resp.status().as_u16();
        if resp.status().is_success() || resp.status().is_redirection() {
            return Ok(resp);
        }
        Err(match status {
            401 if self.token.is_none() => HubError::NeedsToken {
                repo: self.repo.clone(),
            },
            401 | 403 => HubError::Forbidden {
                repo: self.repo.clone(),
            },
            404 => HubError::NotFound {
                repo: self.repo.clone(),
                revision: revision.to_string(),
                endpoint: self.endpoint.clone(),
            },
            _ => {
                let body = resp.text().await.unwrap_or_default();
                HubError::Http {
                    url: url.to_string(),
                    status,
                    message: body.chars().take(300).collect(),
                }
            }
        })
    }

    async fn snapshot(
        &self,
        cache: &RepoCache,
        revision: &str,
        sink: &dyn EventSink,
    ) -> Result<PathBuf> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint, self.repo, revision
        );
        let resp = self
            .auth(self.http.get(&url))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let info: RevisionInfo = self
            .check(&url, revision, resp)
            .await?
            .json()
            .await
            .map_err(|e| self.unreachable(e))?;
        let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let commit = info.sha.clone();
        sink.emit(log(format!("{}@{revision} is commit {commit}", self.repo)));

        // config.json first: an architecture we cannot train is refused before any
        // weights are fetched.
        for f in REQUIRED {
            if !files.contains(&f) {
                return Err(HubError::MissingFile {
                    repo: self.repo.clone(),
                    file: f.into(),
                }
                .into());
            }
        }
        let config_path = self.fetch(cache, &commit, "config.json", sink).await?;
        let config: Value = serde_json::from_slice(
            &std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?,
        )
        .map_err(|e| Error::model(&config_path, format!("config.json is not JSON: {e}")))?;
        ModelConfig::from_json(&config, &config_path)?;

        self.fetch(cache, &commit, "tokenizer.json", sink).await?;
        for f in OPTIONAL.iter().filter(|f| files.contains(f)) {
            self.fetch(cache, &commit, f, sink).await?;
        }
        let weights: Vec<String> = if files.contains(&"model.safetensors.index.json") {
            let index = self
                .fetch(cache, &commit, "model.safetensors.index.json", sink)
                .await?;
            let v: Value =
                serde_json::from_slice(&std::fs::read(&index).map_err(|e| Error::io(&index, e))?)
                    .map_err(|e| Error::model(&index, format!("not JSON: {e}")))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            shards
        } else if files.contains(&"model.safetensors") {
            vec!["model.safetensors".into()]
        } else {
            let found: Vec<&str> = files
                .iter()
                .copied()
                .filter(|f| f.ends_with(".bin") || f.ends_with(".gguf") || f.ends_with(".pt"))
                .collect();
            return Err(HubError::NoSafetensors {
                repo: self.repo.clone(),
                found: if found.is_empty() {
                    "no weights".into()
                } else {
                    found.join(", ")
                },
            }
            .into());
        };
        for w in &weights {
            self.fetch(cache, &commit, w, sink).await?;
        }
        cache.write_ref(revision, &commit)?;
        Ok(cache.snapshot(&commit))
    }

    async fn meta(&self, url: &str, commit: &str) -> Result<FileMeta, HubError> {
        let resp = self
            .auth(self.head.head(url))
            .header(reqwest::header::ACCEPT_ENCODING, "identity")
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let resp = self.check(url, commit, resp).await?;
        let h = resp.headers();
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(String::from);
        let etag = get("x-linked-etag")
            .or_else(|| get("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']))
            .ok_or_else(|| HubError::Http {
                url: url.to_string(),
                status: resp.status().as_u16(),
                message: "no ETag header; is HF_ENDPOINT a Hugging Face hub?".into(),
            })?;
        let size = get("x-linked-size")
            .or_else(|| get("content-length"))
            .and_then(|s| s.parse().ok());
        Ok(FileMeta { etag, size })
    }

    /// One file into the cache (skipped when its snapshot entry or blob exists).
    async fn fetch(
        &self,
        cache: &RepoCache,
        commit: &str,
        file: &str,
        sink: &dyn EventSink,
    ) -> Result<PathBuf> {
        let entry = cache.snapshot(commit).join(file);
        if entry.is_file() {
            return Ok(entry);
        }
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint, self.repo, commit, file
        );
        let meta = self.meta(&url, commit).await?;
        let blob = cache.blob(&meta.etag);
        if !blob.is_file() {
            sink.emit(log(format!(
                "downloading {file}{}",
                meta.size
                    .map(|s| format!(" ({:.1} MB)", s as f64 / 1e6))
                    .unwrap_or_default()
            )));
            self.download(&url, file, &blob, &meta, sink).await?;
        }
        cache.link(commit, file, &meta.etag)
    }

    async fn download(
        &self,
        url: &str,
        file: &str,
        blob: &Path,
        meta: &FileMeta,
        sink: &dyn EventSink,
    ) -> Result<()> {
        let dir = blob.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let partial = blob.with_extension("incomplete");
        let mut last_error = None;
        for attempt in 1..=self.attempts {
            match self.download_once(url, file, &partial, meta, sink).await {
                Ok(()) => {
                    last_error = None;
                    break;
                }
                Err(e @ HubError::Unreachable { .. }) => {
                    sink.emit(Event::Log {
                        level: LogLevel::Warn,
                        message: format!(
                            "download of {file} broke off ({e}); resuming (try {attempt} of {})",
                            self.attempts
                        ),
                    });
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(e) = last_error {
            return Err(e.into());
        }
        // LFS files are named by their sha256: check what arrived before trusting it.
        if meta.etag.len() == 64 && meta.etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            let got = crate::run::sha256_file(&partial)?;
            if !got.eq_ignore_ascii_case(&meta.etag) {
                let _ = std::fs::remove_file(&partial);
                return Err(HubError::Checksum {
                    file: file.into(),
                    expected: meta.etag.clone(),
                    got,
                }
                .into());
            }
        }
        std::fs::rename(&partial, blob).map_err(|e| Error::io(blob, e))
    }

    async fn download_once(
        &self,
        url: &str,
        file: &str,
        partial: &Path,
        meta: &FileMeta,
        sink: &dyn EventSink,
    ) -> Result<(), HubError> {
        let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        let mut req = self
            .auth(self.http.get(url))
            .header(reqwest::header::ACCEPT_ENCODING, "identity");
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let resp = self.check(url, "", resp).await?;
        let resumed = resp.status().as_u16() == 206;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(partial)
            .map_err(|e| self.io_error(partial, e))?;
        let mut done = if resumed { have } else { 0 };
        let total = meta.size.unwrap_or(0);
        let mut body = resp.bytes_stream();
        let mut last = 0u64;
        loop {
            let next = tokio::time::timeout(self.timeout, body.next())
                .await
                .map_err(|_| HubError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    message: format!("no data for {} s", self.timeout.as_secs()),
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| self.unreachable(e))?;
            out.write_all(&chunk)
                .map_err(|e| self.io_error(partial, e))?;
            done += chunk.len() as u64;
            if done - last >= 1 << 20 || done == total {
                sink.emit(Event::Progress {
                    stage: format!("download {file}"),
                    done,
                    total,
                });
                last = done;
            }
        }
        out.sync_all().map_err(|e| self.io_error(partial, e))?;
        if total > 0 && done != total {
            return Err(HubError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: format!("{file} ended at {done} of {total} bytes"),
            });
        }
        Ok(())
    }

    fn io_error(&self, path: &Path, e: std::io::Error) -> HubError {
        HubError::Http {
            url: path.display().to_string(),
            status: 0,
            message: e.to_string(),
        }
    }
}

fn log(message: String) -> Event {
    Event::Log {
        level: LogLevel::Info,
        message,
    }
}
