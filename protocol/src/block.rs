//! Blocks: bytes together with the CID they hash to.
//!
//! A [`Block`] can only be made by hashing its bytes, by checking them against a claimed CID,
//! or by checking bytes read back against the [`Seal`] of a block verified earlier, so holding
//! one is proof that it was verified. The network verifies blocks received from peers by their
//! CIDs; the store seals each block it writes and checks what it reads against the seal (and
//! against the CID when the seal is missing or does not match); everything downstream (the
//! UnixFS reader, the job executor) takes `&Block` and never hashes again.

use cid::Cid;
use multihash_codetable::{Code, MultihashDigest};
use thiserror::Error;

/// Multicodec of raw binary leaves (`0x55`).
pub const RAW: u64 = 0x55;
/// Multicodec of dag-pb nodes (`0x70`).
pub const DAG_PB: u64 = 0x70;
/// Multihash code of sha2-256 (`0x12`), the only hash p2pmr writes.
pub const SHA2_256: u64 = 0x12;

/// The largest block p2pmr accepts from disk or the network: the IPFS hard limit of 2 MiB.
/// Our own leaves are 256 KiB and our nodes at most a few KiB.
pub const MAX_BLOCK_SIZE: usize = 2 * 1024 * 1024;

/// Why bytes are not a valid block for a CID.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlockError {
    /// The bytes do not hash to the CID's multihash.
    #[error("block {cid} is corrupt: its bytes do not match its hash")]
    HashMismatch {
        /// The CID the bytes were claimed to have.
        cid: Cid,
    },
    /// The CID uses a hash function p2pmr cannot verify.
    #[error("block {cid} uses unsupported hash function 0x{code:x}")]
    UnsupportedHash {
        /// The CID in question.
        cid: Cid,
        /// Its multihash code.
        code: u64,
    },
    /// The block is larger than [`MAX_BLOCK_SIZE`].
    #[error("block {cid} is {size} bytes, more than the {max} byte limit")]
    TooLarge {
        /// The CID in question.
        cid: Cid,
        /// The block's size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// A checksum (CRC-32) of a block's CID and bytes, taken from a [`Block`], so verified bytes.
///
/// Kept beside a stored block, it lets a later read be checked at memory speed instead of by
/// the CID's cryptographic hash: what a store must catch is its own disk's rot and torn or
/// misdirected writes, which a CRC catches, not bytes chosen to fool it (whoever can write
/// the store's files can write its seals too). Bytes that do not match a seal are not thereby
/// corrupt: the seal may be the damaged part, so they go to the full check by CID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal(u32);

impl Seal {
    /// The seal's bytes as kept on disk.
    pub fn to_bytes(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    /// A seal kept on disk; `None` if the bytes are not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(u32::from_le_bytes(bytes.try_into().ok()?)))
    }

    /// Covers the (canonical) CID too, so a sealed block's file found under another block's
    /// name does not pass as that block.
    fn of(cid: &Cid, data: &[u8]) -> Self {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&canonical(cid).to_bytes());
        crc.update(data);
        Self(crc.finalize())
    }
}

/// Verified bytes and their CID.
#[derive(Clone, PartialEq, Eq)]
pub struct Block {
    cid: Cid,
    data: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("cid", &self.cid.to_string())
            .field("len", &self.data.len())
            .finish()
    }
}

impl Block {
    /// Checks `data` against `cid` and makes a block of them.
    pub fn new(cid: Cid, data: Vec<u8>) -> Result<Self, BlockError> {
        verify(&cid, &data)?;
        Ok(Self { cid, data })
    }

    /// Bytes read back from where a block verified earlier was kept, with that block's seal:
    /// a block if they match it (and are within [`MAX_BLOCK_SIZE`]), else the bytes back, for
    /// [`Block::new`] to check against the CID.
    pub fn unseal(cid: Cid, data: Vec<u8>, seal: Seal) -> Result<Self, Vec<u8>> {
        if data.len() <= MAX_BLOCK_SIZE && Seal::of(&cid, &data) == seal {
            Ok(Self { cid, data })
        } else {
            Err(data)
        }
    }

    /// The seal to keep beside this block's bytes (see [`Seal`]).
    pub fn seal(&self) -> Seal {
        Seal::of(&self.cid, &self.data)
    }

    /// A raw leaf (CIDv1, codec raw, sha2-256) holding `data`.
    pub fn raw(data: Vec<u8>) -> Self {
        Self::hashed(RAW, data)
    }

    /// A dag-pb node (CIDv1, codec dag-pb, sha2-256) of already encoded `data`.
    pub fn dag_pb(data: Vec<u8>) -> Self {
        Self::hashed(DAG_PB, data)
    }

    fn hashed(codec: u64, data: Vec<u8>) -> Self {
        let cid = Cid::new_v1(codec, Code::Sha2_256.digest(&data));
        Self { cid, data }
    }

    /// The block's CID.
    pub fn cid(&self) -> &Cid {
        &self.cid
    }

    /// The block's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The block's size in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the block has no bytes (the empty file's leaf).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Gives the bytes back, e.g. to reuse the buffer.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    /// The same block under `cid`, another name of the same bytes (a CIDv0 and its CIDv1
    /// dag-pb twin), without hashing them again; the block itself if `cid` names other bytes.
    pub fn named(self, cid: Cid) -> Result<Self, Self> {
        if canonical(&cid) == canonical(&self.cid) {
            Ok(Self {
                cid,
                data: self.data,
            })
        } else {
            Err(self)
        }
    }
}

/// Checks that `data` hashes to `cid`'s multihash and is within [`MAX_BLOCK_SIZE`].
pub fn verify(cid: &Cid, data: &[u8]) -> Result<(), BlockError> {
    if data.len() > MAX_BLOCK_SIZE {
        return Err(BlockError::TooLarge {
            cid: *cid,
            size: data.len(),
            max: MAX_BLOCK_SIZE,
        });
    }
    let want = cid.hash();
    let code = Code::try_from(want.code()).map_err(|_| BlockError::UnsupportedHash {
        cid: *cid,
        code: want.code(),
    })?;
    let got = code.digest(data);
    // Compare digests only: a CID with a truncated digest length is simply a mismatch.
    if got.digest() == want.digest() {
        Ok(())
    } else {
        Err(BlockError::HashMismatch { cid: *cid })
    }
}

/// The canonical form of a CID for use as a storage key: CIDv1 with the same codec and hash, so
/// `Qm…` (CIDv0) and `bafy…` names of one dag-pb block share a key.
pub fn canonical(cid: &Cid) -> Cid {
    Cid::new_v1(cid.codec(), *cid.hash())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_takes_another_name_of_its_bytes_only() {
        let node = Block::dag_pb(vec![0x0a, 0x02, 0x08, 0x01]);
        let v0: Cid = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
            .parse()
            .unwrap();
        let named = node.clone().named(v0).unwrap();
        assert_eq!((named.cid(), named.data()), (&v0, node.data()));
        let other = *Block::raw(vec![1]).cid();
        assert_eq!(node.clone().named(other), Err(node));
    }

    #[test]
    fn a_seal_passes_its_own_bytes_under_its_own_name_only() {
        let block = Block::raw(b"sealed bytes".to_vec());
        let seal = Seal::from_bytes(&block.seal().to_bytes()).unwrap();
        let back = Block::unseal(*block.cid(), block.data().to_vec(), seal).unwrap();
        assert_eq!(back, block);
        // One flipped bit, a byte cut, a byte added.
        let mut flipped = block.data().to_vec();
        flipped[3] ^= 0x10;
        let cut = block.data()[1..].to_vec();
        let mut longer = block.data().to_vec();
        longer.push(0);
        for bad in [flipped, cut, longer] {
            assert_eq!(
                Block::unseal(*block.cid(), bad.clone(), seal),
                Err(bad),
                "bytes that differ go back to be checked by CID"
            );
        }
        // Another block's bytes and seal under this block's name.
        let other = Block::raw(b"other bytes".to_vec());
        assert!(Block::unseal(*block.cid(), other.data().to_vec(), other.seal()).is_err());
        // The CIDv0 name of a dag-pb node shares its seal.
        let node = Block::dag_pb(vec![0x0a, 0x02, 0x08, 0x01]);
        let v0: Cid = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
            .parse()
            .unwrap();
        assert!(Block::unseal(v0, node.data().to_vec(), node.seal()).is_ok());
        assert_eq!(Seal::from_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn public_vectors() {
        assert_eq!(
            Block::raw(b"hello world\n".to_vec()).cid().to_string(),
            "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
        );
        assert_eq!(
            Block::raw(Vec::new()).cid().to_string(),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
    }

    #[test]
    fn verification_accepts_good_and_rejects_bad_bytes() {
        let good = Block::raw(b"abc".to_vec());
        assert!(Block::new(*good.cid(), b"abc".to_vec()).is_ok());
        assert_eq!(
            Block::new(*good.cid(), b"abd".to_vec()),
            Err(BlockError::HashMismatch { cid: *good.cid() })
        );
        let big = vec![0u8; MAX_BLOCK_SIZE + 1];
        assert!(matches!(
            verify(good.cid(), &big),
            Err(BlockError::TooLarge { .. })
        ));
    }

    #[test]
    fn unsupported_hash_is_reported() {
        let mh = multihash::Multihash::<64>::wrap(0xb220, &[0; 32]).unwrap(); // blake2b-256
        let cid = Cid::new_v1(RAW, mh);
        assert!(matches!(
            verify(&cid, b""),
            Err(BlockError::UnsupportedHash { code: 0xb220, .. })
        ));
    }

    #[test]
    fn canonical_maps_v0_to_v1() {
        let node = Block::dag_pb(vec![0x0a, 0x02, 0x08, 0x01]);
        let v0 = Cid::new_v0(*node.cid().hash()).unwrap();
        assert_eq!(canonical(&v0), *node.cid());
    }
}
