//! The HTTP API and metrics: one executor of its own (not pinned, like the local-delivery shard) serving HTTP/1.1
//! (hyper) on two listeners with one router: the TCP address of `[http] listen` when configured, and always the
//! control socket `<queue_directory>/control.sock` (mode 0600, for `shardmta queue ...` on a running server).
//!
//! Routes: `GET /health`, `GET /metrics`, `GET /api/v1/queue`, `POST /api/v1/queue/{hold,release,delete,flush,
//! bounce}`, `POST /api/v1/reload`, `POST /api/v1/inject` (see README, "HTTP API"); `GET|POST
//! /api/v1/suppression`, `GET|DELETE /api/v1/suppression/{entry}` (README, "Suppression list"), `GET
//! /api/v1/shaping`, `DELETE /api/v1/shaping/{id}` (README, "Sending to the big providers").
//!
//! Who may call: on the control socket everyone (its file permissions and the spool's 0700 are the guard); on
//! TCP a client in `trusted_networks`, or one presenting `Authorization: Bearer <token>` with a token of
//! `api_token_file` (a presented token must be right, from anywhere); anybody else gets 401.
//!
//! Nothing here runs on a shard: queue changes, injections and health go to the shards as messages through the
//! [`ControlPlane`] (awaited on this executor, with its deadline), `queue list` reads the spool on this
//! executor's blocking pool, and `/metrics` reads the shards' atomics ([`metrics`]).
//!
//! Bounds: [`limits::HTTP_TCP_CONNECTIONS_MAX`] connections on TCP and [`limits::HTTP_UNIX_CONNECTIONS_MAX`] on
//! the socket (one more is answered 503 and closed); a request head within [`limits::HTTP_HEADER_READ_TIMEOUT`]
//! and [`limits::HTTP_HEADER_BYTES_MAX`]; each TCP read or write within [`limits::HTTP_IO_TIMEOUT`]; a connection
//! lives at most [`limits::HTTP_CONNECTION_LIFETIME_MAX`]; bodies at most [`limits::HTTP_BODY_BYTES_MAX`], an
//! injection's `message_size_limit * 4 / 3 + HTTP_INJECT_BODY_SLACK_BYTES`.

pub mod inject;
pub mod metrics;
pub mod timer;
pub mod tokens;

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::{TcpListener, UnixListener};
use glommio::sync::Gate;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::config::{Cidr, HttpConfig};
use crate::control::{
    ControlError, InjectMessage, InjectReport, QueueAction, QueueCommand, RefusedRecipient,
    Selector,
};
use crate::limits;
use crate::shard::runtime::Ready;
use crate::shard::Shared;
use inject::{InjectError, InjectLimits};
use timer::TickTimer;
use tokens::{ApiTokens, TokenFileError};

/// The control socket's name in the spool.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Why the HTTP API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on http.listen = {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("{0}")]
    Tokens(#[from] TokenFileError),
    #[error("control socket {path}: {message}")]
    ControlSocket { path: PathBuf, message: String },
}

/// What must be done while the process may still bind low ports and read root's files (before the privilege
/// drop): the TCP listener and the tokens.
pub struct HttpSetup {
    tcp: Option<(SocketAddr, OwnedFd)>,
    tokens: ApiTokens,
}

impl HttpSetup {
    /// Binds `[http] listen` (if set; without SO_REUSEPORT, so a second server on the address is an error) and
    /// reads `api_token_file` (if set).
    pub fn prepare(cfg: &HttpConfig) -> Result<HttpSetup, HttpError> {
        let tcp = match cfg.listen {
            Some(address) => {
                let l = std::net::TcpListener::bind(address)
                    .map_err(|source| HttpError::Bind { address, source })?;
                Some((address, OwnedFd::from(l)))
            }
            None => None,
        };
        let tokens = match &cfg.api_token_file {
            Some(p) => ApiTokens::load(p)?,
            None => ApiTokens::default(),
        };
        Ok(HttpSetup { tcp, tokens })
    }

    /// The TCP address listened on, if any.
    pub fn address(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|(a, _)| *a)
    }
}

/// What every request handler reads.
struct Ctx {
    shared: Arc<Shared>,
    tokens: ApiTokens,
    trusted: Vec<Cidr>,
    registry: prometheus_client::registry::Registry,
    timer: TickTimer,
    /// `[cluster]`: the suppression list's changes shared with the other nodes.
    shared_suppression: Option<Rc<crate::cluster::suppression::SharedSuppression>>,
}

impl Ctx {
    /// What an injection may hold, from the current settings (`message_size_limit` and
    /// `smtpd_recipient_limit` change with a reload), and the body bound that follows.
    fn inject_limits(&self) -> (InjectLimits, usize) {
        let live = self.shared.live.snapshot();
        let cfg = &live.cfg;
        (
            InjectLimits {
                message_size_limit: cfg.message_size_limit,
                recipient_limit: cfg.smtpd_recipient_limit,
                hostname: cfg.myhostname.clone(),
            },
            inject_body_max(cfg.message_size_limit),
        )
    }
}

/// Where a connection came from.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Tcp(IpAddr),
    Unix,
}

/// Who is calling, once authorized.
#[derive(Debug, Clone)]
struct Caller {
    client: IpAddr,
    auth_user: Option<String>,
}

/// The HTTP executor's life: open the control socket, serve both listeners until the shutdown flag, then give
/// open connections `shutdown_timeout` to finish and remove the socket.
pub async fn serve(shared: Arc<Shared>, setup: HttpSetup, mut ready: Ready<HttpError>) {
    let dir = shared.cfg.queue_directory.clone();
    let unix = match control_socket(&dir) {
        Ok(l) => l,
        Err(e) => return ready.failed(e),
    };
    let tcp = setup.tcp.map(|(_, fd)| {
        // SAFETY: a listening socket bound in `prepare`; ownership passes to the listener.
        unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }
    });
    let cfg = &shared.cfg;
    let ctx = Rc::new(Ctx {
        tokens: setup.tokens,
        trusted: cfg.http.trusted_networks.clone(),
        registry: {
            let mut r = metrics::registry(shared.stats.clone());
            metrics::register_suppression(&mut r, shared.suppression.clone());
            if cfg.cluster.is_some() {
                metrics::register_cluster(&mut r);
            }
            metrics::register_shaping(&mut r);
            r
        },
        timer: TickTimer::default(),
        shared_suppression: crate::cluster::suppression::SharedSuppression::from_config(
            cfg,
            shared.suppression.clone(),
        ),
        shared: shared.clone(),
    });
    let shutdown = shared.shutdown.clone();
    if let Some(s) = ctx.shared_suppression.clone() {
        let shutdown = shutdown.clone();
        glommio::spawn_local(s.run(move || shutdown.load(Ordering::Relaxed))).detach();
    }
    glommio::spawn_local(
        ctx.timer
            .clone()
            .run(move || shutdown.load(Ordering::Relaxed)),
    )
    .detach();
    let gate = Gate::new();
    // Dropping the sender stops the accept loops.
    let (stop, stop_rx) = local_channel::new_bounded::<()>(1);
    let stop_rx = Rc::new(stop_rx);
    let mut loops = Vec::new();
    if let Some(l) = tcp {
        loops.push(
            glommio::spawn_local(accept_tcp(ctx.clone(), l, gate.clone(), stop_rx.clone()))
                .detach(),
        );
    }
    loops.push(
        glommio::spawn_local(accept_unix(
            ctx.clone(),
            unix,
            gate.clone(),
            stop_rx.clone(),
        ))
        .detach(),
    );
    ready.ready();
    while !shared.shutdown.load(Ordering::Relaxed) {
        glommio::timer::sleep(limits::SHARD_TICK_INTERVAL).await;
    }
    drop(stop);
    for l in loops {
        l.await;
    }
    // Requests in flight (an injection waiting for its sync) get the shards' drain time to finish.
    let _ = glommio::timer::timeout(shared.cfg.shutdown_timeout.0, async {
        let _ = gate.close().await;
        Ok(())
    })
    .await;
    if let Ok(spool) = crate::spool::Dir::open_root(&dir) {
        let _ = spool.unlink(CONTROL_SOCKET);
    }
}

/// An injection's body limit: the message in base64 (the built form's attachments) plus the JSON around it.
fn inject_body_max(message_size_limit: u64) -> usize {
    let max = message_size_limit
        .saturating_mul(4)
        .div_ceil(3)
        .saturating_add(limits::HTTP_INJECT_BODY_SLACK_BYTES);
    usize::try_from(max).unwrap_or(usize::MAX)
}

/// Creates `<queue_directory>/control.sock` (a stale one, or anything else by that name, is removed first;
/// the name is unlinked, never followed), mode 0600. The spool root must pass the spool's checks (the server's
/// own, not writable by others), so nobody else can swap the name between the steps.
fn control_socket(dir: &Path) -> Result<UnixListener, HttpError> {
    let path = dir.join(CONTROL_SOCKET);
    let err = |message: String| HttpError::ControlSocket {
        path: path.clone(),
        message,
    };
    let spool = crate::spool::Dir::open_root(dir).map_err(|e| err(e.to_string()))?;
    match spool.unlink(CONTROL_SOCKET) {
        Ok(()) => {}
        Err(e)
            if e.io_error()
                .is_some_and(|e| e.kind() == io::ErrorKind::NotFound) => {}
        Err(e) => return Err(err(format!("cannot remove the old one: {e}"))),
    }
    // sun_path holds 107 bytes: a longer spool path is reached through the directory's descriptor.
    let bind_path = if path.as_os_str().len() < 100 {
        path.clone()
    } else {
        PathBuf::from(format!("/proc/self/fd/{}/{CONTROL_SOCKET}", spool.fd()))
    };
    let l = UnixListener::bind(&bind_path).map_err(|e| err(e.to_string()))?;
    rustix::fs::chmod(&bind_path, rustix::fs::Mode::from_raw_mode(0o600))
        .map_err(|e| err(format!("chmod: {e}")))?;
    Ok(l)
}

/// Counts a connection in its listener's open connections while it lives.
struct Slot(Rc<Cell<usize>>);

impl Slot {
    fn take(open: &Rc<Cell<usize>>) -> Slot {
        open.set(open.get() + 1);
        Slot(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 38\r\nConnection: close\r\n\r\n{\"error\":\"too many HTTP connections\"}\n";

/// Tells a connection over the bound that the server is busy (one small write, within a second) and drops it.
async fn refuse_busy(mut s: impl AsyncWrite + Unpin) {
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        let _ = s.write_all(BUSY).await;
        let _ = s.flush().await;
        Ok(())
    })
    .await;
}

async fn stopped(stop: &LocalReceiver<()>) {
    let _ = stop.recv().await;
}

/// Serves an accepted connection in its own task while fewer than `max` are open on its listener; answers 503
/// and closes it otherwise.
async fn admit<S>(
    ctx: &Rc<Ctx>,
    gate: &Gate,
    open: &Rc<Cell<usize>>,
    max: usize,
    stream: S,
    peer: Peer,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    if open.get() >= max {
        refuse_busy(stream).await;
        return;
    }
    let slot = Slot::take(open);
    let ctx = ctx.clone();
    if let Ok(t) = gate.spawn(async move {
        let _slot = slot;
        serve_connection(ctx, stream, peer).await
    }) {
        t.detach();
    }
}

async fn accept_tcp(ctx: Rc<Ctx>, l: TcpListener, gate: Gate, stop: Rc<LocalReceiver<()>>) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let Some(accepted) = crate::net::accept_or_stop(&l, &stop).await else {
            return;
        };
        let (stream, ip) = match accepted {
            Ok((s, peer)) => (s, peer.ip()),
            Err(e) => {
                tracing::warn!(target: crate::eventlog::MASTER, "http: accept: {e}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(limits::HTTP_IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(limits::HTTP_IO_TIMEOUT));
        admit(
            &ctx,
            &gate,
            &open,
            limits::HTTP_TCP_CONNECTIONS_MAX,
            stream,
            Peer::Tcp(ip),
        )
        .await;
    }
}

async fn accept_unix(ctx: Rc<Ctx>, l: UnixListener, gate: Gate, stop: Rc<LocalReceiver<()>>) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let accepted = futures_lite::future::or(async { Some(l.accept().await) }, async {
            stopped(&stop).await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(target: crate::eventlog::MASTER, "http: control socket accept: {e}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        admit(
            &ctx,
            &gate,
            &open,
            limits::HTTP_UNIX_CONNECTIONS_MAX,
            stream,
            Peer::Unix,
        )
        .await;
    }
}

/// One HTTP/1.1 connection (keep-alive), within its lifetime bound.
async fn serve_connection<S>(ctx: Rc<Ctx>, io: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let svc = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(handle(&ctx, peer, req).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(ctx.timer.clone())
        .header_read_timeout(limits::HTTP_HEADER_READ_TIMEOUT)
        .max_header_size(limits::HTTP_HEADER_BYTES_MAX)
        .keep_alive(true)
        .serve_connection(smol_hyper::rt::FuturesIo::new(io), svc);
    let _ = glommio::timer::timeout(limits::HTTP_CONNECTION_LIFETIME_MAX, async {
        let _ = conn.await;
        Ok(())
    })
    .await;
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    match serde_json::to_vec(v) {
        Ok(mut b) => {
            b.push(b'\n');
            respond(status, "application/json", b)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let body = ErrorBody {
        error: message.into(),
    };
    let mut b = serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec());
    b.push(b'\n');
    respond(status, "application/json", b)
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here (allowed: {allow})"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn control_error(e: &ControlError) -> Response<Body> {
    let status = match e {
        ControlError::ShuttingDown | ControlError::Timeout(..) => StatusCode::SERVICE_UNAVAILABLE,
        ControlError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ControlError::Queue(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// The caller, or the 401 to send.
fn authorize(ctx: &Ctx, peer: Peer, headers: &HeaderMap) -> Result<Caller, Box<Response<Body>>> {
    let ip = match peer {
        Peer::Unix => {
            return Ok(Caller {
                client: IpAddr::V4(Ipv4Addr::LOCALHOST),
                auth_user: None,
            })
        }
        Peer::Tcp(ip) => ip,
    };
    let unauthorized = |why: &str| {
        let mut r = error(StatusCode::UNAUTHORIZED, why);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"shardmta\""),
        );
        Box::new(r)
    };
    if let Some(h) = headers.get(header::AUTHORIZATION) {
        // A token that is presented must be right, from a trusted network too.
        return match tokens::bearer(h.as_bytes()).and_then(|t| ctx.tokens.check(t)) {
            Some(m) => Ok(Caller {
                client: ip,
                auth_user: m.name,
            }),
            None => Err(unauthorized("invalid bearer token")),
        };
    }
    if ctx.trusted.iter().any(|n| n.contains(ip)) {
        return Ok(Caller {
            client: ip,
            auth_user: None,
        });
    }
    Err(unauthorized(
        "a bearer token is needed (Authorization: Bearer <token>) from this address",
    ))
}

/// The request's body, at most `limit` bytes (else 413), or the error response.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Box<Response<Body>>> {
    let too_large = || {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        ))),
    }
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

async fn handle(ctx: &Ctx, peer: Peer, req: Request<Incoming>) -> Response<Body> {
    let caller = match authorize(ctx, peer, req.headers()) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let read_only = method == Method::GET || method == Method::HEAD;
    match path.as_str() {
        "/health" if read_only => health(ctx).await,
        "/metrics" if read_only => scrape(ctx, req.headers()),
        "/api/v1/queue" if read_only => list(ctx).await,
        "/health" | "/metrics" | "/api/v1/queue" => not_allowed("GET, HEAD"),
        "/api/v1/reload" if method == Method::POST => {
            ctx.shared.control.request_reload();
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"reload": "requested"}),
            )
        }
        "/api/v1/inject" if method == Method::POST => inject(ctx, caller, req).await,
        "/api/v1/reload" | "/api/v1/inject" => not_allowed("POST"),
        "/api/v1/suppression" if read_only => suppression_list(ctx).await,
        "/api/v1/suppression" if method == Method::POST => suppression_add(ctx, req).await,
        "/api/v1/suppression" => not_allowed("GET, HEAD, POST"),
        p if p.starts_with("/api/v1/suppression/") => {
            let entry = p.trim_start_matches("/api/v1/suppression/").to_string();
            if method == Method::DELETE {
                suppression_remove(ctx, &entry).await
            } else if read_only {
                suppression_check(ctx, &entry)
            } else {
                not_allowed("GET, HEAD, DELETE")
            }
        }
        "/api/v1/shaping" if read_only => shaping_status(ctx).await,
        "/api/v1/shaping" => not_allowed("GET, HEAD"),
        p if p.starts_with("/api/v1/shaping/") => {
            let id = percent_decode(p.trim_start_matches("/api/v1/shaping/"));
            if method == Method::DELETE {
                shaping_cancel(ctx, &id).await
            } else {
                not_allowed("DELETE")
            }
        }
        p => match p.strip_prefix("/api/v1/queue/") {
            Some(action) => match action.parse::<QueueAction>() {
                Ok(a) if method == Method::POST => queue_command(ctx, a, req).await,
                Ok(_) => not_allowed("POST"),
                Err(e) => error(StatusCode::NOT_FOUND, e),
            },
            None => error(StatusCode::NOT_FOUND, format!("no such route: {p}")),
        },
    }
}

async fn health(ctx: &Ctx) -> Response<Body> {
    let h = ctx.shared.control.health().await;
    let status = if h.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &h)
}

fn scrape(ctx: &Ctx, headers: &HeaderMap) -> Response<Body> {
    let format =
        metrics::Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    match metrics::render(&ctx.registry, format) {
        Ok(text) => respond(StatusCode::OK, format.content_type(), text),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        ),
    }
}

/// `queue list --json`'s data, read on this executor's blocking pool.
async fn list(ctx: &Ctx) -> Response<Body> {
    let dir = ctx.shared.cfg.queue_directory.clone();
    let r = glommio::executor()
        .spawn_blocking(move || crate::queue::list_queue(&dir))
        .await;
    match r {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("queue: {e}")),
    }
}

async fn queue_command(ctx: &Ctx, action: QueueAction, req: Request<Incoming>) -> Response<Body> {
    let body = match read_body(req, limits::HTTP_BODY_BYTES_MAX).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return error(
            StatusCode::BAD_REQUEST,
            "a JSON selector is needed: {\"ids\": [...]}, {\"all\": true} or {\"domain\": \"...\"}",
        );
    }
    let selector: Selector = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad selector: {e}")),
    };
    match ctx
        .shared
        .control
        .queue_command(QueueCommand { action, selector })
        .await
    {
        Ok(report) => json(StatusCode::OK, &report),
        Err(e) => control_error(&e),
    }
}

/// `GET /api/v1/shaping`: the shaping automation's active actions of every shard (`{"actions": [...],
/// "count": N}`, oldest first).
async fn shaping_status(ctx: &Ctx) -> Response<Body> {
    match ctx.shared.control.shaping_status().await {
        Ok(a) => json(
            StatusCode::OK,
            &serde_json::json!({"count": a.len(), "actions": a}),
        ),
        Err(e) => control_error(&e),
    }
}

/// `DELETE /api/v1/shaping/{id}`: ends a shaping action (404 when no shard holds it).
async fn shaping_cancel(ctx: &Ctx, id: &str) -> Response<Body> {
    match ctx.shared.control.shaping_cancel(id).await {
        Ok(true) => json(StatusCode::OK, &serde_json::json!({"cancelled": id})),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no active shaping action {id}"),
        ),
        Err(e) => control_error(&e),
    }
}

/// `GET /api/v1/suppression`: every entry (`{"entries": [...], "count": N}`), sorted.
async fn suppression_list(ctx: &Ctx) -> Response<Body> {
    let list = ctx.shared.suppression.snapshot();
    let r = glommio::executor()
        .spawn_blocking(move || list.entries())
        .await;
    json(
        StatusCode::OK,
        &serde_json::json!({"count": r.len(), "entries": r}),
    )
}

/// `GET /api/v1/suppression/{address}`: whether `address` is suppressed, and by which entry.
fn suppression_check(ctx: &Ctx, entry: &str) -> Response<Body> {
    let entry = percent_decode(entry);
    match ctx.shared.suppression.snapshot().check(&entry) {
        Some(h) => json(
            StatusCode::OK,
            &serde_json::json!({"address": entry, "suppressed": true, "entry": h.entry, "reason": &*h.reason}),
        ),
        None => json(
            StatusCode::OK,
            &serde_json::json!({"address": entry, "suppressed": false}),
        ),
    }
}

/// The body of `POST /api/v1/suppression`: exactly one of `address` and `domain`, and a reason.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SuppressionAdd {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    /// Seconds from now after which the entry no longer applies (absent: never).
    #[serde(default)]
    expires_in_s: Option<u64>,
}

/// `POST /api/v1/suppression`: adds an entry; answered after the list's file is durable.
async fn suppression_add(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    use crate::suppression::Target;
    let body = match read_body(req, limits::HTTP_BODY_BYTES_MAX).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let add: SuppressionAdd = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
    };
    let target = match (add.address, add.domain) {
        (Some(a), None) if a.contains('@') && !a.starts_with('@') => Target::parse(&a),
        (None, Some(d)) if !d.trim_start_matches('@').contains('@') => Target::parse(&d),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "exactly one of \"address\" (user@example.com) and \"domain\" (example.com)",
            )
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let reason = add
        .reason
        .unwrap_or_else(|| "added by the administrator".into());
    let expires = add.expires_in_s.map(|s| unix_now_s().saturating_add(s));
    let list = ctx.shared.suppression.clone();
    let key = target.key();
    let shared = ctx
        .shared_suppression
        .as_ref()
        .map(|s| (s.clone(), target.clone(), reason.clone()));
    let r = glommio::executor()
        .spawn_blocking(move || list.add(&target, &reason, expires))
        .await;
    if let (Ok(_), Some((s, target, reason))) = (&r, shared) {
        s.publish(&target, Some((&reason, expires))).await;
    }
    match r {
        Ok(new) => json(
            if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &serde_json::json!({"entry": key, "added": new}),
        ),
        Err(crate::suppression::SuppressionError::Full) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            "the suppression list is full",
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `DELETE /api/v1/suppression/{entry}` (`user@example.com`, `@example.com` or `example.com`, percent-encoded
/// or not).
async fn suppression_remove(ctx: &Ctx, entry: &str) -> Response<Body> {
    let target = match crate::suppression::Target::parse(&percent_decode(entry)) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let list = ctx.shared.suppression.clone();
    let key = target.key();
    let shared = ctx
        .shared_suppression
        .as_ref()
        .map(|s| (s.clone(), target.clone()));
    let r = glommio::executor()
        .spawn_blocking(move || list.remove(&target))
        .await;
    // Shared even when not listed here: another node may list it.
    if let (Ok(_), Some((s, target))) = (&r, shared) {
        s.publish(&target, None).await;
    }
    match r {
        Ok(true) => json(
            StatusCode::OK,
            &serde_json::json!({"entry": key, "removed": true}),
        ),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("not listed: {key}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `%40` and the like in a path segment (a bad escape is kept as written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The answer to an injection: every message's queue ID, and each recipient accepted or refused.
#[derive(Debug, Default, Serialize)]
struct InjectAnswer {
    queue_ids: Vec<String>,
    accepted: Vec<String>,
    refused: Vec<RefusedRecipient>,
}

async fn inject(ctx: &Ctx, caller: Caller, req: Request<Incoming>) -> Response<Body> {
    let (limits, body_max) = ctx.inject_limits();
    let body = match read_body(req, body_max).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let prepared = match inject::prepare(&body, &limits, unix_now_s()) {
        Ok(p) => p,
        Err(e @ (InjectError::TooLarge { .. } | InjectError::RequestTooLarge { .. })) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(InjectError::Bad(m)) => return error(StatusCode::BAD_REQUEST, m),
    };
    drop(body);
    let mut answer = InjectAnswer::default();
    let mut failures: Vec<ControlError> = Vec::new();
    let mut queued_any = false;
    let mut messages = prepared.into_iter().peekable();
    // At most HTTP_INJECT_MESSAGES_IN_FLIGHT_MAX messages wait for their shards at once (the plane spreads
    // them over the shards, whose group commits take them together).
    while messages.peek().is_some() {
        let batch: Vec<_> = messages
            .by_ref()
            .take(limits::HTTP_INJECT_MESSAGES_IN_FLIGHT_MAX)
            .map(|p| {
                let recipients = p.recipients.clone();
                let m = InjectMessage {
                    envelope_sender: p.envelope_sender,
                    recipients: p.recipients,
                    content: p.content,
                    client: caller.client,
                    auth_user: caller.auth_user.clone(),
                    pool: p.pool,
                };
                let plane = ctx.shared.control.clone();
                (
                    recipients,
                    glommio::spawn_local(async move { plane.inject(m).await }),
                )
            })
            .collect();
        for (recipients, task) in batch {
            match task.await {
                Ok(InjectReport {
                    queue_id,
                    accepted,
                    refused,
                }) => {
                    queued_any = true;
                    answer.queue_ids.extend(queue_id);
                    answer.accepted.extend(accepted);
                    answer.refused.extend(refused);
                }
                Err(e) => {
                    answer
                        .refused
                        .extend(recipients.into_iter().map(|recipient| RefusedRecipient {
                            recipient,
                            // A shard that answers too late may still queue it: say so, so that a
                            // client retrying knows it may make a duplicate.
                            reason: match e {
                                ControlError::Timeout(..) => {
                                    format!("not confirmed, may have been queued: {e}")
                                }
                                _ => format!("not queued: {e}"),
                            },
                        }));
                    failures.push(e);
                }
            }
        }
    }
    if !queued_any {
        if let Some(e) = failures.first() {
            return control_error(e);
        }
    }
    json(StatusCode::OK, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_body_bound_covers_base64_of_the_largest_message() {
        assert_eq!(
            inject_body_max(3),
            4 + limits::HTTP_INJECT_BODY_SLACK_BYTES as usize
        );
        let m = limits::MESSAGE_SIZE_BYTES_DEFAULT;
        let b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            vec![0u8; 3 * 1000],
        );
        assert_eq!(b64.len(), 4000);
        assert!(inject_body_max(m) as u64 >= m / 3 * 4);
        assert!(inject_body_max(u64::MAX) > 0);
    }

    #[test]
    fn busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
