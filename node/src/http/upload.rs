//! Uploads in kubo's multipart form: `add`, `block/put` and `dag/import`. The first file part
//! streams into the node through a bounded pipe (never held whole); nothing is kept unless the
//! whole upload arrives and checks out, so a client that disconnects half way, or sends a
//! corrupt CAR, leaves no blocks behind. Stored in the daemon's repository, as kubo does, or on
//! `replicas=N` daemons.

use super::{number, Api, ApiError, Params};
use crate::node::Replicas;
use axum::body::Bytes;
use axum::extract::multipart::Field;
use axum::extract::{DefaultBodyLimit, Multipart, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use p2pmr_protocol::chunker::Chunker;
use p2pmr_protocol::unixfs::Layout;
use p2pmr_protocol::{Block, MAX_BLOCK_SIZE};
use serde_json::json;
use std::io::{self, Read};
use tokio::sync::mpsc;

/// Chunks of an upload in flight between the HTTP connection and the node.
const PIPE: usize = 8;
/// Least an upload must send in each idle window (the API's header timeout) to keep its
/// request slot: a client trickling a byte at a time would otherwise hold it for ever. At the
/// default window this is 1.6 KB/s, far below any real link.
const MIN_BYTES_PER_WINDOW: u64 = 16 << 10;

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/add", post(add))
        .route("/block/put", post(block_put))
        .route("/dag/import", post(dag_import))
        // Bodies stream through a bounded pipe, so no limit on their total size is needed.
        .layer(DefaultBodyLimit::disable())
}

/// Where an upload goes: `replicas=N` daemons, else this daemon's repository.
fn replicas(params: &Params) -> Result<Replicas, ApiError> {
    Ok(match number(params, "replicas")? {
        Some(0) => return Err(ApiError::bad_request("replicas must be at least 1")),
        Some(n) => Replicas::network(usize::try_from(n).unwrap_or(usize::MAX)),
        None => Replicas::Local,
    })
}

fn flag(params: &Params, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| v == "true" || v.is_empty())
}

/// The upload's first part.
async fn first_part(multipart: &mut Multipart) -> Result<Field<'_>, ApiError> {
    multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("bad multipart body: {e}")))?
        .ok_or_else(|| ApiError::bad_request("the body has no file part"))
}

/// Streams `field` into `work`'s reader on a blocking thread; the reader fails if the upload
/// breaks off, so `work` never takes a cut-off upload for a whole one.
async fn stream_into<T: Send + 'static>(
    api: &Api,
    mut field: Field<'_>,
    work: impl FnOnce(Pipe) -> futures::future::BoxFuture<'static, Result<T, crate::Error>>,
) -> Result<T, ApiError> {
    let (tx, rx) = mpsc::channel(PIPE);
    let task = api.tasks.spawn(work(Pipe::new(rx)));
    let mut broken = None;
    let (mut window_start, mut window_bytes) = (tokio::time::Instant::now(), 0u64);
    let idle = api.idle.as_secs_f64();
    let too_slow = |what: String| ApiError::new(StatusCode::REQUEST_TIMEOUT, what);
    loop {
        if window_start.elapsed() >= api.idle {
            if window_bytes < MIN_BYTES_PER_WINDOW {
                let _ = tx.send(Err(io::Error::other("the upload trickled"))).await;
                let what = format!("the upload sent only {window_bytes} bytes in {idle:.1} s");
                broken = Some(too_slow(what));
                break;
            }
            (window_start, window_bytes) = (tokio::time::Instant::now(), 0);
        }
        let Ok(next) = tokio::time::timeout(api.idle, field.chunk()).await else {
            let _ = tx.send(Err(io::Error::other("the upload stalled"))).await;
            broken = Some(too_slow(format!("the upload sent nothing for {idle:.1} s")));
            break;
        };
        match next {
            Ok(Some(bytes)) => {
                window_bytes += bytes.len() as u64;
                if tx.send(Ok(bytes)).await.is_err() {
                    break; // the node stopped reading: its error says why
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                broken = Some(ApiError::bad_request(format!("the upload broke off: {e}")));
                break;
            }
        }
    }
    drop(tx);
    let done = task
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"))?;
    if let Some(broken) = broken {
        return Err(broken);
    }
    Ok(done?)
}

/// kubo's `add`: one file, CIDv1 with raw leaves (kubo's `--cid-version=1`); answers an NDJSON
/// line `{"Name","Hash","Size"}`.
async fn add(
    State(api): State<Api>,
    Query(params): Query<Params>,
    mut multipart: Multipart,
) -> Result<Response, ApiError> {
    if params.get("cid-version").is_some_and(|v| v != "1") {
        return Err(ApiError::bad_request(
            "only cid-version=1 is served (CIDv1, raw leaves)",
        ));
    }
    if params.get("raw-leaves").is_some_and(|v| v == "false") {
        return Err(ApiError::bad_request("only raw leaves are served"));
    }
    let chunker = match params.get("chunker") {
        Some(c) => c
            .parse::<Chunker>()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => Chunker::DEFAULT,
    };
    let layout = Layout::KUBO.with_chunker(chunker);
    let replicas = if flag(&params, "only-hash") {
        Replicas::OnlyHash
    } else {
        replicas(&params)?
    };
    let field = first_part(&mut multipart).await?;
    let name = field.file_name().unwrap_or_default().to_owned();
    let node = api.node.clone();
    let added = stream_into(&api, field, move |pipe| {
        Box::pin(async move { node.blocks().add_whole_as(pipe, replicas, layout).await })
    })
    .await?;
    let hash = added.root.to_string();
    let line = json!({
        "Name": if name.is_empty() { hash.clone() } else { name },
        "Hash": hash,
        "Size": added.size.to_string(),
    });
    Ok(ndjson(vec![line]))
}

/// kubo's `block/put`: one block of at most 2 MiB, `cid-codec=raw` (the default) or `dag-pb`,
/// sha2-256; answers `{"Key","Size"}`.
async fn block_put(
    State(api): State<Api>,
    Query(params): Query<Params>,
    mut multipart: Multipart,
) -> Result<Response, ApiError> {
    let dag_pb = match params
        .get("cid-codec")
        .or(params.get("format"))
        .map(String::as_str)
    {
        None | Some("raw") => false,
        Some("dag-pb" | "protobuf") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "cid-codec {other:?} is not served (raw, dag-pb)"
            )))
        }
    };
    if params.get("mhtype").is_some_and(|h| h != "sha2-256") {
        return Err(ApiError::bad_request("only the sha2-256 hash is served"));
    }
    let mut field = first_part(&mut multipart).await?;
    let mut data = Vec::new();
    while let Some(bytes) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("the upload broke off: {e}")))?
    {
        if data.len() + bytes.len() > MAX_BLOCK_SIZE {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a block is at most {MAX_BLOCK_SIZE} bytes"),
            ));
        }
        data.extend_from_slice(&bytes);
    }
    let block = if dag_pb {
        Block::dag_pb(data)
    } else {
        Block::raw(data)
    };
    let (cid, size) = (*block.cid(), block.len());
    let replicas = replicas(&params)?;
    api.node.blocks().put_block(block, replicas).await?;
    Ok(axum::Json(json!({ "Key": cid.to_string(), "Size": size })).into_response())
}

/// kubo's `dag/import`: a CAR (v1 or v2); answers an NDJSON line per root.
async fn dag_import(
    State(api): State<Api>,
    Query(params): Query<Params>,
    mut multipart: Multipart,
) -> Result<Response, ApiError> {
    let replicas = replicas(&params)?;
    let field = first_part(&mut multipart).await?;
    let node = api.node.clone();
    let roots = stream_into(&api, field, move |pipe| {
        Box::pin(async move { node.blocks().import_car(pipe, replicas).await })
    })
    .await?;
    let lines = roots
        .iter()
        .map(|root| json!({"Root": {"Cid": {"/": root.to_string()}, "PinErrorMsg": ""}}))
        .collect();
    Ok(ndjson(lines))
}

fn ndjson(lines: Vec<serde_json::Value>) -> Response {
    let mut body = String::new();
    for line in lines {
        body.push_str(&line.to_string());
        body.push('\n');
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-chunked-output", HeaderValue::from_static("1"));
    (headers, body).into_response()
}

/// The reading end of an upload: a blocking `Read` over the chunks the connection delivers.
pub(crate) struct Pipe {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Pipe {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
