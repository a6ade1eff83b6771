//! `p2pmr daemon`: a long-lived peer that holds blocks in its repository, serves them, and
//! runs jobs.
//!
//! A daemon is a [`Node`] (the same API clients use) plus what serves the network: the block
//! server ([`blocks::server`](crate::blocks)), the job server that routes requests to the
//! coordinator or the worker, and the [`Keeper`] that restores replica counts. Every task it
//! starts goes through one task set, so [`Daemon::stop`] leaves none of them running.

use crate::bitswap::Bitswap;
use crate::blocks::keeper::{Keeper, KeeperError};
use crate::blocks::ledger::Ledger;
use crate::blocks::limits::{WriteLimits, WritePolicy};
use crate::engine::access::JobAccess;
use crate::engine::coordinator::Coordinator;
use crate::engine::worker::Worker;
use crate::http::{ApiConfig, ApiStartError};
use crate::net::{self, NetClient, NetConfig, NetError, SwarmKey};
use crate::repo::store::{BlockStore, StoreError, SyncTracker};
use crate::repo::IdentityError;
use crate::tasks::Tasks;
use crate::{Node, Repo};
use libp2p::{Multiaddr, PeerId};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use tokio::task::JoinHandle;

/// The first port tried when no `--listen` is given; the next free one is used if taken.
pub const DEFAULT_PORT: u16 = 4001;

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
    /// The ledger of client writes could not be opened.
    #[error(transparent)]
    Ledger(#[from] crate::blocks::ledger::LedgerError),
    /// The HTTP API could not start.
    #[error(transparent)]
    Api(#[from] ApiStartError),
    /// The identity key could not be read or written.
    #[error(transparent)]
    Identity(#[from] IdentityError),
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
    /// Most daemons it connects to as discovery finds them; past it, it finds the daemons
    /// each placement group needs with Kademlia lookups.
    pub mesh: usize,
    /// Tasks run at once (0: one per core).
    pub slots: u32,
    /// How long a daemon coordinating a job waits for a worker to answer a liveness probe
    /// before running its tasks elsewhere.
    pub liveness: Duration,
    /// How long a daemon holding copies of this daemon's blocks may be gone before the blocks
    /// are copied to others.
    pub grace: Duration,
    /// The HTTP API and gateway (none by default; `p2pmr daemon` serves it on loopback).
    pub api: Option<ApiConfig>,
    /// The private swarm's key, if the daemon is in one (then it listens on TCP only).
    pub swarm_key: Option<SwarmKey>,
    /// The peers allowed to start and stop jobs here, besides the daemons of the swarm;
    /// `None`: anyone who reaches the daemon.
    pub allow_jobs: Option<Vec<PeerId>>,
    /// What others may write here: a free-space floor, a per-client allowance.
    pub writes: WritePolicy,
    /// How long a client's add may go without a block or a commit before the blocks it
    /// pushed here are collected (an add interrupted or abandoned).
    pub gc_grace: Duration,
    /// Bytes of task outputs the worker remembers for later jobs (0: none).
    pub memo_bytes: u64,
    /// For testing verified execution only (`P2PMR_FAULT_WRONG_OUTPUT=1` for `p2pmr daemon`):
    /// the daemon alters one record of every map output it produces. Never on by default.
    pub fault_wrong_output: bool,
}

impl Default for DaemonConfig {
    /// All interfaces on the default port, no bootstrap peers, mDNS on, a slot per core, and
    /// the default liveness and grace periods.
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            mesh: crate::net::DEFAULT_MESH,
            slots: 0,
            liveness: crate::engine::coordinator::DEFAULT_LIVENESS,
            grace: crate::blocks::keeper::DEFAULT_GRACE,
            api: None,
            swarm_key: None,
            allow_jobs: None,
            writes: WritePolicy::default(),
            gc_grace: crate::blocks::ledger::DEFAULT_GC_GRACE,
            memo_bytes: crate::engine::worker::DEFAULT_MEMO_BYTES,
            fault_wrong_output: false,
        }
    }
}

/// How long [`Daemon::stop`] lets in-flight requests finish.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    repo: Repo,
    net: NetClient,
    net_task: JoinHandle<()>,
    /// The block server, which ends once the network stops and its handlers are done.
    server: JoinHandle<Option<()>>,
    tasks: Tasks,
    coordinator: Coordinator,
    node: Node,
    api: Option<SocketAddr>,
}

/// The default listen addresses: TCP and QUIC on the first port from 4001 that is free for both
/// (TCP alone in a private swarm, which cannot protect QUIC).
fn default_listen(private: bool) -> Vec<Multiaddr> {
    let addrs = |port: u16| -> Vec<Multiaddr> {
        let mut addrs = vec![format!("/ip4/0.0.0.0/tcp/{port}").parse().expect("valid")];
        if !private {
            let quic = format!("/ip4/0.0.0.0/udp/{port}/quic-v1");
            addrs.push(quic.parse().expect("valid"));
        }
        addrs
    };
    for port in DEFAULT_PORT..DEFAULT_PORT + 100 {
        let tcp = std::net::TcpListener::bind(("0.0.0.0", port));
        let udp = std::net::UdpSocket::bind(("0.0.0.0", port));
        if tcp.is_ok() && (private || udp.is_ok()) {
            return addrs(port);
        }
    }
    addrs(0)
}

/// Collects the blocks of clients' adds that were never completed, every quarter of `grace`
/// (from a second to ten minutes), until the daemon stops.
async fn collect_garbage(ledger: Ledger, store: BlockStore, limits: WriteLimits, grace: Duration) {
    let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (ledger, store, limits) = (ledger.clone(), store.clone(), limits.clone());
        let collected = tokio::task::spawn_blocking(move || {
            ledger.collect(&store, grace, |peer, bytes| {
                limits.release(peer, false, bytes)
            })
        })
        .await;
        match collected {
            Ok(Ok(done)) if done.blocks > 0 => tracing::info!(
                "collected {} blocks ({} bytes) of {} adds never completed",
                done.blocks,
                done.bytes,
                done.sessions
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("{}", crate::error::Chain(&e)),
            Err(e) => tracing::warn!("garbage collection stopped: {e}"),
        }
    }
}

impl Daemon {
    /// Opens the repository at `home` and starts serving.
    pub async fn start(home: &Path, config: DaemonConfig) -> Result<Self, DaemonError> {
        let repo = Repo::open(home)?;
        let keypair = repo.identity()?;
        let replicas = Keeper::open(&repo.replica_log())?;
        // Opening may wait for a stopping daemon's lock: off the async threads.
        let path = repo.ledger();
        let ledger = tokio::task::spawn_blocking(move || Ledger::open(&path))
            .await
            .expect("opening the ledger panicked")?;
        let limits = WriteLimits::new(config.writes, repo.home(), ledger.by_client());
        // Before the swarm starts, so a refused API address leaves nothing running.
        let api_listener = match &config.api {
            Some(api) => Some((crate::http::bind(api).await?, api.clone())),
            None => None,
        };
        let listen = if config.listen.is_empty() {
            default_listen(config.swarm_key.is_some())
        } else {
            config.listen
        };
        let network = net::spawn(NetConfig {
            keypair,
            listen,
            bootstrap: config.bootstrap,
            mdns: config.mdns,
            serve: true,
            swarm_key: config.swarm_key,
            mesh: config.mesh,
        })
        .await?;
        let tasks = Tasks::default();
        let server = tasks.spawn(crate::blocks::server::serve(
            repo.clone(),
            replicas.clone(),
            ledger.clone(),
            limits.clone(),
            network.client.clone(),
            network.inbound,
            tasks.clone(),
        ));
        tasks.spawn(replicas.clone().run(
            network.client.clone(),
            repo.blocks().clone(),
            config.grace,
        ));
        let bitswap = Bitswap::new(
            network.client.streams(),
            network.client.clone(),
            tasks.clone(),
        );
        tasks.spawn(crate::bitswap::serve(
            network.client.streams(),
            repo.blocks().clone(),
            tasks.clone(),
            bitswap.clone(),
        ));
        tasks.spawn(collect_garbage(
            ledger,
            repo.blocks().clone(),
            limits,
            config.gc_grace,
        ));
        let slots = match config.slots {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        let access = match &config.allow_jobs {
            Some(peers) => JobAccess::only(peers.iter().copied()),
            None => JobAccess::anyone(),
        };
        let worker = Worker::new(
            (repo.clone(), replicas.clone()),
            network.client.clone(),
            (slots, config.slots == 0),
            tasks.clone(),
            access,
            (config.memo_bytes, config.fault_wrong_output),
        )?;
        let node = Node::serving(
            network.client.clone(),
            (repo.clone(), replicas.clone()),
            bitswap,
        );
        let coordinator =
            Coordinator::new(worker.clone(), node.clone(), config.liveness, tasks.clone());
        tasks.spawn(crate::engine::server::serve(
            coordinator.clone(),
            worker,
            network.client.clone(),
            network.jobs,
            tasks.clone(),
        ));
        let api = match api_listener {
            Some((listener, api)) => {
                let addr = listener.local_addr().ok();
                tasks.spawn(crate::http::serve(
                    listener,
                    node.clone(),
                    api,
                    tasks.clone(),
                ));
                addr
            }
            None => None,
        };
        Ok(Self {
            api,
            node,
            repo,
            net: network.client,
            net_task: network.task,
            server,
            tasks,
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

    /// Where the HTTP API listens, if it runs.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api
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

    /// Stops the daemon: no new requests; in-flight block requests finish (up to 10 s); then
    /// every task it started (job drivers, task handlers, watches, the keeper) is cancelled
    /// and waited for, and the store is synced.
    pub async fn stop(self) -> Result<(), DaemonError> {
        self.net.shutdown().await;
        let _ = self.net_task.await;
        // The block server ends when the network's inbound queue closes and its handlers are done.
        let _ = tokio::time::timeout(STOP_GRACE, self.server).await;
        if !self.tasks.stop(STOP_GRACE).await {
            tracing::warn!("{} task(s) did not stop in time", self.tasks.running());
        }
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
        self.tasks.abort();
    }

    /// Tasks of this daemon still running (its network's event loop aside).
    pub fn tasks_running(&self) -> usize {
        self.tasks.running()
    }
}
