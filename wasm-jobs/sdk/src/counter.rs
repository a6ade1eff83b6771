//! [`Counter`]: byte-string keys to counts, the table behind wordcount-style jobs.
//!
//! A general `HashMap<Box<[u8]>, u64>` costs two cache misses per new or rare key (the bucket,
//! then the boxed key) and an allocation per distinct key; in wasm32 hashbrown also probes only
//! four control bytes at a time. Counting is the commonest in-mapper aggregation, so the SDK
//! ships a table made for it: open addressing with linear probing over 16-byte slots (four to
//! a cache line), keys of up to 8 bytes (most words) stored inside their slot, longer keys in
//! one shared arena.
//!
//! The table is what a map task's time goes to (a probe that misses the cache per word), so
//! it is kept small: 16-byte slots filled up to three quarters. A 64 MiB split of English text
//! has ~300,000 distinct words: 8 MiB of slots, where 32-byte slots at most half full took
//! 32 MiB, more than the cache, and twice that while growing.

use std::collections::HashMap;

/// Tag bit set in every occupied slot (an empty slot's tag is 0).
const USED: u32 = 1 << 31;
/// The tag's low bits: an inline key's length (0 to 8), or [`LONG`].
const LEN_BITS: u32 = 0xF;
/// Length code of a key longer than 8 bytes (kept in the arena).
const LONG: u32 = 0xF;
/// A slot count at this value means the key's count outgrew 32 bits; it is kept in `big`.
const BIG: u32 = u32::MAX;

#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Slot {
    /// A key of up to 8 bytes itself, little-endian, zero-padded; for a longer key, where it
    /// starts in the arena (its length, 4 bytes little-endian, then its bytes).
    word: u64,
    /// 0 for an empty slot; else [`USED`], 27 bits of the hash (not the bits the slot index
    /// comes from, so they tell keys of one probe run apart) and the length code.
    tag: u32,
    /// The count, or [`BIG`].
    count: u32,
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
    /// Keys longer than 8 bytes, each as its length (u32, little-endian) and its bytes.
    arena: Vec<u8>,
    /// Counts that do not fit a slot's 32 bits (rare: a key seen four billion times).
    big: HashMap<Box<[u8]>, u64>,
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

/// The key's hash: a multiply-rotate over its 8-byte words. Its best mixed (high) bits go
/// to the tag; the slot index comes from the high half folded onto the low.
#[inline]
fn hash_of(head: u64, key: &[u8]) -> u64 {
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
    h
}

#[inline]
fn index_of(hash: u64) -> usize {
    (hash ^ (hash >> 32)) as usize
}

#[inline]
fn tag_of(hash: u64, len: usize) -> u32 {
    let code = if len <= 8 { len as u32 } else { LONG };
    USED | ((hash >> 33) as u32 & !LEN_BITS) | code
}

/// The key a slot holds; an inline key is copied out into `buf`.
#[inline]
fn key_in<'a>(slot: &Slot, arena: &'a [u8], buf: &'a mut [u8; 8]) -> &'a [u8] {
    let code = slot.tag & LEN_BITS;
    if code == LONG {
        let at = slot.word as usize;
        let len = u32::from_le_bytes(arena[at..at + 4].try_into().expect("4 bytes")) as usize;
        &arena[at + 4..at + 4 + len]
    } else {
        *buf = slot.word.to_le_bytes();
        &buf[..code as usize]
    }
}

impl Counter {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            slots: vec![Slot::default(); 1024],
            arena: Vec::new(),
            big: HashMap::new(),
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

    /// `head` is the key's first (up to) 8 bytes, little-endian, zero-padded.
    #[inline]
    fn add_with_head(&mut self, key: &[u8], head: u64, n: u64) {
        let hash = hash_of(head, key);
        let tag = tag_of(hash, key.len());
        let long = key.len() > 8;
        let (slots, arena) = (&self.slots, &self.arena);
        let mask = slots.len() - 1;
        let mut i = index_of(hash) & mask;
        let is_key = |slot: &Slot, arena: &[u8]| {
            slot.tag == tag
                && if long {
                    let at = slot.word as usize;
                    // The tag matched, so the stored key is long too: its length comes first.
                    arena[at..at + 4] == (key.len() as u32).to_le_bytes()
                        && crate::eq_bytes(&arena[at + 4..][..key.len()], key)
                } else {
                    slot.word == head
                }
        };
        // The first probe, peeled out of the loop: it is nearly always the last, and in wasm
        // every loop header also checks the epoch deadline.
        if is_key(&slots[i], arena) {
            self.bump(i, n);
            return;
        }
        loop {
            if slots[i].tag == 0 {
                self.insert(i, key, head, tag, n);
                return;
            }
            i = (i + 1) & mask;
            if is_key(&slots[i], arena) {
                self.bump(i, n);
                return;
            }
        }
    }

    /// Adds `n` to the count in slot `i`.
    #[inline]
    fn bump(&mut self, i: usize, n: u64) {
        let slot = &mut self.slots[i];
        if slot.count != BIG {
            let sum = u64::from(slot.count) + n;
            if sum < u64::from(BIG) {
                slot.count = sum as u32;
                return;
            }
        }
        self.bump_big(i, n);
    }

    /// The slow half of `bump`: the count no longer fits in 32 bits.
    #[cold]
    fn bump_big(&mut self, i: usize, n: u64) {
        let Self {
            slots, arena, big, ..
        } = self;
        let slot = &mut slots[i];
        let mut buf = [0; 8];
        let key = key_in(slot, arena, &mut buf);
        let count = big
            .entry(key.into())
            .or_insert_with(|| u64::from(slot.count));
        *count += n;
        slot.count = BIG;
    }

    /// Puts a new key into the empty slot `i`.
    fn insert(&mut self, i: usize, key: &[u8], head: u64, tag: u32, n: u64) {
        let word = if key.len() > 8 {
            let at = self.arena.len();
            let len = u32::try_from(key.len()).expect("a key under 4 GiB");
            self.arena.extend_from_slice(&len.to_le_bytes());
            self.arena.extend_from_slice(key);
            at as u64
        } else {
            head
        };
        self.slots[i] = Slot {
            word,
            tag,
            count: 0,
        };
        self.len += 1;
        self.bump(i, n);
        // At most three quarters full keeps probe runs short (and most within a cache line).
        if self.len * 4 > self.slots.len() * 3 {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let bigger = vec![Slot::default(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, bigger);
        let mask = self.slots.len() - 1;
        let mut buf = [0; 8];
        for slot in old.into_iter().filter(|s| s.tag != 0) {
            // Slots keep no index bits, so each key is hashed again (a key of up to 8
            // bytes is in the slot; a longer one is read from the arena).
            let key = key_in(&slot, &self.arena, &mut buf);
            let mut i = index_of(hash_of(head_of(key), key)) & mask;
            while self.slots[i].tag != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }

    /// Calls `f` with every key and its count, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], u64)) {
        let mut buf = [0; 8];
        for slot in self.slots.iter().filter(|s| s.tag != 0) {
            let key = key_in(slot, &self.arena, &mut buf);
            let count = if slot.count == BIG {
                self.big[key]
            } else {
                u64::from(slot.count)
            };
            f(key, count);
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

    /// Every key and its count, in key order.
    fn sorted(c: &Counter) -> Vec<(Vec<u8>, u64)> {
        let mut got = vec![];
        c.for_each(|k, n| got.push((k.to_vec(), n)));
        got.sort();
        got
    }

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
    fn counts_past_32_bits() {
        let mut c = Counter::new();
        let max = u64::from(u32::MAX);
        // Up to the edge of a slot's count, then over it, then on from there.
        c.add(b"edge", max - 2);
        c.add(b"edge", 1);
        c.add(b"edge", 1);
        c.add(b"edge", 7);
        // Over 32 bits at once, for new keys short and long.
        c.add(b"new", max);
        c.add(b"a longer new key", 1 << 40);
        c.add(b"a longer new key", 2);
        assert_eq!(
            sorted(&c),
            [
                (b"a longer new key".to_vec(), (1 << 40) + 2),
                (b"edge".to_vec(), max + 7),
                (b"new".to_vec(), max),
            ]
        );
    }

    #[test]
    fn keys_that_share_a_prefix_or_zero_padding_stay_apart() {
        let keys: [&[u8]; 10] = [
            b"",
            b"\0",
            b"a",
            b"a\0",
            b"a\0\0\0\0\0\0\0",
            b"abcdefgh",
            b"abcdefgh\0",
            b"abcdefghi",
            b"abcdefghij",
            b"abcdefghi\0",
        ];
        let mut c = Counter::new();
        for (i, k) in keys.iter().enumerate() {
            c.add(k, i as u64 + 1);
        }
        let mut want: Vec<_> = (keys.iter().enumerate())
            .map(|(i, k)| (k.to_vec(), i as u64 + 1))
            .collect();
        want.sort();
        assert_eq!(sorted(&c), want);
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
        let got = sorted(&a);
        assert_eq!(got, sorted(&b));
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
