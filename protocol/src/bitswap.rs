//! Bitswap 1.2.0 messages (`/ipfs/bitswap/1.2.0`), the block exchange IPFS nodes (kubo,
//! Helia) speak: their protobuf encoding (boxo's `message.proto`), the limits a receiver holds
//! a peer to, and the stream framing (an unsigned varint length before each message; a
//! stream carries several).
//!
//! Decoding never trusts the peer: a frame over [`MAX_MESSAGE`] is refused from its length
//! alone, lists are capped ([`MAX_ENTRIES`], [`MAX_PRESENCES`]) before they grow, CIDs are
//! parsed (and kept as sent, CIDv0 included), and a block's CID is computed from its bytes and the prefix that came with it, so
//! a [`Block`] out of a message is verified by construction; whether it was wanted is the
//! receiver's question.

use crate::block::{DAG_PB, MAX_BLOCK_SIZE, SHA2_256};
use crate::pb::{put_bytes, put_uint, put_varint, Reader, WIRE_LEN, WIRE_VARINT};
use crate::{Block, Cid};
use multihash_codetable::{Code, MultihashDigest};
use thiserror::Error;

/// Protocol name of Bitswap 1.2.0.
pub const BITSWAP_PROTOCOL: &str = "/ipfs/bitswap/1.2.0";

/// Largest message accepted (what kubo and Helia send at most).
pub const MAX_MESSAGE: usize = 4 << 20;

/// Most wantlist entries in one message: boxo keeps at most this many wants per peer, so a
/// longer list is refused rather than held.
pub const MAX_ENTRIES: usize = 1024;

/// Most block presences in one message.
pub const MAX_PRESENCES: usize = 4096;

/// What a want asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WantType {
    /// The block.
    Block,
    /// Whether the peer has the block (or the block itself if it is small).
    Have,
}

/// One entry of a wantlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantEntry {
    /// The block wanted.
    pub cid: Cid,
    /// Higher first.
    pub priority: i32,
    /// This entry revokes an earlier want of the CID.
    pub cancel: bool,
    /// Block or presence.
    pub want_type: WantType,
    /// Answer `DontHave` rather than nothing when the block is not here.
    pub send_dont_have: bool,
}

/// A wantlist: the entries, and whether they replace the peer's whole list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wantlist {
    /// The entries.
    pub entries: Vec<WantEntry>,
    /// The entries are the sender's full wantlist (else they update it).
    pub full: bool,
}

/// Whether a peer has a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// It has it.
    Have,
    /// It does not.
    DontHave,
}

/// A Bitswap message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Wants (empty and not full when the message carries none).
    pub wantlist: Wantlist,
    /// Blocks, verified against the CIDs made from their prefixes.
    pub blocks: Vec<Block>,
    /// Answers to want-haves.
    pub presences: Vec<(Cid, Presence)>,
    /// Bytes the sender still has queued for the receiver.
    pub pending_bytes: i32,
}

/// Why a message or frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitswapError {
    /// The protobuf encoding is broken.
    #[error("malformed bitswap message: {0}")]
    Malformed(&'static str),
    /// A field has the wrong wire type.
    #[error("malformed bitswap message: field {0} has the wrong wire type")]
    WireType(&'static str),
    /// A list or the message is over its limit.
    #[error("bitswap {what} of {size} is over the limit of {limit}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A CID does not parse.
    #[error("malformed CID in a bitswap message")]
    BadCid,
    /// A block's CID prefix does not parse or names something we cannot make a CID of.
    #[error("bad CID prefix in a bitswap block: {0}")]
    BadPrefix(String),
}

impl From<crate::pb::WireError> for BitswapError {
    fn from(e: crate::pb::WireError) -> Self {
        Self::Malformed(e.0)
    }
}

/// A CID as the peer sent it: kept as it is (a CIDv0 stays one), since answers must name
/// what was asked for; the store looks blocks up by their canonical form.
fn cid(bytes: &[u8]) -> Result<Cid, BitswapError> {
    Cid::try_from(bytes).map_err(|_| BitswapError::BadCid)
}

fn expect(wire: u8, want: u8, field: &'static str) -> Result<(), BitswapError> {
    if wire != want {
        return Err(BitswapError::WireType(field));
    }
    Ok(())
}

/// A protobuf `int32`: encoded as a sign-extended 64-bit varint, so negative values take 10
/// bytes; decoders keep the low 32 bits.
fn int32(v: u64) -> i32 {
    v as u32 as i32
}

fn put_int32(out: &mut Vec<u8>, field: u64, v: i32) {
    put_uint(out, field, i64::from(v) as u64);
}

fn check(what: &'static str, size: usize, limit: usize) -> Result<(), BitswapError> {
    if size > limit {
        return Err(BitswapError::TooLarge { what, size, limit });
    }
    Ok(())
}

impl Message {
    /// Decodes a message (without its length prefix), enforcing the limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, BitswapError> {
        check("message", bytes.len(), MAX_MESSAGE)?;
        let mut msg = Message::default();
        let mut r = Reader::new(bytes);
        while !r.is_empty() {
            let (field, wire) = r.key()?;
            match field {
                1 => {
                    expect(wire, WIRE_LEN, "wantlist")?;
                    decode_wantlist(r.bytes()?, &mut msg.wantlist)?;
                }
                3 => {
                    expect(wire, WIRE_LEN, "blocks")?;
                    msg.blocks.push(decode_block(r.bytes()?)?);
                }
                4 => {
                    expect(wire, WIRE_LEN, "blockPresences")?;
                    check("presence list", msg.presences.len() + 1, MAX_PRESENCES)?;
                    msg.presences.push(decode_presence(r.bytes()?)?);
                }
                5 => {
                    expect(wire, WIRE_VARINT, "pendingBytes")?;
                    msg.pending_bytes = int32(r.varint()?);
                }
                // Bitswap 1.0's raw blocks (field 2) and anything newer: skipped.
                _ => r.skip(wire)?,
            }
        }
        Ok(msg)
    }

    /// Encodes the message (without its length prefix), as boxo lays it out.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.wantlist.entries.is_empty() || self.wantlist.full {
            let mut list = Vec::new();
            for e in &self.wantlist.entries {
                let mut entry = Vec::new();
                put_bytes(&mut entry, 1, &e.cid.to_bytes());
                if e.priority != 0 {
                    put_int32(&mut entry, 2, e.priority);
                }
                if e.cancel {
                    put_uint(&mut entry, 3, 1);
                }
                if e.want_type == WantType::Have {
                    put_uint(&mut entry, 4, 1);
                }
                if e.send_dont_have {
                    put_uint(&mut entry, 5, 1);
                }
                put_bytes(&mut list, 1, &entry);
            }
            if self.wantlist.full {
                put_uint(&mut list, 2, 1);
            }
            put_bytes(&mut out, 1, &list);
        }
        for block in &self.blocks {
            let mut b = Vec::new();
            put_bytes(&mut b, 1, &prefix(block.cid()));
            put_bytes(&mut b, 2, block.data());
            put_bytes(&mut out, 3, &b);
        }
        for (cid, presence) in &self.presences {
            let mut p = Vec::new();
            put_bytes(&mut p, 1, &cid.to_bytes());
            if *presence == Presence::DontHave {
                put_uint(&mut p, 2, 1);
            }
            put_bytes(&mut out, 4, &p);
        }
        if self.pending_bytes != 0 {
            put_int32(&mut out, 5, self.pending_bytes);
        }
        out
    }

    /// The message with its length prefix, as written on a stream.
    pub fn framed(&self) -> Vec<u8> {
        let body = self.encode();
        let mut out = Vec::with_capacity(body.len() + 5);
        put_varint(&mut out, body.len() as u64);
        out.extend_from_slice(&body);
        out
    }
}

fn decode_wantlist(bytes: &[u8], list: &mut Wantlist) -> Result<(), BitswapError> {
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                expect(wire, WIRE_LEN, "wantlist entry")?;
                check("wantlist", list.entries.len() + 1, MAX_ENTRIES)?;
                list.entries.push(decode_entry(r.bytes()?)?);
            }
            2 => {
                expect(wire, WIRE_VARINT, "full")?;
                list.full = r.varint()? != 0;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(())
}

fn decode_entry(bytes: &[u8]) -> Result<WantEntry, BitswapError> {
    let mut r = Reader::new(bytes);
    let (mut cid_bytes, mut priority, mut cancel, mut want_type, mut dont_have) =
        (None, 0, false, WantType::Block, false);
    while !r.is_empty() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                expect(wire, WIRE_LEN, "entry cid")?;
                cid_bytes = Some(r.bytes()?);
            }
            2 => {
                expect(wire, WIRE_VARINT, "priority")?;
                priority = int32(r.varint()?);
            }
            3 => {
                expect(wire, WIRE_VARINT, "cancel")?;
                cancel = r.varint()? != 0;
            }
            4 => {
                expect(wire, WIRE_VARINT, "wantType")?;
                want_type = match r.varint()? {
                    0 => WantType::Block,
                    1 => WantType::Have,
                    _ => return Err(BitswapError::Malformed("unknown want type")),
                };
            }
            5 => {
                expect(wire, WIRE_VARINT, "sendDontHave")?;
                dont_have = r.varint()? != 0;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(WantEntry {
        cid: cid(cid_bytes.ok_or(BitswapError::Malformed("a want without a CID"))?)?,
        priority,
        cancel,
        want_type,
        send_dont_have: dont_have,
    })
}

fn decode_block(bytes: &[u8]) -> Result<Block, BitswapError> {
    let mut r = Reader::new(bytes);
    let (mut pre, mut data) = (None, None);
    while !r.is_empty() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                expect(wire, WIRE_LEN, "block prefix")?;
                pre = Some(r.bytes()?);
            }
            2 => {
                expect(wire, WIRE_LEN, "block data")?;
                data = Some(r.bytes()?);
            }
            _ => r.skip(wire)?,
        }
    }
    let pre = pre.ok_or(BitswapError::Malformed("a block without a prefix"))?;
    let data = data.unwrap_or_default();
    check("block", data.len(), MAX_BLOCK_SIZE)?;
    let cid = cid_of(pre, data)?;
    Block::new(cid, data.to_vec()).map_err(|e| BitswapError::BadPrefix(e.to_string()))
}

fn decode_presence(bytes: &[u8]) -> Result<(Cid, Presence), BitswapError> {
    let mut r = Reader::new(bytes);
    let (mut cid_bytes, mut presence) = (None, Presence::Have);
    while !r.is_empty() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                expect(wire, WIRE_LEN, "presence cid")?;
                cid_bytes = Some(r.bytes()?);
            }
            2 => {
                expect(wire, WIRE_VARINT, "presence type")?;
                presence = match r.varint()? {
                    0 => Presence::Have,
                    1 => Presence::DontHave,
                    _ => return Err(BitswapError::Malformed("unknown presence type")),
                };
            }
            _ => r.skip(wire)?,
        }
    }
    let cid = cid(cid_bytes.ok_or(BitswapError::Malformed("a presence without a CID"))?)?;
    Ok((cid, presence))
}

/// A CID's prefix as Bitswap sends it with a block: version, codec, multihash code and
/// digest length, each an unsigned varint.
pub fn prefix(cid: &Cid) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    put_varint(&mut out, u64::from(cid.version()));
    put_varint(&mut out, cid.codec());
    put_varint(&mut out, cid.hash().code());
    put_varint(&mut out, u64::from(cid.hash().size()));
    out
}

/// The CID of `data` under `prefix`: only SHA-256 is hashed (the hash every block of ours and
/// kubo's default use); a CIDv0 prefix must name dag-pb.
fn cid_of(prefix: &[u8], data: &[u8]) -> Result<Cid, BitswapError> {
    let bad = |why: &str| BitswapError::BadPrefix(why.to_owned());
    let mut r = Reader::new(prefix);
    let version = r.varint().map_err(|e| bad(e.0))?;
    let codec = r.varint().map_err(|e| bad(e.0))?;
    let hash = r.varint().map_err(|e| bad(e.0))?;
    let len = r.varint().map_err(|e| bad(e.0))?;
    if !r.is_empty() {
        return Err(bad("bytes after the digest length"));
    }
    if hash != SHA2_256 || len != 32 {
        return Err(bad(&format!(
            "multihash 0x{hash:x} of {len} bytes (only sha2-256 is supported)"
        )));
    }
    let digest = Code::Sha2_256.digest(data);
    match version {
        0 if codec == DAG_PB => Cid::new_v0(digest).map_err(|e| bad(&e.to_string())),
        0 => Err(bad("a CIDv0 prefix names a codec other than dag-pb")),
        1 => Ok(Cid::new_v1(codec, digest)),
        v => Err(bad(&format!("CID version {v}"))),
    }
}

/// Splits a stream's bytes into messages: each is an unsigned varint length and that many
/// bytes. Push what arrives, take messages as they complete; a length over [`MAX_MESSAGE`] is
/// an error at once, before its bytes are waited for.
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message's bytes, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, BitswapError> {
        let mut r = Reader::new(&self.buf);
        let len = match r.varint() {
            Ok(len) => len,
            // Not all of the length yet (a varint of up to 10 bytes).
            Err(_) if self.buf.len() < 10 && self.buf.iter().all(|b| b & 0x80 != 0) => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        check("message", len, MAX_MESSAGE)?;
        let start = self.buf.len() - r.remaining();
        if self.buf.len() - start < len {
            return Ok(None);
        }
        let frame = self.buf[start..start + len].to_vec();
        self.buf.drain(..start + len);
        Ok(Some(frame))
    }

    /// Bytes held that do not yet make a whole message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::RAW;
    use crate::pb::put_key;

    fn raw(text: &str) -> Block {
        Block::raw(text.as_bytes().to_vec())
    }

    #[test]
    fn messages_round_trip() {
        let hello = raw("hello");
        let msg = Message {
            wantlist: Wantlist {
                entries: vec![
                    WantEntry {
                        cid: *hello.cid(),
                        priority: -7,
                        cancel: false,
                        want_type: WantType::Have,
                        send_dont_have: true,
                    },
                    WantEntry {
                        cid: *raw("x").cid(),
                        priority: i32::MAX,
                        cancel: true,
                        want_type: WantType::Block,
                        send_dont_have: false,
                    },
                ],
                full: true,
            },
            blocks: vec![hello.clone(), Block::dag_pb(vec![0x0a, 0x02, 0x08, 0x01])],
            presences: vec![
                (*hello.cid(), Presence::Have),
                (*raw("y").cid(), Presence::DontHave),
            ],
            pending_bytes: 1 << 20,
        };
        assert_eq!(Message::decode(&msg.encode()).unwrap(), msg);
        assert_eq!(Message::decode(&[]).unwrap(), Message::default());
        assert!(Message::default().encode().is_empty());
    }

    #[test]
    fn a_block_is_made_from_its_prefix_and_bytes() {
        let block = raw("hello");
        assert_eq!(
            cid_of(&prefix(block.cid()), b"hello").unwrap(),
            *block.cid()
        );
        // Another codec under the same hash is another CID.
        let pb = cid_of(&prefix(Block::dag_pb(b"hello".to_vec()).cid()), b"hello").unwrap();
        assert_eq!(pb.codec(), DAG_PB);
        for (bad, why) in [
            (vec![1, RAW as u8, 0x13, 64], "sha2-256"),
            (vec![1, RAW as u8, 0x12, 20], "sha2-256"),
            (vec![0, RAW as u8, 0x12, 32], "dag-pb"),
            (vec![2, RAW as u8, 0x12, 32], "version 2"),
            (vec![1, RAW as u8, 0x12], "truncated"),
            (vec![1, RAW as u8, 0x12, 32, 0], "after"),
            (vec![0xff; 11], "varint"),
        ] {
            let e = cid_of(&bad, b"x").unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn lists_over_their_limits_are_refused() {
        let entry = |i: u32| WantEntry {
            cid: *Block::raw(i.to_le_bytes().to_vec()).cid(),
            priority: 1,
            cancel: false,
            want_type: WantType::Have,
            send_dont_have: true,
        };
        let mut msg = Message::default();
        msg.wantlist.entries = (0..MAX_ENTRIES as u32).map(entry).collect();
        assert_eq!(Message::decode(&msg.encode()).unwrap(), msg);
        msg.wantlist.entries = (0..10_000).map(entry).collect();
        assert_eq!(
            Message::decode(&msg.encode()).unwrap_err(),
            BitswapError::TooLarge {
                what: "wantlist",
                size: MAX_ENTRIES + 1,
                limit: MAX_ENTRIES
            }
        );
        let msg = Message {
            presences: (0..=MAX_PRESENCES as u32)
                .map(|i| (entry(i).cid, Presence::Have))
                .collect(),
            ..Message::default()
        };
        assert!(matches!(
            Message::decode(&msg.encode()),
            Err(BitswapError::TooLarge { .. })
        ));
        // A block over 2 MiB.
        let mut b = Vec::new();
        put_bytes(&mut b, 1, &prefix(raw("x").cid()));
        put_bytes(&mut b, 2, &vec![0; MAX_BLOCK_SIZE + 1]);
        let mut m = Vec::new();
        put_bytes(&mut m, 3, &b);
        assert!(matches!(
            Message::decode(&m),
            Err(BitswapError::TooLarge { what: "block", .. })
        ));
    }

    #[test]
    fn wrong_wire_types_and_unknown_enums_are_refused() {
        // Field 1 (wantlist) as a varint.
        assert_eq!(
            Message::decode(&[0x08, 0x01]).unwrap_err(),
            BitswapError::WireType("wantlist")
        );
        // A want type of 7.
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, &raw("x").cid().to_bytes());
        put_uint(&mut entry, 4, 7);
        let mut list = Vec::new();
        put_bytes(&mut list, 1, &entry);
        let mut m = Vec::new();
        put_bytes(&mut m, 1, &list);
        assert!(Message::decode(&m).is_err());
        // A bad CID in a presence.
        let mut p = Vec::new();
        put_bytes(&mut p, 1, &[0x01, 0x55, 0x12]);
        let mut m = Vec::new();
        put_bytes(&mut m, 4, &p);
        assert_eq!(Message::decode(&m).unwrap_err(), BitswapError::BadCid);
        // Unknown fields are skipped: Bitswap 1.0's raw blocks, a fixed64.
        let mut m = Vec::new();
        put_bytes(&mut m, 2, b"old style block");
        put_key(&mut m, 9, 1);
        m.extend_from_slice(&[0; 8]);
        assert_eq!(Message::decode(&m).unwrap(), Message::default());
    }

    #[test]
    fn frames_split_a_stream_into_messages_in_pieces_of_any_size() {
        let a = Message {
            presences: vec![(*raw("a").cid(), Presence::DontHave)],
            ..Message::default()
        };
        let b = Message {
            blocks: vec![Block::raw(vec![9; 300])],
            ..Message::default()
        };
        let mut stream = a.framed();
        stream.extend(Message::default().framed());
        stream.extend(b.framed());
        for piece in [1, 2, 3, 7, 1000] {
            let mut frames = Frames::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                frames.push(chunk);
                while let Some(f) = frames.next_frame().unwrap() {
                    got.push(Message::decode(&f).unwrap());
                }
            }
            assert_eq!(got, [a.clone(), Message::default(), b.clone()], "{piece}");
            assert_eq!(frames.pending(), 0);
        }
        // A length over the limit is refused from the length alone.
        let mut frames = Frames::default();
        let mut len = Vec::new();
        put_varint(&mut len, MAX_MESSAGE as u64 + 1);
        frames.push(&len);
        assert!(matches!(
            frames.next_frame(),
            Err(BitswapError::TooLarge { .. })
        ));
        // A varint longer than 10 bytes.
        let mut frames = Frames::default();
        frames.push(&[0xff; 11]);
        assert!(frames.next_frame().is_err());
    }
}
