//! [`Counter`]: byte-string keys to counts, the table behind wordcount-style jobs.
//!
//! A general `HashMap<Box<[u8]>, u64>` costs two cache misses per new or rare key (the bucket,
//! then the boxed key) and an allocation per distinct key; in wasm32 hashbrown also probes only
//! four control bytes at a time. Counting is the commonest in-mapper aggregation, so the SDK
//! ships a table made for it: open addressing with linear probing over 32-byte slots, keys of
//! up to 8 bytes (most words) stored inside their slot, longer keys in one shared arena.

/// Slot marker bit: set in every occupied slot's stored hash.
const USED: u32 = 1 << 31;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The key's first (up to) 8 bytes, little-endian, zero-padded.
    head: u64,
    /// The hash's low 31 bits, with [`USED`] set; 0 for an empty slot.
    hash: u32,
    /// The key's length.
    len: u32,
    /// Where the whole key starts in the arena (keys longer than 8 bytes only).
    at: usize,
    count: u64,
}

/// Counts occurrences of byte-string keys.
///
/// ```
/// let mut c = p2pmr_guest::Counter::new();
/// for w in ["the", "cat", "the"] {
///     c.add(w.as_bytes(), 1);
/// }
/// let mut got = vec![];
/// c.for_each(|k, n| got.push((k.to_vec(), n)));
/// got.sort();
/// assert_eq!(got, [(b"cat".to_vec(), 1), (b"the".to_vec(), 2)]);
/// ```
pub struct Counter {
    slots: Vec<Slot>,
    /// Keys longer than 8 bytes, back to back.
    arena: Vec<u8>,
    len: usize,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter").field("len", &self.len).finish()
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn head_of(key: &[u8]) -> u64 {
    match key.first_chunk::<8>() {
        Some(h) => u64::from_le_bytes(*h),
        None => {
            let mut h = 0;
            for (i, &b) in key.iter().enumerate() {
                h |= u64::from(b) << (8 * i);
            }
            h
        }
    }
}

#[inline]
fn hash_of(head: u64, key: &[u8]) -> u32 {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    let mut h = (head ^ key.len() as u64).wrapping_mul(K);
    if key.len() > 8 {
        let mut chunks = key[8..].chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            h = (h.rotate_left(5) ^ w).wrapping_mul(K);
        }
        h = (h.rotate_left(5) ^ head_of(chunks.remainder())).wrapping_mul(K);
    }
    // The product's high bits are its best mixed; fold them down into the ones we keep.
    ((h ^ (h >> 32)) as u32) | USED
}

impl Counter {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            slots: vec![Slot::default(); 1024],
            arena: Vec::new(),
            len: 0,
        }
    }

    /// Distinct keys counted.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `n` to `key`'s count (a new key starts at 0).
    #[inline]
    pub fn add(&mut self, key: &[u8], n: u64) {
        self.add_with_head(key, head_of(key), n);
    }

    /// Counts each word of `text` ([`text::words`](crate::text::words)) once.
    ///
    /// Faster than `add` per word: a word's first 8 bytes come from one load of the text
    /// (masked to the word's length) instead of a byte loop over each short word.
    pub fn add_words(&mut self, text: &[u8]) {
        let mut i = 0;
        while let Some((start, end)) = crate::text::next_word(text, i) {
            let word = &text[start..end];
            let head = match text.get(start..start + 8) {
                // Words are never empty, so the shift is 8 to 56.
                Some(c) if word.len() < 8 => {
                    u64::from_le_bytes(c.try_into().expect("8 bytes"))
                        & ((1 << (8 * word.len())) - 1)
                }
                _ => head_of(word),
            };
            self.add_with_head(word, head, 1);
            i = end;
        }
    }

    #[inline]
    fn add_with_head(&mut self, key: &[u8], head: u64, n: u64) {
        let hash = hash_of(head, key);
        let len = u32::try_from(key.len()).expect("a key under 4 GiB");
        let Self { slots, arena, .. } = self;
        let mask = slots.len() - 1;
        let mut i = hash as usize & mask;
        let is_key = |slot: &Slot, arena: &[u8]| {
            slot.hash == hash
                && slot.head == head
                && slot.len == len
                && (len <= 8 || crate::eq_bytes(&arena[slot.at..][..key.len()], key))
        };
        // The first probe, peeled out of the loop: it is nearly always the last, and in wasm
        // every loop header also checks the epoch deadline.
        if is_key(&slots[i], arena) {
            slots[i].count += n;
            return;
        }
        loop {
            let slot = &mut slots[i];
            if slot.hash == 0 {
                let at = if len > 8 {
                    let at = arena.len();
                    arena.extend_from_slice(key);
                    at
                } else {
                    0
                };
                *slot = Slot {
                    head,
                    hash,
                    len,
                    at,
                    count: n,
                };
                self.len += 1;
                // At most half full keeps probe runs short.
                if self.len * 2 > self.slots.len() {
                    self.grow();
                }
                return;
            }
            i = (i + 1) & mask;
            if is_key(&slots[i], arena) {
                slots[i].count += n;
                return;
            }
        }
    }

    fn grow(&mut self) {
        let bigger = vec![Slot::default(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, bigger);
        let mask = self.slots.len() - 1;
        for slot in old.into_iter().filter(|s| s.hash != 0) {
            let mut i = slot.hash as usize & mask;
            while self.slots[i].hash != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }

    /// Calls `f` with every key and its count, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], u64)) {
        for slot in self.slots.iter().filter(|s| s.hash != 0) {
            let len = slot.len as usize;
            if len <= 8 {
                f(&slot.head.to_le_bytes()[..len], slot.count);
            } else {
                f(&self.arena[slot.at..][..len], slot.count);
            }
        }
    }
}

/// `n` in decimal, without allocating: `emit.emit(word, decimal(n, &mut buf))`.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn counts_like_a_hash_map() {
        // Keys around the inline limit (7, 8, 9 bytes), empty, long, with zero bytes (which
        // the zero padding of short keys must not confuse), and enough of them to grow often.
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"abcdefg".to_vec(),
            b"abcdefgh".to_vec(),
            b"abcdefghi".to_vec(),
            b"abcdefgh\0".to_vec(),
            vec![b'x'; 1000],
        ];
        for i in 0..20_000u32 {
            keys.push(format!("w{}", i * 7919 % 30_011).into_bytes());
        }
        let mut c = Counter::new();
        let mut want: HashMap<Vec<u8>, u64> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let n = (i % 3) as u64 + 1;
            c.add(k, n);
            *want.entry(k.clone()).or_default() += n;
        }
        let mut got = HashMap::new();
        c.for_each(|k, n| assert!(got.insert(k.to_vec(), n).is_none()));
        assert_eq!(got, want);
        assert_eq!(c.len(), want.len());
    }

    #[test]
    fn add_words_counts_like_add() {
        let text = [
            &b"the cat, the Cat\t"[..],
            "thé naïve δ ".as_bytes(),
            b"abcdefgh abcdefghi x\xffy the",
        ]
        .concat();
        let (mut a, mut b) = (Counter::new(), Counter::new());
        a.add_words(&text);
        for w in crate::text::words(&text) {
            b.add(w, 1);
        }
        let (mut got, mut want) = (vec![], vec![]);
        a.for_each(|k, n| got.push((k.to_vec(), n)));
        b.for_each(|k, n| want.push((k.to_vec(), n)));
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn decimals() {
        let mut buf = [0; 20];
        for n in [0, 1, 9, 10, 4711, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }
}
