//! The libp2p side of a peer: one task owns the `Swarm` (TCP + QUIC, TLS or Noise, Yamux, identify,
//! ping, mDNS, Kademlia and `/mapreduce/block/5.0.0`); the rest of the node talks to it through
//! the cloneable [`NetClient`], whose calls become `Command`s answered over `oneshot`s, as in
//! rust-libp2p's `file-sharing` example.
//!
//! Daemons serve the block protocol: their inbound requests come out of [`Network::inbound`]
//! (a bounded queue; when it is full the request is refused at once, so a flood never grows
//! memory or blocks the event loop). Client peers (`p2pmr add`, `cat`, ...) only send requests.
//! Which connected peers are daemons is learnt from identify (they list the block protocol)
//! and confirmed by an admission challenge (`admit`), then published on a `watch` channel
//! that placement, fetching and job scheduling read.

mod admit;
mod budget;
mod link;
mod swarm_key;

pub(crate) use admit::random_bytes;
pub use admit::ADMISSION_TIMEOUT;
use budget::{Budgeted, Permits, BUDGET_UNIT};
pub use budget::{InboundBudget, INBOUND_BUDGET, PEER_BUDGET};
pub use link::{ClientConfig, Link};
pub use swarm_key::{SwarmKey, SwarmKeyError, SWARM_KEY_FILE};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PnetConfig;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    identify, kad, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
    Transport,
};
use p2pmr_protocol::bitswap::BITSWAP_PROTOCOL;
use p2pmr_protocol::engine::{JobRequest, JobResponse, JOB_PROTOCOL, MAX_JOB_MESSAGE};
use p2pmr_protocol::wire::{
    keyspace_keys, BlockRequest, BlockResponse, WireError, BLOCK_PROTOCOL, BUSY, MAX_REQUEST_SIZE,
    MAX_RESPONSE_SIZE,
};
use p2pmr_protocol::Cid;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// Agent version announced over identify.
pub const AGENT: &str = concat!("p2pmr/", env!("CARGO_PKG_VERSION"));
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mapreduce/kad/1.0.0");
/// Commands queued for the event loop.
const COMMAND_QUEUE: usize = 256;
/// Inbound requests queued for the daemon's handlers before new ones are refused as busy.
/// Each may hold a block, so this bounds memory: 32 x 256 KiB.
const INBOUND_QUEUE: usize = 32;
/// Requests of one protocol one peer may have this peer answering at once; past it, each is
/// refused saying so. This peer sends no more than this to any one peer either, queueing the
/// rest.
const MAX_STREAMS: usize = 32;
const MAX_ANSWERING: usize = MAX_STREAMS;
/// Streams of one protocol per connection that the protocol handler takes in: past
/// [`MAX_ANSWERING`] they are read and refused, past this they are reset unread (a peer
/// ignoring refusals).
const MAX_HANDLER_STREAMS: usize = MAX_STREAMS + MAX_STREAMS / 2;
/// A request not answered within this time fails (the peer is slow or gone).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Job requests are answered when a task finishes, so they may take as long as a task may.
pub const JOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Inbound job requests queued before new ones are refused as busy.
const JOB_QUEUE: usize = 64;
/// How long a peer has, from opening a stream, to send its whole request: a slow or stalled
/// sender cannot hold a half-read frame longer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);
/// Bytes of each inbound frame read without drawing on the [`InboundBudget`]: small
/// requests (gets, job control) always get through.
const FREE_FRAME_BYTES: usize = 16 << 10;
/// Connections one peer may have established with this one at once.
const MAX_CONNECTIONS_PER_PEER: u32 = 8;
/// Incoming connections established at once, and still in their handshake.
const MAX_INCOMING: u32 = 1024;
const MAX_PENDING_INCOMING: u32 = 128;

/// Errors of the network layer.
#[derive(Debug, Error)]
pub enum NetError {
    /// The transport could not be set up or could not listen.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// Setting up the swarm failed.
    #[error("cannot start the network: {0}")]
    Setup(String),
    /// A request to a peer failed (dial failure, timeout, connection closed, bad response).
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// An address could not be dialled.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The connection was made but its handshake failed: in practice, the two peers are not
    /// in the same private swarm.
    #[error("cannot reach {peer}: handshake failed: wrong or missing swarm key?")]
    Handshake {
        /// The peer.
        peer: PeerId,
    },
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

/// How to start a peer's network.
#[derive(Debug)]
pub struct NetConfig {
    /// The peer's identity.
    pub keypair: Keypair,
    /// Addresses to listen on; empty for a client peer that only dials.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and to bootstrap Kademlia from.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Serve the block protocol (daemons) or only request (clients).
    pub serve: bool,
    /// The private swarm's key: connections only with peers that hold it (TCP only).
    pub swarm_key: Option<SwarmKey>,
    /// Most daemons this peer connects to by itself, as discovery finds them (mDNS,
    /// Kademlia's sweeps, redials); past it, see [`NetClient::is_partial`]. Peers it is told
    /// to dial and those a lookup finds are connected to whatever the count.
    pub mesh: usize,
}

/// Daemons a peer connects to by itself unless told otherwise: Kademlia's k-buckets hold
/// about 20·log₂n peers, which this covers up to some ten thousand daemons.
pub const DEFAULT_MESH: usize = 256;

/// A request received from a peer, to be answered with [`NetClient::respond`] (block
/// protocol) or [`NetClient::respond_job`] (job protocol).
#[derive(Debug)]
pub struct Inbound<Req = BlockRequest, Resp = BlockResponse> {
    /// Who asked.
    pub peer: PeerId,
    /// What they asked.
    pub request: Req,
    /// Where the answer goes.
    pub channel: Reply<Resp>,
}

/// Where the answer to an inbound request goes: back over the connection it came on, or, for
/// a daemon's request to itself (its own API or CLI path asking its own coordinator), straight
/// to the waiting caller.
#[derive(Debug)]
pub enum Reply<Resp> {
    /// A peer's request.
    Remote(ResponseChannel<Resp>),
    /// This daemon's own request.
    Local(oneshot::Sender<Result<Resp, NetError>>),
}

impl<Resp> Reply<Resp> {
    /// Answers a local request at once; a remote one is handed back to go out over the
    /// network.
    fn answer_local(self, response: Resp) -> Option<(ResponseChannel<Resp>, Resp)> {
        match self {
            Self::Remote(channel) => Some((channel, response)),
            Self::Local(reply) => {
                let _ = reply.send(Ok(response));
                None
            }
        }
    }
}

/// A job-protocol request received from a peer.
pub type JobInbound = Inbound<JobRequest, JobResponse>;

/// A connected daemon as seen from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Addresses it listens on (from identify).
    pub addrs: Vec<Multiaddr>,
    /// Its agent version.
    pub agent: String,
}

/// A running network: the handle, the inbound requests (daemons only) and the task.
#[derive(Debug)]
pub struct Network {
    /// The handle to the event loop.
    pub client: NetClient,
    /// Inbound block requests (never yields for client peers).
    pub inbound: mpsc::Receiver<Inbound>,
    /// Inbound job requests (never yields for client peers).
    pub jobs: mpsc::Receiver<JobInbound>,
    /// The event loop task; it ends after [`NetClient::shutdown`] or when every handle is gone.
    pub task: JoinHandle<()>,
}

#[derive(Debug)]
enum Command {
    Request {
        peer: PeerId,
        request: BlockRequest,
        reply: oneshot::Sender<Result<BlockResponse, NetError>>,
    },
    Respond {
        channel: ResponseChannel<BlockResponse>,
        response: BlockResponse,
    },
    JobRequest {
        peer: PeerId,
        request: JobRequest,
        reply: oneshot::Sender<Result<JobResponse, NetError>>,
    },
    JobRespond {
        channel: ResponseChannel<JobResponse>,
        response: JobResponse,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Ban(PeerId),
    /// Look up the peers closest to a placement key's places in Kademlia's keyspace.
    Neighbourhood {
        key: Cid,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    /// An admission challenge ended.
    Admission {
        peer: PeerId,
        outcome: admit::Outcome,
    },
    Shutdown,
}

/// Cheap, cloneable handle to a peer's network task.
#[derive(Debug, Clone)]
pub struct NetClient {
    commands: mpsc::Sender<Command>,
    local: PeerId,
    serving: bool,
    daemons: watch::Receiver<BTreeMap<PeerId, PeerInfo>>,
    listen: watch::Receiver<Vec<Multiaddr>>,
    refused: watch::Receiver<Option<PeerId>>,
    dialing: watch::Receiver<u32>,
    admitting: watch::Receiver<HashSet<PeerId>>,
    sources: watch::Receiver<BTreeSet<PeerId>>,
    streams: Streams,
    partial: Arc<AtomicBool>,
}

/// The stream behaviour's control (which does not print itself).
#[derive(Clone)]
struct Streams(libp2p_stream::Control);

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streams")
    }
}

impl NetClient {
    /// Opens and accepts plain streams of protocols served outside the event loop
    /// (Bitswap). Accepting a protocol makes identify list it.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.0.clone()
    }

    /// This peer's id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Sends `request` to `peer` (dialling it if needed) and waits for the answer.
    pub async fn request(
        &self,
        peer: PeerId,
        request: BlockRequest,
    ) -> Result<BlockResponse, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Answers an inbound request.
    pub async fn respond(&self, channel: Reply<BlockResponse>, response: BlockResponse) {
        if let Some((channel, response)) = channel.answer_local(response) {
            // If the loop has stopped the requester gets a closed stream, which is all we can do.
            let _ = self.send(Command::Respond { channel, response }).await;
        }
    }

    /// Sends a job-protocol `request` to `peer` and waits for the answer (for a task: until it
    /// has run).
    pub async fn job_request(
        &self,
        peer: PeerId,
        request: JobRequest,
    ) -> Result<JobResponse, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::JobRequest {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Answers an inbound job request.
    pub async fn respond_job(&self, channel: Reply<JobResponse>, response: JobResponse) {
        if let Some((channel, response)) = channel.answer_local(response) {
            let _ = self.send(Command::JobRespond { channel, response }).await;
        }
    }

    /// The daemons job requests can go to: the connected ones, and this peer itself if it is
    /// a daemon (its requests to itself are answered without the network).
    pub fn job_peers(&self) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self.daemons.borrow().keys().copied().collect();
        if self.serving {
            peers.push(self.local);
            peers.sort();
        }
        peers
    }

    /// Whether this peer stopped connecting to the daemons discovery finds, its mesh being
    /// full ([`NetConfig::mesh`]): then the daemons it knows are not every daemon, and placement,
    /// `stat`, planning and the keeper look up each placement group's neighbourhood
    /// ([`NetClient::neighbourhood`]) instead of ranking the daemons they know.
    pub fn is_partial(&self) -> bool {
        self.partial.load(Ordering::Relaxed)
    }

    /// Whether this peer is a daemon (serves requests) rather than a client.
    pub fn is_serving(&self) -> bool {
        self.serving
    }

    /// Dials `addr` (which may name the peer with `/p2p/...`) and waits for the connection.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Dial { addr, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// The peers closest to `key`'s two places in Kademlia's keyspace
    /// ([`keyspace_keys`]): its neighbourhood, where the placement rule puts its copies, as
    /// two lookups through the routing tables find it (O(log n) round trips, without knowing
    /// every daemon). The peers found are dialled, so those that are daemons are admitted
    /// and show in [`NetClient::daemons`] soon after. Empty when the lookups find nobody
    /// (no routing table yet) or time out.
    pub async fn neighbourhood(&self, key: Cid) -> Result<Vec<PeerId>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Neighbourhood { key, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Closes every connection to `peer` and refuses new ones (e.g. after it sent a wrong
    /// block): it is no longer a daemon for this peer.
    pub async fn ban(&self, peer: PeerId) {
        let _ = self.send(Command::Ban(peer)).await;
    }

    /// Stops the event loop (connections are closed).
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown).await;
    }

    /// The last peer whose connection failed in its handshake (in practice: one outside
    /// this peer's private swarm, or inside one this peer is not in).
    pub fn refused_by(&self) -> Option<PeerId> {
        *self.refused.borrow()
    }

    /// Outgoing connections being set up now (dialled, not yet connected or failed).
    pub fn dialing(&self) -> u32 {
        *self.dialing.borrow()
    }

    /// Whether `peer` is a connected daemon (without copying the set, as [`daemons`] does:
    /// servers ask this for every request).
    ///
    /// [`daemons`]: NetClient::daemons
    pub fn is_daemon(&self, peer: &PeerId) -> bool {
        self.daemons.borrow().contains_key(peer)
    }

    /// Whether `peer` is a connected daemon, waiting first for its admission challenge to end
    /// if one is under way: a daemon that has just connected may ask something of this one
    /// before this one has admitted it.
    pub async fn is_daemon_admitted(&self, peer: &PeerId) -> bool {
        if self.is_daemon(peer) {
            return true;
        }
        let mut admitting = self.admitting.clone();
        let _ = tokio::time::timeout(ADMISSION_TIMEOUT, admitting.wait_for(|a| !a.contains(peer)))
            .await;
        self.is_daemon(peer)
    }

    /// Whether `peer` is being challenged for admission as a daemon now.
    pub fn is_being_admitted(&self, peer: &PeerId) -> bool {
        self.admitting.borrow().contains(peer)
    }

    /// The connected daemons, by peer id.
    pub fn daemons(&self) -> BTreeMap<PeerId, PeerInfo> {
        self.daemons.borrow().clone()
    }

    /// Connected peers that are not daemons but speak Bitswap (IPFS nodes): block sources.
    pub fn bitswap_sources(&self) -> Vec<PeerId> {
        self.sources.borrow().iter().copied().collect()
    }

    /// Whether any such source is connected (without copying the set: asked per block).
    pub fn has_bitswap_sources(&self) -> bool {
        !self.sources.borrow().is_empty()
    }

    /// Those of `peers` that are connected daemons within `limit` (dialled peers become
    /// daemons once identify names the block protocol and they pass admission).
    pub async fn daemons_among(&self, peers: &[PeerId], limit: Duration) -> Vec<PeerId> {
        let mut daemons = self.daemons.clone();
        let _ = tokio::time::timeout(
            limit,
            daemons.wait_for(|d| peers.iter().all(|p| d.contains_key(p))),
        )
        .await;
        let daemons = self.daemons.borrow();
        peers
            .iter()
            .filter(|p| daemons.contains_key(p))
            .copied()
            .collect()
    }

    /// A receiver that sees every change of the daemon set.
    pub fn watch_daemons(&self) -> watch::Receiver<BTreeMap<PeerId, PeerInfo>> {
        self.daemons.clone()
    }

    /// Addresses this peer listens on, each ending in `/p2p/<id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen.borrow().clone()
    }

    async fn send(&self, command: Command) -> Result<(), NetError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NetError::Stopped)
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: libp2p::connection_limits::Behaviour,
    blocks: Budgeted<BlockCodec>,
    jobs: Budgeted<JobCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Protocols spoken over plain streams (Bitswap), reached through a `Control`.
    streams: libp2p_stream::Behaviour,
    mdns: libp2p::swarm::behaviour::toggle::Toggle<mdns::tokio::Behaviour>,
}

/// Starts the network and returns once every listen address is bound.
pub async fn spawn(config: NetConfig) -> Result<Network, NetError> {
    let local = config.keypair.public().to_peer_id();
    let serve = config.serve;
    let use_mdns = config.mdns;
    let builder = libp2p::SwarmBuilder::with_existing_identity(config.keypair).with_tokio();
    let make = |key: &Keypair| make_behaviour(key, serve, use_mdns);
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(IDLE_TIMEOUT);
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let private = config.swarm_key.is_some();
    let mut swarm = match config.swarm_key {
        None => builder
            // TLS first: two p2pmr peers use it (AES-GCM, which the CPU does in hardware,
            // where Noise is ChaCha20-Poly1305 in software); Noise for peers without it
            // (js-libp2p, Helia).
            .with_tcp(
                tcp::Config::default().nodelay(true),
                (libp2p::tls::Config::new, noise::Config::new),
                muxer,
            )
            .map_err(|e| setup(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| setup(&e))?
            .with_behaviour(make)
            .map_err(|e| setup(&e))?
            .with_swarm_config(idle)
            .build(),
        // pnet wraps the TCP stream before Noise; it cannot wrap QUIC, which has its own
        // encryption, so a private swarm is TCP only.
        Some(key) => builder
            .with_other_transport(
                |keypair| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                    let psk = key.psk();
                    Ok(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                            .upgrade(upgrade::Version::V1Lazy)
                            .authenticate(noise::Config::new(keypair)?)
                            .multiplex(muxer()),
                    )
                },
            )
            .map_err(|e| setup(&e))?
            .with_dns()
            .map_err(|e| setup(&e))?
            .with_behaviour(make)
            .map_err(|e| setup(&e))?
            .with_swarm_config(idle)
            .build(),
    };

    let mut listeners = HashSet::new();
    for addr in &config.listen {
        if private && is_quic(addr) {
            return Err(NetError::Listen {
                addr: addr.clone(),
                reason: "a private swarm (swarm key) runs over TCP only, not QUIC".into(),
            });
        }
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        listeners.insert(id);
    }
    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
    let (jobs_tx, jobs) = mpsc::channel(JOB_QUEUE);
    let (daemons_tx, daemons) = watch::channel(BTreeMap::new());
    let (listen_tx, listen) = watch::channel(Vec::new());
    let (refused_tx, refused) = watch::channel(None);
    let (dialing_tx, dialing) = watch::channel(0);
    let (admitting_tx, admitting) = watch::channel(HashSet::new());
    let (sources_tx, sources) = watch::channel(BTreeSet::new());
    let streams = Streams(swarm.behaviour().streams.new_control());
    let partial = Arc::new(AtomicBool::new(false));
    let mut event_loop = EventLoop {
        own_commands: commands_tx.downgrade(),
        admitting: admitting_tx,
        candidates: HashMap::new(),
        answering: HashMap::new(),
        answering_jobs: HashMap::new(),
        swarm,
        commands,
        inbound: inbound_tx,
        jobs: jobs_tx,
        serving: config.serve,
        private,
        pending: HashMap::new(),
        sending: HashMap::new(),
        pending_jobs: HashMap::new(),
        dials: HashMap::new(),
        daemons: daemons_tx,
        sources: sources_tx,
        listen: listen_tx,
        refused: refused_tx,
        dialing: dialing_tx,
        under_way: HashMap::new(),
        bootstrapped: false,
        sweeping: None,
        lookups: HashMap::new(),
        neighbourhoods: HashMap::new(),
        next_lookup: 0,
        sweep_again: false,
        banned: HashSet::new(),
        known: HashMap::new(),
        mesh: config.mesh.max(1),
        partial: partial.clone(),
    };
    // Wait (briefly) until every listener reports its addresses, so callers can print them.
    // A wildcard listener reports one per interface, in a burst: take what comes within 50 ms
    // of the last listener's first address.
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !config.listen.is_empty() {
        let Ok(event) =
            tokio::time::timeout_at(deadline, event_loop.swarm.select_next_some()).await
        else {
            break;
        };
        if let SwarmEvent::NewListenAddr { listener_id, .. } = &event {
            listeners.remove(listener_id);
            if listeners.is_empty() {
                deadline = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            }
        }
        event_loop.handle_event(event);
    }
    for addr in config.bootstrap {
        if let Err(e) = event_loop.swarm.dial(addr.clone()) {
            tracing::warn!("cannot dial {addr}: {e}");
        }
    }
    let client = NetClient {
        commands: commands_tx,
        local,
        serving: config.serve,
        daemons,
        listen,
        refused,
        dialing,
        admitting,
        sources,
        streams,
        partial,
    };
    let task = tokio::spawn(event_loop.run());
    Ok(Network {
        client,
        inbound,
        jobs,
        task,
    })
}

/// Yamux with fewer streams per connection than its default: each may hold a receive window
/// of data, and our protocols use at most [`MAX_STREAMS`] each.
///
/// Its receive windows stop growing at [`MAX_FRAME`] per stream: rust-yamux refuses a frame
/// body over 1 MiB and closes the whole connection, while js-libp2p's yamux sends as large a
/// frame as the window allows (a Helia node answering wants killed its connection with
/// 1.5 MiB frames). Our own protocols move at most a block per stream, within the initial
/// 256 KiB window, so they lose nothing by it.
fn muxer() -> yamux::Config {
    let streams = 4 * MAX_STREAMS;
    let mut config = yamux::Config::default();
    config.set_max_num_streams(streams);
    // Every stream's initial 256 KiB, and room for one of them to grow to MAX_FRAME.
    config.set_max_connection_receive_window(Some(streams * (256 << 10) + MAX_FRAME - (256 << 10)));
    config
}

/// The largest frame body rust-yamux accepts.
const MAX_FRAME: usize = 1 << 20;

/// The protocols every peer runs: blocks and jobs (served by daemons, asked by all),
/// identify, ping, Kademlia and, if asked for, mDNS.
fn make_behaviour(
    key: &Keypair,
    serve: bool,
    use_mdns: bool,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let local = key.public().to_peer_id();
    let support = if serve {
        ProtocolSupport::Full
    } else {
        ProtocolSupport::Outbound
    };
    // One budget for the large inbound frames of both protocols.
    let budget = InboundBudget::default();
    let blocks = request_response::Behaviour::with_codec(
        BlockCodec::new(budget.clone()),
        [(StreamProtocol::new(BLOCK_PROTOCOL), support.clone())],
        request_response::Config::default()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_concurrent_streams(MAX_HANDLER_STREAMS),
    );
    let blocks = Budgeted::new(blocks, budget.clone());
    let jobs = request_response::Behaviour::with_codec(
        JobCodec::new(budget.clone()),
        [(StreamProtocol::new(JOB_PROTOCOL), support)],
        request_response::Config::default()
            .with_request_timeout(JOB_REQUEST_TIMEOUT)
            .with_max_concurrent_streams(MAX_HANDLER_STREAMS),
    );
    let jobs = Budgeted::new(jobs, budget);
    let identify = identify::Behaviour::new(
        identify::Config::new("/mapreduce/id/1.0.0".into(), key.public())
            .with_agent_version(AGENT.into()),
    );
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_query_timeout(Duration::from_secs(30));
    // We bootstrap ourselves once a daemon is known, and every 5 minutes after.
    kad_config.set_periodic_bootstrap_interval(None);
    let mut kad =
        kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_config);
    kad.set_mode(Some(if serve {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));
    let mdns = if use_mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
    } else {
        None
    };
    let limits = libp2p::connection_limits::ConnectionLimits::default()
        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
        .with_max_established_incoming(Some(MAX_INCOMING))
        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
    Ok(Behaviour {
        limits: libp2p::connection_limits::Behaviour::new(limits),
        blocks,
        jobs,
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        kad,
        streams: libp2p_stream::Behaviour::new(),
        mdns: mdns.into(),
    })
}

/// Whether `addr` is a QUIC address.
fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// For admission challenges, which send their requests through the loop itself.
    own_commands: mpsc::WeakSender<Command>,
    /// Peers being challenged for admission.
    admitting: watch::Sender<HashSet<PeerId>>,
    /// What identify said of peers listing the block protocol, until they are admitted.
    candidates: HashMap<PeerId, PeerInfo>,
    /// Inbound requests of each protocol being answered, per peer.
    answering: HashMap<PeerId, usize>,
    answering_jobs: HashMap<PeerId, usize>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Inbound>,
    jobs: mpsc::Sender<JobInbound>,
    /// Whether this peer answers job requests (its own among them).
    serving: bool,
    /// In a private swarm (TCP only: QUIC addresses are never dialled).
    private: bool,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<BlockResponse, NetError>>>,
    /// Block requests out to each peer, and those waiting their turn: past [`MAX_STREAMS`]
    /// at once the peer would drop streams and a burst would cost the whole connection.
    sending: HashMap<PeerId, Sending>,
    pending_jobs: HashMap<OutboundRequestId, oneshot::Sender<Result<JobResponse, NetError>>>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NetError>>>>,
    daemons: watch::Sender<BTreeMap<PeerId, PeerInfo>>,
    /// Connected peers that speak Bitswap but not our block protocol.
    sources: watch::Sender<BTreeSet<PeerId>>,
    listen: watch::Sender<Vec<Multiaddr>>,
    refused: watch::Sender<Option<PeerId>>,
    /// Outgoing connections being set up (dialled, not yet connected or failed).
    dialing: watch::Sender<u32>,
    /// Our dials under way, and the peer each is meant to reach (if known).
    under_way: HashMap<ConnectionId, Option<PeerId>>,
    bootstrapped: bool,
    /// A discovery sweep (a Kademlia lookup whose answers are dialled) is under way, and
    /// whether another was asked for meanwhile.
    sweeping: Option<kad::QueryId>,
    sweep_again: bool,
    /// Neighbourhood lookups under way: each query's lookup, and per lookup the peers found
    /// so far, the queries still running and who waits for the answer.
    lookups: HashMap<kad::QueryId, u64>,
    neighbourhoods: HashMap<u64, Neighbourhood>,
    next_lookup: u64,
    /// Peers caught misbehaving: never connected to again by this peer.
    banned: HashSet<PeerId>,
    /// Daemons and IPFS block sources seen (with the addresses they listen on), redialled
    /// while disconnected: a daemon that was restarted, frozen or cut off comes back into the
    /// network by itself.
    known: HashMap<PeerId, Vec<Multiaddr>>,
    /// Most daemons connected to by discovery ([`NetConfig::mesh`]).
    mesh: usize,
    /// Set once discovery found a peer the mesh had no room for.
    partial: Arc<AtomicBool>,
}

/// A neighbourhood lookup: the peers its queries found, how many queries still run, and
/// who waits.
struct Neighbourhood {
    found: BTreeSet<PeerId>,
    running: usize,
    reply: oneshot::Sender<Vec<PeerId>>,
}

/// Block requests to one peer: those out, and those waiting for one of them to end.
#[derive(Default)]
struct Sending {
    in_flight: usize,
    waiting: VecDeque<(
        BlockRequest,
        oneshot::Sender<Result<BlockResponse, NetError>>,
    )>,
}

/// How long a connection nothing uses stays open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often disconnected known daemons are dialled again.
const REDIAL: Duration = Duration::from_secs(2);
/// Neighbourhood lookups running at once (two Kademlia queries each); more find nothing
/// until some end.
const MAX_LOOKUPS: usize = 64;
/// Most daemons remembered for redialling.
const MAX_KNOWN: usize = 1024;

impl EventLoop {
    async fn run(mut self) {
        let mut refresh = tokio::time::interval(Duration::from_secs(300));
        let mut redial = tokio::time::interval(REDIAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = redial.tick() => {
                    let lost: Vec<(PeerId, Vec<Multiaddr>)> = self
                        .known
                        .iter()
                        .filter(|(p, _)| !self.swarm.is_connected(p))
                        .map(|(p, a)| (*p, a.clone()))
                        .collect();
                    for (peer, addrs) in lost {
                        self.discovered(peer, addrs);
                    }
                    self.challenge_waiting();
                }
                event = self.swarm.select_next_some() => {
                    self.handle_event(event);
                    self.count_dials();
                }
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(command) => {
                        self.handle_command(command);
                        self.count_dials();
                    }
                },
                _ = refresh.tick() => {
                    if self.bootstrapped {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
            }
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(NetError::Stopped));
        }
        for (_, reply) in self.sending.drain().flat_map(|(_, s)| s.waiting) {
            let _ = reply.send(Err(NetError::Stopped));
        }
        for (_, reply) in self.pending_jobs.drain() {
            let _ = reply.send(Err(NetError::Stopped));
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let sending = self.sending.entry(peer).or_default();
                if sending.in_flight < MAX_STREAMS {
                    sending.in_flight += 1;
                    self.send_block_request(peer, request, reply);
                } else {
                    sending.waiting.push_back((request, reply));
                }
            }
            Command::Respond { channel, response } => {
                // Fails only if the requester has gone; nothing to do then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .blocks
                    .send_response(channel, response);
            }
            Command::JobRequest {
                peer,
                request,
                reply,
            } if peer == *self.swarm.local_peer_id() => {
                // A daemon's request to itself goes straight to its own job server, through
                // the same bounded queue as its peers' requests.
                if !self.serving {
                    let reason = "a client peer answers no job requests".to_string();
                    let _ = reply.send(Err(NetError::Request { peer, reason }));
                } else if let Err(e) = self.jobs.try_send(Inbound {
                    peer,
                    request,
                    channel: Reply::Local(reply),
                }) {
                    let inbound = match e {
                        mpsc::error::TrySendError::Full(i)
                        | mpsc::error::TrySendError::Closed(i) => i,
                    };
                    if let Reply::Local(reply) = inbound.channel {
                        let _ = reply.send(Ok(JobResponse::busy()));
                    }
                }
            }
            Command::JobRequest {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .jobs
                    .send_request(&peer, Ok(request));
                self.pending_jobs.insert(id, reply);
            }
            Command::JobRespond { channel, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .jobs
                    .send_response(channel, response);
            }
            Command::Dial { addr, reply } => {
                let peer = link::peer_of(&addr);
                let opts = DialOpts::from(addr.clone());
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.under_way.insert(id, peer);
                        match peer {
                            Some(peer) if !self.swarm.is_connected(&peer) => {
                                self.dials.entry(peer).or_default().push(reply)
                            }
                            // Without a peer id we cannot match the connection; report the
                            // dial as started.
                            _ => {
                                let _ = reply.send(Ok(()));
                            }
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            reason: e.to_string(),
                            addr,
                        }));
                    }
                }
            }
            Command::Ban(peer) => self.ban(peer),
            Command::Neighbourhood { key, reply } => self.look_up(key, reply),
            Command::Admission { peer, outcome } => {
                self.admitting.send_if_modified(|a| a.remove(&peer));
                match outcome {
                    admit::Outcome::Admitted => {
                        if let Some(info) = self.candidates.remove(&peer) {
                            self.admit_daemon(peer, info);
                        }
                    }
                    admit::Outcome::Failed(reason) => {
                        tracing::warn!(
                            "{peer} lists the block protocol but failed its admission \
                             challenge ({reason}); it is not used"
                        );
                        self.ban(peer);
                    }
                    // Still a candidate: challenged again at the next redial tick.
                    admit::Outcome::NoAnswer(reason) => tracing::debug!(
                        "{peer} was not admitted as a daemon ({reason}); asked again later"
                    ),
                }
                self.challenge_waiting();
            }
            Command::Shutdown => {}
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let local = *self.swarm.local_peer_id();
                let full = address.with_p2p(local).unwrap_or_else(|a| a);
                self.listen.send_modify(|l| l.push(full));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let local = *self.swarm.local_peer_id();
                let full = address.with_p2p(local).unwrap_or_else(|a| a);
                self.listen.send_modify(|l| l.retain(|a| a != &full));
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } if self.banned.contains(&peer_id) => {
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                ..
            } => {
                self.under_way.remove(&connection_id);
                for reply in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                // The peer we dialled, even when the error does not name it.
                let dialled = self.under_way.remove(&connection_id).flatten();
                let Some(peer) = peer_id.or(dialled) else {
                    tracing::debug!("dial: {error}");
                    return;
                };
                if self.swarm.is_connected(&peer) {
                    return;
                }
                let reason = error.to_string();
                // Past TCP, the pnet and security handshakes: a peer with another swarm key (or
                // none) reads garbage, so choosing the security protocol or its handshake fails,
                // or never completes.
                let handshake = reason.contains("Handshake failed")
                    || reason.contains("Multistream select failed")
                    || reason.contains("Timeout has been reached");
                tracing::debug!("dial {peer}: {reason}");
                if handshake {
                    self.refused.send_replace(Some(peer));
                }
                for reply in self.dials.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(if handshake {
                        NetError::Handshake { peer }
                    } else {
                        NetError::Request {
                            peer,
                            reason: reason.clone(),
                        }
                    }));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.candidates.remove(&peer_id);
                self.daemons
                    .send_if_modified(|d| d.remove(&peer_id).is_some());
                self.sources.send_if_modified(|s| s.remove(&peer_id));
            }
            SwarmEvent::Behaviour(event) => self.handle_behaviour(event),
            _ => {}
        }
    }

    fn handle_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Blocks(event) => {
                let answered = match &event {
                    request_response::Event::Message {
                        peer,
                        message: request_response::Message::Response { .. },
                        ..
                    }
                    | request_response::Event::OutboundFailure { peer, .. } => Some(*peer),
                    _ => None,
                };
                route(
                    event,
                    &mut self.swarm.behaviour_mut().blocks,
                    &self.inbound,
                    &mut self.pending,
                    &mut self.answering,
                    BlockResponse::Refused,
                );
                if let Some(peer) = answered {
                    self.next_request(peer);
                }
            }
            BehaviourEvent::Jobs(event) => route(
                event,
                &mut self.swarm.behaviour_mut().jobs,
                &self.jobs,
                &mut self.pending_jobs,
                &mut self.answering_jobs,
                JobResponse::Failed,
            ),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let block = StreamProtocol::new(BLOCK_PROTOCOL);
                if !self.swarm.is_connected(&peer_id) || self.banned.contains(&peer_id) {
                    return;
                }
                if !info.protocols.contains(&block) {
                    let bitswap = StreamProtocol::new(BITSWAP_PROTOCOL);
                    if info.protocols.contains(&bitswap) {
                        self.add_source(peer_id, info.listen_addrs);
                    }
                    return;
                }
                let info = PeerInfo {
                    addrs: info.listen_addrs,
                    agent: info.agent_version,
                };
                if self.daemons.borrow().contains_key(&peer_id) {
                    self.admit_daemon(peer_id, info);
                } else {
                    self.challenge(peer_id, info);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    self.discovered(peer, addrs);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                step,
                ..
            }) => {
                let found = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                if self.lookups.contains_key(&id) {
                    self.looked_up(id, found, step.last);
                } else {
                    self.swept(id, found, step.last);
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, addresses, ..
            }) => {
                // Peers learnt beyond the LAN: connect, so identify tells us if they serve
                // blocks (while the mesh has room).
                self.discovered(peer, addresses.into_vec());
            }
            _ => {}
        }
    }

    /// Starts the challenges of candidates waiting for one: those past the limit of
    /// challenges at once, and those that did not answer theirs.
    fn challenge_waiting(&mut self) {
        let waiting: Vec<(PeerId, PeerInfo)> = {
            let admitting = self.admitting.borrow();
            self.candidates
                .iter()
                .filter(|(p, _)| !admitting.contains(p))
                .take(admit::MAX_ADMITTING.saturating_sub(admitting.len()))
                .map(|(p, i)| (*p, i.clone()))
                .collect()
        };
        for (peer, info) in waiting {
            self.challenge(peer, info);
        }
    }

    /// Starts the admission challenge of a peer listing the block protocol (or leaves it
    /// waiting while [`admit::MAX_ADMITTING`] are under way).
    fn challenge(&mut self, peer: PeerId, info: PeerInfo) {
        self.candidates.insert(peer, info);
        let (admitting, full) = {
            let a = self.admitting.borrow();
            (a.contains(&peer), a.len() >= admit::MAX_ADMITTING)
        };
        if admitting || full {
            return;
        }
        self.admitting.send_modify(|a| {
            a.insert(peer);
        });
        let commands = self.own_commands.clone();
        tokio::spawn(async move {
            let outcome = admit::admit(commands.clone(), peer).await;
            if let Some(commands) = commands.upgrade() {
                let _ = commands.send(Command::Admission { peer, outcome }).await;
            }
        });
    }

    /// Counts an admitted peer as a daemon (or updates what identify said of it).
    fn admit_daemon(&mut self, peer: PeerId, info: PeerInfo) {
        if !self.swarm.is_connected(&peer) || self.banned.contains(&peer) {
            return;
        }
        for addr in &info.addrs {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        if self.known.len() < MAX_KNOWN || self.known.contains_key(&peer) {
            self.known.insert(peer, info.addrs.clone());
        }
        // Said before the daemon shows, so whoever sees it sees the mesh as it is.
        let joins = !self.daemons.borrow().contains_key(&peer);
        if joins && self.mesh_is_full(1) {
            self.partial.store(true, Ordering::Relaxed);
        }
        let new = self
            .daemons
            .send_if_modified(|d| d.insert(peer, info.clone()).as_ref() != Some(&info));
        if !self.bootstrapped {
            self.bootstrapped = true;
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
        if new {
            self.sweep();
        }
    }

    /// Counts a peer that speaks Bitswap but is no daemon (an IPFS node) as a block source,
    /// redialled like a daemon while it is gone if it listens anywhere.
    fn add_source(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if !addrs.is_empty() && (self.known.len() < MAX_KNOWN || self.known.contains_key(&peer)) {
            self.known.insert(peer, addrs);
        }
        self.sources.send_if_modified(|s| s.insert(peer));
    }

    /// Looks up the peers closest to a random key through the daemons known so far and
    /// connects to those found: a daemon told of one other learns of the rest (which then
    /// become daemons here once admitted, each asking for another sweep). One at a time; a
    /// sweep asked for meanwhile runs after it.
    fn sweep(&mut self) {
        if self.sweeping.is_some() {
            self.sweep_again = true;
            return;
        }
        if self.mesh_is_full(0) {
            // Discovery stops here: there may be daemons this peer will not meet.
            self.partial.store(true, Ordering::Relaxed);
            return;
        }
        if self.known.len() >= MAX_KNOWN {
            return;
        }
        let key = PeerId::random();
        self.sweeping = Some(self.swarm.behaviour_mut().kad.get_closest_peers(key));
    }

    /// A sweep's lookup answered: connects to what it found.
    fn swept(&mut self, id: kad::QueryId, found: Vec<kad::PeerInfo>, last: bool) {
        if self.sweeping != Some(id) {
            return;
        }
        for info in found {
            self.discovered(info.peer_id, info.addrs);
        }
        if last {
            self.sweeping = None;
            if std::mem::take(&mut self.sweep_again) {
                self.sweep();
            }
        }
    }

    /// Starts the two lookups of `key`'s neighbourhood.
    fn look_up(&mut self, key: Cid, reply: oneshot::Sender<Vec<PeerId>>) {
        if self.neighbourhoods.len() >= MAX_LOOKUPS {
            // As many as a swarm needs at once are running: this one finds nothing.
            let _ = reply.send(Vec::new());
            return;
        }
        let lookup = self.next_lookup;
        self.next_lookup += 1;
        for place in keyspace_keys(&key) {
            let id = self.swarm.behaviour_mut().kad.get_closest_peers(place);
            self.lookups.insert(id, lookup);
        }
        self.neighbourhoods.insert(
            lookup,
            Neighbourhood {
                found: BTreeSet::new(),
                running: 2,
                reply,
            },
        );
    }

    /// A neighbourhood query answered: dials what it found; the last answer of both
    /// queries replies with everything found.
    fn looked_up(&mut self, id: kad::QueryId, found: Vec<kad::PeerInfo>, last: bool) {
        let Some(&lookup) = self.lookups.get(&id) else {
            return;
        };
        let local = *self.swarm.local_peer_id();
        let mut peers = Vec::new();
        for info in found {
            if info.peer_id != local && !self.banned.contains(&info.peer_id) {
                peers.push(info.peer_id);
                self.dial_peer(info.peer_id, info.addrs);
            }
        }
        let Some(hood) = self.neighbourhoods.get_mut(&lookup) else {
            return;
        };
        hood.found.extend(peers);
        if last {
            self.lookups.remove(&id);
            hood.running -= 1;
            if hood.running == 0 {
                let hood = self.neighbourhoods.remove(&lookup).expect("just found");
                let _ = hood.reply.send(hood.found.into_iter().collect());
            }
        }
    }

    /// Closes every connection to `peer` and never connects to it again.
    fn ban(&mut self, peer: PeerId) {
        self.banned.insert(peer);
        self.known.remove(&peer);
        self.candidates.remove(&peer);
        self.daemons.send_if_modified(|d| d.remove(&peer).is_some());
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn send_block_request(
        &mut self,
        peer: PeerId,
        request: BlockRequest,
        reply: oneshot::Sender<Result<BlockResponse, NetError>>,
    ) {
        let id = self
            .swarm
            .behaviour_mut()
            .blocks
            .send_request(&peer, Ok(request));
        self.pending.insert(id, reply);
    }

    /// A block request to `peer` was answered or failed: the next one waiting for it goes out.
    fn next_request(&mut self, peer: PeerId) {
        let Some(sending) = self.sending.get_mut(&peer) else {
            return;
        };
        match sending.waiting.pop_front() {
            Some((request, reply)) => self.send_block_request(peer, request, reply),
            None => {
                sending.in_flight = sending.in_flight.saturating_sub(1);
                if sending.in_flight == 0 {
                    self.sending.remove(&peer);
                }
            }
        }
    }

    /// Publishes how many of our dials are under way.
    fn count_dials(&self) {
        let n = self.under_way.len() as u32;
        self.dialing
            .send_if_modified(|d| std::mem::replace(d, n) != n);
    }

    /// Whether discovery may connect to no more daemons ([`NetConfig::mesh`]) once
    /// `joining` more have; dials under way count, so a burst of discoveries does not
    /// overshoot.
    fn mesh_is_full(&self, joining: usize) -> bool {
        self.daemons.borrow().len() + joining + self.under_way.len() >= self.mesh
    }

    /// A peer discovery found (or a known daemon gone): dialled while the mesh has room;
    /// past it, this peer no longer knows every daemon it could.
    fn discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.swarm.is_connected(&peer) || self.banned.contains(&peer) {
            return;
        }
        if self.mesh_is_full(0) {
            self.partial.store(true, Ordering::Relaxed);
            return;
        }
        self.dial_peer(peer, addrs);
    }

    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id()
            || self.swarm.is_connected(&peer)
            || self.banned.contains(&peer)
        {
            return;
        }
        let addrs = if self.private {
            addrs.into_iter().filter(|a| !is_quic(a)).collect()
        } else {
            addrs
        };
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.under_way.insert(id, Some(peer));
            }
            Err(e) => tracing::debug!("dial {peer}: {e}"),
        }
    }
}

/// Routes a request-response event: an inbound request to its queue (answered `busy` at once
/// when the queue is full), a response or failure to the waiting caller.
fn route<Req: WireMessage + std::fmt::Debug, Resp: WireMessage + std::fmt::Debug>(
    event: request_response::Event<Incoming<Req>, Resp>,
    behaviour: &mut request_response::Behaviour<FramedCodec<Req, Resp>>,
    inbound: &mpsc::Sender<Inbound<Req, Resp>>,
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Result<Resp, NetError>>>,
    answering: &mut HashMap<PeerId, usize>,
    refuse: impl Fn(String) -> Resp,
) {
    use request_response::{Event, Message};
    match event {
        Event::Message {
            peer,
            message: Message::Request {
                request, channel, ..
            },
            ..
        } => {
            let open = answering.entry(peer).or_default();
            *open += 1;
            let refusal = match request {
                Err(Unreadable(reason)) => Some(reason),
                Ok(_) if *open > MAX_ANSWERING => Some(format!(
                    "too many requests at once from this peer (at most {MAX_ANSWERING}); \
                     wait for answers"
                )),
                Ok(request) => match inbound.try_send(Inbound {
                    peer,
                    request,
                    channel: Reply::Remote(channel),
                }) {
                    Ok(()) => return,
                    Err(
                        mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i),
                    ) => {
                        if let Reply::Remote(channel) = i.channel {
                            answer(behaviour, answering, peer, channel, refuse(BUSY.into()));
                        }
                        return;
                    }
                },
            };
            if let Some(reason) = refusal {
                tracing::debug!("refused a request from {peer}: {reason}");
                answer(behaviour, answering, peer, channel, refuse(reason));
            }
        }
        Event::ResponseSent { peer, .. } => done_answering(answering, peer),
        Event::InboundFailure { peer, error, .. } => {
            tracing::debug!("inbound request from {peer} failed: {error}");
            done_answering(answering, peer);
        }
        Event::Message {
            message:
                Message::Response {
                    request_id,
                    response,
                },
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Ok(response));
            }
        }
        Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Err(NetError::Request {
                    peer,
                    reason: error.to_string(),
                }));
            }
        }
    }
}

/// Answers an inbound request from the event loop itself (a refusal).
fn answer<Req: WireMessage, Resp: WireMessage>(
    behaviour: &mut request_response::Behaviour<FramedCodec<Req, Resp>>,
    answering: &mut HashMap<PeerId, usize>,
    peer: PeerId,
    channel: ResponseChannel<Resp>,
    response: Resp,
) {
    // A response that cannot go out (the connection is gone) is never reported as sent.
    if behaviour.send_response(channel, response).is_err() {
        done_answering(answering, peer);
    }
}

fn done_answering(answering: &mut HashMap<PeerId, usize>, peer: PeerId) {
    if let Some(open) = answering.get_mut(&peer) {
        *open = open.saturating_sub(1);
        if *open == 0 {
            answering.remove(&peer);
        }
    }
}

/// A message of one of our request-response protocols: its encoding and its size limit.
pub trait WireMessage: Sized + Send + 'static {
    /// Largest encoded message accepted.
    const LIMIT: usize;
    /// Encodes the message.
    fn to_wire(&self) -> Vec<u8>;
    /// Decodes and validates a message.
    fn from_wire(bytes: &[u8]) -> Result<Self, WireError>;
    /// The encoding as a head and a tail written after it, for messages that carry a large
    /// payload at their end (a block), so it is not copied into one buffer first.
    fn to_wire_parts(&self) -> (Vec<u8>, &[u8]) {
        (self.to_wire(), &[])
    }
}

macro_rules! wire_message {
    ($t:ty, $limit:expr) => {
        impl WireMessage for $t {
            const LIMIT: usize = $limit;
            fn to_wire(&self) -> Vec<u8> {
                self.encode()
            }
            fn from_wire(bytes: &[u8]) -> Result<Self, WireError> {
                Self::decode(bytes)
            }
        }
    };
}
wire_message!(BlockRequest, MAX_REQUEST_SIZE);
impl WireMessage for BlockResponse {
    const LIMIT: usize = MAX_RESPONSE_SIZE;
    fn to_wire(&self) -> Vec<u8> {
        self.encode()
    }
    fn from_wire(bytes: &[u8]) -> Result<Self, WireError> {
        Self::decode(bytes)
    }
    fn to_wire_parts(&self) -> (Vec<u8>, &[u8]) {
        self.encode_parts()
    }
}
wire_message!(JobRequest, MAX_JOB_MESSAGE);
wire_message!(JobResponse, MAX_JOB_MESSAGE);

/// An inbound request as read off its stream: the message, or why it could not be read.
pub type Incoming<Req> = Result<Req, Unreadable>;

/// Why an inbound request could not be read (too large, malformed, too slow, or the budget
/// for large messages spent): the sender is answered with it, as a refusal, rather than
/// having its stream reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub String);

/// Frames messages as a 4-byte big-endian length and the encoded message, and refuses frames
/// over the message type's limit before allocating for them. A frame's buffer grows as its
/// bytes arrive, so memory follows what a peer sent, not what it announced; an inbound
/// request must arrive whole within [`REQUEST_DEADLINE`], and the part of it past
/// [`FREE_FRAME_BYTES`] draws on the sending peer's share of a budget shared by every
/// inbound stream ([`InboundBudget`]): a request that finds either spent is answered `busy`
/// (the sender retries later) instead of growing memory. A request that cannot be read is
/// answered with why.
pub struct FramedCodec<Req, Resp> {
    budget: InboundBudget,
    /// The peer's share, once this codec has been cloned for a connection.
    peer: Option<Arc<Semaphore>>,
    kind: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> FramedCodec<Req, Resp> {
    /// A codec whose large inbound frames draw on `budget`.
    pub fn new(budget: InboundBudget) -> Self {
        Self {
            budget,
            peer: None,
            kind: PhantomData,
        }
    }

    /// The share of the peer this codec reads from: its connection's, or (the behaviour's
    /// own codec, before any connection) a new connection's.
    fn peer_budget(&self) -> Arc<Semaphore> {
        match &self.peer {
            Some(peer) => peer.clone(),
            None => self.budget.for_new_connection(),
        }
    }
}

impl<Req, Resp> std::fmt::Debug for FramedCodec<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FramedCodec")
    }
}

impl<Req, Resp> Default for FramedCodec<Req, Resp> {
    /// A codec with a budget of its own.
    fn default() -> Self {
        Self::new(InboundBudget::default())
    }
}

impl<Req, Resp> Clone for FramedCodec<Req, Resp> {
    /// The behaviour's codec, cloned for a new connection, takes the connection's peer's
    /// share; a connection's codec, cloned for a stream, shares it (see [`budget`]).
    fn clone(&self) -> Self {
        Self {
            budget: self.budget.clone(),
            peer: Some(self.peer_budget()),
            kind: PhantomData,
        }
    }
}

/// The block protocol's codec.
pub type BlockCodec = FramedCodec<BlockRequest, BlockResponse>;
/// The job protocol's codec.
pub type JobCodec = FramedCodec<JobRequest, JobResponse>;

/// Reads one frame of at most `limit` bytes, growing its buffer as the bytes arrive; past
/// [`FREE_FRAME_BYTES`], each piece must first be covered by `budget` (if given: the budgets
/// and the peer's share), held until the frame is decoded.
async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
    budget: Option<(&InboundBudget, &Arc<Semaphore>)>,
) -> io::Result<(Vec<u8>, Option<Permits>)> {
    const PIECE: usize = 16 << 10;
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {limit}"),
        ));
    }
    // Pieces, joined once the frame is whole: a growing vector would copy itself again and
    // again, and reserve up to twice what arrived.
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let mut got = 0;
    let mut held: Option<Permits> = None;
    while got < len {
        let piece = (len - got).min(PIECE);
        let end = got + piece;
        if let Some((budget, peer)) = budget.filter(|_| end > FREE_FRAME_BYTES) {
            let units = (end - got.max(FREE_FRAME_BYTES)).div_ceil(BUDGET_UNIT) as u32;
            let Some(more) = budget.take(peer, units) else {
                // The sender reads an answer only once it has written its frame: the rest is
                // read and dropped, holding nothing, before it is told it is busy.
                drop(pieces);
                let mut scratch = vec![0; PIECE];
                let mut left = len - got;
                while left > 0 {
                    let n = left.min(PIECE);
                    io.read_exact(&mut scratch[..n]).await?;
                    left -= n;
                }
                return Err(io::Error::new(io::ErrorKind::OutOfMemory, BUSY));
            };
            match &mut held {
                Some(permit) => permit.merge(more),
                None => held = Some(more),
            }
        }
        let mut buf = vec![0; piece];
        io.read_exact(&mut buf).await?;
        pieces.push(buf);
        got = end;
    }
    let frame = if pieces.len() == 1 {
        pieces.pop().expect("one piece")
    } else {
        pieces.concat()
    };
    Ok((frame, held))
}

/// Writes one frame: its length, then `head` and `tail` (the payload in two parts).
async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    head: &[u8],
    tail: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(head.len() + tail.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    if tail.is_empty() {
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(head).await?;
    } else {
        // The head is a few bytes: sent with the length, as one write.
        io.write_all(&[&len.to_be_bytes()[..], head].concat())
            .await?;
        io.write_all(tail).await?;
    }
    io.close().await
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<Req: WireMessage, Resp: WireMessage> request_response::Codec for FramedCodec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Incoming<Req>;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Incoming<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let peer = self.peer_budget();
        let read = read_frame(io, Req::LIMIT, Some((&self.budget, &peer)));
        let unreadable = |reason: String| Ok(Err(Unreadable(reason)));
        match tokio::time::timeout(REQUEST_DEADLINE, read).await {
            Err(_) => unreadable(format!(
                "the request did not arrive within {} s",
                REQUEST_DEADLINE.as_secs()
            )),
            Ok(Ok((frame, _held))) => {
                Ok(Req::from_wire(&frame).map_err(|e| Unreadable(e.to_string())))
            }
            // The budget spent: the peer is told it is busy.
            Ok(Err(e)) if e.kind() == io::ErrorKind::OutOfMemory => unreadable(e.to_string()),
            // A frame over the limit (whose sender is still writing it, so it could not read
            // an answer; p2pmr peers never send one), or the stream itself failed: reset.
            Ok(Err(e)) => Err(e),
        }
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        // An answer to our own request: the request's timeout bounds it.
        let (frame, _) = read_frame(io, Resp::LIMIT, None).await?;
        Resp::from_wire(&frame).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Incoming<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let request = request.map_err(|Unreadable(reason)| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an unreadable request is never sent: {reason}"),
            )
        })?;
        let frame = request.to_wire();
        if frame.len() > Req::LIMIT {
            // The peer would cut it off unread: say why here instead.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the request is {} bytes, more than the protocol's limit of {}",
                    frame.len(),
                    Req::LIMIT
                ),
            ));
        }
        write_frame(io, &frame, &[]).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let (head, tail) = response.to_wire_parts();
        write_frame(io, &head, tail).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;
    use p2pmr_protocol::Block;

    fn framed(request: &BlockRequest) -> Vec<u8> {
        let body = request.encode();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }

    async fn read(
        codec: &mut BlockCodec,
        bytes: &[u8],
    ) -> (io::Result<Incoming<BlockRequest>>, u64) {
        let mut io = futures::io::Cursor::new(bytes.to_vec());
        let protocol = StreamProtocol::new(BLOCK_PROTOCOL);
        let read = codec.read_request(&protocol, &mut io).await;
        (read, io.position())
    }

    #[tokio::test]
    async fn requests_that_cannot_be_read_become_refusals_or_resets() {
        let block = Block::raw(vec![7; 200 << 10]);
        let put = BlockRequest::Put {
            cid: *block.cid(),
            data: block.data().to_vec(),
            replicas: 1,
            session: 1,
            group: None,
        };
        let frame = framed(&put);
        // Read whole with budget to spare.
        let mut codec = BlockCodec::default();
        let (whole, _) = read(&mut codec, &frame).await;
        assert_eq!(whole.unwrap(), Ok(put.clone()));
        // The budget spent: the rest of the frame is read and dropped, and the answer is busy.
        let mut codec = BlockCodec::new(InboundBudget::new(BUDGET_UNIT, BUDGET_UNIT));
        let (spent, at) = read(&mut codec, &frame).await;
        assert_eq!(spent.unwrap(), Err(Unreadable(BUSY.into())));
        assert_eq!(at, frame.len() as u64, "the frame was not read to its end");
        // Malformed: refused with the decoder's reason.
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 5]);
        let (bad, _) = read(&mut BlockCodec::default(), &garbage).await;
        assert!(matches!(bad.unwrap(), Err(Unreadable(r)) if r.contains("malformed")));
        // A length over the limit: reset, nothing allocated for it.
        let over = ((MAX_REQUEST_SIZE + 1) as u32).to_be_bytes();
        let (reset, _) = read(&mut BlockCodec::default(), &over).await;
        assert_eq!(reset.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // Cut short: the stream failed, nobody to answer.
        let (cut, _) = read(&mut BlockCodec::default(), &frame[..1000]).await;
        assert_eq!(cut.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
