//! The dag-pb codec (`0x70`): the node format of UnixFS files and directories.
//!
//! Encoding follows the dag-pb spec's canonical form, which is what kubo writes and therefore
//! what the CIDs depend on: all `Links` (field 2) first, in order, then `Data` (field 1); within
//! a link `Hash` (1), `Name` (2), `Tsize` (3). A `Some("")` name is written as an empty string
//! (kubo does so for file chunks), `None` is omitted. Decoding is strict about the wire format
//! (unknown fields, bad lengths, invalid CIDs are errors) because its input comes from peers.

use crate::pb::{self, Reader, WireError, WIRE_LEN, WIRE_VARINT};
use cid::Cid;
use thiserror::Error;

/// Why a block is not a well-formed dag-pb node.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed dag-pb node: {0}")]
pub struct DagPbError(pub &'static str);

impl From<WireError> for DagPbError {
    fn from(e: WireError) -> Self {
        DagPbError(e.0)
    }
}

/// One link of a dag-pb node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbLink {
    /// The child's CID.
    pub hash: Cid,
    /// The link's name (file name in a directory, empty for file chunks).
    pub name: Option<String>,
    /// Cumulative size of the child: its encoded bytes plus all of its descendants'.
    pub tsize: Option<u64>,
}

/// A decoded dag-pb node whose `data` borrows from the block it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbNode<'a> {
    /// The links, in encoded order.
    pub links: Vec<PbLink>,
    /// The opaque data (a UnixFS `Data` message for UnixFS nodes).
    pub data: Option<&'a [u8]>,
}

impl<'a> PbNode<'a> {
    /// Decodes a node from block bytes.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DagPbError> {
        let mut r = Reader::new(bytes);
        let mut links = Vec::new();
        let mut data = None;
        while !r.is_empty() {
            match r.key()? {
                (2, WIRE_LEN) => {
                    if data.is_some() {
                        return Err(DagPbError("link after data (non-canonical order)"));
                    }
                    links.push(decode_link(r.bytes()?)?);
                }
                (1, WIRE_LEN) => {
                    if data.is_some() {
                        return Err(DagPbError("duplicate Data field"));
                    }
                    data = Some(r.bytes()?);
                }
                _ => return Err(DagPbError("unknown field in PBNode")),
            }
        }
        Ok(Self { links, data })
    }

    /// Encodes the node in canonical form.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.links, self.data)
    }
}

/// Encodes a node from its parts in canonical form.
pub fn encode(links: &[PbLink], data: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + links.len() * 48 + data.map_or(0, <[u8]>::len));
    let mut link_buf = Vec::with_capacity(64);
    for link in links {
        link_buf.clear();
        pb::put_bytes(&mut link_buf, 1, &link.hash.to_bytes());
        if let Some(name) = &link.name {
            pb::put_bytes(&mut link_buf, 2, name.as_bytes());
        }
        if let Some(tsize) = link.tsize {
            pb::put_uint(&mut link_buf, 3, tsize);
        }
        pb::put_bytes(&mut out, 2, &link_buf);
    }
    if let Some(data) = data {
        pb::put_bytes(&mut out, 1, data);
    }
    out
}

fn decode_link(bytes: &[u8]) -> Result<PbLink, DagPbError> {
    let mut r = Reader::new(bytes);
    let (mut hash, mut name, mut tsize) = (None, None, None);
    let mut last_field = 0;
    while !r.is_empty() {
        let (field, wire) = r.key()?;
        if field <= last_field {
            return Err(DagPbError("PBLink fields repeated or out of order"));
        }
        last_field = field;
        match (field, wire) {
            (1, WIRE_LEN) => {
                let cid =
                    Cid::try_from(r.bytes()?).map_err(|_| DagPbError("invalid CID in link"))?;
                hash = Some(cid);
            }
            (2, WIRE_LEN) => {
                let s = std::str::from_utf8(r.bytes()?)
                    .map_err(|_| DagPbError("link name is not UTF-8"))?;
                name = Some(s.to_owned());
            }
            (3, WIRE_VARINT) => tsize = Some(r.varint()?),
            _ => return Err(DagPbError("unknown field in PBLink")),
        }
    }
    let hash = hash.ok_or(DagPbError("link without Hash"))?;
    Ok(PbLink { hash, name, tsize })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Block;

    fn link(name: Option<&str>, tsize: Option<u64>) -> PbLink {
        PbLink {
            hash: *Block::raw(b"x".to_vec()).cid(),
            name: name.map(str::to_owned),
            tsize,
        }
    }

    #[test]
    fn round_trip() {
        let links = vec![
            link(Some(""), Some(1)),
            link(Some("a/b"), None),
            link(None, Some(u64::MAX)),
        ];
        for data in [None, Some(&b""[..]), Some(&b"\x08\x02"[..])] {
            let bytes = encode(&links, data);
            let node = PbNode::decode(&bytes).unwrap();
            assert_eq!(node.links, links);
            assert_eq!(node.data, data);
            assert_eq!(node.encode(), bytes);
        }
    }

    #[test]
    fn empty_node_is_empty_bytes() {
        // The dag-pb spec's first fixture: an empty node encodes to nothing.
        assert_eq!(encode(&[], None), Vec::<u8>::new());
        assert_eq!(
            Block::dag_pb(vec![]).cid().to_string(),
            "bafybeihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
    }

    #[test]
    fn link_encoding_matches_spec_layout() {
        let l = link(Some(""), Some(3));
        let bytes = encode(std::slice::from_ref(&l), None);
        let cid = l.hash.to_bytes();
        let mut want = vec![0x12, (2 + cid.len() + 2 + 2) as u8, 0x0a, cid.len() as u8];
        want.extend_from_slice(&cid);
        want.extend_from_slice(&[0x12, 0x00, 0x18, 0x03]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn rejects_malformed_nodes() {
        let cases: &[&[u8]] = &[
            &[0x0a],                   // truncated data length
            &[0x0a, 0x05, 0x00],       // data runs past the end
            &[0x1a, 0x00],             // unknown field 3
            &[0x08, 0x01],             // Data with varint wire type
            &[0x12, 0x02, 0x0a, 0x00], // link with an empty (invalid) CID
            &[0x12, 0x00],             // link without a hash
            &[0x0a, 0x00, 0x12, 0x00], // link after data
            &[0x0a, 0x00, 0x0a, 0x00], // data twice
        ];
        for bytes in cases {
            assert!(
                PbNode::decode(bytes).is_err(),
                "{bytes:02x?} should be rejected"
            );
        }
    }
}
