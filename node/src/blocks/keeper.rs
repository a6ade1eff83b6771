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
//! holders — the first of them in the ranking by the block's CID, which all holders compute
//! alike — to the best-ranked live daemons that lack it by its placement group, the rule
//! `add` places blocks by, so a group's copies go to the same daemons.
//!
//! Audits. A `Has` answer is a claim: with each census, every daemon that says it holds some
//! of our blocks is asked to prove it holds one of them, picked at random (`Prove`, answered
//! with a hash of a fresh nonce and the bytes, which this daemon checks against its own
//! copy). A daemon that cannot is reported and no longer counted, asked, or copied to by this
//! keeper, so a peer claiming to hold everything cannot keep blocks short of their target.
//!
//! Past a full mesh (the daemon stopped connecting to the daemons it discovers), the census
//! looks up the neighbourhoods of the groups it holds (a new group at once, each again once a
//! census period, at most [`LOOKUPS_PER_TICK`] a tick), and asks those daemons and the ones
//! that said they hold some of its blocks, not every daemon it is connected to: the daemons
//! that should hold its groups are among them, and connections to the rest close once idle.
//! Such a daemon does not redial the
//! daemons whose connections closed, so its census comes at least every half idle timeout,
//! which keeps the connections to its holders open.
//!
//! Trade-offs. A census costs one `Has` per daemon per 4096 blocks, and runs only when
//! something changed (daemons came or went, new targets, a holder stopped answering or passed
//! its grace period) or once a minute.
//! A freshly started keeper waits one grace period before copying anything, because it
//! cannot yet tell a daemon that is down for a moment from one that is gone; within it, too,
//! a census comes only when something changed, and once more when it is over.
//!
//! Moves. When daemons join, a group's candidates (the first [`CHOICES`] × target of its
//! placement ranking) change, and copies may find themselves outside them. Once nothing is
//! short, a holder outside copies its groups to candidates lacking them (at most
//! [`MOVE_BLOCKS_PER_SEC`], so a join does not take the disks and network from the jobs),
//! and drops its copy once enough candidates hold it (see [`plan_moves`] for the rule that
//! keeps daemons with different views from dropping each other's copies). Readers find a
//! block while it moves: the old holder keeps it until the new ones have it, and a reader
//! asks every daemon after the likely holders. A daemon that comes back after its blocks
//! were copied elsewhere finds the extra copies dropped the same way, by whichever holders
//! are outside the candidates.

use crate::blocks::{self, Placed, Proved, AUDIT_PICKS};
use crate::net::NetClient;
use crate::repo::store::BlockStore;
use libp2p::PeerId;
use p2pmr_protocol::wire::{rank_peers, CHOICES};
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
/// Blocks a second that moves toward their placement may copy (about 32 MiB/s of full
/// chunks), so a join does not take a daemon's disk and network from the jobs.
const MOVE_BLOCKS_PER_SEC: f64 = 128.0;
/// The longest pause whose unused allowance a round of moves may catch up on.
const MOVE_BURST: Duration = Duration::from_secs(2);
/// Set in a replica log record's target byte when a placement group follows the CID.
const GROUP_FLAG: u8 = 0x80;

/// One replica log record at the start of `bytes`: the CID, target, group and the record's
/// length; `None` if it is cut short (a crash mid-write) or unreadable.
fn record(bytes: &[u8]) -> Option<(Cid, u8, Option<Cid>, usize)> {
    let cid_at = |at: usize| -> Option<(Cid, usize)> {
        let len = usize::from(*bytes.get(at)?);
        let cid = Cid::try_from(bytes.get(at + 1..at + 1 + len)?).ok()?;
        Some((cid, at + 1 + len))
    };
    let flagged = *bytes.first()?;
    let (cid, end) = cid_at(1)?;
    let target = flagged & !GROUP_FLAG;
    if flagged & GROUP_FLAG == 0 {
        return Some((cid, target, None, end));
    }
    let (group, end) = cid_at(end)?;
    Some((cid, target, Some(group), end))
}

/// Errors of the replica log.
#[derive(Debug, Error)]
#[error("replica log {path}")]
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
    /// Target, when it was noted (for targets read from the log: when it was opened), and
    /// placement group (if not the block's own CID).
    map: HashMap<Cid, (u8, Instant, Option<Cid>)>,
    log: File,
    unsynced: bool,
    /// Bumped on every change, so the census knows when to look again.
    generation: u64,
}

impl Keeper {
    /// Opens (or creates) the log at `path` (the repository's
    /// [`replica_log`](crate::Repo::replica_log)) and loads the targets it records. A record
    /// cut short by a crash is dropped.
    pub fn open(path: &Path) -> Result<Self, KeeperError> {
        let err = |source| KeeperError {
            path: path.display().to_string(),
            source,
        };
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).map_err(err)?;
        // Records: target (1 byte; its top bit set if a group follows), CID length (1 byte),
        // CID bytes, and if so the group's CID length (1 byte) and bytes.
        let (mut map, mut good, opened) = (HashMap::new(), 0, Instant::now());
        while let Some((cid, target, group, used)) = record(&bytes[good..]) {
            let slot = map.entry(cid).or_insert((0u8, opened, None));
            slot.0 = slot.0.max(target);
            slot.2 = group.or(slot.2);
            good += used;
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
            path: path.to_path_buf(),
        })
    }

    fn err(&self, source: io::Error) -> KeeperError {
        KeeperError {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Records that `cid` (held here, of the placement group `group`) should be on
    /// `replicas` daemons in all. Durable after the next [`Keeper::sync`].
    pub fn note(&self, cid: Cid, replicas: u8, group: Option<Cid>) -> Result<(), KeeperError> {
        // Targets over this cannot be told from the group flag; nobody asks for so many.
        let replicas = replicas.min(GROUP_FLAG - 1);
        if replicas <= 1 {
            return Ok(());
        }
        let mut t = self.inner.lock().expect("keeper lock");
        if t.map.get(&cid).is_some_and(|&(r, _, _)| r >= replicas) {
            return Ok(());
        }
        let bytes = cid.to_bytes();
        let flag = if group.is_some() { GROUP_FLAG } else { 0 };
        let mut record = vec![replicas | flag, bytes.len() as u8];
        record.extend_from_slice(&bytes);
        if let Some(group) = group {
            let bytes = group.to_bytes();
            record.push(bytes.len() as u8);
            record.extend_from_slice(&bytes);
        }
        t.log.write_all(&record).map_err(|e| self.err(e))?;
        t.map.insert(cid, (replicas, Instant::now(), group));
        t.unsynced = true;
        t.generation += 1;
        Ok(())
    }

    /// Records the target of blocks this daemon wrote and placed copies of on others (each
    /// with its placement group), durably. Its own copy counts toward the target like the
    /// others, so this keeper watches it too: the other holders' keepers leave a block to its
    /// first-ranked holder, which may be this daemon.
    pub async fn keep_own_copies(&self, blocks: Vec<(Cid, Option<Cid>)>, target: usize) {
        if target <= 1 {
            return;
        }
        let keeper = self.clone();
        let target = u8::try_from(target).unwrap_or(u8::MAX);
        let noted = tokio::task::spawn_blocking(move || {
            blocks
                .into_iter()
                .try_for_each(|(cid, group)| keeper.note(cid, target, group))
                .and_then(|()| keeper.sync())
        })
        .await
        .expect("noting targets panicked");
        if let Err(e) = noted {
            // The copies are made; only their upkeep by this daemon is missing.
            tracing::warn!("{}", crate::error::Chain(&e));
        }
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
    #[cfg(test)]
    fn target(&self, cid: &Cid) -> Option<u8> {
        self.inner
            .lock()
            .expect("keeper lock")
            .map
            .get(cid)
            .map(|&(r, _, _)| r)
    }

    fn snapshot(&self) -> (u64, Vec<Want>) {
        let t = self.inner.lock().expect("keeper lock");
        let wants = t.map.iter().map(|(&cid, &(target, noted, group))| Want {
            cid,
            target,
            noted,
            group,
        });
        (t.generation, wants.collect())
    }

    /// Watches over the targets until the network stops: takes censuses and copies blocks
    /// short of their target once a holder has been gone for `grace`.
    pub async fn run(self, net: NetClient, store: BlockStore, grace: Duration) {
        let tick = (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let mut started = Instant::now();
        let mut last_tick = started;
        let mut answers: HashMap<PeerId, Answer> = HashMap::new();
        // Blocks found short of their target, since when.
        let mut short: HashMap<Cid, Instant> = HashMap::new();
        // What the last census that needed no copying saw: targets generation, live
        // daemons, when.
        let mut last: Option<(u64, BTreeSet<PeerId>, Instant)> = None;
        // Daemons that failed an audit: not believed again.
        let mut distrusted: HashSet<PeerId> = HashSet::new();
        // When copies toward their placement were last made (the rate is held from it), and
        // when to look again at copies others are moving.
        let mut moved_at = Instant::now();
        let mut recheck: Option<Instant> = None;
        // The neighbourhoods of this daemon's groups (a partial mesh only).
        let mut hoods = Hoods::default();
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = Instant::now();
            // Time this daemon did not run (SIGSTOP, a suspended machine) is not time the
            // others were gone: without this, a daemon thawed after a long freeze would find
            // every holder past its grace period and copy everything it holds.
            let stalled = now.duration_since(last_tick).saturating_sub(2 * tick);
            last_tick = now;
            if !stalled.is_zero() {
                started += stalled;
                for a in answers.values_mut() {
                    a.seen += stalled;
                }
            }
            // Past a full mesh, the daemons that should hold this daemon's groups (their
            // neighbourhoods) are looked up, which connects to them: new groups at once, the
            // others once a census period, a bounded number a tick.
            let (generation, targets) = self.snapshot();
            if net.is_partial() {
                let keys: BTreeSet<Cid> =
                    targets.iter().map(|w| w.group.unwrap_or(w.cid)).collect();
                let due = hoods.due(&keys, Instant::now(), CENSUS_EVERY, LOOKUPS_PER_TICK);
                if !due.is_empty() {
                    let mut found: HashMap<Cid, Vec<PeerId>> =
                        blocks::look_up_each(&net, due.iter().copied())
                            .await
                            .into_iter()
                            .collect();
                    let at = Instant::now();
                    let mut peers = BTreeSet::new();
                    for key in due {
                        let hood = found.remove(&key).unwrap_or_default();
                        peers.extend(hood.iter().copied());
                        hoods.found(key, hood, at);
                    }
                    blocks::admit(&net, peers).await;
                }
            }
            // Past a full mesh only those neighbourhoods and the daemons that said they hold
            // some of these blocks are asked, so connections to the rest can close.
            let in_hoods = hoods.peers();
            let asked = |p: &PeerId| {
                !net.is_partial()
                    || in_hoods.contains(p)
                    || answers.get(p).is_some_and(|a| !a.held.is_empty())
            };
            // A partial mesh does not redial daemons whose connections closed, so the census's
            // questions must come often enough to keep those to holders open.
            let census_every = match net.is_partial() {
                true => CENSUS_EVERY.min(crate::net::IDLE_TIMEOUT / 2),
                false => CENSUS_EVERY,
            };
            let live: BTreeSet<PeerId> = net
                .daemons()
                .into_keys()
                .filter(|p| !distrusted.contains(p) && asked(p))
                .collect();
            // A holder counts while it is connected and answers; the grace period runs from
            // the last moment it did both.
            for (peer, a) in answers.iter_mut() {
                if a.answering && live.contains(peer) {
                    a.seen = now;
                }
            }
            let before = answers.len();
            answers.retain(|_, a| now.duration_since(a.seen) < grace);
            let holders_changed = answers.len() < before || answers.values().any(|a| !a.answering);
            let due = census_due(
                last.as_ref(),
                (generation, &live, holders_changed),
                now,
                census_every,
                recheck,
                started + grace,
            );
            if targets.is_empty() || !due {
                continue;
            }
            let store2 = store.clone();
            let Ok(mine) = tokio::task::spawn_blocking(move || {
                targets
                    .into_iter()
                    .filter(|w| store2.has(&w.cid))
                    .collect::<Vec<_>>()
            })
            .await
            else {
                return;
            };
            let cids: Vec<Cid> = mine.iter().map(|w| w.cid).collect();
            let census_at = Instant::now();
            let asked = futures::future::join_all(live.iter().map(|&p| ask(&net, p, &cids))).await;
            let mut fresh = Vec::new();
            for (&peer, held) in live.iter().zip(asked) {
                let held = match held {
                    Some(mut held) => match audit(&net, &store, peer, &mut held).await {
                        Some(true) => Some(held),
                        Some(false) => {
                            tracing::warn!(
                                "{peer} says it holds {} of this daemon's blocks but could not \
                                 prove it holds one; it is no longer counted as a holder",
                                held.len()
                            );
                            distrusted.insert(peer);
                            answers.remove(&peer);
                            continue;
                        }
                        None => None,
                    },
                    None => None,
                };
                match held {
                    Some(held) => {
                        fresh.push(peer);
                        answers.insert(
                            peer,
                            Answer {
                                held,
                                answered: census_at,
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
                // Too early to tell a restart from a loss: look again when something changes,
                // and once the grace period is over.
                last = Some((generation, live, census_at));
                continue;
            }
            let me = net.local_peer_id();
            let (plan, waiting) = plan(me, &mine, &answers, &fresh, &mut short, (census_at, tick));
            let copied = copy(&net, &store, plan).await;
            if copied > 0 {
                tracing::info!("copied {copied} under-replicated block(s) to other daemons");
            }
            // Copies outside their candidates move once nothing is short, at a bounded rate.
            let mut moving = false;
            if copied == 0 && !waiting {
                let moves = plan_moves(me, &mine, &answers, (&fresh, &live), (census_at, grace));
                // Others are moving what is held here too: look again once they may have.
                recheck = moves.waiting.then(|| census_at + grace);
                let allowed = (MOVE_BLOCKS_PER_SEC * moved_at.elapsed().as_secs_f64())
                    .min(MOVE_BLOCKS_PER_SEC * MOVE_BURST.as_secs_f64())
                    as usize;
                moving = !moves.copies.is_empty();
                if moving && allowed > 0 {
                    moved_at = Instant::now();
                    let batch: Vec<Copy> = moves.copies.into_iter().take(allowed).collect();
                    let moved = copy(&net, &store, batch).await;
                    if moved > 0 {
                        tracing::info!("copied {moved} block(s) toward their placement");
                    }
                }
                let dropped = drop_copies(&store, moves.drops).await;
                if dropped > 0 {
                    tracing::info!("dropped {dropped} block(s) held in place by other daemons");
                }
            }
            if copied > 0 || waiting || moving {
                // Look again next tick: to confirm the counts after copying (and finish if
                // some copies failed), or to take the second look at short blocks.
                last = None;
            } else {
                last = Some((generation, live, census_at));
            }
        }
    }
}

/// Whether a census is due, given what the last one saw (`last`: the targets' generation, the
/// live daemons, when; `None` when it had copying to do or to confirm), the targets'
/// generation and the live daemons now, and whether a holder dropped out of the answers or
/// stopped answering. A census is due when any of those changed, `every` after the last,
/// at `recheck`, and once the keeper's first grace period is over (`grace_ends`) if the last
/// was taken within it, since no census before then may copy anything.
fn census_due(
    last: Option<&(u64, BTreeSet<PeerId>, Instant)>,
    (generation, live, holders_changed): (u64, &BTreeSet<PeerId>, bool),
    now: Instant,
    every: Duration,
    recheck: Option<Instant>,
    grace_ends: Instant,
) -> bool {
    let Some((g, l, at)) = last else { return true };
    *g != generation
        || l != live
        || holders_changed
        || now.duration_since(*at) >= every
        || recheck.is_some_and(|t| now >= t)
        || (*at < grace_ends && now >= grace_ends)
}

/// A block this daemon holds and watches over: its replica target, and since when.
#[derive(Debug, Clone, Copy)]
struct Want {
    cid: Cid,
    target: u8,
    noted: Instant,
    group: Option<Cid>,
}

/// A daemon's answer to a census: which of our blocks it held, when it said so; when it was
/// last connected and answering; whether it answered the latest question.
#[derive(Debug)]
struct Answer {
    held: HashSet<Cid>,
    answered: Instant,
    seen: Instant,
    answering: bool,
}

/// Asks `peer` to prove it holds one of `held` (which this daemon holds too), picked at
/// random: `Some(true)` if it did, `Some(false)` if it answered anything else, `None` if it
/// did not answer in time. Nothing claimed, nothing to prove.
///
/// A daemon may drop a copy between saying it holds it and the proof (moves drop copies held
/// in place by others): one that answers "not found" is asked again whether it holds the
/// block, and if it says no, the block leaves its claims and another is picked.
/// Neighbourhood lookups a keeper makes per tick at most: a daemon holding many groups
/// spreads their refreshes over several ticks instead of looking all of them up at once.
const LOOKUPS_PER_TICK: usize = 64;

/// Past a full mesh, the neighbourhoods of the groups a keeper watches over, as last looked
/// up, and when.
#[derive(Default)]
struct Hoods {
    by_key: HashMap<Cid, (Vec<PeerId>, Instant)>,
    /// The daemons of all of them, made again only after a change.
    peers: Option<BTreeSet<PeerId>>,
}

impl Hoods {
    /// The keys to look up now, at most `max`: those never looked up first, then those whose
    /// last lookup is at least `every` old, oldest first. Keys not in `keys` (groups no
    /// longer held) are forgotten.
    fn due(&mut self, keys: &BTreeSet<Cid>, now: Instant, every: Duration, max: usize) -> Vec<Cid> {
        let before = self.by_key.len();
        self.by_key.retain(|k, _| keys.contains(k));
        if self.by_key.len() != before {
            self.peers = None;
        }
        let mut due: Vec<(Option<Instant>, Cid)> = keys
            .iter()
            .filter_map(|k| match self.by_key.get(k) {
                None => Some((None, *k)),
                Some((_, at)) if now.saturating_duration_since(*at) >= every => {
                    Some((Some(*at), *k))
                }
                Some(_) => None,
            })
            .collect();
        due.sort_unstable();
        due.into_iter().take(max).map(|(_, k)| k).collect()
    }

    /// The result of a lookup of `key` made at `at` (no peers if it failed: tried again a
    /// census period later).
    fn found(&mut self, key: Cid, hood: Vec<PeerId>, at: Instant) {
        self.by_key.insert(key, (hood, at));
        self.peers = None;
    }

    /// Every daemon in a neighbourhood looked up.
    fn peers(&mut self) -> &BTreeSet<PeerId> {
        let by_key = &self.by_key;
        self.peers.get_or_insert_with(|| {
            by_key
                .values()
                .flat_map(|(hood, _)| hood.iter().copied())
                .collect()
        })
    }
}

async fn audit(
    net: &NetClient,
    store: &BlockStore,
    peer: PeerId,
    held: &mut HashSet<Cid>,
) -> Option<bool> {
    for _ in 0..AUDIT_PICKS {
        if held.is_empty() {
            return Some(true);
        }
        let pick = blocks::random_u64() as usize % held.len();
        let cid = *held.iter().nth(pick).expect("in range");
        let store = store.clone();
        let block = tokio::task::spawn_blocking(move || store.get(&cid))
            .await
            .ok()?
            .ok()?;
        match timeout(ANSWER_TIMEOUT, blocks::challenge(net, peer, &block)).await {
            Ok(Proved::Yes) => return Some(true),
            Ok(Proved::No(_)) => return Some(false),
            Ok(Proved::NoAnswer(_)) | Err(_) => return None,
            Ok(Proved::Gone) => match ask(net, peer, &[cid]).await {
                Some(still) if still.contains(&cid) => return Some(false),
                Some(_) => {
                    held.remove(&cid);
                }
                None => return None,
            },
        }
    }
    // Every pick was dropped meanwhile: nothing shows it lies, nothing shows it holds.
    None
}

/// Asks `peer` which of `cids` it holds; `None` if it does not answer in time.
async fn ask(net: &NetClient, peer: PeerId, cids: &[Cid]) -> Option<HashSet<Cid>> {
    timeout(ANSWER_TIMEOUT, blocks::held_by(net, peer, cids))
        .await
        .ok()
        .flatten()
}

/// One block to copy: to how many more daemons, chosen from which by its group, and its
/// target.
#[derive(Debug, PartialEq, Eq)]
struct Copy {
    cid: Cid,
    more: usize,
    to: Vec<PeerId>,
    target: u8,
    group: Option<Cid>,
}

/// The copies this daemon (`me`) must make: blocks short of their target for which it is the
/// first live holder in the placement ranking, to daemons that answered the latest census
/// (`fresh`) and lack them.
///
/// A block is being placed while its replicas are stored (not all at the same instant), so two
/// rules keep a census taken meanwhile from passing for a shortfall: a daemon whose latest
/// answer predates the block's target (plus `settle`) counts as holding it, and a block must be
/// found short by censuses at least `settle` apart (`short` remembers since when, across
/// calls). Also says whether short blocks await that second look.
fn plan(
    me: PeerId,
    mine: &[Want],
    answers: &HashMap<PeerId, Answer>,
    fresh: &[PeerId],
    short: &mut HashMap<Cid, Instant>,
    (now, settle): (Instant, Duration),
) -> (Vec<Copy>, bool) {
    let mut copies = Vec::new();
    let mut still_short = HashMap::new();
    let mut waiting = false;
    for &Want {
        cid,
        target,
        noted,
        group,
    } in mine
    {
        let mut holders = vec![Placed::new(me)];
        holders.extend(
            answers
                .iter()
                .filter(|(_, a)| a.held.contains(&cid) || a.answered < noted + settle)
                .map(|(p, _)| Placed::new(*p)),
        );
        let have = holders.len();
        if have >= usize::from(target) {
            continue;
        }
        let since = *short.get(&cid).unwrap_or(&now);
        still_short.insert(cid, since);
        if now.duration_since(since) < settle {
            waiting = true;
            continue;
        }
        if rank_peers(&cid, &holders)[0].id != me {
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
                group,
            });
        }
    }
    *short = still_short;
    (copies, waiting)
}

/// What to do about this daemon's copies outside their group's candidates: copies to make
/// toward the candidates, and blocks whose copy here is no longer needed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Moves {
    copies: Vec<Copy>,
    drops: Vec<Cid>,
    /// Some block is held here outside its candidates with nothing for this daemon to do
    /// yet (another holder is copying it, or it may be dropped once they have).
    waiting: bool,
}

/// Whether `a` comes before `b` in `key`'s rendezvous order: an order of any two daemons that
/// does not depend on which others a daemon knows.
fn outranks(key: &Cid, a: PeerId, b: PeerId) -> bool {
    let pair = [Placed::new(a), Placed::new(b)];
    rank_peers(key, &pair)[0].id == a
}

/// Moves toward the placement rule's current choice, after daemons joined: for each block
/// this daemon (`me`) holds whose group's candidates (the first [`CHOICES`] × target of the
/// ranking over the connected daemons, `live`) no longer include it. Only the daemons that
/// answered the latest census (`fresh`) count as holders; ranking all connected daemons, not
/// just those, keeps a slow answer from changing the candidates between rounds (a group's
/// blocks copied in two rounds would go to different daemons).
///
/// - While fewer than the target of the candidates hold the block, the first of its holders
///   outside the candidates (in the group's rendezvous order, which does not depend on whom
///   a daemon knows) copies it to the first candidates lacking it, so a group's blocks go to
///   the same daemons whichever round moves them.
/// - Once at least the target of them hold it, this daemon drops its copy, but only counting
///   holders that come before it in the group's rendezvous order ([`outranks`]). Daemons
///   that know different sets of daemons may each think the other is a candidate; with this
///   rule no two holders can each count the other, so the target's worth of holders first in
///   that order are never dropped, whatever each daemon knows.
///
/// Blocks noted less than `settle` ago are left alone for now (an add or a copy may be under
/// way), and so are blocks short of their target, which [`plan`] copies.
fn plan_moves(
    me: PeerId,
    mine: &[Want],
    answers: &HashMap<PeerId, Answer>,
    (fresh, live): (&[PeerId], &BTreeSet<PeerId>),
    (now, settle): (Instant, Duration),
) -> Moves {
    let mut moves = Moves::default();
    let live: Vec<Placed> = live
        .iter()
        .chain(fresh)
        .chain([&me])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|p| Placed::new(*p))
        .collect();
    // A group's blocks share its ranking: rank each group once.
    let mut rankings: HashMap<Cid, Vec<PeerId>> = HashMap::new();
    for &Want {
        cid,
        target,
        noted,
        group,
    } in mine
    {
        let target = usize::from(target);
        let key = group.unwrap_or(cid);
        let ranked = rankings
            .entry(key)
            .or_insert_with(|| blocks::placement(&key, &live));
        let candidates = &ranked[..ranked.len().min(CHOICES * target)];
        if candidates.contains(&me) {
            continue;
        }
        if now.duration_since(noted) < settle {
            moves.waiting = true;
            continue;
        }
        let holds = |p: &PeerId| answers.get(p).is_some_and(|a| a.held.contains(&cid));
        let holders: Vec<PeerId> = fresh.iter().filter(|p| holds(p)).copied().collect();
        if holders.len() + 1 < target {
            // Short of its target: the keeper's copies come first.
            continue;
        }
        let placed: Vec<PeerId> = holders
            .iter()
            .filter(|p| candidates.contains(p))
            .copied()
            .collect();
        if placed.len() >= target {
            if placed.iter().filter(|p| outranks(&key, **p, me)).count() >= target {
                moves.drops.push(cid);
            }
            continue;
        }
        moves.waiting = true;
        let mut outside = vec![Placed::new(me)];
        outside.extend(
            holders
                .iter()
                .filter(|p| !candidates.contains(p))
                .map(|p| Placed::new(*p)),
        );
        // One copier per group (the first outside holder in rendezvous order), and the same
        // daemons for all its blocks whichever round copies them: the first candidates
        // lacking it, by rank.
        if rank_peers(&key, &outside)[0].id != me {
            continue;
        }
        let to: Vec<PeerId> = candidates
            .iter()
            .filter(|p| !holders.contains(p))
            .take(target - placed.len())
            .copied()
            .collect();
        if !to.is_empty() {
            moves.copies.push(Copy {
                cid,
                more: to.len(),
                to,
                target: target as u8,
                group,
            });
        }
    }
    moves
}

/// Deletes this daemon's copies of `drops`; returns how many were deleted.
async fn drop_copies(store: &BlockStore, drops: Vec<Cid>) -> usize {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        drops
            .iter()
            .filter(|cid| match store.delete(cid) {
                Ok(deleted) => deleted,
                Err(e) => {
                    tracing::warn!("cannot drop {cid}: {e}");
                    false
                }
            })
            .count()
    })
    .await
    .unwrap_or(0)
}

/// Makes the planned copies, [`COPIES_IN_FLIGHT`] at a time; returns how many blocks reached
/// at least one new daemon.
async fn copy(net: &NetClient, store: &BlockStore, plan: Vec<Copy>) -> usize {
    use futures::stream::StreamExt;
    // Where the copies go is weighed like an add's placement: the least loaded of the
    // best-ranked daemons lacking a block, every block of a group to the same ones.
    let daemons: HashSet<PeerId> = plan.iter().flat_map(|c| c.to.iter().copied()).collect();
    let daemons: Vec<PeerId> = daemons.into_iter().collect();
    let book = &Mutex::new(blocks::Book::asking(net, &daemons, 1).await);
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
            let key = c.group.unwrap_or(cid);
            let order = book
                .lock()
                .expect("poisoned")
                .order(&key, more, &block, || blocks::placement(&key, &to));
            // The group's order was made for its first block: only this block's lacking
            // daemons of it (a partly copied group's blocks may lack different ones).
            let ranked: Vec<PeerId> = order
                .iter()
                .filter(|p| to.iter().any(|t| t.id == **p))
                .copied()
                .collect();
            let place = blocks::Placement {
                replicas: more,
                target: c.target.into(),
                session: 0,
                group: c.group,
            };
            match blocks::push(net, &ranked, &block, place).await {
                Ok(_) => true,
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
    use p2pmr_protocol::wire::{
        keyspace_distance, keyspace_keys, keyspace_position, NEIGHBOURHOOD,
    };

    #[test]
    fn a_census_comes_on_a_change_on_the_minute_and_once_the_first_grace_period_is_over() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (every, grace_ends) = (Duration::from_secs(60), at(30));
        let live: BTreeSet<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let fewer: BTreeSet<PeerId> = live.iter().skip(1).copied().collect();
        let due = |last: Option<&(u64, BTreeSet<PeerId>, Instant)>, now, changed, recheck| {
            census_due(last, changed, now, every, recheck, grace_ends)
        };
        let same = (7, &live, false);
        // No census yet, or the last one had copying to do.
        assert!(due(None, at(1), same, None));
        // Within the first grace period, the census taken at 1 s is not taken again every tick
        // while nothing changes...
        let early = (7, live.clone(), at(1));
        for now in [2, 10, 29] {
            assert!(!due(Some(&early), at(now), same, None), "{now} s");
        }
        // ...but it is when something does,
        assert!(due(Some(&early), at(10), (8, &live, false), None));
        assert!(due(Some(&early), at(10), (7, &fewer, false), None));
        assert!(due(Some(&early), at(10), (7, &live, true), None));
        // and once the grace period is over, as only a census after it may copy.
        assert!(due(Some(&early), at(30), same, None));
        // A census taken after the grace period comes again on the minute or at a recheck.
        let late = (7, live.clone(), at(31));
        for now in [31, 60, 90] {
            assert!(!due(Some(&late), at(now), same, None), "{now} s");
        }
        assert!(due(Some(&late), at(91), same, None));
        assert!(!due(Some(&late), at(40), same, Some(at(45))));
        assert!(due(Some(&late), at(45), same, Some(at(45))));
    }

    #[test]
    fn neighbourhoods_are_looked_up_new_first_then_oldest_a_few_at_a_time() {
        let keys: Vec<Cid> = (0..4u8).map(|i| *Block::raw(vec![i]).cid()).collect();
        let (a, b, c, d) = (keys[0], keys[1], keys[2], keys[3]);
        let all: BTreeSet<Cid> = keys.iter().copied().collect();
        let every = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let sorted = |mut v: Vec<Cid>| {
            v.sort();
            v
        };
        let mut hoods = Hoods::default();
        // Nothing looked up yet: at most `max` of them.
        assert_eq!(hoods.due(&all, at(0), every, 3).len(), 3);
        let (pa, pb) = (PeerId::random(), PeerId::random());
        hoods.found(a, vec![pa], at(0));
        hoods.found(b, vec![pb], at(1));
        // New keys come before any refresh; fresh ones are not due.
        assert_eq!(
            sorted(hoods.due(&all, at(30), every, 10)),
            sorted(vec![c, d])
        );
        hoods.found(c, vec![], at(2)); // a lookup that failed
        hoods.found(d, vec![pa], at(3));
        assert!(hoods.due(&all, at(59), every, 10).is_empty());
        // A census period on: the oldest first, within the bound.
        assert_eq!(hoods.due(&all, at(61), every, 1), vec![a]);
        assert_eq!(hoods.due(&all, at(62), every, 10).len(), 3, "a, b and c");
        assert_eq!(hoods.peers(), &BTreeSet::from([pa, pb]));
        // Groups no longer held are forgotten, and their daemons with them.
        let held = BTreeSet::from([c, d]);
        assert!(hoods.due(&held, at(30), every, 10).is_empty());
        assert_eq!(hoods.peers(), &BTreeSet::from([pa]));
    }

    /// An answer given at `at`.
    fn answer(held: &[Cid], at: Instant) -> Answer {
        Answer {
            held: held.iter().copied().collect(),
            answered: at,
            seen: at,
            answering: true,
        }
    }

    fn wants(blocks: &[Cid], target: u8, noted: Instant) -> Vec<Want> {
        let want = |&cid| Want {
            cid,
            target,
            noted,
            group: None,
        };
        blocks.iter().map(want).collect()
    }

    #[test]
    fn the_log_survives_reopening_and_a_torn_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            *Block::raw(b"a".to_vec()).cid(),
            *Block::raw(b"b".to_vec()).cid(),
        );
        let keeper = Keeper::open(&dir.path().join("replicas")).unwrap();
        keeper.note(a, 3, None).unwrap();
        keeper.note(b, 2, Some(a)).unwrap();
        keeper.note(b, 3, Some(a)).unwrap();
        keeper.note(a, 2, None).unwrap(); // lower: ignored
        keeper
            .note(*Block::raw(b"c".to_vec()).cid(), 1, None)
            .unwrap(); // 1: nothing to watch
        keeper.sync().unwrap();
        drop(keeper);
        let path = dir.path().join("replicas");
        let group_of = |keeper: &Keeper, cid: &Cid| keeper.inner.lock().unwrap().map[cid].2;
        for torn in [&[3u8, 36, 1, 2][..], &[3 | GROUP_FLAG, 0]] {
            // A crash in the middle of a record leaves a torn tail.
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(torn).unwrap();
            drop(f);
            let keeper = Keeper::open(&path).unwrap();
            assert_eq!(keeper.target(&a), Some(3));
            assert_eq!(keeper.target(&b), Some(3));
            assert_eq!(group_of(&keeper, &a), None);
            assert_eq!(group_of(&keeper, &b), Some(a));
            assert_eq!(keeper.snapshot().1.len(), 2);
        }
        // The torn tail is gone, so new records stay readable.
        let keeper = Keeper::open(&path).unwrap();
        let c = *Block::raw(b"d".to_vec()).cid();
        keeper.note(c, 4, Some(b)).unwrap();
        drop(keeper);
        let keeper = Keeper::open(&path).unwrap();
        assert_eq!(keeper.target(&c), Some(4));
        assert_eq!(group_of(&keeper, &c), Some(b));
    }

    #[test]
    fn exactly_one_holder_copies_each_short_block() {
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let blocks: Vec<Cid> = (0..50u32)
            .map(|i| *Block::raw(i.to_le_bytes().to_vec()).cid())
            .collect();
        // Peers 0 and 1 hold every block (target 3); peer 2 held some and is gone (absent
        // from the answers); peers 3 and 4 hold none.
        let settle = Duration::from_secs(1);
        let noted = Instant::now();
        let t0 = noted + 2 * settle;
        let mine = wants(&blocks, 3, noted);
        let mut copiers = HashMap::<Cid, usize>::new();
        for me in [0, 1] {
            let other = 1 - me;
            let answers: HashMap<PeerId, Answer> = [
                (peers[other], answer(&blocks, t0)),
                (peers[3], answer(&[], t0)),
                (peers[4], answer(&[], t0)),
            ]
            .into_iter()
            .collect();
            let fresh = [peers[other], peers[3], peers[4]];
            // An answer from before the blocks were placed says nothing about them.
            let early: HashMap<PeerId, Answer> = [
                (peers[other], answer(&blocks, t0)),
                (peers[3], answer(&[], noted)),
            ]
            .into_iter()
            .collect();
            let mut short = HashMap::new();
            assert_eq!(
                plan(peers[me], &mine, &early, &fresh, &mut short, (t0, settle)),
                (vec![], false)
            );
            // The first look only notes the shortfall; the second, a settle period later,
            // acts on it.
            let (first, waiting) =
                plan(peers[me], &mine, &answers, &fresh, &mut short, (t0, settle));
            assert!(first.is_empty() && waiting && short.len() == blocks.len());
            let (copies, waiting) = plan(
                peers[me],
                &mine,
                &answers,
                &fresh,
                &mut short,
                (t0 + settle, settle),
            );
            assert!(!waiting);
            for c in copies {
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
        let full: HashMap<PeerId, Answer> = [
            (peers[1], answer(&blocks, t0)),
            (peers[2], answer(&blocks, t0)),
        ]
        .into_iter()
        .collect();
        let mut short = HashMap::new();
        let now = (t0, Duration::ZERO);
        let fresh = [peers[1], peers[2], peers[3]];
        assert_eq!(
            plan(peers[0], &mine, &full, &fresh, &mut short, now),
            (vec![], false)
        );
        assert!(short.is_empty());
    }

    /// What each of `holders` (indexes into `peers`) would do about `cid` (target 2), each
    /// knowing the daemons `knows(holder)` and that the holders hold it.
    fn moves_of(
        peers: &[PeerId],
        cid: Cid,
        holders: &[usize],
        knows: impl Fn(usize) -> Vec<usize>,
    ) -> Vec<Moves> {
        let settle = Duration::from_secs(1);
        let noted = Instant::now();
        let t0 = noted + settle;
        holders
            .iter()
            .map(|&me| {
                let fresh: Vec<PeerId> = knows(me)
                    .into_iter()
                    .filter(|&p| p != me)
                    .map(|p| peers[p])
                    .collect();
                let answers: HashMap<PeerId, Answer> = fresh
                    .iter()
                    .map(|p| {
                        let held = holders.iter().any(|&h| peers[h] == *p);
                        let held: &[Cid] = if held {
                            std::slice::from_ref(&cid)
                        } else {
                            &[]
                        };
                        (*p, answer(held, t0))
                    })
                    .collect();
                let live: BTreeSet<PeerId> = fresh.iter().copied().collect();
                plan_moves(
                    peers[me],
                    &wants(&[cid], 2, noted),
                    &answers,
                    (&fresh, &live),
                    (t0, settle),
                )
            })
            .collect()
    }

    #[test]
    fn copies_outside_their_candidates_move_to_them_and_then_are_dropped() {
        let peers: Vec<PeerId> = (0..8).map(|_| PeerId::random()).collect();
        let everyone = |_| (0..8).collect::<Vec<_>>();
        let all: Vec<Placed> = peers.iter().map(|p| Placed::new(*p)).collect();
        for i in 0..40u32 {
            let cid = *Block::raw(i.to_le_bytes().to_vec()).cid();
            // The ranking's indexes: the first four are the candidates (two copies).
            let ranked: Vec<usize> = blocks::placement(&cid, &all)
                .iter()
                .map(|p| peers.iter().position(|q| q == p).unwrap())
                .collect();
            let (c, out) = (&ranked[..4], &ranked[4..]);
            // In place: nobody moves anything.
            for m in moves_of(&peers, cid, &[c[0], c[3]], everyone) {
                assert_eq!(m, Moves::default());
            }
            // Both copies outside (daemons joined): the first of the two by the block's
            // ranking copies it to two candidates; neither drops it yet.
            let held = [out[1], out[3]];
            let moves = moves_of(&peers, cid, &held, everyone);
            let pair = [Placed::new(peers[out[1]]), Placed::new(peers[out[3]])];
            let copier = rank_peers(&cid, &pair)[0].id;
            for (m, &h) in moves.iter().zip(&held) {
                assert!(m.drops.is_empty());
                if peers[h] == copier {
                    assert_eq!(m.copies.len(), 1);
                    assert_eq!(m.copies[0].more, 2);
                    let to: Vec<PeerId> = c[..2].iter().map(|&p| peers[p]).collect();
                    assert_eq!(m.copies[0].to, to);
                } else {
                    assert!(m.copies.is_empty());
                }
            }
            // One candidate has it: one more copy.
            let moves = moves_of(&peers, cid, &[c[2], out[0]], everyone);
            assert_eq!(moves[0], Moves::default());
            assert_eq!(moves[1].copies.len(), 1);
            assert_eq!(moves[1].copies[0].more, 1);
            assert_eq!(moves[1].copies[0].to, [peers[c[0]]]);
            // Two candidates have it: the copies outside them are dropped, and only those.
            let moves = moves_of(&peers, cid, &[c[1], c[2], out[0], out[2]], everyone);
            let dropped: Vec<bool> = moves.iter().map(|m| m.drops == [cid]).collect();
            assert_eq!(dropped, [false, false, true, true]);
            assert!(moves.iter().all(|m| m.copies.is_empty()));
            // Short of its target: left to the keeper's copies.
            assert_eq!(
                moves_of(&peers, cid, &[out[0]], everyone)[0],
                Moves::default()
            );
        }
    }

    #[test]
    fn holders_that_know_different_daemons_never_drop_each_others_copies() {
        // Past 20 daemons a group's candidates come from its keyspace neighbourhood, which
        // depends on whom a daemon knows. Build the case: A and C are the first two of the
        // ranking over all 100 daemons; B is outside the neighbourhood but comes before A in
        // rendezvous order. B, knowing everyone, sees A and C as candidates holding the block;
        // A, knowing only B, C and two more daemons before it, sees B and C as candidates.
        // Each could count the other and drop; only one may.
        let peers: Vec<PeerId> = (0..100).map(|_| PeerId::random()).collect();
        let all: Vec<Placed> = peers.iter().map(|p| Placed::new(*p)).collect();
        let index = |p: &PeerId| peers.iter().position(|q| q == p).unwrap();
        let mut cases = 0;
        for i in 0..200u32 {
            let cid = *Block::raw(i.to_le_bytes().to_vec()).cid();
            let ranked: Vec<usize> = blocks::placement(&cid, &all).iter().map(index).collect();
            let (c, a) = (ranked[0], ranked[1]);
            // Outside the neighbourhood (the 20 closest to either of its places), before A
            // in rendezvous order.
            let mut hood = HashSet::new();
            for place in keyspace_keys(&cid) {
                let at = keyspace_position(&place);
                let mut by_distance: Vec<usize> = (0..100).collect();
                by_distance.sort_by_key(|&p| {
                    keyspace_distance(&keyspace_position(&peers[p].to_bytes()), &at)
                });
                hood.extend(by_distance.into_iter().take(NEIGHBOURHOOD));
            }
            let before_a: Vec<usize> = ranked
                .iter()
                .copied()
                .filter(|p| !hood.contains(p) && outranks(&cid, peers[*p], peers[a]))
                .collect();
            let [b, x, y, ..] = before_a[..] else {
                continue;
            };
            cases += 1;
            let everyone: Vec<usize> = (0..100).collect();
            let views = |me: usize| {
                if me == a {
                    vec![b, c, x, y]
                } else {
                    everyone.clone()
                }
            };
            let moves = moves_of(&peers, cid, &[a, b, c], views);
            let dropped: Vec<bool> = moves.iter().map(|m| m.drops == [cid]).collect();
            // A counts B and C (both before it); B may not count A.
            assert_eq!(dropped, [true, false, false], "block {i}");
        }
        assert!(cases >= 10, "{cases}");
    }
}
