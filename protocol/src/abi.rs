//! The job ABI: how a p2pmr host and a WebAssembly job module talk, plus the partitioning rule.
//! The guest side is implemented by the `p2pmr-guest` SDK (`wasm-jobs/sdk`), the host side by
//! the executor in `p2pmr-node`; this module is the contract between them.
//!
//! # Version
//!
//! This is ABI version [`ABI_VERSION`] (1). A module exports `p2pmr_abi_version() -> i32`
//! returning the version it was built for; a host refuses any other value before running a task.
//!
//! # Memory ownership
//!
//! The guest owns all of its memory. To pass bytes in, the host calls
//! `p2pmr_input(len) -> ptr`: the guest makes its single input buffer at least `len` bytes long
//! and returns its address; the host writes there and then calls an entry point saying how many
//! bytes it wrote. The buffer stays valid until the next `p2pmr_input` call. Bytes go out only
//! through imports that the host copies from before returning, so the host never keeps a
//! pointer into guest memory.
//!
//! # Exports (all `i32` in and out; entry points return 0 on success)
//!
//! | export | meaning |
//! |---|---|
//! | `memory` | the guest's linear memory |
//! | `p2pmr_abi_version() -> i32` | the ABI version, [`ABI_VERSION`] |
//! | `p2pmr_input(len) -> ptr` | the input buffer, grown to `len` bytes |
//! | `p2pmr_init(len) -> i32` | input buffer = job arguments, [`encode_args`] format |
//! | `p2pmr_map_begin(len) -> i32` | start a map task; input buffer = the input's name |
//! | `p2pmr_map_batch(len, offset: i64) -> i32` | input buffer = whole records (see below), the first starting at byte `offset` of the input |
//! | `p2pmr_map_end() -> i32` | end of the task: flush (run the combiner, emit the rest) |
//! | `p2pmr_reduce(len) -> i32` | reduce one key (input buffer = the key); values are pulled |
//! | `p2pmr_cursor() -> i32` | offset in the current batch of the record being mapped |
//! | `p2pmr_has_combine() -> i32` | 1 if the job has a combiner |
//!
//! Optional: `p2pmr_combined(which) -> i64`, read after `p2pmr_map_end`: the task's pairs into
//! the combiner (`which` = 0) and out of it (1), for the job counters. Modules without it are
//! still v1 modules; their combine counters read 0.
//!
//! Optional: `p2pmr_depends() -> i32`, read after `p2pmr_map_end`: what the task's output
//! depends on besides its records' bytes, the arguments and the reducer count, as bits:
//! [`DEPENDS_ON_OFFSETS`] (it read where records lie in the input), [`DEPENDS_ON_NAME`] (it
//! read the input's name). Hosts reuse a remembered map output for a range elsewhere in an
//! input, or for an input of another name, only when the bit is clear ([`crate::memo`]); a
//! module without the export counts as depending on both.
//!
//! # Imports (module `p2pmr`)
//!
//! | import | meaning |
//! |---|---|
//! | `emit(ptr, len)` | `len` bytes at `ptr` are key/value pairs, [`encode_pair`] format |
//! | `panic(ptr, len)` | the job is about to trap; `len` bytes at `ptr` say why (UTF-8) |
//! | `values(ptr, cap) -> i32` | host writes the current key's next values ([`encode_value`] format, whole values only) at `ptr`, at most `cap` bytes, and returns the byte count; 0 = no more values; `-n` = the next value needs a buffer of `n` bytes |
//!
//! Nothing else is importable: no WASI, no clock, no randomness, so a task's output depends
//! only on its input, arguments and module.
//!
//! # Records and batches
//!
//! A record is a line: bytes up to and including `\n`; a final line without `\n` is a record
//! too. `\r` is kept. A batch holds only whole records, so no record is ever cut in two; the
//! guest SDK hands them to `map` without their `\n`. Values reach `reduce` in batches, so a key
//! with 10^7 values never needs them all in guest memory.

/// The ABI version this crate describes.
pub const ABI_VERSION: i32 = 1;

/// `p2pmr_depends` bit: the map task's output depends on its records' byte offsets.
pub const DEPENDS_ON_OFFSETS: i32 = 1;
/// `p2pmr_depends` bit: the map task's output depends on its input's name.
pub const DEPENDS_ON_NAME: i32 = 2;

/// The exports a job module must have, with their parameter and result counts.
pub const REQUIRED_EXPORTS: [(&str, usize, usize); 9] = [
    ("p2pmr_abi_version", 0, 1),
    ("p2pmr_input", 1, 1),
    ("p2pmr_init", 1, 1),
    ("p2pmr_map_begin", 1, 1),
    ("p2pmr_map_batch", 2, 1),
    ("p2pmr_map_end", 0, 1),
    ("p2pmr_reduce", 1, 1),
    ("p2pmr_cursor", 0, 1),
    ("p2pmr_has_combine", 0, 1),
];

/// Appends one key/value pair: `u32` little-endian key length, key, `u32` LE value length,
/// value.
pub fn encode_pair(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Appends one value: `u32` little-endian length, bytes.
pub fn encode_value(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Splits a buffer of [`encode_pair`] pairs. Returns `None` if it is malformed (a guest bug or
/// a hostile module: the host reports it, it never trusts it).
pub fn decode_pairs(mut buf: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut pairs = Vec::new();
    while !buf.is_empty() {
        let (key, rest) = take_prefixed(buf)?;
        let (value, rest) = take_prefixed(rest)?;
        pairs.push((key, value));
        buf = rest;
    }
    Some(pairs)
}

fn take_prefixed(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let rest = &buf[4..];
    Some((rest.get(..len)?, &rest[len..]))
}

/// Encodes job arguments as `key=value` lines (sorted by key, so equal argument sets give equal
/// bytes). Keys may not contain `=` or `\n`, values may not contain `\n`.
pub fn encode_args<'a>(args: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut args: Vec<_> = args.into_iter().collect();
    args.sort();
    let mut out = Vec::new();
    for (k, v) in args {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The partition (0..reducers) of a key: FNV-1a 64-bit of the key bytes, modulo `reducers`.
/// Stable across peers, builds and platforms by construction (no seeds, no `Hash` impls).
pub fn partition(key: &[u8], reducers: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(reducers.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_reject_garbage() {
        let mut buf = Vec::new();
        encode_pair(&mut buf, b"key", b"value");
        encode_pair(&mut buf, b"", b"");
        assert_eq!(
            decode_pairs(&buf).unwrap(),
            vec![(&b"key"[..], &b"value"[..]), (&b""[..], &b""[..])]
        );
        for cut in 1..buf.len() {
            if cut != 16 {
                assert!(decode_pairs(&buf[..cut]).is_none(), "cut at {cut}");
            }
        }
        assert!(decode_pairs(&[0xff, 0xff, 0xff, 0xff, 1]).is_none());
    }

    #[test]
    fn partition_is_fnv1a() {
        // FNV-1a 64 reference values.
        assert_eq!(
            partition(b"", u32::MAX),
            (0xcbf2_9ce4_8422_2325u64 % u64::from(u32::MAX)) as u32
        );
        assert_eq!(
            partition(b"a", 1 << 31),
            (0xaf63_dc4c_8601_ec8cu64 % (1 << 31)) as u32
        );
        assert_eq!(
            partition(b"foobar", 7),
            (0x8594_4171_f739_67e8u64 % 7) as u32
        );
        assert_eq!(partition(b"x", 0), 0);
    }

    #[test]
    fn args_are_canonical() {
        assert_eq!(
            encode_args([("z", "1"), ("pattern", "a=b")]),
            b"pattern=a=b\nz=1\n".to_vec()
        );
    }
}
