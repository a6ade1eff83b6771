//! The reduce side of the shuffle: each map task's run for a partition is a UnixFS file of
//! ABI-encoded pairs sorted by key, held by its mapper; a reduce task streams every run
//! (a window of block fetches per run, a bounded number in flight in all, a couple of blocks
//! buffered per run) and merges them into key groups the executor pulls values from, so a
//! partition is never held whole in memory.
//!
//! The fetching is async (the network); the merge runs on the reduce task's blocking thread
//! and pulls decoded bytes from one bounded channel per run.

use crate::blocks::{Fetcher, RemoteError};
use crate::engine::merge::{Cursor, Merge};
use libp2p::PeerId;
use p2pmr_protocol::unixfs::FileReader;
use p2pmr_protocol::{Block, Cid};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Semaphore};

/// Blocks buffered per run between the fetcher and the merge (besides the one being merged
/// and the fetches ahead, which [`look_ahead`] bounds).
const RUN_BUFFER: usize = 1;
/// Bytes of run blocks a reduce task may have fetched ahead of its merge, over all its runs.
const LOOK_AHEAD_BYTES: usize = 16 << 20;
/// Most blocks fetched ahead for one run.
const MAX_AHEAD: usize = 8;

/// Blocks each of `runs` runs stored in `chunk`-byte blocks fetches ahead: a share of
/// [`LOOK_AHEAD_BYTES`], at least one (so a task with thousands of map tasks still streams)
/// and at most [`MAX_AHEAD`].
fn look_ahead(runs: usize, chunk: usize) -> usize {
    (LOOK_AHEAD_BYTES / chunk.max(1) / runs.max(1)).clamp(1, MAX_AHEAD)
}

/// Largest key or value accepted from a run (a run is another peer's output).
const MAX_FIELD: usize = 256 << 20;

/// Why the shuffle failed, shared between the fetch tasks and the merge.
pub type ShuffleError = Arc<Mutex<Option<String>>>;
/// The runs that could not be fetched (their holder is gone), by root CID.
pub type MissingRuns = Arc<Mutex<Vec<Cid>>>;

/// Starts fetching `runs` (each with the peer that holds it, stored in `chunk`-byte blocks)
/// with at most `concurrency` block fetches in flight, and returns one stream per run plus the
/// counter of bytes that came over the network. Fetch tasks stop when their stream is dropped.
pub fn open_runs(
    fetcher: &Fetcher,
    runs: Vec<(Cid, Option<PeerId>)>,
    chunk: usize,
    concurrency: usize,
    error: &ShuffleError,
    missing: &MissingRuns,
) -> (Vec<RunStream>, Arc<AtomicU64>, tokio::task::JoinSet<()>) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let ahead = look_ahead(runs.len(), chunk);
    let remote_bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut streams = Vec::with_capacity(runs.len());
    for (cid, holder) in runs {
        let (tx, rx) = mpsc::channel(RUN_BUFFER);
        let (fetcher, permits, remote_bytes, missing) = (
            fetcher.clone(),
            permits.clone(),
            remote_bytes.clone(),
            missing.clone(),
        );
        tasks.spawn(async move {
            let result =
                fetch_run(&fetcher, cid, holder, ahead, &permits, &remote_bytes, &tx).await;
            if let Err(e) = result {
                // Whatever the cause, running the map task again is a remedy.
                missing.lock().expect("poisoned").push(cid);
                let _ = tx.send(Err(format!("map output {cid}: {e}"))).await;
            }
        });
        streams.push(RunStream {
            rx,
            buf: Vec::new(),
            pos: 0,
            head: None,
            error: error.clone(),
        });
    }
    (streams, remote_bytes, tasks)
}

async fn fetch_run(
    fetcher: &Fetcher,
    cid: Cid,
    holder: Option<PeerId>,
    ahead: usize,
    permits: &Arc<Semaphore>,
    remote_bytes: &AtomicU64,
    tx: &mpsc::Sender<Result<Vec<u8>, String>>,
) -> Result<(), RemoteError> {
    let mut reader = FileReader::new(cid);
    // Fetches already started, in the order the reader needs them. Each run keeps several in
    // flight: one at a time, a run would arrive at one block per round trip however fast the
    // link, and the merge waits on its slowest run.
    let mut inflight: VecDeque<(Cid, Fetching)> = VecDeque::new();
    while let Some(&next) = reader.next_needed() {
        // The window is the next `ahead` blocks the reader needs; a fetch that fell out of it
        // (the reader went down into a node) is dropped and started again when it is back.
        let window: Vec<Cid> = reader.upcoming().take(ahead).copied().collect();
        inflight.retain(|(c, _)| window.contains(c));
        for upcoming in window {
            if inflight.iter().any(|(c, _)| *c == upcoming) {
                continue;
            }
            let (fetcher, permits) = (fetcher.clone(), permits.clone());
            let task = tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.expect("never closed");
                fetcher.fetch_hinted(upcoming, holder).await
            });
            inflight.push_back((upcoming, Fetching(task)));
        }
        // Room in the run's buffer before taking the next block: a run holds the block being
        // merged, one more, and the window's fetches.
        let Ok(slot) = tx.reserve().await else {
            return Ok(());
        };
        let started = inflight.iter().position(|(c, _)| *c == next);
        let (block, remote) = match started.and_then(|i| inflight.remove(i)) {
            Some((_, mut fetching)) => (&mut fetching.0).await.expect("fetch task panicked")?,
            None => fetcher.fetch_hinted(next, holder).await?,
        };
        if remote {
            remote_bytes.fetch_add(block.len() as u64, Ordering::Relaxed);
        }
        let bytes = reader.feed(&block)?;
        if bytes.is_empty() {
            continue;
        }
        // Leaves are raw blocks whose bytes are the run's: pass the buffer on, uncopied.
        let bytes = if bytes.len() == block.len() {
            block.into_data()
        } else {
            bytes.to_vec()
        };
        slot.send(Ok(bytes));
    }
    Ok(())
}

/// A block fetch running ahead of a run's reader, stopped if the run is dropped first.
struct Fetching(tokio::task::JoinHandle<Result<(Block, bool), RemoteError>>);

impl Drop for Fetching {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One run being read: decoded pair by pair as its bytes arrive.
#[derive(Debug)]
pub struct RunStream {
    rx: mpsc::Receiver<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    /// Where the pair after the current one starts in `buf`.
    pos: usize,
    /// The current pair's key and value in `buf` (`None` before the first read and at the
    /// end).
    head: Option<(Range<usize>, Range<usize>)>,
    error: ShuffleError,
}

fn field(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let len = u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?) as usize;
    Some((at + 4, len))
}

impl RunStream {
    fn fail(&self, reason: String) {
        self.error.lock().expect("poisoned").get_or_insert(reason);
    }

    /// Where the next pair's key and value are in `buf`, or `None` at the end of the run or on
    /// an error (recorded in the shared error, which the reduce task checks when the merge is
    /// over).
    fn next_pair(&mut self) -> Option<(Range<usize>, Range<usize>)> {
        loop {
            if let Some((k, klen)) = field(&self.buf, self.pos) {
                if klen > MAX_FIELD {
                    self.fail(format!("a map output key of {klen} bytes"));
                    return None;
                }
                if let Some((v, vlen)) = field(&self.buf, k + klen) {
                    if vlen > MAX_FIELD {
                        self.fail(format!("a map output value of {vlen} bytes"));
                        return None;
                    }
                    if v + vlen <= self.buf.len() {
                        self.pos = v + vlen;
                        return Some((k..k + klen, v..v + vlen));
                    }
                }
            }
            match self.rx.blocking_recv() {
                // The current pair is left behind here: it is only read until the next one.
                Some(Ok(bytes)) => {
                    if self.pos == self.buf.len() {
                        // Nothing left over: take the block's buffer as it is.
                        self.buf = bytes;
                    } else {
                        self.buf.drain(..self.pos);
                        self.buf.extend_from_slice(&bytes);
                    }
                    self.pos = 0;
                }
                Some(Err(e)) => {
                    self.fail(e);
                    return None;
                }
                None => {
                    if self.pos < self.buf.len() {
                        self.fail("a map output ends inside a pair".into());
                    }
                    self.buf = Vec::new();
                    return None;
                }
            }
        }
    }
}

impl Cursor for RunStream {
    fn head(&self) -> Option<(&[u8], &[u8])> {
        let (k, v) = self.head.clone()?;
        Some((&self.buf[k], &self.buf[v]))
    }

    fn advance(&mut self) {
        self.head = self.next_pair();
    }
}

/// Merges run streams into key groups in key order; equal keys' values come in run order,
/// then emission order (as in `run-local`), so output does not depend on timing. Blocks until
/// every run has its first pair: call from a blocking thread.
pub fn merge(mut runs: Vec<RunStream>) -> Merge<RunStream> {
    for run in &mut runs {
        run.advance();
    }
    Merge::new(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::merge::tests::{collect, run};
    use crate::engine::merge::RunCursor;
    use crate::engine::runtime::Run;
    use std::io::Write;

    /// A stream that yields `pieces` and then ends, recording errors in `error`.
    fn stream_of(pieces: Vec<Vec<u8>>, error: &ShuffleError) -> RunStream {
        let (tx, rx) = mpsc::channel(pieces.len().max(1));
        for p in pieces {
            tx.try_send(Ok(p)).unwrap();
        }
        RunStream {
            rx,
            buf: Vec::new(),
            pos: 0,
            head: None,
            error: error.clone(),
        }
    }

    fn stream(run: &Run, piece: usize) -> RunStream {
        let pieces = run
            .to_bytes()
            .chunks(piece.max(1))
            .map(<[u8]>::to_vec)
            .collect();
        stream_of(pieces, &ShuffleError::default())
    }

    fn in_memory(runs: Vec<Run>) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
        collect(&mut Merge::new(
            runs.into_iter().map(RunCursor::new).collect(),
        ))
    }

    fn streamed(streams: Vec<RunStream>) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
        collect(&mut merge(streams))
    }

    #[test]
    fn streaming_merge_equals_in_memory_merge_at_any_piece_size() {
        let runs = vec![
            run(&[("b", "1"), ("a", "2"), ("c", "3"), ("a", "4")]),
            run(&[]),
            run(&[("a", "5"), ("d", "6"), ("bb", "")]),
            run(&[("", "empty key"), ("c", "7")]),
        ];
        let expected = in_memory(runs.clone());
        for piece in [1, 2, 3, 7, 1000] {
            let streams = runs.iter().map(|r| stream(r, piece)).collect();
            assert_eq!(streamed(streams), expected, "piece {piece}");
        }
    }

    #[test]
    fn look_ahead_shares_its_budget_between_runs_within_bounds() {
        use p2pmr_protocol::engine::{MAX_RUN_CHUNK, MIN_RUN_CHUNK};
        for chunk in [MIN_RUN_CHUNK as usize, MAX_RUN_CHUNK as usize] {
            let per_run = LOOK_AHEAD_BYTES / chunk;
            for (runs, ahead) in [
                (0, MAX_AHEAD),
                (1, MAX_AHEAD),
                (per_run / MAX_AHEAD, MAX_AHEAD),
                (per_run / MAX_AHEAD + 1, MAX_AHEAD - 1),
                (per_run / 2, 2),
                (per_run, 1),
                (per_run + 1, 1),
                (100_000, 1),
            ] {
                assert_eq!(look_ahead(runs, chunk), ahead, "{runs} runs of {chunk}");
            }
        }
    }

    /// Runs stored as files with tiny leaves and narrow nodes (several levels of inner nodes,
    /// so the window moves down into nodes) and repeated leaves (the same block needed twice),
    /// read through a fetcher with a look-ahead window, merge as they do in memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_runs_read_ahead_merge_as_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::repo::store::BlockStore::open(dir.path()).unwrap();
        let layout = p2pmr_protocol::unixfs::Layout::new(8, 3).unwrap();
        let mut runs = Vec::new();
        for r in 0..3 {
            let pairs: Vec<(String, String)> = (0..200)
                .map(|i| (format!("k{:03}", (i * 7 + r) % 150), "same".to_string()))
                .collect();
            let pairs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            runs.push(run(&pairs));
        }
        runs.push(run(&[("k000", "aaaaaaaa"); 40]));
        let mut stored = Vec::new();
        for r in &runs {
            let mut w = crate::repo::files::FileWriter::scratch(&store, layout);
            w.write_all(&r.to_bytes()).unwrap();
            stored.push((w.finish().unwrap().root, None));
        }
        let fetcher = Fetcher::new(None, Some(store));
        let (error, missing) = (ShuffleError::default(), MissingRuns::default());
        let (streams, remote, _tasks) = open_runs(&fetcher, stored, 8, 2, &error, &missing);
        let merged = tokio::task::spawn_blocking(move || streamed(streams))
            .await
            .unwrap();
        assert_eq!(merged, in_memory(runs));
        assert!(error.lock().unwrap().is_none());
        assert!(missing.lock().unwrap().is_empty());
        assert_eq!(remote.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn truncated_and_hostile_runs_are_errors() {
        let r = run(&[("a", "1"), ("b", "2")]);
        let bytes = r.to_bytes();
        let error = ShuffleError::default();
        let truncated = stream_of(vec![bytes[..bytes.len() - 1].to_vec()], &error);
        assert_eq!(streamed(vec![truncated]).len(), 1);
        let reason = error.lock().unwrap().clone().unwrap();
        assert!(reason.contains("ends inside"), "{reason}");

        let error = ShuffleError::default();
        let huge = stream_of(vec![u32::MAX.to_le_bytes().to_vec()], &error);
        assert!(streamed(vec![huge]).is_empty());
        assert!(error.lock().unwrap().is_some());
    }
}
