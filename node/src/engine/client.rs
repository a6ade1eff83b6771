//! The client side of the job protocol: publish a module, submit a job to a coordinator,
//! follow its events, list and cancel jobs. Used alike by `p2pmr run`/`watch`/`jobs`/`cancel`,
//! `p2pmr demo`, the benchmarks and the tests.
//!
//! A client only hands the job over and then watches: the coordinator owns it, so the job
//! goes on if the client goes away, and `watch` re-attaches from event 0.

use crate::blocks::{self, RemoteError};
use crate::net::{NetClient, NetError};
use libp2p::PeerId;
use p2pmr_protocol::engine::{DaemonStatus, Event, JobRequest, JobResponse, JobSummary};
use p2pmr_protocol::job::JobSpec;
use p2pmr_protocol::unixfs::Layout;
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

/// `peer`'s slots, running tasks and holdings, asked with `limit` to answer.
pub(crate) async fn status(
    net: &NetClient,
    peer: PeerId,
    limit: Duration,
) -> Result<DaemonStatus, crate::Error> {
    match tokio::time::timeout(limit, net.job_request(peer, JobRequest::Status)).await {
        Ok(Ok(JobResponse::Status(status))) => Ok(status),
        Ok(Ok(JobResponse::Failed(reason))) => Err(ClientError::Refused(reason).into()),
        Ok(Ok(other)) => Err(ClientError::Protocol(format!("{other:?}")).into()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(crate::Error::TimedOut("a daemon's status")),
    }
}

/// The coordinator for `job`: `chosen` if given (it must be connected), else the daemon the
/// placement rule ranks first for the job id, so every client picks the same one for the same
/// job (and finds its recorded result).
pub fn coordinator_for(
    net: &NetClient,
    job: &Cid,
    chosen: Option<PeerId>,
) -> Result<PeerId, ClientError> {
    let daemons: Vec<Vec<u8>> = net.job_peers().iter().map(|p| p.to_bytes()).collect();
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
    let added = blocks::add(net, std::io::Cursor::new(wasm), replicas, Layout::KUBO).await?;
    Ok(added.root)
}

/// Hands `spec` to `coordinator`; returns the job id once it is accepted.
pub async fn submit(
    net: &NetClient,
    coordinator: PeerId,
    spec: &JobSpec,
) -> Result<Cid, ClientError> {
    let answer = net
        .job_request(
            coordinator,
            JobRequest::Submit {
                spec: spec.encode(),
            },
        )
        .await?;
    accepted(answer)
}

/// The id in a coordinator's `Accepted`, or why it did not accept.
fn accepted(answer: JobResponse) -> Result<Cid, ClientError> {
    match answer {
        JobResponse::Accepted { job } => Ok(job),
        JobResponse::Failed(reason) => Err(ClientError::Refused(reason)),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}

/// Asks `daemon` to pin `root` on `replicas` daemons; returns the id its progress is watched
/// by.
pub async fn pin(
    net: &NetClient,
    daemon: PeerId,
    root: Cid,
    replicas: u32,
) -> Result<Cid, ClientError> {
    accepted(
        net.job_request(daemon, JobRequest::Pin { root, replicas })
            .await?,
    )
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
    blocks::add(
        net,
        std::io::Cursor::new(spec.encode()),
        replicas,
        Layout::KUBO,
    )
    .await?;
    Ok(())
}

/// The spec of `job`, fetched from the network (see [`publish_spec`]).
pub async fn fetch_spec(net: &NetClient, job: Cid) -> Result<JobSpec, ClientError> {
    let block = blocks::Fetcher::new(Some(net.clone()), None)
        .fetch(job)
        .await?;
    JobSpec::decode(block.data()).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Follows `job` to its end, handing each event to `on_event`, and returns the final one.
/// When its coordinator dies, stalls or forgets the job, the spec (given, else fetched by
/// the job id) goes to the next daemon the job id ranks, which reuses the tasks already
/// finished; see [`Follower`].
pub async fn follow(
    net: &NetClient,
    coordinator: PeerId,
    job: Cid,
    spec: Option<JobSpec>,
    mut on_event: impl FnMut(&Event),
) -> Result<Event, ClientError> {
    let mut follower = Follower::new(net.clone(), coordinator, job, spec);
    while let Some(events) = follower.next_batch().await? {
        for e in &events {
            on_event(e);
        }
        if let Some(last) = events.into_iter().last().filter(|_| follower.is_done()) {
            return Ok(last);
        }
    }
    Err(ClientError::Protocol("ended without a final event".into()))
}

/// A job's events, pulled in batches from its coordinator's log (long polls), from the first
/// to the final one, following the job to another coordinator when its own is lost.
#[derive(Debug)]
pub struct Follower {
    net: NetClient,
    coordinator: PeerId,
    job: Cid,
    spec: Option<JobSpec>,
    /// The next event index to ask the coordinator for.
    from: u64,
    busy_pause: Duration,
    handovers: u32,
    tried: Vec<PeerId>,
    done: bool,
}

impl Follower {
    /// Follows `job` on `coordinator`, from its first event.
    pub fn new(net: NetClient, coordinator: PeerId, job: Cid, spec: Option<JobSpec>) -> Self {
        Self {
            net,
            coordinator,
            job,
            spec,
            from: 0,
            busy_pause: Duration::from_millis(50),
            handovers: 0,
            tried: Vec::new(),
            done: false,
        }
    }

    /// The coordinator followed now.
    pub fn coordinator(&self) -> PeerId {
        self.coordinator
    }

    /// Whether the final event has been delivered.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next events (never an empty batch), or `None` after the final one. A new
    /// coordinator's log starts over from its own first event.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Event>>, ClientError> {
        let batch = self.next_stamped().await?;
        Ok(batch.map(|b| b.into_iter().map(|(_, e)| e).collect()))
    }

    /// As [`Follower::next_batch`], each event with the time its coordinator recorded it
    /// (Unix milliseconds, by the coordinator's clock).
    pub async fn next_stamped(&mut self) -> Result<Option<Vec<(u64, Event)>>, ClientError> {
        while !self.done {
            let error = match self.poll().await {
                Ok(Some(events)) => return Ok(Some(events)),
                Ok(None) => continue,
                Err(e @ (ClientError::Protocol(_) | ClientError::Remote(_))) => return Err(e),
                Err(e) => e,
            };
            self.hand_over(error).await?;
        }
        Ok(None)
    }

    /// One long poll: events, or `None` when the coordinator was busy.
    async fn poll(&mut self) -> Result<Option<Vec<(u64, Event)>>, ClientError> {
        let (coordinator, job, from) = (self.coordinator, self.job, self.from);
        let asked = self
            .net
            .job_request(coordinator, JobRequest::Watch { job, from });
        let answer = tokio::time::timeout(WATCH_SILENCE, asked)
            .await
            .map_err(|_| ClientError::Silent(coordinator))??;
        match answer {
            JobResponse::Events {
                events,
                times,
                next,
                done,
            } => {
                if done && !events.last().is_some_and(Event::is_final) {
                    return Err(ClientError::Protocol("ended without a final event".into()));
                }
                self.done = done;
                self.from = next;
                self.busy_pause = Duration::from_millis(50);
                let stamped: Vec<(u64, Event)> = times.into_iter().zip(events).collect();
                Ok((!stamped.is_empty()).then_some(stamped))
            }
            busy if busy.is_busy() => {
                tokio::time::sleep(self.busy_pause).await;
                self.busy_pause = (self.busy_pause * 2).min(Duration::from_secs(2));
                Ok(None)
            }
            JobResponse::Failed(reason) => Err(ClientError::Refused(reason)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Hands the job to the next daemon the job id ranks, after `error` lost the current one.
    async fn hand_over(&mut self, error: ClientError) -> Result<(), ClientError> {
        let (net, job) = (&self.net, self.job);
        self.handovers += 1;
        if self.handovers > MAX_HANDOVERS {
            return Err(error);
        }
        tracing::warn!(
            "lost the coordinator {} of {job} ({error}); handing it over",
            self.coordinator
        );
        if self.spec.is_none() {
            match fetch_spec(net, job).await {
                Ok(s) => self.spec = Some(s),
                Err(e) => {
                    tracing::debug!("no spec for {job}: {e}");
                    return Err(error);
                }
            }
        }
        let spec = self.spec.as_ref().expect("set above");
        self.tried.push(self.coordinator);
        tokio::time::sleep(HANDOVER_PAUSE).await;
        let daemons: Vec<Vec<u8>> = net
            .job_peers()
            .iter()
            .filter(|p| !self.tried.contains(p))
            .map(|p| p.to_bytes())
            .collect();
        let next = match rank_peers(&job, &daemons).first() {
            Some(b) => PeerId::from_bytes(b).expect("peer ids from the swarm"),
            None => {
                // Everyone was tried once: start over (a restarted daemon may be back).
                self.tried.clear();
                coordinator_for(net, &job, None)?
            }
        };
        // A frozen daemon would hold the submission; the next round tries another.
        match tokio::time::timeout(WATCH_SILENCE, submit(net, next, spec)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("{next} did not take {job}: {e}"),
            Err(_) => tracing::warn!("{next} did not answer the submission of {job}"),
        }
        self.coordinator = next;
        self.from = 0;
        Ok(())
    }
}

/// The jobs every connected daemon coordinates.
pub async fn list(net: &NetClient) -> Vec<(PeerId, Result<Vec<JobSummary>, ClientError>)> {
    let mut out = Vec::new();
    for peer in net.job_peers() {
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
