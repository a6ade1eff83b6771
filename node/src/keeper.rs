//! The replica keeper: each daemon watches over the blocks it holds that were stored with a
//! replica target (`Put { replicas }`), and puts copies back when holders vanish.
//!
//! How it works. Every daemon keeps the targets of its blocks in `<home>/replicas`, an
//! append-only log (so they survive restarts with the store). A background task takes a
//! *census*: it asks every connected daemon which of those blocks it holds (`Has`, batched).
//! A daemon that disconnects or stops answering (killed, frozen, cut off) keeps counting as a
//! holder of what it last said it held until the grace period has passed since it was last
//! connected and answering, so a restart or a short network cut costs no copying at all. Once a holder is
//! past the grace period, every block short of its target is copied by exactly one of its live
//! holders — the first of them in the placement ranking, which all holders compute alike — to
//! the best-ranked live daemons that lack it, the same rule `add` places blocks by.
//!
//! Trade-offs. A census costs one `Has` per daemon per 4096 blocks, and runs only when
//! something changed (daemons came or went, new targets, a holder stopped answering or passed
//! its grace period) or once a minute.
//! A daemon that comes back after its blocks were copied leaves them over-replicated; extra
//! copies are harmless and are not removed. A freshly started keeper waits one grace period
//! before copying anything, because it cannot yet tell a daemon that is down for a moment from
//! one that is gone.

use crate::net::NetClient;
use crate::remote::{self, Placed};
use crate::store::BlockStore;
use libp2p::PeerId;
use p2pmr_protocol::wire::{rank_peers, BlockRequest, BlockResponse, MAX_HAS};
use p2pmr_protocol::Cid;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::time::timeout;

/// How long a daemon may be gone before its blocks are copied elsewhere, unless configured.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// A census is taken at least this often even when nothing seems to have changed.
const CENSUS_EVERY: Duration = Duration::from_secs(60);
/// How long a daemon has to answer a census question before it counts as not answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Blocks copied at once.
const COPIES_IN_FLIGHT: usize = 16;
/// The log's file name in the repository.
const LOG: &str = "replicas";

/// Errors of the replica log.
#[derive(Debug, Error)]
#[error("replica log {path}: {source}")]
pub struct KeeperError {
    path: String,
    source: io::Error,
}

/// The replica targets of the blocks this daemon holds; a cheap `Clone` handle.
#[derive(Debug, Clone)]
pub struct Keeper {
    inner: Arc<Mutex<Targets>>,
    path: PathBuf,
}

#[derive(Debug)]
struct Targets {
    map: HashMap<Cid, u8>,
    log: File,
    unsynced: bool,
    /// Bumped on every change, so the census knows when to look again.
    generation: u64,
}

impl Keeper {
    /// Opens (or creates) the log under `home` and loads the targets it records. A record cut
    /// short by a crash is dropped.
    pub fn open(home: &Path) -> Result<Self, KeeperError> {
        let path = home.join(LOG);
        let err = |source| KeeperError {
            path: path.display().to_string(),
            source,
        };
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(err)?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).map_err(err)?;
        // Records: target (1 byte), CID length (1 byte), CID bytes.
        let (mut map, mut good) = (HashMap::new(), 0);
        while let [target, len, rest @ ..] = &bytes[good..] {
            let len = usize::from(*len);
            let Some(cid) = rest.get(..len).and_then(|b| Cid::try_from(b).ok()) else {
                break;
            };
            let slot = map.entry(cid).or_insert(0u8);
            *slot = (*slot).max(*target);
            good += 2 + len;
        }
        if good < bytes.len() {
            log.set_len(good as u64).map_err(err)?;
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(Targets {
                map,
                log,
                unsynced: false,
                generation: 0,
            })),
            path,
        })
    }

    fn err(&self, source: io::Error) -> KeeperError {
        KeeperError {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Records that `cid` (held here) should be on `replicas` daemons in all. Durable after
    /// the next [`Keeper::sync`].
    pub fn note(&self, cid: Cid, replicas: u8) -> Result<(), KeeperError> {
        if replicas <= 1 {
            return Ok(());
        }
        let mut t = self.inner.lock().expect("keeper lock");
        if t.map.get(&cid).is_some_and(|&r| r >= replicas) {
            return Ok(());
        }
        let bytes = cid.to_bytes();
        let mut record = vec![replicas, bytes.len() as u8];
        record.extend_from_slice(&bytes);
        t.log.write_all(&record).map_err(|e| self.err(e))?;
        t.map.insert(cid, replicas);
        t.unsynced = true;
        t.generation += 1;
        Ok(())
    }

    /// Makes the noted targets durable.
    pub fn sync(&self) -> Result<(), KeeperError> {
        let mut t = self.inner.lock().expect("keeper lock");
        if t.unsynced {
            t.log.sync_data().map_err(|e| self.err(e))?;
            t.unsynced = false;
        }
        Ok(())
    }

    /// The target recorded for `cid`, if any.
    pub fn target(&self, cid: &Cid) -> Option<u8> {
        self.inner
            .lock()
            .expect("keeper lock")
            .map
            .get(cid)
            .copied()
    }

    fn snapshot(&self) -> (u64, Vec<(Cid, u8)>) {
        let t = self.inner.lock().expect("keeper lock");
        (t.generation, t.map.iter().map(|(c, r)| (*c, *r)).collect())
    }

    /// Watches over the targets until the network stops: takes censuses and copies blocks
    /// short of their target once a holder has been gone for `grace`.
    pub async fn run(self, net: NetClient, store: BlockStore, grace: Duration) {
        let tick = (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let started = Instant::now();
        let mut answers: HashMap<PeerId, Answer> = HashMap::new();
        // What the last census that needed no copying saw: targets generation, live
        // daemons, when.
        let mut last: Option<(u64, BTreeSet<PeerId>, Instant)> = None;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = Instant::now();
            let live: BTreeSet<PeerId> = net.daemons().into_keys().collect();
            // A holder counts while it is connected and answers; the grace period runs from
            // the last moment it did both.
            for (peer, a) in answers.iter_mut() {
                if a.answering && live.contains(peer) {
                    a.seen = now;
                }
            }
            let before = answers.len();
            answers.retain(|_, a| now.duration_since(a.seen) < grace);
            let (generation, targets) = self.snapshot();
            let due = match &last {
                None => true,
                Some((g, l, at)) => {
                    *g != generation
                        || *l != live
                        || answers.len() < before
                        || answers.values().any(|a| !a.answering)
                        || at.elapsed() >= CENSUS_EVERY
                }
            };
            if targets.is_empty() || !due {
                continue;
            }
            let store2 = store.clone();
            let Ok(mine) = tokio::task::spawn_blocking(move || {
                targets
                    .into_iter()
                    .filter(|(c, _)| store2.has(c))
                    .collect::<Vec<_>>()
            })
            .await
            else {
                return;
            };
            let cids: Vec<Cid> = mine.iter().map(|(c, _)| *c).collect();
            let census_at = Instant::now();
            let asked = futures::future::join_all(live.iter().map(|&p| ask(&net, p, &cids))).await;
            let mut fresh = Vec::new();
            for (&peer, held) in live.iter().zip(asked) {
                match held {
                    Some(held) => {
                        fresh.push(peer);
                        answers.insert(
                            peer,
                            Answer {
                                held,
                                seen: census_at,
                                answering: true,
                            },
                        );
                    }
                    // Frozen or cut off: it keeps counting until the grace period is over.
                    None => {
                        if let Some(a) = answers.get_mut(&peer) {
                            a.answering = false;
                        }
                    }
                }
            }
            if started.elapsed() < grace {
                // Too early to tell a restart from a loss: look again next tick.
                continue;
            }
            let plan = plan(net.local_peer_id(), &mine, &answers, &fresh);
            let copied = copy(&net, &store, plan).await;
            if copied > 0 {
                tracing::info!("copied {copied} under-replicated block(s) to other daemons");
                // Look again at once to confirm the counts (and to finish if some failed).
                last = None;
            } else {
                last = Some((generation, live, census_at));
            }
        }
    }
}

/// A daemon's answer to a census: which of our blocks it held; when it was last connected and
/// answering; whether it answered the latest question.
#[derive(Debug)]
struct Answer {
    held: HashSet<Cid>,
    seen: Instant,
    answering: bool,
}

/// Asks `peer` which of `cids` it holds; `None` if it does not answer in time.
async fn ask(net: &NetClient, peer: PeerId, cids: &[Cid]) -> Option<HashSet<Cid>> {
    let mut held = HashSet::new();
    for chunk in cids.chunks(MAX_HAS) {
        let request = net.request(peer, BlockRequest::Has(chunk.to_vec()));
        match timeout(ANSWER_TIMEOUT, request).await {
            Ok(Ok(BlockResponse::Have(flags))) if flags.len() == chunk.len() => {
                held.extend(chunk.iter().zip(flags).filter(|(_, f)| *f).map(|(c, _)| *c));
            }
            _ => return None,
        }
    }
    Some(held)
}

/// One block to copy: to how many more daemons, chosen from which, and its target.
#[derive(Debug, PartialEq, Eq)]
struct Copy {
    cid: Cid,
    more: usize,
    to: Vec<PeerId>,
    target: u8,
}

/// The copies this daemon (`me`) must make: blocks short of their target for which it is the
/// first live holder in the placement ranking, to daemons that answered the latest census
/// (`fresh`) and lack them.
fn plan(
    me: PeerId,
    mine: &[(Cid, u8)],
    answers: &HashMap<PeerId, Answer>,
    fresh: &[PeerId],
) -> Vec<Copy> {
    let mut copies = Vec::new();
    for &(cid, target) in mine {
        let mut holders = vec![Placed::new(me)];
        holders.extend(
            answers
                .iter()
                .filter(|(_, a)| a.held.contains(&cid))
                .map(|(p, _)| Placed::new(*p)),
        );
        let have = holders.len();
        if have >= usize::from(target) || rank_peers(&cid, &holders)[0].id != me {
            continue;
        }
        let to: Vec<PeerId> = fresh
            .iter()
            .filter(|p| **p != me && !holders.iter().any(|h| h.id == **p))
            .copied()
            .collect();
        if !to.is_empty() {
            copies.push(Copy {
                cid,
                more: usize::from(target) - have,
                to,
                target,
            });
        }
    }
    copies
}

/// Makes the planned copies, [`COPIES_IN_FLIGHT`] at a time; returns how many blocks reached
/// at least one new daemon.
async fn copy(net: &NetClient, store: &BlockStore, plan: Vec<Copy>) -> usize {
    use futures::stream::StreamExt;
    futures::stream::iter(plan)
        .map(|c| async move {
            let store = store.clone();
            let cid = c.cid;
            let block = match tokio::task::spawn_blocking(move || store.get(&cid)).await {
                Ok(Ok(block)) => block,
                Ok(Err(e)) => {
                    tracing::warn!("cannot copy {cid}: {e}");
                    return false;
                }
                Err(e) => {
                    tracing::warn!("cannot copy {cid}: {e}");
                    return false;
                }
            };
            let to: Vec<Placed> = c.to.into_iter().map(Placed::new).collect();
            let more = c.more.min(to.len());
            match remote::push(net, &to, block, more, c.target.into()).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("re-replicating {cid}: {e}");
                    false
                }
            }
        })
        .buffer_unordered(COPIES_IN_FLIGHT)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::block::Block;

    fn answer(held: &[Cid]) -> Answer {
        Answer {
            held: held.iter().copied().collect(),
            seen: Instant::now(),
            answering: true,
        }
    }

    #[test]
    fn the_log_survives_reopening_and_a_torn_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            *Block::raw(b"a".to_vec()).cid(),
            *Block::raw(b"b".to_vec()).cid(),
        );
        let keeper = Keeper::open(dir.path()).unwrap();
        keeper.note(a, 3).unwrap();
        keeper.note(b, 2).unwrap();
        keeper.note(b, 3).unwrap();
        keeper.note(a, 2).unwrap(); // lower: ignored
        keeper.note(*Block::raw(b"c".to_vec()).cid(), 1).unwrap(); // 1: nothing to watch
        keeper.sync().unwrap();
        drop(keeper);
        // A crash in the middle of a record leaves a torn tail.
        let path = dir.path().join(LOG);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[3, 36, 1, 2]).unwrap();
        drop(f);
        let keeper = Keeper::open(dir.path()).unwrap();
        assert_eq!(keeper.target(&a), Some(3));
        assert_eq!(keeper.target(&b), Some(3));
        assert_eq!(keeper.snapshot().1.len(), 2);
        // The torn tail is gone, so new records stay readable.
        let c = *Block::raw(b"d".to_vec()).cid();
        keeper.note(c, 4).unwrap();
        drop(keeper);
        assert_eq!(Keeper::open(dir.path()).unwrap().target(&c), Some(4));
    }

    #[test]
    fn exactly_one_holder_copies_each_short_block() {
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let blocks: Vec<Cid> = (0..50u32)
            .map(|i| *Block::raw(i.to_le_bytes().to_vec()).cid())
            .collect();
        // Peers 0 and 1 hold every block (target 3); peer 2 held some and is gone (absent
        // from the answers); peers 3 and 4 hold none.
        let mine: Vec<(Cid, u8)> = blocks.iter().map(|c| (*c, 3)).collect();
        let mut copiers = HashMap::<Cid, usize>::new();
        for me in [0, 1] {
            let other = 1 - me;
            let answers: HashMap<PeerId, Answer> = [
                (peers[other], answer(&blocks)),
                (peers[3], answer(&[])),
                (peers[4], answer(&[])),
            ]
            .into_iter()
            .collect();
            let fresh = [peers[other], peers[3], peers[4]];
            for c in plan(peers[me], &mine, &answers, &fresh) {
                assert_eq!(c.more, 1);
                assert_eq!(c.target, 3);
                // Only daemons lacking the block are candidates.
                assert!(c.to.iter().all(|p| *p == peers[3] || *p == peers[4]));
                *copiers.entry(c.cid).or_default() += 1;
            }
        }
        assert_eq!(copiers.len(), blocks.len(), "every short block is copied");
        assert!(copiers.values().all(|&n| n == 1), "by exactly one holder");
        // Blocks at their target are left alone.
        let full: HashMap<PeerId, Answer> =
            [(peers[1], answer(&blocks)), (peers[2], answer(&blocks))]
                .into_iter()
                .collect();
        assert!(plan(peers[0], &mine, &full, &[peers[1], peers[2], peers[3]]).is_empty());
    }
}
