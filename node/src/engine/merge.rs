//! The k-way merge of sorted runs into key groups that a reduce task pulls value by value,
//! straight out of the runs' buffers: no copy of a pair and no list of a key's values, so a
//! key with more values than fit in memory still streams.

use super::runtime::Run;
use std::cmp::Ordering;

/// A run being read: its current pair, and a way to move past it.
pub trait Cursor {
    /// The current pair, or `None` once the run is over.
    fn head(&self) -> Option<(&[u8], &[u8])>;
    /// Moves to the next pair (a run read from the network may block for its bytes).
    fn advance(&mut self);
}

/// Keys in ascending order, each with its values: what a reduce task consumes.
pub trait KeyGroups: Send {
    /// Moves to the next key (skipping what is left of the current key's values) and returns
    /// it, or `None` when every run is over.
    fn next_key(&mut self) -> Option<&[u8]>;
    /// The current key's next value without taking it, or `None` when the key has no more.
    fn peek_value(&mut self) -> Option<&[u8]>;
    /// Takes the value [`peek_value`](Self::peek_value) returned.
    fn take_value(&mut self);
}

/// A key's first 8 bytes (zero-padded, big-endian) and its length: enough to order most keys
/// without reading them, and all keys of up to 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefix {
    bytes: u64,
    len: usize,
}

impl Prefix {
    fn of(key: &[u8]) -> Self {
        let mut bytes = [0; 8];
        let n = key.len().min(8);
        bytes[..n].copy_from_slice(&key[..n]);
        Self {
            bytes: u64::from_be_bytes(bytes),
            len: key.len(),
        }
    }

    /// The order of two keys with these prefixes, if the prefixes decide it: zero padding
    /// makes a short key and its extension by zero bytes alike, which their lengths tell
    /// apart as long as both fit.
    fn order(self, other: Self) -> Option<Ordering> {
        match self.bytes.cmp(&other.bytes) {
            Ordering::Equal if self.len <= 8 && other.len <= 8 => Some(self.len.cmp(&other.len)),
            Ordering::Equal => None,
            decided => Some(decided),
        }
    }
}

/// Merges runs, each sorted by key, into [`KeyGroups`]. A key's values come in run order, then
/// in the order they are in their run, so the result does not depend on timing.
///
/// The runs meet in a loser tree: each pair taken replays one path from its run's leaf to the
/// root, one comparison a level, where a binary heap's sift compares two children a level.
#[derive(Debug)]
pub struct Merge<C> {
    runs: Vec<C>,
    /// Each run's current key's prefix; `None` once the run is over.
    heads: Vec<Option<Prefix>>,
    /// `tree[0]` is the run whose current pair comes first, by (key, run index), with runs
    /// that are over last; `tree[i]`, for `i` from 1, the run that lost the match at node `i`
    /// (whose children are nodes `2i` and `2i + 1`, and run `r`'s leaf is node `runs + r`).
    tree: Vec<usize>,
    /// The current key and its prefix, once [`KeyGroups::next_key`] has been called.
    key: Option<(Vec<u8>, Prefix)>,
    /// Whether the top run's current pair is of the current key.
    in_key: bool,
    /// The run whose current value was taken, to advance before anything is read again.
    taken: Option<usize>,
}

impl<C: Cursor> Merge<C> {
    /// A merge of `runs`.
    pub fn new(runs: Vec<C>) -> Self {
        let n = runs.len();
        let heads = runs
            .iter()
            .map(|r| r.head().map(|(key, _)| Prefix::of(key)))
            .collect();
        let mut merge = Self {
            runs,
            heads,
            tree: vec![0; n],
            key: None,
            in_key: false,
            taken: None,
        };
        // The winner of each node, leaves (runs) first, then the matches bottom up.
        let mut winners = vec![0; 2 * n];
        for (r, w) in winners[n..].iter_mut().enumerate() {
            *w = r;
        }
        for node in (1..n).rev() {
            let (a, b) = (winners[2 * node], winners[2 * node + 1]);
            let (win, lose) = if merge.first(a, b) { (a, b) } else { (b, a) };
            winners[node] = win;
            merge.tree[node] = lose;
        }
        if n > 0 {
            merge.tree[0] = winners[1];
        }
        merge
    }

    fn key_of(&self, run: usize) -> &[u8] {
        self.runs[run].head().map_or(&[], |(k, _)| k)
    }

    /// Whether run `a`'s current pair comes before run `b`'s: by key, then by run; a run that
    /// is over comes after every run that is not.
    #[inline]
    fn first(&self, a: usize, b: usize) -> bool {
        match (self.heads[a], self.heads[b]) {
            (Some(pa), Some(pb)) => {
                let keys = pa
                    .order(pb)
                    .unwrap_or_else(|| self.key_of(a).cmp(self.key_of(b)));
                keys.then(a.cmp(&b)) == Ordering::Less
            }
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => a < b,
        }
    }

    /// Plays `run`'s way up from its leaf again, after its current pair changed.
    fn replay(&mut self, run: usize) {
        let mut winner = run;
        let mut node = (self.runs.len() + run) / 2;
        while node > 0 {
            if self.first(self.tree[node], winner) {
                std::mem::swap(&mut self.tree[node], &mut winner);
            }
            node /= 2;
        }
        self.tree[0] = winner;
    }

    /// The run whose current pair comes first, unless every run is over.
    fn top(&self) -> Option<(usize, Prefix)> {
        let run = *self.tree.first()?;
        self.heads[run].map(|prefix| (run, prefix))
    }

    /// Advances the run whose value was taken (only the top's value is ever taken), plays it
    /// up the tree again and notes whether the new top is still of the current key.
    fn settle(&mut self) {
        let Some(run) = self.taken.take() else { return };
        debug_assert_eq!(self.top().map(|(r, _)| r), Some(run));
        self.runs[run].advance();
        self.heads[run] = self.runs[run].head().map(|(key, _)| Prefix::of(key));
        self.replay(run);
        self.in_key = self.top_in_key();
    }

    fn top_in_key(&self) -> bool {
        let (Some((top, top_prefix)), Some((key, prefix))) = (self.top(), &self.key) else {
            return false;
        };
        match top_prefix.order(*prefix) {
            Some(order) => order == Ordering::Equal,
            None => self.key_of(top) == key.as_slice(),
        }
    }
}

impl<C: Cursor + Send> KeyGroups for Merge<C> {
    fn next_key(&mut self) -> Option<&[u8]> {
        while self.peek_value().is_some() {
            self.take_value();
        }
        let (top, top_prefix) = self.top()?;
        let key = self.runs[top]
            .head()
            .expect("a run that is not over has a pair")
            .0;
        let (current, prefix) = self.key.get_or_insert_with(|| (Vec::new(), top_prefix));
        current.clear();
        current.extend_from_slice(key);
        *prefix = top_prefix;
        self.in_key = true;
        Some(current)
    }

    fn peek_value(&mut self) -> Option<&[u8]> {
        self.settle();
        if !self.in_key {
            return None;
        }
        let (top, _) = self.top()?;
        self.runs[top].head().map(|(_, value)| value)
    }

    fn take_value(&mut self) {
        if self.in_key {
            self.taken = self.top().map(|(run, _)| run);
        }
    }
}

/// A run held in memory, read from its first pair.
#[derive(Debug)]
pub struct RunCursor {
    run: Run,
    at: usize,
}

impl RunCursor {
    /// A cursor at the start of `run`.
    pub fn new(run: Run) -> Self {
        Self { run, at: 0 }
    }
}

impl Cursor for RunCursor {
    fn head(&self) -> Option<(&[u8], &[u8])> {
        self.run.pair(self.at)
    }

    fn advance(&mut self) {
        self.at += 1;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p2pmr_protocol::abi::encode_pair;

    /// Every group of `groups` with its values, in order.
    pub(crate) fn collect(groups: &mut dyn KeyGroups) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
        let mut all = Vec::new();
        while let Some(key) = groups.next_key() {
            let key = key.to_vec();
            let mut values = Vec::new();
            while let Some(v) = groups.peek_value() {
                values.push(v.to_vec());
                groups.take_value();
            }
            all.push((key, values));
        }
        all
    }

    /// A run of `pairs` (sorted).
    pub(crate) fn run(pairs: &[(&str, &str)]) -> Run {
        let mut buf = Vec::new();
        for (k, v) in pairs {
            encode_pair(&mut buf, k.as_bytes(), v.as_bytes());
        }
        Run::sort(buf)
    }

    fn merged(runs: Vec<Run>) -> Vec<(String, Vec<String>)> {
        let mut m = Merge::new(runs.into_iter().map(RunCursor::new).collect());
        collect(&mut m)
            .into_iter()
            .map(|(k, vs)| {
                let s = |b: Vec<u8>| String::from_utf8(b).unwrap();
                (s(k), vs.into_iter().map(s).collect())
            })
            .collect()
    }

    fn group(k: &str, vs: &[&str]) -> (String, Vec<String>) {
        (k.into(), vs.iter().map(|v| v.to_string()).collect())
    }

    #[test]
    fn keys_come_in_order_with_values_in_run_then_emission_order() {
        let runs = vec![
            run(&[("b", "1"), ("a", "2"), ("c", "3"), ("a", "4")]),
            run(&[]),
            run(&[("a", "5"), ("d", "6"), ("bb", "")]),
            run(&[("", "empty key"), ("c", "7")]),
        ];
        assert_eq!(
            merged(runs),
            vec![
                group("", &["empty key"]),
                group("a", &["2", "4", "5"]),
                group("b", &["1"]),
                group("bb", &[""]),
                group("c", &["3", "7"]),
                group("d", &["6"]),
            ]
        );
    }

    #[test]
    fn boundary_run_counts_merge_like_one_sorted_list() {
        for runs in [0usize, 1, 2, 3, 7, 8, 9, 64] {
            let mut input = Vec::new();
            let mut expected: Vec<(u32, Vec<String>)> = Vec::new();
            for r in 0..runs {
                // Run r holds keys r, r+3, r+6, ... under 40, each twice.
                let keys: Vec<u32> = (r as u32 % 40..40).step_by(3).collect();
                let pairs: Vec<(String, String)> = keys
                    .iter()
                    .flat_map(|k| {
                        [
                            (format!("{k:03}"), format!("{r}a")),
                            (format!("{k:03}"), format!("{r}b")),
                        ]
                    })
                    .collect();
                let refs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                input.push(run(&refs));
                for k in keys {
                    match expected.iter_mut().find(|(e, _)| *e == k) {
                        Some((_, vs)) => vs.extend([format!("{r}a"), format!("{r}b")]),
                        None => expected.push((k, vec![format!("{r}a"), format!("{r}b")])),
                    }
                }
            }
            expected.sort_by_key(|(k, _)| *k);
            let expected: Vec<(String, Vec<String>)> = expected
                .into_iter()
                .map(|(k, vs)| (format!("{k:03}"), vs))
                .collect();
            assert_eq!(merged(input), expected, "{runs} runs");
        }
    }

    #[test]
    fn keys_alike_in_their_first_eight_bytes_keep_their_order() {
        let keys: [&[u8]; 10] = [
            b"",
            b"\0",
            b"ab",
            b"ab\0",
            b"ab\0\0\0\0\0\0",
            b"ab\0\0\0\0\0\0\0",
            b"abcdefgh",
            b"abcdefgh\0",
            b"abcdefghi",
            b"abcdefgi",
        ];
        // Each run holds every other key, from a different start, values naming the run.
        let runs: Vec<Run> = (0..3)
            .map(|r| {
                let mut buf = Vec::new();
                for key in keys.iter().skip(r % 2).step_by(1 + r % 2) {
                    encode_pair(&mut buf, key, format!("{r}").as_bytes());
                }
                Run::sort(buf)
            })
            .collect();
        let mut expected: Vec<(Vec<u8>, Vec<Vec<u8>>)> = Vec::new();
        for key in keys {
            let values: Vec<Vec<u8>> = (0..3)
                .filter(|r| {
                    keys.iter()
                        .skip(r % 2)
                        .step_by(1 + r % 2)
                        .any(|k| *k == key)
                })
                .map(|r| format!("{r}").into_bytes())
                .collect();
            expected.push((key.to_vec(), values));
        }
        let mut m = Merge::new(runs.into_iter().map(RunCursor::new).collect());
        assert_eq!(collect(&mut m), expected);
    }

    #[test]
    fn values_left_unread_are_skipped_and_a_peeked_value_stays_until_taken() {
        let mut m = Merge::new(
            vec![
                run(&[("a", "1"), ("a", "2"), ("b", "3")]),
                run(&[("a", "4")]),
            ]
            .into_iter()
            .map(RunCursor::new)
            .collect(),
        );
        assert_eq!(m.next_key(), Some(&b"a"[..]));
        assert_eq!(m.peek_value(), Some(&b"1"[..]));
        assert_eq!(m.peek_value(), Some(&b"1"[..]));
        m.take_value();
        assert_eq!(m.peek_value(), Some(&b"2"[..]));
        assert_eq!(m.next_key(), Some(&b"b"[..]));
        assert_eq!(m.peek_value(), Some(&b"3"[..]));
        assert_eq!(m.next_key(), None);
        assert_eq!(m.peek_value(), None);
    }
}
