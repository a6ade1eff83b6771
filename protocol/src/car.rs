//! CAR files (content-addressed archives, the IPFS format for moving DAGs between tools): a
//! CARv1 encoder and a sans-I/O reader of CARv1 and CARv2 that yields verified blocks.
//!
//! CARv1 is a varint-prefixed dag-cbor header `{"roots": [CID...], "version": 1}` followed by
//! sections, each `varint(len) || CID bytes || block bytes`. CARv2 wraps a CARv1 payload: an
//! 11-byte pragma, a 40-byte header (characteristics, then the payload's offset and size and
//! the index's offset, little-endian u64s), the payload, and an optional index, which the reader
//! skips. The header's dag-cbor is written and read by hand: it is one small map, and the
//! reader must refuse hostile input with an error, never a panic or an unbounded allocation.
//!
//! The reader is fed bytes as they arrive ([`CarReader::feed`]) and asked for what they make
//! ([`CarReader::next_event`]); it buffers at most one section, so a CAR of any size streams through
//! in bounded memory.

use crate::block::{Block, BlockError, MAX_BLOCK_SIZE};
use cid::Cid;
use thiserror::Error;

/// Largest header accepted (the roots of a CAR are few).
pub const MAX_HEADER: usize = 64 * 1024;
/// Largest section accepted: a block of [`MAX_BLOCK_SIZE`] and its CID.
pub const MAX_SECTION: usize = MAX_BLOCK_SIZE + 1024;
/// Most roots a header may name.
pub const MAX_ROOTS: usize = 1024;
/// The CARv2 pragma: `varint(10)` and the dag-cbor map `{"version": 2}`.
pub const V2_PRAGMA: [u8; 11] = [
    0x0a, 0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x02,
];
/// The CARv2 header after the pragma: 16 bytes of characteristics, three u64s.
const V2_HEADER: usize = 40;
/// dag-cbor's tag for a CID.
const CID_TAG: u64 = 42;
/// How deep a header value may nest before it is refused.
const MAX_NESTING: usize = 16;

/// Why a CAR is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CarError {
    /// The header is not a CAR header.
    #[error("not a CAR file: {0}")]
    Header(&'static str),
    /// The CAR version is not 1 or 2.
    #[error("CAR version {0} is not supported (only 1 and 2)")]
    Version(u64),
    /// A section is malformed.
    #[error("malformed CAR section at byte {offset}: {what}")]
    Section {
        /// Where the section starts in the stream.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// A block's bytes do not match its CID (or cannot be checked).
    #[error("corrupt block in the CAR: {0}")]
    Block(#[from] BlockError),
    /// The stream ended inside the header or a section.
    #[error("the CAR is truncated")]
    Truncated,
}

/// What the reader found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CarEvent {
    /// The header: the roots and the CAR version (1, or 2 for a wrapped CARv1).
    Header {
        /// The DAG roots the CAR names.
        roots: Vec<Cid>,
        /// 1 or 2.
        version: u8,
    },
    /// A block, verified against its CID.
    Block(Block),
}

/// The CARv1 header naming `roots`, with its varint length prefix.
pub fn header_v1(roots: &[Cid]) -> Vec<u8> {
    let mut cbor = vec![0xa2]; // map(2), keys in dag-cbor order: shorter first
    text(&mut cbor, "roots");
    head(&mut cbor, 4, roots.len() as u64);
    for root in roots {
        let bytes = root.to_bytes();
        head(&mut cbor, 6, CID_TAG);
        // A CID in dag-cbor is a byte string with a leading 0 (the multibase identity prefix).
        head(&mut cbor, 2, bytes.len() as u64 + 1);
        cbor.push(0);
        cbor.extend_from_slice(&bytes);
    }
    text(&mut cbor, "version");
    head(&mut cbor, 0, 1);
    let mut out = varint(cbor.len() as u64);
    out.extend_from_slice(&cbor);
    out
}

/// The start of a section for `cid` whose block is `len` bytes: its length prefix and the CID;
/// the block's bytes follow it.
pub fn section_prefix(cid: &Cid, len: usize) -> Vec<u8> {
    let cid = cid.to_bytes();
    let mut out = varint((cid.len() + len) as u64);
    out.extend_from_slice(&cid);
    out
}

/// A sans-I/O CAR reader (see the module docs).
#[derive(Debug, Default)]
pub struct CarReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already used.
    at: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    state: State,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting the CARv1 header or the CARv2 pragma.
    #[default]
    Start,
    /// CARv2: expecting the 40-byte header after the pragma.
    V2Header,
    /// CARv2: skipping to the payload, which starts at this stream offset and ends at `end`.
    V2Skip { start: u64, end: u64 },
    /// Reading the CARv1 header of a CARv2 payload that ends at `end`.
    V2Inner { end: u64 },
    /// Reading sections until `end` (CARv2's payload end) or the stream's end.
    Sections { end: Option<u64>, version: u8 },
    /// The payload is done; what follows (a CARv2 index) is ignored.
    Done,
}

impl CarReader {
    /// A reader at the start of a CAR.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.state == State::Done {
            self.base += bytes.len() as u64;
            return;
        }
        if self.at > 0 && self.at == self.buf.len() {
            self.base += self.at as u64;
            self.buf.clear();
            self.at = 0;
        } else if self.at > MAX_SECTION {
            self.base += self.at as u64;
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next header or block, or `None` when more bytes are needed (or the CAR is done).
    pub fn next_event(&mut self) -> Result<Option<CarEvent>, CarError> {
        loop {
            match self.state {
                State::Start => {
                    if self.available() < V2_PRAGMA.len() && self.available() < 2 {
                        return Ok(None);
                    }
                    if self.rest().starts_with(&V2_PRAGMA) {
                        self.at += V2_PRAGMA.len();
                        self.state = State::V2Header;
                        continue;
                    }
                    if V2_PRAGMA.starts_with(self.rest()) {
                        return Ok(None); // could still be the pragma
                    }
                    let Some((roots, version)) = self.header()? else {
                        return Ok(None);
                    };
                    if version != 1 {
                        return Err(CarError::Version(version));
                    }
                    self.state = State::Sections {
                        end: None,
                        version: 1,
                    };
                    return Ok(Some(CarEvent::Header { roots, version: 1 }));
                }
                State::V2Header => {
                    if self.available() < V2_HEADER {
                        return Ok(None);
                    }
                    let h = &self.rest()[..V2_HEADER];
                    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8"));
                    let (offset, size) = (u64_at(16), u64_at(24));
                    self.at += V2_HEADER;
                    let here = self.position();
                    let end = offset
                        .checked_add(size)
                        .ok_or(CarError::Header("CARv2 payload offset and size overflow"))?;
                    if offset < here {
                        return Err(CarError::Header("CARv2 payload starts inside its header"));
                    }
                    self.state = State::V2Skip { start: offset, end };
                }
                State::V2Skip { start, end } => {
                    let skip = (start - self.position()).min(self.available() as u64) as usize;
                    self.at += skip;
                    if self.position() < start {
                        return Ok(None);
                    }
                    self.state = State::V2Inner { end };
                }
                State::V2Inner { end } => {
                    let Some((roots, version)) = self.header()? else {
                        return Ok(None);
                    };
                    if version != 1 {
                        return Err(CarError::Header("a CARv2 payload must be a CARv1"));
                    }
                    if self.position() > end {
                        return Err(CarError::Header("CARv2 payload shorter than its header"));
                    }
                    self.state = State::Sections {
                        end: Some(end),
                        version: 2,
                    };
                    return Ok(Some(CarEvent::Header { roots, version: 2 }));
                }
                State::Sections { end, .. } => {
                    if end.is_some_and(|end| self.position() >= end) {
                        self.state = State::Done;
                        return Ok(None);
                    }
                    return self.section(end).map(|b| b.map(CarEvent::Block));
                }
                State::Done => return Ok(None),
            }
        }
    }

    /// Says whether the stream may end here: after the header and whole sections only.
    pub fn end(&self) -> Result<(), CarError> {
        match self.state {
            State::Sections { end: None, .. } if self.available() == 0 => Ok(()),
            State::Done => Ok(()),
            _ => Err(CarError::Truncated),
        }
    }

    fn rest(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    fn available(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The stream offset of the next unread byte.
    fn position(&self) -> u64 {
        self.base + self.at as u64
    }

    /// Reads a length-prefixed dag-cbor header: `(roots, version)`, or `None` for more bytes.
    fn header(&mut self) -> Result<Option<(Vec<Cid>, u64)>, CarError> {
        let Some((len, n)) = read_varint(self.rest()).map_err(CarError::Header)? else {
            return Ok(None);
        };
        if len == 0 || len > MAX_HEADER as u64 {
            return Err(CarError::Header("header length out of range"));
        }
        let len = len as usize;
        if self.available() < n + len {
            return Ok(None);
        }
        let cbor = &self.rest()[n..n + len];
        let parsed = parse_header(cbor).map_err(CarError::Header)?;
        self.at += n + len;
        Ok(Some(parsed))
    }

    /// Reads one section, if whole: a verified block.
    fn section(&mut self, end: Option<u64>) -> Result<Option<Block>, CarError> {
        let offset = self.position();
        let bad = |what| CarError::Section { offset, what };
        let Some((len, n)) = read_varint(self.rest()).map_err(bad)? else {
            return Ok(None);
        };
        if len == 0 || len > MAX_SECTION as u64 {
            return Err(bad("section length out of range"));
        }
        if end.is_some_and(|end| offset + n as u64 + len > end) {
            return Err(bad("section runs past the CARv2 payload"));
        }
        let len = len as usize;
        if self.available() < n + len {
            return Ok(None);
        }
        let mut section = &self.rest()[n..n + len];
        let cid = Cid::read_bytes(&mut section).map_err(|_| bad("invalid CID"))?;
        let data = section.to_vec();
        self.at += n + len;
        Ok(Some(Block::new(cid, data)?))
    }
}

/// A varint (unsigned LEB128, at most 9 bytes as multiformats allow) at the start of `bytes`:
/// `(value, bytes used)`, or `None` if `bytes` ends inside it.
fn read_varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, &'static str> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(9) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err("varint not minimally encoded");
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 9 {
        return Err("varint longer than 9 bytes");
    }
    Ok(None)
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Writes a CBOR head: major type and argument, in the shortest form (as dag-cbor requires).
fn head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    match arg {
        0..=23 => out.push(m | arg as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, arg as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(arg as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(arg as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&arg.to_be_bytes());
        }
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over dag-cbor bytes, reading just what a CAR header holds.
struct Cbor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cbor<'a> {
    /// The next head: `(major type, argument)`. Indefinite lengths are not dag-cbor.
    fn head(&mut self) -> Result<(u8, u64), &'static str> {
        let (&first, rest) = self.bytes.split_first().ok_or("header cut short")?;
        let (major, info) = (first >> 5, first & 0x1f);
        let width = match info {
            0..=23 => 0,
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return Err("indefinite or reserved CBOR length in the header"),
        };
        if rest.len() < width {
            return Err("header cut short");
        }
        let arg = if width == 0 {
            u64::from(info)
        } else {
            rest[..width]
                .iter()
                .fold(0u64, |a, &b| (a << 8) | u64::from(b))
        };
        self.bytes = &rest[width..];
        Ok((major, arg))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], &'static str> {
        let len = usize::try_from(len).map_err(|_| "header value too long")?;
        if self.bytes.len() < len {
            return Err("header cut short");
        }
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    /// Skips one value of any type (a header key this reader does not use).
    fn skip(&mut self, depth: usize) -> Result<(), &'static str> {
        if depth > MAX_NESTING {
            return Err("header nests too deeply");
        }
        let (major, arg) = self.head()?;
        match major {
            0 | 1 | 7 => Ok(()),
            2 | 3 => self.take(arg).map(drop),
            4 => (0..arg).try_for_each(|_| self.skip(depth + 1)),
            5 => (0..arg).try_for_each(|_| {
                self.skip(depth + 1)?;
                self.skip(depth + 1)
            }),
            _ => self.skip(depth + 1), // a tag: skip what it tags
        }
    }
}

/// Parses a CARv1 header's dag-cbor: `(roots, version)`.
fn parse_header(bytes: &[u8]) -> Result<(Vec<Cid>, u64), &'static str> {
    let mut c = Cbor { bytes };
    let (major, entries) = c.head()?;
    if major != 5 {
        return Err("header is not a map");
    }
    let (mut roots, mut version) = (None, None);
    for _ in 0..entries {
        let (major, len) = c.head()?;
        if major != 3 {
            return Err("header key is not a string");
        }
        match c.take(len)? {
            b"roots" => {
                let (major, n) = c.head()?;
                if major != 4 {
                    return Err("roots is not a list");
                }
                if n > MAX_ROOTS as u64 {
                    return Err("too many roots");
                }
                let mut list = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    if c.head()? != (6, CID_TAG) {
                        return Err("a root is not a CID");
                    }
                    let (major, len) = c.head()?;
                    let bytes = c.take(len)?;
                    match (major, bytes.split_first()) {
                        (2, Some((0, cid))) => {
                            list.push(Cid::try_from(cid).map_err(|_| "a root is not a valid CID")?)
                        }
                        _ => return Err("a root is not a CID"),
                    }
                }
                roots = Some(list);
            }
            b"version" => match c.head()? {
                (0, v) => version = Some(v),
                _ => return Err("version is not a number"),
            },
            _ => c.skip(0)?,
        }
    }
    if !c.bytes.is_empty() {
        return Err("bytes after the header map");
    }
    match (roots, version) {
        (Some(roots), Some(1)) => Ok((roots, 1)),
        (_, Some(1)) => Err("header has no roots"),
        (_, Some(v)) => Ok((Vec::new(), v)),
        (_, None) => Err("header has no version"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn car(roots: &[Cid], blocks: &[&Block]) -> Vec<u8> {
        let mut out = header_v1(roots);
        for b in blocks {
            out.extend(section_prefix(b.cid(), b.len()));
            out.extend_from_slice(b.data());
        }
        out
    }

    fn v2(inner: &[u8], pad: usize, index: &[u8]) -> Vec<u8> {
        let offset = (V2_PRAGMA.len() + V2_HEADER + pad) as u64;
        let mut out = V2_PRAGMA.to_vec();
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(inner.len() as u64).to_le_bytes());
        out.extend_from_slice(&(offset + inner.len() as u64).to_le_bytes());
        out.extend(std::iter::repeat_n(0, pad));
        out.extend_from_slice(inner);
        out.extend_from_slice(index);
        out
    }

    /// Everything the reader yields when fed `bytes` in pieces of `step`, and whether it
    /// accepts the end there.
    fn read(bytes: &[u8], step: usize) -> Result<Vec<CarEvent>, CarError> {
        let mut r = CarReader::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            r.feed(piece);
            while let Some(e) = r.next_event()? {
                out.push(e);
            }
        }
        r.end()?;
        Ok(out)
    }

    #[test]
    fn the_header_is_the_dag_cbor_the_spec_gives() {
        // hello world\n as a raw leaf: bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4
        let leaf = Block::raw(b"hello world\n".to_vec());
        let cid = leaf.cid().to_bytes();
        let mut want = vec![0xa2, 0x65];
        want.extend_from_slice(b"roots");
        want.extend_from_slice(&[0x81, 0xd8, 0x2a, 0x58, 0x25, 0x00]);
        want.extend_from_slice(&cid);
        want.push(0x67);
        want.extend_from_slice(b"version");
        want.push(0x01);
        let header = header_v1(&[*leaf.cid()]);
        assert_eq!(header[0] as usize, want.len());
        assert_eq!(&header[1..], &want[..]);
    }

    #[test]
    fn v1_and_v2_round_trip_fed_in_any_pieces() {
        let a = Block::raw(vec![7; 300_000]);
        let b = Block::raw(b"b".to_vec());
        let empty = Block::raw(Vec::new());
        let v1 = car(&[*a.cid()], &[&a, &b, &empty]);
        let want = vec![
            CarEvent::Header {
                roots: vec![*a.cid()],
                version: 1,
            },
            CarEvent::Block(a.clone()),
            CarEvent::Block(b.clone()),
            CarEvent::Block(empty.clone()),
        ];
        for step in [1, 2, 7, 11, 4096, v1.len()] {
            assert_eq!(read(&v1, step).unwrap(), want, "v1 in pieces of {step}");
        }
        let mut want2 = want.clone();
        want2[0] = CarEvent::Header {
            roots: vec![*a.cid()],
            version: 2,
        };
        for (pad, index) in [(0, &b""[..]), (13, &b"an index the reader skips"[..])] {
            let wrapped = v2(&v1, pad, index);
            for step in [1, 5, 40, wrapped.len()] {
                assert_eq!(
                    read(&wrapped, step).unwrap(),
                    want2,
                    "v2 pad {pad} step {step}"
                );
            }
        }
    }

    #[test]
    fn a_corrupt_block_is_refused_naming_its_cid() {
        let good = Block::raw(b"good".to_vec());
        let mut bytes = car(&[*good.cid()], &[&good]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        match read(&bytes, 3) {
            Err(CarError::Block(BlockError::HashMismatch { cid })) => assert_eq!(cid, *good.cid()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_and_malformed_cars_are_refused_without_panicking() {
        let a = Block::raw(vec![1; 1000]);
        let v1 = car(&[*a.cid()], &[&a]);
        // Every truncation but the whole and the header-only prefix is an error.
        let header_len = header_v1(&[*a.cid()]).len();
        for cut in 0..v1.len() {
            let r = read(&v1[..cut], 64);
            assert_eq!(r.is_ok(), cut == header_len, "cut at {cut}: {r:?}");
        }
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("empty header", vec![0]),
            ("huge header", varint(1 << 40)),
            ("not a map", [&[2u8, 0x81, 0x01][..]].concat()),
            ("varint too long", vec![0xff; 12]),
            ("non-minimal varint", vec![0x80, 0x00]),
            ("indefinite map", vec![1, 0xbf]),
            ("version 3", {
                let mut c = vec![0xa1];
                text(&mut c, "version");
                c.push(3);
                [varint(c.len() as u64), c].concat()
            }),
            ("deep nesting", {
                let mut c = vec![0xa1, 0x61, b'x'];
                c.extend(std::iter::repeat_n(0x81, 100));
                c.push(0);
                [varint(c.len() as u64), c].concat()
            }),
            (
                "section too long",
                [header_v1(&[*a.cid()]), varint(1 << 30)].concat(),
            ),
            (
                "bad cid",
                [header_v1(&[*a.cid()]), vec![3, 0xff, 0xff, 0xff]].concat(),
            ),
        ];
        for (what, bytes) in bad {
            for step in [1, bytes.len().max(1)] {
                assert!(read(&bytes, step).is_err(), "{what} accepted");
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..2000 {
            let len = (n % 300) + 1;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = read(&bytes, 1 + n % 17);
            let mut with_pragma = V2_PRAGMA.to_vec();
            with_pragma.extend_from_slice(&bytes);
            let _ = read(&with_pragma, 1 + n % 13);
        }
    }
}
