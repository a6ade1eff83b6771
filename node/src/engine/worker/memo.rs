//! The worker's task memo: outputs of the tasks it ran, by key ([`p2pmr_protocol::memo`]), kept
//! across jobs and forgotten least recently used first once they hold more than their budget.
//!
//! An entry names blocks in the store (a map task's runs, a reduce task's output file); its
//! size is theirs. Forgetting an entry does not delete them: runs stay until the store is
//! cleaned like any other run, and reduce outputs are kept like any job output. Before an
//! entry is handed out its blocks are checked to be here still.
//!
//! Entries are also appended to a log in the repository (`<home>/`[`LOG`]), read back when
//! the daemon starts, so a restart forgets nothing. The log is a cache, not a record: appends are
//! not synced, each record carries the SHA-256 of its bytes and reading stops at the first
//! record that is torn or does not match (the rest is cut off), and it is rewritten with the
//! live entries once it holds twice as much.

use p2pmr_protocol::engine::MemoHit;
use p2pmr_protocol::memo::Remembered;
use p2pmr_protocol::Cid;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest log record read back (a map output names one run per partition).
const MAX_RECORD: usize = 4 << 20;

/// Remembered task outputs, least recently used forgotten first. Cheap to share.
#[derive(Debug)]
pub(super) struct Memo {
    budget: u64,
    state: Mutex<State>,
    /// The log, if there is one and it can be written.
    log: Mutex<Option<Log>>,
}

/// The memo's log file: where it is, and how much of it is live.
#[derive(Debug)]
struct Log {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
}

/// An entry's place: its key and which of the key's variants it is. Tasks with one key can
/// differ in what was settled after they ran (the leaves past their end, where they started,
/// the input's name: repeated content has many such tasks), so each variant is kept.
type Slot = (Cid, u64);

#[derive(Debug, Default)]
struct State {
    /// Slot → (entry, its bytes, when it was last used, the length of its log record).
    entries: BTreeMap<Slot, (Remembered, u64, u64, u64)>,
    /// When each entry was last used → its slot.
    by_use: BTreeMap<u64, Slot>,
    bytes: u64,
    /// Log bytes the live entries' records take.
    live: u64,
    clock: u64,
}

/// Which variant of its key an entry is: a hash of what a map output was found to depend on
/// besides its key (reduce outputs have one variant).
fn variant_of(entry: &Remembered) -> u64 {
    use std::hash::{Hash, Hasher};
    let Remembered::Map(m) = entry else {
        return 0;
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.after.hash(&mut h);
    m.positional.hash(&mut h);
    m.named.hash(&mut h);
    h.finish()
}

/// The bytes an entry stands for: its map runs' or its reduce output's.
fn size_of(entry: &Remembered) -> u64 {
    match entry {
        Remembered::Map(m) => m.output.parts.iter().flatten().map(|p| p.bytes).sum(),
        Remembered::Reduce(r) => r.tsize,
    }
}

/// The blocks that must still be here for an entry to be of use: each run's root, or the
/// reduce output's.
pub(super) fn roots_of(entry: &Remembered) -> Vec<Cid> {
    match entry {
        Remembered::Map(m) => m.output.parts.iter().flatten().map(|p| p.cid).collect(),
        Remembered::Reduce(r) => vec![r.cid],
    }
}

impl State {
    fn remove(&mut self, slot: &Slot) {
        if let Some((_, size, used, len)) = self.entries.remove(slot) {
            self.by_use.remove(&used);
            self.bytes -= size;
            self.live -= len;
        }
    }
}

/// The log's file name in a daemon's home. It names the records' encoding: a log written in an
/// earlier one (`memo`, before map outputs said where a task cut short ended) is not read as
/// this one, but removed ([`Memo::open`]'s caller).
pub(super) const LOG: &str = "memo.2";
/// Logs of earlier encodings.
pub(super) const OLD_LOGS: &[&str] = &["memo"];

/// One log record: a 4-byte length, the SHA-256 of the body, the body (postcard of the key's
/// bytes and the entry).
fn record(key: &Cid, entry: &Remembered) -> Vec<u8> {
    let body = postcard::to_allocvec(&(key.to_bytes(), entry)).expect("in-memory encoding");
    let mut out = Vec::with_capacity(36 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    out
}

/// A record read back: key, entry, the record's length.
type Logged = (Cid, Remembered, u64);

/// The records of the log at `path`, oldest first, and the length of its sound prefix.
fn read_log(path: &Path) -> std::io::Result<(Vec<Logged>, u64)> {
    let mut records = Vec::new();
    let mut good = 0u64;
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((records, 0)),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::new(file);
    loop {
        let mut head = [0u8; 36];
        if r.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD {
            break;
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() || Sha256::digest(&body)[..] != head[4..] {
            break;
        }
        let Ok((key, entry)) = postcard::from_bytes::<(Vec<u8>, Remembered)>(&body) else {
            break;
        };
        let Ok(key) = Cid::try_from(&key[..]) else {
            break;
        };
        records.push((key, entry, 36 + len as u64));
        good += 36 + len as u64;
    }
    Ok((records, good))
}

impl Memo {
    /// A memo holding entries for up to `budget` bytes (0 keeps nothing), in memory only.
    pub(super) fn new(budget: u64) -> Self {
        Self {
            budget,
            state: Mutex::new(State::default()),
            log: Mutex::new(None),
        }
    }

    /// A memo that keeps its entries in the log at `path` too, with what the log holds
    /// already. A log that cannot be read or written leaves the memo in memory only.
    pub(super) fn open(path: &Path, budget: u64) -> Self {
        let memo = Self::new(budget);
        if budget == 0 {
            return memo;
        }
        let opened = (|| {
            let (records, good) = read_log(path)?;
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(false)
                .open(path)?;
            // A torn or damaged tail is cut off; appends go after the sound records.
            file.set_len(good)?;
            file.seek(SeekFrom::End(0))?;
            std::io::Result::Ok((records, file, good))
        })();
        match opened {
            Ok((records, file, len)) => {
                for (key, entry, len) in records {
                    memo.insert(key, entry, len);
                }
                *memo.log.lock().expect("poisoned") = Some(Log {
                    path: path.to_owned(),
                    file,
                    len,
                });
            }
            Err(e) => tracing::warn!(
                "the task memo's log {} cannot be used ({e}); remembering in memory only",
                path.display()
            ),
        }
        memo
    }

    /// Remembers `entry` under `key` (replacing the same variant), forgetting the least
    /// recently used entries to make room, and appends it to the log. An entry larger than
    /// the whole budget is not kept.
    pub(super) fn put(&self, key: Cid, entry: Remembered) {
        if self.budget == 0 || size_of(&entry) > self.budget {
            return;
        }
        let bytes = record(&key, &entry);
        let live = self.insert(key, entry, bytes.len() as u64);
        let mut log = self.log.lock().expect("poisoned");
        let Some(l) = log.as_mut() else {
            return;
        };
        let appended = l.file.write_all(&bytes);
        l.len += bytes.len() as u64;
        let rewritten = match appended {
            Ok(()) if l.len > 2 * live + (1 << 20) => rewrite(l, &self.live_records()),
            other => other,
        };
        if let Err(e) = rewritten {
            tracing::warn!(
                "the task memo's log {} cannot be written ({e}); remembering in memory only",
                l.path.display()
            );
            *log = None;
        }
    }

    /// The live entries as log records, least recently used first.
    fn live_records(&self) -> Vec<Vec<u8>> {
        let s = self.state.lock().expect("poisoned");
        s.by_use
            .values()
            .filter_map(|slot| s.entries.get(slot).map(|(e, ..)| record(&slot.0, e)))
            .collect()
    }

    /// Puts `entry` in memory (its log record `len` bytes long); returns the log bytes the
    /// live entries take.
    fn insert(&self, key: Cid, entry: Remembered, len: u64) -> u64 {
        let size = size_of(&entry);
        let mut s = self.state.lock().expect("poisoned");
        if size > self.budget {
            return s.live;
        }
        let slot = (key, variant_of(&entry));
        s.remove(&slot);
        while s.bytes + size > self.budget {
            let Some((_, oldest)) = s.by_use.pop_first() else {
                break;
            };
            s.remove(&oldest);
        }
        s.clock += 1;
        let now = s.clock;
        s.entries.insert(slot, (entry, size, now, len));
        s.by_use.insert(now, slot);
        s.bytes += size;
        s.live += len;
        s.live
    }

    /// Every entry under `keys` (all variants), each marked as just used.
    pub(super) fn get(&self, keys: &[Cid]) -> Vec<MemoHit> {
        let mut s = self.state.lock().expect("poisoned");
        let mut hits = Vec::new();
        for key in keys {
            let slots: Vec<Slot> = s
                .entries
                .range((*key, 0)..=(*key, u64::MAX))
                .map(|(slot, _)| *slot)
                .collect();
            for slot in slots {
                s.clock += 1;
                let now = s.clock;
                let Some((entry, _, used, _)) = s.entries.get_mut(&slot) else {
                    continue;
                };
                let was = std::mem::replace(used, now);
                hits.push(MemoHit {
                    key: *key,
                    entry: entry.clone(),
                });
                s.by_use.remove(&was);
                s.by_use.insert(now, slot);
            }
        }
        hits
    }

    /// Forgets `entry` under `key` (its blocks are gone).
    pub(super) fn forget(&self, key: Cid, entry: &Remembered) {
        let slot = (key, variant_of(entry));
        self.state.lock().expect("poisoned").remove(&slot);
    }

    /// Entries kept and the bytes they stand for.
    pub(super) fn held(&self) -> (usize, u64) {
        let s = self.state.lock().expect("poisoned");
        (s.entries.len(), s.bytes)
    }
}

/// Replaces the log's file with `records` (written beside it, then renamed over it).
fn rewrite(log: &mut Log, records: &[Vec<u8>]) -> std::io::Result<()> {
    let tmp = log.path.with_extension("new");
    let mut file = File::create(&tmp)?;
    let mut len = 0;
    for r in records {
        file.write_all(r)?;
        len += r.len() as u64;
    }
    std::fs::rename(&tmp, &log.path)?;
    log.file = file;
    log.len = len;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::engine::{Counters, MapOutput, PartOut, ReduceOutput};
    use p2pmr_protocol::memo::MapMemo;
    use p2pmr_protocol::Block;

    fn cid(n: u32) -> Cid {
        *Block::raw(n.to_le_bytes().to_vec()).cid()
    }

    fn map_of(bytes: u64) -> Remembered {
        Remembered::Map(MapMemo {
            output: MapOutput {
                parts: vec![
                    Some(PartOut {
                        cid: cid(1000),
                        bytes,
                    }),
                    None,
                ],
                counters: Counters::default(),
                cut: None,
            },
            after: vec![],
            positional: None,
            named: None,
        })
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_budget_holds() {
        let memo = Memo::new(100);
        for k in 0..4 {
            memo.put(cid(k), map_of(30));
        }
        // 4 x 30 > 100: the first one went.
        assert_eq!(memo.held(), (3, 90));
        assert!(memo.get(&[cid(0)]).is_empty());
        // Using 1 makes 2 the oldest.
        assert_eq!(memo.get(&[cid(1)]).len(), 1);
        memo.put(cid(4), map_of(30));
        let left: Vec<Cid> = memo
            .get(&[cid(1), cid(2), cid(3), cid(4)])
            .into_iter()
            .map(|h| h.key)
            .collect();
        assert_eq!(left, vec![cid(1), cid(3), cid(4)]);
        // Too big for the budget: not kept, nothing forgotten for it.
        memo.put(cid(5), map_of(101));
        assert_eq!(memo.held(), (3, 90));
        // The same key again replaces its entry.
        memo.put(cid(4), map_of(10));
        assert_eq!(memo.held(), (3, 70));
        memo.forget(cid(4), &map_of(10));
        assert_eq!(memo.held(), (2, 60));
        let reduce = Remembered::Reduce(ReduceOutput {
            cid: cid(7),
            size: 5,
            tsize: 40,
            counters: Counters::default(),
        });
        memo.put(cid(6), reduce.clone());
        assert_eq!(memo.held(), (3, 100));
        assert_eq!(roots_of(&reduce), vec![cid(7)]);
        // Variants of one key (another continuation) are kept side by side.
        let mut other = map_of(5);
        if let Remembered::Map(m) = &mut other {
            m.after = vec![cid(99)];
        }
        memo.put(cid(3), other);
        assert_eq!(memo.get(&[cid(3)]).len(), 2);
        let off = Memo::new(0);
        off.put(cid(8), map_of(0));
        assert!(off.get(&[cid(8)]).is_empty());
    }

    #[test]
    fn the_log_brings_entries_back_and_stops_at_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memo");
        {
            let memo = Memo::open(&path, 1 << 20);
            for k in 0..3 {
                memo.put(cid(k), map_of(10 + u64::from(k)));
            }
        }
        let memo = Memo::open(&path, 1 << 20);
        assert_eq!(memo.held(), (3, 33));
        assert_eq!(memo.get(&[cid(1)])[0].entry, map_of(11));
        drop(memo);

        // A torn record at the end is cut off, and what is appended after it reads back.
        let sound = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[9, 0, 0, 0, 1, 2])
            .unwrap();
        Memo::open(&path, 1 << 20).put(cid(3), map_of(1));
        assert!(std::fs::metadata(&path).unwrap().len() > sound);
        assert_eq!(Memo::open(&path, 1 << 20).held(), (4, 34));

        // A damaged byte in the second record: the first one alone is believed.
        let mut bytes = std::fs::read(&path).unwrap();
        let first = 36 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        bytes[first + 40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let memo = Memo::open(&path, 1 << 20);
        assert_eq!(memo.held(), (1, 10));
        assert_eq!(memo.get(&[cid(0)]).len(), 1);
        drop(memo);

        // An entry put again and again: the log is rewritten with the live entries.
        let memo = Memo::open(&path, 1 << 20);
        for _ in 0..20_000 {
            memo.put(cid(5), map_of(7));
        }
        assert!(std::fs::metadata(&path).unwrap().len() < 3 << 20);
        drop(memo);
        assert_eq!(Memo::open(&path, 1 << 20).held(), (2, 17));
    }
}
