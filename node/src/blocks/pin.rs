//! Fetching a whole DAG into a store, many blocks at once, from whoever has it: the local
//! store, daemons, or IPFS nodes over Bitswap (what `pin add` and a job's fetch phase do).
//!
//! Blocks are taken in any order (a DAG need not be read as a file), at most [`PIN_WINDOW`]
//! at a time, each once however often the DAG links it (a file of zeros links one leaf
//! thousands of times). The children of a block that came from an IPFS node are asked of
//! IPFS nodes first: asking every daemon first would cost each block round trips to peers
//! that do not have it.

use super::{Fetcher, RemoteError, Source};
use crate::repo::files::FileError;
use crate::repo::store::BlockStore;
use p2pmr_protocol::block::RAW;
use p2pmr_protocol::dagpb::PbNode;
use p2pmr_protocol::unixfs::{UnixFsError, MAX_DEPTH};
use p2pmr_protocol::Cid;
use std::collections::HashSet;
use tokio::task::JoinSet;

/// Block fetches of one DAG fetch in flight at once: wider than a reader's window, as each
/// fetch from an IPFS node may take two round trips (want-have, want-block).
pub(crate) const PIN_WINDOW: usize = 32;

/// How often a DAG fetch reports progress when no block arrives.
const STALLED: std::time::Duration = std::time::Duration::from_secs(1);

/// Progress of a DAG fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Blocks fetched (each counted once).
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Of them, how many came from IPFS nodes.
    pub from_ipfs: u64,
    /// Wants sent to IPFS nodes again for want of an answer, during this fetch.
    pub retries: u64,
}

impl Fetcher {
    /// Copies every block of the DAG at `root` into `store` (durably, with one sync at the
    /// end), calling `progress` after each block and every second without one. Returns the
    /// blocks' CIDs and the totals.
    pub async fn fetch_dag(
        &self,
        root: Cid,
        store: &BlockStore,
        mut progress: impl FnMut(&Fetched),
    ) -> Result<(Vec<Cid>, Fetched), RemoteError> {
        let retries_before = self.ipfs_retries();
        let mut done = Fetched::default();
        let mut copied = Vec::new();
        let mut seen = HashSet::from([root]);
        // (block, depth, ask IPFS nodes first)
        let mut queue = vec![(root, 0usize, false)];
        let mut running = JoinSet::new();
        let mut tick = tokio::time::interval(STALLED);
        tick.tick().await;
        loop {
            while running.len() < PIN_WINDOW {
                let Some((cid, depth, ipfs_first)) = queue.pop() else {
                    break;
                };
                let (fetcher, store) = (self.clone(), store.clone());
                running.spawn(async move {
                    let (block, source) = fetcher.fetch_from(cid, None, None, ipfs_first).await?;
                    let children = if cid.codec() == RAW {
                        Vec::new()
                    } else {
                        let node = PbNode::decode(block.data()).map_err(UnixFsError::from)?;
                        node.links.iter().map(|l| l.hash).collect()
                    };
                    let len = block.data().len() as u64;
                    tokio::task::spawn_blocking(move || store.put(&block))
                        .await
                        .expect("store task panicked")
                        .map_err(FileError::Store)?;
                    Ok::<_, RemoteError>((cid, depth, source, len, children))
                });
            }
            // A stalled fetch still reports, so its retries show while it waits.
            let finished = tokio::select! {
                finished = running.join_next() => finished,
                _ = tick.tick() => {
                    done.retries = self.ipfs_retries() - retries_before;
                    progress(&done);
                    continue;
                }
            };
            let Some(finished) = finished else {
                break;
            };
            let (cid, depth, source, len, children) = finished.expect("fetch task panicked")?;
            if !children.is_empty() && depth >= MAX_DEPTH {
                return Err(UnixFsError::TooDeep { cid }.into());
            }
            for child in children {
                if seen.insert(child) {
                    queue.push((child, depth + 1, source == Source::Ipfs));
                }
            }
            copied.push(cid);
            done.blocks += 1;
            done.bytes += len;
            done.from_ipfs += u64::from(source == Source::Ipfs);
            done.retries = self.ipfs_retries() - retries_before;
            progress(&done);
        }
        let store = store.clone();
        let cids = tokio::task::spawn_blocking(move || store.sync(copied.iter()).map(|()| copied))
            .await
            .expect("store task panicked")
            .map_err(FileError::Store)?;
        Ok((cids, done))
    }
}
