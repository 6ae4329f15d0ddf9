//! A stand-in for the Hugging Face hub on 127.0.0.1, serving model folders as repos
//! through the endpoints huggingface_hub and our client use:
//! `GET /api/models/<id>/revision/<rev>` (commit and file list) and
//! `HEAD|GET /<id>/resolve/<rev>/<file>`. Like the hub, large files (`*.safetensors`)
//! answer with a redirect to a CDN path carrying `X-Linked-Etag` (their sha256) and
//! `X-Linked-Size`; small files carry a plain `ETag`; every answer has
//! `X-Repo-Commit`; the CDN honours `Range` (416 past the end, as the real one).
//! Gated repos need a bearer token (401 otherwise).
//!
//! [`Faults`] make it a broken or hostile hub: a connection cut after N bytes, a commit
//! id that is a path, answers for any path whatever it names, file bodies longer than
//! their declared size (or endless), a declared size of the tester's choosing, an
//! endless revision answer, answers that stall or trickle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Clone)]
pub struct Repo {
    pub dir: PathBuf,
    pub commit: String,
    /// Requests need `Authorization: Bearer <token>` with this token.
    pub token: Option<String>,
}

/// Ways the stand-in misbehaves on purpose; the default is a well-behaved hub.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Cuts the first CDN download after this many bytes.
    pub break_after: Option<u64>,
    /// The commit id the revision API answers instead of the repo's.
    pub sha: Option<String>,
    /// Answers every path no route knows (say, one a client built from `../` names) with
    /// the repo file named by its last part, as if it were a resolve of that file.
    pub answer_any_path: bool,
    /// Bodies of files whose name ends with this are longer than their declared size.
    pub oversize_file: Option<String>,
    /// How many bytes past the declared size; `None` with `oversize_file`: endless.
    pub oversize_by: Option<u64>,
    /// The revision answer never ends (a file list that goes on and on).
    pub endless_revision: bool,
    /// File downloads (GET) never answer.
    pub stall_downloads: bool,
    /// CDN bodies trickle (16 KiB every 5 ms), so that downloads overlap in time.
    pub slow_downloads: bool,
    /// HEAD answers declare this size for files whose name ends with the string.
    pub declared_size: Option<(String, u64)>,
}

#[derive(Default)]
struct Inner {
    repos: BTreeMap<String, Repo>,
    faults: Faults,
    broken_once: AtomicBool,
    log: Mutex<Vec<String>>,
}

pub struct HubStandIn {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HubStandIn {
    /// Serves `repos` (id → folder) on a free port; `break_after` cuts the first CDN
    /// download after that many bytes.
    pub fn start(repos: BTreeMap<String, Repo>, break_after: Option<u64>) -> std::io::Result<Self> {
        Self::start_with(
            repos,
            Faults {
                break_after,
                ..Faults::default()
            },
        )
    }

    /// Serves `repos` on a free port, misbehaving as `faults` say.
    pub fn start_with(repos: BTreeMap<String, Repo>, faults: Faults) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            repos,
            faults,
            ..Inner::default()
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = inner.clone();
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
                let app = Router::new()
                    .route("/api/models/{org}/{name}/revision/{rev}", get(revision))
                    .route("/{org}/{name}/resolve/{rev}/{*file}", any(resolve))
                    .route("/cdn/{sha}", get(cdn))
                    .fallback(any_path)
                    .with_state(state);
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = rx => {}
                }
            });
            rt.shutdown_background();
        });
        Ok(HubStandIn {
            addr,
            inner,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far as `METHOD path [range]`.
    pub fn requests(&self) -> Vec<String> {
        self.inner.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for HubStandIn {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn record(s: &Inner, method: &Method, path: &str, headers: &HeaderMap) {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    if let Ok(mut log) = s.log.lock() {
        log.push(format!("{method} {path}{range}"));
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The repo, if the request may see it (gated repos need their token).
fn authorized<'a>(s: &'a Inner, id: &str, headers: &HeaderMap) -> Result<&'a Repo, Box<Response>> {
    let Some(repo) = s.repos.get(id) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "Repository not found",
        )));
    };
    if let Some(want) = &repo.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(want.as_str()) {
            return Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."),
            )));
        }
    }
    Ok(repo)
}

fn files(repo: &Repo) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(&repo.dir)
        .map(|es| {
            es.flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn revision(
    State(s): State<Arc<Inner>>,
    method: Method,
    headers: HeaderMap,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
) -> Response {
    let id = format!("{org}/{name}");
    record(
        &s,
        &method,
        &format!("/api/models/{id}/revision/{rev}"),
        &headers,
    );
    let repo = match authorized(&s, &id, &headers) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if rev != "main" && rev != repo.commit {
        return error(StatusCode::NOT_FOUND, &format!("Invalid rev id: {rev}"));
    }
    let sha = s.faults.sha.clone().unwrap_or_else(|| repo.commit.clone());
    if s.faults.endless_revision {
        let head = format!(r#"{{"id":"{id}","sha":"{sha}","siblings":["#);
        let entry = bytes::Bytes::from(r#"{"rfilename":"padding.json"},"#.repeat(2048));
        let stream = futures_util::stream::unfold(Some(head), move |head| {
            let entry = entry.clone();
            async move {
                let chunk = match head {
                    Some(h) => bytes::Bytes::from(h),
                    None => {
                        // About 60 MB/s: endless, without flooding a client that buffers.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        entry
                    }
                };
                Some((Ok::<_, std::io::Error>(chunk), None))
            }
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    let siblings: Vec<_> = files(repo)
        .into_iter()
        .map(|f| json!({ "rfilename": f }))
        .collect();
    Json(json!({ "id": id, "sha": sha, "siblings": siblings })).into_response()
}

/// With `answer_any_path`, a path no route matched is answered as a resolve of the
/// file named by its last part, from the first repo.
async fn any_path(
    State(s): State<Arc<Inner>>,
    method: Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    record(&s, &method, uri.path(), &headers);
    let repo = s.repos.values().next();
    match repo.filter(|_| s.faults.answer_any_path) {
        Some(repo) => {
            let name = uri
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            serve_file(&s, &method, &headers, repo, &name).await
        }
        None => error(StatusCode::NOT_FOUND, "no such route"),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

async fn resolve(
    State(s): State<Arc<Inner>>,
    method: Method,
    headers: HeaderMap,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
) -> Response {
    let id = format!("{org}/{name}");
    record(
        &s,
        &method,
        &format!("/{id}/resolve/{rev}/{file}"),
        &headers,
    );
    let repo = match authorized(&s, &id, &headers) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if rev != "main" && rev != repo.commit {
        return error(StatusCode::NOT_FOUND, "Revision Not Found");
    }
    if file.contains("..") {
        return error(StatusCode::BAD_REQUEST, "bad path");
    }
    serve_file(&s, &method, &headers, repo, &file).await
}

/// Grows a body past its declared size when the faults say so for this file: by a
/// fixed amount, or forever.
fn padded(s: &Inner, file: &str, body: Vec<u8>) -> Body {
    let target = s.faults.oversize_file.as_deref();
    if !target.is_some_and(|t| file.ends_with(t)) {
        return Body::from(body);
    }
    let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
    // The state is how many padding bytes are left (`None`: endless).
    let rest = futures_util::stream::unfold(s.faults.oversize_by, move |left| {
        let chunk = chunk.clone();
        async move {
            let n = match left {
                Some(0) => return None,
                Some(n) => n.min(chunk.len() as u64) as usize,
                None => chunk.len(),
            };
            let left = left.map(|l| l - n as u64);
            Some((Ok::<_, std::io::Error>(chunk.slice(..n)), left))
        }
    });
    let first = futures_util::stream::once(async move { Ok(bytes::Bytes::from(body)) });
    Body::from_stream(futures_util::StreamExt::chain(first, rest))
}

async fn stall_if_asked(s: &Inner, method: &Method) {
    if s.faults.stall_downloads && method == Method::GET {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

async fn serve_file(
    s: &Inner,
    method: &Method,
    headers: &HeaderMap,
    repo: &Repo,
    file: &str,
) -> Response {
    let Ok(bytes) = std::fs::read(repo.dir.join(file)) else {
        return error(StatusCode::NOT_FOUND, "Entry not found");
    };
    let sha = sha256_hex(&bytes);
    let declared = match &s.faults.declared_size {
        Some((name, size)) if file.ends_with(name.as_str()) => *size,
        _ => bytes.len() as u64,
    };
    if file.ends_with(".safetensors") {
        // LFS: the hub redirects to the CDN (another host, so an absolute address that
        // clients do not follow on HEAD) and names the blob by its sha256.
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("http://{host}/cdn/{sha}"))
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-linked-size", declared)
            .header("x-repo-commit", &repo.commit)
            .header(header::ETAG, "\"redirect\"")
            .body(Body::empty())
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    // Regular git files: a 40-hex etag (git's blob id on the real hub).
    let etag = &sha[..40];
    let builder = Response::builder()
        .header(header::ETAG, format!("\"{etag}\""))
        .header("x-repo-commit", &repo.commit);
    if method == Method::HEAD {
        return builder
            .header(header::CONTENT_LENGTH, declared)
            .body(Body::empty())
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    stall_if_asked(s, method).await;
    builder
        .body(padded(s, file, bytes))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

async fn cdn(
    State(s): State<Arc<Inner>>,
    method: Method,
    headers: HeaderMap,
    UrlPath(sha): UrlPath<String>,
) -> Response {
    record(&s, &method, &format!("/cdn/{sha}"), &headers);
    let found = s.repos.values().find_map(|r| {
        files(r).into_iter().find_map(|f| {
            let bytes = std::fs::read(r.dir.join(&f)).ok()?;
            (sha256_hex(&bytes) == sha).then_some((f, bytes))
        })
    });
    let Some((name, bytes)) = found else {
        return error(StatusCode::NOT_FOUND, "no such object");
    };
    stall_if_asked(&s, &method).await;
    let total = bytes.len() as u64;
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    if start.is_some_and(|n| n >= total) {
        return Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{total}"))
            .body(Body::empty())
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    if s.faults
        .oversize_file
        .as_deref()
        .is_some_and(|t| name.ends_with(t))
    {
        return Response::builder()
            .header(header::ETAG, format!("\"{sha}\""))
            .body(padded(&s, &name, bytes))
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    let (status, body_bytes) = match start {
        Some(n) => (StatusCode::PARTIAL_CONTENT, bytes[n as usize..].to_vec()),
        None => (StatusCode::OK, bytes),
    };
    let len = body_bytes.len();
    // The first download may be cut short: the body stream fails after N bytes, which
    // drops the connection mid-transfer like a network fault.
    let cut = s
        .faults
        .break_after
        .filter(|_| !s.broken_once.swap(true, Ordering::SeqCst))
        .map(|n| n as usize)
        .filter(|&n| n < len);
    // The cut comes a moment after the first part, so that part is flushed to the
    // client first, as when a real connection drops mid-file.
    if s.faults.slow_downloads {
        let body = bytes::Bytes::from(body_bytes);
        let stream = futures_util::stream::unfold(0usize, move |at| {
            let body = body.clone();
            async move {
                if at >= body.len() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                let end = (at + (16 << 10)).min(body.len());
                Some((Ok::<_, std::io::Error>(body.slice(at..end)), end))
            }
        });
        return Response::builder()
            .status(status)
            .header(header::CONTENT_LENGTH, len)
            .header(header::ETAG, format!("\"{sha}\""))
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    let first = bytes::Bytes::from(body_bytes[..cut.unwrap_or(len)].to_vec());
    let stream = futures_util::stream::unfold(0u8, move |state| {
        let first = first.clone();
        async move {
            match (state, cut) {
                (0, _) => Some((Ok(first), 1)),
                (1, Some(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Some((
                        Err(std::io::Error::other("connection cut by the stand-in")),
                        2,
                    ))
                }
                _ => None,
            }
        }
    });
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .header(header::ETAG, format!("\"{sha}\""));
    if let Some(n) = start {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {n}-{}/{total}", total - 1),
        );
    }
    b.body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}
