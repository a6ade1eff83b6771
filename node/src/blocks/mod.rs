//! Moving blocks between peers: `add` pushes a file's blocks to N daemons chosen by the
//! placement rule, the [`Fetcher`] streams a file from whoever holds it, `stat` counts who holds
//! what, and the [`keeper`] restores replica counts when daemons leave.
//!
//! A client never uses a local daemon's repository directly: a daemon on the same machine is
//! found and used over the network like any other, so the commands work the same with or
//! without one. `cat` does read blocks from the local repository first when
//! one exists, which is free and keeps `add --local` files readable without any daemon.
//!
//! Placement is rendezvous hashing over the connected daemons' peer ids
//! ([`p2pmr_protocol::wire::rank_peers`]) by each block's placement group
//! ([`p2pmr_protocol::unixfs::Groups`]): the leaves under one bottom-level node go to the same
//! daemons, so a map task over them finds its whole split on one holder. Of a group's first
//! few ranked daemons the least loaded take its copies ([`Book`]), which keeps the fullest
//! daemon near the mean where rank alone would not. No per-block
//! provider records are announced: a reader ranks the daemons it knows by the same key
//! (which the node listing a leaf tells it) and asks the likely holders first, falling back
//! to the rest, so finding a block costs no lookup and no DHT state.

pub mod keeper;
pub mod ledger;
pub mod limits;
mod pin;
pub(crate) mod server;

pub use pin::Fetched;

use crate::bitswap::{Bitswap, BitswapError};
use crate::engine::client;
use crate::net::{Link, NetClient, NetError};
use crate::repo::files::{self, Added, FileError};
use crate::repo::store::{BlockStore, StoreError};
use futures::future::join_all;
use libp2p::PeerId;
use p2pmr_protocol::block::RAW;
use p2pmr_protocol::dagpb::PbNode;
use p2pmr_protocol::job::AUTO_SPLIT_MAX;
use p2pmr_protocol::unixfs::{
    self, directory_entries, FileReader, Groups, Layout, NodeType, UnixFsData, UnixFsError,
};
use p2pmr_protocol::wire::{
    keep_or_least_loaded, proof, rank_peers, BlockRequest, BlockResponse, CHOICES, MAX_HAS,
};
use p2pmr_protocol::{Block, Cid};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Placement groups a fetcher remembers the last server of.
const SERVED_GROUPS: usize = 1024;

/// Blocks being pushed or fetched at once by one command.
pub const WINDOW: usize = 16;
/// How long a client looks for daemons on the LAN before using what it found.
pub const DISCOVERY: Duration = Duration::from_secs(2);

/// Errors of client operations over the network.
#[derive(Debug, Error)]
pub enum RemoteError {
    /// Fewer daemons are reachable than the operation needs.
    #[error("need {need} daemon(s) but found {found} (start `p2pmr daemon` on more peers, or pass --peer)")]
    NotEnoughDaemons {
        /// How many were needed.
        need: usize,
        /// How many were found.
        found: usize,
    },
    /// A block could not be stored on enough daemons.
    #[error("block {cid} was stored on {stored} of {wanted} daemons: {reason}")]
    Replication {
        /// The block.
        cid: Cid,
        /// Durable copies made.
        stored: usize,
        /// Copies wanted.
        wanted: usize,
        /// The last failure.
        reason: String,
    },
    /// No daemon could be found to ask for the block.
    #[error("block {cid} is not stored here and no daemon was found to ask (start `p2pmr daemon`, or pass --peer)")]
    NoDaemons {
        /// The block.
        cid: Cid,
    },
    /// No reachable daemon has the block, or none that has it answered.
    #[error("{}", unavailable(cid, *asked, *failed))]
    Unavailable {
        /// The block.
        cid: Cid,
        /// How many daemons were asked.
        asked: usize,
        /// How many of them did not answer (timed out, failed, refused).
        failed: usize,
    },
    /// A daemon that said it stored a block could not prove it holds it.
    #[error("{peer} said it stored block {cid} but cannot prove it holds it ({reason}); it is not used again")]
    NoProof {
        /// The daemon.
        peer: PeerId,
        /// The block.
        cid: Cid,
        /// What it answered.
        reason: String,
    },
    /// A daemon did not confirm the add: the blocks it holds stay provisional there, and are
    /// collected after its grace period unless the add is made again.
    #[error("{peer} did not confirm the add: {reason}")]
    Commit {
        /// The daemon.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Neither a daemon nor an IPFS node (over Bitswap) had the block.
    #[error("{daemons}; nor over Bitswap: {ipfs}")]
    NotOnIpfs {
        /// What the daemons answered.
        daemons: Box<RemoteError>,
        /// What the IPFS nodes answered.
        ipfs: BitswapError,
    },
    /// Reading or writing files failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Why a block could not be fetched, telling daemons that said they do not have it from
/// those that did not answer (a slow or stalled daemon is not one without the block).
fn unavailable(cid: &Cid, asked: usize, failed: usize) -> String {
    match failed {
        0 => format!("block {cid} is not available from any of {asked} reachable daemon(s)"),
        n if n == asked => format!(
            "block {cid} could not be fetched: none of the {asked} daemon(s) asked answered in \
             time"
        ),
        n => format!(
            "block {cid} could not be fetched: {} daemon(s) do not have it and {n} did not \
             answer in time",
            asked - n
        ),
    }
}

impl From<UnixFsError> for RemoteError {
    fn from(e: UnixFsError) -> Self {
        Self::File(FileError::Format(e))
    }
}

/// Adds `source` to the network: every block is stored durably on `replicas` distinct daemons
/// before the root is returned.
pub async fn add(
    net: &NetClient,
    source: impl Read + Send + 'static,
    replicas: usize,
    layout: Layout,
) -> Result<Added, RemoteError> {
    let (tx, rx) = mpsc::channel::<(Block, Option<Cid>)>(WINDOW);
    // Chunking and hashing are CPU work: a plain thread feeds the async uploader.
    let builder = tokio::task::spawn_blocking(move || {
        let mut groups = Groups::new(layout);
        files::build(source, layout, Vec::new, |b| {
            let group = groups.key(b.cid());
            tx.blocking_send((b, Some(group))).is_ok()
        })
    });
    let pushed = push_all(net, rx, replicas).await;
    let built = builder.await.expect("chunker panicked");
    pushed?;
    Ok(built?)
}

/// Stores every block that arrives on `blocks` durably on `replicas` distinct daemons, chosen
/// by the placement rule, [`WINDOW`] blocks at a time. Stops taking blocks at the first
/// failure (dropping the receiver tells the sender) and returns it. The blocks go under one
/// new add session, committed on every daemon that took some once all are stored: until
/// then they are provisional there (see [`ledger`]), so an add that fails or is interrupted
/// leaves nothing behind for good. Before committing, every daemon that took blocks proves it
/// holds one of them, picked at random ([`BlockRequest::Prove`]): a peer that only claims to
/// store fails the add rather than leave its blocks stored nowhere.
/// Each block comes with its placement group's key (`None`: its own CID).
pub async fn push_all(
    net: &NetClient,
    mut blocks: mpsc::Receiver<(Block, Option<Cid>)>,
    replicas: usize,
) -> Result<(), RemoteError> {
    let daemons: Vec<PeerId> = net.daemons().into_keys().collect();
    // Past a full mesh the groups' lookups may find more daemons: each push says if too few.
    if replicas == 0 || (daemons.len() < replicas && !net.is_partial()) {
        return Err(RemoteError::NotEnoughDaemons {
            need: replicas.max(1),
            found: daemons.len(),
        });
    }
    let window = Arc::new(Semaphore::new(WINDOW));
    let mut placer = Placer::new(net, daemons, replicas, Vec::new()).await;
    let session = new_session();
    let mut uploads = JoinSet::new();
    let mut failure = None;
    let mut took = Samples::default();
    let reap =
        |done: Result<Result<(Vec<PeerId>, Block), RemoteError>, tokio::task::JoinError>,
         took: &mut Samples,
         failure: &mut Option<RemoteError>| match done.expect("upload task panicked") {
            Ok((peers, block)) => peers.into_iter().for_each(|p| took.offer(p, &block)),
            Err(e) => {
                failure.get_or_insert(e);
            }
        };
    while let Some((block, group)) = blocks.recv().await {
        // Reap finished uploads so errors surface early and the set stays small.
        while let Some(done) = uploads.try_join_next() {
            reap(done, &mut took, &mut failure);
        }
        if failure.is_some() {
            break;
        }
        let permit = window.clone().acquire_owned().await.expect("never closed");
        let key = group.unwrap_or(*block.cid());
        let order = placer.order(net, &key, replicas, &block).await;
        let net = net.clone();
        uploads.spawn(async move {
            let place = Placement {
                replicas,
                target: replicas,
                session,
                group,
            };
            let r = push(&net, &order, &block, place).await;
            drop(permit);
            r.map(|peers| (peers, block))
        });
    }
    drop(blocks);
    while let Some(done) = uploads.join_next().await {
        reap(done, &mut took, &mut failure);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let samples: Vec<(PeerId, Block)> = took.0.into_iter().map(|(p, (_, b))| (p, b)).collect();
    prove(net, &samples).await?;
    commit(net, samples.into_iter().map(|(p, _)| p).collect(), session).await
}

/// For each daemon that took blocks: how many, and one of them picked uniformly at random
/// (reservoir sampling), which it will be asked to prove it holds.
#[derive(Default)]
struct Samples(HashMap<PeerId, (u64, Block)>);

impl Samples {
    /// `peer` stored `block`.
    fn offer(&mut self, peer: PeerId, block: &Block) {
        let (n, sample) = self.0.entry(peer).or_insert_with(|| (0, block.clone()));
        *n += 1;
        // A copy only when the sample changes: about ln(n) times per daemon.
        if *n > 1 && random_u64().is_multiple_of(*n) {
            *sample = block.clone();
        }
    }
}

/// Asks each daemon to prove it holds its sample block; one that cannot is banned, and the
/// first such failure is the error.
async fn prove(net: &NetClient, samples: &[(PeerId, Block)]) -> Result<(), RemoteError> {
    let proofs = samples.iter().map(|(peer, block)| async move {
        let reason = match challenge(net, *peer, block).await {
            Proved::Yes => return Ok(()),
            Proved::No(reason) | Proved::NoAnswer(reason) => reason,
            Proved::Gone => describe(&BlockResponse::NotFound),
        };
        net.ban(*peer).await;
        Err(RemoteError::NoProof {
            peer: *peer,
            cid: *block.cid(),
            reason,
        })
    });
    join_all(proofs).await.into_iter().collect()
}

/// How a daemon met a challenge to prove it holds a block.
pub(crate) enum Proved {
    /// It proved it.
    Yes,
    /// It answered something else (a wrong proof, a refusal).
    No(String),
    /// It answered that it does not hold the block.
    Gone,
    /// It did not answer.
    NoAnswer(String),
}

/// Asks `peer` to prove it holds `block` (which this peer holds too) with a fresh nonce.
pub(crate) async fn challenge(net: &NetClient, peer: PeerId, block: &Block) -> Proved {
    let nonce = crate::net::random_bytes::<32>();
    let cid = *block.cid();
    match patiently(net, peer, || BlockRequest::Prove { cid, nonce }).await {
        Ok(BlockResponse::Proof(p)) if p == proof(&nonce, block.data()) => Proved::Yes,
        Ok(BlockResponse::Proof(_)) => Proved::No("a wrong proof".into()),
        Ok(BlockResponse::NotFound) => Proved::Gone,
        Ok(other) => Proved::No(describe(&other)),
        Err(e) => Proved::NoAnswer(e.to_string()),
    }
}

/// A new add session number.
fn new_session() -> u64 {
    random_u64()
}

/// A random number (see [`crate::net::random_bytes`]).
pub(crate) fn random_u64() -> u64 {
    u64::from_le_bytes(crate::net::random_bytes())
}

/// Tells every daemon in `took` that add session `session` is complete.
async fn commit(net: &NetClient, took: HashSet<PeerId>, session: u64) -> Result<(), RemoteError> {
    let commits = took.into_iter().map(|peer| async move {
        match patiently(net, peer, || BlockRequest::Commit { session }).await {
            Ok(BlockResponse::Stored) => Ok(()),
            Ok(other) => Err(RemoteError::Commit {
                peer,
                reason: describe(&other),
            }),
            Err(e) => Err(RemoteError::Commit {
                peer,
                reason: e.to_string(),
            }),
        }
    });
    join_all(commits).await.into_iter().collect()
}

/// Copies the blocks `cids` of `store` to `copies` other daemons each, chosen by the placement
/// rule among the daemons this peer can reach ([`Placer`]; this peer and `avoid` excluded: this peer holds them
/// already, and a coordinator may have given up on some daemons), by their placement group
/// in `groups` (their own CID if not there). Used for job outputs, which are written on the
/// peer that computed them, and for files added through a daemon.
pub async fn replicate(
    net: &NetClient,
    store: &BlockStore,
    cids: &[Cid],
    copies: usize,
    avoid: &[PeerId],
    groups: &HashMap<Cid, Cid>,
) -> Result<(), RemoteError> {
    if copies == 0 {
        return Ok(());
    }
    let me = net.local_peer_id();
    let daemons: Vec<PeerId> = net
        .daemons()
        .into_keys()
        .filter(|p| *p != me && !avoid.contains(p))
        .collect();
    if daemons.len() < copies && !net.is_partial() {
        return Err(RemoteError::NotEnoughDaemons {
            need: copies + 1,
            found: daemons.len() + 1,
        });
    }
    let mut avoid = avoid.to_vec();
    avoid.push(me);
    let mut placer = Placer::new(net, daemons, copies, avoid).await;
    let mut uploads = JoinSet::new();
    let window = Arc::new(Semaphore::new(WINDOW));
    for &cid in cids {
        let permit = window.clone().acquire_owned().await.expect("never closed");
        let (net, store) = (net.clone(), store.clone());
        let block = tokio::task::spawn_blocking(move || store.get(&cid))
            .await
            .expect("store task panicked")
            .map_err(FileError::Store)?;
        let group = groups.get(&cid).copied();
        let key = group.unwrap_or(cid);
        let order = placer.order(&net, &key, copies, &block).await;
        uploads.spawn(async move {
            // Daemons' copies are not provisional on the receiver: no session to commit.
            let place = Placement {
                replicas: copies,
                target: copies + 1,
                session: 0,
                group,
            };
            let r = push(&net, &order, &block, place).await.map(drop);
            drop(permit);
            r
        });
    }
    while let Some(done) = uploads.join_next().await {
        done.expect("upload task panicked")?;
    }
    Ok(())
}

/// How long placing a job output's copies waits for daemons that are restarting, or for
/// another to stand in for one that died mid-copy, before it fails.
pub const REPLICATE_WAIT: Duration = Duration::from_secs(10);

/// [`replicate`], tried again while too few daemons are in reach or one of them fails
/// mid-copy, for up to [`REPLICATE_WAIT`]: a job whose work is done must not fail because a
/// daemon restarts while its output is being copied. Copying again is safe: a daemon that has
/// a block already answers that it stored it.
pub async fn replicate_patiently(
    net: &NetClient,
    store: &BlockStore,
    cids: &[Cid],
    copies: usize,
    avoid: &[PeerId],
    groups: &HashMap<Cid, Cid>,
) -> Result<(), RemoteError> {
    let waiting = Instant::now();
    loop {
        match replicate(net, store, cids, copies, avoid, groups).await {
            Err(RemoteError::NotEnoughDaemons { .. } | RemoteError::Replication { .. })
                if waiting.elapsed() < REPLICATE_WAIT =>
            {
                tokio::time::sleep(REPLICATE_WAIT / 40).await;
            }
            placed => return placed,
        }
    }
}

/// The placement groups of the leaves of the UnixFS files under `roots` in `store` (whose
/// blocks came in no particular order, e.g. a staged upload or CAR): each leaf listed by a
/// file node maps to its group's key ([`unixfs::group_of`]). Blocks not in the map are placed
/// by their own CID. Only file nodes group their children: a directory's entries are files
/// of their own.
pub fn placement_groups(store: &BlockStore, roots: &[Cid]) -> HashMap<Cid, Cid> {
    let mut groups = HashMap::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<Cid> = roots.to_vec();
    while let Some(cid) = stack.pop() {
        if cid.codec() == RAW || !seen.insert(cid) {
            continue;
        }
        let Ok(block) = store.get(&cid) else { continue };
        let Ok(node) = PbNode::decode(block.data()) else {
            continue;
        };
        let is_file = node
            .data
            .and_then(|d| UnixFsData::decode(d).ok())
            .is_some_and(|d| matches!(d.kind, NodeType::File | NodeType::Raw));
        let first = node.links.first().map(|l| l.hash);
        for link in &node.links {
            if is_file && link.hash.codec() == RAW {
                groups.insert(link.hash, unixfs::group_of(&link.hash, first));
            }
            stack.push(link.hash);
        }
    }
    groups.retain(|cid, group| cid != group);
    groups
}

/// A daemon and its peer id's bytes, the form the placement rule hashes (computed once, not
/// per block).
#[derive(Debug)]
pub(crate) struct Placed {
    pub(crate) id: PeerId,
    bytes: Vec<u8>,
}

impl Placed {
    pub(crate) fn new(id: PeerId) -> Self {
        Self {
            bytes: id.to_bytes(),
            id,
        }
    }
}

impl AsRef<[u8]> for Placed {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// `daemons` ranked for holding blocks placed by `key` (a placement group's), best first.
pub(crate) fn placement(key: &Cid, daemons: &[Placed]) -> Vec<PeerId> {
    rank_peers(key, daemons).into_iter().map(|d| d.id).collect()
}

/// Blocks an audit picks at most, when the daemon audited says it dropped the ones picked.
pub(crate) const AUDIT_PICKS: usize = 3;

/// How long a reader waits for a neighbourhood lookup, and then for the daemons it found to
/// be connected and admitted.
const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// How long a placer waits for the daemons to say how much they hold before placing without
/// knowing (by rank alone).
const LOADS_WAIT: Duration = Duration::from_millis(500);
/// Groups a [`Book`] remembers its choice for: a file's blocks arrive group after group, so
/// only the last few are still being pushed.
const BOOK_GROUPS: usize = 16;

/// A run of consecutive groups kept on the same daemons is let go past this many bytes: the
/// largest automatic split, so a map task over a run reads it all locally.
const RUN_BYTES: u64 = AUTO_SPLIT_MAX;

/// One placer's choices (an add, or a daemon copying what it wrote to others): which daemons
/// each placement group goes to. A group goes where the one before it went while that run is
/// under [`RUN_BYTES`] and those daemons are among its candidates, else to the least loaded of
/// its first ranked daemons ([`keep_or_least_loaded`]). Loads are the bytes each daemon said it
/// held when the book was opened plus what this book has sent it since, so one large add
/// spreads evenly by itself. Every block of a group gets the order its first block got.
pub(crate) struct Book {
    loads: HashMap<PeerId, u64>,
    recent: VecDeque<(Cid, Arc<[PeerId]>)>,
    /// The daemons the current run of groups is on, and its bytes so far.
    run: (Vec<PeerId>, u64),
}

impl Book {
    /// A book with the daemons' loads given (absent: nothing held).
    pub(crate) fn new(loads: HashMap<PeerId, u64>) -> Self {
        Self {
            loads,
            recent: VecDeque::with_capacity(BOOK_GROUPS),
            run: (Vec::new(), 0),
        }
    }

    /// A book for placing `replicas` copies of each block on `daemons`, asking each how much
    /// it holds when there is a choice to make (more daemons than copies). A daemon that does
    /// not answer within [`LOADS_WAIT`] counts as holding as much as the fullest that did.
    pub(crate) async fn asking(net: &NetClient, daemons: &[PeerId], replicas: usize) -> Self {
        if daemons.len() <= replicas {
            return Self::new(HashMap::new());
        }
        let asks = daemons.iter().map(|&peer| async move {
            let status = client::status(net, peer, LOADS_WAIT).await;
            (peer, status.ok().map(|s| s.bytes))
        });
        let answers = join_all(asks).await;
        let fullest = answers.iter().filter_map(|(_, b)| *b).max().unwrap_or(0);
        let loads = answers
            .into_iter()
            .map(|(peer, bytes)| (peer, bytes.unwrap_or(fullest)))
            .collect();
        Self::new(loads)
    }

    /// Whether the blocks placed by `key` have their daemons chosen already.
    fn knows(&self, key: &Cid) -> bool {
        self.recent.iter().any(|(k, _)| k == key)
    }

    /// Adds daemons met after the book was opened, asking each how much it holds; one that
    /// does not answer within [`LOADS_WAIT`] counts as the fullest known.
    async fn learn(&mut self, net: &NetClient, daemons: &[PeerId]) {
        let asks = daemons.iter().map(|&peer| async move {
            let status = client::status(net, peer, LOADS_WAIT).await;
            (peer, status.ok().map(|s| s.bytes))
        });
        let answers = join_all(asks).await;
        let fullest = self.loads.values().copied().max().unwrap_or(0);
        for (peer, bytes) in answers {
            self.loads.insert(peer, bytes.unwrap_or(fullest));
        }
    }

    /// The daemons to offer `block` of the group placed by `key` to, best first, for
    /// `replicas` copies; its bytes count against the first `replicas` of them. `ranked` gives
    /// the daemons to choose among, in [`placement`] order; it is called only for a group's
    /// first block (the others get the order it got).
    pub(crate) fn order(
        &mut self,
        key: &Cid,
        replicas: usize,
        block: &Block,
        ranked: impl FnOnce() -> Vec<PeerId>,
    ) -> Arc<[PeerId]> {
        let len = block.data().len() as u64;
        match self.recent.iter().find(|(k, _)| k == key) {
            Some((_, order)) => {
                let order = order.clone();
                self.count(&order, replicas, len);
                order
            }
            None => {
                // A file's inner node (placed by its own CID) is no group of leaves: it may
                // join the run, but does not start one.
                let group = block.cid().codec() == RAW;
                self.place(*key, ranked(), replicas, len, group)
            }
        }
    }

    /// Chooses where the blocks placed by `key` go, given the daemons `ranked` for it (its
    /// [`placement`] ranking, or the first of it), and counts `len` bytes of them there. Only
    /// a `group` (not a lone block) can start a new run.
    pub(crate) fn place(
        &mut self,
        key: Cid,
        mut ranked: Vec<PeerId>,
        replicas: usize,
        len: u64,
        group: bool,
    ) -> Arc<[PeerId]> {
        let keep = (self.run.1 < RUN_BYTES).then_some(self.run.0.as_slice());
        let loads = &self.loads;
        let kept = keep_or_least_loaded(
            &mut ranked,
            replicas,
            |p| loads.get(p).copied().unwrap_or(0),
            keep,
        );
        if !kept && group {
            self.run = (ranked.iter().take(replicas).copied().collect(), 0);
        }
        let order: Arc<[PeerId]> = ranked.into();
        if self.recent.len() == BOOK_GROUPS {
            self.recent.pop_front();
        }
        self.recent.push_back((key, order.clone()));
        self.count(&order, replicas, len);
        order
    }

    /// `len` more bytes on the first `replicas` of `order`.
    fn count(&mut self, order: &[PeerId], replicas: usize, len: u64) {
        let holders = &order[..replicas.min(order.len())];
        for peer in holders {
            *self.loads.entry(*peer).or_default() += len;
        }
        if holders.iter().all(|p| self.run.0.contains(p)) {
            self.run.1 += len;
        }
    }
}

/// Neighbourhood lookups a peer runs at once for one caller.
const LOOKUPS_AT_ONCE: usize = 16;

/// The daemons other than this peer among which the groups placed by `keys` are placed, as
/// this peer can know them: the connected daemons, and once the mesh is partial
/// ([`NetClient::is_partial`]) those Kademlia's lookups of each key's neighbourhood find
/// (dialled, and admitted within [`LOOKUP_WAIT`]): past a full mesh the daemons a peer knows
/// need not include a group's candidates, and its neighbourhood does.
pub(crate) async fn reach(net: &NetClient, keys: impl IntoIterator<Item = Cid>) -> Vec<PeerId> {
    let mut daemons: BTreeSet<PeerId> = net.daemons().into_keys().collect();
    if net.is_partial() {
        daemons.extend(neighbourhoods(net, keys).await);
    }
    daemons.into_iter().collect()
}

/// The daemons in the neighbourhoods of `keys` ([`NetClient::neighbourhood`]), looked up
/// [`LOOKUPS_AT_ONCE`] keys at a time, dialled, and admitted within [`LOOKUP_WAIT`].
pub(crate) async fn neighbourhoods(
    net: &NetClient,
    keys: impl IntoIterator<Item = Cid>,
) -> BTreeSet<PeerId> {
    let found: BTreeSet<PeerId> = look_up_each(net, keys)
        .await
        .into_iter()
        .flat_map(|(_, hood)| hood)
        .collect();
    admit(net, found).await
}

/// Each key's neighbourhood ([`NetClient::neighbourhood`]), looked up [`LOOKUPS_AT_ONCE`]
/// keys at a time: the peers found, not yet dialled; keys whose lookup failed or took longer
/// than [`LOOKUP_WAIT`] are left out.
pub(crate) async fn look_up_each(
    net: &NetClient,
    keys: impl IntoIterator<Item = Cid>,
) -> Vec<(Cid, Vec<PeerId>)> {
    use futures::StreamExt;
    let keys: BTreeSet<Cid> = keys.into_iter().collect();
    futures::stream::iter(keys)
        .map(|key| async move {
            let hood = tokio::time::timeout(LOOKUP_WAIT, net.neighbourhood(key)).await;
            Some((key, hood.ok()?.ok()?))
        })
        .buffer_unordered(LOOKUPS_AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// The daemons among `peers`, dialled and admitted within [`LOOKUP_WAIT`].
pub(crate) async fn admit(net: &NetClient, peers: BTreeSet<PeerId>) -> BTreeSet<PeerId> {
    let peers: Vec<PeerId> = peers.into_iter().collect();
    net.daemons_among(&peers, LOOKUP_WAIT)
        .await
        .into_iter()
        .collect()
}

/// Where a placer's groups go: a [`Book`] over the daemons it knows, joined by the
/// daemons each new group's neighbourhood lookup finds once the mesh is partial ([`reach`]).
pub(crate) struct Placer {
    book: Book,
    daemons: Vec<Placed>,
    known: HashSet<PeerId>,
    /// Daemons never chosen (this peer, those a coordinator gave up on).
    avoid: Vec<PeerId>,
}

impl Placer {
    /// A placer of `copies` copies over `daemons` (none of `avoid`).
    pub(crate) async fn new(
        net: &NetClient,
        daemons: Vec<PeerId>,
        copies: usize,
        avoid: Vec<PeerId>,
    ) -> Self {
        // Daemons found later have their loads asked then, so there may be a choice to make.
        let copies = if net.is_partial() { 0 } else { copies };
        let book = Book::asking(net, &daemons, copies).await;
        Self {
            book,
            known: daemons.iter().copied().collect(),
            daemons: daemons.into_iter().map(Placed::new).collect(),
            avoid,
        }
    }

    /// The daemons to offer `block` of the group placed by `key` to ([`Book::order`]).
    pub(crate) async fn order(
        &mut self,
        net: &NetClient,
        key: &Cid,
        copies: usize,
        block: &Block,
    ) -> Arc<[PeerId]> {
        if net.is_partial() && !self.book.knows(key) {
            let fresh: Vec<PeerId> = reach(net, [*key])
                .await
                .into_iter()
                .filter(|p| !self.known.contains(p) && !self.avoid.contains(p))
                .collect();
            if !fresh.is_empty() {
                self.book.learn(net, &fresh).await;
                self.known.extend(fresh.iter().copied());
                self.daemons.extend(fresh.into_iter().map(Placed::new));
            }
        }
        let daemons = &self.daemons;
        self.book
            .order(key, copies, block, || placement(key, daemons))
    }
}

/// Where and how a block is pushed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    /// Daemons that must store it now.
    pub(crate) replicas: usize,
    /// Its replica count in all, which the receivers keep up.
    pub(crate) target: usize,
    /// The add session (0 for daemons' own copies).
    pub(crate) session: u64,
    /// Its placement group's key; `None`: its own CID.
    pub(crate) group: Option<Cid>,
}

/// Stores `block` on `place.replicas` of the daemons in `ranked`, in its order, moving down it
/// past daemons that refuse or fail. Returns the daemons that stored it.
pub(crate) async fn push(
    net: &NetClient,
    ranked: &[PeerId],
    block: &Block,
    place: Placement,
) -> Result<Vec<PeerId>, RemoteError> {
    let Placement {
        replicas,
        target,
        session,
        group,
    } = place;
    let target = u8::try_from(target).unwrap_or(u8::MAX);
    let mut stored = 0;
    let mut took = Vec::with_capacity(replicas);
    let mut next = 0;
    let mut reason = String::from("not enough daemons");
    while stored < replicas && next < ranked.len() {
        let batch = &ranked[next..(next + replicas - stored).min(ranked.len())];
        next += batch.len();
        let puts = batch.iter().map(|&peer| {
            patiently(net, peer, || BlockRequest::Put {
                cid: *block.cid(),
                data: block.data().to_vec(),
                replicas: target,
                session,
                group,
            })
        });
        for (peer, result) in batch.iter().zip(join_all(puts).await) {
            match result {
                Ok(BlockResponse::Stored) => {
                    stored += 1;
                    took.push(*peer);
                }
                Ok(other) => reason = format!("{peer} answered {}", describe(&other)),
                Err(e) => reason = e.to_string(),
            }
        }
    }
    if stored < replicas {
        return Err(RemoteError::Replication {
            cid: *block.cid(),
            stored,
            wanted: replicas,
            reason,
        });
    }
    Ok(took)
}

/// Sends `make()` to `peer`, again after growing pauses while the peer says it is busy.
async fn patiently(
    net: &NetClient,
    peer: PeerId,
    make: impl Fn() -> BlockRequest,
) -> Result<BlockResponse, NetError> {
    let mut pause = Duration::from_millis(20);
    loop {
        match net.request(peer, make()).await? {
            busy if busy.is_busy() && pause < Duration::from_secs(5) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            other => return Ok(other),
        }
    }
}

fn describe(response: &BlockResponse) -> String {
    match response {
        BlockResponse::Refused(r) => format!("refused: {r}"),
        BlockResponse::Block(_) => "a block".into(),
        BlockResponse::NotFound => "not found".into(),
        BlockResponse::Stored => "stored".into(),
        BlockResponse::Have(_) => "a Have list".into(),
        BlockResponse::Proof(_) => "a proof".into(),
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct PeerScore {
    /// Smoothed answer time in ms (0 = not measured yet, so tried first).
    latency_ms: f64,
    /// Sent a block that did not match its CID: never asked again.
    banned: bool,
}

/// Fetches verified blocks: from the local store if there is one, else from the daemons most
/// likely to hold them, fastest first. A daemon that sends wrong bytes is dropped.
#[derive(Debug, Clone)]
pub struct Fetcher {
    link: Arc<Link>,
    local: Option<BlockStore>,
    scores: Arc<Mutex<HashMap<PeerId, PeerScore>>>,
    /// The daemon that last served a block of each recently read placement group.
    served: Arc<Mutex<HashMap<Cid, PeerId>>>,
    /// The neighbourhood lookup of each recently read placement group (past a full mesh):
    /// the reads of a group's blocks wait for one lookup rather than each run its own.
    looked_up: Arc<Mutex<HashMap<Cid, Arc<tokio::sync::OnceCell<()>>>>>,
    /// IPFS nodes, asked when no daemon has a block (a daemon's own fetcher only).
    bitswap: Option<Bitswap>,
}

impl Fetcher {
    /// A fetcher over `net` (if any) and `local` (if any).
    pub fn new(net: Option<NetClient>, local: Option<BlockStore>) -> Self {
        let link = net.map_or_else(Link::offline, Link::given);
        Self::over(Arc::new(link), local)
    }

    /// A fetcher that reads `local` first and goes to the network through `link` only when a
    /// block is missing there (so reading local files never waits for discovery).
    pub fn over(link: Arc<Link>, local: Option<BlockStore>) -> Self {
        Self {
            link,
            local,
            scores: Arc::default(),
            served: Arc::default(),
            looked_up: Arc::default(),
            bitswap: None,
        }
    }

    /// This fetcher, also fetching from IPFS nodes over `bitswap` what no daemon has.
    pub(crate) fn with_bitswap(mut self, bitswap: Bitswap) -> Self {
        self.bitswap = Some(bitswap);
        self
    }

    /// Whether IPFS nodes are connected to fetch from.
    pub fn has_ipfs_sources(&self) -> bool {
        self.bitswap.as_ref().is_some_and(Bitswap::has_sources)
    }

    /// Wants sent again to IPFS nodes after a timeout, so far.
    pub fn ipfs_retries(&self) -> u64 {
        self.bitswap.as_ref().map_or(0, Bitswap::retries)
    }

    async fn network(&self) -> Result<Option<&NetClient>, RemoteError> {
        Ok(self.link.ready_soon(1).await?)
    }

    /// The network once discovery has settled: every daemon it will find, found.
    async fn network_settled(&self) -> Result<Option<&NetClient>, RemoteError> {
        Ok(self.link.ready_quiet(1).await?)
    }

    /// Peers found lying so far.
    pub fn banned(&self) -> Vec<PeerId> {
        let scores = self.scores.lock().expect("poisoned");
        scores
            .iter()
            .filter(|(_, s)| s.banned)
            .map(|(p, _)| *p)
            .collect()
    }

    /// The daemons to ask for a block placed by `key`, in order: the daemon that last served
    /// a block of its group, then placement rank, but among the first few (where a group with
    /// the default two copies is placed, [`CHOICES`] per copy) the fastest to answer so far
    /// first.
    fn candidates(&self, net: &NetClient, key: &Cid) -> Vec<PeerId> {
        let scores = self.scores.lock().expect("poisoned");
        let daemons: Vec<Placed> = net
            .daemons()
            .into_keys()
            .filter(|p| !scores.get(p).is_some_and(|s| s.banned))
            .map(Placed::new)
            .collect();
        let mut ranked = placement(key, &daemons);
        let head = ranked.len().min(CHOICES * 2);
        ranked[..head].sort_by(|a, b| {
            let la = scores.get(a).map_or(0.0, |s| s.latency_ms);
            let lb = scores.get(b).map_or(0.0, |s| s.latency_ms);
            la.total_cmp(&lb)
        });
        drop(scores);
        let served = self.served.lock().expect("poisoned").get(key).copied();
        if let Some(at) = served.and_then(|p| ranked.iter().position(|r| *r == p)) {
            ranked[..=at].rotate_right(1);
        }
        ranked
    }

    /// Looks up the neighbourhood of the group placed by `key` ([`reach`]), once for all the
    /// reads of its blocks that ask meanwhile or later.
    async fn look_up_once(&self, net: &NetClient, key: Cid) {
        let once = {
            let mut looked_up = self.looked_up.lock().expect("poisoned");
            // Groups are read one after another: a reader needs only the last few.
            if looked_up.len() >= SERVED_GROUPS && !looked_up.contains_key(&key) {
                looked_up.clear();
            }
            looked_up.entry(key).or_default().clone()
        };
        once.get_or_init(|| async {
            reach(net, [key]).await;
        })
        .await;
    }

    /// `peer` served a block of the group placed by `key`.
    fn served_by(&self, key: Cid, peer: PeerId) {
        let mut served = self.served.lock().expect("poisoned");
        // Groups are read one after another: a reader needs only the last few.
        if served.len() >= SERVED_GROUPS {
            served.clear();
        }
        served.insert(key, peer);
    }

    fn record(&self, peer: PeerId, elapsed: Duration, ok: bool) {
        let mut scores = self.scores.lock().expect("poisoned");
        let s = scores.entry(peer).or_default();
        // Failures count as slow answers, so a flaky peer sinks in the order.
        let sample = if ok { elapsed.as_secs_f64() * 1e3 } else { 1e4 };
        s.latency_ms = if s.latency_ms == 0.0 {
            sample
        } else {
            0.8 * s.latency_ms + 0.2 * sample
        };
    }

    fn ban(&self, peer: PeerId) {
        self.scores
            .lock()
            .expect("poisoned")
            .entry(peer)
            .or_default()
            .banned = true;
    }

    /// Fetches and verifies one block. A block found corrupt in the local store is fetched
    /// from the network and repaired locally; if no daemon has it, the corruption is the error.
    pub async fn fetch(&self, cid: Cid) -> Result<Block, RemoteError> {
        self.fetch_hinted(cid, None).await.map(|(block, _)| block)
    }

    /// Like [`Fetcher::fetch`], asking `hint` first when the block is not local (e.g. the
    /// mapper that holds a map output), and saying whether the block came from the network.
    pub async fn fetch_hinted(
        &self,
        cid: Cid,
        hint: Option<PeerId>,
    ) -> Result<(Block, bool), RemoteError> {
        self.fetch_placed(cid, None, hint).await
    }

    /// [`Fetcher::fetch_hinted`] for a block of the placement group `group` (its own if
    /// `None`), whose likely holders are asked first.
    async fn fetch_placed(
        &self,
        cid: Cid,
        group: Option<Cid>,
        hint: Option<PeerId>,
    ) -> Result<(Block, bool), RemoteError> {
        self.fetch_from(cid, group, hint, false)
            .await
            .map(|(block, source)| (block, source != Source::Local))
    }

    /// Fetches `cid`, saying where it came from; with `ipfs_first`, IPFS nodes are asked
    /// before daemons (the rest of a DAG whose blocks came from them).
    async fn fetch_from(
        &self,
        cid: Cid,
        group: Option<Cid>,
        hint: Option<PeerId>,
        ipfs_first: bool,
    ) -> Result<(Block, Source), RemoteError> {
        let mut corrupt = None;
        if let Some(store) = &self.local {
            let store = store.clone();
            let local = tokio::task::spawn_blocking(move || store.get(&cid))
                .await
                .expect("store task panicked");
            match local {
                Ok(block) => return Ok((block, Source::Local)),
                Err(StoreError::NotFound(_)) => {}
                Err(e @ StoreError::Corrupt { .. }) => {
                    tracing::debug!("{e}; fetching it from the network");
                    corrupt = Some(e);
                }
                Err(e) => return Err(FileError::Store(e).into()),
            }
        }
        let fetched = match &self.bitswap {
            Some(bitswap) if ipfs_first && bitswap.has_sources() => {
                match bitswap.fetch(cid).await {
                    Ok(block) => Ok((block, Source::Ipfs)),
                    Err(_) => self.fetch_remote(cid, group, hint).await,
                }
            }
            _ => self.fetch_remote(cid, group, hint).await,
        };
        match (fetched, corrupt) {
            (Ok((block, source)), Some(_)) => {
                let store = self.local.clone().expect("corruption was found in it");
                let repaired = block.clone();
                let put = tokio::task::spawn_blocking(move || store.put(&repaired)).await;
                match put {
                    Ok(Ok(_)) => tracing::warn!("repaired corrupt block {cid} from the network"),
                    Ok(Err(e)) => tracing::warn!("cannot repair {cid} in the local store: {e}"),
                    Err(e) => tracing::warn!("cannot repair {cid} in the local store: {e}"),
                }
                Ok((block, source))
            }
            (Ok(fetched), None) => Ok(fetched),
            (Err(_), Some(e)) => Err(FileError::Store(e).into()),
            (Err(e), None) => Err(e),
        }
    }

    /// From the daemons, then (if this fetcher has them) from IPFS nodes.
    async fn fetch_remote(
        &self,
        cid: Cid,
        group: Option<Cid>,
        hint: Option<PeerId>,
    ) -> Result<(Block, Source), RemoteError> {
        let daemons = self.fetch_daemons(cid, group, hint).await;
        match (daemons, &self.bitswap) {
            (Ok(block), _) => Ok((block, Source::Daemon)),
            (
                Err(e @ (RemoteError::Unavailable { .. } | RemoteError::NoDaemons { .. })),
                Some(bitswap),
            ) if bitswap.has_sources() => match bitswap.fetch(cid).await {
                Ok(block) => Ok((block, Source::Ipfs)),
                Err(ipfs) => Err(RemoteError::NotOnIpfs {
                    daemons: Box::new(e),
                    ipfs,
                }),
            },
            (Err(e), _) => Err(e),
        }
    }

    async fn fetch_daemons(
        &self,
        cid: Cid,
        group: Option<Cid>,
        hint: Option<PeerId>,
    ) -> Result<Block, RemoteError> {
        let Some(net) = self.network().await? else {
            return Err(FileError::Store(StoreError::NotFound(cid)).into());
        };
        let key = group.unwrap_or(cid);
        // Past a full mesh, the group's neighbourhood is looked up (and connected to) before
        // the first of its blocks is asked for, so its ranking here is the placer's.
        let unserved = !self.served.lock().expect("poisoned").contains_key(&key);
        if net.is_partial() && hint.is_none() && unserved {
            self.look_up_once(net, key).await;
        }
        let mut candidates = self.candidates(net, &key);
        if let Some(hint) = hint.filter(|h| *h != net.local_peer_id()) {
            candidates.retain(|p| *p != hint);
            candidates.insert(0, hint);
        }
        let (mut asked, mut failed) = (0, 0);
        if let Some((block, peer)) = self.ask(net, cid, &candidates, &mut failed).await {
            self.served_by(key, peer);
            return Ok(block);
        }
        asked += candidates.len();
        // The daemons found so far do not have it (or did not answer): the rest of discovery
        // may find one that does. At once if discovery has already settled.
        if let Some(net) = self.network_settled().await? {
            let more: Vec<PeerId> = self
                .candidates(net, &key)
                .into_iter()
                .filter(|p| !candidates.contains(p))
                .collect();
            if let Some((block, peer)) = self.ask(net, cid, &more, &mut failed).await {
                self.served_by(key, peer);
                return Ok(block);
            }
            asked += more.len();
            // Still not found: Kademlia's lookup of the group's neighbourhood (where the
            // placement rule puts its copies) reaches daemons this peer has not met, which is
            // every daemon past full membership.
            let hood = tokio::time::timeout(LOOKUP_WAIT, net.neighbourhood(key))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let fresh: Vec<PeerId> = hood
                .into_iter()
                .filter(|p| !candidates.contains(p) && !more.contains(p))
                .collect();
            if !fresh.is_empty() {
                let met: Vec<Placed> = net
                    .daemons_among(&fresh, LOOKUP_WAIT)
                    .await
                    .into_iter()
                    .map(Placed::new)
                    .collect();
                let ranked = placement(&key, &met);
                if let Some((block, peer)) = self.ask(net, cid, &ranked, &mut failed).await {
                    self.served_by(key, peer);
                    return Ok(block);
                }
                asked += ranked.len();
            }
        }
        if asked == 0 {
            return Err(RemoteError::NoDaemons { cid });
        }
        Err(RemoteError::Unavailable { cid, asked, failed })
    }

    /// Asks `candidates` in turn for `cid`, returning it and who sent it; counts in `failed`
    /// those that did not answer.
    async fn ask(
        &self,
        net: &NetClient,
        cid: Cid,
        candidates: &[PeerId],
        failed: &mut usize,
    ) -> Option<(Block, PeerId)> {
        for &peer in candidates {
            let started = Instant::now();
            match patiently(net, peer, || BlockRequest::Get(cid)).await {
                Ok(BlockResponse::Block(data)) => match Block::new(cid, data) {
                    Ok(block) => {
                        self.record(peer, started.elapsed(), true);
                        return Some((block, peer));
                    }
                    Err(e) => {
                        tracing::warn!("{peer} sent wrong bytes for {cid} ({e}); dropping it");
                        self.ban(peer);
                        net.ban(peer).await;
                    }
                },
                Ok(BlockResponse::NotFound) => self.record(peer, started.elapsed(), true),
                Ok(other) => {
                    tracing::debug!("{peer} answered {} for {cid}", describe(&other));
                    self.record(peer, started.elapsed(), false);
                    *failed += 1;
                }
                Err(e) => {
                    tracing::debug!("{e}");
                    self.record(peer, started.elapsed(), false);
                    *failed += 1;
                }
            }
        }
        None
    }

    /// Streams the file at `root` from `offset` into `sink`, keeping up to [`WINDOW`] block
    /// fetches in flight ahead of the reader. Returns the number of bytes written.
    pub async fn cat(
        &self,
        root: Cid,
        offset: u64,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, RemoteError> {
        let (tx, mut rx) = mpsc::channel::<Chunk>(2);
        let this = self.clone();
        let producer = tokio::spawn(async move { this.stream(root, offset, tx).await });
        let mut written = 0;
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = sink(&chunk.bytes) {
                producer.abort();
                return Err(FileError::Output(e).into());
            }
            written += chunk.bytes.len() as u64;
        }
        producer.await.expect("reader task panicked")?;
        Ok(written)
    }

    /// Sends the bytes of the file at `root` from `offset` on, leaf by leaf, into `tx`, keeping
    /// up to [`WINDOW`] network fetches in flight ahead of the reader. Stops early, without
    /// error, when the receiver is dropped (a map task that has read enough). Returns the
    /// number of bytes sent.
    pub async fn stream(
        &self,
        root: Cid,
        offset: u64,
        tx: mpsc::Sender<Chunk>,
    ) -> Result<u64, RemoteError> {
        self.stream_reader(FileReader::starting_at(root, offset), tx)
            .await
    }

    /// [`Fetcher::stream`] for a reader already part way through its file.
    async fn stream_reader(
        &self,
        mut reader: FileReader,
        tx: mpsc::Sender<Chunk>,
    ) -> Result<u64, RemoteError> {
        let mut inflight: HashMap<Cid, Inflight> = HashMap::new();
        // Blocks of the window found in the local store: asked once each, not once per turn.
        let mut local = HashSet::new();
        let mut sent = 0;
        let result = async {
            while let Some(&next) = reader.next_needed() {
                // Only network fetches are worth running ahead; local blocks are read in turn.
                for (&cid, &group) in reader.upcoming_grouped().take(WINDOW) {
                    if inflight.contains_key(&cid) || local.contains(&cid) {
                        continue;
                    }
                    if let Some(store) = self.local.as_ref().filter(|s| s.has(&cid)) {
                        store.prefetch(&cid);
                        local.insert(cid);
                    } else {
                        let fetcher = self.clone();
                        let fetch =
                            async move { fetcher.fetch_placed(cid, Some(group), None).await };
                        inflight.insert(cid, tokio::spawn(fetch));
                    }
                }
                local.remove(&next);
                let (block, remote) = match inflight.remove(&next) {
                    Some(handle) => handle.await.expect("fetch task panicked")?,
                    None => self.fetch_hinted(next, None).await?,
                };
                let Some(chunk) = Chunk::feed(&mut reader, block, remote)? else {
                    continue;
                };
                sent += chunk.bytes.len() as u64;
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(sent)
        }
        .await;
        for (_, h) in inflight {
            h.abort();
        }
        result
    }
}

impl Fetcher {
    /// Reads the file at `root` from `offset` on, for a caller on a blocking thread (a map
    /// task): hands each piece to `sink` until the file ends or `sink` returns `Ok(false)`.
    ///
    /// Blocks in the local store are read and verified right on this thread. Streaming them
    /// from an async task instead cost three thread hops per 256 KiB block (blocking pool,
    /// reader task, map thread), each a wake-up and a context switch: a seventh of a 2-daemon
    /// job's CPU went to rescheduling. A block that is not here is fetched on its own (inner
    /// nodes, and up to [`LONE_MISSES`] leaves in a row). From the next missing leaf (or a
    /// block that is corrupt here) on, the rest comes from [`Fetcher::stream`], run on `rt`,
    /// with its window of concurrent network fetches and its repair of corrupt local copies.
    ///
    /// Returns `Err` with the sink's error if the sink failed, else `Ok` with the outcome of
    /// reading (an error there only matters if the sink wanted more).
    pub fn read_blocking<E>(
        &self,
        rt: &tokio::runtime::Handle,
        root: Cid,
        offset: u64,
        buffer: usize,
        mut sink: impl FnMut(Chunk) -> Result<bool, E>,
    ) -> Result<Result<(), RemoteError>, E> {
        let mut reader = FileReader::starting_at(root, offset);
        if let Some(store) = &self.local {
            // Blocks already asked of the OS; keeps a window of reads ahead of this thread.
            let mut prefetched = HashSet::new();
            // Leaves fetched from the network since the last one read here.
            let mut missed = 0;
            while let Some(&next) = reader.next_needed() {
                for &cid in reader.upcoming().take(WINDOW) {
                    if prefetched.insert(cid) {
                        store.prefetch(&cid);
                    }
                }
                prefetched.remove(&next);
                let (block, remote) = match store.get(&next) {
                    Ok(block) => {
                        missed = 0;
                        (block, false)
                    }
                    // A file's inner nodes are placed by their own CIDs, and a map task
                    // starts reading in the leaf before its range, which is often a group
                    // held elsewhere: past two daemons a task holding all of its leaves
                    // seldom holds those. Such a block is fetched on its own, and the rest
                    // goes on being read here; a run of missing leaves means the rest is
                    // elsewhere too.
                    Err(StoreError::NotFound(_)) if missed < LONE_MISSES => {
                        missed += usize::from(next.codec() == RAW);
                        match rt.block_on(self.fetch(next)) {
                            Ok(block) => (block, true),
                            Err(_) => break,
                        }
                    }
                    Err(_) => break,
                };
                match Chunk::feed(&mut reader, block, remote) {
                    Ok(Some(chunk)) => {
                        if !sink(chunk)? {
                            return Ok(Ok(()));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Ok(Err(e)),
                }
            }
        }
        if reader.next_needed().is_none() {
            return Ok(Ok(()));
        }
        let (tx, mut rx) = mpsc::channel(buffer);
        let this = self.clone();
        let producer = rt.spawn(async move { this.stream_reader(reader, tx).await });
        while let Some(chunk) = rx.blocking_recv() {
            match sink(chunk) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    producer.abort();
                    return Err(e);
                }
            }
        }
        drop(rx);
        Ok(rt
            .block_on(producer)
            .expect("reader task panicked")
            .map(drop))
    }

    /// Writes the file or directory at `root` into `sink`: a file's bytes, or every file of a
    /// directory (recursively) in name order, so a job's output `cat`s as its partitions in
    /// order.
    pub async fn cat_tree<F>(&self, root: Cid, sink: &mut F) -> Result<u64, RemoteError>
    where
        F: FnMut(&[u8]) -> io::Result<()>,
    {
        let mut written = 0;
        let mut stack = vec![(root, 0usize)];
        while let Some((cid, depth)) = stack.pop() {
            if depth > p2pmr_protocol::unixfs::MAX_DEPTH {
                return Err(UnixFsError::TooDeep { cid }.into());
            }
            let block = self.fetch(cid).await?;
            match directory_entries(&block)? {
                Some(entries) => {
                    stack.extend(entries.into_iter().rev().map(|e| (e.cid, depth + 1)));
                }
                None => written += self.cat(cid, 0, &mut *sink).await?,
            }
        }
        Ok(written)
    }

    /// Writes the file or directory at `root` to `path` (a directory becomes a directory of
    /// the same tree). Refuses to overwrite an existing path.
    pub async fn get(&self, root: Cid, path: &std::path::Path) -> Result<u64, RemoteError> {
        self.get_with(root, path, &mut |_| {}).await
    }

    /// Like [`Fetcher::get`], telling `progress` of each piece of bytes written.
    pub async fn get_with(
        &self,
        root: Cid,
        path: &std::path::Path,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<u64, RemoteError> {
        let mut written = 0;
        let mut stack = vec![(root, path.to_owned(), 0usize)];
        while let Some((cid, path, depth)) = stack.pop() {
            if depth > p2pmr_protocol::unixfs::MAX_DEPTH {
                return Err(UnixFsError::TooDeep { cid }.into());
            }
            let block = self.fetch(cid).await?;
            match directory_entries(&block)? {
                Some(entries) => {
                    std::fs::create_dir(&path).map_err(FileError::Output)?;
                    stack.extend(
                        entries
                            .into_iter()
                            .rev()
                            .map(|e| (e.cid, path.join(&e.name), depth + 1)),
                    );
                }
                None => {
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(FileError::Output)?;
                    let mut out = io::BufWriter::new(file);
                    written += self
                        .cat(cid, 0, |b| {
                            progress(b.len() as u64);
                            io::Write::write_all(&mut out, b)
                        })
                        .await?;
                    io::Write::flush(&mut out).map_err(FileError::Output)?;
                }
            }
        }
        Ok(written)
    }

    /// Copies every block of the DAG at `root` (file or directory) into `store`, so it can be
    /// read without the network; returns how many blocks.
    pub async fn copy_into(&self, root: Cid, store: &BlockStore) -> Result<u64, RemoteError> {
        let (cids, _) = self.fetch_dag(root, store, |_| {}).await?;
        Ok(cids.len() as u64)
    }
}

/// Where a fetched block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Local,
    Daemon,
    Ipfs,
}

/// Leaves in a row [`Fetcher::read_blocking`] fetches one at a time before it streams the rest
/// of a file from the network.
const LONE_MISSES: usize = 2;

/// A block fetch running ahead of the reader.
type Inflight = tokio::task::JoinHandle<Result<(Block, bool), RemoteError>>;

/// Which of `cids` `peer` holds, asked with `Has` (in batches of [`MAX_HAS`]); `None` if it
/// does not answer every batch.
pub async fn held_by(net: &NetClient, peer: PeerId, cids: &[Cid]) -> Option<HashSet<Cid>> {
    let mut held = HashSet::new();
    for chunk in cids.chunks(MAX_HAS) {
        match net.request(peer, BlockRequest::Has(chunk.to_vec())).await {
            Ok(BlockResponse::Have(flags)) if flags.len() == chunk.len() => {
                held.extend(chunk.iter().zip(flags).filter(|(_, f)| *f).map(|(c, _)| *c));
            }
            _ => return None,
        }
    }
    Some(held)
}

/// Bytes of a file in order, as [`Fetcher::stream`] sends them.
#[derive(Debug)]
pub struct Chunk {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The block they are from.
    pub cid: Cid,
    /// They came from another peer (not the local store).
    pub remote: bool,
}

impl Chunk {
    /// Feeds `block` to `reader`; the file bytes it contributes, if any, as a chunk.
    fn feed(
        reader: &mut FileReader,
        block: Block,
        remote: bool,
    ) -> Result<Option<Self>, RemoteError> {
        let bytes = reader.feed(&block)?;
        if bytes.is_empty() {
            return Ok(None);
        }
        // `bytes` is a slice of the block: hand over the block's buffer, trimmed, instead of
        // copying it.
        let start = bytes.as_ptr() as usize - block.data().as_ptr() as usize;
        let end = start + bytes.len();
        let cid = *block.cid();
        let mut data = block.into_data();
        data.truncate(end);
        data.drain(..start);
        Ok(Some(Self {
            bytes: data,
            cid,
            remote,
        }))
    }
}

/// Where a file's blocks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    /// File size in bytes.
    pub size: u64,
    /// Blocks in the DAG.
    pub blocks: u64,
    /// Blocks held by each daemon that proved it holds one of those it claims.
    pub holders: BTreeMap<PeerId, u64>,
    /// Number of blocks with each count of copies (index = copies), proven holders only.
    pub replicas: Vec<u64>,
    /// Daemons that claimed blocks of the file but could not prove they hold one they
    /// picked at random, with how many they claimed and why: not counted above.
    pub unproven: BTreeMap<PeerId, (u64, String)>,
}

/// Walks the file's DAG (fetching inner nodes only), asks every daemon it can reach for the
/// file's placement groups ([`reach`]) which of its blocks it holds, and has each that claims some prove it holds one of them picked at random: what a
/// daemon only claims is not counted.
pub async fn stat(fetcher: &Fetcher, root: Cid) -> Result<FileStat, RemoteError> {
    let root_block = fetcher.fetch(root).await?;
    let mut reader = FileReader::new(root);
    reader.feed(&root_block)?;
    let size = reader.file_size().unwrap_or(0);
    let mut all = vec![root];
    // The placement groups' keys, where the file's copies are to be found.
    let mut keys = BTreeSet::from([root]);
    let mut stack = vec![root_block];
    while let Some(block) = stack.pop() {
        if block.cid().codec() == RAW {
            continue;
        }
        let node = PbNode::decode(block.data()).map_err(UnixFsError::from)?;
        let first = node.links.first().map(|l| l.hash);
        for link in node.links {
            all.push(link.hash);
            keys.insert(unixfs::group_of(&link.hash, first));
            if link.hash.codec() != RAW {
                stack.push(fetcher.fetch(link.hash).await?);
            }
        }
    }
    let Some(net) = fetcher.network_settled().await? else {
        return Err(RemoteError::NotEnoughDaemons { need: 1, found: 0 });
    };
    let daemons = reach(net, keys).await;
    let audits = daemons.into_iter().map(|peer| {
        let all = &all;
        async move {
            // A daemon may drop a copy between saying it holds it and the proof (moves drop
            // copies held in place by others): one that answers "not found" is asked again
            // whether it holds the block; if it still says so it is not believed, else it is
            // asked again what it holds and audited on that.
            for _ in 0..AUDIT_PICKS {
                let held = held_by(net, peer, all).await.unwrap_or_else(|| {
                    tracing::warn!("{peer} did not answer which blocks it holds");
                    HashSet::new()
                });
                let claimed: Vec<&Cid> = all.iter().filter(|c| held.contains(c)).collect();
                let n = claimed.len() as u64;
                if claimed.is_empty() {
                    return (peer, held, n, None);
                }
                let pick = *claimed[(random_u64() % claimed.len() as u64) as usize];
                let doubt = match fetcher.fetch(pick).await {
                    Err(e) => Some(format!("its block {pick} could not be read to check: {e}")),
                    Ok(block) => match challenge(net, peer, &block).await {
                        Proved::Yes => None,
                        Proved::No(why) | Proved::NoAnswer(why) => {
                            Some(format!("asked to prove it holds {pick}, it answered {why}"))
                        }
                        Proved::Gone => match held_by(net, peer, &[pick]).await {
                            Some(still) if still.is_empty() => continue,
                            _ => Some(format!(
                                "asked to prove it holds {pick}, it answered {}",
                                describe(&BlockResponse::NotFound)
                            )),
                        },
                    },
                };
                return (peer, held, n, doubt);
            }
            let why = "every block it was asked to prove, it no longer held".to_string();
            (peer, HashSet::new(), 0, Some(why))
        }
    });
    let mut copies: HashMap<usize, u64> = HashMap::new();
    let mut counts = vec![0u64; all.len()];
    let mut holders = BTreeMap::new();
    let mut unproven = BTreeMap::new();
    for (peer, held, n, doubt) in join_all(audits).await {
        if let Some(why) = doubt {
            unproven.insert(peer, (n, why));
            continue;
        }
        for (count, cid) in counts.iter_mut().zip(&all) {
            if held.contains(cid) {
                *count += 1;
            }
        }
        holders.insert(peer, n);
    }
    for c in counts {
        *copies.entry(c as usize).or_default() += 1;
    }
    let max = copies.keys().copied().max().unwrap_or(0);
    let replicas = (0..=max)
        .map(|c| copies.get(&c).copied().unwrap_or(0))
        .collect();
    Ok(FileStat {
        size,
        blocks: all.len() as u64,
        holders,
        replicas,
        unproven,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unanswered_fetch_is_not_reported_as_a_missing_block() {
        let cid = *Block::raw(b"x".to_vec()).cid();
        let said = |asked, failed| RemoteError::Unavailable { cid, asked, failed }.to_string();
        assert!(said(3, 0).contains("not available from any of 3"));
        assert!(said(2, 2).contains("none of the 2 daemon(s) asked answered in time"));
        assert!(said(3, 1).contains("2 daemon(s) do not have it and 1 did not answer"));
    }
}
