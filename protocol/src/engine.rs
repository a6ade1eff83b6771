//! Messages of the job protocol, `/mapreduce/job/4.0.0`: what a client says to a coordinator
//! (submit, watch, list, cancel), what a coordinator says to workers (run this map or reduce
//! task, abort a job), the progress [`Event`]s watchers receive and the job [`Counters`].
//!
//! The node's network layer frames these like block messages (a 4-byte length and a postcard
//! body) under their own size limit; decoding checks the limits and parses every CID, so a
//! daemon never acts on a malformed message. Map outputs travel as blocks over the block
//! protocol; only their CIDs are named here.

use crate::block::canonical;
use crate::wire::WireError;
use crate::Cid;
use serde::{Deserialize, Serialize};

/// Protocol name of the job protocol.
pub const JOB_PROTOCOL: &str = "/mapreduce/job/4.0.0";
/// Largest job-protocol message (a reduce task names one run per map task; a spec is at most
/// 1 MiB).
pub const MAX_JOB_MESSAGE: usize = 4 << 20;
/// Most events in one watch reply; a watcher that is behind gets the rest in the next ones.
pub const MAX_EVENTS_PER_REPLY: usize = 1024;
/// Longest reason (failure message) carried.
const MAX_REASON: usize = 1024;

/// Smallest chunk size of map output runs.
pub const MIN_RUN_CHUNK: u32 = 64 << 10;
/// Largest chunk size of map output runs (the files' default chunk size).
pub const MAX_RUN_CHUNK: u32 = 256 << 10;
/// Bytes of run blocks a reduce task holds at once, at most, that [`run_chunk`] plans for: a
/// reduce holds about two blocks of every run it merges.
const RUN_BLOCKS_HELD: u64 = 8 << 20;

/// The chunk size a job's map tasks store their runs in, given how many map tasks it has: as
/// large as lets a reduce task hold two blocks of each run within a few MiB, from 64 to
/// 256 KiB, a power of two. Larger blocks move a run with fewer requests, hashes and
/// round trips; with many map tasks the smaller ones bound a reduce task's memory.
pub fn run_chunk(maps: usize) -> u32 {
    let fits = RUN_BLOCKS_HELD / (2 * maps.max(1) as u64);
    let chunk = fits.clamp(u64::from(MIN_RUN_CHUNK), u64::from(MAX_RUN_CHUNK)) as u32;
    1 << (31 - chunk.leading_zeros())
}

/// The fewest input bytes each part of a running map task keeps when it is cut in two
/// ([`JobRequest::SplitTask`]): a task costs a fixed share of CPU besides its bytes (its
/// start, and emitting, sorting and storing each of its distinct keys), so the half of a
/// smaller rest run on another core saves less time than that share costs.
pub const MIN_SPLIT_PART: u64 = 16 << 20;
/// Most candidate cut points in a [`JobRequest::SplitTask`].
pub const MAX_SPLIT_EDGES: usize = 1024;

/// Where to cut a map task that has read its input up to `at` and ends at `end`: of `edges`
/// (ascending input offsets, the task's leaf edges), the one nearest the middle of what is
/// left, leaving at least [`MIN_SPLIT_PART`] bytes to each part; `None` if none does. The
/// running task keeps `[.., cut)` and another takes `[cut, end)`.
pub fn split_point(at: u64, end: u64, edges: &[u64]) -> Option<u64> {
    let low = at.checked_add(MIN_SPLIT_PART)?;
    let high = end.checked_sub(MIN_SPLIT_PART)?;
    let middle = at + (end.saturating_sub(at)) / 2;
    edges
        .iter()
        .copied()
        .filter(|e| (low..=high).contains(e))
        .min_by_key(|e| e.abs_diff(middle))
}

/// Whether `chunk` is a run chunk size a worker takes: a power of two from
/// [`MIN_RUN_CHUNK`] to [`MAX_RUN_CHUNK`].
pub fn is_run_chunk(chunk: u32) -> bool {
    chunk.is_power_of_two() && (MIN_RUN_CHUNK..=MAX_RUN_CHUNK).contains(&chunk)
}

mod cid_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(cid: &Cid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&cid.to_bytes())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Cid, D::Error> {
        let bytes: &serde_bytes::Bytes = Deserialize::deserialize(d)?;
        Cid::try_from(&bytes[..])
            .map(|c| canonical(&c))
            .map_err(|_| serde::de::Error::custom("malformed CID"))
    }
}

/// A list of CIDs as their binary forms.
pub(crate) mod cids_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(cids: &[Cid], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            cids.iter()
                .map(|c| serde_bytes::ByteBuf::from(c.to_bytes())),
        )
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cid>, D::Error> {
        let list: Vec<&serde_bytes::Bytes> = Deserialize::deserialize(d)?;
        list.into_iter()
            .map(|bytes| {
                Cid::try_from(&bytes[..])
                    .map(|c| canonical(&c))
                    .map_err(|_| serde::de::Error::custom("malformed CID"))
            })
            .collect()
    }
}

/// Most keys in one [`JobRequest::Memo`].
pub const MAX_MEMO_KEYS: usize = 1024;

/// A request of the job protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobRequest {
    /// Client to coordinator: run this job (an encoded [`crate::job::JobSpec`]).
    Submit {
        /// The encoded spec.
        #[serde(with = "serde_bytes")]
        spec: Vec<u8>,
    },
    /// Client to coordinator: the job's events from number `from` on. Answered when there is
    /// at least one, when the job has ended, or after a few seconds with none.
    Watch {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
        /// Index of the first event wanted.
        from: u64,
    },
    /// Client to coordinator: the jobs it knows.
    List,
    /// Client to coordinator: stop a job everywhere.
    Cancel {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
    },
    /// Coordinator to worker: run a map task; answered when it has finished.
    Map(MapTask),
    /// Coordinator to worker: run a reduce task; answered when it has finished.
    Reduce(ReduceTask),
    /// Coordinator to worker: stop the job's running tasks.
    Abort {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
    },
    /// Anyone to a daemon: how many task slots it has.
    Slots,
    /// Coordinator to worker: the tasks of this job that the worker finished and still holds
    /// the output of (how a coordinator that takes over a job reuses work already done).
    Finished {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
    },
    /// Coordinator to worker: stop one task of a job (a backup copy of it finished first).
    AbortTask {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
        /// Map or reduce.
        kind: TaskKind,
        /// Task number (the partition for reduce tasks).
        task: u32,
    },
    /// Anyone to a daemon: its slots, running tasks and the blocks it holds (for dashboards).
    Status,
    /// Client to daemon: fetch the DAG at `root` from wherever it is (daemons, or IPFS nodes
    /// over Bitswap) and keep it on `replicas` daemons. Answered `Accepted` with an id whose
    /// progress is watched like a job's (`Watch`): `Fetching` events, then `Completed` with
    /// the root as its output.
    Pin {
        /// The DAG's root.
        #[serde(with = "cid_bytes")]
        root: Cid,
        /// Daemons to keep it on.
        replicas: u32,
    },
    /// Coordinator to worker: cut a running map task in two, as another daemon is idle. The
    /// worker picks the cut among `edges` ([`split_point`]) ahead of what it has read, ends
    /// the task there and answers [`JobResponse::SplitAt`]; the coordinator runs the rest as
    /// a new task. Refused (`Failed`) when the task is not running here or too little is left.
    SplitTask {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
        /// The map task.
        task: u32,
        /// Candidate cuts: input offsets inside the task's range, ascending, at most
        /// [`MAX_SPLIT_EDGES`].
        edges: Vec<u64>,
    },
    /// Coordinator to worker: the task outputs it remembers under these keys
    /// ([`crate::memo`]), whichever job made them. Answered [`JobResponse::Memo`].
    Memo {
        /// The keys, at most [`MAX_MEMO_KEYS`].
        #[serde(with = "cids_bytes")]
        keys: Vec<Cid>,
    },
}

/// A task a worker finished, as it answers [`JobRequest::Finished`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishedTask {
    /// A map task: which range it covered, and its output (held by the answering worker).
    Map {
        /// Task number.
        task: u32,
        /// Index of the input in the spec.
        input: u32,
        /// First byte of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// The split size the job's tasks were planned with.
        split: u64,
        /// What it produced.
        output: MapOutput,
    },
    /// A reduce task: its partition's output file, stored and replicated.
    Reduce {
        /// The partition.
        partition: u32,
        /// What it produced.
        output: ReduceOutput,
    },
}

/// A map task: the records that start in `[start, end)` of one input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapTask {
    /// The encoded job spec (the worker checks it decodes to a valid spec).
    #[serde(with = "serde_bytes")]
    pub spec: Vec<u8>,
    /// Task number.
    pub task: u32,
    /// Index of the input in the spec.
    pub input: u32,
    /// First byte of the range.
    pub start: u64,
    /// End of the range (exclusive).
    pub end: u64,
    /// The split size the coordinator planned the job's tasks with (the worker reports it
    /// with the finished task, so a coordinator taking over plans the same ranges).
    pub split: u64,
    /// Attempt number (1 for the first).
    pub attempt: u32,
    /// Input offsets of records to leave out: each failed the task more than once (the
    /// spec's `skip_bad_records` allows it; at most that many).
    pub skip: Vec<u64>,
    /// The chunk size to store the task's runs in ([`run_chunk`]).
    pub run_chunk: u32,
}

/// One map task's output for one partition, held by the mapper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRef {
    /// The run's root CID (a UnixFS file of ABI-encoded pairs, sorted by key).
    #[serde(with = "cid_bytes")]
    pub cid: Cid,
    /// The mapper's peer id (binary), which holds it.
    #[serde(with = "serde_bytes")]
    pub holder: Vec<u8>,
}

/// A reduce task: merge the runs of one partition, reduce, store the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReduceTask {
    /// The encoded job spec.
    #[serde(with = "serde_bytes")]
    pub spec: Vec<u8>,
    /// The partition.
    pub partition: u32,
    /// The partition's run from every map task that emitted to it, in task order.
    pub runs: Vec<RunRef>,
    /// Copies of the output to keep on distinct daemons.
    pub replicas: u32,
    /// Daemons (binary peer ids) the coordinator has given up on: not to be used for copies.
    pub avoid: Vec<Vec<u8>>,
    /// Attempt number (1 for the first).
    pub attempt: u32,
    /// The chunk size the job's map tasks were told to store runs in (what the reduce sizes
    /// its read-ahead by).
    pub run_chunk: u32,
}

/// A response of the job protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobResponse {
    /// The job is accepted (or was already known) under this id.
    Accepted {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
    },
    /// Events `from..next` of a job.
    Events {
        /// The events.
        events: Vec<Event>,
        /// When the coordinator recorded each event, in milliseconds since the Unix epoch by
        /// its clock (one per event).
        times: Vec<u64>,
        /// Index of the event after the last one here.
        next: u64,
        /// The job has ended and no events follow.
        done: bool,
    },
    /// The jobs a coordinator knows.
    Jobs(Vec<JobSummary>),
    /// Done (cancel, abort).
    Ok,
    /// A map task finished.
    MapDone(MapOutput),
    /// A reduce task finished.
    ReduceDone(ReduceOutput),
    /// A reduce task could not fetch these map outputs (their holder is gone): the
    /// coordinator re-runs the map tasks that made them and tries the reduce again.
    MissingRuns(Vec<RunRef>),
    /// The daemon's task slots, and the machine it runs on.
    Slots {
        /// Tasks it runs at once.
        slots: u32,
        /// Names the machine (the running kernel) without revealing it; 0 when unknown.
        /// Daemons that report the same one share its cores.
        host: u64,
    },
    /// The tasks of a job the worker finished (see [`JobRequest::Finished`]).
    Finished(Vec<FinishedTask>),
    /// The request failed or was refused; the reason is for humans.
    Failed(String),
    /// A map task failed by itself (trap, time or memory limit) while mapping the record
    /// that starts at input offset `record`.
    RecordFailed {
        /// Why, for humans.
        reason: String,
        /// The record's input offset.
        record: u64,
    },
    /// What a daemon holds and runs (see [`JobRequest::Status`]).
    Status(DaemonStatus),
    /// The outputs a worker remembers under the keys asked for (see [`JobRequest::Memo`]);
    /// keys it does not know are left out.
    Memo(Vec<MemoHit>),
    /// The map task now ends at this input offset (see [`JobRequest::SplitTask`]).
    SplitAt(u64),
}

/// A task output a worker remembers, and its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoHit {
    /// The task's key.
    #[serde(with = "cid_bytes")]
    pub key: Cid,
    /// What it produced.
    pub entry: crate::memo::Remembered,
}

/// A daemon's load and holdings, as it answers [`JobRequest::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Tasks it runs at once.
    pub slots: u32,
    /// Tasks running now.
    pub running: u32,
    /// Blocks in its store.
    pub blocks: u64,
    /// Bytes of those blocks.
    pub bytes: u64,
    /// The latest peers refused permission to start or stop jobs here, oldest first.
    pub refusals: Vec<Refusal>,
    /// IPFS nodes it is connected to (peers it can fetch from over Bitswap).
    pub ipfs_peers: u32,
    /// Task outputs its worker remembers for later jobs ([`crate::memo`]).
    pub memo_tasks: u32,
    /// The bytes those outputs name.
    pub memo_bytes: u64,
}

/// A peer turned away by a daemon's job access policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The peer.
    pub peer: String,
    /// When, in milliseconds since the Unix epoch (the daemon's clock).
    pub at_ms: u64,
    /// What it asked for (`submit`, `cancel`, `run tasks of`).
    pub what: String,
}

/// What a map task produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapOutput {
    /// One entry per partition: the run's CID, or `None` when the task emitted nothing to it.
    pub parts: Vec<Option<PartOut>>,
    /// The task's counters.
    pub counters: Counters,
    /// Where its range ended, when the coordinator cut the task short while it ran
    /// ([`JobRequest::SplitTask`]); `None` when it ran to the end it was given.
    pub cut: Option<u64>,
}

/// One partition's run of a map task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOut {
    /// Root CID of the run.
    #[serde(with = "cid_bytes")]
    pub cid: Cid,
    /// Encoded bytes.
    pub bytes: u64,
}

/// What a reduce task produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReduceOutput {
    /// Root CID of the partition's output file.
    #[serde(with = "cid_bytes")]
    pub cid: Cid,
    /// Its size in bytes.
    pub size: u64,
    /// Cumulative size of its blocks (the directory link's `Tsize`).
    pub tsize: u64,
    /// The task's counters.
    pub counters: Counters,
}

/// Job counters, summed over tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Input records (lines) mapped.
    pub input_records: u64,
    /// Input bytes mapped (the records' bytes).
    pub input_bytes: u64,
    /// Pairs the map tasks handed over (after combining).
    pub map_output_records: u64,
    /// Bytes of those pairs as stored for the shuffle.
    pub map_output_bytes: u64,
    /// Pairs the jobs' combiners took in.
    pub combine_input_records: u64,
    /// Pairs the jobs' combiners gave out.
    pub combine_output_records: u64,
    /// Map output bytes the reducers fetched from other peers.
    pub shuffle_bytes: u64,
    /// Lines the reduce tasks wrote.
    pub reduce_output_records: u64,
    /// Bytes the reduce tasks wrote.
    pub reduce_output_bytes: u64,
    /// Map input bytes read from the mapper's own store.
    pub local_map_bytes: u64,
    /// Map input bytes fetched from other peers.
    pub remote_map_bytes: u64,
    /// Map task attempts started.
    pub map_attempts: u64,
    /// Reduce task attempts started.
    pub reduce_attempts: u64,
    /// Bad records left out (`--skip-bad-records`).
    pub skipped_records: u64,
}

impl Counters {
    /// Adds `other` to these counters.
    pub fn add(&mut self, other: &Counters) {
        self.input_records += other.input_records;
        self.input_bytes += other.input_bytes;
        self.map_output_records += other.map_output_records;
        self.map_output_bytes += other.map_output_bytes;
        self.combine_input_records += other.combine_input_records;
        self.combine_output_records += other.combine_output_records;
        self.shuffle_bytes += other.shuffle_bytes;
        self.reduce_output_records += other.reduce_output_records;
        self.reduce_output_bytes += other.reduce_output_bytes;
        self.local_map_bytes += other.local_map_bytes;
        self.remote_map_bytes += other.remote_map_bytes;
        self.map_attempts += other.map_attempts;
        self.reduce_attempts += other.reduce_attempts;
        self.skipped_records += other.skipped_records;
    }
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Being planned or run.
    Running,
    /// Finished; the output is complete and replicated.
    Succeeded {
        /// The output directory's CID.
        #[serde(with = "cid_bytes")]
        output: Cid,
    },
    /// Failed for the reason given.
    Failed(String),
    /// Cancelled by a client.
    Cancelled,
}

/// A job as `p2pmr jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job id.
    #[serde(with = "cid_bytes")]
    pub job: Cid,
    /// Its state.
    pub state: JobState,
    /// Map tasks finished and planned.
    pub maps: (u32, u32),
    /// Reduce tasks finished and planned.
    pub reduces: (u32, u32),
    /// Milliseconds since it was accepted (until it ended).
    pub elapsed_ms: u64,
    /// The counters so far.
    pub counters: Counters,
}

/// The phases of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Map tasks run.
    Map,
    /// Reduce tasks run.
    Reduce,
    /// The output directory is stored and replicated.
    Store,
    /// Inputs no daemon holds are fetched from IPFS nodes and stored (also a pin's one phase).
    Fetch,
}

/// Map or reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskKind {
    /// A map task.
    Map,
    /// A reduce task.
    Reduce,
}

impl TaskKind {
    /// `map` or `reduce`, as messages and JSON events name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Map => "map",
            Self::Reduce => "reduce",
        }
    }
}

/// A progress event. Peers are named by their base58 peer id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The coordinator accepted the job.
    Accepted {
        /// The job id.
        #[serde(with = "cid_bytes")]
        job: Cid,
        /// The coordinator.
        coordinator: String,
    },
    /// The tasks are planned.
    Planned {
        /// Map tasks.
        maps: u32,
        /// Reduce tasks.
        reduces: u32,
        /// Input bytes.
        input_bytes: u64,
        /// Daemons that will run tasks.
        workers: u32,
    },
    /// Tasks whose outputs exist already and are reused, not run again: finished for a
    /// previous coordinator of this job (this one took over), or remembered by the workers
    /// from any job that ran the same task on the same bytes ([`crate::memo`]).
    Reused {
        /// Map tasks reused.
        maps: u32,
        /// Reduce tasks reused.
        reduces: u32,
        /// Input bytes the reused map tasks cover.
        input_bytes: u64,
        /// From the workers' memo (else from a previous coordinator of the job).
        memo: bool,
    },
    /// A phase began.
    Phase(Phase),
    /// A task attempt started on a peer.
    TaskStarted {
        /// Map or reduce.
        kind: TaskKind,
        /// Task number (the partition for reduce tasks).
        task: u32,
        /// Attempt number.
        attempt: u32,
        /// The worker.
        peer: String,
        /// For a map task: the share of its input the worker holds, in percent.
        local_percent: u8,
    },
    /// A task has run much longer than its phase's others: an idle peer runs a backup copy of
    /// it; whichever copy finishes first is used, and the other is stopped.
    Backup {
        /// Map or reduce.
        kind: TaskKind,
        /// Task number.
        task: u32,
        /// The peer running the slow copy.
        slow: String,
        /// The peer running the backup.
        peer: String,
    },
    /// A map task was cut in two while it ran, as a daemon was idle near the end of the map
    /// phase: it now ends at input offset `at`, and task `rest` takes the range from there.
    Split {
        /// The task cut short.
        task: u32,
        /// Where it now ends.
        at: u64,
        /// The new task.
        rest: u32,
    },
    /// Verified execution (`JobSpec::verify`): the daemons that ran a task did not all produce
    /// the same output. The majority's output is used; the `dissent` daemons are excluded from
    /// the rest of the job.
    VerifyMismatch {
        /// Map or reduce.
        kind: TaskKind,
        /// Task number.
        task: u32,
        /// The daemons whose outputs agreed, and were used.
        agreed: Vec<String>,
        /// The daemons whose outputs differed.
        dissent: Vec<String>,
    },
    /// A task attempt finished.
    TaskFinished {
        /// Map or reduce.
        kind: TaskKind,
        /// Task number.
        task: u32,
        /// The worker.
        peer: String,
        /// Input bytes it processed.
        bytes: u64,
        /// Wall time in milliseconds.
        millis: u64,
    },
    /// A task attempt failed.
    TaskFailed {
        /// Map or reduce.
        kind: TaskKind,
        /// Task number.
        task: u32,
        /// The worker.
        peer: String,
        /// Why.
        reason: String,
        /// Whether the task will be tried again.
        retry: bool,
    },
    /// The job succeeded.
    Completed {
        /// The output directory's CID.
        #[serde(with = "cid_bytes")]
        output: Cid,
        /// The counters.
        counters: Counters,
        /// Milliseconds from acceptance to completion (0 when answered from a previous run).
        elapsed_ms: u64,
        /// The output came from a previous run of the same job.
        cached: bool,
    },
    /// The job failed.
    Failed {
        /// Why.
        reason: String,
    },
    /// The job was cancelled.
    Cancelled,
    /// Progress of the fetch phase: blocks and bytes fetched so far (of a DAG whose size is
    /// learnt as it is walked), how many came from IPFS nodes over Bitswap, and how many
    /// wants had to be sent again for want of an answer.
    Fetching {
        /// The DAG being fetched.
        #[serde(with = "cid_bytes")]
        root: Cid,
        /// Blocks fetched.
        blocks: u64,
        /// Bytes fetched.
        bytes: u64,
        /// Blocks that came from IPFS nodes.
        from_ipfs: u64,
        /// Wants sent again after a timeout.
        retries: u64,
        /// Whether the whole DAG is fetched.
        done: bool,
    },
}

impl Event {
    /// Whether no events follow this one.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Completed { .. } | Self::Failed { .. } | Self::Cancelled
        )
    }
}

fn cut(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("in-memory encoding of plain data cannot fail")
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_JOB_MESSAGE {
        return Err(WireError::TooLarge {
            what: "job message",
            size: bytes.len(),
            limit: MAX_JOB_MESSAGE,
        });
    }
    postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

impl JobRequest {
    /// Encodes the request (without framing).
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a request, enforcing the size limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let request: Self = decode(bytes)?;
        if let Self::Map(MapTask { run_chunk, .. }) | Self::Reduce(ReduceTask { run_chunk, .. }) =
            &request
        {
            if !is_run_chunk(*run_chunk) {
                return Err(WireError::Malformed(format!(
                    "a run chunk size of {run_chunk} bytes"
                )));
            }
        }
        if let Self::SplitTask { edges, .. } = &request {
            if edges.len() > MAX_SPLIT_EDGES {
                return Err(WireError::TooLarge {
                    what: "split edge list",
                    size: edges.len(),
                    limit: MAX_SPLIT_EDGES,
                });
            }
            if !edges.is_sorted() {
                return Err(WireError::Malformed("split edges out of order".into()));
            }
        }
        if let Self::Memo { keys } = &request {
            if keys.len() > MAX_MEMO_KEYS {
                return Err(WireError::TooLarge {
                    what: "memo key list",
                    size: keys.len(),
                    limit: MAX_MEMO_KEYS,
                });
            }
        }
        Ok(request)
    }
}

impl JobResponse {
    /// The [`BUSY`](crate::wire::BUSY) refusal: the peer is too loaded now; retry after a
    /// pause.
    pub fn busy() -> Self {
        Self::Failed(crate::wire::BUSY.into())
    }

    /// Whether this is the [`BUSY`](crate::wire::BUSY) refusal.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Failed(r) if r == crate::wire::BUSY)
    }

    /// Encodes the response (without framing); failure reasons are cut to 1 KiB.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Failed(reason) if reason.len() > MAX_REASON => encode(&Self::Failed(cut(reason))),
            Self::RecordFailed { reason, record } if reason.len() > MAX_REASON => {
                encode(&Self::RecordFailed {
                    reason: cut(reason),
                    record: *record,
                })
            }
            _ => encode(self),
        }
    }

    /// Decodes a response, enforcing the size limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let response: Self = decode(bytes)?;
        if let Self::Events { events, times, .. } = &response {
            if events.len() > MAX_EVENTS_PER_REPLY {
                return Err(WireError::TooLarge {
                    what: "event list",
                    size: events.len(),
                    limit: MAX_EVENTS_PER_REPLY,
                });
            }
            if times.len() != events.len() {
                return Err(WireError::Malformed(format!(
                    "{} event times for {} events",
                    times.len(),
                    events.len()
                )));
            }
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Block;

    fn cid(n: u8) -> Cid {
        *Block::raw(vec![n]).cid()
    }

    fn samples() -> (Vec<JobRequest>, Vec<JobResponse>) {
        let requests = vec![
            JobRequest::Submit { spec: vec![1, 2] },
            JobRequest::Watch {
                job: cid(1),
                from: 7,
            },
            JobRequest::List,
            JobRequest::Cancel { job: cid(2) },
            JobRequest::AbortTask {
                job: cid(2),
                kind: TaskKind::Reduce,
                task: 3,
            },
            JobRequest::Map(MapTask {
                spec: vec![3],
                task: 4,
                input: 0,
                start: 262_144,
                end: 524_288,
                split: 262_144,
                attempt: 1,
                skip: vec![300_000],
                run_chunk: 128 << 10,
            }),
            JobRequest::Reduce(ReduceTask {
                spec: vec![3],
                partition: 2,
                runs: vec![RunRef {
                    cid: cid(3),
                    holder: vec![0, 1, 2],
                }],
                replicas: 2,
                avoid: vec![vec![9; 38]],
                attempt: 1,
                run_chunk: 64 << 10,
            }),
            JobRequest::Abort { job: cid(4) },
            JobRequest::Slots,
            JobRequest::Status,
            JobRequest::Pin {
                root: cid(5),
                replicas: 2,
            },
            JobRequest::SplitTask {
                job: cid(3),
                task: 4,
                edges: vec![1 << 20, 2 << 20],
            },
            JobRequest::Memo {
                keys: vec![cid(6), cid(7)],
            },
        ];
        let counters = Counters {
            input_records: 5,
            map_attempts: 2,
            ..Counters::default()
        };
        let responses = vec![
            JobResponse::Accepted { job: cid(1) },
            JobResponse::Events {
                events: vec![
                    Event::Accepted {
                        job: cid(1),
                        coordinator: "12D3".into(),
                    },
                    Event::Phase(Phase::Reduce),
                    Event::TaskFailed {
                        kind: TaskKind::Map,
                        task: 1,
                        peer: "p".into(),
                        reason: "trap".into(),
                        retry: false,
                    },
                    Event::Completed {
                        output: cid(9),
                        counters,
                        elapsed_ms: 12,
                        cached: false,
                    },
                    Event::Reused {
                        maps: 3,
                        reduces: 1,
                        input_bytes: 1 << 30,
                        memo: true,
                    },
                    Event::Phase(Phase::Fetch),
                    Event::Fetching {
                        root: cid(3),
                        blocks: 7,
                        bytes: 1 << 20,
                        from_ipfs: 6,
                        retries: 1,
                        done: false,
                    },
                ],
                times: vec![1, 2, 3, 4, 5, 6, 7],
                next: 6,
                done: true,
            },
            JobResponse::Jobs(vec![JobSummary {
                job: cid(1),
                state: JobState::Succeeded { output: cid(2) },
                maps: (3, 3),
                reduces: (1, 2),
                elapsed_ms: 5,
                counters,
            }]),
            JobResponse::Ok,
            JobResponse::MapDone(MapOutput {
                parts: vec![
                    None,
                    Some(PartOut {
                        cid: cid(5),
                        bytes: 10,
                    }),
                ],
                counters,
                cut: None,
            }),
            JobResponse::ReduceDone(ReduceOutput {
                cid: cid(6),
                size: 1,
                tsize: 1,
                counters,
            }),
            JobResponse::Slots {
                slots: 2,
                host: 0x5eed,
            },
            JobResponse::Status(DaemonStatus {
                slots: 2,
                running: 1,
                blocks: 4096,
                bytes: 1 << 30,
                ipfs_peers: 1,
                memo_tasks: 3,
                memo_bytes: 1 << 20,
                refusals: vec![Refusal {
                    peer: "12D3".into(),
                    at_ms: 1,
                    what: "submit".into(),
                }],
            }),
            JobResponse::SplitAt(5 << 20),
            JobResponse::Memo(vec![
                MemoHit {
                    key: cid(8),
                    entry: crate::memo::Remembered::Map(crate::memo::MapMemo {
                        output: MapOutput {
                            parts: vec![
                                None,
                                Some(PartOut {
                                    cid: cid(3),
                                    bytes: 9,
                                }),
                            ],
                            counters,
                            cut: None,
                        },
                        after: vec![cid(4), cid(5)],
                        positional: Some(1 << 20),
                        named: Some("corpus".into()),
                    }),
                },
                MemoHit {
                    key: cid(9),
                    entry: crate::memo::Remembered::Reduce(ReduceOutput {
                        cid: cid(6),
                        size: 10,
                        tsize: 20,
                        counters,
                    }),
                },
            ]),
            JobResponse::Finished(vec![
                FinishedTask::Map {
                    task: 1,
                    input: 0,
                    start: 0,
                    end: 4 << 20,
                    split: 4 << 20,
                    output: MapOutput {
                        parts: vec![None],
                        counters,
                        cut: None,
                    },
                },
                FinishedTask::Reduce {
                    partition: 0,
                    output: ReduceOutput {
                        cid: cid(8),
                        size: 1,
                        tsize: 1,
                        counters,
                    },
                },
            ]),
            JobResponse::MissingRuns(vec![RunRef {
                cid: cid(7),
                holder: vec![],
            }]),
            JobResponse::Failed("no".into()),
            JobResponse::RecordFailed {
                reason: "trap".into(),
                record: 7,
            },
        ];
        (requests, responses)
    }

    #[test]
    fn messages_round_trip() {
        let (requests, responses) = samples();
        for r in requests {
            assert_eq!(JobRequest::decode(&r.encode()).unwrap(), r);
        }
        for r in responses {
            assert_eq!(JobResponse::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn a_running_task_is_cut_at_the_edge_nearest_the_middle_of_what_is_left() {
        const M: u64 = MIN_SPLIT_PART;
        let edges: Vec<u64> = (1..40).map(|k| k * M / 4).collect();
        // (read up to, end, cut): what is left is split in two near its middle, on an edge.
        for (at, end, want) in [
            (0, 10 * M, Some(5 * M)),
            (2 * M, 10 * M, Some(6 * M)),
            (M / 8, 4 * M, Some(2 * M)),
            // Each part keeps at least MIN_SPLIT_PART.
            (8 * M, 10 * M, Some(9 * M)),
            (8 * M + 1, 10 * M, None),
            (0, 2 * M - 1, None),
            (9 * M, 10 * M, None),
            (10 * M, 10 * M, None),
        ] {
            assert_eq!(split_point(at, end, &edges), want, "{at} {end}");
        }
        assert_eq!(split_point(0, 10 * M, &[]), None);
        assert_eq!(split_point(0, 10 * M, &[M / 2, 9 * M + 1]), None);
        assert_eq!(split_point(u64::MAX - 1, u64::MAX, &edges), None);
    }

    #[test]
    fn limits_and_hostile_bytes() {
        assert!(matches!(
            JobRequest::decode(&vec![0; MAX_JOB_MESSAGE + 1]),
            Err(WireError::TooLarge { .. })
        ));
        let edges = |edges: Vec<u64>| JobRequest::SplitTask {
            job: cid(1),
            task: 0,
            edges,
        };
        assert!(matches!(
            JobRequest::decode(&edges(vec![7; MAX_SPLIT_EDGES + 1]).encode()),
            Err(WireError::TooLarge { .. })
        ));
        assert!(matches!(
            JobRequest::decode(&edges(vec![9, 8]).encode()),
            Err(WireError::Malformed(_))
        ));
        let keys = JobRequest::Memo {
            keys: vec![cid(1); MAX_MEMO_KEYS + 1],
        };
        assert!(matches!(
            JobRequest::decode(&keys.encode()),
            Err(WireError::TooLarge { .. })
        ));
        let long = JobResponse::Failed("é".repeat(5000));
        match JobResponse::decode(&long.encode()).unwrap() {
            JobResponse::Failed(r) => assert!(r.len() <= MAX_REASON),
            other => panic!("{other:?}"),
        }
        let too_many = JobResponse::Events {
            events: vec![Event::Cancelled; MAX_EVENTS_PER_REPLY + 1],
            times: vec![0; MAX_EVENTS_PER_REPLY + 1],
            next: 0,
            done: false,
        };
        assert!(JobResponse::decode(&too_many.encode()).is_err());
        let untimed = JobResponse::Events {
            events: vec![Event::Cancelled; 2],
            times: vec![0],
            next: 2,
            done: true,
        };
        assert!(JobResponse::decode(&untimed.encode()).is_err());
        let (requests, responses) = samples();
        let encoded: Vec<Vec<u8>> = requests
            .iter()
            .map(JobRequest::encode)
            .chain(responses.iter().map(JobResponse::encode))
            .collect();
        for s in &encoded {
            for cut in 0..s.len() {
                let _ = JobRequest::decode(&s[..cut]);
                let _ = JobResponse::decode(&s[..cut]);
            }
            for i in 0..s.len() {
                let mut m = s.clone();
                m[i] ^= 0x5a;
                let _ = JobRequest::decode(&m);
                let _ = JobResponse::decode(&m);
            }
        }
        // A CID field holding garbage is refused, not passed on (variant 3 is Cancel).
        assert!(JobRequest::decode(&[3, 3, 0xff, 0xff, 0xff]).is_err());
        assert!(JobRequest::decode(&JobRequest::Cancel { job: cid(1) }.encode()).is_ok());
        // A task with a run chunk size a worker does not take is refused.
        for request in samples().0 {
            for bad in [
                0,
                1,
                1000,
                MIN_RUN_CHUNK / 2,
                MIN_RUN_CHUNK + 1,
                MAX_RUN_CHUNK * 2,
            ] {
                let mut r = request.clone();
                match &mut r {
                    JobRequest::Map(MapTask { run_chunk, .. })
                    | JobRequest::Reduce(ReduceTask { run_chunk, .. }) => *run_chunk = bad,
                    _ => continue,
                }
                assert!(
                    matches!(
                        JobRequest::decode(&r.encode()),
                        Err(WireError::Malformed(_))
                    ),
                    "{bad}"
                );
            }
        }
    }

    #[test]
    fn runs_are_chunked_large_for_few_map_tasks_and_small_for_many() {
        for (maps, chunk) in [
            (0, 256 << 10),
            (1, 256 << 10),
            (8, 256 << 10),
            (16, 256 << 10),
            (17, 128 << 10),
            (32, 128 << 10),
            (33, 64 << 10),
            (64, 64 << 10),
            (65, 64 << 10),
            (100_000, 64 << 10),
        ] {
            assert_eq!(run_chunk(maps), chunk, "{maps} map tasks");
            assert!(is_run_chunk(run_chunk(maps)));
        }
    }
}
