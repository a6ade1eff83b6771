//! `p2pmr daemon`: a long-lived peer that holds blocks in its repository and serves them over
//! the block protocol.
//!
//! The daemon joins three parts: the [`Repo`] (blocks on disk, persistent identity), the
//! network task from [`crate::net`], and a server task that answers inbound requests with the
//! store. Store calls block, so each runs on tokio's blocking pool, at most [`MAX_HANDLERS`] at a
//! time. A `Put` is acknowledged only once durable; acknowledgements are group-committed: one
//! `syncfs` covers every block stored while the previous sync ran, so replication costs one
//! sync per batch rather than one per block. A `Put` also records the block's replica target,
//! which the [`Keeper`] task keeps up when holders vanish.

use crate::blocks::keeper::{Keeper, KeeperError};
use crate::engine::coordinator::Coordinator;
use crate::engine::worker::Worker;
use crate::net::{self, Inbound, JobInbound, NetClient, NetConfig, NetError};
use crate::repo::store::{BlockStore, StoreError, SyncTracker};
use crate::{Node, Repo};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use p2pmr_protocol::wire::{BlockRequest, BlockResponse};
use p2pmr_protocol::{Block, Cid};
use std::fs;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

/// Inbound requests handled at once; more wait in the network's bounded queue.
pub const MAX_HANDLERS: usize = 16;
/// The first port tried when no `--listen` is given; the next free one is used if taken.
pub const DEFAULT_PORT: u16 = 4001;
/// Name of the identity key file in the repository.
const IDENTITY_FILE: &str = "identity.key";

/// Errors of starting or running a daemon.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The repository failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The job runtime could not start.
    #[error(transparent)]
    Jobs(#[from] crate::engine::runtime::JobError),
    /// The replica log could not be opened.
    #[error(transparent)]
    Keeper(#[from] KeeperError),
    /// The identity key could not be read or written.
    #[error("identity key {path}: {reason}")]
    Identity {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// How to run a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Addresses to listen on. Empty means all interfaces, TCP and QUIC, on port 4001 or the
    /// next free one.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (and bootstrap Kademlia from).
    pub bootstrap: Vec<Multiaddr>,
    /// LAN discovery with mDNS.
    pub mdns: bool,
    /// Tasks run at once (0: one per core).
    pub slots: u32,
    /// How long a daemon coordinating a job waits for a worker to answer a liveness probe
    /// before running its tasks elsewhere.
    pub liveness: Duration,
    /// How long a daemon holding copies of this daemon's blocks may be gone before the blocks
    /// are copied to others.
    pub grace: Duration,
}

impl Default for DaemonConfig {
    /// All interfaces on the default port, no bootstrap peers, mDNS on, a slot per core, and
    /// the default liveness and grace periods.
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            slots: 0,
            liveness: crate::engine::coordinator::DEFAULT_LIVENESS,
            grace: crate::blocks::keeper::DEFAULT_GRACE,
        }
    }
}

/// Job requests (tasks, watches) handled at once; each may wait for a task or for events.
pub const MAX_JOB_HANDLERS: usize = 256;

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    repo: Repo,
    net: NetClient,
    net_task: JoinHandle<()>,
    server: JoinHandle<()>,
    jobs: JoinHandle<()>,
    keeper: JoinHandle<()>,
    coordinator: Coordinator,
    node: Node,
}

/// Loads the repository's identity key, creating one on first use, so the peer id survives
/// restarts.
pub fn identity(repo: &Repo) -> Result<Keypair, DaemonError> {
    let path = repo.home().join(IDENTITY_FILE);
    let err = |reason: String| DaemonError::Identity {
        path: path.display().to_string(),
        reason,
    };
    match fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            // Temp file + rename: a crash never leaves a half-written key behind.
            let tmp = repo.home().join(format!("{IDENTITY_FILE}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut options = fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut f = options.open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                fs::rename(&tmp, &path)
            };
            write().map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The default listen addresses: TCP and QUIC on the first port from 4001 that is free for both.
fn default_listen() -> Vec<Multiaddr> {
    for port in DEFAULT_PORT..DEFAULT_PORT + 100 {
        let tcp = std::net::TcpListener::bind(("0.0.0.0", port));
        let udp = std::net::UdpSocket::bind(("0.0.0.0", port));
        if tcp.is_ok() && udp.is_ok() {
            return vec![
                format!("/ip4/0.0.0.0/tcp/{port}").parse().expect("valid"),
                format!("/ip4/0.0.0.0/udp/{port}/quic-v1")
                    .parse()
                    .expect("valid"),
            ];
        }
    }
    vec![
        "/ip4/0.0.0.0/tcp/0".parse().expect("valid"),
        "/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid"),
    ]
}

impl Daemon {
    /// Opens the repository at `home` and starts serving.
    pub async fn start(home: &Path, config: DaemonConfig) -> Result<Self, DaemonError> {
        let repo = Repo::open(home)?;
        let keypair = identity(&repo)?;
        let replicas = Keeper::open(repo.home())?;
        let listen = if config.listen.is_empty() {
            default_listen()
        } else {
            config.listen
        };
        let network = net::spawn(NetConfig {
            keypair,
            listen,
            bootstrap: config.bootstrap,
            mdns: config.mdns,
            serve: true,
        })
        .await?;
        let server = tokio::spawn(serve(
            repo.clone(),
            replicas.clone(),
            network.client.clone(),
            network.inbound,
        ));
        let keeper =
            tokio::spawn(replicas.run(network.client.clone(), repo.blocks().clone(), config.grace));
        let slots = match config.slots {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        let worker = Worker::new(repo.clone(), network.client.clone(), slots)?;
        let coordinator = Coordinator::new(worker, config.liveness);
        let jobs = tokio::spawn(serve_jobs(
            coordinator.clone(),
            network.client.clone(),
            network.jobs,
        ));
        Ok(Self {
            node: Node::serving(network.client.clone(), repo.clone()),
            repo,
            net: network.client,
            net_task: network.task,
            server,
            jobs,
            keeper,
            coordinator,
        })
    }

    /// This daemon's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.net.local_peer_id()
    }

    /// The addresses it listens on, each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.net.listen_addrs()
    }

    /// The daemon as a [`Node`]: the same API clients use, over the daemon's own network and
    /// repository.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The network handle.
    pub fn net(&self) -> &NetClient {
        &self.net
    }

    /// The repository.
    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// The daemon's coordinator (which also runs its tasks).
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Runs until `shutdown` completes, then stops cleanly.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        shutdown.await;
        self.stop().await
    }

    /// Stops the daemon: no new requests, in-flight ones finish (up to 10 s), the store is
    /// synced.
    pub async fn stop(self) -> Result<(), DaemonError> {
        self.net.shutdown().await;
        let _ = self.net_task.await;
        // The server ends when the network's inbound queue closes and its handlers are done.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        self.jobs.abort();
        self.keeper.abort();
        let store = self.repo.blocks().clone();
        tokio::task::spawn_blocking(move || SyncTracker::new(&store).finish())
            .await
            .expect("sync task panicked")?;
        Ok(())
    }

    /// Stops at once, like a crash: connections drop, nothing is flushed. For tests.
    pub fn abort(self) {
        self.net_task.abort();
        self.server.abort();
        self.jobs.abort();
        self.keeper.abort();
    }
}

/// Answers inbound requests until the network stops.
async fn serve(repo: Repo, keeper: Keeper, net: NetClient, mut inbound: mpsc::Receiver<Inbound>) {
    let permits = Arc::new(Semaphore::new(MAX_HANDLERS));
    let syncer = Syncer::start(repo.clone(), keeper.clone());
    while let Some(Inbound {
        peer,
        request,
        channel,
    }) = inbound.recv().await
    {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (repo, net, syncer, keeper) =
            (repo.clone(), net.clone(), syncer.clone(), keeper.clone());
        tokio::spawn(async move {
            let response = handle(&repo, &keeper, &net, &syncer, request).await;
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

/// Answers job-protocol requests until the network stops: each in its own task (a task
/// request is answered when the task has run; a watch when there are events), at most
/// [`MAX_JOB_HANDLERS`] at once.
async fn serve_jobs(
    coordinator: Coordinator,
    net: NetClient,
    mut inbound: mpsc::Receiver<JobInbound>,
) {
    let permits = Arc::new(Semaphore::new(MAX_JOB_HANDLERS));
    let mut handlers = tokio::task::JoinSet::new();
    while let Some(JobInbound {
        request, channel, ..
    }) = inbound.recv().await
    {
        while handlers.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            net.respond_job(
                channel,
                p2pmr_protocol::engine::JobResponse::Failed(p2pmr_protocol::wire::BUSY.into()),
            )
            .await;
            continue;
        };
        let (coordinator, net) = (coordinator.clone(), net.clone());
        handlers.spawn(async move {
            let response = coordinator.handle(request).await;
            net.respond_job(channel, response).await;
            drop(permit);
        });
    }
    // The network stopped: tasks still running are dropped with their handlers.
    handlers.abort_all();
}

/// Replaces a block found corrupt (and quarantined) with a verified copy from another daemon,
/// stored durably.
async fn repair(store: BlockStore, net: NetClient, cid: Cid) {
    // No local store in the fetcher: the copy must come from the network.
    let fetched = crate::blocks::Fetcher::new(Some(net), None)
        .fetch(cid)
        .await;
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

async fn handle(
    repo: &Repo,
    keeper: &Keeper,
    net: &NetClient,
    syncer: &Syncer,
    request: BlockRequest,
) -> BlockResponse {
    let store = repo.blocks().clone();
    match request {
        BlockRequest::Get(cid) => {
            let got = tokio::task::spawn_blocking(move || store.get(&cid)).await;
            match got {
                Ok(Ok(block)) => BlockResponse::Block(block.into_data()),
                Ok(Err(StoreError::NotFound(_))) => BlockResponse::NotFound,
                Ok(Err(e @ StoreError::Corrupt { .. })) => {
                    // Quarantined by the store; for the asker it is simply not here. This
                    // daemon was meant to hold it, so it fetches a good copy from a replica.
                    tracing::warn!("{e}; repairing it from a replica");
                    tokio::spawn(repair(repo.blocks().clone(), net.clone(), cid));
                    BlockResponse::NotFound
                }
                Ok(Err(e)) => BlockResponse::Refused(e.to_string()),
                Err(e) => BlockResponse::Refused(e.to_string()),
            }
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
        BlockRequest::Put {
            cid,
            data,
            replicas,
        } => {
            let keeper = keeper.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let block = Block::new(cid, data).map_err(|e| e.to_string())?;
                store.put(&block).map_err(|e| e.to_string())?;
                keeper
                    .note(*block.cid(), replicas)
                    .map_err(|e| e.to_string())?;
                Ok::<Cid, String>(*block.cid())
            })
            .await;
            match stored {
                Ok(Ok(cid)) => match syncer.sync(cid).await {
                    Ok(()) => BlockResponse::Stored,
                    Err(e) => BlockResponse::Refused(e),
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
    fn start(repo: Repo, keeper: Keeper) -> Self {
        let (tx, mut rx) = mpsc::channel::<SyncRequest>(MAX_HANDLERS * 2);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let (store, keeper) = (repo.blocks().clone(), keeper.clone());
                let cids: Vec<Cid> = batch.iter().map(|(c, _)| *c).collect();
                let synced = tokio::task::spawn_blocking(move || {
                    store.sync(cids.iter()).map_err(|e| e.to_string())?;
                    keeper.sync().map_err(|e| e.to_string())
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
