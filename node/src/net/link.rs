//! How a peer gets onto the network: a daemon's running swarm, or a short-lived client peer
//! started on first use that looks for daemons only as long as the command at hand needs.
//!
//! A client peer dials every `--peer` address at once and then waits, per request, for as
//! many daemons as that request needs (an `add` with 2 replicas needs 2, `peers` wants all it
//! can find within the discovery window). With mDNS, answers trickle in, so a request that
//! places data or needs every daemon ([`Link::ready`]) also waits until they stop coming for a
//! moment; one that can start with any daemon ([`Link::ready_soon`]: reads, job submission)
//! goes as soon as it has what it needs, and a read that then misses (a block no daemon found
//! so far holds) waits for the rest with [`Link::ready`] before giving up. Nothing is started
//! for a command that never touches the network, so a `cat` of a local file does not wait for
//! discovery.

use super::{spawn, NetClient, NetConfig, NetError, SwarmKey};
use futures::future::join_all;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

/// How long an mDNS peer waits for more daemons to answer after the last one did, when it
/// waits for discovery to settle.
const QUIET: Duration = Duration::from_millis(300);

/// Whether a wait for daemons also waits for discovery to go quiet.
#[derive(Debug, Clone, Copy)]
enum Quiet {
    No,
    /// With mDNS only: without it, the named peers being there is enough.
    WithMdns,
    Always,
}
/// The shortest discovery window.
const MIN_DISCOVERY: Duration = Duration::from_millis(500);
/// How long past the window a client with no daemon waits for dials under way to decide.
const DIAL_TIMEOUT: Duration = Duration::from_secs(12);

/// How a client peer finds daemons.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Daemons to dial.
    pub peers: Vec<Multiaddr>,
    /// Also discover daemons on the LAN with mDNS.
    pub mdns: bool,
    /// How long to look for daemons before using what was found.
    pub discovery: Duration,
    /// The private swarm's key, if the daemons are in one.
    pub swarm_key: Option<SwarmKey>,
    /// The client's identity (a fresh one each time if none).
    pub identity: Option<Keypair>,
    /// Most daemons the client connects to as it discovers them ([`NetConfig::mesh`]).
    pub mesh: usize,
}

/// A peer's way onto the network (see the module docs).
#[derive(Debug)]
pub struct Link {
    kind: Kind,
    started: OnceCell<Started>,
}

#[derive(Debug)]
enum Kind {
    /// No network at all.
    Offline,
    /// A network someone else runs (a daemon's).
    Given,
    /// A client peer, started on first use.
    Lazy(Box<ClientConfig>),
}

#[derive(Debug)]
struct Started {
    net: NetClient,
    /// The `--peer`s that answered the dial: requests wait until identify has classified them.
    named: Vec<PeerId>,
    /// When discovery stops being worth waiting for.
    deadline: Instant,
    /// The most daemons a wait has already been satisfied with (`usize::MAX` once the
    /// deadline has passed): later requests for as many do not wait again.
    satisfied: AtomicUsize,
    /// The client peer's event loop, when this link started it.
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// No network: only local data is reachable.
    pub fn offline() -> Self {
        Self {
            kind: Kind::Offline,
            started: OnceCell::new(),
        }
    }

    /// A network that is already running (a daemon's own); requests never wait for discovery.
    pub fn given(net: NetClient) -> Self {
        let started = Started {
            net,
            named: Vec::new(),
            deadline: Instant::now(),
            satisfied: AtomicUsize::new(usize::MAX),
            task: Mutex::new(None),
        };
        Self {
            kind: Kind::Given,
            started: OnceCell::new_with(Some(started)),
        }
    }

    /// A client peer started with `config` on first use.
    pub fn lazy(config: ClientConfig) -> Self {
        Self {
            kind: Kind::Lazy(Box::new(config)),
            started: OnceCell::new(),
        }
    }

    /// The network, if it is running (never starts it).
    pub fn get(&self) -> Option<&NetClient> {
        self.started.get().map(|s| &s.net)
    }

    /// The network, started if need be, once `want` daemons are connected (with mDNS, and no
    /// more have answered for a moment) or discovery is over (`None` when offline). `want` =
    /// `usize::MAX` waits for the whole window.
    pub async fn ready(&self, want: usize) -> Result<Option<&NetClient>, NetError> {
        self.ready_as(want, Quiet::WithMdns).await
    }

    /// Like [`Link::ready`], but also without mDNS waits until no daemon has been found for
    /// a moment (or discovery is over): for a reader that did not find a block among the
    /// daemons found so far, Kademlia's sweeps may be finding more.
    pub async fn ready_quiet(&self, want: usize) -> Result<Option<&NetClient>, NetError> {
        self.ready_as(want, Quiet::Always).await
    }

    /// Like [`Link::ready`], but goes as soon as `want` daemons are connected, without waiting
    /// for mDNS answers to stop coming.
    pub async fn ready_soon(&self, want: usize) -> Result<Option<&NetClient>, NetError> {
        self.ready_as(want, Quiet::No).await
    }

    async fn ready_as(&self, want: usize, quiet: Quiet) -> Result<Option<&NetClient>, NetError> {
        let config = match &self.kind {
            Kind::Offline => return Ok(None),
            Kind::Given => return Ok(self.get()),
            Kind::Lazy(config) => config,
        };
        let started = self.started.get_or_try_init(|| start(config)).await?;
        let settle = match quiet {
            Quiet::No => false,
            Quiet::WithMdns => config.mdns,
            Quiet::Always => true,
        };
        started.wait(want, settle).await;
        // Found no daemon but met one it could not talk to: that is the thing to say.
        if let Some(peer) = started
            .net
            .refused_by()
            .filter(|_| started.net.daemons().is_empty())
        {
            return Err(NetError::Handshake { peer });
        }
        Ok(Some(&started.net))
    }

    /// Stops the client peer this link started (connections close); a given network is left
    /// running.
    pub async fn close(&self) {
        let Some(started) = self.started.get() else {
            return;
        };
        let task = started.task.lock().expect("poisoned").take();
        if let Some(task) = task {
            started.net.shutdown().await;
            let _ = task.await;
        }
    }
}

async fn start(config: &ClientConfig) -> Result<Started, NetError> {
    let network = spawn(NetConfig {
        keypair: config
            .identity
            .clone()
            .unwrap_or_else(Keypair::generate_ed25519),
        listen: vec![],
        bootstrap: vec![],
        mdns: config.mdns,
        serve: false,
        swarm_key: config.swarm_key,
        mesh: config.mesh,
    })
    .await?;
    let net = network.client;
    let dials = config.peers.iter().map(|a| net.dial(a.clone()));
    let mut named = Vec::new();
    for (addr, result) in config.peers.iter().zip(join_all(dials).await) {
        match result {
            Ok(()) => named.extend(peer_of(addr)),
            // Not a daemon that is down but one this peer may never talk to: say so now
            // rather than search on and report no daemons.
            Err(e @ NetError::Handshake { .. }) => return Err(e),
            Err(e) => tracing::warn!("cannot reach {addr}: {e}"),
        }
    }
    Ok(Started {
        net,
        named,
        deadline: Instant::now() + config.discovery.max(MIN_DISCOVERY),
        satisfied: AtomicUsize::new(0),
        task: Mutex::new(Some(network.task)),
    })
}

impl Started {
    /// Waits until the named peers are classified and `want` daemons are connected (if
    /// `settle`, also until no more have arrived for a moment), or the deadline passes.
    async fn wait(&self, want: usize, settle: bool) {
        if want <= self.satisfied.load(Ordering::Relaxed) {
            return;
        }
        let mut changes = self.net.watch_daemons();
        let mut settled_at = Instant::now();
        loop {
            let daemons = self.net.daemons();
            let named_ready = self.named.iter().all(|p| daemons.contains_key(p));
            let enough = daemons.len() >= want.max(1);
            // Without mDNS, more daemons can only come from Kademlia (the named peers'
            // routing tables), which finds them within a round trip or two: there is no need
            // to wait for quiet, as mDNS answers may trickle in and Kademlia's do not.
            let quiet = !settle || settled_at.elapsed() >= QUIET;
            if named_ready && enough && quiet {
                // What a settled wait found, later settled waits for as many need not wait for.
                if settle {
                    self.satisfied.fetch_max(want, Ordering::Relaxed);
                }
                return;
            }
            // Past the window with no daemon yet, a dial still under way may be one that
            // will fail its handshake (a private swarm's daemon), which is worth reporting
            // rather than "no daemons": wait for such dials, up to the dial timeout.
            let undecided = daemons.is_empty()
                && self.net.dialing() > 0
                && Instant::now() < self.deadline + DIAL_TIMEOUT;
            if Instant::now() >= self.deadline && !undecided {
                tracing::debug!(
                    "discovery over: {} daemons, {} dials under way",
                    daemons.len(),
                    self.net.dialing()
                );
                self.satisfied.store(usize::MAX, Ordering::Relaxed);
                return;
            }
            let wait = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() { return; }
                    settled_at = Instant::now();
                }
                _ = wait => {}
            }
        }
    }
}

/// The peer id an address names with `/p2p/<id>`, if any.
pub(super) fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}
