//! p2pmr's jobs API under `/api/v0/mr/`: run a job from a JSON spec, publish a module, list
//! jobs, read one, follow its events live (Server-Sent Events or NDJSON, by `Accept`; from the
//! first event, following the job to another coordinator if its own is lost), cancel one.

use super::{cid_arg, Api, ApiError, Params};
use crate::engine::events::{event_json, summary_json};
use crate::engine::shipped;
use crate::engine::worker::MAX_MODULE_SIZE;
use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use libp2p::PeerId;
use p2pmr_protocol::job::{JobInput, JobSpec, TaskLimits, AUTO_SPLIT, MAX_VERIFY};
use p2pmr_protocol::Cid;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/mr/run", post(run))
        .route("/mr/publish", post(publish))
        .route("/mr/jobs", post(jobs))
        .route("/mr/job", post(job))
        // GET too: a browser's EventSource can only GET.
        .route("/mr/events", get(events).post(events))
        .route("/mr/cancel", post(cancel))
        .route("/mr/daemons", get(daemons).post(daemons))
}

/// How long a daemon has to say its status before it is shown down.
const STATUS_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Daemons remembered after they go (shown down) by one API.
const MAX_REMEMBERED: usize = 1024;

/// Every daemon this one knows: its addresses, slots, running tasks and holdings, and whether
/// it is up; daemons seen earlier that are gone or silent now are listed as down.
async fn daemons(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let views = api.node.peers().status(STATUS_LIMIT).await?;
    let mut seen = api.seen.lock().expect("poisoned");
    for view in &views {
        let addrs: Vec<String> = view.info.addrs.iter().map(ToString::to_string).collect();
        let mut entry = seen.get(&view.peer).cloned().unwrap_or_else(|| {
            json!({"ID": view.peer.to_string(), "Slots": 0, "Running": 0, "Blocks": 0, "Bytes": 0,
                   "MemoTasks": 0, "MemoBytes": 0, "Refusals": []})
        });
        entry["Addresses"] = json!(addrs);
        entry["Agent"] = json!(view.info.agent);
        entry["Self"] = json!(view.me);
        match &view.status {
            Ok(status) => {
                entry["Up"] = json!(true);
                entry["Slots"] = json!(status.slots);
                entry["Running"] = json!(status.running);
                entry["Blocks"] = json!(status.blocks);
                entry["Bytes"] = json!(status.bytes);
                entry["MemoTasks"] = json!(status.memo_tasks);
                entry["MemoBytes"] = json!(status.memo_bytes);
                let refusals: Vec<Value> = status
                    .refusals
                    .iter()
                    .map(|r| json!({"Peer": r.peer, "At": r.at_ms, "What": r.what}))
                    .collect();
                entry["Refusals"] = json!(refusals);
                entry.as_object_mut().expect("an object").remove("Error");
            }
            Err(e) => {
                entry["Up"] = json!(false);
                entry["Error"] = json!(e.to_string());
            }
        }
        if seen.len() < MAX_REMEMBERED || seen.contains_key(&view.peer) {
            seen.insert(view.peer, entry);
        }
    }
    let mut all = Vec::with_capacity(seen.len());
    for (peer, entry) in seen.iter_mut() {
        if !views.iter().any(|v| v.peer == *peer) {
            entry["Up"] = json!(false);
            entry["Error"] = json!("not connected");
        }
        all.push(entry.clone());
    }
    Ok(Json(json!({ "Daemons": all })))
}

/// A job as `POST /api/v0/mr/run` takes it (the fields of `p2pmr run`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    /// A shipped job's name or a published module's CID.
    job: String,
    /// Input CIDs, each optionally `NAME=CID`.
    inputs: Vec<String>,
    #[serde(default = "one")]
    reducers: u32,
    #[serde(default)]
    args: BTreeMap<String, String>,
    split_mib: Option<u64>,
    #[serde(default = "default_memory")]
    memory_mib: u64,
    #[serde(default = "default_timeout")]
    timeout_secs: u64,
    #[serde(default)]
    skip_bad_records: u32,
    #[serde(default = "one")]
    verify: u32,
    #[serde(default)]
    no_memo: bool,
    coordinator: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_memory() -> u64 {
    512
}

fn default_timeout() -> u64 {
    60
}

async fn run(State(api): State<Api>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: RunRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("not a job spec: {e}")))?;
    let module = match Cid::try_from(req.job.as_str()) {
        Ok(cid) => cid,
        Err(_) => {
            let wasm = shipped::by_name(&req.job)
                .filter(|_| req.job != "hostile")
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "no job {:?}: give a shipped job's name (wordcount, grep, indexer) or a module's CID",
                        req.job
                    ))
                })?;
            api.node.jobs().publish(wasm.to_vec()).await?
        }
    };
    let inputs = req
        .inputs
        .iter()
        .map(|i| {
            let (name, cid) = i.split_once('=').unwrap_or((i, i));
            let cid = super::parse_cid(cid)?;
            Ok(JobInput {
                name: name.trim().to_owned(),
                cid,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let mib = |n: u64, what: &str| {
        n.checked_mul(1 << 20)
            .ok_or_else(|| ApiError::bad_request(format!("{what} is too large")))
    };
    let split = match req.split_mib {
        Some(0) => return Err(ApiError::bad_request("split_mib must be at least 1")),
        Some(m) => mib(m, "split_mib")?,
        None => AUTO_SPLIT,
    };
    let spec = JobSpec::new(module, inputs, req.reducers, req.args)
        .map_err(|e| ApiError::bad_request(e.to_string()))?
        .with_split_size(split)
        .with_limits(TaskLimits {
            memory: mib(req.memory_mib, "memory_mib")?,
            timeout_ms: req.timeout_secs.saturating_mul(1000),
            ..TaskLimits::default()
        })
        .with_skip_bad_records(req.skip_bad_records);
    if !(1..=MAX_VERIFY).contains(&req.verify) {
        return Err(ApiError::bad_request(format!(
            "verify must be from 1 to {MAX_VERIFY} daemons"
        )));
    }
    let spec = spec.with_verify(req.verify).with_memo(!req.no_memo);
    let coordinator = req
        .coordinator
        .map(|c| c.parse::<PeerId>())
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("coordinator: {e}")))?;
    let job = api.node.jobs().submit(spec, coordinator).await?;
    Ok(Json(json!({
        "Job": job.id().to_string(),
        "Coordinator": job.coordinator().to_string(),
    })))
}

/// A wasm module (multipart, one part) published to every daemon.
async fn publish(
    State(api): State<Api>,
    mut multipart: Multipart,
) -> Result<Json<Value>, ApiError> {
    let mut field = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("bad multipart body: {e}")))?
        .ok_or_else(|| ApiError::bad_request("the body has no module"))?;
    let mut wasm = Vec::new();
    while let Some(bytes) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("the upload broke off: {e}")))?
    {
        if (wasm.len() + bytes.len()) as u64 > MAX_MODULE_SIZE {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a module is at most {MAX_MODULE_SIZE} bytes"),
            ));
        }
        wasm.extend_from_slice(&bytes);
    }
    // Refused here, before it is copied to every daemon.
    if !wasm.starts_with(b"\0asm") {
        return Err(ApiError::bad_request("not a WebAssembly module"));
    }
    let module = api.node.jobs().publish(wasm).await?;
    Ok(Json(json!({ "Module": module.to_string() })))
}

/// Every reachable daemon's jobs.
async fn jobs(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let mut all = Vec::new();
    for (peer, listed) in api.node.jobs().list().await? {
        match listed {
            Ok(jobs) => all.extend(jobs.iter().map(|j| {
                let mut v = summary_json(j);
                v["coordinator"] = json!(peer.to_string());
                v
            })),
            Err(e) => tracing::debug!("{peer} did not list its jobs: {e}"),
        }
    }
    Ok(Json(json!({ "Jobs": all })))
}

/// One job's state, counters and task counts.
async fn job(
    State(api): State<Api>,
    Query(params): Query<Params>,
) -> Result<Json<Value>, ApiError> {
    let id = cid_arg(&params)?;
    for (peer, listed) in api.node.jobs().list().await? {
        if let Some(j) = listed
            .ok()
            .and_then(|l| l.into_iter().find(|j| j.job == id))
        {
            let mut v = summary_json(&j);
            v["coordinator"] = json!(peer.to_string());
            return Ok(Json(v));
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no job {id} is known"),
    ))
}

/// The job's events from the first, live, until the final one: Server-Sent Events when the
/// client accepts `text/event-stream`, else NDJSON.
async fn events(
    State(api): State<Api>,
    Query(params): Query<Params>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    let id = cid_arg(&params)?;
    let coordinator = params
        .get("coordinator")
        .map(|c| c.parse::<PeerId>())
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("coordinator: {e}")))?;
    let job = api.node.jobs().attach(id, coordinator).await?;
    let sse = request
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let frame = move |v: Value| -> Bytes {
        if sse {
            Bytes::from(format!("data: {v}\n\n"))
        } else {
            Bytes::from(format!("{v}\n"))
        }
    };
    let stream = job.stamped_events().map(move |e| {
        Ok::<_, std::convert::Infallible>(frame(match e {
            Ok((at, event)) => {
                let mut v = event_json(&event);
                v["at"] = json!(at);
                v
            }
            Err(e) => json!({"event": "error", "reason": e.to_string()}),
        }))
    });
    let mut headers = HeaderMap::new();
    let kind = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok((headers, Body::from_stream(stream)).into_response())
}

async fn cancel(
    State(api): State<Api>,
    Query(params): Query<Params>,
) -> Result<Json<Value>, ApiError> {
    let id = cid_arg(&params)?;
    api.node.jobs().cancel(id, None).await?;
    Ok(Json(json!({ "Cancelled": id.to_string() })))
}
