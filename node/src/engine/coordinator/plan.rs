//! Planning a job, as pure functions the coordinator's `run` calls: how machines share their
//! slots, the split size (the one an earlier coordinator used, on takeover), map tasks cut on
//! leaf edges, which finished work is reused, how many copies the output gets, which daemon
//! holds how much of each task, and which map outputs are lost.

use libp2p::PeerId;
use p2pmr_protocol::engine::{Counters, FinishedTask, MapOutput};
use p2pmr_protocol::job::{JobSpec, AUTO_SPLIT, AUTO_SPLIT_MAX, AUTO_SPLIT_MIN};
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

/// Map tasks over `inputs` (each input's leaves, in order): a task ends at the first leaf
/// edge at or past `split` bytes from its start (or, if its placement group ends within an
/// eighth of `split` more, at the group's end: no sliver of a group as a task of its own),
/// and also where a placement group begins that no daemon holding all of the task's leaves
/// so far holds (by `holdings`, the leaves each daemon holds): a task is then readable whole
/// from at least one daemon. Files placed by group (leaves in a group share holders) are cut
/// only at group edges, and only where the holders change; lone leaves (files placed block
/// by block) are never cut for this.
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
    let mut maps = Vec::new();
    for (i, leaves) in inputs.into_iter().enumerate() {
        let mut offset = 0;
        let mut current: Option<PlannedMap> = None;
        // Daemons holding every leaf of the current task.
        let mut common: Vec<usize> = Vec::new();
        // Bytes of each leaf's group after it.
        let mut after = vec![0u64; leaves.len()];
        for k in (0..leaves.len().saturating_sub(1)).rev() {
            if leaves[k + 1].group == leaves[k].group {
                after[k] = after[k + 1] + leaves[k + 1].len;
            }
        }
        for (k, leaf) in leaves.iter().enumerate() {
            let starts_group = leaves.get(k + 1).is_some_and(|n| n.group == leaf.group)
                && (k == 0 || leaves[k - 1].group != leaf.group);
            let held = holders(&leaf.cid);
            if current.is_some()
                && starts_group
                && !common.is_empty()
                && !common.iter().any(|d| held.contains(d))
            {
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
            if task.end - task.start >= split && (after[k] == 0 || after[k] > split / 8) {
                maps.extend(current.take());
            }
        }
        maps.extend(current.take());
    }
    maps
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

/// Bytes of each task held by each daemon: `[task][daemon]`.
pub(super) fn locality(maps: &[PlannedMap], holdings: &[HashSet<Cid>]) -> Vec<Vec<u64>> {
    maps.iter()
        .map(|m| {
            holdings
                .iter()
                .map(|h| {
                    m.leaves
                        .iter()
                        .filter(|(c, _)| h.contains(c))
                        .map(|(_, len)| len)
                        .sum()
                })
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

#[cfg(test)]
mod tests {
    use super::*;

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
        for (split, want) in [
            // The first two groups share daemon 1; the third is on neither of theirs. Lone
            // leaves are never cut apart for locality.
            (100, vec![(0, 24), (24, 44)]),
            (12, vec![(0, 12), (12, 24), (24, 36), (36, 44)]),
            // A task that ends mid-group goes on into the next one if a daemon holds both.
            (
                8,
                vec![(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 44)],
            ),
        ] {
            let got: Vec<(u64, u64)> = cut_maps(vec![leaves.clone()], split, &holdings)
                .iter()
                .map(|m| (m.start, m.end))
                .collect();
            assert_eq!(got, want, "split {split}");
        }
        // Without holdings (nobody answered), the split alone cuts.
        let got = cut_maps(vec![leaves.clone()], 100, &[]);
        assert_eq!(got.len(), 1);
        // A group of 18 one-byte leaves and a split of 16: the last 2 bytes stay in the task.
        let group: Vec<Leaf> = (0..18u8)
            .map(|i| Leaf {
                cid: leaf(i),
                len: 1,
                group: leaf(0),
            })
            .collect();
        let ends: Vec<u64> = cut_maps(vec![group.clone()], 16, &[])
            .iter()
            .map(|m| m.end)
            .collect();
        assert_eq!(ends, vec![18]);
        let ends: Vec<u64> = cut_maps(vec![group], 8, &[])
            .iter()
            .map(|m| m.end)
            .collect();
        assert_eq!(ends, vec![8, 16, 18], "2 bytes is more than an eighth of 8");
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
        }
    }

    #[test]
    fn map_tasks_end_at_the_first_leaf_edge_past_the_split() {
        // (leaf sizes per input, split) -> (input, start, end) of each task.
        type Case = (Vec<Vec<u64>>, u64, Vec<(u32, u64, u64)>);
        let cases: Vec<Case> = vec![
            (vec![vec![]], 10, vec![]),
            (vec![vec![4, 4, 4]], 8, vec![(0, 0, 8), (0, 8, 12)]),
            (vec![vec![4, 4, 4]], 5, vec![(0, 0, 8), (0, 8, 12)]),
            (vec![vec![4, 4, 4]], 100, vec![(0, 0, 12)]),
            (vec![vec![10], vec![3, 3]], 4, vec![(0, 0, 10), (1, 0, 6)]),
            (vec![vec![0, 5]], 1, vec![(0, 0, 5)]),
        ];
        for (sizes, split, want) in cases {
            let inputs = sizes
                .iter()
                .map(|s| {
                    s.iter()
                        .enumerate()
                        .map(|(i, &n)| (leaf(i as u8), n))
                        .collect()
                })
                .collect();
            let got: Vec<(u32, u64, u64)> = cut_maps(own_groups(inputs), split, &[])
                .iter()
                .map(|m| (m.input, m.start, m.end))
                .collect();
            assert_eq!(got, want, "{sizes:?} split {split}");
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
        assert_eq!(locality(&maps, &holdings), vec![vec![12, 5, 0]]);
    }
}
