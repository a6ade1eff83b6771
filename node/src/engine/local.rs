//! `p2pmr run-local`: a whole job in this process over local files, using every core. It is
//! what job authors test with, and the sequential reference the distributed engine must match.
//!
//! Each input is cut into splits of `split` bytes; a pool of worker threads runs the map tasks
//! (each reads only its split, streaming, in batches of whole records, by the rule in
//! `p2pmr_protocol::records`), then the reduce tasks, one per partition, each merging the
//! sorted runs of every map task. Map outputs are kept in memory between the phases (combined
//! jobs like wordcount keep little; the distributed engine keeps them as blocks instead).

use crate::engine::merge::{Merge, RunCursor};
use crate::engine::runtime::{Executor, JobError, JobModule, Limits, Partitions, Run, TaskName};
use p2pmr_protocol::records::RecordSplitter;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use thiserror::Error;

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 1 << 20;

/// How to run a job locally.
#[derive(Debug, Clone)]
pub struct LocalJob {
    /// Job arguments, ABI-encoded (`p2pmr_protocol::abi::encode_args`).
    pub args: Vec<u8>,
    /// Number of reduce partitions.
    pub reducers: u32,
    /// Per-task limits.
    pub limits: Limits,
    /// Map split size in bytes.
    pub split: u64,
    /// Records are handed to the job in batches of about this many bytes.
    pub batch: usize,
    /// Worker threads.
    pub threads: usize,
}

impl Default for LocalJob {
    fn default() -> Self {
        Self {
            args: Vec::new(),
            reducers: 1,
            limits: Limits::default(),
            split: 64 << 20,
            batch: 1 << 20,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Errors of a local run.
#[derive(Debug, Error)]
pub enum LocalError {
    /// An input could not be read.
    #[error("cannot read {path}")]
    Input {
        /// The input.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A partition's output could not be created.
    #[error("cannot create the output of partition {partition}")]
    Output {
        /// The partition.
        partition: u32,
        /// The OS error.
        source: io::Error,
    },
    /// A task failed.
    #[error(transparent)]
    Job(#[from] JobError),
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Map tasks run.
    pub map_tasks: u64,
    /// Input bytes mapped.
    pub input_bytes: u64,
    /// Pairs out of the map phase (after combining).
    pub map_output_pairs: u64,
    /// Bytes (keys and values) the reduce phase emitted.
    pub output_bytes: u64,
}

struct Split {
    input: usize,
    start: u64,
    end: u64,
}

/// Runs `module` over `inputs` (each named by its path as given), writing partition `r`'s
/// output (`key<TAB>value` lines in key order) to `sink(r)`.
pub fn run<W>(
    exec: &Executor,
    module: &JobModule,
    job: &LocalJob,
    inputs: &[PathBuf],
    sink: impl Fn(u32) -> io::Result<W> + Sync,
) -> Result<Counters, LocalError>
where
    W: io::Write + Send + 'static,
{
    let mut splits = Vec::new();
    let mut input_bytes = 0;
    for (i, path) in inputs.iter().enumerate() {
        let size = std::fs::metadata(path)
            .map_err(|source| LocalError::Input {
                path: path.clone(),
                source,
            })?
            .len();
        input_bytes += size;
        let mut start = 0;
        while start < size {
            let end = (start + job.split.max(1)).min(size);
            splits.push(Split {
                input: i,
                start,
                end,
            });
            start = end;
        }
    }
    let reducers = job.reducers.max(1);
    let threads = job.threads.max(1);
    let started = std::time::Instant::now();

    // Map phase: workers take splits in order.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let outputs: Mutex<Vec<Option<Partitions>>> =
        Mutex::new((0..splits.len()).map(|_| None).collect());
    let first_error: Mutex<Option<LocalError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(splits.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= splits.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                match map_split(exec, module, job, inputs, &splits[i], i, reducers) {
                    Ok(parts) => outputs.lock().expect("poisoned")[i] = Some(parts),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().expect("poisoned").get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("poisoned") {
        return Err(e);
    }
    let outputs: Vec<Partitions> = outputs
        .into_inner()
        .expect("poisoned")
        .into_iter()
        .map(|o| o.expect("every split was mapped"))
        .collect();
    tracing::info!(
        "map phase: {} tasks on {threads} threads in {:?}",
        splits.len(),
        started.elapsed()
    );
    let reduce_started = std::time::Instant::now();
    let map_output_pairs = outputs
        .iter()
        .flat_map(|p| p.iter().map(|v| v.len() as u64))
        .sum();

    // Reduce phase: one task per partition, each merging that partition of every map output.
    let mut runs_by_partition: Vec<Vec<Run>> = (0..reducers).map(|_| Vec::new()).collect();
    for parts in outputs {
        for (r, run) in parts.into_iter().enumerate() {
            runs_by_partition[r].push(run);
        }
    }
    let work: Mutex<Vec<(usize, Vec<Run>)>> =
        Mutex::new(runs_by_partition.into_iter().enumerate().rev().collect());
    let results: Mutex<Vec<Option<u64>>> = Mutex::new(vec![None; reducers as usize]);
    let first_error: Mutex<Option<LocalError>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(reducers as usize) {
            scope.spawn(|| loop {
                let Some((r, runs)) = work.lock().expect("poisoned").pop() else {
                    break;
                };
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let task = TaskName {
                    job: module.name().to_owned(),
                    task: format!("reduce {r}"),
                    input: String::new(),
                };
                let out = match sink(r as u32) {
                    Ok(out) => out,
                    Err(source) => {
                        failed.store(true, Ordering::Relaxed);
                        let e = LocalError::Output {
                            partition: r as u32,
                            source,
                        };
                        first_error.lock().expect("poisoned").get_or_insert(e);
                        break;
                    }
                };
                let merged = Box::new(Merge::new(runs.into_iter().map(RunCursor::new).collect()));
                match exec.reduce_task(module, task, &job.args, job.limits, merged, Box::new(out)) {
                    Ok(n) => results.lock().expect("poisoned")[r] = Some(n),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .expect("poisoned")
                            .get_or_insert(e.into());
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("poisoned") {
        return Err(e);
    }
    tracing::info!(
        "reduce phase: {reducers} partitions in {:?}",
        reduce_started.elapsed()
    );
    let emitted: u64 = results
        .into_inner()
        .expect("poisoned")
        .into_iter()
        .map(|o| o.expect("every partition was reduced"))
        .sum();
    Ok(Counters {
        map_tasks: splits.len() as u64,
        input_bytes,
        map_output_pairs,
        output_bytes: emitted,
    })
}

fn map_split(
    exec: &Executor,
    module: &JobModule,
    job: &LocalJob,
    inputs: &[PathBuf],
    split: &Split,
    index: usize,
    reducers: u32,
) -> Result<Partitions, LocalError> {
    let path = &inputs[split.input];
    let input_err = |source| LocalError::Input {
        path: path.clone(),
        source,
    };
    let task = TaskName {
        job: module.name().to_owned(),
        task: format!("map {index}"),
        input: path.display().to_string(),
    };
    let mut map = exec.map_task(module, task, &job.args, reducers, job.limits)?;
    let mut splitter = RecordSplitter::new(split.start, split.end, job.batch);
    let mut file = File::open(path).map_err(input_err)?;
    file.seek(SeekFrom::Start(splitter.feed_from()))
        .map_err(input_err)?;
    let mut buf = vec![0u8; READ_CHUNK];
    while !splitter.is_done() {
        let n = file.read(&mut buf).map_err(input_err)?;
        if n == 0 {
            break;
        }
        splitter.feed(&buf[..n], |offset, batch| map.batch(batch, offset))?;
    }
    if let Some((offset, batch)) = splitter.finish() {
        map.batch(&batch, offset)?;
    }
    Ok(map.finish()?)
}
