//! `p2pmr-guest`: write a p2pmr MapReduce job in plain Rust.
//!
//! Implement [`Job`] (map, reduce, optionally combine) and call [`export!`]; built for
//! `wasm32-unknown-unknown` the crate becomes a module the p2pmr host runs sandboxed (ABI v1,
//! documented in `p2pmr_protocol::abi`). Built natively, [`local::run`] runs the same code in
//! process, which is how jobs are unit-tested.
//!
//! ```
//! use p2pmr_guest::{Emit, Input, Job, Records, Values};
//!
//! /// Counts the lines of each input.
//! pub struct LineCount;
//!
//! impl Job for LineCount {
//!     fn map(input: &Input, records: Records, emit: &mut Emit) {
//!         emit.emit(input.name(), records.count().to_string());
//!     }
//!     fn reduce(key: &[u8], values: &mut Values, emit: &mut Emit) {
//!         emit.emit(key, values.sum_u64().to_string());
//!     }
//! }
//! p2pmr_guest::export!(LineCount);
//!
//! let out = p2pmr_guest::local::run::<LineCount>(&[("a", b"x\ny\n"), ("b", b"z")], &[], 1);
//! assert_eq!(out.concat(), b"a\t2\nb\t1\n");
//! ```

mod counter;

pub use counter::{decimal, Counter};
use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The ABI version this SDK implements.
pub const ABI_VERSION: i32 = 1;

/// Emitted bytes are handed to the host in buffers of about this size.
const OUTPUT_FLUSH: usize = 64 << 10;
/// The combiner runs when the pairs it holds reach about this many bytes (and at task end).
const COMBINE_LIMIT: usize = 16 << 20;
/// After this many pairs a map task checks whether its combiner is combining anything.
const BYPASS_SAMPLE: u64 = 4096;

/// A MapReduce job. `map` sees whole records (lines), `reduce` sees each key once with all of
/// its values, in ascending key order within a partition.
pub trait Job {
    /// Turns a batch of records of one input into key/value pairs.
    fn map(input: &Input, records: Records, emit: &mut Emit);
    /// Turns a key and all its values into output pairs (written as `key<TAB>value` lines).
    fn reduce(key: &[u8], values: &mut Values, emit: &mut Emit);
    /// Whether [`Job::combine`] is implemented.
    const HAS_COMBINE: bool = false;
    /// A map-side pre-reduce over some of a key's values; must not change what `reduce`
    /// finally produces. Only called when `HAS_COMBINE` is true.
    fn combine(key: &[u8], values: &mut Values, emit: &mut Emit) {
        let _ = (key, values, emit);
    }
    /// Called once at the end of each map task, after its last batch: a job that aggregates
    /// across batches in its own state ("in-mapper combining") emits it here.
    fn map_end(input: &Input, emit: &mut Emit) {
        let _ = (input, emit);
    }
}

/// The input a map task reads, and the job's arguments.
#[derive(Debug)]
pub struct Input<'a> {
    name: &'a str,
    args: &'a Args,
}

impl Input<'_> {
    /// The input's name: its CID on the network, its file name in local mode.
    ///
    /// Like [`Record::offset`], asking tells the host the task's output depends on it: it
    /// is then reused only for an input of the same name.
    pub fn name(&self) -> &str {
        DEPENDS.set(DEPENDS.get() | DEPENDS_ON_NAME);
        self.name
    }

    /// A job argument (`--arg key=value`).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.get(key)
    }
}

/// Job arguments.
#[derive(Debug, Default, Clone)]
pub struct Args {
    pairs: Vec<(String, String)>,
}

impl Args {
    /// Parses `key=value` lines (the ABI's encoding).
    pub fn parse(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let pairs = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self { pairs }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One record: a line without its `\n` (a `\r` before it is kept).
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    offset: u64,
    /// The record's bytes.
    pub bytes: &'a [u8],
}

impl<'a> Record<'a> {
    /// Byte offset of the record in its input.
    ///
    /// A task whose records' offsets were read produces output that holds only for a range
    /// starting where this one did: the host then reuses it only for a task starting at the
    /// same offset, while the output of a task that never asked is reused wherever its bytes
    /// move to (an insertion earlier in the file).
    pub fn offset(&self) -> u64 {
        DEPENDS.set(DEPENDS.get() | DEPENDS_ON_OFFSETS);
        self.offset
    }

    /// The record as UTF-8, if it is.
    pub fn text(&self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes).ok()
    }
}

/// `p2pmr_depends` bit: the map task read a record's byte offset.
const DEPENDS_ON_OFFSETS: i32 = 1;
/// `p2pmr_depends` bit: the map task read its input's name.
const DEPENDS_ON_NAME: i32 = 2;

thread_local! {
    /// Offset (within the batch) of the record being mapped, for error reports after a trap.
    static CURSOR: Cell<usize> = const { Cell::new(0) };
    /// The last map task's combiner input and output pair counts.
    static COMBINED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// What the current map task asked for besides its records' bytes: `DEPENDS_ON_*` bits.
    static DEPENDS: Cell<i32> = const { Cell::new(0) };
}

/// The records of a batch, in order.
#[derive(Debug)]
pub struct Records<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Records<'a> {
    /// Records of `buf`, whose first byte is at `offset` of the input.
    pub fn new(buf: &'a [u8], offset: u64) -> Self {
        Self {
            buf,
            pos: 0,
            base: offset,
        }
    }

    /// The records not yet iterated, as one slice: whole lines, each ended by `\n` (the last
    /// one maybe not), exactly as they lie in the input.
    ///
    /// For jobs that do not care where a record ends, such as counting words (a `\n` is never
    /// part of one): one pass over the batch costs less than a pass per line, which first
    /// looks for the line's end and, in wasm, checks the task's deadline at every loop turn.
    /// A trap while the job works on this slice is reported at the offset of its first record.
    pub fn as_bytes(&self) -> &'a [u8] {
        CURSOR.with(|c| c.set(self.pos));
        &self.buf[self.pos..]
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let start = self.pos;
        CURSOR.with(|c| c.set(start));
        let rest = &self.buf[start..];
        let (line, used) = match memchr(b'\n', rest) {
            Some(i) => (&rest[..i], i + 1),
            None => (rest, rest.len()),
        };
        self.pos += used;
        Some(Record {
            offset: self.base + start as u64,
            bytes: line,
        })
    }
}

/// Position of the first `needle` in `hay`, a word at a time.
fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(needle);
    let mut i = 0;
    while i + 8 <= hay.len() {
        let word = u64::from_le_bytes(hay[i..i + 8].try_into().expect("8 bytes"));
        let x = word ^ pattern;
        // Top bit set in each byte equal to `needle`, and possibly in bytes above one that
        // is (borrows run upwards), so the lowest set bit is exact.
        let found = x.wrapping_sub(LO) & !x & HI;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    hay[i..].iter().position(|&b| b == needle).map(|p| p + i)
}

/// Where emitted pairs go.
trait Sink {
    fn pair(&mut self, key: &[u8], value: &[u8]);
}

/// Emits key/value pairs.
pub struct Emit<'a> {
    sink: &'a mut dyn Sink,
}

impl std::fmt::Debug for Emit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Emit")
    }
}

impl Emit<'_> {
    /// Emits one pair.
    pub fn emit(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.sink.pair(key.as_ref(), value.as_ref());
    }
}

/// Encoded pairs on their way to the host (or, natively, kept).
struct Output {
    buf: Vec<u8>,
    /// Hand full buffers to the host; natively everything is kept for [`local`].
    to_host: bool,
    /// Pairs written.
    pairs: u64,
}

impl Output {
    fn new(to_host: bool) -> Self {
        Self {
            buf: Vec::with_capacity(if to_host { OUTPUT_FLUSH + 1024 } else { 0 }),
            to_host,
            pairs: 0,
        }
    }

    fn flush(&mut self) {
        if self.to_host && !self.buf.is_empty() {
            rt::emit(&self.buf);
            self.buf.clear();
        }
    }
}

impl Sink for Output {
    fn pair(&mut self, key: &[u8], value: &[u8]) {
        self.pairs += 1;
        self.buf
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(value);
        if self.to_host && self.buf.len() >= OUTPUT_FLUSH {
            self.flush();
        }
    }
}

/// FxHash: fast, and deterministic (no random seed exists in a sandbox anyway).
#[derive(Debug, Default)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with a fast, deterministic hasher, for jobs that aggregate in memory.
pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type FxMap<K, V> = FxHashMap<K, V>;

/// Whether two byte strings are equal, compared 8 bytes at a time. `[u8] == [u8]` calls
/// `memcmp`, which on wasm32 is a byte-at-a-time loop from compiler-builtins and was a fifth
/// of wordcount's time natively (a call per hash-table hit).
#[inline]
pub fn eq_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i + 8 <= a.len() {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != y {
            return false;
        }
        i += 8;
    }
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The unsized, borrowed form of a [`KeyBuf`], for lookups without allocating:
/// `map.get_mut(KeyRef::new(bytes))`.
#[derive(Debug)]
#[repr(transparent)]
pub struct KeyRef([u8]);

impl KeyRef {
    /// `bytes` as a key.
    pub fn new(bytes: &[u8]) -> &KeyRef {
        // SAFETY: KeyRef is a repr(transparent) wrapper of [u8], so the two references have
        // the same layout and metadata.
        #[allow(unsafe_code)]
        unsafe {
            &*(bytes as *const [u8] as *const KeyRef)
        }
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq for KeyRef {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        eq_bytes(&self.0, &other.0)
    }
}

impl Eq for KeyRef {}

impl std::hash::Hash for KeyRef {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

/// An owned byte-string key for hash maps, with fast equality and hashing; look it up by
/// [`KeyRef`].
#[derive(Debug, Clone)]
pub struct KeyBuf(Box<[u8]>);

impl KeyBuf {
    /// An owned copy of `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq for KeyBuf {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        KeyRef::new(&self.0) == KeyRef::new(&other.0)
    }
}

impl Eq for KeyBuf {}

impl std::hash::Hash for KeyBuf {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        KeyRef::new(&self.0).hash(state);
    }
}

impl std::borrow::Borrow<KeyRef> for KeyBuf {
    fn borrow(&self) -> &KeyRef {
        KeyRef::new(&self.0)
    }
}

/// Buffers map output by key and runs the job's combiner over it.
struct Combining {
    groups: FxMap<KeyBuf, Vec<u8>>,
    bytes: usize,
    /// Pairs handed to the combiner.
    taken: u64,
    /// Pairs the combiner gave back.
    produced: u64,
    /// Set once the combiner proved useless for this task: pairs then go straight out.
    bypass: bool,
    combine: fn(&[u8], &mut Values, &mut Emit),
    out: Output,
}

impl Combining {
    fn drain(&mut self) {
        let Self {
            groups,
            bytes,
            combine,
            out,
            produced,
            ..
        } = self;
        let before = out.pairs;
        for (key, values) in groups.drain() {
            let mut values = Values::encoded(&values);
            combine(key.as_bytes(), &mut values, &mut Emit { sink: out });
        }
        *produced += out.pairs - before;
        *bytes = 0;
    }
}

impl Sink for Combining {
    fn pair(&mut self, key: &[u8], value: &[u8]) {
        if self.bypass {
            return self.out.pair(key, value);
        }
        // A combiner may run any number of times, zero included (the MapReduce contract), so
        // when the first pairs of a task have (almost) no key twice, buffering and grouping
        // the rest would only cost time: a job that already aggregates in its mapper, like
        // wordcount, emits each key once. Same idea as Spark's skipping of partial
        // aggregation that does not aggregate.
        if self.taken == BYPASS_SAMPLE && (self.groups.len() as u64) * 100 >= BYPASS_SAMPLE * 99 {
            self.drain();
            self.bypass = true;
            return self.out.pair(key, value);
        }
        self.taken += 1;
        match self.groups.get_mut(KeyRef::new(key)) {
            Some(values) => {
                values.extend_from_slice(&(value.len() as u32).to_le_bytes());
                values.extend_from_slice(value);
            }
            None => {
                let mut values = Vec::with_capacity(16);
                values.extend_from_slice(&(value.len() as u32).to_le_bytes());
                values.extend_from_slice(value);
                self.groups.insert(KeyBuf::new(key), values);
                self.bytes += key.len() + 64;
            }
        }
        self.bytes += value.len() + 4;
        if self.bytes >= COMBINE_LIMIT {
            self.drain();
        }
    }
}

/// The sink of a map task: straight to output, or through the combiner.
enum MapSink {
    Plain(Output),
    Combining(Combining),
}

impl MapSink {
    fn new<J: Job>(to_host: bool) -> Self {
        if J::HAS_COMBINE {
            Self::Combining(Combining {
                groups: FxMap::default(),
                bytes: 0,
                taken: 0,
                produced: 0,
                bypass: false,
                combine: J::combine,
                out: Output::new(to_host),
            })
        } else {
            Self::Plain(Output::new(to_host))
        }
    }

    fn sink(&mut self) -> &mut dyn Sink {
        match self {
            Self::Plain(o) => o,
            Self::Combining(c) => c,
        }
    }

    /// Ends the task: combines what is left and hands everything over.
    fn finish(mut self) -> Vec<u8> {
        if let Self::Combining(c) = &mut self {
            c.drain();
        }
        let mut out = match self {
            Self::Plain(o) => o,
            Self::Combining(c) => {
                COMBINED.set((c.taken, c.produced));
                c.out
            }
        };
        out.flush();
        out.buf
    }
}

/// The values of one key, in batches. Use it like an iterator:
/// `while let Some(v) = values.next() { ... }`.
#[derive(Debug)]
pub struct Values<'a> {
    buf: Src<'a>,
    pos: usize,
    len: usize,
    done: bool,
}

#[derive(Debug)]
enum Src<'a> {
    /// All values, already in memory (combiner, native runs).
    Encoded(&'a [u8]),
    /// Pulled from the host a batch at a time.
    Host(Vec<u8>),
}

impl<'a> Values<'a> {
    fn encoded(buf: &'a [u8]) -> Self {
        Self {
            len: buf.len(),
            buf: Src::Encoded(buf),
            pos: 0,
            done: true,
        }
    }

    /// Values pulled from the host into `buf` (kept by the caller across keys, so a reduce
    /// task allocates its value buffer once, not once per key).
    fn from_host(mut buf: Vec<u8>) -> Self {
        if buf.len() < 64 << 10 {
            buf.resize(64 << 10, 0);
        }
        Self {
            buf: Src::Host(buf),
            pos: 0,
            len: 0,
            done: false,
        }
    }

    /// The host buffer back, for the next key.
    fn into_buffer(self) -> Vec<u8> {
        match self.buf {
            Src::Host(buf) => buf,
            Src::Encoded(_) => Vec::new(),
        }
    }

    /// The next value, or `None` after the last.
    #[allow(clippy::should_implement_trait)] // values borrow from an internal buffer
    pub fn next(&mut self) -> Option<&[u8]> {
        if self.pos >= self.len {
            if self.done {
                return None;
            }
            let Src::Host(buf) = &mut self.buf else {
                return None;
            };
            self.len = rt::pull_values(buf);
            self.pos = 0;
            if self.len == 0 {
                self.done = true;
                return None;
            }
        }
        let buf: &[u8] = match &self.buf {
            Src::Encoded(b) => b,
            Src::Host(b) => b,
        };
        let n = u32::from_le_bytes(buf[self.pos..self.pos + 4].try_into().expect("4")) as usize;
        let start = self.pos + 4;
        self.pos = start + n;
        Some(&buf[start..start + n])
    }

    /// Sums the values read as decimal integers (values that are not are skipped).
    pub fn sum_u64(&mut self) -> u64 {
        let mut total = 0u64;
        while let Some(v) = self.next() {
            if let Some(n) = parse_u64(v) {
                total = total.wrapping_add(n);
            }
        }
        total
    }

    /// Counts the values.
    pub fn count(&mut self) -> u64 {
        let mut n = 0;
        while self.next().is_some() {
            n += 1;
        }
        n
    }
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 19 {
        return std::str::from_utf8(bytes).ok()?.parse().ok();
    }
    let mut n = 0u64;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// The key → partition rule (FNV-1a 64 modulo the number of reducers), identical to
/// `p2pmr_protocol::abi::partition`.
pub fn partition(key: &[u8], reducers: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(reducers.max(1))) as u32
}

/// Text helpers shared by jobs.
pub mod text {
    use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

    /// Whether `c` is in Unicode general category L.
    fn is_letter(c: char) -> bool {
        if c.is_ascii() {
            return c.is_ascii_alphabetic();
        }
        c.general_category_group() == GeneralCategoryGroup::Letter
    }

    /// Decodes one UTF-8 character at the start of `b`: `(char, length)`, or `None` if the bytes
    /// there are not valid UTF-8 (then the first byte is a separator).
    fn decode(b: &[u8]) -> Option<(char, usize)> {
        let len = match b[0] {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => return None,
        };
        let s = std::str::from_utf8(b.get(..len)?).ok()?;
        s.chars().next().map(|c| (c, len))
    }

    /// Every byte 1 / every byte's top bit: constants of the 8-bytes-at-a-time scan.
    const LO: u64 = u64::from_le_bytes([1; 8]);
    const HI: u64 = LO << 7;

    /// For 8 bytes read little-endian, bit 7 of each byte that is an ASCII letter. Exact only
    /// below the first byte >= 0x80: above it the additions may carry (see [`ascii_prefix`]).
    #[inline(always)]
    fn ascii_letters(w: u64) -> u64 {
        // `| 0x20` folds A-Z onto a-z and keeps ASCII bytes below 0x80; adding 0x80 - c then
        // sets a byte's top bit exactly when it is >= c, without carrying out of the byte.
        let x = w | (LO * 0x20);
        let ge_a = x.wrapping_add(LO * (0x80 - u64::from(b'a')));
        let gt_z = x.wrapping_add(LO * (0x80 - u64::from(b'z') - 1));
        ge_a & !gt_z & HI
    }

    /// The bits of the bytes before the first byte >= 0x80 (all 64 if there is none).
    #[inline(always)]
    fn ascii_prefix(w: u64) -> u64 {
        let t = w & HI;
        if t == 0 {
            u64::MAX
        } else {
            ((t & t.wrapping_neg()) >> 7) - 1
        }
    }

    #[inline(always)]
    fn load(chunk: &[u8]) -> u64 {
        u64::from_le_bytes(chunk.try_into().expect("8 bytes"))
    }

    /// The next word at or after `i`, as `(start, end)`.
    ///
    /// ASCII text is scanned 8 bytes at a time (a word boundary is a bit found with
    /// `trailing_zeros`), which takes the per-byte loop, and its spills and bounds checks, out
    /// of the hottest path of every text job; a byte >= 0x80 drops to decoding one character.
    #[inline]
    pub(crate) fn next_word(bytes: &[u8], i: usize) -> Option<(usize, usize)> {
        // The common case in straight-line code: all ASCII, the word starts within the next 8
        // bytes and ends within 8 bytes of its start. No loop, so in wasm no loop header, and
        // each of those checks the epoch deadline (10-18% of a task's CPU, measured by turning
        // the checks off).
        if let Some(chunk) = bytes.get(i..i + 8) {
            let w = load(chunk);
            let letters = ascii_letters(w);
            if w & HI == 0 && letters != 0 {
                let start = i + (letters.trailing_zeros() / 8) as usize;
                if let Some(chunk) = bytes.get(start..start + 8) {
                    let w = load(chunk);
                    let others = !ascii_letters(w) & HI & ascii_prefix(w);
                    if others != 0 {
                        return Some((start, start + (others.trailing_zeros() / 8) as usize));
                    }
                }
                return Some((start, word_end(bytes, start)));
            }
        }
        next_word_slow(bytes, i)
    }

    /// [`next_word`] for any text.
    fn next_word_slow(bytes: &[u8], i: usize) -> Option<(usize, usize)> {
        let start = find::<true>(bytes, i);
        (start < bytes.len()).then(|| (start, word_end(bytes, start)))
    }

    /// The end of the word that starts at `start`.
    #[inline]
    fn word_end(bytes: &[u8], start: usize) -> usize {
        find::<false>(bytes, start)
    }

    /// The first position at or after `i` where a letter starts (`LETTER`) or where anything
    /// else does (`!LETTER`): `bytes.len()` if there is none. Invalid UTF-8 is not a letter.
    fn find<const LETTER: bool>(bytes: &[u8], mut i: usize) -> usize {
        loop {
            if let Some(chunk) = bytes.get(i..i + 8) {
                let w = load(chunk);
                let ascii = ascii_prefix(w);
                let letters = ascii_letters(w);
                let hits = if LETTER { letters } else { !letters & HI } & ascii;
                if hits != 0 {
                    return i + (hits.trailing_zeros() / 8) as usize;
                }
                if ascii == u64::MAX {
                    i += 8;
                    continue;
                }
                // Past the ASCII bytes, to the byte >= 0x80.
                i += (ascii.trailing_ones() / 8) as usize;
            } else {
                let Some(&b) = bytes.get(i) else {
                    return i;
                };
                if b < 0x80 {
                    if b.is_ascii_alphabetic() == LETTER {
                        return i;
                    }
                    i += 1;
                    continue;
                }
            }
            match decode(&bytes[i..]) {
                Some((c, n)) if is_letter(c) != LETTER => i += n,
                None if LETTER => i += 1,
                _ => return i,
            }
        }
    }

    /// The words of `bytes`, in order.
    pub fn words(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
        let mut i = 0;
        std::iter::from_fn(move || {
            let (start, end) = next_word(bytes, i)?;
            i = end;
            Some(&bytes[start..end])
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn ws(b: &[u8]) -> Vec<&[u8]> {
            words(b).collect()
        }

        /// The plain byte-at-a-time scanner the fast one must agree with.
        fn reference(bytes: &[u8]) -> Vec<&[u8]> {
            let mut out = vec![];
            let mut i = 0;
            let mut start = None;
            while i < bytes.len() {
                let (letter, n) = match decode(&bytes[i..]) {
                    Some((c, n)) => (is_letter(c), n),
                    None if bytes[i] < 0x80 => (bytes[i].is_ascii_alphabetic(), 1),
                    None => (false, 1),
                };
                match (letter, start) {
                    (true, None) => start = Some(i),
                    (false, Some(s)) => {
                        out.push(&bytes[s..i]);
                        start = None;
                    }
                    _ => {}
                }
                i += n;
            }
            if let Some(s) = start {
                out.push(&bytes[s..]);
            }
            out
        }

        #[test]
        fn the_fast_scan_agrees_with_the_byte_loop() {
            // Pieces whose mixes put every kind of boundary at every offset of an 8-byte
            // window: ASCII letters and separators (including those next to A-Z/a-z, @ [ ` {),
            // multi-byte letters and non-letters, a mark, truncated and invalid UTF-8.
            let pieces: [&[u8]; 16] = [
                b"a",
                b"Z",
                b"word",
                b"longerwordhere",
                b" ",
                b"@[`{",
                b"\n",
                b"\r\n",
                b"9",
                "é".as_bytes(),
                "日本".as_bytes(),
                "\u{301}".as_bytes(),
                "\u{2161}".as_bytes(),
                "—".as_bytes(),
                b"\xff",
                b"\xe6\x97",
            ];
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for _ in 0..20_000 {
                let mut text = vec![];
                for _ in 0..next() % 24 {
                    text.extend_from_slice(pieces[(next() % 16) as usize]);
                }
                assert_eq!(
                    ws(&text),
                    reference(&text),
                    "{:?}",
                    String::from_utf8_lossy(&text)
                );
            }
            // Every byte value next to letters, at every offset.
            for b in 0..=255u8 {
                for at in 0..10 {
                    let mut text = b"abcdefghijk".to_vec();
                    text.insert(at, b);
                    assert_eq!(ws(&text), reference(&text), "byte {b:#x} at {at}");
                }
            }
        }

        #[test]
        fn words_are_runs_of_letters() {
            assert_eq!(
                ws(b"Hello, world! it's x2y"),
                vec![&b"Hello"[..], b"world", b"it", b"s", b"x", b"y"]
            );
            assert_eq!(ws("naïve Straße ΔΣ 日本語".as_bytes()).len(), 4);
            // Marks (Mn) and letter numbers (Nl, e.g. Roman numeral two) separate words, unlike
            // char::is_alphabetic.
            assert_eq!(ws("e\u{301}x".as_bytes()), vec![&b"e"[..], b"x"]);
            assert_eq!(ws("a\u{2161}b".as_bytes()), vec![&b"a"[..], b"b"]);
            // Invalid UTF-8 separates; \r is not a letter.
            assert_eq!(ws(b"ab\xffcd\r"), vec![&b"ab"[..], b"cd"]);
            assert_eq!(ws(b"\xe6\x97"), Vec::<&[u8]>::new());
            assert!(ws(b"").is_empty());
        }
    }
}

/// Running jobs natively, in this process: the reference for tests and benchmarks.
pub mod local {
    use super::*;

    /// A map task run natively, fed batches of whole records as the host feeds them.
    pub struct MapTask<J: Job> {
        sink: MapSink,
        args: Args,
        name: String,
        job: std::marker::PhantomData<J>,
    }

    impl<J: Job> std::fmt::Debug for MapTask<J> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MapTask").field("name", &self.name).finish()
        }
    }

    impl<J: Job> MapTask<J> {
        /// Starts a map task over the input `name`.
        pub fn new(name: &str, args: &[(&str, &str)]) -> Self {
            let pairs = args
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            Self {
                sink: MapSink::new::<J>(false),
                args: Args { pairs },
                name: name.to_owned(),
                job: std::marker::PhantomData,
            }
        }

        /// Maps a batch of whole records starting at `offset` of the input.
        pub fn batch(&mut self, records: &[u8], offset: u64) {
            let input = Input {
                name: &self.name,
                args: &self.args,
            };
            J::map(
                &input,
                Records::new(records, offset),
                &mut Emit {
                    sink: self.sink.sink(),
                },
            );
        }

        /// Ends the task; returns the (combined) pairs, ABI-encoded.
        pub fn finish(mut self) -> Vec<u8> {
            let input = Input {
                name: &self.name,
                args: &self.args,
            };
            J::map_end(
                &input,
                &mut Emit {
                    sink: self.sink.sink(),
                },
            );
            self.sink.finish()
        }
    }

    /// Decodes ABI-encoded pairs.
    pub fn pairs(mut buf: &[u8]) -> Vec<(&[u8], &[u8])> {
        fn take<'b>(b: &mut &'b [u8]) -> &'b [u8] {
            let n = u32::from_le_bytes(b[..4].try_into().expect("4")) as usize;
            let v = &b[4..4 + n];
            *b = &b[4 + n..];
            v
        }
        let mut out = Vec::new();
        while !buf.is_empty() {
            let k = take(&mut buf);
            let v = take(&mut buf);
            out.push((k, v));
        }
        out
    }

    /// Runs a reduce over `values` (ABI-encoded) of one key; returns the output lines.
    pub fn reduce<J: Job>(key: &[u8], values: &[u8], out: &mut Vec<u8>) {
        let mut sink = Output::new(false);
        J::reduce(
            key,
            &mut Values::encoded(values),
            &mut Emit { sink: &mut sink },
        );
        for (k, v) in pairs(&sink.buf) {
            out.extend_from_slice(k);
            out.push(b'\t');
            out.extend_from_slice(v);
            out.push(b'\n');
        }
    }

    /// Runs the whole job over in-memory inputs (name, bytes) with `reducers` partitions and
    /// returns each partition's output (`key<TAB>value` lines in key order).
    pub fn run<J: Job>(
        inputs: &[(&str, &[u8])],
        args: &[(&str, &str)],
        reducers: u32,
    ) -> Vec<Vec<u8>> {
        let mut parts: Vec<Vec<(Vec<u8>, Vec<u8>)>> = vec![Vec::new(); reducers.max(1) as usize];
        for (name, bytes) in inputs {
            let mut task = MapTask::<J>::new(name, args);
            task.batch(bytes, 0);
            let out = task.finish();
            for (k, v) in pairs(&out) {
                parts[partition(k, reducers) as usize].push((k.to_vec(), v.to_vec()));
            }
        }
        parts
            .into_iter()
            .map(|mut part| {
                part.sort_by(|a, b| a.0.cmp(&b.0));
                let mut out = Vec::new();
                let mut i = 0;
                while i < part.len() {
                    let mut values = Vec::new();
                    let mut j = i;
                    while j < part.len() && part[j].0 == part[i].0 {
                        crate::encode_value(&mut values, &part[j].1);
                        j += 1;
                    }
                    reduce::<J>(&part[i].0, &values, &mut out);
                    i = j;
                }
                out
            })
            .collect()
    }
}

fn encode_value(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// The guest side of the ABI; used by [`export!`]. Not for direct use.
#[doc(hidden)]
pub mod rt {
    use super::*;
    use std::cell::RefCell;

    struct Task {
        input: Vec<u8>,
        args: Args,
        name: String,
        sink: Option<MapSink>,
        /// Reduce buffers, reused from key to key.
        values: Vec<u8>,
        output: Vec<u8>,
    }

    thread_local! {
        static TASK: RefCell<Task> = const { RefCell::new(Task {
            input: Vec::new(),
            args: Args { pairs: Vec::new() },
            name: String::new(),
            sink: None,
            values: Vec::new(),
            output: Vec::new(),
        }) };
    }

    #[cfg(target_arch = "wasm32")]
    #[allow(unsafe_code)]
    mod host {
        // The host bounds-checks every pointer against this module's memory.
        #[link(wasm_import_module = "p2pmr")]
        unsafe extern "C" {
            pub(super) safe fn emit(ptr: *const u8, len: i32);
            pub(super) safe fn values(ptr: *mut u8, cap: i32) -> i32;
            pub(super) safe fn panic(ptr: *const u8, len: i32);
        }
    }

    /// Sends a panic's message to the host (which reports it with the trap that follows).
    fn install_panic_hook() {
        #[cfg(target_arch = "wasm32")]
        std::panic::set_hook(Box::new(|info| {
            let msg = info.to_string();
            host::panic(msg.as_ptr(), msg.len() as i32);
        }));
    }

    /// Hands encoded pairs to the host.
    pub(crate) fn emit(buf: &[u8]) {
        #[cfg(target_arch = "wasm32")]
        host::emit(buf.as_ptr(), buf.len() as i32);
        #[cfg(not(target_arch = "wasm32"))]
        let _ = buf;
    }

    /// Fills `buf` with the next values from the host; 0 when there are no more.
    pub(crate) fn pull_values(buf: &mut Vec<u8>) -> usize {
        #[cfg(target_arch = "wasm32")]
        loop {
            let n = host::values(buf.as_mut_ptr(), buf.len() as i32);
            if n >= 0 {
                return n as usize;
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = buf;
            0
        }
    }

    pub fn input(len: i32) -> i32 {
        TASK.with_borrow_mut(|t| {
            let len = len.max(0) as usize;
            if t.input.len() < len {
                t.input.resize(len, 0);
            }
            t.input.as_mut_ptr() as usize as i32
        })
    }

    pub fn init(len: i32) -> i32 {
        install_panic_hook();
        TASK.with_borrow_mut(|t| t.args = Args::parse(&t.input[..len as usize]));
        0
    }

    pub fn map_begin<J: Job>(len: i32) -> i32 {
        TASK.with_borrow_mut(|t| {
            t.name = String::from_utf8_lossy(&t.input[..len as usize]).into_owned();
            t.sink = Some(MapSink::new::<J>(true));
        });
        DEPENDS.set(0);
        0
    }

    pub fn map_batch<J: Job>(len: i32, offset: i64) -> i32 {
        TASK.with_borrow_mut(|t| {
            let Task {
                input,
                args,
                name,
                sink,
                ..
            } = t;
            let Some(sink) = sink else { return 1 };
            let input_ref = Input { name, args };
            J::map(
                &input_ref,
                Records::new(&input[..len as usize], offset as u64),
                &mut Emit { sink: sink.sink() },
            );
            0
        })
    }

    pub fn map_end<J: Job>() -> i32 {
        let Some((mut sink, name, args)) =
            TASK.with_borrow_mut(|t| Some((t.sink.take()?, t.name.clone(), t.args.clone())))
        else {
            return 1;
        };
        J::map_end(
            &Input {
                name: &name,
                args: &args,
            },
            &mut Emit { sink: sink.sink() },
        );
        sink.finish();
        0
    }

    pub fn reduce<J: Job>(len: i32) -> i32 {
        let (key, values, output) = TASK.with_borrow_mut(|t| {
            (
                t.input[..len as usize].to_vec(),
                std::mem::take(&mut t.values),
                std::mem::take(&mut t.output),
            )
        });
        let mut out = Output {
            buf: output,
            to_host: true,
            pairs: 0,
        };
        let mut values = Values::from_host(values);
        J::reduce(&key, &mut values, &mut Emit { sink: &mut out });
        out.flush();
        TASK.with_borrow_mut(|t| {
            t.values = values.into_buffer();
            t.output = out.buf;
        });
        0
    }

    pub fn cursor() -> i32 {
        CURSOR.with(|c| c.get() as i32)
    }

    /// What the map task asked for besides its records' bytes (`p2pmr_depends`).
    pub fn depends() -> i32 {
        DEPENDS.get()
    }

    /// The map task's combiner counts: pairs in (`which` 0) or out (1).
    pub fn combined(which: i32) -> i64 {
        let (taken, given) = COMBINED.get();
        (if which == 0 { taken } else { given }) as i64
    }
}

/// Exports a [`Job`] as a p2pmr module (on `wasm32` targets; elsewhere it expands to nothing,
/// so the same crate also builds natively for tests).
#[macro_export]
macro_rules! export {
    ($job:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_abi_version() -> i32 {
                $crate::ABI_VERSION
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_input(len: i32) -> i32 {
                $crate::rt::input(len)
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_init(len: i32) -> i32 {
                $crate::rt::init(len)
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_map_begin(len: i32) -> i32 {
                $crate::rt::map_begin::<$job>(len)
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_map_batch(len: i32, offset: i64) -> i32 {
                $crate::rt::map_batch::<$job>(len, offset)
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_map_end() -> i32 {
                $crate::rt::map_end::<$job>()
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_reduce(len: i32) -> i32 {
                $crate::rt::reduce::<$job>(len)
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_cursor() -> i32 {
                $crate::rt::cursor()
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_combined(which: i32) -> i64 {
                $crate::rt::combined(which)
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_depends() -> i32 {
                $crate::rt::depends()
            }
            #[unsafe(no_mangle)]
            extern "C" fn p2pmr_has_combine() -> i32 {
                <$job as $crate::Job>::HAS_COMBINE as i32
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_on_newlines_and_keep_cr() {
        let recs: Vec<(u64, &[u8])> = Records::new(b"a\r\n\nbc\nlast", 100)
            .map(|r| (r.offset, r.bytes))
            .collect();
        assert_eq!(
            recs,
            vec![
                (100, &b"a\r"[..]),
                (103, &b""[..]),
                (104, &b"bc"[..]),
                (107, &b"last"[..])
            ]
        );
        assert_eq!(Records::new(b"", 0).count(), 0);
        for n in 0..40 {
            let mut hay = vec![b'x'; n];
            hay.push(b'\n');
            assert_eq!(memchr(b'\n', &hay), Some(n));
            assert_eq!(memchr(b'\n', &hay[..n]), None);
            // Bytes one above the needle right after it are where the word trick's borrow
            // makes false hits; the first hit must still be the real one.
            let mut hay = vec![b'\n' + 1; n + 9];
            hay[n] = b'\n';
            hay[n + 3] = b'\n';
            assert_eq!(memchr(b'\n', &hay), Some(n));
        }
    }

    #[test]
    fn as_bytes_is_the_records_not_yet_iterated() {
        let mut recs = Records::new(b"a b\ncd\nlast", 7);
        assert_eq!(recs.as_bytes(), b"a b\ncd\nlast");
        assert_eq!(CURSOR.get(), 0);
        assert_eq!(recs.next().map(|r| r.bytes), Some(&b"a b"[..]));
        assert_eq!(recs.as_bytes(), b"cd\nlast");
        // A trap from here on is reported at the first record the slice holds.
        assert_eq!(CURSOR.get(), 4);
        recs.by_ref().for_each(drop);
        assert_eq!(recs.as_bytes(), b"");
        assert_eq!(Records::new(b"", 0).as_bytes(), b"");
    }

    #[test]
    fn partition_matches_fnv1a() {
        assert_eq!(
            partition(b"foobar", 7),
            (0x8594_4171_f739_67e8u64 % 7) as u32
        );
    }

    struct Sum;
    impl Job for Sum {
        fn map(_: &Input, records: Records, emit: &mut Emit) {
            for r in records {
                emit.emit(r.bytes, "1");
            }
        }
        fn reduce(key: &[u8], values: &mut Values, emit: &mut Emit) {
            emit.emit(key, values.sum_u64().to_string());
        }
        const HAS_COMBINE: bool = true;
        fn combine(key: &[u8], values: &mut Values, emit: &mut Emit) {
            emit.emit(key, values.sum_u64().to_string());
        }
    }

    #[test]
    fn combine_then_reduce() {
        let out = local::run::<Sum>(&[("a", b"x\ny\nx\n"), ("b", b"x")], &[], 2);
        let mut lines: Vec<&[u8]> = out.iter().flat_map(|p| p.split(|&b| b == b'\n')).collect();
        lines.retain(|l| !l.is_empty());
        lines.sort();
        assert_eq!(lines, vec![&b"x\t3"[..], &b"y\t1"[..]]);
    }

    /// (pairs the combiner took, pairs it gave back, pairs out of the task) for `lines`.
    fn combined(lines: impl Iterator<Item = String>) -> (u64, u64, usize) {
        let text: String = lines.map(|l| l + "\n").collect();
        let mut task = local::MapTask::<Sum>::new("in", &[]);
        task.batch(text.as_bytes(), 0);
        let out = local::pairs(&task.finish()).len();
        let (taken, given) = COMBINED.get();
        (taken, given, out)
    }

    #[test]
    fn a_combiner_that_combines_nothing_steps_aside() {
        // Every key distinct: after the sample the rest goes straight out, uncombined.
        let n = 3 * BYPASS_SAMPLE as usize;
        let (taken, given, out) = combined((0..n).map(|i| format!("k{i}")));
        assert_eq!((taken, given, out), (BYPASS_SAMPLE, BYPASS_SAMPLE, n));
        // A few repeats in the sample (under 1%) still count as nothing to combine.
        let (taken, given, out) =
            combined((0..n).map(|i| format!("k{}", if i < 30 { 0 } else { i })));
        assert_eq!(
            (taken, given, out),
            (BYPASS_SAMPLE, BYPASS_SAMPLE - 29, n - 29)
        );
        // Keys that repeat keep the combiner on to the end.
        let (taken, given, out) = combined((0..n).map(|i| format!("k{}", i % 100)));
        assert_eq!((taken, given, out), (n as u64, 100, 100));
    }
}
