//! Files over the block store: importing a byte stream as a kubo-compatible UnixFS DAG and
//! streaming one back from any offset.
//!
//! Import is a two-stage pipeline so hashing and disk writes overlap: the calling thread reads
//! and hashes 256 KiB chunks (via [`FileBuilder`]), a writer thread stores the blocks, connected
//! by a bounded channel (so memory stays at a few MiB whatever the file size). The blocks are
//! made durable together once the last one is written (see [`SyncTracker`]), and the root is
//! returned only after that, so a returned CID means the whole file is on disk.
//!
//! Measured on the 2-core dev VM (README, "Figures"): `add` runs at 0.62-0.69x the speed of
//! plainly copying the same bytes into as many files and syncing, so the write path (temp file
//! and rename into sharded directories, process start) still costs a third on top of the
//! filesystem; hashing alone (`--only-hash`) runs at sha2-256 speed.

use crate::store::{BlockStore, StoreError, SyncTracker};
use p2pmr_protocol::unixfs::{FileBuilder, FileReader, Layout, UnixFsError};
use p2pmr_protocol::{Block, Cid};
use std::io::{self, Read};
use std::sync::mpsc;
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
    #[error("cannot read input: {0}")]
    Input(#[source] io::Error),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
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
    // within this VM's noise; it is kept because it costs a dozen lines and no risk.
    let (recycle_tx, recycle_rx) = mpsc::sync_channel::<Vec<u8>>(WRITE_QUEUE + 2);
    let writer_store = store.clone();
    let writer = std::thread::Builder::new()
        .name("p2pmr-add-writer".into())
        .spawn(move || write_blocks(&writer_store, rx, recycle_tx))
        .map_err(|e| {
            FileError::Store(StoreError::Io {
                what: "start writer for",
                path: ".".into(),
                source: e,
            })
        })?;
    let buffer = || match recycle_rx.try_recv() {
        Ok(mut buf) => {
            buf.clear();
            buf
        }
        Err(_) => Vec::with_capacity(layout.chunk_size()),
    };
    // If the writer fails it drops the receiver; `send` then fails and we stop reading, and
    // the writer's error (the real cause) is what gets reported.
    let built = build(source, layout, buffer, |block| tx.send(block).is_ok());
    drop(tx);
    // The writer must finish (and sync) before the CID is returned.
    writer.join().expect("block writer panicked")?;
    built
}

fn write_blocks(
    store: &BlockStore,
    rx: mpsc::Receiver<Block>,
    recycle: mpsc::SyncSender<Vec<u8>>,
) -> Result<(), StoreError> {
    let mut durable = SyncTracker::new(store);
    for block in rx {
        store.put(&block)?;
        // Also when it was already there: an earlier add may have been killed before its sync.
        durable.written(block.cid())?;
        let _ = recycle.try_send(block.into_data());
    }
    durable.finish()
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
    loop {
        let mut chunk = buffer();
        let n = (&mut source)
            .take(layout.chunk_size() as u64)
            .read_to_end(&mut chunk)
            .map_err(FileError::Input)?;
        if n == 0 {
            break;
        }
        size += n as u64;
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
        if n < layout.chunk_size() {
            break;
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
