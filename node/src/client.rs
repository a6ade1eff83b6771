//! The client side of the job protocol: publish a module, submit a job to a coordinator,
//! follow its events, list and cancel jobs. Used alike by `p2pmr run`/`watch`/`jobs`/`cancel`,
//! `p2pmr demo`, the benchmarks and the tests.
//!
//! A client only hands the job over and then watches: the coordinator owns it, so the job
//! goes on if the client goes away, and `watch` re-attaches from event 0.

use crate::net::{NetClient, NetError};
use crate::remote::{self, RemoteError};
use libp2p::PeerId;
use p2pmr_protocol::engine::{Event, JobRequest, JobResponse, JobSummary};
use p2pmr_protocol::job::JobSpec;
use p2pmr_protocol::wire::rank_peers;
use p2pmr_protocol::Cid;
use std::time::Duration;
use thiserror::Error;

/// Errors of job commands.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No daemon is connected.
    #[error("no daemon found to coordinate the job (start `p2pmr daemon`, or pass --peer)")]
    NoCoordinator,
    /// The named coordinator is not connected.
    #[error("coordinator {0} is not among the connected daemons")]
    UnknownCoordinator(PeerId),
    /// The coordinator refused or failed the request.
    #[error("{0}")]
    Refused(String),
    /// The coordinator answered something unexpected.
    #[error("unexpected answer from the coordinator: {0}")]
    Protocol(String),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Publishing the module failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The coordinator stopped answering.
    #[error("coordinator {0} stopped answering")]
    Silent(PeerId),
}

/// How long a watched coordinator may stay silent before it is taken for dead or stalled
/// (its long poll answers within about 5 s).
pub const WATCH_SILENCE: Duration = Duration::from_secs(15);
/// Most times [`follow`] hands a job to another coordinator.
const MAX_HANDOVERS: u32 = 16;
/// Pause before a handover, so the network notices who left.
const HANDOVER_PAUSE: Duration = Duration::from_secs(1);

/// The coordinator for `job`: `chosen` if given (it must be connected), else the daemon the
/// placement rule ranks first for the job id, so every client picks the same one for the same
/// job (and finds its recorded result).
pub fn coordinator_for(
    net: &NetClient,
    job: &Cid,
    chosen: Option<PeerId>,
) -> Result<PeerId, ClientError> {
    let daemons: Vec<Vec<u8>> = net.daemons().keys().map(|p| p.to_bytes()).collect();
    if let Some(peer) = chosen {
        return if daemons.contains(&peer.to_bytes()) {
            Ok(peer)
        } else {
            Err(ClientError::UnknownCoordinator(peer))
        };
    }
    let first = rank_peers(job, &daemons)
        .first()
        .map(|b| PeerId::from_bytes(b).expect("peer ids from the swarm"))
        .ok_or(ClientError::NoCoordinator)?;
    Ok(first)
}

/// The coordinator of an existing `job`: `chosen` if given, else the connected daemon that
/// lists it, else the one the job id ranks first (which may have it recorded on disk).
pub async fn locate(
    net: &NetClient,
    job: &Cid,
    chosen: Option<PeerId>,
) -> Result<PeerId, ClientError> {
    let first = coordinator_for(net, job, chosen)?;
    if chosen.is_some() {
        return Ok(first);
    }
    for (peer, jobs) in list(net).await {
        if jobs.is_ok_and(|jobs| jobs.iter().any(|j| j.job == *job)) {
            return Ok(peer);
        }
    }
    Ok(first)
}

/// Publishes a wasm module: its blocks go to `replicas` daemons (at most as many as are
/// connected; pass `usize::MAX` for all: every worker needs the module, and a job must not
/// fail because the few daemons holding it are down). Returns its CID.
pub async fn publish_module(
    net: &NetClient,
    wasm: Vec<u8>,
    replicas: usize,
) -> Result<Cid, ClientError> {
    let replicas = replicas.clamp(1, net.daemons().len().max(1));
    let added = remote::add(net, std::io::Cursor::new(wasm), replicas).await?;
    Ok(added.root)
}

/// Hands `spec` to `coordinator`; returns the job id once it is accepted.
pub async fn submit(
    net: &NetClient,
    coordinator: PeerId,
    spec: &JobSpec,
) -> Result<Cid, ClientError> {
    match net
        .job_request(
            coordinator,
            JobRequest::Submit {
                spec: spec.encode(),
            },
        )
        .await?
    {
        JobResponse::Accepted { job } => Ok(job),
        JobResponse::Failed(reason) => Err(ClientError::Refused(reason)),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}

/// Publishes the encoded spec as a block of its own, whose CID is the job id, on `replicas`
/// daemons: with it, anyone who knows only the job id (`p2pmr watch JOBID`) can hand the job
/// to another coordinator if its coordinator dies.
pub async fn publish_spec(
    net: &NetClient,
    spec: &JobSpec,
    replicas: usize,
) -> Result<(), ClientError> {
    let replicas = replicas.clamp(1, net.daemons().len().max(1));
    remote::add(net, std::io::Cursor::new(spec.encode()), replicas).await?;
    Ok(())
}

/// The spec of `job`, fetched from the network (see [`publish_spec`]).
pub async fn fetch_spec(net: &NetClient, job: Cid) -> Result<JobSpec, ClientError> {
    let block = remote::Fetcher::new(Some(net.clone()), None)
        .fetch(job)
        .await?;
    JobSpec::decode(block.data()).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Follows `job` to its end like [`watch`]; when its coordinator dies, stalls or forgets the
/// job, hands the spec (given, else fetched by the job id) to the next daemon the job id
/// ranks and follows it there. The new coordinator reuses the tasks already finished.
pub async fn follow(
    net: &NetClient,
    mut coordinator: PeerId,
    job: Cid,
    mut spec: Option<JobSpec>,
    mut on_event: impl FnMut(&Event),
) -> Result<Event, ClientError> {
    let mut handovers = 0;
    let mut tried: Vec<PeerId> = Vec::new();
    loop {
        let error = match watch(net, coordinator, job, &mut on_event).await {
            Ok(last) => return Ok(last),
            Err(e @ (ClientError::Protocol(_) | ClientError::Remote(_))) => return Err(e),
            Err(e) => e,
        };
        handovers += 1;
        if handovers > MAX_HANDOVERS {
            return Err(error);
        }
        tracing::warn!("lost the coordinator {coordinator} of {job} ({error}); handing it over");
        if spec.is_none() {
            match fetch_spec(net, job).await {
                Ok(s) => spec = Some(s),
                Err(e) => {
                    tracing::debug!("no spec for {job}: {e}");
                    return Err(error);
                }
            }
        }
        let spec = spec.as_ref().expect("set above");
        tried.push(coordinator);
        tokio::time::sleep(HANDOVER_PAUSE).await;
        let daemons: Vec<Vec<u8>> = net
            .daemons()
            .keys()
            .filter(|p| !tried.contains(p))
            .map(|p| p.to_bytes())
            .collect();
        coordinator = match rank_peers(&job, &daemons).first() {
            Some(b) => PeerId::from_bytes(b).expect("peer ids from the swarm"),
            None => {
                // Everyone was tried once: start over (a restarted daemon may be back).
                tried.clear();
                coordinator_for(net, &job, None)?
            }
        };
        // A frozen daemon would hold the submission; the next round tries another.
        match tokio::time::timeout(WATCH_SILENCE, submit(net, coordinator, spec)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("{coordinator} did not take {job}: {e}"),
            Err(_) => tracing::warn!("{coordinator} did not answer the submission of {job}"),
        }
    }
}

/// Follows `job`'s events on `coordinator` from the first, handing each to `on_event`, until
/// the final one, which is returned. A coordinator silent for [`WATCH_SILENCE`] (dead or
/// stalled) is an error.
pub async fn watch(
    net: &NetClient,
    coordinator: PeerId,
    job: Cid,
    mut on_event: impl FnMut(&Event),
) -> Result<Event, ClientError> {
    let mut from = 0;
    let mut busy_pause = Duration::from_millis(50);
    loop {
        let asked = net.job_request(coordinator, JobRequest::Watch { job, from });
        let answer = tokio::time::timeout(WATCH_SILENCE, asked)
            .await
            .map_err(|_| ClientError::Silent(coordinator))??;
        match answer {
            JobResponse::Events { events, next, done } => {
                let mut last = None;
                for e in events {
                    on_event(&e);
                    last = Some(e);
                }
                if done {
                    return last.filter(Event::is_final).ok_or_else(|| {
                        ClientError::Protocol("ended without a final event".into())
                    });
                }
                from = next;
            }
            JobResponse::Failed(reason) if reason == p2pmr_protocol::wire::BUSY => {
                tokio::time::sleep(busy_pause).await;
                busy_pause = (busy_pause * 2).min(Duration::from_secs(2));
            }
            JobResponse::Failed(reason) => return Err(ClientError::Refused(reason)),
            other => return Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

/// The jobs every connected daemon coordinates.
pub async fn list(net: &NetClient) -> Vec<(PeerId, Result<Vec<JobSummary>, ClientError>)> {
    let mut out = Vec::new();
    for peer in net.daemons().into_keys() {
        let r = match net.job_request(peer, JobRequest::List).await {
            Ok(JobResponse::Jobs(jobs)) => Ok(jobs),
            Ok(JobResponse::Failed(reason)) => Err(ClientError::Refused(reason)),
            Ok(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            Err(e) => Err(e.into()),
        };
        out.push((peer, r));
    }
    out
}

/// Cancels `job` on its coordinator.
pub async fn cancel(net: &NetClient, coordinator: PeerId, job: Cid) -> Result<(), ClientError> {
    match net
        .job_request(coordinator, JobRequest::Cancel { job })
        .await?
    {
        JobResponse::Ok => Ok(()),
        JobResponse::Failed(reason) => Err(ClientError::Refused(reason)),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}
