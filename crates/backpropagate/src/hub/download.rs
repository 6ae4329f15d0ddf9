//! Fetching a repo snapshot over the hub's file endpoints: the revision's file list
//! (`/api/models/<id>/revision/<rev>`), then each file from `/<id>/resolve/<commit>/<file>`
//! (a HEAD for its etag and size, a GET that may redirect to a CDN, resumed with
//! `Range` when a partial blob exists).
//!
//! The hub (or whatever `HF_ENDPOINT` points at) is not trusted: the commit id, the
//! file names an index lists and every etag must be plain names before they touch the
//! disk; a download stops at its declared size; JSON answers are read up to a cap;
//! every request and every pause in a body is timed out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;

use super::cache::{cache_dir, is_commit, is_etag, RepoCache};
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
    #[error("{repo}@{revision}: the hub answered commit `{sha}`, which is not a 40-hex commit id; nothing was downloaded")]
    BadCommit {
        repo: String,
        revision: String,
        sha: String,
    },
    #[error("{repo}: {source_file} lists `{entry}`, which {why}; refusing to write it (nothing was written outside the cache)")]
    BadEntry {
        repo: String,
        source_file: String,
        entry: String,
        why: String,
    },
    #[error("{repo}: {file} sent more than its declared {declared} bytes; the download was stopped there and removed")]
    Oversized {
        repo: String,
        file: String,
        declared: u64,
    },
    #[error("{repo}: {what} is larger than the {limit} bytes allowed for it; stopped reading")]
    TooLarge {
        repo: String,
        what: String,
        limit: u64,
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
            HubError::BadCommit { .. } | HubError::BadEntry { .. } => {
                "The repo or the server behind HF_ENDPOINT is broken or hostile: report it to its owner, or use another repo or mirror.".into()
            }
            HubError::Oversized { .. } | HubError::TooLarge { .. } => {
                "The server behind HF_ENDPOINT does not answer like the Hugging Face hub: try again later, report it to the mirror's owner, or unset HF_ENDPOINT. Nothing partial was kept.".into()
            }
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
    /// Longest wait for any answer, for a whole JSON answer, and for the next bytes of
    /// a file.
    pub timeout: Duration,
    /// Snapshot entries link to their blob; false copies the blob instead (what
    /// happens anyway where symlinks fail, as on Windows without developer mode).
    pub symlinks: bool,
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
            symlinks: true,
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

/// Cap on the revision answer (a file list: a few KB, ~1 MB for repos with thousands
/// of files) and on any error body we read.
const MAX_JSON_ANSWER: u64 = 16 << 20;
/// Cap on the declared size of a file other than the weights: config, tokenizer (the
/// largest real tokenizer.json files are ~35 MB), index, template.
const MAX_METADATA_FILE: u64 = 128 << 20;

/// What of a repo to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// Config, tokenizer files and the safetensors weights: what training needs.
    Everything,
    /// Config and tokenizer files only: enough to tokenize and check data.
    Tokenizer,
}

pub(super) fn snapshot(
    id: &str,
    revision: &str,
    want: Want,
    options: &HubOptions,
    sink: &dyn EventSink,
) -> Result<PathBuf> {
    // The revision names a file under refs/ and goes into URLs: a plain name only.
    if let Err(why) = crate::safe_path::confined_join(Path::new("refs"), revision) {
        return Err(Error::InvalidOption(format!(
            "{id}@{revision}: the revision {why}; give a branch, tag or commit id"
        )));
    }
    let cache = RepoCache::new(&options.cache, id);
    if options.offline {
        return offline_snapshot(&cache, id, revision, want, options);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(&options.cache, e))?;
    runtime.block_on(Fetcher::new(id, options)?.snapshot(&cache, revision, want, sink))
}

fn offline_snapshot(
    cache: &RepoCache,
    id: &str,
    revision: &str,
    want: Want,
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
        && (want == Want::Tokenizer
            || dir.join("model.safetensors").is_file()
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
    symlinks: bool,
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
    /// Declared by the hub before the body; the download never goes past it.
    size: u64,
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
            symlinks: options.symlinks,
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
                // Only the start of the body goes into the message; reading stops there.
                let body = self.read_capped(url, resp, 4096).await.unwrap_or_default();
                HubError::Http {
                    url: url.to_string(),
                    status,
                    message: String::from_utf8_lossy(&body).chars().take(300).collect(),
                }
            }
        })
    }

    async fn snapshot(
        &self,
        cache: &RepoCache,
        revision: &str,
        want: Want,
        sink: &dyn EventSink,
    ) -> Result<PathBuf> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            self.repo,
            url_path(revision)
        );
        let resp = self.send(self.auth(self.http.get(&url))).await?;
        let resp = self.check(&url, revision, resp).await?;
        let body = self.read_capped(&url, resp, MAX_JSON_ANSWER).await?;
        let info: RevisionInfo = serde_json::from_slice(&body).map_err(|e| HubError::Http {
            url: url.clone(),
            status: 200,
            message: format!(
                "not the hub's revision JSON ({e}); is HF_ENDPOINT a Hugging Face hub?"
            ),
        })?;
        let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let commit = info.sha.clone();
        if !is_commit(&commit) {
            return Err(HubError::BadCommit {
                repo: self.repo.clone(),
                revision: revision.to_string(),
                sha: commit.chars().take(200).collect(),
            }
            .into());
        }
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
        if want == Want::Tokenizer {
            cache.write_ref(revision, &commit)?;
            return Ok(cache.snapshot(&commit));
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
            for shard in &shards {
                cache
                    .entry(&commit, shard)
                    .map_err(|why| HubError::BadEntry {
                        repo: self.repo.clone(),
                        source_file: "model.safetensors.index.json".into(),
                        entry: shard.chars().take(200).collect(),
                        why: why.into(),
                    })?;
            }
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
            .send(
                self.auth(self.head.head(url))
                    .header(reqwest::header::ACCEPT_ENCODING, "identity"),
            )
            .await?;
        let resp = self.check(url, commit, resp).await?;
        let h = resp.headers();
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(String::from);
        let bad = |message: &str| HubError::Http {
            url: url.to_string(),
            status: resp.status().as_u16(),
            message: format!("{message}; is HF_ENDPOINT a Hugging Face hub?"),
        };
        let etag = get("x-linked-etag")
            .or_else(|| get("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .ok_or_else(|| bad("no ETag header"))?;
        if !is_etag(&etag) {
            return Err(bad(&format!(
                "ETag `{}` is not a plain blob name",
                etag.chars().take(200).collect::<String>()
            )));
        }
        let size = get("x-linked-size")
            .or_else(|| get("content-length"))
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| bad("no size (X-Linked-Size or Content-Length)"))?;
        Ok(FileMeta { etag, size })
    }

    /// Sends a request, waiting at most the timeout for the answer's headers.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, HubError> {
        match tokio::time::timeout(self.timeout, rb.send()).await {
            Ok(r) => r.map_err(|e| self.unreachable(e)),
            Err(_) => Err(self.stalled()),
        }
    }

    fn stalled(&self) -> HubError {
        HubError::Unreachable {
            endpoint: self.endpoint.clone(),
            message: format!("no answer for {} s", self.timeout.as_secs_f32()),
        }
    }

    /// A whole body, up to `limit` bytes and within the timeout; more is an error,
    /// never a bigger buffer.
    async fn read_capped(
        &self,
        url: &str,
        resp: reqwest::Response,
        limit: u64,
    ) -> Result<Vec<u8>, HubError> {
        let too_large = || HubError::TooLarge {
            repo: self.repo.clone(),
            what: format!("the answer to {url}"),
            limit,
        };
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let read = async {
            let mut out = Vec::new();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| self.unreachable(e))?;
                if out.len() as u64 + chunk.len() as u64 > limit {
                    return Err(too_large());
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| self.stalled())?
    }

    /// One file into the cache (skipped when its snapshot entry or blob exists).
    async fn fetch(
        &self,
        cache: &RepoCache,
        commit: &str,
        file: &str,
        sink: &dyn EventSink,
    ) -> Result<PathBuf> {
        let entry = cache
            .entry(commit, file)
            .map_err(|why| HubError::BadEntry {
                repo: self.repo.clone(),
                source_file: "the revision's file list".into(),
                entry: file.chars().take(200).collect(),
                why: why.into(),
            })?;
        if entry.is_file() {
            return Ok(entry);
        }
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.repo,
            commit,
            url_path(file)
        );
        let meta = self.meta(&url, commit).await?;
        if !file.ends_with(".safetensors") && meta.size > MAX_METADATA_FILE {
            return Err(HubError::TooLarge {
                repo: self.repo.clone(),
                what: format!("{file} (declared {} bytes)", meta.size),
                limit: MAX_METADATA_FILE,
            }
            .into());
        }
        let blob = cache.blob(&meta.etag);
        // Held while the blob is written and linked: a second pull of the same model
        // waits and then finds the blob, instead of writing the same partial file.
        let _lock = self.lock_blob(cache, &meta.etag, file, sink).await?;
        if !blob.is_file() {
            sink.emit(log(format!(
                "downloading {file} ({:.1} MB)",
                meta.size as f64 / 1e6
            )));
            self.download(&url, file, &blob, &meta, sink).await?;
        }
        cache.link(commit, file, &meta.etag, self.symlinks)
    }

    /// Takes the blob's lock, waiting (and saying so once) while another process or
    /// thread holds it; the holder's own timeouts bound the wait. Dropping the file
    /// releases it, as does the holder dying.
    async fn lock_blob(
        &self,
        cache: &RepoCache,
        etag: &str,
        file: &str,
        sink: &dyn EventSink,
    ) -> Result<std::fs::File> {
        let path = cache.lock_path(etag);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut told = false;
        loop {
            match lock.try_lock() {
                Ok(()) => return Ok(lock),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !told {
                        sink.emit(log(format!(
                            "another download of {file} into {} is running; waiting for it",
                            cache.root().display()
                        )));
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
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
        // Beside the blob, named as huggingface_hub names it, so either resumes the other.
        let partial = dir.join(format!("{}.incomplete", meta.etag));
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
                Err(e) => {
                    // What arrived is not the file (too long, or refused): a later pull
                    // must start clean rather than resume from it.
                    if matches!(e, HubError::Oversized { .. }) {
                        let _ = std::fs::remove_file(&partial);
                    }
                    return Err(e.into());
                }
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
        let total = meta.size;
        let mut have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if have >= total {
            // Left by an older version or a server that sent too much: nothing to
            // resume from (a Range past the end would only be refused).
            let _ = std::fs::remove_file(partial);
            have = 0;
        }
        let mut req = self
            .auth(self.http.get(url))
            .header(reqwest::header::ACCEPT_ENCODING, "identity");
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = self.send(req).await?;
        let resp = self.check(url, "", resp).await?;
        let resumed = resp.status().as_u16() == 206;
        if resumed && range_start(&resp) != Some(have) {
            let _ = std::fs::remove_file(partial);
            return Err(HubError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: format!(
                    "{file} resumed at the wrong offset (asked for byte {have}); starting over"
                ),
            });
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(partial)
            .map_err(|e| self.io_error(partial, e))?;
        let mut done = if resumed { have } else { 0 };
        let mut body = resp.bytes_stream();
        let mut last = 0u64;
        loop {
            let next = tokio::time::timeout(self.timeout, body.next())
                .await
                .map_err(|_| HubError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    message: format!("no data for {} s in {file}", self.timeout.as_secs_f32()),
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| self.unreachable(e))?;
            let room = total - done;
            if chunk.len() as u64 > room {
                return Err(HubError::Oversized {
                    repo: self.repo.clone(),
                    file: file.to_string(),
                    declared: total,
                });
            }
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
        if done != total {
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

/// The first byte of a 206 answer, from `Content-Range: bytes N-M/T`.
fn range_start(resp: &reqwest::Response) -> Option<u64> {
    let v = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let (start, _) = v.trim().strip_prefix("bytes ")?.split_once('-')?;
    start.parse().ok()
}

/// A name percent-encoded for a URL path, keeping `/` between parts (as
/// huggingface_hub quotes file names), so `#`, `?` or `%` in a name stay in it.
fn url_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn log(message: String) -> Event {
    Event::Log {
        level: LogLevel::Info,
        message,
    }
}
