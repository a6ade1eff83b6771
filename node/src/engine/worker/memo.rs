//! The worker's task memo: outputs of the tasks it ran, by key ([`p2pmr_protocol::memo`]), kept
//! across jobs and forgotten least recently used first once they hold more than their budget.
//!
//! An entry names blocks in the store (a map task's runs, a reduce task's output file); its
//! size is theirs. Forgetting an entry does not delete them: runs stay until the store is
//! cleaned like any other run, and reduce outputs are kept like any job output. Before an
//! entry is handed out its blocks are checked to be here still.

use p2pmr_protocol::engine::MemoHit;
use p2pmr_protocol::memo::Remembered;
use p2pmr_protocol::Cid;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Remembered task outputs, least recently used forgotten first. Cheap to share.
#[derive(Debug)]
pub(super) struct Memo {
    budget: u64,
    state: Mutex<State>,
}

/// An entry's place: its key and which of the key's variants it is. Tasks with one key can
/// differ in what was settled after they ran (the leaves past their end, where they started,
/// the input's name: repeated content has many such tasks), so each variant is kept.
type Slot = (Cid, u64);

#[derive(Debug, Default)]
struct State {
    /// Slot → (entry, its bytes, when it was last used).
    entries: BTreeMap<Slot, (Remembered, u64, u64)>,
    /// When each entry was last used → its slot.
    by_use: BTreeMap<u64, Slot>,
    bytes: u64,
    clock: u64,
}

/// Which variant of its key an entry is: a hash of what a map output was found to depend on
/// besides its key (reduce outputs have one variant).
fn variant_of(entry: &Remembered) -> u64 {
    use std::hash::{Hash, Hasher};
    let Remembered::Map(m) = entry else {
        return 0;
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.after.hash(&mut h);
    m.positional.hash(&mut h);
    m.named.hash(&mut h);
    h.finish()
}

/// The bytes an entry stands for: its map runs' or its reduce output's.
fn size_of(entry: &Remembered) -> u64 {
    match entry {
        Remembered::Map(m) => m.output.parts.iter().flatten().map(|p| p.bytes).sum(),
        Remembered::Reduce(r) => r.tsize,
    }
}

/// The blocks that must still be here for an entry to be of use: each run's root, or the
/// reduce output's.
pub(super) fn roots_of(entry: &Remembered) -> Vec<Cid> {
    match entry {
        Remembered::Map(m) => m.output.parts.iter().flatten().map(|p| p.cid).collect(),
        Remembered::Reduce(r) => vec![r.cid],
    }
}

impl State {
    fn remove(&mut self, slot: &Slot) {
        if let Some((_, size, used)) = self.entries.remove(slot) {
            self.by_use.remove(&used);
            self.bytes -= size;
        }
    }
}

impl Memo {
    /// A memo holding entries for up to `budget` bytes (0 keeps nothing).
    pub(super) fn new(budget: u64) -> Self {
        Self {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    /// Remembers `entry` under `key` (replacing the same variant), forgetting the least
    /// recently used entries to make room. An entry larger than the whole budget is not kept.
    pub(super) fn put(&self, key: Cid, entry: Remembered) {
        let size = size_of(&entry);
        if self.budget == 0 || size > self.budget {
            return;
        }
        let slot = (key, variant_of(&entry));
        let mut s = self.state.lock().expect("poisoned");
        s.remove(&slot);
        while s.bytes + size > self.budget {
            let Some((_, oldest)) = s.by_use.pop_first() else {
                break;
            };
            s.remove(&oldest);
        }
        s.clock += 1;
        let now = s.clock;
        s.entries.insert(slot, (entry, size, now));
        s.by_use.insert(now, slot);
        s.bytes += size;
    }

    /// Every entry under `keys` (all variants), each marked as just used.
    pub(super) fn get(&self, keys: &[Cid]) -> Vec<MemoHit> {
        let mut s = self.state.lock().expect("poisoned");
        let mut hits = Vec::new();
        for key in keys {
            let slots: Vec<Slot> = s
                .entries
                .range((*key, 0)..=(*key, u64::MAX))
                .map(|(slot, _)| *slot)
                .collect();
            for slot in slots {
                s.clock += 1;
                let now = s.clock;
                let Some((entry, _, used)) = s.entries.get_mut(&slot) else {
                    continue;
                };
                let was = std::mem::replace(used, now);
                hits.push(MemoHit {
                    key: *key,
                    entry: entry.clone(),
                });
                s.by_use.remove(&was);
                s.by_use.insert(now, slot);
            }
        }
        hits
    }

    /// Forgets `entry` under `key` (its blocks are gone).
    pub(super) fn forget(&self, key: Cid, entry: &Remembered) {
        let slot = (key, variant_of(entry));
        self.state.lock().expect("poisoned").remove(&slot);
    }

    /// Entries kept and the bytes they stand for.
    pub(super) fn held(&self) -> (usize, u64) {
        let s = self.state.lock().expect("poisoned");
        (s.entries.len(), s.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::engine::{Counters, MapOutput, PartOut, ReduceOutput};
    use p2pmr_protocol::memo::MapMemo;
    use p2pmr_protocol::Block;

    fn cid(n: u32) -> Cid {
        *Block::raw(n.to_le_bytes().to_vec()).cid()
    }

    fn map_of(bytes: u64) -> Remembered {
        Remembered::Map(MapMemo {
            output: MapOutput {
                parts: vec![
                    Some(PartOut {
                        cid: cid(1000),
                        bytes,
                    }),
                    None,
                ],
                counters: Counters::default(),
            },
            after: vec![],
            positional: None,
            named: None,
        })
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_budget_holds() {
        let memo = Memo::new(100);
        for k in 0..4 {
            memo.put(cid(k), map_of(30));
        }
        // 4 x 30 > 100: the first one went.
        assert_eq!(memo.held(), (3, 90));
        assert!(memo.get(&[cid(0)]).is_empty());
        // Using 1 makes 2 the oldest.
        assert_eq!(memo.get(&[cid(1)]).len(), 1);
        memo.put(cid(4), map_of(30));
        let left: Vec<Cid> = memo
            .get(&[cid(1), cid(2), cid(3), cid(4)])
            .into_iter()
            .map(|h| h.key)
            .collect();
        assert_eq!(left, vec![cid(1), cid(3), cid(4)]);
        // Too big for the budget: not kept, nothing forgotten for it.
        memo.put(cid(5), map_of(101));
        assert_eq!(memo.held(), (3, 90));
        // The same key again replaces its entry.
        memo.put(cid(4), map_of(10));
        assert_eq!(memo.held(), (3, 70));
        memo.forget(cid(4), &map_of(10));
        assert_eq!(memo.held(), (2, 60));
        let reduce = Remembered::Reduce(ReduceOutput {
            cid: cid(7),
            size: 5,
            tsize: 40,
            counters: Counters::default(),
        });
        memo.put(cid(6), reduce.clone());
        assert_eq!(memo.held(), (3, 100));
        assert_eq!(roots_of(&reduce), vec![cid(7)]);
        // Variants of one key (another continuation) are kept side by side.
        let mut other = map_of(5);
        if let Remembered::Map(m) = &mut other {
            m.after = vec![cid(99)];
        }
        memo.put(cid(3), other);
        assert_eq!(memo.get(&[cid(3)]).len(), 2);
        let off = Memo::new(0);
        off.put(cid(8), map_of(0));
        assert!(off.get(&[cid(8)]).is_empty());
    }
}
