//! kubo's RPC subset under `/api/v0`: every call is a `POST` with its object in `arg`, and
//! answers in kubo's field names, so `kubo-rpc-client` and scripts written for kubo work.

use super::{car_body, cid_arg, content_type, file_body, number, Api, ApiError, Params};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use p2pmr_protocol::unixfs::FileReader;
use serde_json::{json, Value};

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/id", post(id))
        .route("/version", post(version))
        .route("/swarm/peers", post(swarm_peers))
        .route("/repo/stat", post(repo_stat))
        .route("/cat", post(cat))
        .route("/block/get", post(block_get))
        .route("/block/stat", post(block_stat))
        .route("/dag/export", post(dag_export))
        .route("/get", post(get))
        .route("/pin/add", post(pin_add))
}

/// Most copies `pin/add` may ask for.
const MAX_PIN_REPLICAS: u64 = 64;

/// `pin/add?arg=CID[&replicas=N]`: fetches the DAG from wherever it is (daemons, or IPFS
/// nodes over Bitswap) and keeps it on N daemons, this one first (by default only this one,
/// as kubo pins on its own node); answers `{"Pins": [CID]}` once every block is stored.
async fn pin_add(
    State(api): State<Api>,
    Query(params): Query<Params>,
) -> Result<Json<Value>, ApiError> {
    let root = cid_arg(&params)?;
    let replicas = number(&params, "replicas")?.unwrap_or(1);
    if !(1..=MAX_PIN_REPLICAS).contains(&replicas) {
        return Err(ApiError::bad_request(format!(
            "replicas must be from 1 to {MAX_PIN_REPLICAS}"
        )));
    }
    let (me, _) = api.node.identity().await?;
    let pin = api
        .node
        .blocks()
        .pin(root, replicas as u32, Some(me))
        .await?;
    pin.wait(|_| {}).await?;
    Ok(Json(json!({ "Pins": [root.to_string()] })))
}

async fn id(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let (peer, addrs) = api.node.identity().await?;
    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    Ok(Json(json!({
        "ID": peer.to_string(),
        "PublicKey": public_key(&peer),
        "Addresses": addrs,
        "AgentVersion": agent(),
        "Protocols": [
            p2pmr_protocol::wire::BLOCK_PROTOCOL,
            p2pmr_protocol::engine::JOB_PROTOCOL,
        ],
    })))
}

async fn version() -> Json<Value> {
    Json(json!({
        "Version": env!("CARGO_PKG_VERSION"),
        "Commit": "",
        "Repo": "p2pmr",
        "System": format!("{}/{}", std::env::consts::ARCH, std::env::consts::OS),
        "Golang": "",
    }))
}

async fn swarm_peers(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let daemons = api.node.peers().wait_for(0).await?;
    let peers: Vec<Value> = daemons
        .iter()
        .map(|(peer, info)| {
            json!({
                "Addr": info.addrs.first().map(ToString::to_string).unwrap_or_default(),
                "Peer": peer.to_string(),
                "Latency": "",
                "Muxer": "",
                "Direction": 0,
                "Streams": null,
            })
        })
        .collect();
    Ok(Json(json!({ "Peers": peers })))
}

async fn repo_stat(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let repo = api.node.repo().ok_or(crate::Error::NoRepo)?.clone();
    let stats = tokio::task::spawn_blocking({
        let repo = repo.clone();
        move || repo.blocks().stats()
    })
    .await
    .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(crate::Error::from)?;
    Ok(Json(json!({
        "RepoSize": stats.bytes,
        "StorageMax": 0,
        "NumObjects": stats.blocks,
        "RepoPath": repo.home().display().to_string(),
        "Version": "p2pmr-repo",
    })))
}

/// `cat?arg=CID[&offset=N][&length=N]`: the file's bytes, streamed.
async fn cat(State(api): State<Api>, Query(params): Query<Params>) -> Result<Response, ApiError> {
    let root = cid_arg(&params)?;
    let offset = number(&params, "offset")?.unwrap_or(0);
    let length = number(&params, "length")?;
    // The root decides the answer: unknown (404), not a file (422), or the bytes.
    let block = api.block(root).await?;
    let mut reader = FileReader::new(root);
    reader
        .feed(&block)
        .map_err(|e| ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let mut headers = HeaderMap::new();
    content_type(&mut headers, "application/octet-stream");
    Ok((headers, file_body(&api, root, offset, length)).into_response())
}

/// `block/get?arg=CID`: one block's bytes.
async fn block_get(
    State(api): State<Api>,
    Query(params): Query<Params>,
) -> Result<Response, ApiError> {
    let cid = cid_arg(&params)?;
    let block = api.block(cid).await?;
    let mut headers = HeaderMap::new();
    content_type(&mut headers, "application/octet-stream");
    Ok((headers, block.into_data()).into_response())
}

/// `block/stat?arg=CID`: `{"Key", "Size"}`.
async fn block_stat(
    State(api): State<Api>,
    Query(params): Query<Params>,
) -> Result<Json<Value>, ApiError> {
    let cid = cid_arg(&params)?;
    let block = api.block(cid).await?;
    Ok(Json(json!({ "Key": cid.to_string(), "Size": block.len() })))
}

/// `dag/export?arg=CID`: the DAG as a CARv1 stream.
async fn dag_export(
    State(api): State<Api>,
    Query(params): Query<Params>,
) -> Result<Response, ApiError> {
    let root = cid_arg(&params)?;
    // An unknown root is a 404 before anything is streamed.
    api.block(root).await?;
    let mut headers = HeaderMap::new();
    content_type(&mut headers, "application/vnd.ipld.car");
    headers.insert(
        header::CONTENT_DISPOSITION,
        header::HeaderValue::from_str(&format!("attachment; filename=\"{root}.car\""))
            .expect("a CID is a valid header value"),
    );
    Ok((headers, car_body(&api, root)).into_response())
}

/// `get?arg=CID`: the file or directory as a tar stream, named by the CID (as kubo's).
async fn get(State(api): State<Api>, Query(params): Query<Params>) -> Result<Response, ApiError> {
    let root = cid_arg(&params)?;
    api.block(root).await?;
    let mut headers = HeaderMap::new();
    content_type(&mut headers, "application/x-tar");
    Ok((headers, super::tar_body(&api, root)).into_response())
}

fn agent() -> String {
    format!("p2pmr/{}", env!("CARGO_PKG_VERSION"))
}

/// The peer's public key as kubo prints it (base64 of its protobuf encoding), when the peer id
/// holds it inline (ed25519 ids do).
fn public_key(peer: &libp2p::PeerId) -> String {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return String::new();
    }
    match libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()) {
        Ok(key) => base64(&key.encode_protobuf()),
        Err(_) => String::new(),
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(input.as_bytes()), want);
        }
    }
}
