//! A simulator of routing, placement and map scheduling over many virtual peers, in virtual
//! time, driving the daemons' own code: each peer's Kademlia routing table is a libp2p-kad
//! `Behaviour` and a placer finds each placement group's neighbourhood with two lookups through
//! them, [`rank_peers`](p2pmr_protocol::wire::rank_peers) ranks it, a placer's `Book` picks
//! the copies' holders among the first ranked, and the coordinator's sans-I/O phase scheduler
//! assigns a job's map tasks as the virtual clock advances. It reports lookup hops, placement
//! balance, the share of map input read locally, and the bytes re-replication moves after
//! peers fail.

mod dht;

use crate::blocks::{placement, Book, Placed};
use crate::engine::coordinator::schedule::{
    held, Action, PhaseState, Rest, Schedule, Skips, Tally,
};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use p2pmr_protocol::engine::{split_point, Counters, JobResponse, MapOutput, TaskKind};
use p2pmr_protocol::wire::{keyspace_keys, NEIGHBOURHOOD};
use p2pmr_protocol::{Block, Cid};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

/// Bytes of one placement group: the leaves under one bottom-level node (174 × 256 KiB).
pub const GROUP_BYTES: u64 = 174 << 18;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Virtual peers.
    pub peers: usize,
    /// Copies of each group.
    pub replicas: usize,
    /// Group copies per peer on average (groups × replicas / peers).
    pub copies_per_peer: usize,
    /// Map tasks of the simulated job (one group each), 0 for no job.
    pub tasks: usize,
    /// Task slots per peer.
    pub slots: u32,
    /// Seed of the peers' identities and of which peers fail.
    pub seed: u64,
}

/// What a simulation measured.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// The configuration simulated.
    pub config: SimConfig,
    /// Groups placed.
    pub groups: usize,
    /// The most bytes one peer holds over the mean.
    pub max_over_mean: f64,
    /// The job's map input read from the mapper's own store, as a share (None: no job).
    pub local_share: Option<f64>,
    /// The job's map phase in virtual seconds.
    pub map_seconds: Option<f64>,
    /// Running map tasks the scheduler had cut in two for free slots.
    pub map_cuts: Option<usize>,
    /// Wall seconds the scheduler took over the whole job.
    pub scheduler_seconds: Option<f64>,
    /// For each share of peers failed at once, how the replica count was restored.
    pub moved: Vec<Restored>,
    /// Wall seconds spent finding and ranking each group's neighbourhood.
    pub placement_seconds: f64,
    /// The placers' lookups of the groups' neighbourhoods.
    pub lookups: Lookups,
}

/// What finding the groups' neighbourhoods cost.
#[derive(Debug, Clone)]
pub struct Lookups {
    /// Lookups made (two per looked-up group, one for each of its places in the keyspace).
    pub count: usize,
    /// Round trips one after another, median and 99th percentile.
    pub hops: (u32, u32),
    /// Requests sent per lookup, median.
    pub messages: u32,
    /// The share of lookups that found exactly the closest peers.
    pub exact: f64,
    /// Peers in a routing table, mean.
    pub known: f64,
}

/// Re-replication after a share of the peers failed at once.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The share of peers that failed.
    pub share: f64,
    /// Bytes copied to restore every group's replica count.
    pub bytes: u64,
    /// Those bytes over all stored bytes.
    pub of_stored: f64,
    /// The most bytes one live peer holds afterwards, over the live peers' mean.
    pub max_over_mean: f64,
}

/// A deterministic stream of numbers (SplitMix64): the same seed, the same peers and failures.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// How many ranked peers each group keeps: enough that after the largest simulated failure
/// (10%) some `replicas` of them are alive. The keeper ranks the live peers of the group's
/// neighbourhood, which is the placer's ranking with the dead left out (each peer's score
/// depends only on it and the key); in a real swarm the next closest peers would join the
/// neighbourhood in the dead ones' places and take a share of the copies.
const KEPT_RANKS: usize = 16;

/// Groups whose neighbourhoods are found by lookups through the routing tables, spread over
/// all groups; the others' are computed from every peer's position. A lookup through the
/// tables costs milliseconds of the simulator's time, and the looked-up groups show that
/// lookups find exactly those peers (the report's "exact").
const LOOKED_UP: usize = 4000;

/// Runs one simulation.
pub fn simulate(config: SimConfig) -> SimReport {
    let mut rng = Rng(config.seed);
    let peers: Vec<PeerId> = (0..config.peers)
        .map(|_| {
            let mut seed = [0u8; 32];
            for chunk in seed.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
            Keypair::ed25519_from_bytes(seed)
                .expect("32 bytes make a key")
                .public()
                .to_peer_id()
        })
        .collect();
    let index: HashMap<PeerId, usize> = peers.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let groups = (config.copies_per_peer * config.peers / config.replicas).max(config.tasks);
    let keys: Vec<Cid> = (0..groups as u64)
        .map(|g| *Block::raw(g.to_le_bytes().to_vec()).cid())
        .collect();

    // Placement: a placer (a peer drawn at random) looks a group's neighbourhood up through
    // the routing tables (every `every`-th group; the others' is computed) and ranks it.
    let mut dht = dht::Dht::settled(&peers, || rng.next());
    let started = Instant::now();
    let every = groups.div_ceil(LOOKED_UP);
    let (mut hops, mut messages) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
    let mut exact = 0usize;
    let ranks: Vec<Vec<usize>> = keys
        .iter()
        .enumerate()
        .map(|(g, key)| {
            let placer = (rng.next() % config.peers as u64) as usize;
            let mut hood: Vec<usize> = Vec::new();
            for at in keyspace_keys(key) {
                let want = NEIGHBOURHOOD.min(config.peers - 1);
                // The closest to this place but the placer, who never names itself.
                let truth: Vec<usize> = dht
                    .truly_closest(&at, want + 1)
                    .into_iter()
                    .filter(|&p| p != placer)
                    .take(want)
                    .collect();
                let found = if g % every == 0 {
                    let found = dht.lookup(placer, &at, want);
                    hops.push(found.hops);
                    messages.push(found.messages);
                    let mut expected = truth[..found.closest.len().min(truth.len())].to_vec();
                    let mut got = found.closest.clone();
                    expected.sort_unstable();
                    got.sort_unstable();
                    exact += usize::from(expected == got);
                    found.closest
                } else {
                    // Not a looked-up group: where a lookup would have led.
                    truth
                };
                for p in found {
                    if !hood.contains(&p) {
                        hood.push(p);
                    }
                }
            }
            // The placer is a peer too: it ranks itself among what it found.
            if !hood.contains(&placer) {
                hood.push(placer);
            }
            let hood: Vec<Placed> = hood.into_iter().map(|p| Placed::new(peers[p])).collect();
            placement(key, &hood)
                .into_iter()
                .take(KEPT_RANKS)
                .map(|p| index[&p])
                .collect()
        })
        .collect();
    // The routing tables' sizes, from the first 200 peers.
    let counted = config.peers.clamp(1, 200);
    let known = (0..counted).map(|p| dht.known(p)).sum::<usize>() as f64 / counted as f64;
    drop(dht);
    let lookups = Lookups {
        count: hops.len(),
        hops: (percentile(&mut hops, 0.5), percentile(&mut hops, 0.99)),
        messages: percentile(&mut messages, 0.5),
        exact: exact as f64 / hops.len().max(1) as f64,
        known,
    };
    // Groups placed one after another by one placer's book, as one add places them.
    let mut book = Book::new(HashMap::new());
    let mut held = vec![0u64; config.peers];
    let holders: Vec<Vec<usize>> = keys
        .iter()
        .zip(&ranks)
        .map(|(key, rank)| {
            let ranked = rank.iter().map(|&p| peers[p]).collect();
            let order = book.place(*key, ranked, config.replicas, GROUP_BYTES, true);
            let chosen: Vec<usize> = order[..config.replicas].iter().map(|p| index[p]).collect();
            for &p in &chosen {
                held[p] += GROUP_BYTES;
            }
            chosen
        })
        .collect();
    let placement_seconds = started.elapsed().as_secs_f64();
    let mean = held.iter().sum::<u64>() as f64 / config.peers as f64;
    let max_over_mean = *held.iter().max().unwrap_or(&0) as f64 / mean;

    // Failures: a share of the peers at once; every copy they held is made again where the
    // keeper places it.
    let stored = GROUP_BYTES * (groups * config.replicas) as u64;
    let moved = [0.01, 0.10]
        .into_iter()
        .map(|share| {
            let mut order: Vec<usize> = (0..config.peers).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let dead: HashSet<usize> = order[..(config.peers as f64 * share) as usize]
                .iter()
                .copied()
                .collect();
            // The keeper's book: the live peers' loads, then each lost copy on the least
            // loaded of the best-ranked live peers lacking it.
            let mut after = held.clone();
            let loads = (0..config.peers)
                .filter(|p| !dead.contains(p))
                .map(|p| (peers[p], held[p]))
                .collect();
            let mut keeper = Book::new(loads);
            let mut copies = 0usize;
            for ((key, rank), before) in keys.iter().zip(&ranks).zip(&holders) {
                let alive = before.iter().filter(|p| !dead.contains(p)).count();
                let missing = config.replicas - alive;
                if missing == 0 {
                    continue;
                }
                let lacking: Vec<PeerId> = rank
                    .iter()
                    .filter(|p| !dead.contains(p) && !before.contains(p))
                    .map(|&p| peers[p])
                    .collect();
                let order = keeper.place(*key, lacking, missing, GROUP_BYTES, true);
                for p in order.iter().take(missing) {
                    after[index[p]] += GROUP_BYTES;
                    copies += 1;
                }
            }
            let live: Vec<u64> = (0..config.peers)
                .filter(|p| !dead.contains(p))
                .map(|p| after[p])
                .collect();
            let mean = live.iter().sum::<u64>() as f64 / live.len().max(1) as f64;
            let bytes = copies as u64 * GROUP_BYTES;
            Restored {
                share,
                bytes,
                of_stored: bytes as f64 / stored as f64,
                max_over_mean: *live.iter().max().unwrap_or(&0) as f64 / mean,
            }
        })
        .collect();

    let (local_share, map_seconds, map_cuts, scheduler_seconds) = if config.tasks > 0 {
        let (local, map, cuts, wall) = map_phase(&config, &peers, &index, &holders[..config.tasks]);
        (Some(local), Some(map), Some(cuts), Some(wall))
    } else {
        (None, None, None, None)
    };
    SimReport {
        config,
        groups,
        max_over_mean,
        local_share,
        map_seconds,
        map_cuts,
        scheduler_seconds,
        moved,
        placement_seconds,
        lookups,
    }
}

/// The value below which a share `q` of `values` lies (sorts them).
fn percentile(values: &mut [u32], q: f64) -> u32 {
    values.sort_unstable();
    let at = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len().max(1)) - 1;
    values.get(at).copied().unwrap_or(0)
}

/// Virtual speeds: a map task reads its own blocks at `LOCAL`, fetches others' at `REMOTE`.
const LOCAL_BYTES_PER_SEC: f64 = 200e6;
const REMOTE_BYTES_PER_SEC: f64 = 50e6;
/// How often the virtual clock ticks while tasks wait (the coordinator's own tick).
const TICK: Duration = Duration::from_millis(100);

/// Leaf edges of a virtual task, which a cut may fall on: kubo's 256 KiB chunks.
const LEAF_BYTES: u64 = 1 << 18;

/// A virtual attempt: its task, when it started and ends, how fast it reads, whether on a
/// holder.
struct Running {
    t: usize,
    start: Duration,
    finish: Duration,
    speed: f64,
    local: bool,
}

/// Answers a scheduler's request to cut task `t` at virtual time `now`, as its worker would:
/// at the leaf edge nearest the middle of what the attempt has not read yet
/// ([`split_point`]), if each part keeps enough; the attempt then ends earlier. Returns the
/// rest's task number, and whether the attempt cut reads on a holder.
fn cut_virtual(
    state: &mut PhaseState<'_>,
    t: usize,
    now: Duration,
    at: Instant,
    tasks: &mut VirtualTasks,
    running: &mut HashMap<u64, Running>,
    finishing: &mut BTreeSet<(Duration, u64)>,
) -> Option<(usize, bool)> {
    state.cut_answered(t, at);
    let (&id, attempt) = running.iter_mut().find(|(_, a)| a.t == t)?;
    let bytes = tasks.bytes[t];
    let read = (((now - attempt.start).as_secs_f64() * attempt.speed) as u64).min(bytes);
    let edges: Vec<u64> = (1..bytes.div_ceil(LEAF_BYTES))
        .map(|k| k * LEAF_BYTES)
        .collect();
    let cut = split_point(read, bytes, &edges)?;
    finishing.remove(&(attempt.finish, id));
    attempt.finish = attempt.start + Duration::from_secs_f64(cut as f64 / attempt.speed);
    finishing.insert((attempt.finish, id));
    let local: Vec<(usize, u64)> = tasks.local[t]
        .iter()
        .map(|&(p, _)| (p, bytes - cut))
        .collect();
    let rest = Rest {
        kept: cut,
        bytes: bytes - cut,
        local: local.clone(),
    };
    let r = state.cut(t, cut, rest, at);
    tasks.bytes[t] = cut;
    for (_, held) in &mut tasks.local[t] {
        *held = cut;
    }
    tasks.bytes.push(bytes - cut);
    tasks.local.push(local);
    debug_assert_eq!(
        r + 1,
        tasks.bytes.len(),
        "the scheduler numbers tasks in order"
    );
    Some((r, attempt.local))
}

/// The virtual tasks' input bytes and holders (with the bytes each holds), cuts included.
struct VirtualTasks {
    bytes: Vec<u64>,
    local: Vec<Vec<(usize, u64)>>,
}

/// Runs a job's map phase (one task per group, held by `holders`) through the scheduler in
/// virtual time, answering its requests to cut tasks as workers do: the share of input read
/// locally, the phase's virtual seconds, the tasks cut, and the wall seconds the scheduler
/// took.
fn map_phase(
    config: &SimConfig,
    peers: &[PeerId],
    index: &HashMap<PeerId, usize>,
    holders: &[Vec<usize>],
) -> (f64, f64, usize, f64) {
    let tasks = holders.len();
    let local: Vec<Vec<(usize, u64)>> = holders
        .iter()
        .map(|group| {
            let mut holders: Vec<(usize, u64)> = group.iter().map(|&p| (p, GROUP_BYTES)).collect();
            holders.sort_unstable();
            holders
        })
        .collect();
    let bytes = vec![GROUP_BYTES; tasks];
    let slots = vec![config.slots; config.peers];
    let mut skips = Skips::new(0);
    let mut counters = Counters::default();
    let mut attempts = vec![0u32; tasks];
    let mut gone = HashSet::new();
    // The virtual clock's origin; the wall time since it is the scheduler's own.
    let t0 = Instant::now();
    let mut state = PhaseState::new(
        Schedule {
            kind: TaskKind::Map,
            peers,
            slots: &slots,
            machines: None,
            local: Some(local.clone()),
            bytes: bytes.clone(),
            tasks: (0..tasks).collect(),
            skips: &mut skips,
            verify: 1,
        },
        Tally {
            counters: &mut counters,
            attempts: &mut attempts,
            gone: &mut gone,
        },
        PeerId::random(),
        Duration::from_secs(3600),
        |_| true,
    );
    let mut tasks = VirtualTasks { bytes, local };
    // Attempts running, by virtual finish time.
    let mut finishing: BTreeSet<(Duration, u64)> = BTreeSet::new();
    let mut running: HashMap<u64, Running> = HashMap::new();
    let (mut read, mut read_local, mut cuts) = (0u64, 0u64, 0);
    let mut cut = false;
    let mut now = Duration::ZERO;
    state.assign(t0 + now);
    loop {
        for action in state.take_actions() {
            match action {
                Action::Start(start) => {
                    let p = index[&start.peer];
                    let bytes = tasks.bytes[start.task];
                    let here = held(&tasks.local, start.task, p);
                    read += bytes;
                    read_local += here;
                    let speed = if here > 0 {
                        LOCAL_BYTES_PER_SEC
                    } else {
                        REMOTE_BYTES_PER_SEC
                    };
                    let finish = now + Duration::from_secs_f64(bytes as f64 / speed);
                    finishing.insert((finish, start.id));
                    running.insert(
                        start.id,
                        Running {
                            t: start.task,
                            start: now,
                            finish,
                            speed,
                            local: here > 0,
                        },
                    );
                }
                Action::Cut { task, .. } => {
                    let (at, r) = (t0 + now, &mut running);
                    if let Some((rest, local)) =
                        cut_virtual(&mut state, task, now, at, &mut tasks, r, &mut finishing)
                    {
                        // The attempt no longer reads the rest; whoever runs it will.
                        read -= tasks.bytes[rest];
                        if local {
                            read_local -= tasks.bytes[rest];
                        }
                        cuts += 1;
                        cut = true;
                    }
                }
                _ => {}
            }
        }
        if state.is_done() {
            break;
        }
        // A rest is a pending task at once: the coordinator assigns again as soon as a cut's
        // answer comes, before its clock moves on.
        if std::mem::take(&mut cut) {
            state.assign(t0 + now);
            continue;
        }
        // The coordinator's loop wakes at its tick, or sooner when a cut may first be asked.
        let wake = state
            .next_wake()
            .map_or(now + TICK, |w| (w - t0).clamp(now, now + TICK));
        match finishing.first().copied() {
            Some((at, id)) if at <= wake => {
                finishing.remove(&(at, id));
                now = at;
                running.remove(&id);
                let done = Ok(JobResponse::MapDone(MapOutput {
                    parts: vec![],
                    counters: Counters::default(),
                    cut: None,
                }));
                if state.answered(id, done, t0 + now).is_err() {
                    break;
                }
            }
            _ => now = wake.max(now + Duration::from_millis(1)),
        }
        state.assign(t0 + now);
    }
    (
        read_local as f64 / read.max(1) as f64,
        now.as_secs_f64(),
        cuts,
        t0.elapsed().as_secs_f64(),
    )
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let l = &self.lookups;
        write!(
            f,
            "| {} | {} | {} | {:.0} | {} / {} | {} | {:.1}% | {:.2} | {:.1} s |",
            c.peers,
            c.copies_per_peer,
            self.groups,
            l.known,
            l.hops.0,
            l.hops.1,
            l.messages,
            100.0 * l.exact,
            self.max_over_mean,
            self.placement_seconds
        )?;
        match (
            self.local_share,
            self.map_seconds,
            self.map_cuts,
            self.scheduler_seconds,
        ) {
            (Some(l), Some(m), Some(cuts), Some(s)) => write!(
                f,
                " {} tasks: {:.1}% local, {:.2} s virtual, {} cut, {:.1} s to schedule |",
                c.tasks,
                100.0 * l,
                m,
                cuts,
                s
            )?,
            _ => write!(f, " not run |")?,
        }
        for r in &self.moved {
            write!(
                f,
                " {:.0}%: {:.1} GB ({:.2}% of stored), then {:.2} |",
                100.0 * r.share,
                r.bytes as f64 / 1e9,
                100.0 * r.of_stored,
                r.max_over_mean
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::wire::rank_peers;

    #[test]
    fn a_lone_task_is_cut_for_the_other_holders_free_slot() {
        // One group held by both of two peers of one slot each: one runs the task, the other
        // is idle, so the scheduler asks for a cut and the rest runs there at once.
        let config = SimConfig {
            peers: 2,
            replicas: 2,
            copies_per_peer: 1,
            tasks: 1,
            slots: 1,
            seed: 1,
        };
        let peers = vec![PeerId::random(), PeerId::random()];
        let index: HashMap<PeerId, usize> =
            peers.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let (local, seconds, cuts, _) = map_phase(&config, &peers, &index, &[vec![0, 1]]);
        assert_eq!(local, 1.0);
        assert!(cuts >= 1);
        // Uncut, the task alone would take GROUP_BYTES at the local speed.
        let whole = GROUP_BYTES as f64 / LOCAL_BYTES_PER_SEC;
        assert!(seconds < 0.6 * whole, "{seconds} s against {whole} s");
    }

    #[test]
    fn the_placement_rules_neighbourhood_is_the_closest_peers_in_kademlias_keyspace() {
        let mut rng = Rng(3);
        let peers: Vec<PeerId> = (0..300).map(|_| PeerId::random()).collect();
        let dht = dht::Dht::settled(&peers, || rng.next());
        let bytes: Vec<Vec<u8>> = peers.iter().map(|p| p.to_bytes()).collect();
        for g in 0..50u64 {
            let key = *Block::raw(g.to_le_bytes().to_vec()).cid();
            // What libp2p-kad's distances make closest to either of the key's places.
            let mut closest: Vec<&Vec<u8>> = keyspace_keys(&key)
                .iter()
                .flat_map(|at| dht.truly_closest(at, NEIGHBOURHOOD))
                .map(|p| &bytes[p])
                .collect();
            closest.sort();
            closest.dedup();
            let ranked = rank_peers(&key, &bytes);
            let mut hood = ranked[..closest.len()].to_vec();
            hood.sort();
            assert_eq!(hood, closest);
        }
    }

    #[test]
    fn a_small_swarm_places_evenly_runs_locally_and_moves_what_it_lost() {
        let report = simulate(SimConfig {
            peers: 50,
            replicas: 2,
            copies_per_peer: 40,
            tasks: 100,
            slots: 2,
            seed: 7,
        });
        assert_eq!(report.groups, 1000);
        // Lookups through the routing tables find exactly the closest peers, in a few hops.
        assert_eq!(report.lookups.count, 2000, "{report}");
        assert_eq!(report.lookups.exact, 1.0, "{report}");
        assert!(report.lookups.hops.1 <= 3, "{report}");
        assert!(report.max_over_mean <= 1.5, "{report}");
        assert!(report.local_share.unwrap() > 0.9, "{report}");
        // 1% of 50 peers is none; 10% is 5, whose copies (about a tenth) are made again.
        assert_eq!(report.moved[0].bytes, 0);
        let tenth = &report.moved[1];
        assert!((0.05..0.15).contains(&tenth.of_stored), "{report}");
        assert!(tenth.max_over_mean <= 1.5, "{report}");
    }
}
