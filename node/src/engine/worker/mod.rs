//! The worker half of a daemon: runs the map and reduce tasks a coordinator sends over the job
//! protocol, on the blocks at hand.
//!
//! A map task reads its byte range of an input file through the [`Fetcher`] (local store first,
//! then the peers that hold the rest), cuts it into records by the rule in
//! `p2pmr_protocol::records`, runs the job's wasm over them and keeps the R sorted runs it
//! produces as UnixFS files in the local store: the reducers pull them from here. A reduce task
//! streams its partition's runs from every mapper ([`crate::engine::worker::shuffle`]), reduces them and writes
//! the output as a durable UnixFS file, copied to other daemons before it is reported.
//!
//! At most `slots` tasks run at once (a semaphore); a coordinator learns the count with
//! `Slots`. Tasks of a job can be aborted (`Abort`); every task runs in its own tokio task so
//! aborting drops its fetches.

mod memo;
pub mod shuffle;

use self::memo::Memo;
use self::shuffle::{MissingRuns, ShuffleError};
use crate::blocks::RemoteError;
use crate::blocks::{self, Chunk, Fetcher};
use crate::engine::access::JobAccess;
use crate::engine::runtime::JobError;
use crate::engine::runtime::{Executor, JobModule, Limits, TaskName};
use crate::net::NetClient;
use crate::repo::files::FileError;
use crate::repo::files::FileWriter;
use crate::repo::store::{StoreError, StoreStats};
use crate::tasks::Tasks;
use crate::Repo;
use libp2p::PeerId;
use p2pmr_protocol::engine::{
    Counters, DaemonStatus, FinishedTask, JobRequest, JobResponse, MapOutput, MapTask, MemoHit,
    PartOut, ReduceOutput, ReduceTask, TaskKind,
};
use p2pmr_protocol::job::JobSpec;
use p2pmr_protocol::memo::{MapKey, MapMemo, ReduceKey, Remembered};
use p2pmr_protocol::records::{without_records, RecordSplitter};
use p2pmr_protocol::Cid;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Semaphore;

/// Records are handed to the job in batches of about this many bytes.
const BATCH: usize = 1 << 20;
/// Largest job module accepted.
pub const MAX_MODULE_SIZE: u64 = 64 << 20;
/// Block fetches in flight per reduce task during the shuffle.
const SHUFFLE_CONCURRENCY: usize = 16;
/// Input chunks fetched from the network buffered ahead of a map task (the blocks its daemon
/// holds are read on the task's own thread, unbuffered).
const MAP_BUFFER: usize = 4;
/// Jobs whose finished tasks a worker remembers.
const FINISHED_JOBS: usize = 64;
/// Finished tasks remembered per job, in (over-estimated) encoded bytes: the answer must
/// stay under the 4 MiB message limit.
const FINISHED_BYTES: usize = 2 << 20;
/// Bytes of remembered outputs one `Memo` answer carries at most (estimated as for
/// [`FINISHED_BYTES`]); coordinators ask for a few hundred keys at a time.
const MEMO_ANSWER_BYTES: usize = 2 << 20;
/// Default budget of the task memo (the bytes of the runs and outputs it names).
pub const DEFAULT_MEMO_BYTES: u64 = 2 << 30;

/// A running task of a job: map or reduce, its number, how to stop it.
type RunningTask = (TaskKind, u32, tokio::task::AbortHandle);

/// How long a [`JobRequest::SplitTask`] waits for its map task's read loop to take it (the
/// loop looks between two pieces of input, so only a stalled read makes it wait this long).
const SPLIT_WAIT: Duration = Duration::from_secs(2);

/// A request to cut a running map task: the candidate cuts, and where the answer goes (the
/// cut made, or `None`).
type CutRequest = (Vec<u64>, tokio::sync::oneshot::Sender<Option<u64>>);

/// Where a running map task takes [`JobRequest::SplitTask`]s: a request waits here until the
/// task's read loop, between two pieces of input, cuts its range (or cannot) and answers.
#[derive(Default)]
struct SplitDoor {
    request: Mutex<Option<CutRequest>>,
}

impl SplitDoor {
    /// Takes a waiting request, if any: cuts `splitter`'s range at the candidate
    /// [`split_point`](p2pmr_protocol::engine::split_point) and answers with it. Returns the
    /// cut made.
    fn take(&self, splitter: &mut RecordSplitter) -> Option<u64> {
        let (edges, answer) = self.request.lock().expect("poisoned").take()?;
        if answer.is_closed() {
            // Its asker gave up waiting: it is told nothing, so nothing is cut.
            return None;
        }
        let at = splitter.feed_from().max(splitter.start());
        let cut = p2pmr_protocol::engine::split_point(at, splitter.end(), &edges)
            .filter(|&cut| splitter.shorten(cut));
        let _ = answer.send(cut);
        cut
    }
}

/// Removes a map task's [`SplitDoor`] when the task ends, however it ends.
struct DoorGuard<'a> {
    doors: &'a Mutex<HashMap<(Cid, u32), Arc<SplitDoor>>>,
    key: (Cid, u32),
}

impl Drop for DoorGuard<'_> {
    fn drop(&mut self) {
        self.doors.lock().expect("poisoned").remove(&self.key);
    }
}

/// Why a task failed on this worker; its message is the reason the coordinator reports.
#[derive(Debug, Error)]
pub enum TaskError {
    /// The request does not fit its job (an input, partition or skip list it does not have).
    #[error("{0}")]
    Invalid(String),
    /// The job's module could not be fetched.
    #[error("cannot fetch job module {cid}: {source}")]
    Module {
        /// The module.
        cid: Cid,
        /// Why.
        source: RemoteError,
    },
    /// The wasm runtime refused or failed the task (load, trap, a limit).
    #[error(transparent)]
    Runtime(#[from] JobError),
    /// An input could not be read.
    #[error("cannot read input {name}: {source}")]
    Input {
        /// The input's name in the job.
        name: String,
        /// Why.
        source: RemoteError,
    },
    /// A map output could not be read while reducing.
    #[error("{0}")]
    Shuffle(String),
    /// The task's output could not be written.
    #[error(transparent)]
    Output(#[from] FileError),
    /// Writing a map run failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The output could not be copied to other daemons.
    #[error("cannot replicate the output: {0}")]
    Replicate(RemoteError),
    /// The task's thread panicked, or the worker is going away.
    #[error("{0}")]
    Aborted(String),
}

/// Why a map task failed, and the input offset of the record it was mapping if the job
/// failed on one (the coordinator may then skip that record).
#[derive(Debug)]
struct MapFailure {
    error: TaskError,
    record: Option<u64>,
}

impl<E: Into<TaskError>> From<E> for MapFailure {
    fn from(error: E) -> Self {
        Self {
            error: error.into(),
            record: None,
        }
    }
}

/// Runs tasks for coordinators. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

/// Modules compiled and started at once: each holds a thread of the blocking pool (which
/// serves block reads and writes too) for up to the job's time limit.
const MAX_LOADS: usize = 2;
/// How long a count of the store's blocks is reused for [`Worker::status`].
const HELD_FOR: Duration = Duration::from_secs(2);

struct Inner {
    repo: Repo,
    /// This daemon's replica targets: its own copies of the outputs it places count too.
    keeper: crate::blocks::keeper::Keeper,
    net: NetClient,
    exec: Arc<Executor>,
    fetcher: Fetcher,
    slots: u32,
    /// [`host_id`], sent with the slots.
    host: u64,
    permits: Arc<Semaphore>,
    running: Mutex<HashMap<Cid, Vec<RunningTask>>>,
    /// Module loads at once (see [`MAX_LOADS`]).
    loads: Semaphore,
    /// The store's last count, when it was taken, and what the store had written by then
    /// (see [`Worker::status`]).
    held: Mutex<Option<Counted>>,
    /// Modules being fetched and compiled: tasks of the same job wait for one load.
    loading: Mutex<HashMap<Cid, Arc<tokio::sync::OnceCell<Arc<JobModule>>>>>,
    /// Tasks finished here, per job, newest jobs last: what a coordinator taking over a job
    /// asks for, so work done for a coordinator that died is not done again.
    finished: Mutex<VecDeque<(Cid, Vec<FinishedTask>)>>,
    /// Where task bodies run, so stopping the daemon stops them.
    tasks: Tasks,
    /// Who may start and stop jobs on this daemon (checked by the job server; its refusals
    /// are part of the status).
    access: JobAccess,
    /// For tests of verified execution: alter one record of every map output.
    wrong_output: bool,
    /// Running map tasks' doors for cuts, by job and task.
    doors: Mutex<HashMap<(Cid, u32), Arc<SplitDoor>>>,
    /// Outputs of tasks run here, by key, for any job that runs the same task again.
    memo: Memo,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("slots", &self.inner.slots)
            .finish()
    }
}

/// A run's encoded pairs with the first pair's value altered (a `0` appended: a decimal count
/// stays a decimal, ten times too big), as a faulty worker would produce them
/// (`P2PMR_FAULT_WRONG_OUTPUT`, for tests of verified execution).
fn altered(run: &[u8]) -> Vec<u8> {
    let len = |at: usize| u32::from_le_bytes(run[at..at + 4].try_into().expect("4 bytes")) as usize;
    let klen = len(0);
    let vlen = len(4 + klen);
    let end = 8 + klen + vlen;
    let mut out = Vec::with_capacity(run.len() + 1);
    out.extend_from_slice(&run[..4 + klen]);
    out.extend_from_slice(&(vlen as u32 + 1).to_le_bytes());
    out.extend_from_slice(&run[8 + klen..end]);
    out.push(b'0');
    out.extend_from_slice(&run[end..]);
    out
}

/// Names the machine this daemon runs on, for coordinators to see which daemons share its
/// cores: a hash of the kernel's boot id (Linux's `/proc/sys/kernel/random/boot_id`, the same
/// for every process and container on one kernel, new at each boot). 0 (unknown) elsewhere.
pub(crate) fn host_id() -> u64 {
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) if !id.trim().is_empty() => {
            // Hashed, so peers learn which daemons share a machine and nothing else.
            let block = p2pmr_protocol::block::Block::raw(id.trim().as_bytes().to_vec());
            let digest = block.cid().hash().digest();
            u64::from_le_bytes(digest[..8].try_into().expect("sha2-256 has 32 bytes")).max(1)
        }
        _ => 0,
    }
}

impl Worker {
    /// A worker over `repo` and `net` running up to `slots` tasks at once; with `shared`,
    /// they are its machine's cores, which it shares with the other daemons there (it
    /// reports its machine; see [`host_id`]).
    pub(crate) fn new(
        (repo, keeper): (Repo, crate::blocks::keeper::Keeper),
        net: NetClient,
        (slots, shared): (u32, bool),
        tasks: Tasks,
        access: JobAccess,
        (memo_bytes, wrong_output): (u64, bool),
    ) -> Result<Self, crate::engine::runtime::JobError> {
        let exec = Executor::new(Limits::default())?;
        let fetcher = Fetcher::new(Some(net.clone()), Some(repo.blocks().clone()));
        let repo_home = repo.home().to_owned();
        let slots = slots.clamp(1, crate::engine::runtime::MAX_INSTANCES);
        Ok(Self {
            inner: Arc::new(Inner {
                repo,
                keeper,
                net,
                exec,
                fetcher,
                slots,
                host: if shared { host_id() } else { 0 },
                permits: Arc::new(Semaphore::new(slots as usize)),
                running: Mutex::new(HashMap::new()),
                loads: Semaphore::new(MAX_LOADS),
                held: Mutex::new(None),
                loading: Mutex::new(HashMap::new()),
                finished: Mutex::new(VecDeque::new()),
                tasks,
                access,
                wrong_output,
                doors: Mutex::new(HashMap::new()),
                memo: {
                    for old in memo::OLD_LOGS {
                        let _ = std::fs::remove_file(repo_home.join(old));
                    }
                    Memo::open(&repo_home.join(memo::LOG), memo_bytes)
                },
            }),
        })
    }

    /// Records the replica target of blocks this daemon wrote and placed copies of on others
    /// ([`Keeper::keep_own_copies`](crate::blocks::keeper::Keeper::keep_own_copies)).
    pub(crate) async fn keep_own_copies(&self, blocks: Vec<(Cid, Option<Cid>)>, target: usize) {
        self.inner.keeper.keep_own_copies(blocks, target).await;
    }

    /// Who may start and stop jobs on this daemon.
    pub fn access(&self) -> &JobAccess {
        &self.inner.access
    }

    /// Task slots.
    pub fn slots(&self) -> u32 {
        self.inner.slots
    }

    /// The fetcher tasks read through (local store first).
    pub fn fetcher(&self) -> &Fetcher {
        &self.inner.fetcher
    }

    /// The network handle.
    pub fn net(&self) -> &NetClient {
        &self.inner.net
    }

    /// The repository.
    pub fn repo(&self) -> &Repo {
        &self.inner.repo
    }

    /// Its slots, the tasks running and what its store holds.
    pub async fn status(&self) -> Result<DaemonStatus, StoreError> {
        // Counting the store lists every block; dashboards ask every few seconds, so one
        // count serves them all for a while, with the blocks written since added: placers
        // weigh daemons by what they hold, and adds a moment apart must see each other.
        let cached = *self.inner.held.lock().expect("poisoned");
        let store = self.inner.repo.blocks().clone();
        let (mut held, then) = match cached {
            Some((at, held, then)) if at.elapsed() < HELD_FOR => (held, then),
            _ => {
                let then = store.written();
                let counting = store.clone();
                let held = tokio::task::spawn_blocking(move || counting.stats())
                    .await
                    .expect("store stats panicked")?;
                *self.inner.held.lock().expect("poisoned") = Some((Instant::now(), held, then));
                (held, then)
            }
        };
        let now = store.written();
        held.blocks += now.blocks.saturating_sub(then.blocks);
        held.bytes += now.bytes.saturating_sub(then.bytes);
        let free = self.inner.permits.available_permits() as u32;
        let (memo_tasks, memo_bytes) = self.inner.memo.held();
        Ok(DaemonStatus {
            slots: self.inner.slots,
            running: self.inner.slots.saturating_sub(free),
            blocks: held.blocks,
            bytes: held.bytes,
            refusals: self.inner.access.refusals(),
            ipfs_peers: self.inner.net.bitswap_sources().len() as u32,
            memo_tasks: memo_tasks as u32,
            memo_bytes,
        })
    }

    /// Answers a worker request (`Map`, `Reduce`, `Abort`, `AbortTask`, `Slots`, `Finished`).
    pub async fn handle(&self, request: JobRequest) -> JobResponse {
        match request {
            JobRequest::Slots => JobResponse::Slots {
                slots: self.inner.slots,
                host: self.inner.host,
            },
            JobRequest::Status => match self.status().await {
                Ok(status) => JobResponse::Status(status),
                Err(e) => JobResponse::Failed(e.to_string()),
            },
            JobRequest::Abort { job } => {
                let handles = self
                    .inner
                    .running
                    .lock()
                    .expect("poisoned")
                    .remove(&job)
                    .unwrap_or_default();
                for (_, _, h) in handles {
                    h.abort();
                }
                JobResponse::Ok
            }
            JobRequest::AbortTask { job, kind, task } => {
                let mut running = self.inner.running.lock().expect("poisoned");
                if let Some(handles) = running.get_mut(&job) {
                    handles.retain(|(k, t, h)| {
                        let hit = *k == kind && *t == task;
                        if hit {
                            h.abort();
                        }
                        !hit
                    });
                }
                JobResponse::Ok
            }
            JobRequest::Map(task) => {
                let spec = match JobSpec::decode(&task.spec) {
                    Ok(spec) => spec,
                    Err(e) => return JobResponse::Failed(e.to_string()),
                };
                let (this, job) = (self.clone(), spec.id());
                let (number, input, start, end, split) =
                    (task.task, task.input, task.start, task.end, task.split);
                let response = self
                    .tracked(job, (TaskKind::Map, number), async move {
                        match this.map(spec, task).await {
                            Ok(output) => Ok(JobResponse::MapDone(output)),
                            // The coordinator may skip a record that keeps failing.
                            Err(MapFailure {
                                error,
                                record: Some(record),
                            }) => Ok(JobResponse::RecordFailed {
                                reason: error.to_string(),
                                record,
                            }),
                            Err(MapFailure { error, .. }) => Err(error),
                        }
                    })
                    .await;
                if let JobResponse::MapDone(output) = &response {
                    self.remember(
                        job,
                        FinishedTask::Map {
                            task: number,
                            input,
                            start,
                            end: output.cut.unwrap_or(end),
                            split,
                            output: output.clone(),
                        },
                    );
                }
                response
            }
            JobRequest::SplitTask { job, task, edges } => self.split(job, task, edges).await,
            JobRequest::Memo { keys } => JobResponse::Memo(self.remembered(&keys).await),
            JobRequest::Finished { job } => JobResponse::Finished(
                self.inner
                    .finished
                    .lock()
                    .expect("poisoned")
                    .iter()
                    .find(|(j, _)| *j == job)
                    .map(|(_, tasks)| tasks.clone())
                    .unwrap_or_default(),
            ),
            JobRequest::Reduce(task) => {
                let spec = match JobSpec::decode(&task.spec) {
                    Ok(spec) => spec,
                    Err(e) => return JobResponse::Failed(e.to_string()),
                };
                let (this, job) = (self.clone(), spec.id());
                let partition = task.partition;
                let response = self
                    .tracked(job, (TaskKind::Reduce, partition), async move {
                        this.reduce(spec, task).await
                    })
                    .await;
                if let JobResponse::ReduceDone(output) = &response {
                    self.remember(
                        job,
                        FinishedTask::Reduce {
                            partition,
                            output: output.clone(),
                        },
                    );
                }
                response
            }
            other => JobResponse::Failed(format!("not a worker request: {other:?}")),
        }
    }

    /// Cuts running map task `task` of `job` in two at one of `edges`, if it runs here and
    /// enough of it is left (see [`JobRequest::SplitTask`]).
    async fn split(&self, job: Cid, task: u32, edges: Vec<u64>) -> JobResponse {
        let door = self
            .inner
            .doors
            .lock()
            .expect("poisoned")
            .get(&(job, task))
            .cloned();
        let Some(door) = door else {
            return JobResponse::Failed(format!("map task {task} is not running here"));
        };
        let (answer, cut) = tokio::sync::oneshot::channel();
        *door.request.lock().expect("poisoned") = Some((edges, answer));
        match tokio::time::timeout(SPLIT_WAIT, cut).await {
            Ok(Ok(Some(at))) => JobResponse::SplitAt(at),
            Ok(Ok(None)) => JobResponse::Failed(format!(
                "too little of map task {task} is left to cut in two"
            )),
            Ok(Err(_)) => JobResponse::Failed(format!("map task {task} ended before the cut")),
            Err(_) => JobResponse::Failed(format!("map task {task} did not take the cut in time")),
        }
    }

    /// The outputs remembered under `keys` whose blocks are still here, as many as fit in an
    /// answer.
    async fn remembered(&self, keys: &[Cid]) -> Vec<MemoHit> {
        let hits = self.inner.memo.get(keys);
        if hits.is_empty() {
            return hits;
        }
        let store = self.inner.repo.blocks().clone();
        let (kept, gone) = tokio::task::spawn_blocking(move || {
            let (mut kept, mut gone, mut bytes) = (Vec::new(), Vec::new(), 0);
            for hit in hits {
                if !memo::roots_of(&hit.entry).iter().all(|c| store.has(c)) {
                    gone.push(hit);
                    continue;
                }
                bytes += match &hit.entry {
                    Remembered::Map(m) => {
                        128 + 64 * (m.output.parts.len() + m.after.len())
                            + m.named.as_ref().map_or(0, String::len)
                    }
                    Remembered::Reduce(_) => 192,
                };
                if bytes > MEMO_ANSWER_BYTES {
                    break;
                }
                kept.push(hit);
            }
            (kept, gone)
        })
        .await
        .unwrap_or_default();
        for hit in &gone {
            self.inner.memo.forget(hit.key, &hit.entry);
        }
        kept
    }

    /// Keeps a task's output in the memo, off the async threads (the memo writes its log).
    async fn remember_output(&self, key: Cid, entry: Remembered) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.inner.memo.put(key, entry)).await;
    }

    /// Records a finished task of `job` (bounded: the oldest jobs, then the oldest tasks,
    /// are forgotten first, so the answer to `Finished` always fits in a message).
    fn remember(&self, job: Cid, task: FinishedTask) {
        let mut finished = self.inner.finished.lock().expect("poisoned");
        let at = match finished.iter().position(|(j, _)| *j == job) {
            Some(at) => at,
            None => {
                if finished.len() >= FINISHED_JOBS {
                    finished.pop_front();
                }
                finished.push_back((job, Vec::new()));
                finished.len() - 1
            }
        };
        // Roughly what an entry costs on the wire: a CID and two numbers per partition.
        let parts = match &task {
            FinishedTask::Map { output, .. } => output.parts.len(),
            FinishedTask::Reduce { .. } => 1,
        };
        let most = (FINISHED_BYTES / (128 + 64 * parts)).max(1);
        let tasks = &mut finished[at].1;
        while tasks.len() >= most {
            tasks.remove(0);
        }
        tasks.push(task);
    }

    /// Runs `body` as its own task, abortable by the job's id.
    async fn tracked(
        &self,
        job: Cid,
        (kind, number): (TaskKind, u32),
        body: impl std::future::Future<Output = Result<JobResponse, TaskError>> + Send + 'static,
    ) -> JobResponse {
        let task = self.inner.tasks.spawn(body);
        {
            let mut running = self.inner.running.lock().expect("poisoned");
            let handles = running.entry(job).or_default();
            handles.retain(|(_, _, h)| !h.is_finished());
            handles.push((kind, number, task.abort_handle()));
        }
        match task.await {
            Ok(Some(Ok(response))) => response,
            Ok(Some(Err(error))) => JobResponse::Failed(error.to_string()),
            Ok(None) => JobResponse::Failed("the daemon is stopping".into()),
            Err(e) if e.is_cancelled() => JobResponse::Failed("aborted".into()),
            Err(e) => JobResponse::Failed(format!("task panicked: {e}")),
        }
    }

    /// The job's module, compiled (fetched and compiled on first use).
    pub async fn module(&self, spec: &JobSpec) -> Result<Arc<JobModule>, TaskError> {
        let cell = self
            .inner
            .loading
            .lock()
            .expect("poisoned")
            .entry(spec.module)
            .or_default()
            .clone();
        // Failures are not kept: the next task tries again, and the entry goes, so module
        // CIDs that never load (any peer can submit them) do not pile up here.
        match cell.get_or_try_init(|| self.load(spec)).await {
            Ok(module) => Ok(module.clone()),
            Err(e) => {
                let mut loading = self.inner.loading.lock().expect("poisoned");
                if loading.get(&spec.module).is_some_and(|c| c.get().is_none()) {
                    loading.remove(&spec.module);
                }
                Err(e)
            }
        }
    }

    async fn load(&self, spec: &JobSpec) -> Result<Arc<JobModule>, TaskError> {
        let cid = spec.module;
        let mut wasm = Vec::new();
        self.inner
            .fetcher
            .cat(cid, 0, |b| {
                if wasm.len() as u64 + b.len() as u64 > MAX_MODULE_SIZE {
                    return Err(std::io::Error::other(format!(
                        "module is larger than {MAX_MODULE_SIZE} bytes"
                    )));
                }
                wasm.extend_from_slice(b);
                Ok(())
            })
            .await
            .map_err(|source| TaskError::Module { cid, source })?;
        let exec = self.inner.exec.clone();
        let limits = limits_of(spec);
        // Loading runs the module's start function on the blocking pool, which the block
        // server shares: a few loads at a time, so modules that loop cannot starve it.
        let _turn = self
            .inner
            .loads
            .acquire()
            .await
            .map_err(|e| TaskError::Aborted(e.to_string()))?;
        let loaded = tokio::task::spawn_blocking(move || {
            exec.load_with(cid, &cid.to_string(), &wasm, limits)
        })
        .await
        .map_err(|e| TaskError::Aborted(e.to_string()))?;
        Ok(loaded?)
    }

    /// The job's module and a task slot (held until the task is done).
    async fn prepare(
        &self,
        spec: &JobSpec,
    ) -> Result<(Arc<JobModule>, tokio::sync::SemaphorePermit<'_>), TaskError> {
        let module = self.module(spec).await?;
        let permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|e| TaskError::Aborted(e.to_string()))?;
        Ok((module, permit))
    }

    async fn map(&self, spec: JobSpec, task: MapTask) -> Result<MapOutput, MapFailure> {
        if !p2pmr_protocol::engine::is_run_chunk(task.run_chunk) {
            let chunk = task.run_chunk;
            return Err(TaskError::Invalid(format!("a run chunk size of {chunk} bytes")).into());
        }
        if task.skip.len() > spec.skip_bad_records as usize || !task.skip.is_sorted() {
            return Err(TaskError::Invalid(format!(
                "{} records to skip, unsorted or more than the job allows ({})",
                task.skip.len(),
                spec.skip_bad_records
            ))
            .into());
        }
        let input = spec
            .inputs
            .get(task.input as usize)
            .ok_or_else(|| TaskError::Invalid(format!("the job has no input {}", task.input)))?
            .clone();
        // Open to cuts from here on; one asked for while the module loads waits for the read.
        let door = Arc::new(SplitDoor::default());
        let key = (spec.id(), task.task);
        self.inner
            .doors
            .lock()
            .expect("poisoned")
            .insert(key, door.clone());
        let _door = DoorGuard {
            doors: &self.inner.doors,
            key,
        };
        let (module, _permit) = self.prepare(&spec).await?;
        let mut splitter = RecordSplitter::new(task.start, task.end, BATCH);
        let fetcher = self.inner.fetcher.clone();
        let rt = tokio::runtime::Handle::current();
        let exec = self.inner.exec.clone();
        let store = self.inner.repo.blocks().clone();
        let name = TaskName {
            job: module.name().to_owned(),
            task: format!("map {} (attempt {})", task.task, task.attempt),
            input: input.name.clone(),
        };
        let args = spec.encoded_args();
        let limits = limits_of(&spec);
        let reducers = spec.reducers;
        let run_chunk = task.run_chunk;
        let mut wrong_output = self.inner.wrong_output;
        let start = task.start;
        // A task that left records out is not the task its key names.
        let memoised = task.skip.is_empty();
        let task_args = args.clone();
        let mapped = tokio::task::spawn_blocking(move || {
            let mut c = Counters::default();
            let mut map = exec.map_task(&module, name, &args, reducers, limits)?;
            let skip = task.skip;
            // The leaves the task read, before its range's end and past it (for its key and
            // what its memo entry depends on besides), and where the next chunk begins.
            let (mut within, mut after) = (Vec::new(), Vec::new());
            let mut at = splitter.feed_from();
            let mut cut = None;
            let mut feed =
                |map: &mut crate::engine::runtime::MapTask, offset: u64, batch: &[u8]| {
                    let (pieces, skipped) = without_records(batch, offset, &skip);
                    c.skipped_records += skipped;
                    for (offset, piece) in pieces {
                        c.input_bytes += piece.len() as u64;
                        c.input_records += records_in(piece);
                        map.batch(piece, offset).map_err(|e| MapFailure {
                            record: e.record(),
                            error: e.into(),
                        })?;
                    }
                    Ok::<(), MapFailure>(())
                };
            let read = fetcher.read_blocking(
                &rt,
                input.cid,
                splitter.feed_from(),
                MAP_BUFFER,
                |chunk: Chunk| {
                    cut = door.take(&mut splitter).or(cut);
                    if at < splitter.end() {
                        within.push(chunk.cid);
                    } else {
                        after.push(chunk.cid);
                    }
                    at += chunk.bytes.len() as u64;
                    if chunk.remote {
                        c.remote_map_bytes += chunk.bytes.len() as u64;
                    } else {
                        c.local_map_bytes += chunk.bytes.len() as u64;
                    }
                    splitter.feed(&chunk.bytes, |offset, batch| feed(&mut map, offset, batch))?;
                    Ok::<_, MapFailure>(!splitter.is_done())
                },
            )?;
            // Whether the reader delivered everything the range needed; if not, its error
            // says why.
            let complete = splitter.is_done();
            if let Some((offset, batch)) = splitter.finish() {
                feed(&mut map, offset, &batch)?;
            }
            let ended = map.finish_counted()?;
            let (parts, combined) = (ended.parts, ended.combined);
            let depends = (ended.positional, ended.named);
            if let Some((taken, given)) = combined {
                c.combine_input_records += taken;
                c.combine_output_records += given;
            }
            let mut out = Vec::with_capacity(parts.len());
            for run in parts {
                if run.is_empty() {
                    out.push(None);
                    continue;
                }
                c.map_output_records += run.len() as u64;
                c.map_output_bytes += run.bytes() as u64;
                let mut w = FileWriter::scratch(&store, run_layout(run_chunk));
                if std::mem::take(&mut wrong_output) {
                    w.write_all(&altered(&run.to_bytes()))?;
                } else {
                    run.write_to(&mut w)?;
                }
                let written = w.finish()?;
                out.push(Some(PartOut {
                    cid: written.root,
                    bytes: written.size,
                }));
            }
            let read_leaves = (within, after, depends);
            Ok::<_, MapFailure>((out, c, complete, read, read_leaves, cut))
        })
        .await
        .map_err(|e| TaskError::Aborted(format!("map task panicked: {e}")))?;
        let (parts, counters, complete, read, (within, after, (positional, named)), cut) = mapped?;
        if let (false, Err(source)) = (complete, read) {
            let name = input.name;
            return Err(TaskError::Input { name, source }.into());
        }
        let output = MapOutput {
            parts,
            counters,
            cut,
        };
        // A task cut short is not the task its key names either (whose end was planned).
        if memoised && cut.is_none() {
            let key = MapKey {
                module: spec.module,
                args: &task_args,
                reducers,
                first: start == 0,
                leaves: &within,
            }
            .key();
            let entry = MapMemo {
                output: output.clone(),
                after,
                positional: positional.then_some(start),
                named: named.then(|| input.name.clone()),
            };
            self.remember_output(key, Remembered::Map(entry)).await;
        }
        Ok(output)
    }

    async fn reduce(&self, spec: JobSpec, task: ReduceTask) -> Result<JobResponse, TaskError> {
        if task.partition >= spec.reducers {
            let partition = task.partition;
            return Err(TaskError::Invalid(format!(
                "the job has no partition {partition}"
            )));
        }
        let (module, _permit) = self.prepare(&spec).await?;
        let runs = task
            .runs
            .iter()
            .map(|r| (r.cid, PeerId::from_bytes(&r.holder).ok()))
            .collect();
        let error = ShuffleError::default();
        let missing = MissingRuns::default();
        let (streams, remote_bytes, mut fetches) = shuffle::open_runs(
            &self.inner.fetcher,
            runs,
            task.run_chunk as usize,
            SHUFFLE_CONCURRENCY,
            &error,
            &missing,
        );
        let exec = self.inner.exec.clone();
        let store = self.inner.repo.blocks().clone();
        let name = TaskName {
            job: module.name().to_owned(),
            task: format!("reduce {} (attempt {})", task.partition, task.attempt),
            input: String::new(),
        };
        let args = spec.encoded_args();
        let key_args = args.clone();
        let limits = limits_of(&spec);
        let shuffle_error = error.clone();
        let reduced = tokio::task::spawn_blocking(move || {
            let writer = Arc::new(Mutex::new(FileWriter::new(&store)));
            let merge = shuffle::merge(streams);
            // Output lines are small: buffered, the writer is locked once per buffer.
            let out = std::io::BufWriter::with_capacity(OUT_BUFFER, SharedWriter(writer.clone()));
            exec.reduce_task(&module, name, &args, limits, Box::new(merge), Box::new(out))?;
            if let Some(e) = shuffle_error.lock().expect("poisoned").take() {
                return Err(TaskError::Shuffle(e));
            }
            let writer = Arc::try_unwrap(writer)
                .map_err(|_| TaskError::Aborted("the reduce output is still in use".into()))?
                .into_inner()
                .expect("poisoned");
            Ok(writer.finish()?)
        })
        .await
        .map_err(|e| TaskError::Aborted(format!("reduce task panicked: {e}")))?;
        fetches.abort_all();
        let lost: Vec<Cid> = std::mem::take(&mut *missing.lock().expect("poisoned"));
        if !lost.is_empty() {
            // Partial output is dropped, never reported.
            return Ok(JobResponse::MissingRuns(
                task.runs
                    .into_iter()
                    .filter(|r| lost.contains(&r.cid))
                    .collect(),
            ));
        }
        let written = reduced?;
        let run_cids: Vec<Cid> = task.runs.iter().map(|r| r.cid).collect();
        let key = ReduceKey {
            module: spec.module,
            args: &key_args,
            reducers: spec.reducers,
            partition: task.partition,
            runs: &run_cids,
        }
        .key();
        let copies = task.replicas.saturating_sub(1) as usize;
        let avoid: Vec<PeerId> = task
            .avoid
            .iter()
            .filter_map(|p| PeerId::from_bytes(p).ok())
            .collect();
        // The output's leaves are placed in groups like an added file's, for the jobs that
        // read it next.
        let store = self.inner.repo.blocks().clone();
        let root = written.root;
        let groups = match copies {
            0 => HashMap::new(),
            _ => tokio::task::spawn_blocking(move || blocks::placement_groups(&store, &[root]))
                .await
                .unwrap_or_default(),
        };
        // Daemons restarting must not fail a reduce whose work is done: placing the output's
        // copies waits a while for enough of them before the task fails.
        blocks::replicate_patiently(
            &self.inner.net,
            self.inner.repo.blocks(),
            &written.cids,
            copies,
            &avoid,
            &groups,
        )
        .await
        .map_err(TaskError::Replicate)?;
        let notes = written.cids.iter().map(|c| (*c, groups.get(c).copied()));
        self.keep_own_copies(notes.collect(), copies + 1).await;
        let output = ReduceOutput {
            cid: written.root,
            size: written.size,
            tsize: written.tsize,
            counters: Counters {
                shuffle_bytes: remote_bytes.load(Ordering::Relaxed),
                reduce_output_records: written.lines,
                reduce_output_bytes: written.size,
                ..Counters::default()
            },
        };
        self.remember_output(key, Remembered::Reduce(output.clone()))
            .await;
        Ok(JobResponse::ReduceDone(output))
    }
}

/// Bytes of reduce output buffered before they go to the output file's writer.
const OUT_BUFFER: usize = 64 << 10;

/// The layout map outputs are stored in: chunks of the size the coordinator chose for the job
/// ([`p2pmr_protocol::engine::run_chunk`]; a reduce task holds about two blocks of every map
/// task's run at once, so with many map tasks the chunk size is what bounds its memory). Runs
/// are internal, so they need not be kubo's layout.
fn run_layout(chunk: u32) -> p2pmr_protocol::unixfs::Layout {
    p2pmr_protocol::unixfs::Layout::new(chunk as usize, 174).expect("a valid layout")
}

/// A count of the store: when it was taken, what it found, and the blocks and bytes the store
/// had written by then ([`BlockStore::written`](crate::repo::store::BlockStore::written)).
type Counted = (Instant, StoreStats, StoreStats);

/// Lines in a batch of whole records (the last may lack its newline at the end of input).
fn records_in(batch: &[u8]) -> u64 {
    let newlines = bytecount::count(batch, b'\n') as u64;
    newlines + u64::from(batch.last().is_some_and(|&b| b != b'\n'))
}

/// The spec's limits as the executor takes them.
pub fn limits_of(spec: &JobSpec) -> Limits {
    Limits {
        memory: usize::try_from(spec.limits.memory).unwrap_or(usize::MAX),
        timeout: Duration::from_millis(spec.limits.timeout_ms),
        output: spec.limits.output,
    }
}

/// Hands the reduce output to a writer the task gets back when the executor is done.
struct SharedWriter(Arc<Mutex<FileWriter>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("poisoned").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_a_stable_id() {
        let id = host_id();
        assert_eq!(id, host_id());
        if cfg!(target_os = "linux") {
            assert_ne!(id, 0, "no boot id");
        }
    }

    #[test]
    fn records_are_lines() {
        for (batch, n) in [
            (&b""[..], 0),
            (b"\n", 1),
            (b"a", 1),
            (b"a\n", 1),
            (b"a\nb", 2),
            (b"a\r\nb\n\n", 3),
        ] {
            assert_eq!(records_in(batch), n, "{batch:?}");
        }
    }
}
