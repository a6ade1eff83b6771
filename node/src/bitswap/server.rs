//! The Bitswap server, so IPFS nodes (kubo, Helia) can fetch what daemons hold: it accepts
//! `/ipfs/bitswap/1.2.0` streams (identify then lists the protocol), reads the wantlists
//! peers send, and answers on a stream of its own to each peer, as the protocol has it:
//! blocks for want-block, `Have` (or the block itself when it is small) for want-have,
//! `DontHave` when asked to say so. Blocks and presences on the same streams are answers to
//! this daemon's own wants: they go to the [`Bitswap`] client.
//!
//! Bounded everywhere: streams in all and per peer, 1024 wants remembered per peer, messages
//! of at most 4 MiB (refused from their length alone), a peer's answers going out one
//! message at a time (at most [`BATCH`] bytes each) while store reads are shared fairly
//! among peers by one semaphore. Wants for blocks not held are remembered (a full wantlist
//! replaces them) and answered when the block arrives in the store (an add, a pin, a copy
//! from another daemon).

use super::{Bitswap, Outbound};
use crate::repo::store::{BlockStore, StoreError};
use crate::tasks::Tasks;
use futures::{AsyncReadExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use p2pmr_protocol::bitswap::{Frames, Message, Presence, WantType, BITSWAP_PROTOCOL, MAX_ENTRIES};
use p2pmr_protocol::block::canonical;
use p2pmr_protocol::{Block, Cid};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, Semaphore};

/// Inbound Bitswap streams at once, in all and from one peer.
const MAX_STREAMS: usize = 256;
const MAX_STREAMS_PER_PEER: usize = 4;
/// Wantlists from one peer waiting for its answerer.
const QUEUED: usize = 8;
/// Block reads from the store at once, for all peers.
const READS: usize = 8;
/// Most bytes of blocks in one answer message.
const BATCH: usize = 1 << 20;
/// Blocks this small are sent in answer to a want-have (boxo's rule), saving a round trip.
const SEND_SMALL: usize = 1024;
/// A stream that sends nothing for this long is closed.
const IDLE: Duration = Duration::from_secs(300);

/// Serves Bitswap from `store` until the network stops, handing answers to `client`.
pub(crate) async fn serve(
    mut control: libp2p_stream::Control,
    store: BlockStore,
    tasks: Tasks,
    client: Bitswap,
) {
    let protocol = StreamProtocol::new(BITSWAP_PROTOCOL);
    let mut incoming = match control.accept(protocol) {
        Ok(incoming) => incoming,
        Err(e) => return tracing::warn!("cannot serve Bitswap: {e}"),
    };
    let server = Server {
        control,
        store,
        tasks: tasks.clone(),
        streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        reads: Arc::new(Semaphore::new(READS)),
        peers: Arc::default(),
        client,
    };
    while let Some((peer, stream)) = incoming.next().await {
        server.accept(peer, stream);
    }
}

#[derive(Clone)]
struct Server {
    control: libp2p_stream::Control,
    store: BlockStore,
    tasks: Tasks,
    streams: Arc<Semaphore>,
    reads: Arc<Semaphore>,
    peers: Arc<Mutex<HashMap<PeerId, PeerLink>>>,
    client: Bitswap,
}

/// A peer's inbound streams and the queue to its answerer. The answerer (with the peer's
/// wantlist and the one stream answers go out on) outlives the inbound streams, which some
/// peers open anew for every message; it ends after [`IDLE`] without a message.
struct PeerLink {
    streams: usize,
    wants: mpsc::Sender<Message>,
}

impl Server {
    /// Takes an inbound stream, or drops it (a reset) past the limits.
    fn accept(&self, peer: PeerId, stream: Stream) {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return tracing::debug!("bitswap: too many streams; dropping one from {peer}");
        };
        let wants = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let link = peers.entry(peer).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUED);
                self.tasks.spawn(self.clone().answer(peer, rx));
                PeerLink {
                    streams: 0,
                    wants: tx,
                }
            });
            if link.streams >= MAX_STREAMS_PER_PEER {
                return tracing::debug!("bitswap: too many streams from {peer}; dropping one");
            }
            link.streams += 1;
            link.wants.clone()
        };
        let this = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = read(peer, stream, &wants, &this.client).await {
                tracing::debug!("bitswap: stream from {peer} ended: {e}");
            }
            this.closed(peer);
            drop(permit);
        });
    }

    /// One of `peer`'s streams ended.
    fn closed(&self, peer: PeerId) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = peers.get_mut(&peer) {
            link.streams = link.streams.saturating_sub(1);
        }
    }

    /// Keeps `peer`'s wantlist and answers it on a stream of this server's own, until no
    /// message has come for [`IDLE`] and no stream of the peer's is open.
    /// Wants for blocks not held are answered again when such a block arrives in the store.
    async fn answer(self, peer: PeerId, mut wants: mpsc::Receiver<Message>) {
        let mut list = WantList::default();
        let mut out = Outbound::default();
        let mut arrivals = Some(self.store.arrivals());
        let mut idle_at = tokio::time::Instant::now() + IDLE;
        loop {
            let fresh = tokio::select! {
                msg = wants.recv() => match msg {
                    Some(msg) => {
                        idle_at = tokio::time::Instant::now() + IDLE;
                        list.update(&msg)
                    }
                    None => return,
                },
                arrived = recv(&mut arrivals) => match arrived {
                    Ok(cid) => list.arrived(&cid),
                    // Too many blocks arrived to follow one by one: look at every want again.
                    Err(broadcast::error::RecvError::Lagged(_)) => list.all_missing(),
                    Err(broadcast::error::RecvError::Closed) => {
                        arrivals = None;
                        Vec::new()
                    }
                },
                () = tokio::time::sleep_until(idle_at) => {
                    let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
                    if peers.get(&peer).is_some_and(|l| l.streams == 0) {
                        peers.remove(&peer);
                        return;
                    }
                    idle_at = tokio::time::Instant::now() + IDLE;
                    continue;
                }
            };
            let mut pending = fresh.into_iter().peekable();
            while pending.peek().is_some() {
                let mut reply = Message::default();
                let mut bytes = 0;
                for want in pending.by_ref() {
                    let Some(found) = self.look_up(&want).await else {
                        list.missing(&want.cid);
                        if want.send_dont_have {
                            reply.presences.push((want.cid, Presence::DontHave));
                        }
                        continue;
                    };
                    bytes += found.len();
                    match want.kind {
                        WantType::Have if found.len() > SEND_SMALL => {
                            reply.presences.push((want.cid, Presence::Have));
                        }
                        _ => {
                            list.sent(&want.cid);
                            reply.blocks.push(found);
                        }
                    }
                    if bytes >= BATCH {
                        break;
                    }
                }
                if reply == Message::default() {
                    continue;
                }
                if let Err(e) = out.send(&self.control, peer, &reply.framed()).await {
                    tracing::debug!("bitswap: cannot answer {peer}: {e}");
                }
            }
        }
    }

    /// The block wanted, under the CID it was wanted as (a CIDv0 want gets a CIDv0 block).
    async fn look_up(&self, want: &Want) -> Option<Block> {
        let _read = self.reads.clone().acquire_owned().await.ok()?;
        let (store, cid) = (self.store.clone(), canonical(&want.cid));
        let held = tokio::task::spawn_blocking(move || store.get(&cid))
            .await
            .ok()?;
        match held {
            // Verified by the store as it read it; only renamed for a CIDv0 want.
            Ok(block) => block.named(want.cid).ok(),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => {
                tracing::debug!("bitswap: cannot read {}: {e}", want.cid);
                None
            }
        }
    }
}

/// The next block to arrive in the store, or never when arrivals are not followed.
async fn recv(
    arrivals: &mut Option<broadcast::Receiver<Cid>>,
) -> Result<Cid, broadcast::error::RecvError> {
    match arrivals {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads `peer`'s messages from `stream` until it ends, idles or breaks the protocol: wants
/// into `wants`, blocks and presences to `client`.
async fn read(
    peer: PeerId,
    mut stream: Stream,
    wants: &mpsc::Sender<Message>,
    client: &Bitswap,
) -> std::io::Result<()> {
    let mut frames = Frames::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::time::timeout(IDLE, stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))??;
        if n == 0 {
            return Ok(());
        }
        frames.push(&buf[..n]);
        while let Some(frame) = frames.next_frame().map_err(std::io::Error::other)? {
            let msg = Message::decode(&frame).map_err(std::io::Error::other)?;
            client.received(peer, &msg);
            if msg.wantlist.entries.is_empty() && !msg.wantlist.full {
                continue;
            }
            let wants_only = Message {
                wantlist: msg.wantlist,
                ..Message::default()
            };
            if wants.send(wants_only).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// A want to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    cid: Cid,
    kind: WantType,
    send_dont_have: bool,
}

/// What a peer wants: at most [`MAX_ENTRIES`] CIDs not yet sent (so answered with `Have` or
/// `DontHave`), which of them were answered, and which were not held when they were (by
/// canonical CID, to the CID as wanted).
#[derive(Debug, Default)]
struct WantList {
    wants: HashMap<Cid, (WantType, bool)>,
    answered: HashSet<Cid>,
    missing: HashMap<Cid, Cid>,
}

impl WantList {
    /// The block for `cid` went out: the want is met.
    fn sent(&mut self, cid: &Cid) {
        self.forget(cid);
    }

    fn forget(&mut self, cid: &Cid) {
        self.wants.remove(cid);
        self.answered.remove(cid);
        self.missing.remove(&canonical(cid));
    }

    /// The want for `cid` found no block.
    fn missing(&mut self, cid: &Cid) {
        if self.wants.contains_key(cid) {
            self.missing.insert(canonical(cid), *cid);
        }
    }

    /// The block `cid` (canonical) arrived in the store: the want for it, if one waits.
    fn arrived(&mut self, cid: &Cid) -> Vec<Want> {
        let Some(wanted) = self.missing.remove(cid) else {
            return Vec::new();
        };
        self.want(wanted).into_iter().collect()
    }

    /// Every want that found no block, to be looked up again.
    fn all_missing(&mut self) -> Vec<Want> {
        let missing: Vec<Cid> = self.missing.drain().map(|(_, wanted)| wanted).collect();
        missing.into_iter().filter_map(|c| self.want(c)).collect()
    }

    fn want(&self, cid: Cid) -> Option<Want> {
        let &(kind, _) = self.wants.get(&cid)?;
        // A block that is still missing has been said to be so already.
        Some(Want {
            cid,
            kind,
            send_dont_have: false,
        })
    }

    /// Applies a message's wantlist; returns the wants to answer now (new ones, and a
    /// want-have that became a want-block).
    fn update(&mut self, msg: &Message) -> Vec<Want> {
        if msg.wantlist.full {
            let keep: HashSet<Cid> = msg.wantlist.entries.iter().map(|e| e.cid).collect();
            self.wants.retain(|cid, _| keep.contains(cid));
            self.answered.retain(|cid| keep.contains(cid));
            self.missing.retain(|_, wanted| keep.contains(wanted));
        }
        let mut fresh = Vec::new();
        for entry in &msg.wantlist.entries {
            if entry.cancel {
                self.forget(&entry.cid);
                continue;
            }
            let upgraded = self.wants.get(&entry.cid).is_some_and(|(kind, _)| {
                *kind == WantType::Have && entry.want_type == WantType::Block
            });
            if !self.wants.contains_key(&entry.cid) && self.wants.len() >= MAX_ENTRIES {
                // Every want here has been answered (Have or DontHave; those answered with
                // the block are gone), and peers need not cancel them: one makes room.
                if let Some(old) = self.wants.keys().next().copied() {
                    self.forget(&old);
                }
            }
            self.wants
                .insert(entry.cid, (entry.want_type, entry.send_dont_have));
            let new = self.answered.insert(entry.cid);
            if new || upgraded {
                fresh.push(Want {
                    cid: entry.cid,
                    kind: entry.want_type,
                    send_dont_have: entry.send_dont_have,
                });
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::bitswap::{WantEntry, Wantlist};

    fn cid(n: u32) -> Cid {
        *Block::raw(n.to_le_bytes().to_vec()).cid()
    }

    fn msg(full: bool, entries: Vec<(u32, WantType, bool)>) -> Message {
        Message {
            wantlist: Wantlist {
                entries: entries
                    .into_iter()
                    .map(|(n, want_type, cancel)| WantEntry {
                        cid: cid(n),
                        priority: 1,
                        cancel,
                        want_type,
                        send_dont_have: true,
                    })
                    .collect(),
                full,
            },
            ..Message::default()
        }
    }

    #[test]
    fn a_wantlist_answers_each_want_once_until_cancelled() {
        let mut list = WantList::default();
        let got = list.update(&msg(
            false,
            vec![(1, WantType::Have, false), (2, WantType::Block, false)],
        ));
        assert_eq!(got.len(), 2);
        // The same again: nothing new.
        assert!(list
            .update(&msg(false, vec![(1, WantType::Have, false)]))
            .is_empty());
        // A want-have that becomes a want-block is answered again.
        let got = list.update(&msg(false, vec![(1, WantType::Block, false)]));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].kind, WantType::Block);
        // Cancelled, then wanted again: answered again.
        list.update(&msg(false, vec![(2, WantType::Block, true)]));
        assert_eq!(
            list.update(&msg(false, vec![(2, WantType::Block, false)]))
                .len(),
            1
        );
        // A full list replaces the rest.
        let got = list.update(&msg(true, vec![(3, WantType::Block, false)]));
        assert_eq!(got.len(), 1);
        assert_eq!(list.wants.len(), 1);
    }

    #[test]
    fn wants_found_missing_are_answered_when_their_block_arrives() {
        let mut list = WantList::default();
        for want in list.update(&msg(
            false,
            vec![(1, WantType::Block, false), (2, WantType::Have, false)],
        )) {
            list.missing(&want.cid);
        }
        // Another block arriving answers nothing; the wanted one its want, once.
        assert!(list.arrived(&cid(3)).is_empty());
        let got = list.arrived(&cid(1));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].cid, got[0].kind), (cid(1), WantType::Block));
        assert!(list.arrived(&cid(1)).is_empty());
        // A cancelled want is not answered; after a lag, every want still missing is.
        list.update(&msg(false, vec![(4, WantType::Block, false)]));
        list.missing(&cid(4));
        list.update(&msg(false, vec![(4, WantType::Block, true)]));
        let again: Vec<Cid> = list.all_missing().into_iter().map(|w| w.cid).collect();
        assert_eq!(again, [cid(2)]);
    }

    #[test]
    fn a_wantlist_holds_at_most_its_limit_and_new_wants_still_get_answers() {
        let mut list = WantList::default();
        let all: Vec<u32> = (0..(MAX_ENTRIES as u32 + 500)).collect();
        let mut answered = 0;
        for chunk in all.chunks(MAX_ENTRIES) {
            let wants = chunk.iter().map(|&n| (n, WantType::Have, false)).collect();
            answered += list.update(&msg(false, wants)).len();
        }
        assert_eq!(list.wants.len(), MAX_ENTRIES);
        assert_eq!(answered, all.len(), "wants past the limit went unanswered");
        // A block sent meets its want (peers need not cancel it).
        let held = *list.wants.keys().next().expect("a full list");
        list.sent(&held);
        assert_eq!(list.wants.len(), MAX_ENTRIES - 1);
    }
}
