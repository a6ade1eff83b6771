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

/// Map tasks over `inputs` (each input's leaves with their sizes, in order): a task ends at
/// the first leaf edge at or past `split` bytes from its start.
pub(super) fn cut_maps(inputs: Vec<Vec<(Cid, u64)>>, split: u64) -> Vec<PlannedMap> {
    let mut maps = Vec::new();
    for (i, leaves) in inputs.into_iter().enumerate() {
        let mut offset = 0;
        let mut current: Option<PlannedMap> = None;
        for (cid, len) in leaves {
            let task = current.get_or_insert_with(|| PlannedMap {
                input: i as u32,
                start: offset,
                end: offset,
                leaves: Vec::new(),
            });
            task.leaves.push((cid, len));
            task.end += len;
            offset += len;
            if task.end - task.start >= split {
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

/// Shares each machine's slots out among the daemons on it (those reporting the same `hosts`
/// entry, not 0): a machine runs as many tasks at once as the most any of its daemons
/// offers, split evenly, at least one per daemon so each can still map the blocks it holds.
///
/// Slots default to the cores, so two daemons on one 2-core machine offered four and ran
/// four map tasks on two cores, each with its own multi-megabyte count table; the automatic
/// split then also cut the input in four instead of two, which was measurably slower
/// (BENCHMARKS.md, "What moved the job rows").
pub(super) fn share_hosts(slots: &mut [u32], hosts: &[u64]) {
    let mut machines: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, (&n, &host)) in slots.iter().zip(hosts).enumerate() {
        if n > 0 && host != 0 {
            machines.entry(host).or_default().push(i);
        }
    }
    for daemons in machines.values() {
        let k = daemons.len() as u32;
        let most = daemons.iter().map(|&i| slots[i]).max().unwrap_or(1);
        for (j, &i) in daemons.iter().enumerate() {
            slots[i] = (most / k + u32::from((j as u32) < most % k)).max(1);
        }
    }
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

    #[test]
    fn machines_share_their_slots_out_among_their_daemons() {
        // (slots offered, hosts) → slots used. Host 0 is unknown: never grouped; 0 slots is a
        // daemon that did not answer: never given any.
        for (offered, hosts, used) in [
            (vec![], vec![], vec![]),
            (vec![2], vec![7], vec![2]),
            (vec![2, 2], vec![7, 8], vec![2, 2]),
            (vec![2, 2], vec![7, 7], vec![1, 1]),
            (vec![2, 2], vec![0, 0], vec![2, 2]),
            (vec![2, 2, 2, 2], vec![7; 4], vec![1, 1, 1, 1]),
            (vec![8, 8, 8], vec![7; 3], vec![3, 3, 2]),
            (vec![1, 4], vec![7, 7], vec![2, 2]),
            (vec![2, 0, 2], vec![7; 3], vec![1, 0, 1]),
            (vec![4, 4, 2], vec![7, 7, 8], vec![2, 2, 2]),
        ] {
            let mut slots = offered.clone();
            share_hosts(&mut slots, &hosts);
            assert_eq!(slots, used, "{offered:?} on {hosts:?}");
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
            let got: Vec<(u32, u64, u64)> = cut_maps(inputs, split)
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
        let maps = cut_maps(vec![vec![(leaf(0), 4), (leaf(1), 4)]], 4);
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
        let maps = cut_maps(vec![vec![(leaf(0), 4), (leaf(1), 4), (leaf(2), 4)]], 4);
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
        let maps = cut_maps(vec![vec![(a, 5), (b, 7)]], 100);
        assert_eq!(locality(&maps, &holdings), vec![vec![12, 5, 0]]);
    }
}
