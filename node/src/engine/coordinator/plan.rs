//! Planning a job, as pure functions the coordinator's `run` calls: how machines share their
//! slots, the split size (the one an earlier coordinator used, on takeover), map tasks cut on
//! leaf edges the content chooses, their memo keys, which finished work is reused, how many
//! copies the output gets, which daemon holds how much of each task, and which map outputs
//! are lost.

use libp2p::PeerId;
use p2pmr_protocol::engine::{Counters, FinishedTask, MapOutput, MAX_SPLIT_EDGES};
use p2pmr_protocol::job::{JobSpec, AUTO_SPLIT, AUTO_SPLIT_MAX, AUTO_SPLIT_MIN};
use p2pmr_protocol::memo::MapKey;
use p2pmr_protocol::unixfs::DirEntry;
use p2pmr_protocol::Cid;
use std::collections::{HashMap, HashSet};

/// The split size for this run of `spec`: on takeover, the one the job's earlier coordinator
/// planned with (`earlier`, reported by the workers with their finished map tasks), so task
/// numbers and ranges match and their outputs are reused; else the spec's, which for the
/// automatic split depends on the slots, and those may have changed since (a daemon died).
pub(super) fn split_for(
    spec: &JobSpec,
    earlier: Option<u64>,
    input_bytes: u64,
    slots: &[u32],
) -> u64 {
    match earlier {
        Some(split)
            if spec.split_size == AUTO_SPLIT
                && (AUTO_SPLIT_MIN..=AUTO_SPLIT_MAX).contains(&split) =>
        {
            split
        }
        _ => spec.split_for(input_bytes, slots.iter().map(|&n| u64::from(n)).sum()),
    }
}

/// A leaf of an input file: its CID, its size, and its placement group's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// The leaf.
    pub cid: Cid,
    /// Its file bytes.
    pub len: u64,
    /// Its placement group ([`p2pmr_protocol::unixfs::Groups`]).
    pub group: Cid,
}

/// The largest power of two at most `split`.
fn quantum(split: u64) -> u64 {
    1 << (63 - split.max(1).leading_zeros())
}

/// `split` rounded down to an eighth of its [`quantum`]: a split size that moves a little
/// (the input grew by a few blocks) then cuts the same tasks.
fn rounded(split: u64) -> u64 {
    split - split % (quantum(split) / 8).max(1)
}

/// A leaf's rank for choosing task ends: its CID's hash, as a number.
fn rank(leaf: &Cid) -> u64 {
    let digest = leaf.hash().digest();
    let mut first = [0u8; 8];
    let n = digest.len().min(8);
    first[..n].copy_from_slice(&digest[..n]);
    u64::from_be_bytes(first)
}

/// Which leaves may end a task: each with no lower rank among the leaves ending within
/// `reach` bytes of its end, before or after. Whether a leaf is one depends only on the
/// leaves around it, so an edit changes the ends within `reach` of it and no others. Two ends
/// are more than `reach` apart, about twice that on average, unless they are the same leaf:
/// copies of a block in repeated content (a run of zeros, a tiled file) do not hide each
/// other, as the first copy would hide the next ones wherever they are.
fn content_ends(leaves: &[Leaf], reach: u64) -> Vec<bool> {
    let ends: Vec<u64> = leaves
        .iter()
        .scan(0u64, |at, l| {
            *at += l.len;
            Some(*at)
        })
        .collect();
    let ranks: Vec<u64> = leaves.iter().map(|l| rank(&l.cid)).collect();
    (0..leaves.len())
        .map(|k| {
            let lower = |j: usize| ranks[j] < ranks[k];
            // Most leaves meet a lower one within a few steps.
            let before = (0..k)
                .rev()
                .take_while(|&j| ends[k] - ends[j] <= reach)
                .any(lower);
            !before
                && !(k + 1..leaves.len())
                    .take_while(|&j| ends[j] - ends[k] <= reach)
                    .any(lower)
        })
        .collect()
}

/// Map tasks over `inputs` (each input's leaves, in order), cut on leaf edges chosen by the
/// leaves' content, so that an edit of a file changes the tasks around it and not the
/// others (their outputs are then reused from the workers' memo):
///
/// - a task at least half a split long ends after a leaf of [`content_ends`] with a reach
///   of half the split (rounded, [`rounded`]): tasks are the split long on average, from
///   half of it to twice;
/// - it ends anyway at twice the split, and never leaves less than half a split to the end
///   of its input (the last task takes it);
/// - it also ends where a placement group begins that no daemon holding all of the task's
///   leaves so far holds (by `holdings`, the leaves each daemon holds): a task is then
///   readable whole from at least one daemon. Files placed by group (leaves in a group share
///   holders) are cut only at group edges, and only where the holders change; lone leaves
///   (files placed block by block) are never cut for this;
/// - it passes a content end by when such a holders' cut comes within half a split after it
///   (and the task stays under twice the split): the task ends there instead, rather than
///   leave a short task between the two ends.
pub(super) fn cut_maps(
    inputs: Vec<Vec<Leaf>>,
    split: u64,
    holdings: &[HashSet<Cid>],
) -> Vec<PlannedMap> {
    let holders = |cid: &Cid| -> Vec<usize> {
        (0..holdings.len())
            .filter(|&d| holdings[d].contains(cid))
            .collect()
    };
    let split = rounded(split);
    let mut maps = Vec::new();
    for (i, leaves) in inputs.into_iter().enumerate() {
        let ends = content_ends(&leaves, split / 2);
        let total: u64 = leaves.iter().map(|l| l.len).sum();
        let mut offset = 0;
        let mut current: Option<PlannedMap> = None;
        // Daemons holding every leaf of the current task.
        let mut common: Vec<usize> = Vec::new();
        for (k, leaf) in leaves.iter().enumerate() {
            let held = holders(&leaf.cid);
            if current.is_some() && holders_cut(&leaves, k, &common, &held) {
                maps.extend(current.take());
            }
            if current.is_none() {
                common = held;
            } else {
                common.retain(|d| held.contains(d));
            }
            let task = current.get_or_insert_with(|| PlannedMap {
                input: i as u32,
                start: offset,
                end: offset,
                leaves: Vec::new(),
            });
            task.leaves.push((leaf.cid, leaf.len));
            task.end += leaf.len;
            offset += leaf.len;
            let len = task.end - task.start;
            // Ends closer than half a split are copies of one leaf, or follow a forced or a
            // holders' cut. A content end is passed over when the holders would cut the task
            // again within half a split anyway: ending there instead saves a short task.
            let content = ends[k]
                && len >= split / 2
                && len > 0
                && !holders_cut_ahead(
                    &leaves,
                    k,
                    &common,
                    split / 2,
                    (2 * split).saturating_sub(len),
                    &holders,
                );
            if (content || len >= 2 * split) && total - offset >= split / 2 {
                maps.extend(current.take());
            }
        }
        maps.extend(current.take());
    }
    maps
}

/// Whether leaf `k` starts a placement group that none of `common` (the daemons holding all of
/// the task so far) holds, by `held`, its holders: the task must then end before it. Lone
/// leaves never cut, nor does a task no daemon holds whole anyway.
fn holders_cut(leaves: &[Leaf], k: usize, common: &[usize], held: &[usize]) -> bool {
    let starts_group = leaves
        .get(k + 1)
        .is_some_and(|n| n.group == leaves[k].group)
        && (k == 0 || leaves[k - 1].group != leaves[k].group);
    starts_group && !common.is_empty() && !common.iter().any(|d| held.contains(d))
}

/// Whether a task held whole by `common` that went on past leaf `k` would meet a
/// [`holders_cut`] within `reach` bytes, and `room` bytes at most.
fn holders_cut_ahead(
    leaves: &[Leaf],
    k: usize,
    common: &[usize],
    reach: u64,
    room: u64,
    holders: &impl Fn(&Cid) -> Vec<usize>,
) -> bool {
    let mut common = common.to_vec();
    let mut ahead = 0;
    for j in k + 1..leaves.len() {
        let held = holders(&leaves[j].cid);
        if holders_cut(leaves, j, &common, &held) {
            return true;
        }
        common.retain(|d| held.contains(d));
        ahead += leaves[j].len;
        if ahead > reach.min(room) {
            return false;
        }
    }
    false
}

/// What to ask the workers' memo for, for one map task ([`p2pmr_protocol::memo`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MapLookup {
    /// The task's key.
    pub(super) key: Cid,
    /// The leaves after its range (a remembered output must have read a prefix of these).
    pub(super) next: Vec<Cid>,
}

/// Leaves past a task's end a remembered output may have read to finish its last record.
const NEXT_LEAVES: usize = 64;

/// The memo key of each map task in `maps`, planned over `inputs` for `spec`: the leaves a
/// worker reads for it are the one before its range (if any) and its own, as it reads from
/// the byte before its start.
pub(super) fn map_lookups(
    spec: &JobSpec,
    inputs: &[Vec<Leaf>],
    maps: &[PlannedMap],
) -> Vec<MapLookup> {
    let args = spec.encoded_args();
    // Empty leaves give a reader no bytes: it never sees them.
    let inputs: Vec<Vec<&Leaf>> = inputs
        .iter()
        .map(|leaves| leaves.iter().filter(|l| l.len > 0).collect())
        .collect();
    let starts: Vec<Vec<u64>> = inputs
        .iter()
        .map(|leaves| {
            leaves
                .iter()
                .scan(0, |at, l| {
                    let start = *at;
                    *at += l.len;
                    Some(start)
                })
                .collect()
        })
        .collect();
    maps.iter()
        .map(|m| {
            let leaves = &inputs[m.input as usize];
            let starts = &starts[m.input as usize];
            let first = starts.partition_point(|&s| s < m.start);
            let last = starts.partition_point(|&s| s < m.end);
            let from = if m.start > 0 {
                first.saturating_sub(1)
            } else {
                first
            };
            let read: Vec<Cid> = leaves[from..last].iter().map(|l| l.cid).collect();
            MapLookup {
                key: MapKey {
                    module: spec.module,
                    args: &args,
                    reducers: spec.reducers,
                    first: m.start == 0,
                    leaves: &read,
                }
                .key(),
                next: leaves[last..]
                    .iter()
                    .take(NEXT_LEAVES)
                    .map(|l| l.cid)
                    .collect(),
            }
        })
        .collect()
}

/// Copies of the output: as many as the least-copied input leaf has among `holdings` (the
/// leaves each daemon holds), at least one, at most one per worker.
pub(super) fn output_replicas(leaves: &[Cid], holdings: &[HashSet<Cid>], workers: usize) -> usize {
    leaves
        .iter()
        .map(|c| holdings.iter().filter(|h| h.contains(c)).count())
        .min()
        .unwrap_or(1)
        .clamp(1, workers.max(1))
}

/// The daemons holding bytes of each task, with how many: `[task]` lists `(daemon, bytes)`
/// for the daemons holding any, in daemon order.
pub(super) fn locality(maps: &[PlannedMap], holdings: &[HashSet<Cid>]) -> Vec<Vec<(usize, u64)>> {
    maps.iter()
        .map(|m| {
            holdings
                .iter()
                .enumerate()
                .map(|(d, h)| {
                    let held = m
                        .leaves
                        .iter()
                        .filter(|(c, _)| h.contains(c))
                        .map(|(_, len)| len)
                        .sum();
                    (d, held)
                })
                .filter(|&(_, held)| held > 0)
                .collect()
        })
        .collect()
}

/// Map outputs that are lost because their holder is gone (the MapReduce paper's rule: a map
/// output lives only on its mapper): held by a daemon other than `me` that is not `up`.
pub(super) fn lost_outputs(
    outputs: &[Option<(MapOutput, PeerId)>],
    me: PeerId,
    up: impl Fn(&PeerId) -> bool,
) -> Vec<usize> {
    outputs
        .iter()
        .enumerate()
        .filter_map(|(t, o)| match o {
            Some((_, peer)) if *peer != me && !up(peer) => Some(t),
            _ => None,
        })
        .collect()
}

/// The map tasks whose outputs include one of the `missing` runs (a reducer could not fetch
/// them).
pub(super) fn with_missing_runs(
    outputs: &[Option<(MapOutput, PeerId)>],
    missing: &HashSet<Cid>,
) -> Vec<usize> {
    outputs
        .iter()
        .enumerate()
        .filter_map(|(t, o)| {
            let (out, _) = o.as_ref()?;
            out.parts
                .iter()
                .flatten()
                .any(|p| missing.contains(&p.cid))
                .then_some(t)
        })
        .collect()
}

/// The machines the daemons run on (those reporting the same `hosts` entry, not 0, share
/// one; any other is a machine of its own) and the task slots of each: as many as the most
/// any of its daemons offers. Returns each daemon's machine and each machine's slots.
/// Daemons given `--slots` report no host: they run that many tasks whatever else runs on
/// their machine.
///
/// Slots default to the cores, so two daemons on one 2-core machine offered four and would
/// run four map tasks on two cores, each with its own multi-megabyte count table (measurably
/// slower: BENCHMARKS.md, "What moved the job rows"). Splitting a machine's slots among its
/// daemons instead tied each slot to one daemon: with placement groups a daemon holds whole
/// splits, and one whose own slot was taken while a neighbour's stood idle read its next
/// split over the network. So the scheduler caps tasks per machine and lets any of its
/// daemons take them.
pub(super) fn machines(slots: &[u32], hosts: &[u64]) -> (Vec<usize>, Vec<u32>) {
    let mut index: HashMap<u64, usize> = HashMap::new();
    let (mut of, mut machine_slots) = (Vec::with_capacity(slots.len()), Vec::new());
    for (&n, &host) in slots.iter().zip(hosts) {
        let m = if n > 0 && host != 0 {
            *index.entry(host).or_insert_with(|| {
                machine_slots.push(0);
                machine_slots.len() - 1
            })
        } else {
            machine_slots.push(0);
            machine_slots.len() - 1
        };
        machine_slots[m] = machine_slots[m].max(n);
        of.push(m);
    }
    (of, machine_slots)
}

/// Takes the outputs of `finished` tasks (from [`Coordinator::finished`]) that match this
/// plan: map tasks planned with the same `split` over the same range, reduce tasks of a
/// partition not yet done. Returns how many map and reduce tasks it took.
pub(super) fn reuse(
    finished: Vec<(PeerId, FinishedTask)>,
    verify: usize,
    maps: &[PlannedMap],
    split: u64,
    outputs: &mut [Option<(MapOutput, PeerId)>],
    entries: &mut [Option<DirEntry>],
    counters: &mut Counters,
) -> (u32, u32) {
    let (mut reused_maps, mut reused_reduces) = (0, 0);
    let finished = if verify > 1 {
        verified(finished, verify)
    } else {
        finished
    };
    for (peer, task) in finished {
        match task {
            FinishedTask::Map {
                task,
                input,
                start,
                end,
                split: planned,
                output,
            } => {
                let t = task as usize;
                let same_range = planned == split
                    && maps
                        .get(t)
                        .is_some_and(|m| (m.input, m.start, m.end) == (input, start, end));
                if same_range && output.parts.len() == entries.len() && outputs[t].is_none() {
                    outputs[t] = Some((output, peer));
                    reused_maps += 1;
                }
            }
            FinishedTask::Reduce { partition, output } => {
                if let Some(entry @ None) = entries.get_mut(partition as usize) {
                    counters.add(&output.counters);
                    *entry = Some(DirEntry {
                        name: format!("part-{partition:05}"),
                        cid: output.cid,
                        tsize: output.tsize,
                    });
                    reused_reduces += 1;
                }
            }
        }
    }
    (reused_maps, reused_reduces)
}

/// Of the tasks workers finished for a verified job, those a majority of `verify` distinct
/// workers report the same output for (as the job would have accepted them), one report each.
fn verified(finished: Vec<(PeerId, FinishedTask)>, verify: usize) -> Vec<(PeerId, FinishedTask)> {
    // A report without its worker's peer id and counters: what must agree.
    let key = |task: &FinishedTask| -> FinishedTask {
        let mut task = task.clone();
        match &mut task {
            FinishedTask::Map { output, .. } => output.counters = Counters::default(),
            FinishedTask::Reduce { output, .. } => output.counters = Counters::default(),
        }
        task
    };
    let keys: Vec<FinishedTask> = finished.iter().map(|(_, t)| key(t)).collect();
    let mut out: Vec<(PeerId, FinishedTask)> = Vec::new();
    for (i, (peer, task)) in finished.iter().enumerate() {
        let k = &keys[i];
        if keys[..i].contains(k) {
            continue; // counted with the first report of the same output
        }
        let agreeing: HashSet<&PeerId> = finished
            .iter()
            .zip(&keys)
            .filter(|(_, other)| *other == k)
            .map(|((p, _), _)| p)
            .collect();
        if agreeing.len() > verify / 2 {
            out.push((*peer, task.clone()));
        }
    }
    out
}

/// One map task as planned: a byte range of one input, cut on leaf edges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PlannedMap {
    pub(super) input: u32,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) leaves: Vec<(Cid, u64)>,
}

/// The leaf edges strictly inside map task `m`, where it may be cut in two while it runs: at
/// most [`MAX_SPLIT_EDGES`], evenly thinned out for a task of more leaves.
pub(super) fn cut_edges(m: &PlannedMap) -> Vec<u64> {
    let edges: Vec<u64> = m
        .leaves
        .iter()
        .scan(m.start, |at, &(_, len)| {
            *at += len;
            Some(*at)
        })
        .filter(|&at| m.start < at && at < m.end)
        .collect();
    let step = edges.len().div_ceil(MAX_SPLIT_EDGES).max(1);
    let mut thinned: Vec<u64> = edges.into_iter().step_by(step).collect();
    thinned.dedup();
    thinned
}

/// Cuts map task `m` at input offset `at`: it keeps its leaves before `at`, and the rest,
/// returned, takes those from `at` on. `None` (and `m` unchanged) unless `at` is a leaf edge
/// strictly inside it.
pub(super) fn cut_map(m: &mut PlannedMap, at: u64) -> Option<PlannedMap> {
    let mut offset = m.start;
    let k = m.leaves.iter().position(|&(_, len)| {
        let edge = offset == at;
        offset += len;
        edge
    })?;
    if at <= m.start || at >= m.end {
        return None;
    }
    let rest = PlannedMap {
        input: m.input,
        start: at,
        end: m.end,
        leaves: m.leaves.split_off(k),
    };
    m.end = at;
    Some(rest)
}

/// The daemons holding bytes of the two parts of a task cut in two, from those holding bytes
/// of the whole (`holders`, as [`locality`] gives them), keeping `kept` and giving `rest`
/// bytes: a daemon is taken to hold as much of each part as it can, which is exact for the
/// daemons holding all of the task (files placed by group).
pub(super) fn cut_locality(
    holders: &mut [(usize, u64)],
    kept: u64,
    rest: u64,
) -> Vec<(usize, u64)> {
    let rest_holders = holders
        .iter()
        .map(|&(d, held)| (d, held.min(rest)))
        .collect();
    for (_, held) in holders.iter_mut() {
        *held = (*held).min(kept);
    }
    rest_holders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_is_cut_only_on_its_inner_leaf_edges() {
        let task = || PlannedMap {
            input: 1,
            start: 100,
            end: 160,
            leaves: vec![(leaf(1), 10), (leaf(2), 0), (leaf(3), 20), (leaf(4), 30)],
        };
        assert_eq!(cut_edges(&task()), vec![110, 130]);
        for at in [0, 100, 105, 129, 160, 170] {
            let mut m = task();
            assert_eq!(cut_map(&mut m, at), None, "{at}");
            assert_eq!(m, task());
        }
        let mut m = task();
        let rest = cut_map(&mut m, 130).unwrap();
        assert_eq!((m.start, m.end, m.leaves.len()), (100, 130, 3));
        assert_eq!((rest.input, rest.start, rest.end), (1, 130, 160));
        assert_eq!(rest.leaves, vec![(leaf(4), 30)]);
        // An empty leaf at the edge goes with the rest (readers never see it anyway).
        let mut m = task();
        let rest = cut_map(&mut m, 110).unwrap();
        assert_eq!(m.leaves, vec![(leaf(1), 10)]);
        assert_eq!(rest.leaves.len(), 3);
        assert_eq!(rest.leaves[0], (leaf(2), 0));
        // Thinned out to the most a request carries.
        let many = PlannedMap {
            input: 0,
            start: 0,
            end: 3000,
            leaves: vec![(leaf(5), 1); 3000],
        };
        let edges = cut_edges(&many);
        assert!(edges.len() <= MAX_SPLIT_EDGES && edges.len() > MAX_SPLIT_EDGES / 2);
        assert!(edges.is_sorted() && edges[0] == 1);
        let mut holders = vec![(0, 60), (2, 50), (3, 5)];
        let rest = cut_locality(&mut holders, 30, 30);
        assert_eq!(holders, vec![(0, 30), (2, 30), (3, 5)]);
        assert_eq!(rest, vec![(0, 30), (2, 30), (3, 5)]);
    }

    /// Leaves each of its own placement group.
    fn own_groups(inputs: Vec<Vec<(Cid, u64)>>) -> Vec<Vec<Leaf>> {
        inputs
            .into_iter()
            .map(|leaves| {
                leaves
                    .into_iter()
                    .map(|(cid, len)| Leaf {
                        cid,
                        len,
                        group: cid,
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn tasks_end_where_no_daemon_holds_the_next_group_with_the_rest() {
        // Three groups of 3 leaves of 4 bytes (keyed by their first leaf) on daemons {0, 1},
        // {1, 2} and {2, 0}, then two lone leaves on daemons 3 and 0.
        let leaves: Vec<Leaf> = (0..11u8)
            .map(|i| Leaf {
                cid: leaf(i),
                len: 4,
                group: leaf(if i < 9 { i / 3 * 3 } else { i }),
            })
            .collect();
        let on = |daemons: &[usize], d: usize| daemons.contains(&d);
        let holdings: Vec<HashSet<Cid>> = (0..4)
            .map(|d| {
                (0..11u8)
                    .filter(|&i| match i {
                        0..=2 => on(&[0, 1], d),
                        3..=5 => on(&[1, 2], d),
                        6..=8 => on(&[2, 0], d),
                        9 => d == 3,
                        _ => d == 0,
                    })
                    .map(leaf)
                    .collect()
            })
            .collect();
        // The first two groups share daemon 1; the third is on neither of theirs. Lone leaves
        // are never cut apart for locality. (The split is too large for content to cut.)
        let got: Vec<(u64, u64)> = cut_maps(vec![leaves.clone()], 100, &holdings)
            .iter()
            .map(|m| (m.start, m.end))
            .collect();
        assert_eq!(got, vec![(0, 24), (24, 44)]);
        // Without holdings (nobody answered), the split alone cuts.
        let got = cut_maps(vec![leaves.clone()], 100, &[]);
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn no_short_task_is_left_between_a_content_end_and_a_holders_cut() {
        // Groups of 40 to 200 leaves (5 to 100 MiB), each on 2 of 4 daemons, as on a small
        // cluster; a split of 64 MiB.
        let split: u64 = 64 << 20;
        let mut short_tasks = 0;
        for seed in 0..40u64 {
            let mut leaves = random_leaves(2000, seed);
            let mut x = seed ^ 0x9e37_79b9;
            let mut next = || {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                x >> 33
            };
            let mut holdings: Vec<HashSet<Cid>> = vec![HashSet::new(); 4];
            let mut k = 0;
            while k < leaves.len() {
                let n = (40 + next() % 160) as usize;
                let a = (next() % 4) as usize;
                let b = (a + 1 + (next() % 3) as usize) % 4;
                let group = leaves[k].cid;
                for leaf in leaves.iter_mut().skip(k).take(n) {
                    leaf.group = group;
                    holdings[a].insert(leaf.cid);
                    holdings[b].insert(leaf.cid);
                }
                k += n;
            }
            let maps = cut_maps(vec![leaves], split, &holdings);
            let whole = |ms: &[PlannedMap]| {
                holdings.iter().any(|h| {
                    ms.iter()
                        .all(|m| m.leaves.iter().all(|(c, _)| h.contains(c)))
                })
            };
            assert!(maps.iter().all(|m| whole(std::slice::from_ref(m))));
            for pair in maps[..maps.len() - 1].windows(2) {
                let (a, b) = (pair[0].end - pair[0].start, pair[1].end - pair[1].start);
                if b < split / 2 {
                    short_tasks += 1;
                    // Had a daemon held both, they would have been one task.
                    assert!(a + b > 2 * split || !whole(pair), "seed {seed}: {a} + {b}");
                }
            }
        }
        // Short tasks remain where holders change twice within half a split.
        assert!(short_tasks > 0);
    }

    /// `n` leaves of 128 to 512 KiB (as buzhash cuts them), each with its own CID.
    fn random_leaves(n: usize, seed: u64) -> Vec<Leaf> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let cid = *p2pmr_protocol::Block::raw(x.to_le_bytes().to_vec()).cid();
                let len = (128 << 10) + (x >> 33) % (384 << 10);
                Leaf {
                    cid,
                    len,
                    group: cid,
                }
            })
            .collect()
    }

    /// Tasks of `after` whose leaves no task of `before` has.
    fn new_tasks(before: &[PlannedMap], after: &[PlannedMap]) -> usize {
        after
            .iter()
            .filter(|m| !before.iter().any(|b| b.leaves == m.leaves))
            .count()
    }

    #[test]
    fn repeated_content_still_makes_tasks_of_about_the_split() {
        let split: u64 = 32 << 20;
        // A run of one leaf (zeros), and a tiled file whose period (100 leaves, ~32 MiB) is
        // under the reach of a half split... and one over it.
        let zeros = vec![random_leaves(1, 7)[0]; 2000];
        let tile = random_leaves(100, 8);
        let small_tile: Vec<Leaf> = random_leaves(20, 9)
            .into_iter()
            .cycle()
            .take(4000)
            .collect();
        let tiled: Vec<Leaf> = tile.iter().cycle().take(4000).copied().collect();
        for (what, leaves) in [
            ("zeros", zeros),
            ("tiled", tiled),
            ("small tiles", small_tile),
        ] {
            let maps = cut_maps(vec![leaves], split, &[]);
            for m in &maps[..maps.len() - 1] {
                let len = m.end - m.start;
                assert!(
                    (split / 2..=2 * split + (512 << 10)).contains(&len),
                    "{what}: {len}"
                );
            }
        }
    }

    #[test]
    fn an_edit_changes_the_tasks_around_it_and_no_others() {
        let split = 32 << 20;
        for seed in 1..=20 {
            let leaves = random_leaves(4000, seed);
            let before = cut_maps(vec![leaves.clone()], split, &[]);
            let total: u64 = leaves.iter().map(|l| l.len).sum();
            // Lengths: from half the split to twice, the last one aside; about the split on
            // average.
            for m in &before[..before.len() - 1] {
                let len = m.end - m.start;
                assert!(
                    (split / 2..=2 * split + (512 << 10)).contains(&len),
                    "{len}"
                );
            }
            let mean = total / before.len() as u64;
            assert!(
                mean > split * 17 / 20 && mean < split * 5 / 4,
                "seed {seed}: mean {mean}"
            );
            // An insertion (a new leaf, and the one it landed in changed) in the middle.
            let mut edited = leaves.clone();
            let mid = leaves.len() / 2;
            edited[mid] = random_leaves(1, 1000 + seed)[0];
            edited.insert(mid, random_leaves(1, 2000 + seed)[0]);
            let after = cut_maps(vec![edited], split, &[]);
            assert!(new_tasks(&before, &after) <= 2, "seed {seed}: insertion");
            // An append of a few leaves, with the split a little larger (the input grew).
            let mut grown = leaves.clone();
            grown.extend(random_leaves(4, 3000 + seed));
            let after = cut_maps(vec![grown], split + (1 << 20) / 8, &[]);
            assert!(new_tasks(&before, &after) <= 2, "seed {seed}: append");
        }
    }

    #[test]
    fn daemons_on_one_machine_share_its_slots() {
        // (slots offered, hosts) → (machine of each daemon, slots of each machine). Host 0 is
        // unknown: never grouped; 0 slots is a daemon that did not answer: never given any.
        type Case = (Vec<u32>, Vec<u64>, Vec<usize>, Vec<u32>);
        let cases: Vec<Case> = vec![
            (vec![], vec![], vec![], vec![]),
            (vec![2], vec![7], vec![0], vec![2]),
            (vec![2, 2], vec![7, 8], vec![0, 1], vec![2, 2]),
            (vec![2, 2], vec![7, 7], vec![0, 0], vec![2]),
            (vec![2, 2], vec![0, 0], vec![0, 1], vec![2, 2]),
            (vec![2; 4], vec![7; 4], vec![0; 4], vec![2]),
            (vec![1, 4], vec![7, 7], vec![0, 0], vec![4]),
            (vec![2, 0, 2], vec![7; 3], vec![0, 1, 0], vec![2, 0]),
            (vec![4, 4, 2], vec![7, 7, 8], vec![0, 0, 1], vec![4, 2]),
        ];
        for (offered, hosts, of, slots) in cases {
            assert_eq!(
                machines(&offered, &hosts),
                (of, slots),
                "{offered:?} on {hosts:?}"
            );
        }
    }

    fn leaf(n: u8) -> Cid {
        *p2pmr_protocol::Block::raw(vec![n]).cid()
    }

    fn output(runs: &[Cid]) -> MapOutput {
        MapOutput {
            parts: runs
                .iter()
                .map(|&cid| Some(p2pmr_protocol::engine::PartOut { cid, bytes: 1 }))
                .collect(),
            counters: Counters::default(),
            cut: None,
        }
    }

    #[test]
    fn map_tasks_tile_each_input_on_leaf_edges() {
        // (leaf sizes per input, split): every task is a run of whole leaves of one input,
        // the tasks of an input follow each other from 0 to its end, no task is empty, and
        // none is left less than half a split at the end of its input.
        let cases: Vec<(Vec<Vec<u64>>, u64)> = vec![
            (vec![vec![]], 10),
            (vec![vec![4, 4, 4]], 8),
            (vec![vec![4, 4, 4]], 5),
            (vec![vec![4, 4, 4]], 100),
            (vec![vec![10], vec![3, 3]], 4),
            (vec![vec![0, 5]], 1),
            (vec![vec![1; 100], vec![7; 30]], 16),
            (vec![(1..200).collect()], 64),
        ];
        for (sizes, split) in cases {
            let inputs: Vec<Vec<Leaf>> = sizes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.iter()
                        .enumerate()
                        .map(|(k, &n)| {
                            let cid = *p2pmr_protocol::Block::raw(vec![i as u8, k as u8]).cid();
                            Leaf {
                                cid,
                                len: n,
                                group: cid,
                            }
                        })
                        .collect()
                })
                .collect();
            let maps = cut_maps(inputs.clone(), split, &[]);
            for (i, leaves) in inputs.iter().enumerate() {
                let total: u64 = leaves.iter().map(|l| l.len).sum();
                let tasks: Vec<&PlannedMap> = maps.iter().filter(|m| m.input == i as u32).collect();
                let mut at = 0;
                let mut next = 0;
                for (n, m) in tasks.iter().enumerate() {
                    assert_eq!(m.start, at, "{sizes:?} split {split}");
                    assert!(m.end > m.start || total == 0);
                    let own: Vec<(Cid, u64)> = leaves[next..next + m.leaves.len()]
                        .iter()
                        .map(|l| (l.cid, l.len))
                        .collect();
                    assert_eq!(m.leaves, own);
                    next += m.leaves.len();
                    at = m.end;
                    if n + 1 < tasks.len() {
                        assert!(
                            total - m.end >= rounded(split) / 2,
                            "{sizes:?} split {split}"
                        );
                    }
                }
                assert_eq!((at, next), (total, leaves.len()), "{sizes:?} split {split}");
            }
            if split >= 100 {
                assert_eq!(maps.len(), 1, "one task when the split holds the input");
            }
        }
    }

    #[test]
    fn a_coordinator_taking_over_plans_with_the_split_its_workers_report() {
        let spec = |split| {
            let input = p2pmr_protocol::job::JobInput {
                name: "in".into(),
                cid: leaf(1),
            };
            JobSpec::new(leaf(0), vec![input], 1, Vec::new())
                .unwrap()
                .with_split_size(split)
        };
        let (bytes, slots) = (1 << 30, [2, 2]);
        let own = spec(AUTO_SPLIT).split_for(bytes, 4);
        assert_ne!(own, 32 << 20);
        // The earlier split wins, whatever the slots are now.
        assert_eq!(
            split_for(&spec(AUTO_SPLIT), Some(32 << 20), bytes, &slots),
            32 << 20
        );
        assert_eq!(split_for(&spec(AUTO_SPLIT), None, bytes, &slots), own);
        // A fixed split is the spec's; a reported split outside the automatic range is not
        // trusted.
        assert_eq!(
            split_for(&spec(8 << 20), Some(32 << 20), bytes, &slots),
            8 << 20
        );
        assert_eq!(split_for(&spec(AUTO_SPLIT), Some(1), bytes, &slots), own);
    }

    #[test]
    fn finished_work_is_reused_only_where_it_matches_the_plan() {
        let maps = cut_maps(own_groups(vec![vec![(leaf(0), 4), (leaf(1), 4)]]), 4, &[]);
        let (me, other) = (PeerId::random(), PeerId::random());
        let map = |task, start, end, split| FinishedTask::Map {
            task,
            input: 0,
            start,
            end,
            split,
            output: output(&[leaf(9)]),
        };
        let finished = vec![
            (me, map(0, 0, 4, 4)),    // matches
            (other, map(1, 4, 8, 8)), // planned with another split
            (other, map(1, 0, 4, 4)), // another range
        ];
        let mut outputs = vec![None, None];
        let mut entries = vec![None];
        let mut counters = Counters::default();
        let reused = reuse(
            finished,
            1,
            &maps,
            4,
            &mut outputs,
            &mut entries,
            &mut counters,
        );
        assert_eq!(reused, (1, 0));
        assert_eq!(outputs[0].as_ref().map(|(_, p)| *p), Some(me));
        assert!(outputs[1].is_none());
    }

    #[test]
    fn a_verified_job_reuses_only_outputs_a_majority_reported() {
        let maps = cut_maps(
            own_groups(vec![vec![(leaf(0), 4), (leaf(1), 4), (leaf(2), 4)]]),
            4,
            &[],
        );
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let map = |task, start, made: Cid, records| {
            let mut out = output(&[made]);
            out.counters.input_records = records; // counters may differ: not compared
            FinishedTask::Map {
                task,
                input: 0,
                start,
                end: start + 4,
                split: 4,
                output: out,
            }
        };
        let finished = vec![
            (a, map(0, 0, leaf(9), 1)), // task 0: a and b agree
            (b, map(0, 0, leaf(9), 2)),
            (a, map(1, 4, leaf(8), 1)), // task 1: a and c disagree
            (c, map(1, 4, leaf(7), 1)),
            (b, map(2, 8, leaf(6), 1)), // task 2: b alone
        ];
        let run = |verify| {
            let mut outputs = vec![None, None, None];
            let reused = reuse(
                finished.clone(),
                verify,
                &maps,
                4,
                &mut outputs,
                &mut [None],
                &mut Counters::default(),
            );
            (
                reused,
                outputs.iter().map(Option::is_some).collect::<Vec<_>>(),
            )
        };
        assert_eq!(run(2), ((1, 0), vec![true, false, false]));
        assert_eq!(run(3), ((1, 0), vec![true, false, false]));
        assert_eq!(run(4), ((0, 0), vec![false, false, false]));
        assert_eq!(run(1), ((3, 0), vec![true, true, true]));
    }

    #[test]
    fn map_outputs_on_daemons_that_left_are_lost_and_those_reducers_missed_rerun() {
        let (me, up, gone) = (PeerId::random(), PeerId::random(), PeerId::random());
        let outputs = vec![
            Some((output(&[leaf(1)]), me)),
            Some((output(&[leaf(2)]), up)),
            Some((output(&[leaf(3)]), gone)),
            None,
        ];
        // The coordinator's own worker is never lost to it.
        assert_eq!(lost_outputs(&outputs, me, |p| *p == up), vec![2]);
        let missing: HashSet<Cid> = [leaf(2)].into();
        assert_eq!(with_missing_runs(&outputs, &missing), vec![1]);
    }

    #[test]
    fn outputs_get_the_inputs_fewest_copies_and_locality_counts_held_bytes() {
        let (a, b) = (leaf(1), leaf(2));
        let holdings: Vec<HashSet<Cid>> = vec![[a, b].into(), [a].into(), HashSet::new()];
        assert_eq!(output_replicas(&[a, b], &holdings, 3), 1);
        assert_eq!(output_replicas(&[a], &holdings, 3), 2);
        assert_eq!(output_replicas(&[a], &holdings, 1), 1);
        assert_eq!(output_replicas(&[], &holdings, 3), 1);
        let maps = cut_maps(own_groups(vec![vec![(a, 5), (b, 7)]]), 100, &[]);
        assert_eq!(locality(&maps, &holdings), vec![vec![(0, 12), (1, 5)]]);
    }
}
