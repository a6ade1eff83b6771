//! Files over the block store: importing a byte stream as a kubo-compatible UnixFS DAG and
//! streaming one back from any offset.
//!
//! Import is a two-stage pipeline so hashing and disk writes overlap: the calling thread reads
//! and hashes 256 KiB chunks (via [`FileBuilder`]), a writer thread stores the blocks, connected
//! by a bounded channel (so memory stays at a few MiB whatever the file size). The blocks are
//! made durable together once the last one is written (see [`SyncTracker`]), and the root is
//! returned only after that, so a returned CID means the whole file is on disk.
//!
//! Hashing alone (`--only-hash`) runs at sha2-256 speed; how storing compares with hashing
//! and with plainly writing the same bytes is in BENCHMARKS.md ("Foundation").

use crate::repo::store::{BlockStore, StoreError, SyncTracker};
use p2pmr_protocol::chunker::Chunker;
use p2pmr_protocol::unixfs::{FileBuilder, FileReader, Layout, UnixFsError};
use p2pmr_protocol::{Block, Cid};
use std::io::{self, Read};
use std::sync::{mpsc, Arc, Mutex};
use thiserror::Error;

/// Blocks in flight between the hashing and the writing threads (8 MiB of 256 KiB leaves).
const WRITE_QUEUE: usize = 32;

/// Errors of importing or reading files.
#[derive(Debug, Error)]
pub enum FileError {
    /// The block store failed (missing or corrupt block, disk error).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The DAG is not a well-formed UnixFS file.
    #[error(transparent)]
    Format(#[from] UnixFsError),
    /// Reading the input failed.
    #[error("cannot read input")]
    Input(#[source] io::Error),
    /// Writing the output failed.
    #[error("cannot write output")]
    Output(#[source] io::Error),
}

/// What an import produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    /// The file's root CID.
    pub root: Cid,
    /// File size in bytes.
    pub size: u64,
    /// Number of blocks in the DAG (leaves and nodes).
    pub blocks: u64,
}

/// Chunks, hashes and (if `store` is given) durably stores everything `source` yields.
/// With `store == None` only the CID is computed (`add --only-hash`).
pub fn import(
    source: impl Read,
    store: Option<&BlockStore>,
    layout: Layout,
) -> Result<Added, FileError> {
    let Some(store) = store else {
        return build(
            source,
            layout,
            || Vec::with_capacity(layout.chunk_size()),
            |_| true,
        );
    };
    let (tx, rx) = mpsc::sync_channel::<Block>(WRITE_QUEUE);
    // Written blocks' buffers come back for the next chunks, so the hot loop does not mmap,
    // fault in and munmap (on another core) a fresh 256 KiB buffer per chunk. Its effect was
    // too small to measure; it is kept because it costs a dozen lines and no risk.
    let (recycle_tx, recycle_rx) = mpsc::sync_channel::<Vec<u8>>(WRITE_QUEUE + 2);
    // Two writers: a block's write waits on the device (direct I/O, see `store`), so a second
    // one keeps the device busy meanwhile.
    let rx = Arc::new(Mutex::new(rx));
    let writers = (0..WRITERS)
        .map(|_| {
            let (store, rx, recycle_tx) = (store.clone(), rx.clone(), recycle_tx.clone());
            std::thread::Builder::new()
                .name("p2pmr-add-writer".into())
                .spawn(move || write_blocks(&store, &rx, recycle_tx))
                .map_err(|e| {
                    FileError::Store(StoreError::Io {
                        what: "start writer for",
                        path: ".".into(),
                        source: e,
                    })
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop((rx, recycle_tx));
    let buffer = || match recycle_rx.try_recv() {
        Ok(mut buf) => {
            buf.clear();
            buf
        }
        Err(_) => Vec::with_capacity(layout.chunk_size()),
    };
    // If the writers fail they drop the receiver; `send` then fails and we stop reading, and
    // a writer's error (the real cause) is what gets reported.
    let built = build(source, layout, buffer, |block| tx.send(block).is_ok());
    drop(tx);
    // The writers must finish, and their blocks be synced (once, for both), before the CID is
    // returned. Every writer is joined, so none is still writing when an error is returned.
    let mut durable = SyncTracker::new(store);
    let mut failed = None;
    for writer in writers {
        match writer.join().expect("block writer panicked") {
            Ok(written) => durable.absorb(written),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    durable.finish()?;
    built
}

/// Threads writing an import's blocks.
const WRITERS: usize = 2;

fn write_blocks(
    store: &BlockStore,
    rx: &Mutex<mpsc::Receiver<Block>>,
    recycle: mpsc::SyncSender<Vec<u8>>,
) -> Result<SyncTracker, StoreError> {
    let mut durable = SyncTracker::new(store);
    loop {
        // The lock is held only while waiting for the next block, not while writing it.
        let Ok(block) = rx.lock().expect("writer queue lock").recv() else {
            return Ok(durable);
        };
        store.put(&block)?;
        // Also when it was already there: an earlier add may have been killed before its sync.
        durable.written(block.cid())?;
        let _ = recycle.try_send(block.into_data());
    }
}

/// Reads `source` in chunks (into buffers from `buffer`), builds the DAG and hands each block
/// to `emit` (which returns `false` to stop early).
pub(crate) fn build(
    mut source: impl Read,
    layout: Layout,
    mut buffer: impl FnMut() -> Vec<u8>,
    mut emit: impl FnMut(Block) -> bool,
) -> Result<Added, FileError> {
    let mut builder = FileBuilder::new(layout);
    let (mut size, mut blocks) = (0u64, 0u64);
    let mut chunks = Chunks::new(layout.chunker());
    while let Some(chunk) = chunks.next(&mut source, &mut buffer)? {
        size += chunk.len() as u64;
        for block in builder.push_chunk(chunk)? {
            blocks += 1;
            if !emit(block) {
                return Ok(Added {
                    root: Cid::default(),
                    size,
                    blocks,
                });
            }
        }
    }
    let (root, rest) = builder.finish();
    for block in rest {
        blocks += 1;
        if !emit(block) {
            break;
        }
    }
    Ok(Added { root, size, blocks })
}

/// A reader's bytes cut into chunks as a [`Chunker`] says. Fixed-size chunks are read straight
/// into their buffers; content-defined ones need the bytes after a cut to place it, so those
/// go through a buffer of the largest chunk.
struct Chunks {
    chunker: Chunker,
    buf: Vec<u8>,
    eof: bool,
}

impl Chunks {
    fn new(chunker: Chunker) -> Self {
        Self {
            chunker,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// The next chunk, in a buffer from `buffer`; `None` at the end.
    fn next(
        &mut self,
        source: &mut impl Read,
        buffer: &mut impl FnMut() -> Vec<u8>,
    ) -> Result<Option<Vec<u8>>, FileError> {
        let max = self.chunker.max_chunk();
        if let Chunker::Size(size) = self.chunker {
            if self.eof {
                return Ok(None);
            }
            let mut chunk = buffer();
            let n = source
                .take(size as u64)
                .read_to_end(&mut chunk)
                .map_err(FileError::Input)?;
            self.eof = n < size;
            return Ok((n > 0).then_some(chunk));
        }
        if !self.eof && self.buf.len() < max {
            let want = max - self.buf.len();
            let n = source
                .take(want as u64)
                .read_to_end(&mut self.buf)
                .map_err(FileError::Input)?;
            self.eof = n < want;
        }
        let n = self
            .chunker
            .cut(&self.buf, self.eof)
            .expect("a full buffer or the rest of the input can be cut");
        if n == 0 {
            return Ok(None);
        }
        let mut chunk = buffer();
        chunk.extend_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        Ok(Some(chunk))
    }
}

/// A file being written into the store as a byte stream (`io::Write`), chunked and linked as
/// kubo would. Reduce tasks write their output through it.
#[derive(Debug)]
pub struct FileWriter {
    store: BlockStore,
    builder: FileBuilder,
    chunk: Vec<u8>,
    size: u64,
    tsize: u64,
    lines: u64,
    cids: Vec<Cid>,
    /// `None` for scratch files (map outputs), which need not survive a crash: a lost map
    /// output is recomputed, so syncing it would only slow the map phase.
    durable: Option<SyncTracker>,
}

/// What a [`FileWriter`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The file's root.
    pub root: Cid,
    /// File size in bytes.
    pub size: u64,
    /// Cumulative size of its blocks (a directory link's `Tsize`).
    pub tsize: u64,
    /// Newlines written.
    pub lines: u64,
    /// Every distinct block of the file.
    pub cids: Vec<Cid>,
}

impl FileWriter {
    /// A writer into `store` with kubo's layout; `finish` makes the file durable.
    pub fn new(store: &BlockStore) -> Self {
        let mut w = Self::scratch(store, Layout::KUBO);
        w.durable = Some(SyncTracker::new(store));
        w
    }

    /// A writer whose file is not synced (intermediate data that can be recomputed), in
    /// `layout`.
    pub fn scratch(store: &BlockStore, layout: Layout) -> Self {
        Self {
            store: store.clone(),
            builder: FileBuilder::new(layout),
            chunk: Vec::with_capacity(layout.chunk_size()),
            size: 0,
            tsize: 0,
            lines: 0,
            cids: Vec::new(),
            durable: None,
        }
    }

    fn store_blocks(&mut self, blocks: Vec<Block>) -> io::Result<()> {
        for block in blocks {
            self.tsize += block.len() as u64;
            self.store.put(&block).map_err(io::Error::other)?;
            if let Some(d) = &mut self.durable {
                d.written(block.cid()).map_err(io::Error::other)?;
            }
            self.cids.push(*block.cid());
        }
        Ok(())
    }

    /// Stores the last blocks, makes the file durable and returns its root.
    pub fn finish(mut self) -> Result<Written, FileError> {
        let chunk = std::mem::take(&mut self.chunk);
        let blocks = self.builder.push_chunk(chunk)?;
        self.store_blocks(blocks).map_err(FileError::Output)?;
        let layout = self.builder.layout();
        let builder = std::mem::replace(&mut self.builder, FileBuilder::new(layout));
        let (root, rest) = builder.finish();
        self.store_blocks(rest).map_err(FileError::Output)?;
        if let Some(d) = self.durable.take() {
            d.finish()?;
        }
        let mut cids = self.cids;
        cids.sort();
        cids.dedup();
        Ok(Written {
            root,
            size: self.size,
            tsize: self.tsize,
            lines: self.lines,
            cids,
        })
    }
}

impl io::Write for FileWriter {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        self.size += n as u64;
        self.lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let chunk_size = self.builder.layout().chunk_size();
        while !buf.is_empty() {
            let take = (chunk_size - self.chunk.len()).min(buf.len());
            self.chunk.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.chunk.len() == chunk_size {
                let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(chunk_size));
                let blocks = self.builder.push_chunk(chunk).map_err(io::Error::other)?;
                self.store_blocks(blocks)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams the file at `root` from byte `offset` into `sink`, verifying every block. Returns the
/// number of bytes passed to `sink`.
pub fn read(
    store: &BlockStore,
    root: Cid,
    offset: u64,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<u64, FileError> {
    let mut reader = FileReader::starting_at(root, offset);
    let mut written = 0;
    while let Some(cid) = reader.next_needed() {
        let block = store.get(cid)?;
        let bytes = reader.feed(&block)?;
        if !bytes.is_empty() {
            sink(bytes).map_err(FileError::Output)?;
            written += bytes.len() as u64;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(1024, 4).unwrap()
    }

    #[test]
    fn import_and_read_back_with_and_without_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let hashed = import(&data[..], None, layout()).unwrap();
        assert_eq!(store.stats().unwrap().blocks, 0, "only-hash stores nothing");
        let added = import(&data[..], Some(&store), layout()).unwrap();
        assert_eq!(added, hashed);
        assert_eq!(added.size, 50_000);
        assert_eq!(store.stats().unwrap().blocks, added.blocks);
        for offset in [0u64, 1, 1023, 1024, 30_000, 49_999, 50_000, 60_000] {
            let mut out = Vec::new();
            read(&store, added.root, offset, |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(
                out,
                data.get(offset as usize..).unwrap_or_default(),
                "offset {offset}"
            );
        }
    }

    #[test]
    fn writer_matches_import() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        for size in [0usize, 1, 262_143, 262_144, 262_145, 600_000] {
            let data: Vec<u8> = (0..size)
                .map(|i| {
                    if i % 77 == 0 {
                        b'\n'
                    } else {
                        b'a' + (i % 26) as u8
                    }
                })
                .collect();
            let mut w = FileWriter::new(&store);
            // Odd write sizes, so chunk edges fall inside writes.
            for piece in data.chunks(100_003) {
                io::Write::write_all(&mut w, piece).unwrap();
            }
            let written = w.finish().unwrap();
            let imported = import(&data[..], None, Layout::KUBO).unwrap();
            assert_eq!(written.root, imported.root, "size {size}");
            assert_eq!(written.size, size as u64);
            assert_eq!(
                written.lines,
                data.iter().filter(|&&b| b == b'\n').count() as u64
            );
            let stored: u64 = written
                .cids
                .iter()
                .map(|c| store.get(c).unwrap().len() as u64)
                .sum();
            assert_eq!(
                written.tsize, stored,
                "size {size}: tsize counts every block"
            );
        }
    }

    /// Leaves of `bytes` added with `chunker`, in order.
    fn leaves(bytes: &[u8], chunker: Chunker) -> Vec<Cid> {
        let mut leaves = Vec::new();
        build(bytes, Layout::KUBO.with_chunker(chunker), Vec::new, |b| {
            if b.cid().codec() == p2pmr_protocol::block::RAW {
                leaves.push(*b.cid());
            }
            true
        })
        .unwrap();
        leaves
    }

    #[test]
    fn with_buzhash_an_insertion_changes_the_leaves_around_it_only() {
        // Text with no long repeats: a xorshift's bytes as letters and spaces.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let text: Vec<u8> = (0..(6 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefghijklmnopqrstuvwxyz    "[(x % 30) as usize]
            })
            .collect();
        let mut edited = text.clone();
        let middle = text.len() / 2;
        edited.splice(middle..middle, b"an inserted sentence. ".repeat(47));
        for (chunker, at_most_new) in [(Chunker::Buzhash, 3), (Chunker::DEFAULT, usize::MAX)] {
            let (before, after) = (leaves(&text, chunker), leaves(&edited, chunker));
            let new = after.iter().filter(|c| !before.contains(c)).count();
            if chunker == Chunker::Buzhash {
                assert!(
                    new <= at_most_new,
                    "{new} of {} leaves are new",
                    after.len()
                );
            } else {
                // Fixed-size chunks shift: every leaf after the insertion is new.
                assert!(new >= after.len() / 2 - 1, "{new} of {}", after.len());
            }
        }
    }

    #[test]
    fn read_reports_missing_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let added = import(&[9u8; 5000][..], Some(&store), layout()).unwrap();
        let leaf = Block::raw(vec![9; 1024]);
        store.delete(leaf.cid()).unwrap();
        let err = read(&store, added.root, 0, |_| Ok(())).unwrap_err();
        assert!(matches!(err, FileError::Store(StoreError::NotFound(c)) if c == *leaf.cid()));
    }

    #[test]
    fn input_errors_are_reported() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        assert!(matches!(
            import(Failing, None, layout()),
            Err(FileError::Input(_))
        ));
    }
}
