//! The ledger of client writes: which blocks clients pushed here in add sessions they have not
//! committed yet (so what an interrupted or abandoned add left behind can be collected), and
//! how many bytes each client has stored here (so its allowance survives restarts).
//!
//! A client's add pushes its blocks under a random session number and, once every block is
//! durable, sends `Commit` for the session: from then on its blocks are kept like any other.
//! Blocks of a session that is neither committed nor added to for a grace period are deleted
//! ([`Ledger::collect`]: the daemon's timer and `p2pmr repo gc`). A block that was already
//! here when a session pushed it belongs to something else and is never collected, unless
//! it was itself provisional; then it is kept while any session holding it may still commit.
//!
//! `<home>/ledger` is an append-only text log, one record per line:
//! - `P <peer> <session> <cid> <bytes> <unix secs>`: a block pushed in a session (`bytes`: what
//!   it added to the store, 0 if it was there already);
//! - `C <peer> <session>`: the session was committed (synced before the commit is answered);
//! - `X <peer> <session>`: the session's blocks were collected;
//! - `T <peer> <bytes>`: a client's committed bytes (written when the log is compacted).
//!
//! A line cut short by a crash is ignored. The log is rewritten with the live records only
//! when it holds many more records than are live. It is locked while open, so a second
//! process (`p2pmr repo gc` while the daemon runs) is turned away instead of racing.

use crate::repo::store::BlockStore;
use libp2p::PeerId;
use p2pmr_protocol::Cid;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// How long a client's add session may go without a block or a commit before its blocks are
/// collected, unless configured.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);
/// Times the lock is tried, 50 ms apart, before the ledger counts as in use.
const LOCK_TRIES: u32 = 40;
/// Records in the log beyond which, if most are dead, it is rewritten.
const COMPACT_AFTER: usize = 4096;

/// Errors of the ledger.
#[derive(Debug, Error)]
pub enum LedgerError {
    /// Another process holds the ledger.
    #[error("{path} is in use: is a daemon running on this repository? (it collects by itself)")]
    Busy {
        /// The ledger's path.
        path: String,
    },
    /// Reading or writing the log failed.
    #[error("ledger {path}")]
    Io {
        /// The ledger's path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A client and one of its add sessions.
type Key = (PeerId, u64);

#[derive(Debug, Default)]
struct Session {
    /// Blocks pushed in the session, with the bytes each added to the store.
    blocks: Vec<(Cid, u64)>,
    /// When it last pushed a block (unix seconds).
    last: u64,
}

#[derive(Debug)]
struct State {
    sessions: HashMap<Key, Session>,
    /// Each provisional block's sessions.
    index: HashMap<Cid, Vec<Key>>,
    /// Bytes of each client's committed sessions.
    committed: HashMap<PeerId, u64>,
    log: File,
    records: usize,
    unsynced: bool,
}

/// What [`Ledger::collect`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Sessions that expired.
    pub sessions: usize,
    /// Blocks deleted.
    pub blocks: usize,
    /// Bytes those blocks took.
    pub bytes: u64,
    /// Provisional blocks kept (their sessions may still commit).
    pub kept: usize,
}

/// The ledger; a cheap `Clone` handle.
#[derive(Debug, Clone)]
pub struct Ledger {
    inner: Arc<Mutex<State>>,
    /// Held shared by each client write (from its check of the store to its record here) and
    /// exclusively while blocks are deleted, so a block a client was just told is stored is
    /// never deleted under it.
    gate: Arc<RwLock<()>>,
    path: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Ledger {
    /// Opens (or creates) the ledger at `path` (the repository's
    /// [`ledger`](crate::Repo::ledger)), locks it and loads it.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let err = |source| LedgerError::Io {
            path: path.display().to_string(),
            source,
        };
        let log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        // A daemon of this process that is stopping may hold it a moment longer.
        #[cfg(unix)]
        for tries in 0.. {
            match rustix::fs::flock(&log, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(_) if tries < LOCK_TRIES => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => {
                    return Err(LedgerError::Busy {
                        path: path.display().to_string(),
                    })
                }
            }
        }
        let mut state = State {
            sessions: HashMap::new(),
            index: HashMap::new(),
            committed: HashMap::new(),
            log: log.try_clone().map_err(err)?,
            records: 0,
            unsynced: false,
        };
        // Every complete line; a last one cut short by a crash is cut off, so the next record
        // starts a line of its own.
        let mut good = 0u64;
        let mut reader = BufReader::new(&log);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).map_err(err)? > 0 {
            if line.last() != Some(&b'\n') {
                break;
            }
            good += line.len() as u64;
            let text = std::str::from_utf8(&line[..line.len() - 1]).ok();
            if let Some(record) = text.and_then(Record::parse) {
                state.apply(record);
                state.records += 1;
            }
            line.clear();
        }
        if log.metadata().map_err(err)?.len() > good {
            log.set_len(good).map_err(err)?;
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(state)),
            gate: Arc::default(),
            path: path.to_owned(),
        })
    }

    fn err(&self, source: io::Error) -> LedgerError {
        LedgerError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Holds off collection while a client's block is checked, stored and recorded.
    pub(crate) fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().expect("poisoned")
    }

    /// Records that `peer` pushed `cid` in `session`, adding `bytes` to the store (0 if the
    /// block was here already). Durable after the next [`Ledger::sync`]. Call with
    /// [`Ledger::writing`] held from before the store was checked.
    pub(crate) fn pushed(
        &self,
        peer: PeerId,
        session: u64,
        cid: Cid,
        bytes: u64,
    ) -> Result<(), LedgerError> {
        let mut s = self.inner.lock().expect("poisoned");
        if !s.provisional(&cid, bytes) {
            return Ok(());
        }
        let record = Record::Pushed {
            key: (peer, session),
            cid,
            bytes,
            at: now_secs(),
        };
        s.write(&record).map_err(|e| self.err(e))?;
        s.apply(record);
        Ok(())
    }

    /// `peer`'s session `session` belongs to a completed add: its blocks are kept for good.
    /// Durable when it returns.
    pub(crate) fn commit(&self, peer: PeerId, session: u64) -> Result<(), LedgerError> {
        let mut s = self.inner.lock().expect("poisoned");
        let key = (peer, session);
        if !s.sessions.contains_key(&key) {
            return Ok(()); // nothing provisional: every block was here already
        }
        let record = Record::Committed(key);
        s.write(&record).map_err(|e| self.err(e))?;
        s.apply(record);
        s.log.sync_data().map_err(|e| self.err(e))?;
        s.unsynced = false;
        Ok(())
    }

    /// Makes the recorded pushes durable.
    pub(crate) fn sync(&self) -> Result<(), LedgerError> {
        let mut s = self.inner.lock().expect("poisoned");
        if s.unsynced {
            s.log.sync_data().map_err(|e| self.err(e))?;
            s.unsynced = false;
        }
        Ok(())
    }

    /// Bytes each client has stored here: committed, and provisional.
    pub(crate) fn by_client(&self) -> HashMap<PeerId, u64> {
        let s = self.inner.lock().expect("poisoned");
        let mut totals = s.committed.clone();
        for ((peer, _), session) in &s.sessions {
            *totals.entry(*peer).or_default() += session.blocks.iter().map(|b| b.1).sum::<u64>();
        }
        totals
    }

    /// Deletes from `store` the blocks of sessions that have pushed nothing for `grace` and
    /// were not committed, unless a live session holds them too. `released` is told each
    /// client's bytes given back. Blocks the calling thread (file deletions).
    pub fn collect(
        &self,
        store: &BlockStore,
        grace: Duration,
        mut released: impl FnMut(PeerId, u64),
    ) -> Result<Collected, LedgerError> {
        let _gate = self.gate.write().expect("poisoned");
        let mut s = self.inner.lock().expect("poisoned");
        let cutoff = now_secs().saturating_sub(grace.as_secs());
        let due: Vec<Key> = s
            .sessions
            .iter()
            .filter(|(_, session)| session.last <= cutoff)
            .map(|(key, _)| *key)
            .collect();
        let mut done = Collected {
            sessions: due.len(),
            ..Collected::default()
        };
        for key in due {
            let session = s.sessions.remove(&key).expect("listed");
            let mut freed = 0;
            for (cid, bytes) in session.blocks {
                let Some(holders) = s.index.get_mut(&cid) else {
                    // Committed by another session since: kept, and still this client's.
                    *s.committed.entry(key.0).or_default() += bytes;
                    continue;
                };
                holders.retain(|k| *k != key);
                if !holders.is_empty() {
                    *s.committed.entry(key.0).or_default() += bytes;
                    continue;
                }
                s.index.remove(&cid);
                match store.delete(&cid) {
                    Ok(true) => {
                        done.blocks += 1;
                        done.bytes += bytes;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!("cannot collect {cid}: {e}"),
                }
                freed += bytes;
            }
            // Recorded after the deletions: a crash in between collects them again.
            s.write(&Record::Expired(key)).map_err(|e| self.err(e))?;
            released(key.0, freed);
        }
        done.kept = s.index.len();
        s.log.sync_data().map_err(|e| self.err(e))?;
        s.unsynced = false;
        self.compact(&mut s)?;
        Ok(done)
    }

    /// Rewrites the log with the live records only, if most of it is dead.
    fn compact(&self, s: &mut State) -> Result<(), LedgerError> {
        let live: usize =
            s.committed.len() + s.sessions.values().map(|x| x.blocks.len()).sum::<usize>();
        if s.records < COMPACT_AFTER || s.records < 4 * live {
            return Ok(());
        }
        let tmp = self.path.with_extension("new");
        let mut out = io::BufWriter::new(File::create(&tmp).map_err(|e| self.err(e))?);
        let mut records = 0;
        for (peer, bytes) in &s.committed {
            writeln!(out, "{}", Record::Total(*peer, *bytes)).map_err(|e| self.err(e))?;
            records += 1;
        }
        for (key, session) in &s.sessions {
            for (cid, bytes) in &session.blocks {
                let record = Record::Pushed {
                    key: *key,
                    cid: *cid,
                    bytes: *bytes,
                    at: session.last,
                };
                writeln!(out, "{record}").map_err(|e| self.err(e))?;
                records += 1;
            }
        }
        let file = out.into_inner().map_err(|e| self.err(e.into_error()))?;
        file.sync_all().map_err(|e| self.err(e))?;
        // The new log is locked before it takes the old one's name, and is written on at its
        // end from then on.
        #[cfg(unix)]
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| self.err(e.into()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.err(e))?;
        }
        s.log = file;
        s.records = records;
        Ok(())
    }
}

impl State {
    /// Whether a push of `cid` that added `bytes` is provisional: the block is new here, or
    /// itself provisional (a block already here for good is not).
    fn provisional(&self, cid: &Cid, bytes: u64) -> bool {
        bytes > 0 || self.index.contains_key(cid)
    }

    fn write(&mut self, record: &Record) -> io::Result<()> {
        writeln!(self.log, "{record}")?;
        self.records += 1;
        self.unsynced = true;
        Ok(())
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Pushed {
                key,
                cid,
                bytes,
                at,
            } => {
                if !self.provisional(&cid, bytes) {
                    return;
                }
                let session = self.sessions.entry(key).or_default();
                session.blocks.push((cid, bytes));
                session.last = session.last.max(at);
                let holders = self.index.entry(cid).or_default();
                if !holders.contains(&key) {
                    holders.push(key);
                }
            }
            Record::Committed(key) => {
                if let Some(session) = self.sessions.remove(&key) {
                    for (cid, bytes) in session.blocks {
                        self.index.remove(&cid);
                        *self.committed.entry(key.0).or_default() += bytes;
                    }
                }
            }
            Record::Expired(key) => {
                if let Some(session) = self.sessions.remove(&key) {
                    for (cid, _) in session.blocks {
                        if let Some(holders) = self.index.get_mut(&cid) {
                            holders.retain(|k| *k != key);
                            if holders.is_empty() {
                                self.index.remove(&cid);
                            }
                        }
                    }
                }
            }
            Record::Total(peer, bytes) => {
                *self.committed.entry(peer).or_default() += bytes;
            }
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Pushed {
        key: Key,
        cid: Cid,
        bytes: u64,
        at: u64,
    },
    Committed(Key),
    Expired(Key),
    Total(PeerId, u64),
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pushed {
                key: (peer, session),
                cid,
                bytes,
                at,
            } => write!(f, "P {peer} {session} {cid} {bytes} {at}"),
            Self::Committed((peer, session)) => write!(f, "C {peer} {session}"),
            Self::Expired((peer, session)) => write!(f, "X {peer} {session}"),
            Self::Total(peer, bytes) => write!(f, "T {peer} {bytes}"),
        }
    }
}

impl Record {
    fn parse(line: &str) -> Option<Self> {
        let mut f = line.split(' ');
        let kind = f.next()?;
        let peer: PeerId = f.next()?.parse().ok()?;
        let record = match kind {
            "P" => Self::Pushed {
                key: (peer, f.next()?.parse().ok()?),
                cid: f.next()?.parse().ok()?,
                bytes: f.next()?.parse().ok()?,
                at: f.next()?.parse().ok()?,
            },
            "C" => Self::Committed((peer, f.next()?.parse().ok()?)),
            "X" => Self::Expired((peer, f.next()?.parse().ok()?)),
            "T" => Self::Total(peer, f.next()?.parse().ok()?),
            _ => return None,
        };
        f.next().is_none().then_some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::Block;

    fn block(n: u32) -> Block {
        Block::raw(n.to_le_bytes().repeat(64))
    }

    /// A store holding blocks 0..n, and a ledger beside it.
    fn setup(n: u32) -> (tempfile::TempDir, BlockStore, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(&dir.path().join("blocks")).unwrap();
        for i in 0..n {
            store.put(&block(i)).unwrap();
        }
        let ledger = Ledger::open(&dir.path().join("ledger")).unwrap();
        (dir, store, ledger)
    }

    #[test]
    fn uncommitted_sessions_are_collected_after_the_grace_period_and_committed_ones_kept() {
        let (dir, store, ledger) = setup(5);
        let (a, b) = (PeerId::random(), PeerId::random());
        let cid = |i| *block(i).cid();
        ledger.pushed(a, 1, cid(0), 256).unwrap(); // a's add 1 completes
        ledger.pushed(a, 1, cid(1), 256).unwrap();
        ledger.commit(a, 1).unwrap();
        ledger.pushed(a, 2, cid(2), 256).unwrap(); // a's add 2 is abandoned
        ledger.pushed(b, 1, cid(3), 256).unwrap(); // b's add shares a block with it
        ledger.pushed(b, 1, cid(2), 0).unwrap();
        ledger.pushed(b, 1, cid(0), 0).unwrap(); // already kept for good: not provisional
        ledger.pushed(b, 1, cid(4), 256).unwrap();
        ledger.sync().unwrap();
        assert_eq!(ledger.by_client(), [(a, 768), (b, 512)].into());

        // Within the grace period nothing goes.
        let none = ledger.collect(&store, DEFAULT_GC_GRACE, |_, _| {}).unwrap();
        assert_eq!((none.blocks, none.kept), (0, 3));

        // The ledger survives a restart (it is locked while open).
        assert!(matches!(
            Ledger::open(&dir.path().join("ledger")),
            Err(LedgerError::Busy { .. })
        ));
        drop(ledger);
        let ledger = Ledger::open(&dir.path().join("ledger")).unwrap();
        assert_eq!(ledger.by_client(), [(a, 768), (b, 512)].into());

        // b commits after all: its blocks stay, a's shared one too.
        ledger.commit(b, 1).unwrap();
        let mut given_back = Vec::new();
        let done = ledger
            .collect(&store, Duration::ZERO, |p, n| given_back.push((p, n)))
            .unwrap();
        assert_eq!(
            done,
            Collected {
                sessions: 1,
                blocks: 0,
                bytes: 0,
                kept: 0
            }
        );
        assert_eq!(given_back, vec![(a, 0)]);
        for i in 0..5 {
            assert!(store.has(&cid(i)), "block {i}");
        }

        // An abandoned session alone: its new blocks go, and its client gets the bytes back.
        ledger.pushed(b, 9, *block(7).cid(), 256).unwrap();
        store.put(&block(7)).unwrap();
        let done = ledger
            .collect(&store, Duration::ZERO, |p, n| given_back.push((p, n)))
            .unwrap();
        assert_eq!((done.blocks, done.bytes), (1, 256));
        assert!(!store.has(block(7).cid()));
        assert_eq!(given_back.last(), Some(&(b, 256)));
        assert_eq!(ledger.by_client(), [(a, 768), (b, 512)].into());
    }

    #[test]
    fn a_cut_line_is_ignored_and_the_log_compacts() {
        let (dir, store, ledger) = setup(0);
        let peer = PeerId::random();
        for session in 0..(COMPACT_AFTER as u64) {
            let b = block(session as u32);
            store.put(&b).unwrap();
            ledger.pushed(peer, session, *b.cid(), 10).unwrap();
            if session % 2 == 0 {
                ledger.commit(peer, session).unwrap();
            }
        }
        let path = dir.path().join("ledger");
        let before = std::fs::metadata(&path).unwrap().len();
        let done = ledger.collect(&store, Duration::ZERO, |_, _| {}).unwrap();
        assert_eq!(done.blocks, COMPACT_AFTER / 2);
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(after < before / 10, "{before} -> {after}");
        let totals = ledger.by_client();
        drop(ledger);
        // A record cut short by a crash.
        let mut log = OpenOptions::new().append(true).open(&path).unwrap();
        log.write_all(b"P 12D3KooW").unwrap();
        drop(log);
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.by_client(), totals);
        assert_eq!(totals[&peer], 10 * COMPACT_AFTER as u64 / 2);
    }
}
