//! The HTTP API and gateway a daemon serves, written against the same [`Node`] handle as the
//! CLI: kubo's RPC shapes under `POST /api/v0/...` (so IPFS tools and scripts can speak to a
//! daemon) and the trustless gateway's `GET /ipfs/{cid}` (file bytes with ranges, a single
//! block with `?format=raw`, the DAG as a CAR with `?format=car`).
//!
//! It listens on loopback by default; bound elsewhere it demands a bearer token, since the API
//! can reach every block the daemon can. Requests in progress are capped (past the cap a
//! request waits its turn, and is answered 503 if that takes too long), bodies stream through
//! bounded pipes, and every error is kubo's JSON shape `{"Message", "Code", "Type"}` with a
//! status that says what went wrong.

mod dashboard;
mod gateway;
mod jobs;
mod rpc;
mod upload;

use crate::bitswap::BitswapError;
use crate::blocks::RemoteError;
use crate::engine::client::ClientError;
use crate::error::Error;
use crate::node::Node;
use crate::repo::files::FileError;
use crate::repo::store::StoreError;
use crate::tasks::Tasks;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use p2pmr_protocol::Cid;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error as ThisError;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The API's port when none is given (kubo's); the next free one is taken if it is in use.
pub const DEFAULT_API_PORT: u16 = 5001;
/// Requests served at once; more wait for a turn.
const MAX_REQUESTS: usize = 64;
/// How long a request waits for its turn before it is answered 503. Clients such as a
/// verifying gateway client ask for every block of a file at once and do not retry a 503, so
/// a burst waits rather than fails; the connection cap bounds how many can wait.
const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections open at once; more are closed as soon as they are accepted.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers (a slow or idle connection is
/// closed after it).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Ports tried after the default one.
const PORTS_TRIED: u16 = 100;

/// How a daemon serves HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Where to listen (port 0: any free port).
    pub addr: SocketAddr,
    /// If `addr`'s port is taken, take the next free one (for the default address).
    pub next_free: bool,
    /// The bearer token every request must carry; required off loopback.
    pub token: Option<String>,
    /// How long a client may take to send a request's headers, and how long an upload's body
    /// may stall between two pieces.
    pub header_timeout: std::time::Duration,
}

impl ApiConfig {
    /// `127.0.0.1:5001`, or the next free port.
    pub fn loopback() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT)),
            next_free: true,
            token: None,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// Why the API could not start.
#[derive(Debug, ThisError)]
pub enum ApiStartError {
    /// No port could be bound.
    #[error("cannot listen for the HTTP API on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Bound off loopback without a token.
    #[error(
        "the HTTP API on {0} is reachable from other machines: give it a token (--api-token-file)"
    )]
    NeedsToken(SocketAddr),
}

/// Binds the API's listener as `config` says.
pub(crate) async fn bind(config: &ApiConfig) -> Result<TcpListener, ApiStartError> {
    if !config.addr.ip().is_loopback() && config.token.is_none() {
        return Err(ApiStartError::NeedsToken(config.addr));
    }
    let tries = if config.next_free && config.addr.port() != 0 {
        PORTS_TRIED
    } else {
        1
    };
    let mut last = None;
    for i in 0..tries {
        let mut addr = config.addr;
        addr.set_port(config.addr.port().saturating_add(i));
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(ApiStartError::Bind {
        addr: config.addr,
        source: last.expect("at least one try"),
    })
}

/// What every handler gets.
#[derive(Clone)]
struct Api {
    node: Node,
    tasks: Tasks,
    token: Option<Arc<str>>,
    permits: Arc<Semaphore>,
    /// How long an upload's body may stall.
    idle: std::time::Duration,
    /// Every daemon `mr/daemons` has listed, as last seen (those gone are shown down).
    seen: Arc<std::sync::Mutex<std::collections::BTreeMap<libp2p::PeerId, serde_json::Value>>>,
}

/// Serves the API on `listener` until the daemon stops: each connection in a task of the
/// daemon's (so stopping the daemon closes them), at most [`MAX_CONNECTIONS`] at once, each
/// given `config.header_timeout` to send a request's headers.
pub(crate) async fn serve(listener: TcpListener, node: Node, config: ApiConfig, tasks: Tasks) {
    let api = Api {
        node,
        tasks: tasks.clone(),
        token: config.token.map(Arc::from),
        permits: Arc::new(Semaphore::new(MAX_REQUESTS)),
        idle: config.header_timeout,
        seen: Arc::default(),
    };
    let app = router(api);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::debug!("cannot accept an HTTP connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!("closing an HTTP connection from {peer}: too many open");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let timeout = config.header_timeout;
        tasks.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("HTTP connection from {peer}: {e}");
            }
            drop(permit);
        });
    }
}

fn router(api: Api) -> Router {
    Router::new()
        .nest(
            "/api/v0",
            rpc::routes().merge(upload::routes()).merge(jobs::routes()),
        )
        .merge(gateway::routes())
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(api.clone(), admit))
        .with_state(api)
}

impl Api {
    /// The block `cid`, from this daemon or the ones it knows.
    async fn block(&self, cid: Cid) -> Result<p2pmr_protocol::Block, ApiError> {
        let block = self.node.fetcher().fetch(cid).await;
        Ok(block.map_err(Error::from)?)
    }
}

/// Checks the token, if there is one, and holds one of the request permits for the request.
async fn admit(State(api): State<Api>, request: Request, next: Next) -> Response {
    let public = request.method() == axum::http::Method::GET
        && dashboard::PUBLIC.contains(&request.uri().path());
    if let Some(token) = api.token.as_ref().filter(|_| !public) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
                .into_response();
        }
    }
    let turn = tokio::time::timeout(QUEUE_WAIT, api.permits.clone().acquire_owned()).await;
    let Ok(Ok(permit)) = turn else {
        let mut busy = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many requests at once")
            .into_response();
        busy.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return busy;
    };
    let response = next.run(request).await;
    // A streamed body outlives the handler; the permit goes with the handler (the body's
    // producer is bounded by its pipe and ends when the client goes).
    drop(permit);
    response
}

/// An error answer in kubo's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"Message": self.message, "Code": 0, "Type": "error"});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Blocks(
                RemoteError::Unavailable { .. }
                | RemoteError::NoDaemons { .. }
                | RemoteError::NotOnIpfs {
                    ipfs: BitswapError::NotFound { .. } | BitswapError::NoSources { .. },
                    ..
                },
            )
            | Error::Store(StoreError::NotFound(_))
            | Error::File(FileError::Store(StoreError::NotFound(_))) => StatusCode::NOT_FOUND,
            Error::Blocks(RemoteError::File(FileError::Format(_))) | Error::Car(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::Jobs(ClientError::Refused(reason)) if reason.starts_with("no job") => {
                StatusCode::NOT_FOUND
            }
            Error::Blocks(RemoteError::NotOnIpfs {
                ipfs: BitswapError::TimedOut { .. },
                ..
            }) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, crate::error::Chain(&e).to_string())
    }
}

/// The query's parameters (kubo passes the object as `arg`).
type Params = HashMap<String, String>;

/// The CID in `arg`.
fn cid_arg(params: &Params) -> Result<Cid, ApiError> {
    let arg = params
        .get("arg")
        .ok_or_else(|| ApiError::bad_request("argument \"arg\" is required"))?;
    parse_cid(arg)
}

fn parse_cid(s: &str) -> Result<Cid, ApiError> {
    let s = s.trim().trim_start_matches("/ipfs/");
    Cid::try_from(s).map_err(|e| ApiError::bad_request(format!("'{s}' is not a CID ({e})")))
}

/// An optional number parameter.
fn number(params: &Params, name: &str) -> Result<Option<u64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{name} must be a whole number")))
        })
        .transpose()
}

/// A streamed body of `bytes` of a file from `offset`, at most `length` bytes.
fn file_body(api: &Api, root: Cid, offset: u64, length: Option<u64>) -> Body {
    use crate::blocks::Chunk;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let fetcher = api.node.fetcher().clone();
    let producer = api
        .tasks
        .spawn(async move { fetcher.stream(root, offset, tx).await });
    let state = (rx, Some(producer), length.unwrap_or(u64::MAX));
    let stream = futures::stream::unfold(state, |(mut rx, producer, left)| async move {
        if left == 0 {
            return None;
        }
        match rx.recv().await {
            Some(chunk) => {
                let mut bytes = chunk.bytes;
                bytes.truncate(usize::try_from(left).unwrap_or(usize::MAX));
                let left = left - bytes.len() as u64;
                Some((Ok(Bytes::from(bytes)), (rx, producer, left)))
            }
            None => {
                // The file ended or its reading failed: a failure aborts the response, so the
                // client sees a cut-off transfer, never a short file passed off as whole.
                let outcome = match producer?.await {
                    Ok(Some(Ok(_))) => return None,
                    Ok(Some(Err(e))) => crate::error::Chain(&e).to_string(),
                    Ok(None) => "the daemon is stopping".to_string(),
                    Err(e) => e.to_string(),
                };
                let error = std::io::Error::other(outcome);
                Some((Err(error), (rx, None, 0)))
            }
        }
    });
    Body::from_stream(stream)
}

/// A streamed CARv1 of the DAG at `root`, through a bounded pipe; a failed export aborts the
/// response rather than ending it early.
fn car_body(api: &Api, root: Cid) -> Body {
    let node = api.node.clone();
    piped(api, move |mut pipe| async move {
        node.blocks().export_car(root, &mut pipe).await.map(drop)
    })
}

/// A streamed CARv1 of the blocks that prove bytes `first..=last` of the file at `root`.
fn car_range_body(api: &Api, root: Cid, first: u64, last: u64) -> Body {
    let node = api.node.clone();
    piped(api, move |mut pipe| async move {
        node.blocks()
            .export_car_range(root, first, last, &mut pipe)
            .await
            .map(drop)
    })
}

/// The file or directory at `root` as a streamed tar, named by the CID.
fn tar_body(api: &Api, root: Cid) -> Body {
    let node = api.node.clone();
    piped(api, move |mut pipe| async move {
        let name = root.to_string();
        node.blocks()
            .export_tar(root, &name, &mut pipe)
            .await
            .map(drop)
    })
}

/// A body written by `produce` through a bounded pipe; a producer that fails aborts the
/// response rather than ending it early.
fn piped<F, Fut>(api: &Api, produce: F) -> Body
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    use futures::StreamExt;
    let (writer, reader) = tokio::io::duplex(256 << 10);
    let producer = api.tasks.spawn(produce(writer));
    let bytes = tokio_util::io::ReaderStream::new(reader);
    let state = (bytes, Some(producer));
    let stream = futures::stream::unfold(state, |(mut bytes, producer)| async move {
        if let Some(next) = bytes.next().await {
            return Some((next, (bytes, producer)));
        }
        let outcome = match producer?.await {
            Ok(Some(Ok(()))) => return None,
            Ok(Some(Err(e))) => crate::error::Chain(&e).to_string(),
            Ok(None) => "the daemon is stopping".to_string(),
            Err(e) => e.to_string(),
        };
        Some((Err(std::io::Error::other(outcome)), (bytes, None)))
    });
    Body::from_stream(stream)
}

fn content_type(headers: &mut HeaderMap, value: &'static str) {
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(value),
    );
}
