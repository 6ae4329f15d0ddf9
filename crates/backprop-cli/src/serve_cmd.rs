//! `backprop serve`: the app API (docs/http-api.md) over HTTP with Server-Sent Events,
//! and the built web UI, so a headless GPU box gets the same app in a browser. Loopback
//! only unless a token protects it; without a token only the server's own loopback
//! address (Host) and page (Origin) may use it, so other web pages cannot. Bodies are
//! capped (JSON small, uploads streamed to disk) and abandoned checks stop.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, OriginalUri, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use backprop_service::dto::*;
use backprop_service::{ErrorKind, RequestBudget, Service, ServiceConfig, ServiceError};
use clap::Args;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on; anything but loopback needs --token
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Secret every request must carry (`Authorization: Bearer ...`, or `#token=` in
    /// the page address), at least 16 characters; also read from BACKPROP_TOKEN
    #[arg(long, env = "BACKPROP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Another web origin allowed to call the API without a token, e.g. the UI dev
    /// server `http://localhost:5173` (repeatable)
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origins: Vec<String>,
    /// Largest dataset upload accepted (MiB)
    #[arg(long, default_value_t = 2048)]
    pub max_upload_mib: u64,
    /// The built web UI [default: BACKPROP_UI_DIR, else ui/ next to the binary, else
    /// the source tree's ui/dist]
    #[arg(long)]
    pub ui_dir: Option<PathBuf>,
    /// Where runs are kept [default: $BACKPROP_HOME/runs or the platform data folder]
    #[arg(long)]
    pub runs_dir: Option<PathBuf>,
    /// Pause training while the GPU is this hot (°C), resuming 5 °C below; 0 turns the
    /// guard off
    #[arg(long, default_value_t = 85.0)]
    pub thermal_limit: f32,
}

#[derive(Clone)]
struct AppState {
    service: Service,
    token: Option<Arc<str>>,
    ui_dir: Option<Arc<Path>>,
    /// The port the listener got (known only after binding with --port 0).
    port: u16,
    allow_origins: Arc<[String]>,
}

/// Shortest token accepted: guessing 16 random characters over HTTP is hopeless.
const MIN_TOKEN_CHARS: usize = 16;
/// JSON request bodies are small; anything bigger is refused before it is buffered.
const MAX_JSON_BODY: usize = 1 << 20;
/// Wall-clock budget of one data check.
const CHECK_TIME_LIMIT: Duration = Duration::from_secs(120);

struct ApiFailure(ServiceError);

impl From<ServiceError> for ApiFailure {
    fn from(e: ServiceError) -> Self {
        ApiFailure(e)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let status = match self.0.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(self.0.to_api())).into_response()
    }
}

type ApiResult<T> = std::result::Result<Json<T>, ApiFailure>;

fn refusal(status: StatusCode, error: String, hint: String) -> Response {
    (
        status,
        Json(ApiError {
            error,
            hint: Some(hint),
        }),
    )
        .into_response()
}

/// Runs blocking engine work off the async threads.
async fn off_executor<T: Send + 'static>(
    f: impl FnOnce() -> backprop_service::Result<T> + Send + 'static,
) -> std::result::Result<T, ApiFailure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiFailure),
        Err(e) => Err(ApiFailure(ServiceError::new(
            ErrorKind::Internal,
            format!("worker failed: {e}"),
        ))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> backprop_service::Result<T> + Send + 'static,
) -> ApiResult<T> {
    off_executor(f).await.map(Json)
}

/// `Json` whose refusals never quote the body: serde names the field that is wrong, and
/// any string value it would repeat is replaced by `…`.
struct ApiJson<T>(T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> std::result::Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection as R;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(R::BytesRejection(_)) => Err(refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over the {} KiB limit of JSON calls",
                    MAX_JSON_BODY >> 10
                ),
                "Send the request's fields only; datasets go to POST /api/datasets, or give their path.".into(),
            )),
            Err(R::MissingJsonContentType(_)) => Err(refusal(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be JSON".into(),
                "Send it with `Content-Type: application/json`.".into(),
            )),
            Err(e) => Err(refusal(
                e.status(),
                format!("the request body does not fit this call: {}", redact_serde(&e.body_text())),
                "See docs/http-api.md for the fields of each call.".into(),
            )),
        }
    }
}

/// serde's message without the body's own text: quoted strings become `"…"` and the
/// name in "unknown field/variant `x`" becomes `…`; bounded in length.
fn redact_serde(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_string = false;
                    out.push_str("…\"");
                }
                _ => {}
            }
        } else {
            out.push(c);
            in_string = c == '"';
        }
    }
    for marker in ["unknown field `", "unknown variant `"] {
        if let Some(at) = out.find(marker) {
            let from = at + marker.len();
            if let Some(len) = out[from..].find('`') {
                out.replace_range(from..from + len, "…");
            }
        }
    }
    out.chars().take(300).collect()
}

pub fn run(args: &ServeArgs) -> Result<ExitCode> {
    let token = args.token.clone().filter(|t| !t.is_empty());
    if let Some(t) = &token {
        if t.trim().is_empty() {
            bail!(
                "the token is only whitespace\n  fix: pass a random secret of at least {MIN_TOKEN_CHARS} characters, e.g. --token \"$(openssl rand -hex 16)\""
            );
        }
        let n = t.chars().count();
        if n < MIN_TOKEN_CHARS {
            bail!(
                "the token is too short ({n} characters; at least {MIN_TOKEN_CHARS} are needed so it cannot be guessed)\n  fix: pass a random secret, e.g. --token \"$(openssl rand -hex 16)\""
            );
        }
    }
    for o in &args.allow_origins {
        if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
            bail!(
                "--allow-origin {o:?} is not a web origin\n  fix: give scheme, host and port only, e.g. --allow-origin http://localhost:5173"
            );
        }
    }
    if !args.host.is_loopback() && token.is_none() {
        bail!(
            "refusing to listen on {} without a token: anyone on the network could train, \
             read your runs and push models.\n  fix: add --token <secret> (or set BACKPROP_TOKEN), \
             then open http://<this-host>:{}/#token=<secret>",
            args.host,
            args.port
        );
    }
    let ui_dir = find_ui_dir(args.ui_dir.as_deref());
    let service = Service::new(ServiceConfig {
        runs_dir: args
            .runs_dir
            .clone()
            .unwrap_or_else(backpropagate::run::default_runs_dir),
        ollama_host: None,
        thermal_limit_c: (args.thermal_limit > 0.0).then_some(args.thermal_limit),
        max_upload_bytes: args.max_upload_mib.saturating_mul(1 << 20),
        ..ServiceConfig::default()
    });
    let mut state = AppState {
        service,
        token: token.map(Arc::from),
        ui_dir: ui_dir.clone().map(Arc::from),
        port: args.port,
        allow_origins: args.allow_origins.clone().into(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (is another `backprop serve` running? try --port)"))?;
        let local = listener.local_addr()?;
        state.port = local.port();
        match &ui_dir {
            Some(d) => eprintln!("serving the web UI from {}", d.display()),
            None => eprintln!(
                "warning: no built web UI found (run `npm run build`, or pass --ui-dir); serving the API only"
            ),
        }
        // Tests and scripts read this line to learn the port when --port 0 is used.
        println!("listening on http://{local}");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| anyhow!("server stopped: {e}"))
    })?;
    Ok(ExitCode::SUCCESS)
}

fn find_ui_dir(given: Option<&Path>) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(g) = given {
        candidates.push(g.to_path_buf());
    }
    if let Some(env) = std::env::var_os("BACKPROP_UI_DIR") {
        candidates.push(PathBuf::from(env));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(exe_dir.join("ui"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui/dist"));
    candidates
        .into_iter()
        .find(|d| d.join("index.html").is_file())
        .and_then(|d| d.canonicalize().ok())
}

fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/info", get(info))
        .route("/config/defaults", get(config_defaults))
        .route("/models/inspect", post(inspect_model))
        .route("/models/recent", get(recent_models))
        .route("/models/download", post(download_model))
        .route(
            "/datasets",
            post(upload_dataset).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/data/check", post(check_data))
        .route("/runs", get(list_runs).post(start_training))
        .route("/runs/plan", post(plan_training))
        .route("/runs/{id}", get(get_run))
        .route("/runs/{id}/resume", post(resume_run))
        .route("/runs/{id}/export", post(export_run))
        .route("/runs/{id}/push", post(push_run))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{job}/stop", post(stop_job))
        .route("/ollama/status", get(ollama_status))
        .route("/ollama/models", get(ollama_models))
        .route("/ollama/chat", post(ollama_chat))
        .route("/events", get(events))
        .fallback(|| async {
            ApiFailure(ServiceError::new(ErrorKind::NotFound, "no such API call"))
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .nest("/api", api)
        .fallback(static_file)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            same_site_only,
        ))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timing.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Without a token the loopback address is the only protection, and a browser would
/// let any web page reach it: through a DNS name that resolves to 127.0.0.1 (rebinding:
/// the request then carries that name as `Host`), or by a cross-site request (which
/// carries the page's `Origin`). So without a token only the server's own loopback
/// names and port are answered, and only its own pages (or --allow-origin ones) may
/// call. Clients that send no `Origin` (curl, scripts) are not web pages and pass.
async fn same_site_only(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.token.is_some() {
        return next.run(req).await;
    }
    let port = state.port;
    let own = format!("http://127.0.0.1:{port}");
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let loopback_names = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    if !host
        .as_deref()
        .is_some_and(|h| loopback_names.iter().any(|n| n.eq_ignore_ascii_case(h)))
    {
        let shown = host.as_deref().map_or("no Host".to_string(), shown_header);
        return refusal(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server answers only as 127.0.0.1, localhost or [::1] on port {port}, not as `{shown}`"
            ),
            format!(
                "Open {own}/ directly. A page reached through another name cannot use this server; \
                 behind a proxy or tunnel, start it with --token."
            ),
        );
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let allowed = loopback_names
            .iter()
            .any(|n| origin.eq_ignore_ascii_case(&format!("http://{n}")))
            || state
                .allow_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin));
        if !allowed {
            return refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "cross-site request refused: a page from `{}` cannot use this server",
                    shown_header(origin)
                ),
                format!(
                    "Use the app at {own}/. To let another page of yours call it (a UI dev \
                     server), start `backprop serve --allow-origin <origin>`."
                ),
            );
        }
    }
    next.run(req).await
}

/// A client's header for an error message: printable ASCII, at most 100 characters.
fn shown_header(value: &str) -> String {
    value
        .chars()
        .take(100)
        .flat_map(char::escape_default)
        .collect()
}

async fn require_token(
    State(state): State<AppState>,
    Query(q): Query<TokenQuery>,
    OriginalUri(original): OriginalUri,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(want) = &state.token else {
        return next.run(req).await;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // `EventSource` cannot send headers, so only the event stream takes `?token=`;
    // everywhere else a token in the address (and so in logs and history) is refused.
    let is_sse = original.path() == "/api/events";
    let given = bearer.or(q.token.as_deref().filter(|_| is_sse));
    if given.is_some_and(|g| same(g, want)) {
        return next.run(req).await;
    }
    let hint = if q.token.is_some() && !is_sse {
        "`?token=` is accepted only on /api/events; send `Authorization: Bearer <token>` instead."
    } else {
        "Open the page as http://host:port/#token=<secret> (the token given to `backprop serve --token`)."
    };
    refusal(
        StatusCode::UNAUTHORIZED,
        "this server needs a token".into(),
        hint.into(),
    )
}

async fn static_file(State(state): State<AppState>, uri: axum::http::Uri) -> Response {
    let Some(root) = &state.ui_dir else {
        return (
            StatusCode::NOT_FOUND,
            "The web UI is not built. Run `npm ci && npm run build` in the repository, or pass --ui-dir.",
        )
            .into_response();
    };
    let rel = uri.path().trim_start_matches('/');
    let rel = Path::new(if rel.is_empty() { "index.html" } else { rel });
    // Only plain names below the UI folder: no `..`, no absolute paths.
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let mut path = root.join(rel);
    if !path.is_file() {
        // Client-side routes load the app shell.
        path = root.join("index.html");
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let mime = match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
                "html" => "text/html; charset=utf-8",
                "js" | "mjs" => "text/javascript; charset=utf-8",
                "css" => "text/css; charset=utf-8",
                "svg" => "image/svg+xml",
                "png" => "image/png",
                "ico" => "image/x-icon",
                "json" | "map" => "application/json",
                "woff2" => "font/woff2",
                _ => "application/octet-stream",
            };
            let cache = if rel.starts_with("assets") {
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            };
            (
                [(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, cache)],
                bytes,
            )
                .into_response()
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn info(State(s): State<AppState>) -> Json<AppInfo> {
    Json(s.service.info())
}

async fn config_defaults(State(s): State<AppState>) -> Json<backpropagate::TrainConfig> {
    Json(s.service.config_defaults())
}

async fn inspect_model(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ModelRequest>,
) -> ApiResult<ModelInfo> {
    blocking(move || s.service.inspect_model(&req)).await
}

async fn download_model(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ModelRequest>,
) -> ApiResult<JobInfo> {
    blocking(move || s.service.download_model(&req)).await
}

async fn recent_models(State(s): State<AppState>) -> ApiResult<Vec<String>> {
    blocking(move || s.service.recent_models()).await
}

#[derive(Deserialize)]
struct UploadQuery {
    name: String,
}

/// How long an upload may send nothing before it is dropped.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);

/// Streams the body to a temporary file on a blocking thread, so a large or slow upload
/// costs disk, not memory. A client that goes away drops this future, which closes the
/// channel, and the unfinished upload removes its file.
async fn upload_dataset(
    State(s): State<AppState>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<UploadedDataset> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let service = s.service.clone();
    let mut upload = off_executor(move || service.begin_upload(&q.name, declared)).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = rx.blocking_recv() {
            upload.write(&chunk)?;
        }
        Ok(upload)
    });
    let mut frames = body.into_data_stream();
    loop {
        // A client that stops sending would otherwise hold an upload slot forever.
        let Ok(next) = tokio::time::timeout(UPLOAD_IDLE, frames.next()).await else {
            return Err(ApiFailure(ServiceError::new(
                ErrorKind::BadRequest,
                format!(
                    "the upload stalled: no data for {} s; it was dropped",
                    UPLOAD_IDLE.as_secs()
                ),
            )));
        };
        let Some(frame) = next else { break };
        match frame {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    break; // the writer stopped; its error says why
                }
            }
            Err(e) => {
                return Err(ApiFailure(ServiceError::new(
                    ErrorKind::BadRequest,
                    format!("the upload was cut off: {e}"),
                )))
            }
        }
    }
    drop(tx);
    let upload = match writer.await {
        Ok(r) => r.map_err(ApiFailure)?,
        Err(e) => {
            return Err(ApiFailure(ServiceError::new(
                ErrorKind::Internal,
                format!("worker failed: {e}"),
            )))
        }
    };
    blocking(move || upload.finish()).await
}

/// The check stops between its stages once this request is dropped (the client went
/// away) or its time is up, so abandoned checks do not keep the CPU busy.
async fn check_data(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<DataCheckRequest>,
) -> ApiResult<DataReport> {
    let budget = RequestBudget::new(CHECK_TIME_LIMIT);
    let _cancel = budget.cancel_on_drop();
    blocking(move || s.service.check_data_within(&req, &budget)).await
}

async fn list_runs(State(s): State<AppState>) -> ApiResult<Vec<backpropagate::run::RunInfo>> {
    blocking(move || s.service.list_runs()).await
}

async fn get_run(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> ApiResult<RunDetail> {
    blocking(move || s.service.get_run(&id)).await
}

async fn plan_training(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<StartTraining>,
) -> ApiResult<TrainPlan> {
    blocking(move || s.service.plan_training(req)).await
}

async fn start_training(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<StartTraining>,
) -> ApiResult<JobInfo> {
    blocking(move || s.service.start_training(req)).await
}

async fn resume_run(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> ApiResult<JobInfo> {
    blocking(move || s.service.resume_run(&id)).await
}

async fn export_run(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    ApiJson(req): ApiJson<ExportRequest>,
) -> ApiResult<JobInfo> {
    blocking(move || s.service.export_run(&id, &req)).await
}

async fn push_run(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    ApiJson(req): ApiJson<PushRequest>,
) -> ApiResult<JobInfo> {
    blocking(move || s.service.push_run(&id, &req)).await
}

async fn list_jobs(State(s): State<AppState>) -> Json<Vec<JobInfo>> {
    Json(s.service.list_jobs())
}

async fn stop_job(State(s): State<AppState>, UrlPath(job): UrlPath<String>) -> ApiResult<JobInfo> {
    s.service.stop_job(&job).map(Json).map_err(ApiFailure)
}

async fn ollama_status(State(s): State<AppState>) -> Json<OllamaStatus> {
    Json(s.service.ollama_status().await)
}

async fn ollama_models(State(s): State<AppState>) -> ApiResult<Vec<OllamaModel>> {
    s.service
        .ollama_models()
        .await
        .map(Json)
        .map_err(ApiFailure)
}

async fn ollama_chat(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> ApiResult<ChatMessage> {
    s.service
        .ollama_chat(&req)
        .await
        .map(Json)
        .map_err(ApiFailure)
}

async fn events(
    State(s): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut rx = s.service.subscribe();
    let stream = async_stream(move |yield_| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let data = serde_json::to_string(&ev).unwrap_or_default();
                    if !yield_(SseEvent::default().data(data)).await {
                        break;
                    }
                }
                // Fell behind: say so and keep going; the UI reloads the run's metrics.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    if !yield_(SseEvent::default().event("lagged").data(n.to_string())).await {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// A stream fed by an async producer through a small channel; the producer's `yield_`
/// returns false once the client went away.
fn async_stream<F, Fut>(producer: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(
        Box<
            dyn Fn(SseEvent) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
                + Send
                + Sync,
        >,
    ) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let yield_ = Box::new(move |ev: SseEvent| {
        let tx = tx.clone();
        Box::pin(async move { tx.send(ev).await.is_ok() })
            as std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
    });
    tokio::spawn(producer(yield_));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}
