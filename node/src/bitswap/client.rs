//! The Bitswap client: fetches blocks from connected IPFS nodes (peers that speak Bitswap but
//! are not daemons), as boxo's sessions do: a want-block to the peer that sent the last block
//! (a DAG's blocks tend to sit together), else a want-have to every source and a want-block
//! to the first that has it; `DontHave` moves on at once, silence is retried after
//! [`TIMEOUT`].
//!
//! Answers arrive on streams the peers open to us, which the server's reader hands over
//! ([`Bitswap::received`]). A block is taken only under a CID computed from its own bytes (the
//! codec builds it so), so what a fetch returns is verified. Wants go out through one task
//! per peer, batched into messages on a stream renewed when idle; every queue is bounded.

use super::Outbound;
use crate::net::NetClient;
use crate::tasks::Tasks;
use libp2p::PeerId;
use p2pmr_protocol::bitswap::{Message, Presence, WantEntry, WantType, Wantlist, MAX_ENTRIES};
use p2pmr_protocol::block::canonical;
use p2pmr_protocol::{Block, Cid};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a want may go unanswered before it is sent again.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Sends of a want (the first and the retries) before a fetch gives up.
const TRIES: u32 = 3;
/// Wants queued for one peer's sender.
const OUTBOX: usize = MAX_ENTRIES;
/// Answers queued for one fetch.
const REPLIES: usize = 16;
/// A sender with nothing to send for this long stops (a new one starts on the next want).
const IDLE: Duration = Duration::from_secs(30);

/// Why a Bitswap fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitswapError {
    /// No connected peer speaks Bitswap (other than daemons).
    #[error("no IPFS peer is connected to fetch {cid} from over Bitswap")]
    NoSources {
        /// The block.
        cid: Cid,
    },
    /// Every source said it does not have the block.
    #[error("none of {asked} IPFS peer(s) has {cid}")]
    NotFound {
        /// The block.
        cid: Cid,
        /// Sources asked.
        asked: usize,
    },
    /// No source answered in time, after every retry.
    #[error("no answer for {cid} from {asked} IPFS peer(s) after {tries} tries of {secs} s")]
    TimedOut {
        /// The block.
        cid: Cid,
        /// Sources asked.
        asked: usize,
        /// Sends of the want.
        tries: u32,
        /// Seconds waited for each.
        secs: u64,
    },
}

/// What a peer said of a wanted block.
#[derive(Debug, Clone)]
enum Reply {
    Block(PeerId, Block),
    Have(PeerId),
    DontHave(PeerId),
}

/// A Bitswap client over a daemon's swarm. Cheap to clone.
#[derive(Clone)]
pub struct Bitswap {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bitswap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitswap").finish_non_exhaustive()
    }
}

struct Inner {
    control: libp2p_stream::Control,
    net: NetClient,
    tasks: Tasks,
    /// Fetches under way, by canonical CID (several may wait for one block).
    wanted: Mutex<HashMap<Cid, Vec<mpsc::Sender<Reply>>>>,
    outboxes: Mutex<HashMap<PeerId, mpsc::Sender<WantEntry>>>,
    /// The peer that sent the last block, asked first for the next.
    last: Mutex<Option<PeerId>>,
    retries: AtomicU64,
}

/// Removes a fetch's registration when it ends, however it ends, and cancels its wants.
struct Registration<'a> {
    client: &'a Bitswap,
    cid: Cid,
    key: Cid,
    reply: mpsc::Sender<Reply>,
    asked: HashSet<PeerId>,
    got_from: Option<PeerId>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let inner = &self.client.inner;
        let mut wanted = inner.wanted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = wanted.get_mut(&self.key) {
            waiting.retain(|s| !s.same_channel(&self.reply));
            if waiting.is_empty() {
                wanted.remove(&self.key);
            }
        }
        let last_one = !wanted.contains_key(&self.key);
        drop(wanted);
        if last_one {
            // A peer that sent the block has dropped the want; the others are told.
            for &peer in self.asked.iter().filter(|p| Some(**p) != self.got_from) {
                self.client
                    .queue(peer, entry(self.cid, WantType::Block, true));
            }
        }
    }
}

fn entry(cid: Cid, want_type: WantType, cancel: bool) -> WantEntry {
    WantEntry {
        cid,
        priority: 1,
        cancel,
        want_type,
        send_dont_have: true,
    }
}

impl Bitswap {
    /// A client sending wants through `control` to the Bitswap sources `net` reports.
    pub(crate) fn new(control: libp2p_stream::Control, net: NetClient, tasks: Tasks) -> Self {
        Self {
            inner: Arc::new(Inner {
                control,
                net,
                tasks,
                wanted: Mutex::default(),
                outboxes: Mutex::default(),
                last: Mutex::default(),
                retries: AtomicU64::new(0),
            }),
        }
    }

    /// The connected peers it fetches from.
    pub fn sources(&self) -> Vec<PeerId> {
        self.inner.net.bitswap_sources()
    }

    /// Whether any source is connected.
    pub fn has_sources(&self) -> bool {
        self.inner.net.has_bitswap_sources()
    }

    /// Wants sent again after [`TIMEOUT`] without an answer, since the daemon started.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// Fetches the block `cid` from the sources, verified.
    pub async fn fetch(&self, cid: Cid) -> Result<Block, BitswapError> {
        let key = canonical(&cid);
        let (tx, mut rx) = mpsc::channel(REPLIES);
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .push(tx.clone());
        let mut reg = Registration {
            client: self,
            cid,
            key,
            reply: tx,
            asked: HashSet::new(),
            got_from: None,
        };
        let mut said_no: HashSet<PeerId> = HashSet::new();
        let mut tries = 0;
        loop {
            let sources = self.sources();
            let open: Vec<PeerId> = sources
                .iter()
                .copied()
                .filter(|p| !said_no.contains(p))
                .collect();
            if open.is_empty() {
                return Err(if sources.is_empty() && said_no.is_empty() {
                    BitswapError::NoSources { cid }
                } else {
                    BitswapError::NotFound {
                        cid,
                        asked: said_no.len(),
                    }
                });
            }
            // The peer that sent the last block gets a want-block straight away; the rest
            // (or everyone, if it says no) a want-have.
            let last = *self.inner.last.lock().unwrap_or_else(|e| e.into_inner());
            let mut block_from = last.filter(|p| open.contains(p) && tries == 0);
            match block_from {
                Some(peer) => self.want(&mut reg, peer, WantType::Block),
                None => {
                    for &peer in &open {
                        self.want(&mut reg, peer, WantType::Have);
                    }
                }
            }
            let mut have_asked: HashSet<PeerId> = if block_from.is_some() {
                HashSet::new()
            } else {
                open.iter().copied().collect()
            };
            let mut haves = Vec::new();
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(Reply::Block(peer, block))) => {
                        reg.got_from = Some(peer);
                        *self.inner.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
                        // Under the name it was wanted by (a CIDv0 want, a CIDv0 block).
                        return Ok(block.named(cid).unwrap_or_else(|b| b));
                    }
                    Ok(Some(Reply::Have(peer))) if block_from.is_none() => {
                        block_from = Some(peer);
                        self.want(&mut reg, peer, WantType::Block);
                    }
                    Ok(Some(Reply::Have(peer))) => haves.push(peer),
                    Ok(Some(Reply::DontHave(peer))) => {
                        said_no.insert(peer);
                        have_asked.remove(&peer);
                        if block_from == Some(peer) {
                            // The next peer that said it has the block, if any.
                            block_from = haves.pop().filter(|p| !said_no.contains(p));
                            if let Some(next) = block_from {
                                self.want(&mut reg, next, WantType::Block);
                            } else if have_asked.is_empty() {
                                // Nobody else was asked yet (or all said no): ask the rest.
                                break;
                            }
                        } else if block_from.is_none() && have_asked.is_empty() {
                            break;
                        }
                    }
                    Ok(None) => unreachable!("the registration holds a sender"),
                    Err(_) => {
                        tries += 1;
                        if tries >= TRIES {
                            return Err(BitswapError::TimedOut {
                                cid,
                                asked: open.len(),
                                tries,
                                secs: TIMEOUT.as_secs(),
                            });
                        }
                        self.inner.retries.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            "bitswap: no answer for {cid} in {TIMEOUT:?}; asking again"
                        );
                        break;
                    }
                }
            }
        }
    }

    /// Sends a want for the registration's block to `peer`, after a cancel of any earlier
    /// one: a server that answered the same want moments ago (a block read twice, a retry)
    /// may take a repeat for one already met and stay silent (Helia does, for 5 s), while a
    /// cancel and a new want are answered afresh.
    fn want(&self, reg: &mut Registration<'_>, peer: PeerId, kind: WantType) {
        reg.asked.insert(peer);
        self.queue(peer, entry(reg.cid, WantType::Block, true));
        self.queue(peer, entry(reg.cid, kind, false));
    }

    /// Hands `want` to `peer`'s sender (starting one if need be). A full queue drops it: the
    /// fetch's retry sends it again.
    fn queue(&self, peer: PeerId, want: WantEntry) {
        let mut outboxes = self
            .inner
            .outboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = outboxes.get(&peer) {
            match tx.try_send(want) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return tracing::debug!("bitswap: wants to {peer} queued full; one waits");
                }
                Err(mpsc::error::TrySendError::Closed(w)) => {
                    outboxes.remove(&peer);
                    return self.start_outbox(&mut outboxes, peer, w);
                }
            }
        }
        self.start_outbox(&mut outboxes, peer, want);
    }

    fn start_outbox(
        &self,
        outboxes: &mut HashMap<PeerId, mpsc::Sender<WantEntry>>,
        peer: PeerId,
        first: WantEntry,
    ) {
        let (tx, rx) = mpsc::channel(OUTBOX);
        tx.try_send(first).expect("a new queue has room");
        outboxes.insert(peer, tx);
        let this = self.clone();
        self.inner.tasks.spawn(this.send_wants(peer, rx));
    }

    /// `peer`'s sender: batches queued wants into messages, until idle.
    async fn send_wants(self, peer: PeerId, mut rx: mpsc::Receiver<WantEntry>) {
        let mut out = Outbound::default();
        loop {
            let first = match tokio::time::timeout(IDLE, rx.recv()).await {
                Ok(Some(want)) => want,
                Ok(None) => return,
                Err(_) => {
                    // Closing our end first: a want queued meanwhile starts a new sender.
                    rx.close();
                    return out.close().await;
                }
            };
            let mut entries = vec![first];
            while entries.len() < MAX_ENTRIES {
                match rx.try_recv() {
                    Ok(want) => entries.push(want),
                    Err(_) => break,
                }
            }
            let msg = Message {
                wantlist: Wantlist {
                    entries,
                    full: false,
                },
                ..Message::default()
            };
            if let Err(e) = out.send(&self.inner.control, peer, &msg.framed()).await {
                // The wants are lost; their fetches ask again after their timeout.
                tracing::debug!("bitswap: cannot send wants to {peer}: {e}");
            }
        }
    }

    /// Takes the blocks and presences of a message `peer` sent: each goes to the fetches
    /// waiting for it; the rest is dropped.
    pub(crate) fn received(&self, peer: PeerId, msg: &Message) {
        if msg.blocks.is_empty() && msg.presences.is_empty() {
            return;
        }
        let wanted = self.inner.wanted.lock().unwrap_or_else(|e| e.into_inner());
        let deliver = |cid: &Cid, reply: Reply| {
            for tx in wanted.get(&canonical(cid)).into_iter().flatten() {
                // A fetch with a full queue has more answers than it can use.
                let _ = tx.try_send(reply.clone());
            }
        };
        for block in &msg.blocks {
            deliver(block.cid(), Reply::Block(peer, block.clone()));
        }
        for (cid, presence) in &msg.presences {
            let reply = match presence {
                Presence::Have => Reply::Have(peer),
                Presence::DontHave => Reply::DontHave(peer),
            };
            deliver(cid, reply);
        }
    }
}
