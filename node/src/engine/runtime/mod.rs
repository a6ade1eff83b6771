//! The sandboxed job runtime: runs map and reduce tasks of WebAssembly job modules with
//! wasmtime, speaking the ABI in `p2pmr_protocol::abi`.
//!
//! One [`Executor`] per node holds one `Engine` (epoch interruption on, a ticker thread
//! advancing the epoch every [`TICK`] while any task's store is alive, asleep otherwise) and one `Linker` with our three imports and nothing
//! else (no WASI, no clock, no randomness: a task's output depends only on its input). A module
//! is validated and compiled once per CID and kept as an `InstancePre` ([`JobModule`]); every
//! task gets a fresh `Store` with a memory cap, an epoch deadline and an output cap. Whatever a
//! module does (loop, trap, eat memory, emit without end, hand back malformed bytes), the task
//! fails with a typed [`JobError`] and the executor goes on serving other tasks.

use super::merge::KeyGroups;
use p2pmr_protocol::abi::{
    self, ABI_VERSION, DEPENDS_ON_NAME, DEPENDS_ON_OFFSETS, REQUIRED_EXPORTS,
};
use p2pmr_protocol::Cid;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use thiserror::Error;
use wasmtime::{
    Caller, Config, Engine, Extern, Instance, InstanceAllocationStrategy, InstancePre, Linker,
    Memory, Module, OptLevel, PoolingAllocationConfig, ResourceLimiter, Store, Trap, TypedFunc,
};

/// How often the epoch advances; timeouts are counted in these ticks.
pub const TICK: Duration = Duration::from_millis(10);

/// Most task instances alive at once in one executor (a daemon's `--slots` is capped by it).
pub const MAX_INSTANCES: u32 = 128;
/// Most table elements a module may have.
const TABLE_ELEMENTS: usize = 100_000;
/// Address space reserved per pooled linear memory (with the default guard, it makes bounds
/// checks unnecessary on 64-bit hosts).
const MEMORY_RESERVATION: usize = 4 << 30;
/// Linear memory (per pooled slot) kept mapped between tasks.
const KEEP_RESIDENT: usize = 16 << 20;

/// Per-task limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most linear memory a task may use, bytes.
    pub memory: usize,
    /// Wall time a task may run.
    pub timeout: Duration,
    /// Most bytes a task may emit (keys, values and their length prefixes). A map task's
    /// output is held until it ends, so for it the limit also counts its sort index
    /// ([`INDEX_BYTES`] a pair): what the limit allows is what the output takes in memory.
    pub output: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: 512 << 20,
            timeout: Duration::from_secs(60),
            // Map output waits in memory for the shuffle, so this also bounds host memory.
            output: 256 << 20,
        }
    }
}

impl Limits {
    /// These limits, each capped by `max` (a daemon's ceiling on what jobs may ask for).
    pub fn capped_by(self, max: Limits) -> Self {
        Self {
            memory: self.memory.min(max.memory),
            timeout: self.timeout.min(max.timeout),
            output: self.output.min(max.output),
        }
    }
}

/// What a failed task was doing: job, task and input names for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskName {
    /// The job (a shipped name, a file name or a CID).
    pub job: String,
    /// The task (e.g. `map 3` or `reduce 0`).
    pub task: String,
    /// The input the task reads, if any.
    pub input: String,
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {} {}", self.job, self.task)?;
        if !self.input.is_empty() {
            write!(f, " on {}", self.input)?;
        }
        Ok(())
    }
}

fn at(offset: &Option<u64>) -> String {
    offset.map_or(String::new(), |o| format!(" at record offset {o}"))
}

/// Why a job module was rejected or a task failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JobError {
    /// The bytes are not a valid WebAssembly module.
    #[error("job {job} is not valid WebAssembly: {reason}")]
    InvalidWasm {
        /// The job.
        job: String,
        /// The validator's message.
        reason: String,
    },
    /// A required export is missing or has the wrong type.
    #[error("job {job} is not a p2pmr job: {reason} (build it with the p2pmr-guest SDK)")]
    NotAJob {
        /// The job.
        job: String,
        /// What is missing.
        reason: String,
    },
    /// The module imports something the host does not provide.
    #[error(
        "job {job} imports {import}, which p2pmr does not provide (no WASI, clock or randomness)"
    )]
    ForbiddenImport {
        /// The job.
        job: String,
        /// The import, as `module.name`.
        import: String,
    },
    /// The module was built for another ABI version.
    #[error("job {job} was built for p2pmr job ABI v{found}; this p2pmr speaks v{expected}")]
    AbiVersion {
        /// The job.
        job: String,
        /// The module's version.
        found: i32,
        /// Ours.
        expected: i32,
    },
    /// The task ran past its time limit.
    #[error("{task} ran past its {limit:?} time limit{}", at(.offset))]
    Timeout {
        /// The task.
        task: TaskName,
        /// The limit.
        limit: Duration,
        /// The record being processed, when known.
        offset: Option<u64>,
    },
    /// The task wanted more memory than its cap.
    #[error("{task} exceeded its memory limit of {} MiB{}", .limit >> 20, at(.offset))]
    Memory {
        /// The task.
        task: TaskName,
        /// The cap in bytes.
        limit: usize,
        /// The record being processed, when known.
        offset: Option<u64>,
    },
    /// The task emitted more than its output cap.
    #[error("{task} emitted more than its output limit of {limit} bytes{}", at(.offset))]
    Output {
        /// The task.
        task: TaskName,
        /// The cap.
        limit: u64,
        /// The record being processed, when known.
        offset: Option<u64>,
    },
    /// The job trapped (panicked, or executed `unreachable`, ...).
    #[error("{task} failed{}: {message}", at(.offset))]
    Trap {
        /// The task.
        task: TaskName,
        /// The panic message or trap description.
        message: String,
        /// The record being processed, when known.
        offset: Option<u64>,
    },
    /// The task's output could not be written.
    #[error("{task} cannot write its output: {reason}")]
    Sink {
        /// The task.
        task: TaskName,
        /// The I/O error.
        reason: String,
    },
    /// The module broke the ABI (malformed output, bad pointers).
    #[error("{task} broke the job ABI: {reason}")]
    Abi {
        /// The task.
        task: TaskName,
        /// What was wrong.
        reason: String,
    },
}

impl JobError {
    /// The input offset of the record the task was mapping when it failed, when known.
    pub fn record(&self) -> Option<u64> {
        match self {
            Self::Timeout { offset, .. }
            | Self::Memory { offset, .. }
            | Self::Output { offset, .. }
            | Self::Trap { offset, .. } => *offset,
            _ => None,
        }
    }
}

/// A compiled, validated job module, ready to instantiate.
pub struct JobModule {
    name: String,
    pre: InstancePre<TaskState>,
    has_combine: bool,
}

impl fmt::Debug for JobModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobModule")
            .field("name", &self.name)
            .finish()
    }
}

impl JobModule {
    /// The job's name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the job has a combiner.
    pub fn has_combine(&self) -> bool {
        self.has_combine
    }
}

/// ABI-encoded key/value pairs in emission order, kept in chunks that never grow: a growing
/// buffer would be copied at each doubling, and the allocator may hold the old copies a
/// while, so output would be resident more than once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pairs {
    chunks: Vec<Vec<u8>>,
}

/// Bytes per chunk of [`Pairs`] (a larger pair gets a chunk of its own size).
const PAIRS_CHUNK: usize = 1 << 20;

impl Pairs {
    /// Appends a pair.
    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        let need = 8 + key.len() + value.len();
        match self.chunks.last_mut() {
            Some(chunk) if chunk.capacity() - chunk.len() >= need => {
                abi::encode_pair(chunk, key, value)
            }
            _ => {
                let mut chunk = Vec::with_capacity(need.max(PAIRS_CHUNK));
                abi::encode_pair(&mut chunk, key, value);
                self.chunks.push(chunk);
            }
        }
    }

    /// Encoded size in bytes.
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }
}

impl From<Vec<u8>> for Pairs {
    /// Pairs already ABI-encoded back to back.
    fn from(buf: Vec<u8>) -> Self {
        Self { chunks: vec![buf] }
    }
}

/// A run of key/value pairs sorted by key (stable: equal keys keep the order they were emitted
/// in): the pairs as emitted, and an index of them in key order. Nothing is copied to sort: a
/// task's output is resident once, plus [`INDEX_BYTES`] a pair, and is written out in key
/// order straight from here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Run {
    pairs: Pairs,
    /// Each pair's key's first 8 bytes (big-endian, zero-padded) and where the pair starts
    /// (chunk in the high 32 bits, offset in the low ones).
    order: Vec<(u64, u64)>,
}

/// Memory a run's index takes per pair, counted with the output against a task's limit.
pub const INDEX_BYTES: u64 = std::mem::size_of::<(u64, u64)>() as u64;

impl Run {
    /// Sorts pairs by key (stably) into a run, taking them.
    pub fn sort(pairs: impl Into<Pairs>) -> Self {
        let pairs = pairs.into();
        // Comparing the keys' first 8 bytes as numbers orders most pairs without touching the
        // keys themselves; equal prefixes fall back to comparing whole keys, so the order is
        // exactly byte order. The index is sized exactly (pairs counted first).
        let mut count = 0;
        for chunk in &pairs.chunks {
            let mut at = 0;
            while at < chunk.len() {
                count += 1;
                at = pair_end(chunk, at);
            }
        }
        let mut order: Vec<(u64, u64)> = Vec::with_capacity(count);
        for (c, chunk) in pairs.chunks.iter().enumerate() {
            let mut at = 0;
            while at < chunk.len() {
                let key = key_at(chunk, at);
                let mut prefix = [0; 8];
                let n = key.len().min(8);
                prefix[..n].copy_from_slice(&key[..n]);
                order.push((u64::from_be_bytes(prefix), ((c as u64) << 32) | at as u64));
                at = pair_end(chunk, at);
            }
        }
        let key = |pos: u64| key_at(&pairs.chunks[(pos >> 32) as usize], pos as u32 as usize);
        order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| key(a.1).cmp(key(b.1))));
        Self { pairs, order }
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Encoded size in bytes.
    pub fn bytes(&self) -> usize {
        self.pairs.bytes()
    }

    /// The `i`th pair's encoded bytes.
    fn encoded(&self, i: usize) -> Option<&[u8]> {
        let &(_, pos) = self.order.get(i)?;
        let chunk = &self.pairs.chunks[(pos >> 32) as usize];
        let at = pos as u32 as usize;
        Some(&chunk[at..pair_end(chunk, at)])
    }

    /// Writes the encoded pairs back to back in key order: the form a run is stored in for
    /// the shuffle.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        for i in 0..self.len() {
            out.write_all(self.encoded(i).expect("in range"))?;
        }
        Ok(())
    }

    /// The encoded pairs in key order, in one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes());
        self.write_to(&mut out)
            .expect("writing to memory cannot fail");
        out
    }

    /// The `i`th pair in key order.
    pub fn pair(&self, i: usize) -> Option<(&[u8], &[u8])> {
        let pair = self.encoded(i)?;
        let klen = read_len(pair, 0);
        Some((&pair[4..4 + klen], &pair[8 + klen..]))
    }

    /// The pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        (0..self.len()).map_while(|i| self.pair(i))
    }
}

/// The key of the pair starting at `at`.
fn key_at(buf: &[u8], at: usize) -> &[u8] {
    &buf[at + 4..at + 4 + read_len(buf, at)]
}

/// Where the pair starting at `at` ends.
fn pair_end(buf: &[u8], at: usize) -> usize {
    let klen = read_len(buf, at);
    at + 8 + klen + read_len(buf, at + 4 + klen)
}

/// A length prefix written by the host itself (so in bounds by construction).
fn read_len(buf: &[u8], at: usize) -> usize {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize
}

/// Map output: one sorted run per partition.
pub type Partitions = Vec<Run>;

/// Where a running task's emitted pairs go.
enum Collect {
    /// ABI-encoded pairs per partition, in emission order until the task finishes.
    Map {
        parts: Vec<Pairs>,
        reducers: u32,
    },
    Reduce {
        out: Box<dyn std::io::Write + Send>,
    },
}

struct TaskState {
    /// Keeps the epoch ticker running while this store is alive.
    _ticking: Ticking,
    limiter: MemoryCap,
    collect: Collect,
    emitted: u64,
    output_cap: u64,
    over_output: bool,
    /// The groups a reduce task pulls the current key's values from.
    groups: Option<Box<dyn KeyGroups>>,
    panic: Option<String>,
    abi_error: Option<String>,
    sink_error: Option<String>,
    /// The instance's exported memory, once it is instantiated.
    memory: Option<Memory>,
}

struct MemoryCap {
    max: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS)
    }
}

/// Compiles and runs job modules. Cheap to share (`Arc`) across threads.
pub struct Executor {
    engine: Engine,
    linker: Linker<TaskState>,
    modules: Mutex<HashMap<Cid, Arc<JobModule>>>,
    max: Limits,
    ticker: Arc<Ticker>,
}

impl Drop for Executor {
    fn drop(&mut self) {
        let mut state = self.ticker.state.lock().unwrap_or_else(|e| e.into_inner());
        state.closed = true;
        self.ticker.wake.notify_all();
    }
}

/// What the epoch ticker waits on: the stores alive, and whether the executor is gone. Only
/// a running store can pass its deadline, so with none the ticker sleeps and an idle daemon
/// does not wake up every tick.
#[derive(Default)]
struct Ticker {
    state: Mutex<TickerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TickerState {
    stores: usize,
    closed: bool,
    /// Ticks so far.
    ticks: u64,
}

impl Ticker {
    /// Runs the ticker for `engine` until the executor is dropped.
    fn run(&self, engine: wasmtime::EngineWeak) {
        loop {
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                while state.stores == 0 && !state.closed {
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                if state.closed {
                    return;
                }
                state.ticks += 1;
            }
            let Some(engine) = engine.upgrade() else {
                return;
            };
            engine.increment_epoch();
            drop(engine);
            std::thread::sleep(TICK);
        }
    }

    /// Counts a store as alive until the returned guard is dropped.
    fn start(self: &Arc<Self>) -> Ticking {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.stores += 1;
        if state.stores == 1 {
            self.wake.notify_all();
        }
        Ticking(self.clone())
    }
}

/// A store alive, for the [`Ticker`].
struct Ticking(Arc<Ticker>);

impl Drop for Ticking {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.stores -= 1;
    }
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor").field("max", &self.max).finish()
    }
}

fn memory_of(caller: &mut Caller<'_, TaskState>) -> Option<Memory> {
    // Looked up by name only until the instance exists (its start function may call in):
    // a reduce calls in for every key, and the lookup by name was a visible share of it.
    if let Some(memory) = caller.data().memory {
        return Some(memory);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

/// Asks Linux to back a linear memory with transparent huge pages where it can.
///
/// A task's memory grows to tens of MiB and all but the first 16 MiB is handed back between
/// tasks; with 2 MiB pages it comes back in far fewer faults. CPU time measured the same
/// either way: the hash-table probes miss the cache, not (measurably) the TLB. Most systems (this one
/// included) enable THP only for regions that ask (`madvise` mode). `len` covers the memory's
/// whole reservation, so pages the memory grows into later are covered too.
#[allow(unsafe_code)]
fn huge_pages(base: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: MADV_HUGEPAGE only marks the mapping (the slot wasmtime's pooling allocator
        // reserved for this memory, `len` bytes from its base) as eligible for huge pages; it
        // changes neither its contents nor its protection, so no Rust or wasm view of it can
        // observe a difference. An error (an old kernel, THP off) just leaves 4 KiB pages.
        let _ = unsafe { rustix::mm::madvise(base.cast(), len, rustix::mm::Advice::LinuxHugepage) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (base, len);
}

/// Fails the guest call and remembers why (a trap caused by the host, not by the job).
fn abi_violation(caller: &mut Caller<'_, TaskState>, reason: String) -> wasmtime::Error {
    caller.data_mut().abi_error = Some(reason.clone());
    wasmtime::Error::msg(reason)
}

impl Executor {
    /// An executor whose tasks may ask for at most `max`.
    pub fn new(max: Limits) -> Result<Arc<Self>, JobError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        // Deterministic execution: the same module on the same input gives the same output on
        // every daemon, which verified execution (`--verify`) and the reuse of finished tasks
        // after a coordinator's death rely on. The host offers no clock, randomness or threads;
        // NaN bit patterns and relaxed SIMD are the remaining sources of difference.
        config.cranelift_nan_canonicalization(true);
        config.relaxed_simd_deterministic(true);
        // Pooled instances: a task's linear memory reuses a slot an earlier task of the same
        // module used, with its first pages still mapped (zeroed, not unmapped). Fresh mmaps
        // per task cost a page fault and a page clear for every page a task touches, a sizeable
        // share of a job's CPU. With huge pages (see `huge_pages`) a fault maps 2 MiB, so less
        // needs to stay resident: 16 MiB, where 64 MiB per slot pushed a daemon's peak RSS too
        // high.
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(MAX_INSTANCES)
            .total_memories(MAX_INSTANCES)
            .total_tables(MAX_INSTANCES)
            .max_memory_size(MEMORY_RESERVATION)
            .table_elements(TABLE_ELEMENTS)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // `P2PMR_PERFMAP=1` names compiled job functions in /tmp/perf-PID.map, so `perf report`
        // shows where a job spends its time instead of bare JIT addresses.
        if std::env::var_os("P2PMR_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| JobError::InvalidWasm {
            job: "(engine)".into(),
            reason: e.to_string(),
        })?;
        let mut linker = Linker::new(&engine);
        Self::define_imports(&mut linker).expect("defining host functions cannot fail");
        // Epoch ticker: one thread per executor, ending when the executor is dropped.
        let ticker = Arc::new(Ticker::default());
        let (weak, t) = (engine.weak(), ticker.clone());
        std::thread::Builder::new()
            .name("p2pmr-epoch".into())
            .spawn(move || t.run(weak))
            .expect("cannot start the epoch thread");
        Ok(Arc::new(Self {
            engine,
            linker,
            modules: Mutex::new(HashMap::new()),
            max,
            ticker,
        }))
    }

    fn define_imports(linker: &mut Linker<TaskState>) -> wasmtime::Result<()> {
        linker.func_wrap(
            "p2pmr",
            "emit",
            |mut caller: Caller<'_, TaskState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
                let Some(memory) = memory_of(&mut caller) else {
                    return Err(abi_violation(&mut caller, "no exported memory".into()));
                };
                let (data, state) = memory.data_and_store_mut(&mut caller);
                let Some(buf) = usize::try_from(ptr)
                    .ok()
                    .zip(usize::try_from(len).ok())
                    .and_then(|(p, l)| data.get(p..p.checked_add(l)?))
                else {
                    state.abi_error = Some(format!("emit({ptr}, {len}) is outside memory"));
                    return Err(wasmtime::Error::msg("bad emit"));
                };
                state.emitted += buf.len() as u64;
                if state.emitted > state.output_cap {
                    state.over_output = true;
                    return Err(wasmtime::Error::msg("output limit"));
                }
                let Some(pairs) = abi::decode_pairs(buf) else {
                    state.abi_error = Some("emitted bytes are not well-formed pairs".into());
                    return Err(wasmtime::Error::msg("bad emit"));
                };
                match &mut state.collect {
                    Collect::Map { parts, reducers } => {
                        // A map's output stays resident until the task ends, and its sort
                        // index with it: the limit bounds both.
                        state.emitted += INDEX_BYTES * pairs.len() as u64;
                        if state.emitted > state.output_cap {
                            state.over_output = true;
                            return Err(wasmtime::Error::msg("output limit"));
                        }
                        for (k, v) in pairs {
                            parts[abi::partition(k, *reducers) as usize].push(k, v);
                        }
                    }
                    Collect::Reduce { out } => {
                        let mut written = Ok(());
                        for (k, v) in pairs {
                            written = written
                                .and_then(|()| out.write_all(k))
                                .and_then(|()| out.write_all(b"\t"))
                                .and_then(|()| out.write_all(v))
                                .and_then(|()| out.write_all(b"\n"));
                        }
                        if let Err(e) = written {
                            state.sink_error = Some(e.to_string());
                            return Err(wasmtime::Error::msg("cannot write output"));
                        }
                    }
                }
                Ok(())
            },
        )?;
        linker.func_wrap(
            "p2pmr",
            "values",
            |mut caller: Caller<'_, TaskState>, ptr: i32, cap: i32| -> wasmtime::Result<i32> {
                let Some(memory) = memory_of(&mut caller) else {
                    return Err(abi_violation(&mut caller, "no exported memory".into()));
                };
                let (data, state) = memory.data_and_store_mut(&mut caller);
                let Some(dest) = usize::try_from(ptr)
                    .ok()
                    .zip(usize::try_from(cap).ok())
                    .and_then(|(p, c)| data.get_mut(p..p.checked_add(c)?))
                else {
                    state.abi_error = Some(format!("values({ptr}, {cap}) is outside memory"));
                    return Err(wasmtime::Error::msg("bad values"));
                };
                let mut written = 0;
                let Some(groups) = state.groups.as_mut() else {
                    return Ok(0);
                };
                // A value that does not fit stays unread until the next pull.
                while let Some(value) = groups.peek_value() {
                    let need = 4 + value.len();
                    if written + need > dest.len() {
                        if written == 0 {
                            // The guest must grow its buffer to take this one value.
                            return Ok(-(i32::try_from(need).unwrap_or(i32::MAX)));
                        }
                        break;
                    }
                    dest[written..written + 4].copy_from_slice(&(value.len() as u32).to_le_bytes());
                    dest[written + 4..written + need].copy_from_slice(value);
                    written += need;
                    groups.take_value();
                }
                Ok(written as i32)
            },
        )?;
        linker.func_wrap(
            "p2pmr",
            "panic",
            |mut caller: Caller<'_, TaskState>, ptr: i32, len: i32| {
                let Some(memory) = memory_of(&mut caller) else {
                    return;
                };
                let (data, state) = memory.data_and_store_mut(&mut caller);
                let msg = usize::try_from(ptr)
                    .ok()
                    .zip(usize::try_from(len.min(4096)).ok())
                    .and_then(|(p, l)| data.get(p..p.checked_add(l)?))
                    .map(|b| String::from_utf8_lossy(b).into_owned());
                state.panic = msg;
            },
        )?;
        Ok(())
    }

    /// The most a task may ask for on this executor.
    pub fn max_limits(&self) -> Limits {
        self.max
    }

    /// Validates and compiles `wasm` (once per `cid`; later calls return the cached module).
    pub fn load(&self, cid: Cid, name: &str, wasm: &[u8]) -> Result<Arc<JobModule>, JobError> {
        self.load_with(cid, name, wasm, Limits::default())
    }

    /// [`Executor::load`] under a job's `limits`: instantiating a module runs its start
    /// function, which may loop or grow memory like any task.
    pub fn load_with(
        &self,
        cid: Cid,
        name: &str,
        wasm: &[u8],
        limits: Limits,
    ) -> Result<Arc<JobModule>, JobError> {
        let limits = limits.capped_by(self.max);
        if let Some(m) = self.modules.lock().expect("poisoned").get(&cid) {
            return Ok(m.clone());
        }
        let job = name.to_owned();
        let module = Module::new(&self.engine, wasm).map_err(|e| JobError::InvalidWasm {
            job: job.clone(),
            reason: one_line(&format!("{e:#}")),
        })?;
        for import in module.imports() {
            if import.module() != "p2pmr" || !["emit", "values", "panic"].contains(&import.name()) {
                return Err(JobError::ForbiddenImport {
                    job,
                    import: format!("{}.{}", import.module(), import.name()),
                });
            }
        }
        for (export, params, results) in REQUIRED_EXPORTS {
            let ok = module
                .get_export(export)
                .and_then(|e| e.func().cloned())
                .is_some_and(|f| f.params().len() == params && f.results().len() == results);
            if !ok {
                return Err(JobError::NotAJob {
                    job,
                    reason: format!("export {export} is missing or has the wrong type"),
                });
            }
        }
        if module
            .get_export("memory")
            .and_then(|e| e.memory().cloned())
            .is_none()
        {
            return Err(JobError::NotAJob {
                job,
                reason: "it exports no memory".into(),
            });
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| JobError::NotAJob {
                job: job.clone(),
                reason: format!("{e:#}"),
            })?;
        let probe = TaskName {
            job: job.clone(),
            task: "load".into(),
            input: String::new(),
        };
        let mut store = self.store(
            limits,
            Collect::Reduce {
                out: Box::new(std::io::sink()),
            },
        );
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, &probe, e, None, limits))?;
        let version = call0(&instance, &mut store, "p2pmr_abi_version")
            .map_err(|e| classify(&store, &probe, e, None, limits))?;
        if version != ABI_VERSION {
            return Err(JobError::AbiVersion {
                job,
                found: version,
                expected: ABI_VERSION,
            });
        }
        let has_combine = call0(&instance, &mut store, "p2pmr_has_combine")
            .map_err(|e| classify(&store, &probe, e, None, limits))?
            == 1;
        let module = Arc::new(JobModule {
            name: job,
            pre,
            has_combine,
        });
        self.modules
            .lock()
            .expect("poisoned")
            .insert(cid, module.clone());
        Ok(module)
    }

    fn store(&self, limits: Limits, collect: Collect) -> Store<TaskState> {
        let mut store = Store::new(
            &self.engine,
            TaskState {
                _ticking: self.ticker.start(),
                limiter: MemoryCap {
                    max: limits.memory,
                    hit: false,
                },
                collect,
                emitted: 0,
                output_cap: limits.output,
                over_output: false,
                groups: None,
                panic: None,
                abi_error: None,
                sink_error: None,
                memory: None,
            },
        );
        store.limiter(|s| &mut s.limiter);
        let ticks = (limits.timeout.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store
    }

    /// Starts a map task: `args` in the ABI's encoding, the input's `name`, output split into
    /// `reducers` partitions. Feed it batches of whole records, then [`MapTask::finish`].
    pub fn map_task(
        &self,
        module: &JobModule,
        task: TaskName,
        args: &[u8],
        reducers: u32,
        limits: Limits,
    ) -> Result<MapTask, JobError> {
        let limits = limits.capped_by(self.max);
        let collect = Collect::Map {
            parts: vec![Pairs::default(); reducers.max(1) as usize],
            reducers: reducers.max(1),
        };
        let mut t = self.start(module, task, args, limits, collect)?;
        let input_name = t.task.input.clone();
        t.call_with_input(input_name.as_bytes(), |f, s, len| f.map_begin.call(s, len))?;
        Ok(t)
    }

    /// A fresh instance of `module` in its own store, initialised with `args`.
    fn start(
        &self,
        module: &JobModule,
        task: TaskName,
        args: &[u8],
        limits: Limits,
        collect: Collect,
    ) -> Result<MapTask, JobError> {
        let mut store = self.store(limits, collect);
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, &task, e, None, limits))?;
        if let Some(memory) = instance.get_memory(&mut store, "memory") {
            huge_pages(memory.data_ptr(&store), MEMORY_RESERVATION);
        }
        let funcs = MapFuncs::new(&instance, &mut store)
            .map_err(|e| classify(&store, &task, e, None, limits))?;
        store.data_mut().memory = Some(funcs.memory);
        let mut t = MapTask {
            funcs,
            instance,
            store,
            task,
            limits,
            batch_offset: None,
        };
        t.call_with_input(args, |f, s, len| f.init.call(s, len))?;
        Ok(t)
    }

    /// Runs a reduce task over `groups` (keys in ascending order; the job pulls each key's
    /// values as it reads them, and those it does not read are skipped), writing the
    /// `key<TAB>value` output lines to `out` as they come. Returns the number of bytes the job
    /// emitted.
    pub fn reduce_task(
        &self,
        module: &JobModule,
        task: TaskName,
        args: &[u8],
        limits: Limits,
        groups: Box<dyn KeyGroups>,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<u64, JobError> {
        let limits = limits.capped_by(self.max);
        let mut t = self.start(module, task, args, limits, Collect::Reduce { out })?;
        t.store.data_mut().groups = Some(groups);
        let mut key = Vec::new();
        loop {
            let groups = t.store.data_mut().groups.as_mut().expect("set above");
            let Some(next) = groups.next_key() else { break };
            key.clear();
            key.extend_from_slice(next);
            t.call_with_input(&key, |f, s, len| f.reduce.call(s, len))?;
        }
        if let Collect::Reduce { out } = &mut t.store.data_mut().collect {
            out.flush().map_err(|e| JobError::Sink {
                task: t.task.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(t.store.data().emitted)
    }
}

fn call0(instance: &Instance, store: &mut Store<TaskState>, name: &str) -> wasmtime::Result<i32> {
    instance
        .get_typed_func::<(), i32>(&mut *store, name)?
        .call(&mut *store, ())
}

struct MapFuncs {
    input: TypedFunc<i32, i32>,
    init: TypedFunc<i32, i32>,
    map_begin: TypedFunc<i32, i32>,
    map_batch: TypedFunc<(i32, i64), i32>,
    map_end: TypedFunc<(), i32>,
    reduce: TypedFunc<i32, i32>,
    cursor: TypedFunc<(), i32>,
    memory: Memory,
}

impl MapFuncs {
    fn new(instance: &Instance, store: &mut Store<TaskState>) -> wasmtime::Result<Self> {
        Ok(Self {
            input: instance.get_typed_func(&mut *store, "p2pmr_input")?,
            init: instance.get_typed_func(&mut *store, "p2pmr_init")?,
            map_begin: instance.get_typed_func(&mut *store, "p2pmr_map_begin")?,
            map_batch: instance.get_typed_func(&mut *store, "p2pmr_map_batch")?,
            map_end: instance.get_typed_func(&mut *store, "p2pmr_map_end")?,
            reduce: instance.get_typed_func(&mut *store, "p2pmr_reduce")?,
            cursor: instance.get_typed_func(&mut *store, "p2pmr_cursor")?,
            memory: instance
                .get_memory(&mut *store, "memory")
                .ok_or_else(|| wasmtime::Error::msg("no memory"))?,
        })
    }
}

/// A running map task (also used for reduce tasks internally).
pub struct MapTask {
    funcs: MapFuncs,
    instance: Instance,
    store: Store<TaskState>,
    task: TaskName,
    limits: Limits,
    /// Input offset of the batch being mapped, for error reports.
    batch_offset: Option<u64>,
}

impl fmt::Debug for MapTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapTask").field("task", &self.task).finish()
    }
}

impl MapTask {
    /// Copies `bytes` into the guest's input buffer and calls `entry(len)`.
    fn call_with_input(
        &mut self,
        bytes: &[u8],
        entry: impl FnOnce(&MapFuncs, &mut Store<TaskState>, i32) -> wasmtime::Result<i32>,
    ) -> Result<(), JobError> {
        let len = i32::try_from(bytes.len()).map_err(|_| JobError::Abi {
            task: self.task.clone(),
            reason: format!("an input of {} bytes is too large for wasm32", bytes.len()),
        })?;
        let result = self
            .funcs
            .input
            .call(&mut self.store, len)
            .and_then(|ptr| {
                let ptr = usize::try_from(ptr).map_err(|_| wasmtime::Error::msg("bad pointer"))?;
                self.funcs
                    .memory
                    .write(&mut self.store, ptr, bytes)
                    .map_err(|_| {
                        self.store.data_mut().abi_error =
                            Some("p2pmr_input returned a buffer outside memory".into());
                        wasmtime::Error::msg("bad input buffer")
                    })
            })
            .and_then(|()| entry(&self.funcs, &mut self.store, len));
        match result {
            Ok(0) => Ok(()),
            Ok(code) => Err(JobError::Abi {
                task: self.task.clone(),
                reason: format!("an entry point returned {code}"),
            }),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: wasmtime::Error) -> JobError {
        // Where the job was: the batch's offset plus the record cursor the SDK keeps. The
        // deadline is reset so this little call can run after a timeout.
        let offset = self.batch_offset.and_then(|base| {
            self.store.set_epoch_deadline(100);
            self.funcs
                .cursor
                .call(&mut self.store, ())
                .ok()
                .and_then(|c| u64::try_from(c).ok())
                .map(|c| base + c)
        });
        classify(&self.store, &self.task, e, offset, self.limits)
    }

    /// Maps a batch of whole records whose first byte is at `offset` of the input.
    pub fn batch(&mut self, records: &[u8], offset: u64) -> Result<(), JobError> {
        self.batch_offset = Some(offset);
        let off = offset as i64;
        self.call_with_input(records, |f, s, len| f.map_batch.call(s, (len, off)))?;
        self.batch_offset = None;
        Ok(())
    }

    /// Ends the task (the combiner runs) and returns its output, sorted per partition.
    pub fn finish(self) -> Result<Partitions, JobError> {
        self.finish_counted().map(|end| end.parts)
    }

    /// Like [`MapTask::finish`], also returning what the module reports of the task: the
    /// combiner's pair counts and whether it read records' offsets (the optional
    /// `p2pmr_combined` and `p2pmr_depends` exports of the SDK).
    pub fn finish_counted(mut self) -> Result<MapEnd, JobError> {
        let end = self.funcs.map_end.call(&mut self.store, ());
        match end {
            Ok(0) => {}
            Ok(code) => {
                return Err(JobError::Abi {
                    task: self.task.clone(),
                    reason: format!("p2pmr_map_end returned {code}"),
                })
            }
            Err(e) => return Err(self.fail(e)),
        }
        let collect = std::mem::replace(
            &mut self.store.data_mut().collect,
            Collect::Reduce {
                out: Box::new(std::io::sink()),
            },
        );
        let Collect::Map { parts, .. } = collect else {
            unreachable!("map tasks collect pairs")
        };
        let combined = self
            .instance
            .get_typed_func::<i32, i64>(&mut self.store, "p2pmr_combined")
            .ok()
            .and_then(|f| {
                let taken = f.call(&mut self.store, 0).ok()?;
                let given = f.call(&mut self.store, 1).ok()?;
                Some((u64::try_from(taken).ok()?, u64::try_from(given).ok()?))
            });
        // A module that does not say may have used them all.
        let depends = self
            .instance
            .get_typed_func::<(), i32>(&mut self.store, "p2pmr_depends")
            .ok()
            .and_then(|f| f.call(&mut self.store, ()).ok())
            .unwrap_or(!0);
        // The instance (its linear memory) goes back to the pool before the sort allocates,
        // and each partition's unsorted pairs are freed as soon as they are sorted.
        drop(self);
        Ok(MapEnd {
            parts: parts.into_iter().map(Run::sort).collect(),
            combined,
            positional: depends & DEPENDS_ON_OFFSETS != 0,
            named: depends & DEPENDS_ON_NAME != 0,
        })
    }
}

/// What a map task ends with ([`MapTask::finish_counted`]).
#[derive(Debug)]
pub struct MapEnd {
    /// The output, sorted per partition.
    pub parts: Partitions,
    /// The combiner's pairs in and out, if the module counts them.
    pub combined: Option<(u64, u64)>,
    /// Whether the output may depend on where the records lie in the input (the module read
    /// their offsets, or does not say).
    pub positional: bool,
    /// Whether the output may depend on the input's name (the module read it, or does not
    /// say).
    pub named: bool,
}

/// Messages from modules and the validator span lines; errors are reported on one.
fn one_line(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match joined.char_indices().nth(400) {
        Some((i, _)) => format!("{}...", &joined[..i]),
        None => joined,
    }
}

/// Turns a wasmtime error into the typed error that says what happened.
fn classify(
    store: &Store<TaskState>,
    task: &TaskName,
    e: wasmtime::Error,
    offset: Option<u64>,
    limits: Limits,
) -> JobError {
    let state = store.data();
    let task = task.clone();
    if state.over_output {
        return JobError::Output {
            task,
            limit: limits.output,
            offset,
        };
    }
    if let Some(reason) = &state.sink_error {
        return JobError::Sink {
            task,
            reason: reason.clone(),
        };
    }
    if let Some(reason) = &state.abi_error {
        return JobError::Abi {
            task,
            reason: reason.clone(),
        };
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return JobError::Timeout {
            task,
            limit: limits.timeout,
            offset,
        };
    }
    if state.limiter.hit {
        return JobError::Memory {
            task,
            limit: limits.memory,
            offset,
        };
    }
    let message = match (&state.panic, e.downcast_ref::<Trap>()) {
        (Some(panic), _) => one_line(panic),
        (None, Some(trap)) => trap.to_string(),
        (None, None) => one_line(&format!("{e:#}")),
    };
    JobError::Trap {
        task,
        message,
        offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_sort_in_byte_order_and_keep_equal_keys_in_emit_order() {
        // Keys that tie or nearly tie on their first 8 bytes: zero bytes against the padding,
        // prefixes of each other, 0xff, 8 against 9 bytes.
        let keys: [&[u8]; 12] = [
            b"ab\0x",
            b"ab",
            b"",
            b"ab\0",
            b"\0",
            b"abcdefgh",
            b"abcdefghi",
            b"abcdefgh\0",
            b"\xff\xff",
            b"ab",
            b"abcdefga\xff",
            b"",
        ];
        let mut buf = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            abi::encode_pair(&mut buf, k, i.to_string().as_bytes());
        }
        let run = Run::sort(buf);
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            run.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        let mut want: Vec<(Vec<u8>, Vec<u8>)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.to_vec(), i.to_string().into_bytes()))
            .collect();
        want.sort_by(|a, b| a.0.cmp(&b.0)); // stable: equal keys keep their order
        assert_eq!(got, want);
        assert_eq!(run.len(), keys.len());
        assert!(Run::sort(Vec::new()).is_empty());
    }

    #[test]
    fn the_epoch_ticks_only_while_a_task_is_alive() {
        let exec = Executor::new(Limits::default()).unwrap();
        let ticks = || exec.ticker.state.lock().unwrap().ticks;
        std::thread::sleep(TICK * 5);
        assert_eq!(ticks(), 0, "an idle executor ticked");
        let store = exec.store(
            Limits::default(),
            Collect::Reduce {
                out: Box::new(std::io::sink()),
            },
        );
        // Ticking (allowing a loaded machine a second to schedule the ticker thread).
        let until = std::time::Instant::now() + Duration::from_secs(1);
        while ticks() < 2 && std::time::Instant::now() < until {
            std::thread::sleep(TICK);
        }
        assert!(ticks() >= 2, "{} ticks with a store alive", ticks());
        drop(store);
        std::thread::sleep(TICK * 2);
        let after = ticks();
        std::thread::sleep(TICK * 5);
        assert!(
            ticks() <= after + 1,
            "ticked on with no store: {after} -> {}",
            ticks()
        );
    }

    #[test]
    fn runs_over_many_chunks_sort_like_one_buffer() {
        // Pairs filling several chunks, one larger than a chunk, keys in a scrambled order.
        let mut pairs = Pairs::default();
        let mut flat = Vec::new();
        let mut want = Vec::new();
        for i in 0..80_000u32 {
            let key = format!("k{}", (i * 7919) % 1000);
            let value = if i == 40_000 {
                vec![b'x'; PAIRS_CHUNK + 3]
            } else {
                format!("{i:040}").into_bytes()
            };
            pairs.push(key.as_bytes(), &value);
            abi::encode_pair(&mut flat, key.as_bytes(), &value);
            want.push((key.into_bytes(), value));
        }
        assert!(pairs.chunks.len() > 3, "{} chunks", pairs.chunks.len());
        assert_eq!(pairs.bytes(), flat.len());
        want.sort_by(|a, b| a.0.cmp(&b.0));
        let run = Run::sort(pairs);
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            run.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(got, want);
        assert_eq!(run.to_bytes(), Run::sort(flat).to_bytes());
    }
}
