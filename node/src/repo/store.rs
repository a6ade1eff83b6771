//! The on-disk block store: one file per block under `<home>/blocks`, keyed by CID.
//!
//! Layout: `blocks/<XY>/<cid>` where `<cid>` is the canonical (CIDv1, base32) name and `XY`
//! its next-to-last two characters, as kubo's flatfs shards, which spreads blocks evenly over
//! at most 1024 directories.
//!
//! Crash safety: on Linux a block is written to an unnamed file (`O_TMPFILE`) in its shard
//! and linked under its final name once whole; elsewhere, or on filesystems without unnamed
//! files, it is written to `tmp/` and renamed into place. Either way a `kill -9` at any moment
//! leaves either no file or the whole block under the final name. Leftover temporary files of
//! dead processes are removed when a store is opened. Durability against power loss
//! is explicit: [`BlockStore::sync`] fsyncs given blocks and their directories, and callers
//! acknowledge data (print a CID, answer a peer) only after it returns.
//!
//! Trust: every read checks the bytes. Each block is written with its [`Seal`] (a CRC-32 of
//! its CID and bytes, taken from the verified block) in an extended attribute of its file, and
//! a read whose bytes match their seal is a block without hashing them again: the rot, torn
//! writes and misfiled blocks a disk can produce all change the CRC, and the CID's hash costs
//! many times as much per byte. Bytes without a seal (a filesystem without extended
//! attributes, a block written before seals) or not matching it are checked against their CID
//! (and sealed if they pass, since then the seal was the damaged part). A block that does not
//! match its CID is moved to `quarantine/` and reported as [`StoreError::Corrupt`]; it is never
//! returned as data.
//!
//! The store is a cheap `Clone` handle and is safe to use from many threads and processes at
//! once (renames are atomic, identical blocks are interchangeable). It does blocking I/O;
//! async callers wrap it in `spawn_blocking`.

use p2pmr_protocol::block::{canonical, BlockError};
use p2pmr_protocol::{Block, Cid, Seal, MAX_BLOCK_SIZE};
#[cfg(not(target_os = "linux"))]
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
#[cfg(target_os = "linux")]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// Errors of the block store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// No block with this CID is stored.
    #[error("block {0} is not in the local store")]
    NotFound(Cid),
    /// The stored bytes do not match the CID; they were moved aside.
    #[error("block {cid} is corrupt on disk ({reason}); moved to {}", quarantined.display())]
    Corrupt {
        /// The block's CID.
        cid: Cid,
        /// What was wrong.
        reason: String,
        /// Where the bad file now is.
        quarantined: PathBuf,
    },
    /// A CID that cannot be verified, so cannot be stored or served.
    #[error(transparent)]
    Unverifiable(BlockError),
    /// A filesystem operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The alphabet of base32 CIDs, whose characters name the shard directories.
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Newly stored blocks announced to each follower before it is told it fell behind.
const ARRIVALS: usize = 256;

/// Block count and bytes held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Number of blocks.
    pub blocks: u64,
    /// Sum of their sizes in bytes.
    pub bytes: u64,
}

/// Handle to a block store directory.
#[derive(Debug, Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    blocks: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
    next_tmp: AtomicU64,
    /// Whether blocks are written as unnamed files (see [`put_unnamed`]); cleared for good
    /// the first time the filesystem refuses one.
    #[cfg(target_os = "linux")]
    tmpfile: AtomicBool,
    /// Blocks newly stored, by canonical CID, for whoever waits for one (Bitswap wants).
    arrivals: tokio::sync::broadcast::Sender<Cid>,
    /// Blocks and bytes newly stored since the store was opened (see [`BlockStore::written`]).
    written: (AtomicU64, AtomicU64),
}

impl BlockStore {
    /// Opens (creating if needed) the store under `dir`, and removes temporary files left by
    /// processes that died mid-write.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let inner = Inner {
            blocks: dir.join("blocks"),
            tmp: dir.join("tmp"),
            quarantine: dir.join("quarantine"),
            next_tmp: AtomicU64::new(0),
            #[cfg(target_os = "linux")]
            tmpfile: AtomicBool::new(true),
            arrivals: tokio::sync::broadcast::channel(ARRIVALS).0,
            written: (AtomicU64::new(0), AtomicU64::new(0)),
        };
        let new = !inner.blocks.is_dir();
        for d in [&inner.blocks, &inner.tmp, &inner.quarantine] {
            fs::create_dir_all(d).map_err(io_err("create directory", d))?;
        }
        if new {
            // All 1024 shards up front: creating them one by one as blocks arrive doubled the
            // time of a first `add` (a mkdir costs as much as writing a 256 KiB block here).
            for a in BASE32 {
                for b in BASE32 {
                    let d = inner.blocks.join(format!("{}{}", *a as char, *b as char));
                    fs::create_dir_all(&d).map_err(io_err("create directory", &d))?;
                }
            }
        }
        let store = Self {
            inner: Arc::new(inner),
        };
        store.remove_stale_tmp()?;
        Ok(store)
    }

    /// Temporary files are named `<pid>.<n>`; those of processes no longer running are debris.
    fn remove_stale_tmp(&self) -> Result<(), StoreError> {
        let tmp = &self.inner.tmp;
        for entry in fs::read_dir(tmp).map_err(io_err("list", tmp))? {
            let entry = entry.map_err(io_err("list", tmp))?;
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('.').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| p == std::process::id() || process_alive(p));
            if !alive {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Where the block with this CID lives.
    fn path_of(&self, cid: &Cid) -> PathBuf {
        let name = canonical(cid).to_string();
        let shard = &name[name.len() - 3..name.len() - 1];
        self.inner.blocks.join(shard).join(name)
    }

    /// Whether a block is stored (without verifying it).
    pub fn has(&self, cid: &Cid) -> bool {
        self.path_of(cid).is_file()
    }

    /// Asks the OS to start reading a stored block from disk into its cache, so that a later
    /// [`get`](Self::get) does not wait for the device. Readers call it for the next blocks of
    /// a file: read one at a time, cold blocks cost a device round trip each, and a cold `cat`
    /// takes several times as long as a cached one. A hint only: errors are ignored.
    pub fn prefetch(&self, cid: &Cid) {
        #[cfg(target_os = "linux")]
        if let Ok(file) = File::open(self.path_of(cid)) {
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = cid;
    }

    /// Reads and verifies a block (by its seal, else by its CID: see the module's "Trust"). A
    /// block whose bytes do not hash to `cid` is quarantined and reported as
    /// [`StoreError::Corrupt`].
    pub fn get(&self, cid: &Cid) -> Result<Block, StoreError> {
        self.read(cid, true)
    }

    /// Reads a block and checks it against its CID's hash whatever its seal says (and mends
    /// the seal): the scrub of `repo verify`, which must find a block whose bytes and seal
    /// were both changed. A block whose bytes do not hash to `cid` is quarantined and reported
    /// as [`StoreError::Corrupt`].
    pub fn get_rehashed(&self, cid: &Cid) -> Result<Block, StoreError> {
        self.read(cid, false)
    }

    fn read(&self, cid: &Cid, by_seal: bool) -> Result<Block, StoreError> {
        let path = self.path_of(cid);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(*cid))
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let meta = file.metadata().map_err(io_err("stat", &path))?;
        if !meta.is_file() {
            // A directory (say) where the block should be: no block is stored there.
            drop(file);
            return Err(self.quarantine(cid, &path, "not a file".to_owned()));
        }
        let len = meta.len();
        if len > MAX_BLOCK_SIZE as u64 {
            return Err(self.quarantine(
                cid,
                &path,
                format!("{len} bytes, over the block size limit"),
            ));
        }
        let mut data = Vec::with_capacity(len as usize);
        file.read_to_end(&mut data).map_err(io_err("read", &path))?;
        let kept = kept_seal(&file);
        let data = match kept.filter(|_| by_seal) {
            Some(seal) => match Block::unseal(*cid, data, seal) {
                Ok(block) => return Ok(block),
                Err(data) => data,
            },
            None => data,
        };
        match Block::new(*cid, data) {
            Ok(block) => {
                // Written only when missing or wrong: a scrub of sound blocks writes nothing.
                if kept != Some(block.seal()) {
                    keep_seal(&file, block.seal());
                }
                Ok(block)
            }
            Err(BlockError::HashMismatch { .. }) => {
                Err(self.quarantine(cid, &path, "bytes do not match the hash".to_owned()))
            }
            Err(e) => Err(StoreError::Unverifiable(e)),
        }
    }

    fn quarantine(&self, cid: &Cid, path: &Path, reason: String) -> StoreError {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        let dest =
            self.inner
                .quarantine
                .join(format!("{}.{}.{n}", canonical(cid), std::process::id()));
        match fs::rename(path, &dest) {
            Ok(()) => StoreError::Corrupt {
                cid: *cid,
                reason,
                quarantined: dest,
            },
            // Another reader may have moved it first; the block is gone from the store either way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => StoreError::Corrupt {
                cid: *cid,
                reason,
                quarantined: self.inner.quarantine.clone(),
            },
            Err(e) => io_err("quarantine", path)(e),
        }
    }

    /// Stores a block atomically. Returns `false` if it was already present. The block is not
    /// yet durable against power loss: call [`sync`](Self::sync) before acknowledging it.
    pub fn put(&self, block: &Block) -> Result<bool, StoreError> {
        let stored = self.write(block)?;
        if stored {
            self.arrived(block.cid(), block.data().len() as u64);
        }
        Ok(stored)
    }

    /// Blocks and bytes newly stored by this handle's store since it was opened (deletions not
    /// subtracted): what a recent [`stats`](Self::stats) lacks, without listing the store.
    pub fn written(&self) -> StoreStats {
        let (blocks, bytes) = &self.inner.written;
        StoreStats {
            blocks: blocks.load(Ordering::Relaxed),
            bytes: bytes.load(Ordering::Relaxed),
        }
    }

    /// Blocks stored from now on (by [`put`](Self::put) or [`adopt`](Self::adopt)), by
    /// canonical CID. A receiver that falls behind by more than a few hundred is told it
    /// lagged.
    pub fn arrivals(&self) -> tokio::sync::broadcast::Receiver<Cid> {
        self.inner.arrivals.subscribe()
    }

    fn arrived(&self, cid: &Cid, len: u64) {
        let (blocks, bytes) = &self.inner.written;
        blocks.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len, Ordering::Relaxed);
        // Nobody follows arrivals unless IPFS peers are connected: the common case.
        if self.inner.arrivals.receiver_count() > 0 {
            let _ = self.inner.arrivals.send(canonical(cid));
        }
    }

    fn write(&self, block: &Block) -> Result<bool, StoreError> {
        let path = self.path_of(block.cid());
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => return Ok(false),
            // Something else has the block's name (a directory, a link): it is moved aside,
            // as a corrupt block would be, so the block can take its place.
            Ok(_) => match self.quarantine(block.cid(), &path, "not a file".to_owned()) {
                StoreError::Corrupt { .. } => {}
                e => return Err(e),
            },
            Err(_) => {}
        }
        #[cfg(target_os = "linux")]
        if self.inner.tmpfile.load(Ordering::Relaxed) {
            match put_unnamed(&path, block.data(), block.seal()) {
                Ok(stored) => return Ok(stored),
                Err(Unnamed::Io(e)) => return Err(io_err("store", &path)(e)),
                Err(Unnamed::Unsupported) => self.inner.tmpfile.store(false, Ordering::Relaxed),
                Err(Unnamed::Retry) => {}
            }
        }
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.inner.tmp.join(format!("{}.{n}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = File::create_new(&tmp)?;
            f.write_all(block.data())?;
            keep_seal(&f, block.seal());
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", &tmp)(e));
        }
        let renamed = fs::rename(&tmp, &path).or_else(|e| {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
            // Shards are made with the store; this one was removed since. Remake it and retry.
            fs::create_dir_all(path.parent().expect("sharded path"))?;
            fs::rename(&tmp, &path)
        });
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("store", &path)(e));
        }
        Ok(true)
    }

    /// Moves block `cid` from `staged` into this store by renaming its file: no copy and no
    /// second hash (the staged store wrote it from a verified block). Across filesystems it is
    /// copied. Like [`put`](Self::put), durable only after a sync.
    pub fn adopt(&self, staged: &BlockStore, cid: &Cid) -> Result<(), StoreError> {
        let (from, to) = (staged.path_of(cid), self.path_of(cid));
        match fs::rename(&from, &to) {
            Ok(()) => {
                self.arrived(cid, fs::metadata(&to).map_or(0, |m| m.len()));
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                self.put(&staged.get(cid)?).map(drop)
            }
            Err(e) => Err(io_err("adopt", &to)(e)),
        }
    }

    /// Makes the given blocks durable: fsyncs each file and each directory holding one.
    pub fn sync<'a>(&self, cids: impl IntoIterator<Item = &'a Cid>) -> Result<(), StoreError> {
        let mut tracker = SyncTracker::new(self);
        for cid in cids {
            tracker.written(cid)?;
        }
        tracker.finish()
    }

    /// Removes a block. Returns `false` if it was not stored.
    pub fn delete(&self, cid: &Cid) -> Result<bool, StoreError> {
        let path = self.path_of(cid);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("delete", &path)(e)),
        }
    }

    /// Every stored block's CID (canonical form), in no particular order. Lists one shard
    /// directory at a time, so memory stays at 1/1024 of the store's listing.
    pub fn list(&self) -> impl Iterator<Item = Result<Cid, StoreError>> + '_ {
        self.entries().map(|r| r.map(|(cid, _)| cid))
    }

    /// Number of blocks and total bytes stored (names of blocks that are not files, which
    /// reading them would quarantine, are not counted).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stats = StoreStats::default();
        for entry in self.entries() {
            if let Some(len) = entry?.1 {
                stats.blocks += 1;
                stats.bytes += len;
            }
        }
        Ok(stats)
    }

    /// Every name in the store that is a CID, with its length if it is a file.
    fn entries(&self) -> impl Iterator<Item = Result<(Cid, Option<u64>), StoreError>> + '_ {
        let root = &self.inner.blocks;
        let shards = match fs::read_dir(root) {
            Ok(rd) => Some(rd),
            Err(e) => {
                return Box::new(std::iter::once(Err(io_err("list", root)(e))))
                    as Box<dyn Iterator<Item = _> + '_>
            }
        };
        Box::new(shards.into_iter().flatten().flat_map(move |shard| {
            let shard = match shard {
                Ok(s) => s.path(),
                Err(e) => return vec![Err(io_err("list", root)(e))].into_iter(),
            };
            let Ok(files) = fs::read_dir(&shard) else {
                return Vec::new().into_iter();
            };
            files
                .filter_map(|f| {
                    let f = f.ok()?;
                    // Anything that is not named by a CID is not a block (editor debris etc.).
                    let cid = Cid::try_from(f.file_name().to_str()?).ok()?;
                    let meta = f.metadata().ok()?;
                    Some(Ok((cid, meta.is_file().then_some(meta.len()))))
                })
                .collect::<Vec<_>>()
                .into_iter()
        }))
    }
}

/// Makes a stream of [`BlockStore::put`]s durable. Acknowledge the blocks only after
/// [`finish`](Self::finish) returns.
///
/// On Linux `finish` is one `syncfs` of the store's filesystem: one journal commit for the
/// whole batch, directories included, where per-file fsync costs a commit per block and per
/// directory. In wall time the strategies measured alike, since creating the files dominates;
/// `syncfs` is kept as the simplest correct one. Its cost: it also flushes other processes' dirty data on the same filesystem.
/// Elsewhere each file and each directory is fsynced.
#[derive(Debug)]
pub struct SyncTracker {
    store: BlockStore,
    #[cfg(not(target_os = "linux"))]
    dirs: BTreeSet<PathBuf>,
}

impl SyncTracker {
    /// A tracker for blocks of `store`.
    pub fn new(store: &BlockStore) -> Self {
        Self {
            store: store.clone(),
            #[cfg(not(target_os = "linux"))]
            dirs: BTreeSet::new(),
        }
    }

    /// Records that `cid` was stored and must become durable.
    pub fn written(&mut self, cid: &Cid) -> Result<(), StoreError> {
        #[cfg(not(target_os = "linux"))]
        {
            let path = self.store.path_of(cid);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync", &path))?;
            self.dirs
                .insert(path.parent().expect("sharded path").to_owned());
        }
        #[cfg(target_os = "linux")]
        let _ = cid;
        Ok(())
    }

    /// Takes over what `other` recorded, so that one [`finish`](Self::finish) covers both.
    pub fn absorb(&mut self, other: SyncTracker) {
        #[cfg(not(target_os = "linux"))]
        self.dirs.extend(other.dirs);
        #[cfg(target_os = "linux")]
        let _ = other;
    }

    /// Makes everything recorded durable.
    pub fn finish(self) -> Result<(), StoreError> {
        let blocks = &self.store.inner.blocks;
        #[cfg(target_os = "linux")]
        {
            let dir = File::open(blocks).map_err(io_err("open", blocks))?;
            rustix::fs::syncfs(&dir).map_err(|e| io_err("sync", blocks)(e.into()))?;
        }
        #[cfg(not(target_os = "linux"))]
        for dir in self.dirs.iter().chain([blocks]) {
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync", dir))?;
        }
        Ok(())
    }
}

/// Why [`put_unnamed`] did not store a block.
#[cfg(target_os = "linux")]
enum Unnamed {
    /// The filesystem has no unnamed files: use named temporaries from now on.
    Unsupported,
    /// This once the named temporary's path must be taken (e.g. a shard to remake).
    Retry,
    /// A real failure (disk full, ...).
    Io(io::Error),
}

/// Writes `data` into an unnamed file (`O_TMPFILE`) in `path`'s directory and links it there
/// under its final name. Returns `false` if the name was taken meanwhile (identical bytes).
///
/// Why not a named temporary in `tmp/` and a rename: that writes two directories per block and
/// locks both for the rename, and a `kill -9` leaves the temporary behind. An unnamed file is
/// invisible until linked whole and is freed by the kernel if the process dies first.
#[cfg(target_os = "linux")]
fn put_unnamed(path: &Path, data: &[u8], seal: Seal) -> Result<bool, Unnamed> {
    use rustix::fs::{linkat, open, AtFlags, Mode, OFlags, CWD};
    use rustix::io::Errno;
    let dir = path.parent().expect("sharded path");
    let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
    let mode = Mode::from(0o644);
    // Whether this file is opened for direct I/O: decided here, not re-read from `DIRECT`
    // later, since another thread may clear that between the open and the write.
    let mut direct = data.len() >= DIRECT_ALIGN && DIRECT.load(Ordering::Relaxed);
    let first = if direct {
        flags | OFlags::DIRECT
    } else {
        flags
    };
    let opened = match open(dir, first, mode) {
        Err(Errno::INVAL) if direct => {
            // This filesystem has no direct I/O: buffered writes from now on.
            DIRECT.store(false, Ordering::Relaxed);
            direct = false;
            open(dir, flags, mode)
        }
        opened => opened,
    };
    let fd = match opened {
        Ok(fd) => fd,
        // EISDIR: a kernel without O_TMPFILE read it as O_DIRECTORY; EOPNOTSUPP: a filesystem
        // without it (e.g. some FUSE and network filesystems).
        Err(Errno::ISDIR | Errno::OPNOTSUPP | Errno::INVAL) => return Err(Unnamed::Unsupported),
        Err(Errno::NOENT) => return Err(Unnamed::Retry),
        Err(e) => return Err(Unnamed::Io(e.into())),
    };
    let mut file = File::from(fd);
    if direct {
        write_direct(&mut file, data).map_err(Unnamed::Io)?;
    } else {
        file.write_all(data).map_err(Unnamed::Io)?;
    }
    keep_seal(&file, seal);
    // The /proc path, not AT_EMPTY_PATH: the latter needs CAP_DAC_READ_SEARCH.
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    match linkat(CWD, &proc, CWD, path, AtFlags::SYMLINK_FOLLOW) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        // The shard is there, so /proc is not: named temporaries from now on.
        Err(Errno::NOENT) if dir.is_dir() => Err(Unnamed::Unsupported),
        // The shard vanished: the named temporary's path remakes it.
        Err(Errno::NOENT) => Err(Unnamed::Retry),
        Err(e) => Err(Unnamed::Io(e.into())),
    }
}

/// The extended attribute holding a block file's [`Seal`].
#[cfg(target_os = "linux")]
const SEAL_ATTR: &str = "user.p2pmr.seal";

/// Whether block files get seals; cleared for good the first time the filesystem says it
/// keeps no extended attributes.
#[cfg(target_os = "linux")]
static SEALING: AtomicBool = AtomicBool::new(true);

/// Keeps `seal` in `file`'s extended attributes. Best effort: a block without its seal is
/// read back by its CID's hash, so a refusal (a full disk, a file of another owner) costs
/// only speed.
#[cfg(target_os = "linux")]
fn keep_seal(file: &File, seal: Seal) {
    use rustix::fs::{fsetxattr, XattrFlags};
    if SEALING.load(Ordering::Relaxed) {
        if let Err(rustix::io::Errno::NOTSUP) =
            fsetxattr(file, SEAL_ATTR, &seal.to_bytes(), XattrFlags::empty())
        {
            SEALING.store(false, Ordering::Relaxed);
        }
    }
}

/// The seal kept with `file`, if it has one.
#[cfg(target_os = "linux")]
fn kept_seal(file: &File) -> Option<Seal> {
    if !SEALING.load(Ordering::Relaxed) {
        return None;
    }
    let mut bytes = [0u8; 4];
    let n = rustix::fs::fgetxattr(file, SEAL_ATTR, &mut bytes[..]).ok()?;
    Seal::from_bytes(&bytes[..n])
}

#[cfg(not(target_os = "linux"))]
fn keep_seal(_file: &File, _seal: Seal) {}

#[cfg(not(target_os = "linux"))]
fn kept_seal(_file: &File) -> Option<Seal> {
    None
}

/// Direct I/O wants buffers, offsets and lengths aligned to the device's blocks; 4096 covers
/// every common device.
#[cfg(target_os = "linux")]
const DIRECT_ALIGN: usize = 4096;

/// Whether block contents are written with `O_DIRECT`; cleared for good the first time the
/// filesystem refuses it.
#[cfg(target_os = "linux")]
static DIRECT: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// An aligned staging buffer per writer thread, reused so its pages stay resident.
    #[cfg(target_os = "linux")]
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes `data` to `file` (opened with `O_DIRECT`): the whole 4 KiB pages straight to the
/// device (from `data` itself if it is aligned, else from a reused aligned staging buffer),
/// the last partial 4 KiB, if any, through the page cache.
///
/// Why: a buffered write copies every byte into freshly allocated page-cache pages, and on a
/// virtual machine a first touch of a page can be slow (the hypervisor backs guest memory
/// lazily and takes freed pages back), so that copy can dominate `add`'s profile
/// (BENCHMARKS.md, "Foundation"). Direct writes skip it and do not evict the cache to hold data
/// that is mostly read once, by a job, later. Durability is unchanged: the caller's
/// `syncfs`/`fsync` still commits the file's metadata and flushes the device's cache.
#[cfg(target_os = "linux")]
fn write_direct(file: &mut File, data: &[u8]) -> io::Result<()> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let (bulk, tail) = data.split_at(data.len() / DIRECT_ALIGN * DIRECT_ALIGN);
    let written = if bulk.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        file.write_all(bulk)
    } else {
        STAGING.with_borrow_mut(|staging| {
            if staging.len() < bulk.len() + DIRECT_ALIGN {
                // Sized to the largest block seen (256 KiB for chunks), not to the 2 MiB
                // limit: every thread that writes blocks keeps one.
                *staging = vec![0; bulk.len() + DIRECT_ALIGN];
            }
            let at = staging.as_ptr().align_offset(DIRECT_ALIGN);
            let aligned = &mut staging[at..at + bulk.len()];
            aligned.copy_from_slice(bulk);
            file.write_all(aligned)
        })
    };
    match written {
        Ok(()) if tail.is_empty() => Ok(()),
        Ok(()) => {
            let flags = fcntl_getfl(&*file)?;
            fcntl_setfl(&*file, flags - OFlags::DIRECT)?;
            file.write_all(tail)
        }
        // A device wanting a larger alignment: buffered writes from now on, this block too
        // (a refused direct write wrote nothing).
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            DIRECT.store(false, Ordering::Relaxed);
            let flags = fcntl_getfl(&*file)?;
            fcntl_setfl(&*file, flags - OFlags::DIRECT)?;
            std::os::unix::fs::FileExt::write_all_at(file, data, 0)
        }
        Err(e) => Err(e),
    }
}

#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(not(target_os = "linux"))]
fn process_alive(_pid: u32) -> bool {
    // Without a cheap liveness check, keep the file: a few stray temporaries are harmless.
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlockStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn adopting_moves_a_staged_block_without_copying() {
        let dir = tempfile::tempdir().unwrap();
        let repo = BlockStore::open(&dir.path().join("repo")).unwrap();
        let staged = BlockStore::open(&dir.path().join("repo/.staging")).unwrap();
        let block = Block::raw(b"staged bytes".to_vec());
        staged.put(&block).unwrap();
        repo.adopt(&staged, block.cid()).unwrap();
        repo.sync([block.cid()]).unwrap();
        assert_eq!(repo.get(block.cid()).unwrap(), block);
        assert!(!staged.has(block.cid()), "moved, not copied");
        // Adopting a block the store already holds keeps it.
        staged.put(&block).unwrap();
        repo.adopt(&staged, block.cid()).unwrap();
        assert_eq!(repo.get(block.cid()).unwrap(), block);
        assert!(
            repo.adopt(&staged, block.cid()).is_err(),
            "nothing left to adopt"
        );
    }

    #[test]
    fn put_get_has_delete() {
        let (_dir, store) = store();
        let block = Block::raw(b"some bytes".to_vec());
        assert!(!store.has(block.cid()));
        assert!(matches!(
            store.get(block.cid()),
            Err(StoreError::NotFound(_))
        ));
        assert!(store.put(&block).unwrap());
        assert!(!store.put(&block).unwrap(), "second put is a no-op");
        assert!(store.has(block.cid()));
        assert_eq!(store.get(block.cid()).unwrap(), block);
        store.sync([block.cid()]).unwrap();
        assert!(store.delete(block.cid()).unwrap());
        assert!(!store.delete(block.cid()).unwrap());
        assert!(!store.has(block.cid()));
    }

    #[test]
    fn list_and_stats() {
        let (_dir, store) = store();
        let blocks: Vec<Block> = (0..50u32)
            .map(|i| Block::raw(vec![7; i as usize]))
            .collect();
        for b in &blocks {
            store.put(b).unwrap();
        }
        let mut listed: Vec<Cid> = store.list().map(Result::unwrap).collect();
        listed.sort();
        let mut want: Vec<Cid> = blocks.iter().map(|b| *b.cid()).collect();
        want.sort();
        assert_eq!(listed, want);
        assert_eq!(
            store.stats().unwrap(),
            StoreStats {
                blocks: 50,
                bytes: (0..50).sum()
            }
        );
    }

    #[test]
    fn something_else_under_a_blocks_name_is_no_block() {
        let (_dir, store) = store();
        let block = Block::raw(b"a block".to_vec());
        let path = store.path_of(block.cid());
        fs::create_dir(&path).unwrap();
        // Not stored, not counted; reading it quarantines it; storing the block replaces it.
        assert!(!store.has(block.cid()));
        assert_eq!(store.stats().unwrap().blocks, 0);
        assert_eq!(store.list().count(), 1, "listed, so verify finds it");
        assert!(matches!(
            store.get(block.cid()),
            Err(StoreError::Corrupt { .. })
        ));
        fs::create_dir(&path).unwrap();
        assert!(store.put(&block).unwrap(), "stored in its place");
        assert_eq!(store.get(block.cid()).unwrap(), block);
        assert_eq!(store.stats().unwrap().blocks, 1);
    }

    #[test]
    fn cidv0_and_v1_share_a_block() {
        let (_dir, store) = store();
        let node = Block::dag_pb(vec![0x0a, 0x02, 0x08, 0x01]);
        store.put(&node).unwrap();
        let v0 = Cid::new_v0(*node.cid().hash()).unwrap();
        let got = store.get(&v0).unwrap();
        assert_eq!(got.cid(), &v0, "returned under the name it was asked for");
        assert_eq!(got.data(), node.data());
    }

    #[test]
    fn corrupt_blocks_are_quarantined_not_served() {
        let (dir, store) = store();
        let block = Block::raw(vec![1; 1000]);
        store.put(&block).unwrap();
        let path = store.path_of(block.cid());
        let mut bytes = fs::read(&path).unwrap();
        bytes[500] ^= 1;
        fs::write(&path, bytes).unwrap();
        match store.get(block.cid()) {
            Err(StoreError::Corrupt { quarantined, .. }) => {
                assert!(quarantined.starts_with(dir.path()))
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        assert!(!store.has(block.cid()), "corrupt block is no longer served");
        assert_eq!(
            fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
            1
        );
        // A good copy can be stored again.
        assert!(store.put(&block).unwrap());
        assert_eq!(store.get(block.cid()).unwrap(), block);
    }

    /// The seal kept with a block's file, as bytes.
    #[cfg(target_os = "linux")]
    fn seal_on_disk(path: &Path) -> Option<Vec<u8>> {
        let mut bytes = [0u8; 16];
        let n = rustix::fs::getxattr(path, SEAL_ATTR, &mut bytes[..]).ok()?;
        Some(bytes[..n].to_vec())
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn blocks_are_sealed_and_reads_mend_missing_or_damaged_seals() {
        use rustix::fs::{removexattr, setxattr, XattrFlags};
        for unnamed in [true, false] {
            let (dir, store) = store();
            let store = if unnamed { store } else { named(store) };
            let block = Block::raw(vec![unnamed as u8; 70_000]);
            store.put(&block).unwrap();
            let path = store.path_of(block.cid());
            let seal = block.seal().to_bytes().to_vec();
            assert_eq!(seal_on_disk(&path), Some(seal.clone()), "unnamed {unnamed}");
            assert_eq!(store.get(block.cid()).unwrap(), block);
            // No seal (a block from before seals, or copied in by hand): checked by its CID,
            // then sealed.
            removexattr(&path, SEAL_ATTR).unwrap();
            assert_eq!(store.get(block.cid()).unwrap(), block);
            assert_eq!(seal_on_disk(&path), Some(seal.clone()));
            // A damaged seal over good bytes: the bytes pass by CID, and the seal is mended.
            for damaged in [&[0u8, 0, 0, 0][..], &[1, 2, 3], &[9; 9]] {
                setxattr(&path, SEAL_ATTR, damaged, XattrFlags::empty()).unwrap();
                assert_eq!(store.get(block.cid()).unwrap(), block);
                assert_eq!(seal_on_disk(&path), Some(seal.clone()));
            }
            // Another sealed block's file under this block's name is not this block.
            let other = Block::raw(vec![7; 70_000]);
            store.put(&other).unwrap();
            fs::rename(store.path_of(other.cid()), &path).unwrap();
            assert!(matches!(
                store.get(block.cid()),
                Err(StoreError::Corrupt { .. })
            ));
            assert!(dir.path().join("quarantine").read_dir().unwrap().count() == 1);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_rehashing_read_finds_bytes_changed_with_their_seal() {
        let (_dir, store) = store();
        let block = Block::raw(vec![5; 9_000]);
        store.put(&block).unwrap();
        let path = store.path_of(block.cid());
        // Other bytes, sealed as if they were this block (what only a deliberate change of the
        // file does): a read by seal takes them, the scrub does not.
        let mut forged = block.data().to_vec();
        forged[0] = 6;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&canonical(block.cid()).to_bytes());
        crc.update(&forged);
        fs::write(&path, &forged).unwrap();
        rustix::fs::setxattr(
            &path,
            SEAL_ATTR,
            &crc.finalize().to_le_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        assert_eq!(store.get(block.cid()).unwrap().data(), &forged[..]);
        assert!(matches!(
            store.get_rehashed(block.cid()),
            Err(StoreError::Corrupt { .. })
        ));
        store.put(&block).unwrap();
        assert_eq!(store.get_rehashed(block.cid()).unwrap(), block);
    }

    #[test]
    fn truncated_and_oversized_files_are_corrupt() {
        let (_dir, store) = store();
        let block = Block::raw(vec![3; 4096]);
        store.put(&block).unwrap();
        let path = store.path_of(block.cid());
        fs::write(&path, &block.data()[..100]).unwrap();
        assert!(matches!(
            store.get(block.cid()),
            Err(StoreError::Corrupt { .. })
        ));
        store.put(&block).unwrap();
        fs::write(&path, vec![0; MAX_BLOCK_SIZE + 1]).unwrap();
        assert!(matches!(
            store.get(block.cid()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn stale_temporaries_are_removed_on_open() {
        let (dir, store) = store();
        // pid 0 is never a user process: a leftover of a dead writer.
        let stale = dir.path().join("tmp").join("0.17");
        fs::write(&stale, b"half a block").unwrap();
        let mine = dir
            .path()
            .join("tmp")
            .join(format!("{}.999", std::process::id()));
        fs::write(&mine, b"in progress").unwrap();
        drop(store);
        BlockStore::open(dir.path()).unwrap();
        assert!(!stale.exists());
        assert!(mine.exists(), "a live process's temporary is left alone");
    }

    /// The same store, writing through named temporaries in `tmp/` as where `O_TMPFILE` is
    /// refused, so both write paths are tested on any machine.
    fn named(store: BlockStore) -> BlockStore {
        #[cfg(target_os = "linux")]
        store.inner.tmpfile.store(false, Ordering::Relaxed);
        store
    }

    #[test]
    fn a_removed_shard_is_remade_by_either_write_path() {
        for unnamed in [true, false] {
            let (dir, store) = store();
            let store = if unnamed { store } else { named(store) };
            let block = Block::raw(format!("unnamed {unnamed}").into_bytes());
            let shard = store.path_of(block.cid()).parent().unwrap().to_owned();
            fs::remove_dir(&shard).unwrap();
            assert!(store.put(&block).unwrap(), "unnamed {unnamed}");
            assert_eq!(store.get(block.cid()).unwrap(), block);
            assert!(!store.put(&block).unwrap(), "unnamed {unnamed}");
            assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        }
    }

    #[test]
    fn concurrent_puts_and_gets() {
        for unnamed in [true, false] {
            let (dir, store) = store();
            let store = if unnamed { store } else { named(store) };
            concurrent_puts_and_gets_on(&dir, &store);
        }
    }

    fn concurrent_puts_and_gets_on(dir: &tempfile::TempDir, store: &BlockStore) {
        let blocks: Vec<Block> = (0..64u8).map(|i| Block::raw(vec![i; 10_000])).collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (store, blocks) = (store.clone(), &blocks);
                s.spawn(move || {
                    for (i, b) in blocks.iter().enumerate() {
                        store.put(b).unwrap();
                        let other = &blocks[(i + t) % blocks.len()];
                        match store.get(other.cid()) {
                            Ok(got) => assert_eq!(&got, other),
                            Err(StoreError::NotFound(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        assert_eq!(store.stats().unwrap().blocks, 64);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
