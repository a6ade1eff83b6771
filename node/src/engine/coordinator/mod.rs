//! The coordinator half of a daemon: accepts jobs from clients, plans them, schedules their
//! tasks on the daemons (data locality first), gathers the output and tells watchers.
//!
//! A job goes: check the module compiles; walk each input's DAG for its leaves (inner nodes
//! only); ask every daemon which leaves it holds (`Has`) and how many task slots it has; cut
//! the inputs into map tasks of about the spec's split size (by default
//! [`auto_split`](p2pmr_protocol::job::auto_split): one task per slot) on leaf edges; run the
//! map phase;
//! run one reduce task per partition, each fed the partition's run from every map task;
//! write the output directory (`part-00000`, ...) and replicate it. Each step appends
//! [`Event`]s to the job's log; watchers long-poll the log (`Watch`), so a slow watcher only
//! ever delays itself.
//!
//! Scheduling is round-robin over daemons with free slots; for map tasks each daemon takes the
//! pending task of which it holds the most bytes, and a daemon holding none of the remaining
//! tasks waits [`LOCALITY_DELAY`] before taking one anyway (delay scheduling). Finished jobs
//! are recorded in `<home>/jobs/<job id>`, so the same spec over the same inputs is answered
//! with the existing output at once.

use crate::blocks::{self, Fetched, Fetcher, RemoteError};
use crate::engine::client;
use crate::engine::worker::Worker;
use crate::error::Chain;
use crate::net::NetClient;
use crate::tasks::Tasks;
use crate::{Node, Replicas};
use libp2p::PeerId;
use p2pmr_protocol::block::RAW;
use p2pmr_protocol::dagpb::PbNode;
use p2pmr_protocol::engine::{
    Counters, Event, FinishedTask, JobRequest, JobResponse, JobState, JobSummary, MapOutput,
    MapTask, MemoHit, Phase, ReduceTask, RunRef, TaskKind, MAX_EVENTS_PER_REPLY, MAX_MEMO_KEYS,
};
use p2pmr_protocol::job::JobSpec;
use p2pmr_protocol::memo::{ReduceKey, Remembered};
use p2pmr_protocol::unixfs::{self, DirEntry, UnixFsData, UnixFsError};
use p2pmr_protocol::{Block, Cid};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

mod plan;
pub(crate) mod schedule;

pub use plan::Leaf;
use plan::{reuse, PlannedMap};
pub use schedule::LOCALITY_DELAY;
use schedule::{Action, AttemptId, PhaseState, Rest, Schedule, Skips, Tally};

/// Default liveness timeout: a worker that does not answer a probe within it is given up on.
pub const DEFAULT_LIVENESS: Duration = Duration::from_secs(3);
/// How long a watch request waits for new events before answering with none.
const WATCH_WAIT: Duration = Duration::from_secs(5);
/// How long the coordinator waits for a worker to confirm it stopped a losing copy.
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the coordinator waits for a worker to answer a request to cut a running map task
/// in two (the worker itself waits a little less for the task to take it).
const CUT_TIMEOUT: Duration = Duration::from_secs(5);
/// Times planning asks again for input blocks no reachable daemon has, and the pause between.
const PLAN_RETRIES: u32 = 3;
const PLAN_RETRY_PAUSE: Duration = Duration::from_secs(2);
/// Copies kept of an input fetched from IPFS nodes (as many as `p2pmr add` makes).
const INPUT_REPLICAS: usize = 2;
/// How often a fetch phase reports its progress.
const FETCH_EVENTS: Duration = Duration::from_millis(250);
/// Jobs a coordinator keeps in memory (finished ones are dropped oldest first).
const MAX_JOBS: usize = 256;
/// Jobs a coordinator runs at once.
const MAX_RUNNING: usize = 16;

/// Runs jobs for clients. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    worker: Worker,
    /// The daemon's own node: pins and fetch phases store what they fetch through it.
    node: Node,
    /// A daemon running a task that does not answer a probe within this time is taken for
    /// dead (stalled, cut off): its tasks run elsewhere and its map outputs are made again.
    liveness: Duration,
    dir: PathBuf,
    jobs: Mutex<HashMap<Cid, Arc<JobHandle>>>,
    /// Where its job drivers and fan-outs run, so stopping the daemon stops them.
    tasks: Tasks,
}

#[derive(Debug)]
struct JobHandle {
    log: Mutex<JobLog>,
    changed: watch::Sender<u64>,
    cancel: watch::Sender<bool>,
    /// The peers that submitted this job (its spec, hence its id): they, and daemons, may
    /// cancel it.
    submitters: Mutex<HashSet<PeerId>>,
}

/// Who sent a client request, as the job server knows them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Requester {
    /// The peer.
    pub(crate) peer: PeerId,
    /// Whether it is this daemon or another daemon of the swarm.
    pub(crate) is_daemon: bool,
}

#[derive(Debug)]
struct JobLog {
    id: Cid,
    events: Vec<Event>,
    /// When each event was recorded (Unix milliseconds), for timelines and latencies.
    times: Vec<u64>,
    state: JobState,
    maps: (u32, u32),
    reduces: (u32, u32),
    /// Tasks with a finished attempt (verification and re-runs finish a task more than once).
    finished: HashSet<(TaskKind, u32)>,
    counters: Counters,
    started: Instant,
    ended: Option<Duration>,
}

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl JobHandle {
    fn new(id: Cid) -> Arc<Self> {
        Arc::new(Self {
            log: Mutex::new(JobLog {
                id,
                events: Vec::new(),
                times: Vec::new(),
                state: JobState::Running,
                maps: (0, 0),
                reduces: (0, 0),
                finished: HashSet::new(),
                counters: Counters::default(),
                started: Instant::now(),
                ended: None,
            }),
            changed: watch::channel(0).0,
            cancel: watch::channel(false).0,
            submitters: Mutex::new(HashSet::new()),
        })
    }

    fn submitted_by(&self, peer: &PeerId) -> bool {
        self.submitters.lock().expect("poisoned").contains(peer)
    }

    fn emit(&self, event: Event) {
        let n = {
            let mut log = self.log.lock().expect("poisoned");
            match &event {
                Event::Planned { maps, reduces, .. } => {
                    log.maps = (0, *maps);
                    log.reduces = (0, *reduces);
                }
                Event::Reused { maps, reduces, .. } => {
                    log.maps.0 += maps;
                    log.reduces.0 += reduces;
                }
                Event::Split { .. } => log.maps.1 += 1,
                Event::TaskFinished { kind, task, .. } if log.finished.insert((*kind, *task)) => {
                    match kind {
                        TaskKind::Map => log.maps.0 += 1,
                        TaskKind::Reduce => log.reduces.0 += 1,
                    }
                }
                Event::Completed {
                    output, counters, ..
                } => {
                    log.state = JobState::Succeeded { output: *output };
                    log.counters = *counters;
                }
                Event::Failed { reason } => log.state = JobState::Failed(reason.clone()),
                Event::Cancelled => log.state = JobState::Cancelled,
                _ => {}
            }
            if event.is_final() {
                log.ended = Some(log.started.elapsed());
            }
            log.events.push(event);
            log.times.push(unix_millis());
            log.events.len() as u64
        };
        self.changed.send_replace(n);
    }

    fn summary(&self) -> JobSummary {
        let log = self.log.lock().expect("poisoned");
        JobSummary {
            job: log.id,
            state: log.state.clone(),
            maps: log.maps,
            reduces: log.reduces,
            elapsed_ms: log
                .ended
                .unwrap_or_else(|| log.started.elapsed())
                .as_millis() as u64,
            counters: log.counters,
        }
    }
}

/// Why a job stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    Failed(String),
    Cancelled,
}

impl From<String> for Stop {
    fn from(reason: String) -> Self {
        Self::Failed(reason)
    }
}

/// A job as planned: who works with how many slots, its map tasks and where their bytes are.
struct Plan {
    peers: Vec<PeerId>,
    slots: Vec<u32>,
    /// Each peer's machine and each machine's slots (see [`plan::machines`]).
    machine: Vec<usize>,
    machine_slots: Vec<u32>,
    maps: Vec<PlannedMap>,
    /// Input bytes of each map task.
    map_bytes: Vec<u64>,
    /// Bytes of each map task held by each daemon.
    local: Vec<Vec<(usize, u64)>>,
    /// The chunk size of the map tasks' runs, from the number of tasks planned (tasks cut in
    /// two while they run keep it).
    run_chunk: u32,
    split: u64,
    /// Copies of the output.
    replicas: usize,
    /// Tasks the workers finished for an earlier coordinator of this job.
    finished: Vec<(PeerId, FinishedTask)>,
    /// Daemons each task runs on whose outputs must agree.
    verify: usize,
    /// Each map task's memo key, or none if the job does not use the memo.
    lookups: Vec<plan::MapLookup>,
}

/// Where a job is across its rounds.
struct Progress {
    counters: Counters,
    map_attempts: Vec<u32>,
    reduce_attempts: Vec<u32>,
    /// Each map task's output and the daemon holding it.
    outputs: Vec<Option<(MapOutput, PeerId)>>,
    /// Each partition's part, once reduced.
    entries: Vec<Option<DirEntry>>,
    /// Daemons this job has given up on (stalled or unreachable), even if still connected.
    gone: HashSet<PeerId>,
    skips: Skips,
}

impl Progress {
    fn new(spec: &JobSpec, plan: &Plan) -> Self {
        Self {
            counters: Counters::default(),
            map_attempts: vec![0; plan.maps.len()],
            reduce_attempts: vec![0; spec.reducers as usize],
            outputs: vec![None; plan.maps.len()],
            entries: vec![None; spec.reducers as usize],
            gone: HashSet::new(),
            skips: Skips::new(spec.skip_bad_records),
        }
    }
}

impl Coordinator {
    /// A coordinator whose tasks run on `worker`'s daemon and the daemons it is connected to;
    /// a worker that does not answer a probe within `liveness` is given up on.
    pub(crate) fn new(worker: Worker, node: Node, liveness: Duration, tasks: Tasks) -> Self {
        let dir = worker.repo().jobs_dir();
        Self {
            inner: Arc::new(Inner {
                worker,
                node,
                liveness,
                dir,
                jobs: Mutex::new(HashMap::new()),
                tasks,
            }),
        }
    }

    fn net(&self) -> &NetClient {
        self.inner.worker.net()
    }

    /// Answers a client request (`Submit`, `Watch`, `List`, `Cancel`); the daemon's job server
    /// sends the worker's requests to the worker.
    pub(crate) async fn handle(&self, from: Requester, request: JobRequest) -> JobResponse {
        match request {
            JobRequest::Submit { spec } => match self.submit(&spec, from.peer) {
                Ok(job) => JobResponse::Accepted { job },
                Err(reason) => JobResponse::Failed(reason),
            },
            JobRequest::Watch { job, from } => self.watch(job, from).await,
            JobRequest::Pin { root, replicas } => match self.pin(root, replicas, from.peer) {
                Ok(job) => JobResponse::Accepted { job },
                Err(reason) => JobResponse::Failed(reason),
            },
            JobRequest::List => {
                let jobs = self.inner.jobs.lock().expect("poisoned");
                let mut list: Vec<JobSummary> = jobs.values().map(|h| h.summary()).collect();
                list.sort_by_key(|s| std::cmp::Reverse(s.elapsed_ms));
                JobResponse::Jobs(list)
            }
            JobRequest::Cancel { job } => match self.handle_of(&job) {
                Some(h) if !from.is_daemon && !h.submitted_by(&from.peer) => JobResponse::Failed(
                    format!("only the peer that submitted job {job} (or a daemon) may cancel it"),
                ),
                Some(h) => {
                    h.cancel.send_replace(true);
                    JobResponse::Ok
                }
                None => JobResponse::Failed(format!("no job {job} here")),
            },
            other => JobResponse::Failed(format!("not a client request: {other:?}")),
        }
    }

    fn result_path(&self, job: &Cid) -> PathBuf {
        self.inner.dir.join(job.to_string())
    }

    /// The job's handle: in memory, or rebuilt from its recorded result.
    fn handle_of(&self, job: &Cid) -> Option<Arc<JobHandle>> {
        if let Some(h) = self.inner.jobs.lock().expect("poisoned").get(job) {
            return Some(h.clone());
        }
        let bytes = std::fs::read(self.result_path(job)).ok()?;
        let summary: JobSummary = postcard::from_bytes(&bytes).ok()?;
        let JobState::Succeeded { output } = summary.state else {
            return None;
        };
        let h = JobHandle::new(*job);
        h.emit(Event::Accepted {
            job: *job,
            coordinator: self.net().local_peer_id().to_string(),
        });
        h.emit(Event::Completed {
            output,
            counters: summary.counters,
            elapsed_ms: 0,
            cached: true,
        });
        self.insert(*job, h.clone());
        Some(h)
    }

    fn insert(&self, job: Cid, handle: Arc<JobHandle>) {
        let mut jobs = self.inner.jobs.lock().expect("poisoned");
        if jobs.len() >= MAX_JOBS {
            // Forget the oldest finished job (its result stays on disk).
            let oldest = jobs
                .iter()
                .filter(|(_, h)| h.log.lock().expect("poisoned").ended.is_some())
                .min_by_key(|(_, h)| h.log.lock().expect("poisoned").started)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                jobs.remove(&k);
            }
        }
        jobs.insert(job, handle);
    }

    /// Starts pinning `root` on `replicas` daemons: an operation watched like a job.
    fn pin(&self, root: Cid, replicas: u32, by: PeerId) -> Result<Cid, String> {
        let daemons = self.net().daemons().len() + 1;
        if replicas == 0 || replicas as usize > daemons {
            return Err(format!(
                "cannot keep {root} on {replicas} daemon(s): {daemons} are reachable from here"
            ));
        }
        self.running_below_limit()?;
        // Each pin is its own operation (pinning again after a loss must fetch again).
        let mut seed = b"p2pmr pin\0".to_vec();
        seed.extend_from_slice(&root.to_bytes());
        seed.extend_from_slice(&replicas.to_be_bytes());
        seed.extend_from_slice(&blocks::random_u64().to_be_bytes());
        let id = *Block::raw(seed).cid();
        let handle = self.accept(id, by);
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            let mut cancel = handle.cancel.subscribe();
            let started = Instant::now();
            let fetch = async {
                let via = this.ipfs_daemon().await;
                this.fetch_input(&handle, root, replicas as usize, via)
                    .await
            };
            let outcome = tokio::select! {
                r = fetch => r.map_err(Stop::Failed),
                _ = cancel.wait_for(|c| *c) => Err(Stop::Cancelled),
            };
            handle.emit(match outcome {
                Ok(fetched) => Event::Completed {
                    output: root,
                    counters: Counters {
                        input_bytes: fetched.bytes,
                        ..Counters::default()
                    },
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    cached: false,
                },
                Err(Stop::Failed(reason)) => Event::Failed { reason },
                Err(Stop::Cancelled) => Event::Cancelled,
            });
        });
        Ok(id)
    }

    /// A daemon connected to IPFS nodes: this one if it is, else the first other that says
    /// it is (`None` if none is).
    async fn ipfs_daemon(&self) -> Option<PeerId> {
        if self.inner.node.fetcher().has_ipfs_sources() {
            return Some(self.net().local_peer_id());
        }
        let asked = self.net().daemons().into_keys().map(|peer| async move {
            let status = client::status(self.net(), peer, self.inner.liveness).await;
            status.is_ok_and(|s| s.ipfs_peers > 0).then_some(peer)
        });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .flatten()
            .next()
    }

    /// The fetch phase: the DAG at `root` fetched from wherever it is (IPFS nodes included)
    /// and stored on `replicas` daemons, with `Fetching` events along the way. IPFS nodes
    /// are usually known to some daemons only (those given their address): `via` is one that
    /// knows some ([`Coordinator::ipfs_daemon`]); when it is another daemon, that one is asked
    /// to pin the DAG, and its progress is passed on.
    async fn fetch_input(
        &self,
        handle: &JobHandle,
        root: Cid,
        replicas: usize,
        via: Option<PeerId>,
    ) -> Result<Fetched, String> {
        handle.emit(Event::Phase(Phase::Fetch));
        let me = self.net().local_peer_id();
        match via {
            Some(other) if other != me => self.fetch_through(handle, other, root, replicas).await,
            _ => self.fetch_here(handle, root, replicas).await,
        }
    }

    /// [`Coordinator::fetch_input`] by `daemon`, followed to its end.
    async fn fetch_through(
        &self,
        handle: &JobHandle,
        daemon: PeerId,
        root: Cid,
        replicas: usize,
    ) -> Result<Fetched, String> {
        let net = self.net();
        let fail = |e: &dyn std::fmt::Display| format!("fetching {root} through {daemon}: {e}");
        let id = client::pin(net, daemon, root, replicas as u32)
            .await
            .map_err(|e| fail(&e))?;
        let mut follower = client::Follower::new(net.clone(), daemon, id, None);
        let mut last = Fetched::default();
        while let Some(events) = follower.next_batch().await.map_err(|e| fail(&e))? {
            for event in events {
                match &event {
                    Event::Fetching {
                        blocks,
                        bytes,
                        from_ipfs,
                        retries,
                        ..
                    } => {
                        last = Fetched {
                            blocks: *blocks,
                            bytes: *bytes,
                            from_ipfs: *from_ipfs,
                            retries: *retries,
                        };
                        handle.emit(event.clone());
                    }
                    Event::Completed { .. } => return Ok(last),
                    Event::Failed { reason } => return Err(fail(reason)),
                    Event::Cancelled => return Err(fail(&"cancelled")),
                    _ => {}
                }
            }
        }
        Err(fail(&"its events ended without an outcome"))
    }

    /// [`Coordinator::fetch_input`] by this daemon.
    async fn fetch_here(
        &self,
        handle: &JobHandle,
        root: Cid,
        replicas: usize,
    ) -> Result<Fetched, String> {
        let event = |f: &Fetched, done: bool| Event::Fetching {
            root,
            blocks: f.blocks,
            bytes: f.bytes,
            from_ipfs: f.from_ipfs,
            retries: f.retries,
            done,
        };
        let mut shown = Instant::now();
        let progress = |f: &Fetched| {
            if shown.elapsed() >= FETCH_EVENTS {
                shown = Instant::now();
                handle.emit(event(f, false));
            }
        };
        let fetched = self
            .inner
            .node
            .blocks()
            .fetch_and_keep(root, Replicas::network(replicas), progress)
            .await
            .map_err(|e| format!("fetching {root}: {}", Chain(&e)))?;
        handle.emit(event(&fetched, true));
        Ok(fetched)
    }

    /// A new job `id` submitted by `by`, accepted and kept.
    fn accept(&self, id: Cid, by: PeerId) -> Arc<JobHandle> {
        let handle = JobHandle::new(id);
        handle.submitters.lock().expect("poisoned").insert(by);
        handle.emit(Event::Accepted {
            job: id,
            coordinator: self.net().local_peer_id().to_string(),
        });
        self.insert(id, handle.clone());
        handle
    }

    /// `Err` with a reason if this coordinator runs as many jobs as it may.
    fn running_below_limit(&self) -> Result<(), String> {
        let running = {
            let jobs = self.inner.jobs.lock().expect("poisoned");
            jobs.values()
                .filter(|h| h.log.lock().expect("poisoned").ended.is_none())
                .count()
        };
        if running >= MAX_RUNNING {
            return Err(format!(
                "this coordinator is running {running} jobs already; try again later"
            ));
        }
        Ok(())
    }

    fn submit(&self, bytes: &[u8], by: PeerId) -> Result<Cid, String> {
        let spec = JobSpec::decode(bytes).map_err(|e| e.to_string())?;
        let id = spec.id();
        if let Some(h) = self.handle_of(&id) {
            let state = h.log.lock().expect("poisoned").state.clone();
            if matches!(state, JobState::Running | JobState::Succeeded { .. }) {
                // The same spec is the same job: whoever submits it shares it.
                h.submitters.lock().expect("poisoned").insert(by);
                return Ok(id);
            }
        }
        self.running_below_limit()?;
        let handle = self.accept(id, by);
        let this = self.clone();
        let bytes = bytes.to_vec();
        self.inner
            .tasks
            .spawn(async move { this.drive(handle, spec, bytes).await });
        Ok(id)
    }

    async fn watch(&self, job: Cid, from: u64) -> JobResponse {
        let Some(h) = self.handle_of(&job) else {
            return JobResponse::Failed(format!("no job {job} is known to this coordinator"));
        };
        let mut changed = h.changed.subscribe();
        let deadline = tokio::time::Instant::now() + WATCH_WAIT;
        loop {
            {
                let log = h.log.lock().expect("poisoned");
                let total = log.events.len() as u64;
                let ended = log.ended.is_some();
                if from < total || ended {
                    let start = from.min(total) as usize;
                    let events: Vec<Event> = log.events[start..]
                        .iter()
                        .take(MAX_EVENTS_PER_REPLY)
                        .cloned()
                        .collect();
                    let next = (start + events.len()) as u64;
                    let times = log.times[start..start + events.len()].to_vec();
                    return JobResponse::Events {
                        events,
                        times,
                        next,
                        done: ended && next == total,
                    };
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return JobResponse::Events {
                    events: Vec::new(),
                    times: Vec::new(),
                    next: from,
                    done: false,
                };
            }
        }
    }

    async fn drive(&self, handle: Arc<JobHandle>, spec: JobSpec, bytes: Vec<u8>) {
        let mut cancel = handle.cancel.subscribe();
        let id = spec.id();
        let outcome = tokio::select! {
            r = self.run(&handle, &spec, &bytes) => r,
            _ = cancel.wait_for(|c| *c) => Err(Stop::Cancelled),
        };
        match outcome {
            Ok((output, counters, elapsed)) => {
                handle.emit(Event::Completed {
                    output,
                    counters,
                    elapsed_ms: elapsed.as_millis() as u64,
                    cached: false,
                });
                self.record(&id, &handle);
            }
            Err(stop) => {
                // Stop whatever still runs anywhere.
                let peers: Vec<PeerId> = self.net().daemons().into_keys().collect();
                let _ = self
                    .inner
                    .worker
                    .handle(JobRequest::Abort { job: id })
                    .await;
                for peer in peers {
                    let net = self.net().clone();
                    self.inner.tasks.spawn(async move {
                        let _ = net.job_request(peer, JobRequest::Abort { job: id }).await;
                    });
                }
                handle.emit(match stop {
                    Stop::Failed(reason) => Event::Failed { reason },
                    Stop::Cancelled => Event::Cancelled,
                });
            }
        }
    }

    /// Records a succeeded job's summary (temp file + rename), so it is answered from here
    /// next time, also after a restart.
    fn record(&self, id: &Cid, handle: &JobHandle) {
        let summary = handle.summary();
        let bytes = postcard::to_allocvec(&summary).expect("in-memory encoding");
        let path = self.result_path(id);
        let tmp = path.with_extension("tmp");
        let write = std::fs::create_dir_all(&self.inner.dir)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = write {
            tracing::warn!("cannot record the result of job {id}: {e}");
        }
    }

    /// Sends `request` to `peer` (this daemon's own worker when it is us). A network failure
    /// is `Err`; a worker's refusal or failure is `Ok(Failed)`.
    async fn call(&self, peer: PeerId, request: JobRequest) -> Result<JobResponse, String> {
        if peer == self.net().local_peer_id() {
            return Ok(self.inner.worker.handle(request).await);
        }
        self.net()
            .job_request(peer, request)
            .await
            .map_err(|e| e.to_string())
    }

    async fn run(
        &self,
        handle: &JobHandle,
        spec: &JobSpec,
        bytes: &[u8],
    ) -> Result<(Cid, Counters, Duration), Stop> {
        let started = Instant::now();
        let mut plan = self.plan(handle, spec).await?;
        let mut job = Progress::new(spec, &plan);
        let (reused_maps, reused_reduces) = reuse(
            std::mem::take(&mut plan.finished),
            plan.verify,
            &plan.maps,
            plan.split,
            &mut job.outputs,
            &mut job.entries,
            &mut job.counters,
        );
        if reused_maps + reused_reduces > 0 {
            handle.emit(Event::Reused {
                maps: reused_maps,
                reduces: reused_reduces,
                input_bytes: 0,
                memo: false,
            });
        }
        self.remembered_maps(handle, spec, &plan, &mut job).await;
        let mut to_map: Vec<usize> = if job.entries.iter().all(Option::is_some) {
            Vec::new() // every partition is done: no map output is needed any more
        } else {
            (0..plan.maps.len())
                .filter(|t| job.outputs[*t].is_none())
                .collect()
        };
        let me = self.net().local_peer_id();
        handle.emit(Event::Phase(Phase::Map));
        // Map, then reduce; when map outputs are lost (their holder is gone, or a reducer
        // could not fetch them) those map tasks run again and the reduces that need them
        // after them: the MapReduce paper's rule. Each round loses at least one holder, so
        // the rounds are bounded by the number of daemons.
        for round in 0.. {
            // Bounded so a job cannot loop for ever; generous, as daemons may die and come
            // back several times over a long job.
            if round > 3 * plan.peers.len() + 2 {
                return Err("map outputs kept being lost; giving up".to_string().into());
            }
            if !to_map.is_empty() {
                let tasks = std::mem::take(&mut to_map);
                self.map_round(handle, spec, bytes, &mut plan, &mut job, tasks)
                    .await?;
            }
            if round == 0 {
                handle.emit(Event::Phase(Phase::Reduce));
            }
            // Map outputs on daemons that have left are lost: run those tasks again first.
            let connected = self.net().daemons();
            let up = |p: &PeerId| connected.contains_key(p) && !job.gone.contains(p);
            let lost = plan::lost_outputs(&job.outputs, me, up);
            if !lost.is_empty() {
                self.lose_outputs(
                    handle,
                    &mut job.outputs,
                    &lost,
                    "its holder left the network",
                );
                to_map = lost;
                continue;
            }
            let pending: Vec<usize> = (0..spec.reducers as usize)
                .filter(|r| job.entries[*r].is_none())
                .collect();
            let pending = self
                .remembered_reduces(handle, spec, &plan, &mut job, pending)
                .await;
            if pending.is_empty() {
                break;
            }
            let missing = self
                .reduce_round(handle, bytes, &plan, &mut job, pending)
                .await?;
            if !missing.is_empty() {
                let lost = plan::with_missing_runs(&job.outputs, &missing);
                if lost.is_empty() {
                    return Err("a reducer reported map outputs this job never made"
                        .to_string()
                        .into());
                }
                let why = "a reducer could not fetch its output";
                self.lose_outputs(handle, &mut job.outputs, &lost, why);
                to_map = lost;
            }
        }
        // Map counters of the outputs used (a lost and re-run task counts once).
        for (out, _) in job.outputs.iter().flatten() {
            job.counters.add(&out.counters);
        }
        let root = self.store_output(handle, &plan, &mut job).await?;
        Ok((root, job.counters, started.elapsed()))
    }

    /// Runs the map tasks `tasks` of the job; their outputs go into `job`.
    async fn map_round(
        &self,
        handle: &JobHandle,
        spec: &JobSpec,
        bytes: &[u8],
        plan: &mut Plan,
        job: &mut Progress,
        tasks: Vec<usize>,
    ) -> Result<(), Stop> {
        let sched = Schedule {
            kind: TaskKind::Map,
            peers: &plan.peers,
            slots: &plan.slots,
            machines: Some((&plan.machine, &plan.machine_slots)),
            local: Some(plan.local.clone()),
            bytes: plan.map_bytes.clone(),
            tasks,
            skips: &mut job.skips,
            verify: spec.verify as usize,
        };
        let tally = Tally {
            counters: &mut job.counters,
            attempts: &mut job.map_attempts,
            gone: &mut job.gone,
        };
        let mut maps = Maps {
            spec: bytes,
            split: plan.split,
            run_chunk: plan.run_chunk,
            maps: &mut plan.maps,
            bytes: &mut plan.map_bytes,
            local: &mut plan.local,
        };
        let done = self.phase(handle, sched, tally, &mut maps).await?;
        // Tasks cut in two while they ran added their rests.
        job.outputs.resize(plan.maps.len(), None);
        for (t, response, peer) in done {
            let JobResponse::MapDone(out) = response else {
                return Err(format!("{peer} answered map task {t} with {response:?}").into());
            };
            if out.parts.len() != spec.reducers as usize {
                return Err(format!(
                    "map task {t} on {peer} returned {} partitions, not {}",
                    out.parts.len(),
                    spec.reducers
                )
                .into());
            }
            job.outputs[t] = Some((out, peer));
        }
        Ok(())
    }

    /// Runs the reduce tasks `pending` over the map outputs in `job`; their parts go into
    /// `job`. Returns the runs reducers could not fetch (their map tasks must run again).
    async fn reduce_round(
        &self,
        handle: &JobHandle,
        bytes: &[u8],
        plan: &Plan,
        job: &mut Progress,
        pending: Vec<usize>,
    ) -> Result<HashSet<Cid>, Stop> {
        let reducers = job.entries.len();
        let runs: Vec<Vec<RunRef>> = (0..reducers)
            .map(|r| {
                job.outputs
                    .iter()
                    .flatten()
                    .filter_map(|(out, peer)| {
                        out.parts[r].as_ref().map(|p| RunRef {
                            cid: p.cid,
                            holder: peer.to_bytes(),
                        })
                    })
                    .collect()
            })
            .collect();
        let run_bytes: Vec<u64> = (0..reducers)
            .map(|r| {
                job.outputs
                    .iter()
                    .flatten()
                    .filter_map(|(out, _)| out.parts[r].as_ref().map(|p| p.bytes))
                    .sum()
            })
            .collect();
        // Copies go to the daemons still with us; as many as the inputs had, if they can.
        let avoid: Vec<Vec<u8>> = job.gone.iter().map(|p| p.to_bytes()).collect();
        let replicas_now = plan.replicas.min(self.live(&job.gone)).max(1);
        let run_chunk = plan.run_chunk;
        let sched = Schedule {
            kind: TaskKind::Reduce,
            peers: &plan.peers,
            slots: &plan.slots,
            machines: Some((&plan.machine, &plan.machine_slots)),
            local: None,
            bytes: run_bytes,
            tasks: pending,
            skips: &mut Skips::new(0),
            verify: plan.verify,
        };
        let tally = Tally {
            counters: &mut job.counters,
            attempts: &mut job.reduce_attempts,
            gone: &mut job.gone,
        };
        let mut reduces = Reduces(|r: usize, attempt| {
            JobRequest::Reduce(ReduceTask {
                spec: bytes.to_vec(),
                partition: r as u32,
                runs: runs[r].clone(),
                replicas: replicas_now as u32,
                avoid: avoid.clone(),
                attempt,
                run_chunk,
            })
        });
        let done = self.phase(handle, sched, tally, &mut reduces).await?;
        let mut missing = HashSet::new();
        for (r, response, peer) in done {
            match response {
                JobResponse::ReduceDone(out) => {
                    job.counters.add(&out.counters);
                    job.entries[r] = Some(DirEntry {
                        name: format!("part-{r:05}"),
                        cid: out.cid,
                        tsize: out.tsize,
                    });
                }
                JobResponse::MissingRuns(runs) => missing.extend(runs.into_iter().map(|r| r.cid)),
                other => {
                    return Err(format!("{peer} answered reduce task {r} with {other:?}").into())
                }
            }
        }
        Ok(missing)
    }

    /// Daemons not given up on, this one among them unless its own worker was (verification
    /// can exclude it): where a reducer's output copies may go.
    fn live(&self, gone: &HashSet<PeerId>) -> usize {
        let me = self.net().local_peer_id();
        self.live_others(gone) + usize::from(!gone.contains(&me))
    }

    /// Daemons other than this one that are connected and not given up on.
    fn live_others(&self, gone: &HashSet<PeerId>) -> usize {
        let me = self.net().local_peer_id();
        self.net()
            .daemons()
            .keys()
            .filter(|p| **p != me && !gone.contains(*p))
            .count()
    }

    /// Stores the output directory over the parts in `job`, replicated like them.
    async fn store_output(
        &self,
        handle: &JobHandle,
        plan: &Plan,
        job: &mut Progress,
    ) -> Result<Cid, Stop> {
        handle.emit(Event::Phase(Phase::Store));
        let entries: Vec<DirEntry> = std::mem::take(&mut job.entries)
            .into_iter()
            .flatten()
            .collect();
        let dir = unixfs::directory(entries);
        let root = *dir.cid();
        let repo = self.inner.worker.repo();
        let store = repo.blocks().clone();
        tokio::task::spawn_blocking(move || {
            store.put(&dir)?;
            store.sync([dir.cid()])
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot store the output directory: {e}"))?;
        let avoid: Vec<PeerId> = job.gone.iter().copied().collect();
        let copies = plan
            .replicas
            .saturating_sub(1)
            .min(self.live_others(&job.gone));
        let own = HashMap::new();
        blocks::replicate_patiently(self.net(), repo.blocks(), &[root], copies, &avoid, &own)
            .await
            .map_err(|e| format!("cannot replicate the output directory: {e}"))?;
        self.inner
            .worker
            .keep_own_copies(vec![(root, None)], copies + 1)
            .await;
        Ok(root)
    }

    /// Plans the job: checks its module loads, walks its inputs, asks every daemon for its
    /// slots and the input blocks it holds, picks the split and cuts the map tasks.
    async fn plan(&self, handle: &JobHandle, spec: &JobSpec) -> Result<Plan, Stop> {
        let worker = &self.inner.worker;
        let me = self.net().local_peer_id();
        // The reason names the module; a module that does not load fails the job before any
        // task is planned.
        worker
            .module(spec)
            .await
            .map_err(|e| Stop::Failed(e.to_string()))?;

        // Plan the map tasks: every input's leaves first, as the split size may depend on
        // the total.
        let fetcher = worker.fetcher();
        let mut inputs = Vec::with_capacity(spec.inputs.len());
        for input in &spec.inputs {
            // A block no reachable daemon has may be on one that is restarting or was just
            // cut off (daemons redial each other every few seconds): ask again a few times
            // before failing the job.
            let mut tries = 0;
            let mut fetched = false;
            let leaves = loop {
                let found = leaves(fetcher, input.cid).await;
                if let Err(RemoteError::Unavailable { .. } | RemoteError::NoDaemons { .. }) = found
                {
                    // No daemon has it, but IPFS nodes are connected: fetch it from them and
                    // store it like an add, then plan as usual.
                    let via = if fetched {
                        None
                    } else {
                        self.ipfs_daemon().await
                    };
                    if via.is_some() {
                        fetched = true;
                        let replicas = INPUT_REPLICAS.min(self.net().daemons().len() + 1);
                        self.fetch_input(handle, input.cid, replicas, via)
                            .await
                            .map_err(|e| format!("input {}: {e}", input.name))?;
                        continue;
                    }
                }
                match found {
                    Err(RemoteError::Unavailable { .. } | RemoteError::NoDaemons { .. })
                        if tries < PLAN_RETRIES =>
                    {
                        tries += 1;
                        tokio::time::sleep(PLAN_RETRY_PAUSE).await;
                    }
                    other => break other,
                }
            }
            .map_err(|e| format!("input {} ({}): {e}", input.name, input.cid))?;
            inputs.push(leaves);
        }
        let input_bytes: u64 = inputs.iter().flatten().map(|l| l.len).sum();

        // Who can work, with how many slots, holding which blocks: the daemons this one
        // reaches for the inputs' placement groups (past a full mesh, by lookups).
        let groups = inputs.iter().flatten().map(|l| l.group);
        let mut peers = vec![me];
        peers.extend(
            blocks::reach(self.net(), groups)
                .await
                .into_iter()
                .filter(|p| *p != me),
        );
        let all_leaves: Vec<Cid> = {
            let mut set: Vec<Cid> = inputs.iter().flatten().map(|l| l.cid).collect();
            set.sort();
            set.dedup();
            set
        };
        // Every daemon at once (a few at a time would make planning grow with the daemons).
        let asked = peers.iter().map(|&peer| {
            let all_leaves = &all_leaves;
            async move {
                // A daemon that does not answer in time (stalled) gets no tasks.
                let asked =
                    tokio::time::timeout(self.inner.liveness, self.call(peer, JobRequest::Slots));
                let (n, host) = match asked.await {
                    Ok(Ok(JobResponse::Slots { slots, host })) => (slots.clamp(1, 1024), host),
                    _ => (0, 0),
                };
                let held = if n == 0 {
                    HashSet::new()
                } else {
                    self.held(peer, all_leaves).await
                };
                (n, host, held)
            }
        });
        let mut slots = Vec::new();
        let mut hosts = Vec::new();
        let mut holdings = Vec::new();
        for (n, host, held) in futures::future::join_all(asked).await {
            slots.push(n);
            hosts.push(host);
            holdings.push(held);
        }
        let (machine, machine_slots) = plan::machines(&slots, &hosts);

        // Work done for an earlier coordinator of this job (it died, and a client or another
        // daemon handed the job to this one): the workers remember the tasks they finished
        // and the split they were planned with. Planning with that split is deterministic,
        // so task numbers and ranges match; the automatic split would not, as it depends on
        // the slots, and a daemon may have died with the first coordinator.
        let finished = self.finished(spec, &peers, &slots).await;
        let earlier = finished.iter().find_map(|(_, task)| match task {
            FinishedTask::Map { split, .. } => Some(*split),
            FinishedTask::Reduce { .. } => None,
        });
        let split = plan::split_for(spec, earlier, input_bytes, &machine_slots);
        let maps = plan::cut_maps(inputs.clone(), split, &holdings);
        let lookups = if spec.reuses_memo() {
            plan::map_lookups(spec, &inputs, &maps)
        } else {
            Vec::new()
        };
        let workers = slots.iter().filter(|&&n| n > 0).count();
        if workers < spec.verify as usize {
            return Err(format!(
                "verification by {} daemons needs {} daemons that can run tasks; {workers} can",
                spec.verify, spec.verify
            )
            .into());
        }
        // Outputs are replicated like the inputs.
        let replicas = plan::output_replicas(&all_leaves, &holdings, workers);
        let local = plan::locality(&maps, &holdings);
        handle.emit(Event::Planned {
            maps: maps.len() as u32,
            reduces: spec.reducers,
            input_bytes,
            workers: workers as u32,
        });
        Ok(Plan {
            map_bytes: maps.iter().map(|m| m.end - m.start).collect(),
            run_chunk: p2pmr_protocol::engine::run_chunk(maps.len()),
            peers,
            slots,
            machine,
            machine_slots,
            maps,
            local,
            split,
            replicas,
            finished,
            verify: spec.verify as usize,
            lookups,
        })
    }

    /// Asks every worker of the plan for the outputs it remembers under `keys`.
    async fn ask_memo(&self, plan: &Plan, keys: &[Cid]) -> Vec<(PeerId, MemoHit)> {
        if keys.is_empty() {
            return Vec::new();
        }
        let asked = plan
            .peers
            .iter()
            .zip(&plan.slots)
            .filter(|(_, n)| **n > 0)
            .map(|(&peer, _)| async move {
                let mut hits = Vec::new();
                for batch in keys.chunks(MAX_MEMO_KEYS / 2) {
                    let keys = batch.to_vec();
                    let asked = self.call(peer, JobRequest::Memo { keys });
                    match tokio::time::timeout(self.inner.liveness, asked).await {
                        Ok(Ok(JobResponse::Memo(found))) => {
                            hits.extend(found.into_iter().map(|h| (peer, h)))
                        }
                        // An older or busy daemon: its memo is not used this time.
                        _ => break,
                    }
                }
                hits
            });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Takes the outputs the workers remember for map tasks that have none yet: each must
    /// have read what this task would read past its range and, if its module looked at
    /// offsets or at the input's name, have started where this task starts or read an input
    /// of this name. The coordinator's own worker's first.
    async fn remembered_maps(
        &self,
        handle: &JobHandle,
        spec: &JobSpec,
        plan: &Plan,
        job: &mut Progress,
    ) {
        let wanted: Vec<usize> = (0..plan.lookups.len())
            .filter(|&t| job.outputs[t].is_none())
            .collect();
        let keys: Vec<Cid> = wanted.iter().map(|&t| plan.lookups[t].key).collect();
        let mut hits = self.ask_memo(plan, &keys).await;
        let me = self.net().local_peer_id();
        hits.sort_by_key(|(peer, _)| *peer != me);
        // Repeated content makes tasks with the same key: one output may serve several.
        let mut by_key: HashMap<Cid, Vec<usize>> = HashMap::new();
        for &t in &wanted {
            by_key.entry(plan.lookups[t].key).or_default().push(t);
        }
        let reducers = job.entries.len();
        let (mut maps, mut bytes) = (0, 0);
        for (peer, hit) in hits {
            let (Some(tasks), Remembered::Map(memo)) = (by_key.get(&hit.key), hit.entry) else {
                continue;
            };
            if memo.output.parts.len() != reducers {
                continue;
            }
            for &t in tasks {
                let task = &plan.maps[t];
                let input = &spec.inputs[task.input as usize].name;
                if job.outputs[t].is_none() && memo.fits(task.start, input, &plan.lookups[t].next) {
                    job.outputs[t] = Some((memo.output.clone(), peer));
                    maps += 1;
                    bytes += task.end - task.start;
                }
            }
        }
        if maps > 0 {
            handle.emit(Event::Reused {
                maps,
                reduces: 0,
                input_bytes: bytes,
                memo: true,
            });
        }
    }

    /// Takes the outputs the workers remember for the `pending` partitions (reduce tasks over
    /// the same runs); returns the partitions still to reduce.
    async fn remembered_reduces(
        &self,
        handle: &JobHandle,
        spec: &JobSpec,
        plan: &Plan,
        job: &mut Progress,
        pending: Vec<usize>,
    ) -> Vec<usize> {
        if !spec.reuses_memo() || pending.is_empty() {
            return pending;
        }
        let args = spec.encoded_args();
        let keys: Vec<(usize, Cid)> = pending
            .iter()
            .map(|&r| {
                let runs: Vec<Cid> = job
                    .outputs
                    .iter()
                    .flatten()
                    .filter_map(|(out, _)| out.parts[r].as_ref().map(|p| p.cid))
                    .collect();
                let key = ReduceKey {
                    module: spec.module,
                    args: &args,
                    reducers: spec.reducers,
                    partition: r as u32,
                    runs: &runs,
                }
                .key();
                (r, key)
            })
            .collect();
        let asked: Vec<Cid> = keys.iter().map(|(_, k)| *k).collect();
        let by_key: HashMap<Cid, usize> = keys.into_iter().map(|(r, k)| (k, r)).collect();
        let mut reduces = 0;
        for (_, hit) in self.ask_memo(plan, &asked).await {
            let (Some(&r), Remembered::Reduce(out)) = (by_key.get(&hit.key), hit.entry) else {
                continue;
            };
            if job.entries[r].is_some() {
                continue;
            }
            job.counters.add(&out.counters);
            job.entries[r] = Some(DirEntry {
                name: format!("part-{r:05}"),
                cid: out.cid,
                tsize: out.tsize,
            });
            reduces += 1;
        }
        if reduces > 0 {
            handle.emit(Event::Reused {
                maps: 0,
                reduces,
                input_bytes: 0,
                memo: true,
            });
        }
        pending
            .into_iter()
            .filter(|&r| job.entries[r].is_none())
            .collect()
    }

    /// Asks the live workers which tasks of this job they finished and still hold the output
    /// of (see [`JobRequest::Finished`]).
    async fn finished(
        &self,
        spec: &JobSpec,
        peers: &[PeerId],
        slots: &[u32],
    ) -> Vec<(PeerId, FinishedTask)> {
        let job = spec.id();
        let asked = peers
            .iter()
            .zip(slots)
            .filter(|(_, n)| **n > 0)
            .map(|(&peer, _)| async move {
                let asked = self.call(peer, JobRequest::Finished { job });
                match tokio::time::timeout(self.inner.liveness, asked).await {
                    Ok(Ok(JobResponse::Finished(tasks))) => {
                        tasks.into_iter().map(|t| (peer, t)).collect()
                    }
                    _ => Vec::new(),
                }
            });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Forgets the outputs of map tasks `lost`, telling watchers why they run again.
    fn lose_outputs(
        &self,
        handle: &JobHandle,
        outputs: &mut [Option<(MapOutput, PeerId)>],
        lost: &[usize],
        why: &str,
    ) {
        for &t in lost {
            if let Some((_, peer)) = outputs[t].take() {
                handle.emit(Event::TaskFailed {
                    kind: TaskKind::Map,
                    task: t as u32,
                    peer: peer.to_string(),
                    reason: format!("output lost: {why}"),
                    retry: true,
                });
            }
        }
    }

    /// Which of `cids` `peer` holds.
    async fn held(&self, peer: PeerId, cids: &[Cid]) -> HashSet<Cid> {
        if peer == self.net().local_peer_id() {
            let store = self.inner.worker.repo().blocks().clone();
            let cids = cids.to_vec();
            return tokio::task::spawn_blocking(move || {
                cids.into_iter().filter(|c| store.has(c)).collect()
            })
            .await
            .unwrap_or_default();
        }
        blocks::held_by(self.net(), peer, cids)
            .await
            .unwrap_or_else(|| {
                tracing::debug!("{peer} did not say which blocks it holds");
                HashSet::new()
            })
    }

    /// Runs every task of a phase to completion: round-robin over the peers with free slots,
    /// map tasks by locality; a task whose peer fails (network error, busy) is tried again
    /// elsewhere, a task that fails by itself fails the job. Returns each task's response and
    /// the peer that ran it.
    /// Runs one phase: carries out what the phase's [`PhaseState`] decides (calls, aborts,
    /// probes, events) and feeds it the answers and the time, until every task has answered.
    async fn phase(
        &self,
        handle: &JobHandle,
        sched: Schedule<'_>,
        tally: Tally<'_>,
        tasks: &mut dyn PhaseTasks,
    ) -> Result<Vec<(usize, JobResponse, PeerId)>, Stop> {
        let kind = sched.kind;
        let connected = self.net().daemons();
        let me = self.net().local_peer_id();
        let mut state = PhaseState::new(sched, tally, me, self.inner.liveness, |p| {
            connected.contains_key(p)
        });
        let job = handle.log.lock().expect("poisoned").id;
        let mut calls: JoinSet<(AttemptId, Result<JobResponse, String>)> = JoinSet::new();
        let mut attempts: HashMap<tokio::task::Id, AttemptId> = HashMap::new();
        let mut aborts: HashMap<AttemptId, tokio::task::AbortHandle> = HashMap::new();
        // Each running attempt's task, and where the task ended when it started.
        let mut started: HashMap<AttemptId, (usize, u64)> = HashMap::new();
        let mut cuts: JoinSet<(usize, Result<JobResponse, String>)> = JoinSet::new();
        let mut probes: JoinSet<(usize, bool)> = JoinSet::new();
        let mut probe_tick = tokio::time::interval(self.inner.liveness / 3);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cancel = handle.cancel.subscribe();
        loop {
            if !state.is_done() {
                state.assign(Instant::now());
            }
            // The last answer's actions (its event, stopping a backup's loser) go out too.
            for action in state.take_actions() {
                match action {
                    Action::Emit(event) => handle.emit(event),
                    Action::Start(start) => {
                        let this = self.clone();
                        let req = tasks.request(start.task, start.attempt, start.skip);
                        let (id, peer) = (start.id, start.peer);
                        started.insert(id, (start.task, tasks.end(start.task)));
                        let abort = calls.spawn(async move { (id, this.call(peer, req).await) });
                        attempts.insert(abort.id(), id);
                        aborts.insert(id, abort);
                    }
                    Action::Abort(id) => {
                        if let Some(abort) = aborts.get(&id) {
                            abort.abort();
                        }
                    }
                    Action::StopOnWorker { peer, task } => {
                        let this = self.clone();
                        let stop = JobRequest::AbortTask {
                            job,
                            kind,
                            task: task as u32,
                        };
                        self.inner.tasks.spawn(async move {
                            let _ =
                                tokio::time::timeout(ABORT_TIMEOUT, this.call(peer, stop)).await;
                        });
                    }
                    Action::Cut { peer, task } => {
                        let this = self.clone();
                        let cut = JobRequest::SplitTask {
                            job,
                            task: task as u32,
                            edges: tasks.edges(task),
                        };
                        cuts.spawn(async move {
                            let answer = tokio::time::timeout(CUT_TIMEOUT, this.call(peer, cut))
                                .await
                                .unwrap_or_else(|_| Err("no answer in time".into()));
                            (task, answer)
                        });
                    }
                }
            }
            if state.is_done() {
                break;
            }
            if let Some(stop) = state.stuck() {
                return Err(stop);
            }
            let outcome = tokio::select! {
                r = calls.join_next_with_id(), if !calls.is_empty() => match r {
                    Some(Ok((task, (id, result)))) => {
                        attempts.remove(&task);
                        aborts.remove(&id);
                        let result = match started.remove(&id) {
                            Some(of) => after_cuts(&mut state, tasks, of, result),
                            None => result,
                        };
                        state.answered(id, result, Instant::now())
                    }
                    Some(Err(e)) if e.is_cancelled() => {
                        let id = attempts.remove(&e.id()).expect("a call we started");
                        aborts.remove(&id);
                        started.remove(&id);
                        state.cancelled(id, Instant::now())
                    }
                    Some(Err(e)) => Err(e.to_string().into()),
                    None => Ok(()),
                },
                _ = tokio::time::sleep(wake_in(&state)) => Ok(()),
                _ = probe_tick.tick() => {
                    for (p, peer) in state.probe_targets() {
                        let (this, limit) = (self.clone(), self.inner.liveness);
                        probes.spawn(async move {
                            let answer =
                                tokio::time::timeout(limit, this.call(peer, JobRequest::Slots)).await;
                            (p, matches!(answer, Ok(Ok(JobResponse::Slots { .. }))))
                        });
                    }
                    Ok(())
                }
                Some(cut) = cuts.join_next(), if !cuts.is_empty() => {
                    let (t, answer) = cut.map_err(|e| e.to_string())?;
                    state.cut_answered(t, Instant::now());
                    if let Ok(JobResponse::SplitAt(at)) = answer {
                        // Unless a copy has finished, or the task was cut there already (its
                        // output said so first).
                        if !state.is_complete(t) && at < tasks.end(t) {
                            cut_task(&mut state, tasks, t, at);
                        }
                    }
                    Ok(())
                }
                Some(probe) = probes.join_next(), if !probes.is_empty() => {
                    let (p, alive) = probe.map_err(|e| e.to_string())?;
                    state.probed(p, alive);
                    Ok(())
                }
                _ = cancel.wait_for(|c| *c) => Err(Stop::Cancelled),
            };
            if let Err(stop) = outcome {
                // The events that explain the failure go out before it does.
                for action in state.take_actions() {
                    if let Action::Emit(event) = action {
                        handle.emit(event);
                    }
                }
                return Err(stop);
            }
        }
        Ok(state.into_done())
    }
}

/// What a phase's driver sends for each task, and for map tasks where they end and how they
/// are cut in two while they run.
trait PhaseTasks: Send {
    /// The request for attempt `attempt` of task `t`, leaving out the records at `skip`.
    fn request(&self, t: usize, attempt: u32, skip: Vec<u64>) -> JobRequest;
    /// Where task `t` ends now (cuts move it).
    fn end(&self, _t: usize) -> u64 {
        u64::MAX
    }
    /// Where task `t` may be cut.
    fn edges(&self, _t: usize) -> Vec<u64> {
        Vec::new()
    }
    /// Cuts task `t` at input offset `at`: the rest, as the scheduler takes it, or `None` if
    /// `at` is not a place it may be cut.
    fn cut(&mut self, _t: usize, _at: u64) -> Option<Rest> {
        None
    }
}

/// The reduce tasks of a round: a request per partition.
struct Reduces<F>(F);

impl<F: Fn(usize, u32) -> JobRequest + Send> PhaseTasks for Reduces<F> {
    fn request(&self, r: usize, attempt: u32, _skip: Vec<u64>) -> JobRequest {
        (self.0)(r, attempt)
    }
}

/// The map tasks of a job, as planned and as cut since.
struct Maps<'a> {
    /// The encoded spec.
    spec: &'a [u8],
    split: u64,
    run_chunk: u32,
    maps: &'a mut Vec<PlannedMap>,
    bytes: &'a mut Vec<u64>,
    local: &'a mut Vec<Vec<(usize, u64)>>,
}

impl PhaseTasks for Maps<'_> {
    fn request(&self, t: usize, attempt: u32, skip: Vec<u64>) -> JobRequest {
        let m = &self.maps[t];
        JobRequest::Map(MapTask {
            spec: self.spec.to_vec(),
            task: t as u32,
            input: m.input,
            start: m.start,
            end: m.end,
            split: self.split,
            attempt,
            skip,
            run_chunk: self.run_chunk,
        })
    }

    fn end(&self, t: usize) -> u64 {
        self.maps[t].end
    }

    fn edges(&self, t: usize) -> Vec<u64> {
        plan::cut_edges(&self.maps[t])
    }

    fn cut(&mut self, t: usize, at: u64) -> Option<Rest> {
        let rest = plan::cut_map(&mut self.maps[t], at)?;
        let (kept, bytes) = (at - self.maps[t].start, rest.end - at);
        let local = plan::cut_locality(&mut self.local[t], kept, bytes);
        self.maps.push(rest);
        self.bytes[t] = kept;
        self.bytes.push(bytes);
        self.local.push(local.clone());
        Some(Rest { kept, bytes, local })
    }
}

/// How long the phase's loop may sleep with nothing happening: it looks again now and then
/// (delay scheduling's waits run out), and when a task may first be asked to cut.
fn wake_in(state: &PhaseState<'_>) -> Duration {
    let most = LOCALITY_DELAY / 3;
    state.next_wake().map_or(most, |at| {
        at.saturating_duration_since(Instant::now()).min(most)
    })
}

/// Cuts task `t` at `at` in the plan and in the phase; says whether `at` is a place it may
/// be cut.
fn cut_task(state: &mut PhaseState<'_>, tasks: &mut dyn PhaseTasks, t: usize, at: u64) -> bool {
    let Some(rest) = tasks.cut(t, at) else {
        return false;
    };
    state.cut(t, at, rest, Instant::now());
    true
}

/// What a map task's answer means once cuts are taken into account: an attempt started with
/// `end` of task `t` that now ends at `tasks.end(t)`. An output that stops short of that end
/// was cut (the cut's answer may not have come, or come first): the rest becomes a task. One
/// that covers more was started before a cut and covers the rest too: it runs again.
fn after_cuts(
    state: &mut PhaseState<'_>,
    tasks: &mut dyn PhaseTasks,
    (t, end): (usize, u64),
    result: Result<JobResponse, String>,
) -> Result<JobResponse, String> {
    let Ok(JobResponse::MapDone(out)) = result else {
        return result;
    };
    if state.is_complete(t) {
        return Ok(JobResponse::MapDone(out));
    }
    let now = tasks.end(t);
    match out.cut {
        Some(cut) if cut >= end => Ok(JobResponse::Failed(format!(
            "its output ends at input offset {cut}, not before the task's end {end}"
        ))),
        Some(cut) if cut < now => match cut_task(state, tasks, t, cut) {
            true => Ok(JobResponse::MapDone(out)),
            false => Ok(JobResponse::Failed(format!(
                "its output ends at input offset {cut}, where the task may not be cut"
            ))),
        },
        Some(cut) if cut > now => Ok(JobResponse::busy()),
        None if end > now => Ok(JobResponse::busy()),
        _ => Ok(JobResponse::MapDone(out)),
    }
}

/// The leaves of the file at `root`, in order, with their sizes and placement groups
/// (fetching inner nodes only).
pub async fn leaves(fetcher: &Fetcher, root: Cid) -> Result<Vec<Leaf>, RemoteError> {
    let mut out = Vec::new();
    // Depth-first, children pushed in reverse so they pop in order; the depth is capped as the
    // reader caps it.
    let mut stack = vec![(root, None::<u64>, 0usize, root)];
    while let Some((cid, size, depth, group)) = stack.pop() {
        if depth > unixfs::MAX_DEPTH {
            return Err(UnixFsError::TooDeep { cid }.into());
        }
        if cid.codec() == RAW {
            let len = match size {
                Some(len) => len,
                None => fetcher.fetch(cid).await?.len() as u64,
            };
            out.push(Leaf { cid, len, group });
            continue;
        }
        let block = fetcher.fetch(cid).await?;
        let node = PbNode::decode(block.data()).map_err(UnixFsError::from)?;
        let malformed = |what| UnixFsError::Malformed { cid, what };
        let data = UnixFsData::decode(node.data.ok_or(malformed("node without Data"))?)
            .map_err(|_| malformed("bad UnixFS Data"))?;
        if data.kind != unixfs::NodeType::File && data.kind != unixfs::NodeType::Raw {
            return Err(UnixFsError::NotAFile {
                cid,
                kind: "not a file",
            }
            .into());
        }
        if node.links.is_empty() {
            // Inline data (dag-pb leaves of older files): read it whole through the reader.
            let len = data.data.map_or(0, |d| d.len() as u64);
            out.push(Leaf { cid, len, group });
            continue;
        }
        if data.blocksizes.len() != node.links.len() {
            return Err(malformed("blocksizes do not match links").into());
        }
        let first = node.links.first().map(|l| l.hash);
        for (link, &len) in node.links.iter().zip(&data.blocksizes).rev() {
            let group = unixfs::group_of(&link.hash, first);
            stack.push((link.hash, Some(len), depth + 1, group));
        }
    }
    Ok(out)
}
