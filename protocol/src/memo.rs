//! Keys of the task memo: everything a map or reduce task's output depends on, hashed into one
//! CID, so a worker can keep outputs across jobs and a coordinator can ask for them by key.
//!
//! A task's output is a function of its module, the arguments, the reducer count (which, with
//! the partitioning rule of the ABI, decides where each pair goes), the bytes it reads, the
//! rule that cuts those bytes into records and the format the host writes runs in. The bytes
//! are named by the CIDs of the leaves they lie in, so an edit anywhere else in a file leaves
//! the key alone. Three things are settled only after the task has run, and are kept beside
//! the output instead of in the key (see [`MapMemo`]): the leaves past the range's end the
//! task read to finish its last record, whether the module looked at records' byte offsets
//! (then the output holds only where the range starts) and whether it looked at the input's
//! name (then it holds only for that name).
//!
//! Anything that changes what a task computes must change its key or be checked against what
//! is kept: a wrong reuse is a wrong answer, which a rerun of the task would never give.

use crate::engine::{MapOutput, ReduceOutput};
use crate::{Block, Cid};
use serde::Serialize;

/// The host rules a task's output also depends on. [`TaskRules::CURRENT`] is this build's; a
/// change to any of them makes every key new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TaskRules {
    /// The job ABI ([`crate::abi::ABI_VERSION`]), which fixes the partitioning rule.
    pub abi: i32,
    /// The record rule ([`crate::records::RECORD_RULE`]).
    pub records: u32,
    /// How runs and reduce outputs are encoded and laid out as files ([`RUN_FORMAT`]).
    pub runs: u32,
}

/// Version of the run encoding and its file layout: a run's CID depends on both.
pub const RUN_FORMAT: u32 = 1;

impl TaskRules {
    /// This build's rules.
    pub const CURRENT: Self = Self {
        abi: crate::abi::ABI_VERSION,
        records: crate::records::RECORD_RULE,
        runs: RUN_FORMAT,
    };
}

/// What a map task's key is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapKey<'a> {
    /// The job's module.
    pub module: Cid,
    /// The job's arguments, encoded ([`crate::abi::encode_args`]).
    pub args: &'a [u8],
    /// Reduce partitions.
    pub reducers: u32,
    /// Whether the range starts at the file's first byte (a task starting elsewhere skips
    /// the record it begins inside).
    pub first: bool,
    /// Every leaf holding a byte the task reads before its range's end, in file order: the
    /// one holding the byte before the range (it says whether a record starts at the
    /// range's first byte) and those of the range.
    pub leaves: &'a [Cid],
}

#[derive(Serialize)]
struct MapMaterial<'a> {
    what: &'static str,
    rules: TaskRules,
    module: Vec<u8>,
    args: &'a [u8],
    reducers: u32,
    first: bool,
    leaves: Vec<Vec<u8>>,
}

#[derive(Serialize)]
struct ReduceMaterial<'a> {
    what: &'static str,
    rules: TaskRules,
    module: Vec<u8>,
    args: &'a [u8],
    reducers: u32,
    partition: u32,
    runs: Vec<Vec<u8>>,
}

/// The CID of `material`'s encoding: a raw block's, so keys look like any other CID.
fn key_of(material: &impl Serialize) -> Cid {
    let bytes = postcard::to_allocvec(material).expect("in-memory encoding");
    *Block::raw(bytes).cid()
}

impl MapKey<'_> {
    /// The key under this build's rules.
    pub fn key(&self) -> Cid {
        self.key_under(TaskRules::CURRENT)
    }

    /// The key under `rules`.
    pub fn key_under(&self, rules: TaskRules) -> Cid {
        key_of(&MapMaterial {
            what: "p2pmr map task",
            rules,
            module: self.module.to_bytes(),
            args: self.args,
            reducers: self.reducers,
            first: self.first,
            leaves: self.leaves.iter().map(Cid::to_bytes).collect(),
        })
    }
}

/// What a reduce task's key is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReduceKey<'a> {
    /// The job's module.
    pub module: Cid,
    /// The job's arguments, encoded.
    pub args: &'a [u8],
    /// Reduce partitions.
    pub reducers: u32,
    /// The partition.
    pub partition: u32,
    /// The partition's runs, in task order.
    pub runs: &'a [Cid],
}

impl ReduceKey<'_> {
    /// The key under this build's rules.
    pub fn key(&self) -> Cid {
        self.key_under(TaskRules::CURRENT)
    }

    /// The key under `rules`.
    pub fn key_under(&self, rules: TaskRules) -> Cid {
        key_of(&ReduceMaterial {
            what: "p2pmr reduce task",
            rules,
            module: self.module.to_bytes(),
            args: self.args,
            reducers: self.reducers,
            partition: self.partition,
            runs: self.runs.iter().map(Cid::to_bytes).collect(),
        })
    }
}

/// A remembered map output and what it was found to depend on besides its key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapMemo {
    /// The output (its runs held by the worker that kept it).
    pub output: MapOutput,
    /// The leaves past the range's end the task read to finish its last record, in order.
    #[serde(with = "crate::engine::cids_bytes")]
    pub after: Vec<Cid>,
    /// Where the range started, if the module read records' byte offsets: then the output is
    /// right only for a range starting there.
    pub positional: Option<u64>,
    /// The input's name, if the module read it: then the output is right only for an input
    /// of that name.
    pub named: Option<String>,
}

impl MapMemo {
    /// Whether this output is the one a task starting at `start` of the input named `input`,
    /// whose file continues past its range with `next` (the following leaves, in order),
    /// would produce.
    pub fn fits(&self, start: u64, input: &str, next: &[Cid]) -> bool {
        self.positional.is_none_or(|at| at == start)
            && self.named.as_deref().is_none_or(|name| name == input)
            && next.starts_with(&self.after)
    }
}

/// A remembered task output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Remembered {
    /// A map task's.
    Map(MapMemo),
    /// A reduce task's (stored and replicated like any reduce output).
    Reduce(ReduceOutput),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u8) -> Cid {
        *Block::raw(vec![n]).cid()
    }

    fn map(leaves: &[Cid]) -> MapKey<'_> {
        MapKey {
            module: cid(1),
            args: b"a",
            reducers: 2,
            first: false,
            leaves,
        }
    }

    #[test]
    fn every_part_of_a_map_task_is_in_its_key() {
        let leaves = [cid(10), cid(11)];
        let base = map(&leaves);
        let key = base.key();
        assert_eq!(key, map(&leaves).key(), "keys are deterministic");
        let other_leaves = [cid(10), cid(12)];
        let fewer = [cid(10)];
        let changed = [
            MapKey {
                module: cid(2),
                ..base
            },
            MapKey { args: b"b", ..base },
            MapKey {
                reducers: 3,
                ..base
            },
            MapKey {
                first: true,
                ..base
            },
            MapKey {
                leaves: &other_leaves,
                ..base
            },
            MapKey {
                leaves: &fewer,
                ..base
            },
        ];
        for (i, other) in changed.iter().enumerate() {
            assert_ne!(other.key(), key, "change {i}");
        }
        let rules = TaskRules::CURRENT;
        for other in [
            TaskRules {
                abi: rules.abi + 1,
                ..rules
            },
            TaskRules {
                records: rules.records + 1,
                ..rules
            },
            TaskRules {
                runs: rules.runs + 1,
                ..rules
            },
        ] {
            assert_ne!(base.key_under(other), key, "{other:?}");
        }
        assert_eq!(base.key_under(rules), key);
    }

    #[test]
    fn every_part_of_a_reduce_task_is_in_its_key() {
        let runs = [cid(20), cid(21)];
        let base = ReduceKey {
            module: cid(1),
            args: b"",
            reducers: 2,
            partition: 0,
            runs: &runs,
        };
        let key = base.key();
        let swapped = [cid(21), cid(20)];
        for other in [
            ReduceKey {
                module: cid(2),
                ..base
            },
            ReduceKey { args: b"x", ..base },
            ReduceKey {
                reducers: 4,
                ..base
            },
            ReduceKey {
                partition: 1,
                ..base
            },
            ReduceKey {
                runs: &swapped,
                ..base
            },
        ] {
            assert_ne!(other.key(), key, "{other:?}");
        }
        let rules = TaskRules::CURRENT;
        assert_ne!(
            base.key_under(TaskRules {
                records: rules.records + 1,
                ..rules
            }),
            key
        );
        // Map and reduce keys never meet, whatever their parts.
        assert_ne!(map(&[]).key(), base.key());
    }

    #[test]
    fn a_remembered_output_fits_only_the_same_continuation_start_and_name() {
        let memo = |after: Vec<Cid>, positional, named: Option<&str>| MapMemo {
            output: MapOutput {
                parts: vec![None],
                counters: Default::default(),
                cut: None,
            },
            after,
            positional,
            named: named.map(str::to_owned),
        };
        let next = [cid(5), cid(6)];
        assert!(memo(vec![], None, None).fits(100, "a", &next));
        assert!(memo(vec![cid(5)], None, None).fits(100, "a", &next));
        assert!(memo(vec![cid(5), cid(6)], None, None).fits(7, "a", &next));
        assert!(!memo(vec![cid(6)], None, None).fits(100, "a", &next));
        assert!(!memo(vec![cid(5), cid(6), cid(7)], None, None).fits(100, "a", &next));
        assert!(memo(vec![], Some(100), None).fits(100, "a", &next));
        assert!(!memo(vec![], Some(100), None).fits(101, "a", &next));
        assert!(memo(vec![], None, Some("a")).fits(100, "a", &next));
        assert!(!memo(vec![], None, Some("a")).fits(100, "b", &next));
    }
}
