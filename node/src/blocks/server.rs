//! The block protocol's server side: answers `Get`, `Has` and `Put` from the repository, at
//! most [`MAX_HANDLERS`] at a time (store calls block, so each runs on tokio's blocking pool).
//!
//! A `Put` is acknowledged only once durable; acknowledgements are group-committed: one
//! `syncfs` covers every block stored while the previous sync ran, so replication costs one
//! sync per batch rather than one per block. A `Put` also records the block's replica target,
//! which the [`Keeper`] keeps up when holders vanish, and a client's `Put` is entered in the
//! [`Ledger`] under its add session, until the client commits the session. A block found
//! corrupt when asked for is quarantined by the store and fetched again from a replica.

use crate::blocks::keeper::Keeper;
use crate::blocks::ledger::Ledger;
use crate::blocks::limits::{WriteLimits, MAX_CLIENT_REPLICAS};
use crate::blocks::Fetcher;
use crate::net::{Inbound, NetClient};
use crate::repo::store::{BlockStore, StoreError};
use crate::tasks::Tasks;
use crate::Repo;
use libp2p::PeerId;
use p2pmr_protocol::wire::{probe_cid, proof, BlockRequest, BlockResponse};
use p2pmr_protocol::{Block, Cid};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Inbound requests handled at once; more wait in the network's bounded queue.
pub(crate) const MAX_HANDLERS: usize = 16;

/// Answers inbound requests until the network stops.
pub(crate) async fn serve(
    repo: Repo,
    keeper: Keeper,
    ledger: Ledger,
    limits: WriteLimits,
    net: NetClient,
    mut inbound: mpsc::Receiver<Inbound>,
    tasks: Tasks,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDLERS));
    let syncer = Syncer::start(repo.clone(), keeper.clone(), ledger.clone(), &tasks);
    let probes = Probes::default();
    while let Some(Inbound {
        peer,
        request,
        channel,
    }) = inbound.recv().await
    {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let probes = probes.clone();
        let (repo, net, syncer, keeper, ledger, limits, t) = (
            repo.clone(),
            net.clone(),
            syncer.clone(),
            keeper.clone(),
            ledger.clone(),
            limits.clone(),
            tasks.clone(),
        );
        tasks.spawn_to_end(async move {
            let writer = Writer {
                peer,
                limits: &limits,
                ledger: &ledger,
                probes: &probes,
            };
            let response = handle(&repo, &keeper, &net, &syncer, &t, writer, request).await;
            if let BlockResponse::Refused(reason) = &response {
                tracing::debug!("refused a request from {peer}: {reason}");
            }
            net.respond(channel, response).await;
            drop(permit);
        });
    }
    // Wait for in-flight handlers.
    let _ = permits.acquire_many(MAX_HANDLERS as u32).await;
}

/// Replaces a block found corrupt (and quarantined) with a verified copy from another daemon,
/// stored durably.
async fn repair(store: BlockStore, net: NetClient, cid: Cid) {
    // No local store in the fetcher: the copy must come from the network.
    let fetched = Fetcher::new(Some(net), None).fetch(cid).await;
    let block = match fetched {
        Ok(block) => block,
        Err(e) => return tracing::warn!("cannot repair {cid}: {e}"),
    };
    let stored = tokio::task::spawn_blocking(move || {
        store.put(&block)?;
        store.sync([block.cid()])
    })
    .await;
    match stored {
        Ok(Ok(())) => tracing::warn!("repaired corrupt block {cid} from a replica"),
        Ok(Err(e)) => tracing::warn!("cannot store the repaired {cid}: {e}"),
        Err(e) => tracing::warn!("cannot store the repaired {cid}: {e}"),
    }
}

/// Reads a block asked for, or the answer to give instead.
async fn read(
    repo: &Repo,
    net: &NetClient,
    tasks: &Tasks,
    cid: Cid,
) -> Result<Block, BlockResponse> {
    let store = repo.blocks().clone();
    match tokio::task::spawn_blocking(move || store.get(&cid)).await {
        Ok(Ok(block)) => Ok(block),
        Ok(Err(StoreError::NotFound(_))) => Err(BlockResponse::NotFound),
        Ok(Err(e @ StoreError::Corrupt { .. })) => {
            // Quarantined by the store; for the asker it is simply not here. This daemon was
            // meant to hold it, so it fetches a good copy from a replica.
            tracing::warn!("{e}; repairing it from a replica");
            tasks.spawn(repair(repo.blocks().clone(), net.clone(), cid));
            Err(BlockResponse::NotFound)
        }
        Ok(Err(e)) => Err(refused(&e)),
        Err(e) => Err(BlockResponse::Refused(e.to_string())),
    }
}

/// A store error as a peer is told it: what failed, without this daemon's paths (logged in
/// full here).
fn for_peer(e: &StoreError) -> String {
    match e {
        StoreError::Io { what, source, .. } => {
            tracing::warn!("{}", crate::error::Chain(e));
            format!("cannot {what} here: {}", source.kind())
        }
        StoreError::Corrupt { cid, .. } => format!("block {cid} is corrupt here"),
        other => other.to_string(),
    }
}

fn refused(e: &StoreError) -> BlockResponse {
    BlockResponse::Refused(for_peer(e))
}

/// Who is asking, the limits their writes are held to, and where clients' writes are entered.
struct Writer<'a> {
    peer: PeerId,
    limits: &'a WriteLimits,
    ledger: &'a Ledger,
    probes: &'a Probes,
}

/// Probes peers asked this daemon to keep for their admission challenges: a few per peer,
/// for a bounded number of peers, in memory (a challenge follows its probe at once).
#[derive(Clone, Default)]
struct Probes(Arc<Mutex<HashMap<PeerId, VecDeque<Vec<u8>>>>>);

/// Probes kept per peer (the newest), and peers with probes kept.
const PROBES_PER_PEER: usize = 4;
const PROBING_PEERS: usize = 4096;

impl Probes {
    fn keep(&self, peer: PeerId, data: Vec<u8>) {
        let mut probes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if probes.len() >= PROBING_PEERS && !probes.contains_key(&peer) {
            // Any one goes: a probe is proved within moments of being kept, so a peer whose
            // probe is dropped here is simply asked again at its next identify.
            if let Some(other) = probes.keys().next().copied() {
                probes.remove(&other);
            }
        }
        let kept = probes.entry(peer).or_default();
        if kept.len() == PROBES_PER_PEER {
            kept.pop_front();
        }
        kept.push_back(data);
    }

    /// The probe `peer` gave this daemon whose CID is `cid`.
    fn find(&self, peer: &PeerId, cid: &Cid) -> Option<Vec<u8>> {
        let probes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let kept = probes.get(peer)?;
        kept.iter().find(|d| probe_cid(d) == *cid).cloned()
    }
}

async fn handle(
    repo: &Repo,
    keeper: &Keeper,
    net: &NetClient,
    syncer: &Syncer,
    tasks: &Tasks,
    writer: Writer<'_>,
    request: BlockRequest,
) -> BlockResponse {
    let store = repo.blocks().clone();
    match request {
        BlockRequest::Get(cid) => match read(repo, net, tasks, cid).await {
            Ok(block) => BlockResponse::Block(block.into_data()),
            Err(answer) => answer,
        },
        BlockRequest::Prove { cid, nonce } => {
            if let Some(probe) = writer.probes.find(&writer.peer, &cid) {
                return BlockResponse::Proof(proof(&nonce, &probe));
            }
            match read(repo, net, tasks, cid).await {
                Ok(block) => BlockResponse::Proof(proof(&nonce, block.data())),
                Err(answer) => answer,
            }
        }
        BlockRequest::Probe(data) => {
            writer.probes.keep(writer.peer, data);
            BlockResponse::Stored
        }
        BlockRequest::Has(cids) => {
            let has = tokio::task::spawn_blocking(move || {
                cids.iter().map(|c| store.has(c)).collect::<Vec<_>>()
            })
            .await;
            match has {
                Ok(flags) => BlockResponse::Have(flags),
                Err(e) => BlockResponse::Refused(e.to_string()),
            }
        }
        BlockRequest::Commit { session } => {
            if net.is_daemon_admitted(&writer.peer).await {
                return BlockResponse::Stored; // daemons' copies are not provisional
            }
            let (ledger, peer) = (writer.ledger.clone(), writer.peer);
            match tokio::task::spawn_blocking(move || ledger.commit(peer, session)).await {
                Ok(Ok(())) => BlockResponse::Stored,
                Ok(Err(e)) => {
                    tracing::warn!("{}", crate::error::Chain(&e));
                    BlockResponse::Refused("cannot record the commit".into())
                }
                Err(e) => BlockResponse::Refused(e.to_string()),
            }
        }
        BlockRequest::Put {
            cid,
            data,
            replicas,
            session,
            group,
        } => {
            let is_daemon = net.is_daemon_admitted(&writer.peer).await;
            let replicas = if is_daemon {
                replicas
            } else {
                replicas.min(MAX_CLIENT_REPLICAS)
            };
            let size = data.len() as u64;
            let (keeper, limits, peer) = (keeper.clone(), writer.limits.clone(), writer.peer);
            let ledger = writer.ledger.clone();
            // One trip to the blocking pool: a block already here takes no more room; a new
            // one must fit the limits before it is written, and gives its bytes back if the
            // write fails. A client's block is entered in the ledger, with collection held
            // off from the check to the entry.
            let stored = tokio::task::spawn_blocking(move || {
                let block = Block::new(cid, data).map_err(|e| e.to_string())?;
                let _writing = (!is_daemon).then(|| ledger.writing());
                let reserved = !store.has(block.cid());
                if reserved {
                    limits.reserve(peer, is_daemon, size)?;
                }
                let put = store.put(&block).map_err(|e| for_peer(&e)).and_then(|_| {
                    keeper.note(*block.cid(), replicas, group).map_err(|e| {
                        tracing::warn!("{}", crate::error::Chain(&e));
                        "cannot record the block's replica target".to_string()
                    })
                });
                let put = put.and_then(|()| {
                    if is_daemon {
                        return Ok(());
                    }
                    let added = if reserved { size } else { 0 };
                    ledger
                        .pushed(peer, session, *block.cid(), added)
                        .map_err(|e| {
                            tracing::warn!("{}", crate::error::Chain(&e));
                            "cannot record the write".to_string()
                        })
                });
                if let Err(e) = put {
                    if reserved {
                        limits.release(peer, is_daemon, size);
                    }
                    return Err(e);
                }
                Ok::<(Cid, bool), String>((*block.cid(), reserved))
            })
            .await;
            match stored {
                Ok(Ok((cid, reserved))) => match syncer.sync(cid).await {
                    Ok(()) => BlockResponse::Stored,
                    Err(e) => {
                        if reserved {
                            writer.limits.release(writer.peer, is_daemon, size);
                        }
                        BlockResponse::Refused(e)
                    }
                },
                Ok(Err(e)) => BlockResponse::Refused(e),
                Err(e) => BlockResponse::Refused(e.to_string()),
            }
        }
    }
}

type SyncRequest = (Cid, oneshot::Sender<Result<(), String>>);

/// Group commit: collects stored blocks while a sync runs and makes them durable together,
/// with the replica targets noted for them.
#[derive(Debug, Clone)]
struct Syncer {
    tx: mpsc::Sender<SyncRequest>,
}

impl Syncer {
    fn start(repo: Repo, keeper: Keeper, ledger: Ledger, tasks: &Tasks) -> Self {
        let (tx, mut rx) = mpsc::channel::<SyncRequest>(MAX_HANDLERS * 2);
        tasks.spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let (store, keeper, ledger) =
                    (repo.blocks().clone(), keeper.clone(), ledger.clone());
                let cids: Vec<Cid> = batch.iter().map(|(c, _)| *c).collect();
                let synced = tokio::task::spawn_blocking(move || {
                    // The reasons go to the writers: logged here in full, sent without paths.
                    store.sync(cids.iter()).map_err(|e| for_peer(&e))?;
                    keeper.sync().map_err(|e| {
                        tracing::warn!("{}", crate::error::Chain(&e));
                        "cannot make the replica targets durable".to_string()
                    })?;
                    ledger.sync().map_err(|e| {
                        tracing::warn!("{}", crate::error::Chain(&e));
                        "cannot make the write's record durable".to_string()
                    })
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                for (_, reply) in batch {
                    let _ = reply.send(synced.clone());
                }
            }
        });
        Self { tx }
    }

    async fn sync(&self, cid: Cid) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cid, reply))
            .await
            .map_err(|_| "daemon is stopping".to_string())?;
        rx.await.map_err(|_| "daemon is stopping".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_no_paths_of_this_daemon() {
        let cid = *Block::raw(b"x".to_vec()).cid();
        let errors = [
            StoreError::Io {
                what: "write",
                path: "/srv/p2pmr/blocks/ab/secret".into(),
                source: std::io::Error::from(std::io::ErrorKind::StorageFull),
            },
            StoreError::Corrupt {
                cid,
                reason: "hash mismatch".into(),
                quarantined: "/srv/p2pmr/quarantine/secret".into(),
            },
        ];
        for e in &errors {
            let told = for_peer(e);
            assert!(!told.contains("/srv") && !told.contains("secret"), "{told}");
            assert!(e.to_string().contains("/srv"), "the log keeps the path");
        }
        assert_eq!(for_peer(&errors[0]), "cannot write here: no storage space");
    }
}
