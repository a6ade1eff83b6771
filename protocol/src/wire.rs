//! Messages peers exchange over `/mapreduce/block/5.0.0`, their byte encoding and size limits,
//! and the placement rule that decides which peers hold a block.
//!
//! The node's libp2p codec frames each message as a 4-byte big-endian length followed by the
//! [postcard](https://docs.rs/postcard) encoding of the private `Wire*` types below. Decoding
//! never trusts the peer: frames over the limits are refused before any allocation, CIDs are
//! parsed (and canonicalised) here, and block bytes stay unverified until the receiver checks
//! them against the CID it asked for or was offered.

use crate::block::{canonical, MAX_BLOCK_SIZE};
use crate::Cid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Protocol name of block exchange. The version changes with any incompatible message change.
pub const BLOCK_PROTOCOL: &str = "/mapreduce/block/5.0.0";

/// Largest `Probe`: an admission challenge needs only a few random bytes.
pub const MAX_PROBE: usize = 64;

/// Most CIDs one `Has` request may ask about.
pub const MAX_HAS: usize = 4096;

/// Largest encoded request (a `Put` of the largest block plus its CID and framing slack).
pub const MAX_REQUEST_SIZE: usize = MAX_BLOCK_SIZE + 4096;

/// Largest encoded response (a block, or a `Have` answer to [`MAX_HAS`] CIDs).
pub const MAX_RESPONSE_SIZE: usize = MAX_BLOCK_SIZE + 4096;

/// The refusal reason of a peer too loaded to take the request now; the sender should retry
/// after a pause rather than treat it as a failure.
pub const BUSY: &str = "busy";

/// Longest refusal reason passed on; longer ones are cut.
const MAX_REASON: usize = 512;

/// A request of the block protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockRequest {
    /// Send me this block.
    Get(Cid),
    /// Store this block durably and say so. The bytes are unverified until the receiver hashes
    /// them.
    Put {
        /// The block's CID as claimed by the sender.
        cid: Cid,
        /// The block's bytes.
        data: Vec<u8>,
        /// How many daemons in all should hold the block. The receiver keeps the count up
        /// when holders vanish; 0 or 1 means nobody watches over it.
        replicas: u8,
        /// The sender's add session: a client's blocks stay provisional on the receiver
        /// until it sends [`BlockRequest::Commit`] for the session, and are collected after
        /// a grace period if it never does (daemons copying among themselves are not
        /// tracked).
        session: u64,
        /// The block's placement group (see [`crate::unixfs::Groups`]): the key its holders
        /// were ranked by, which the receiver places further copies by. `None`: its own CID.
        group: Option<Cid>,
    },
    /// Every block pushed here in this add session belongs to a completed add: keep them.
    Commit {
        /// The session, as sent with the `Put`s.
        session: u64,
    },
    /// Prove you hold this block: answer [`BlockResponse::Proof`] with
    /// [`proof`]`(nonce, block)`, which only a holder of the bytes can compute.
    Prove {
        /// The block.
        cid: Cid,
        /// A fresh random value, so an answer cannot be kept and replayed.
        nonce: [u8; 32],
    },
    /// Which of these blocks do you hold? (At most [`MAX_HAS`].)
    Has(Vec<Cid>),
    /// Keep these few random bytes (at most [`MAX_PROBE`]) for a short while, as the raw block
    /// [`probe_cid`] names, and answer [`BlockResponse::Stored`]: a peer is counted as a daemon
    /// only once it has then answered a [`BlockRequest::Prove`] for them. Kept in memory only,
    /// so a daemon whose disk is full is still admitted.
    Probe(Vec<u8>),
}

/// A response of the block protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockResponse {
    /// The requested block's bytes, unverified until the requester checks them.
    Block(Vec<u8>),
    /// The block is not held here.
    NotFound,
    /// The `Put` block was verified and is durably stored.
    Stored,
    /// For a `Has`: one flag per asked CID, in order.
    Have(Vec<bool>),
    /// The request was refused (wrong bytes for a `Put`, disk full, overloaded); the reason is
    /// for humans.
    Refused(String),
    /// For a `Prove`: [`proof`] of the block with the nonce.
    Proof([u8; 32]),
}

/// The proof of holding `data` asked for with `nonce`: SHA-256 of the nonce and the bytes.
pub fn proof(nonce: &[u8; 32], data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(nonce);
    h.update(data);
    h.finalize().into()
}

/// The CID of a [`BlockRequest::Probe`]'s bytes: a CIDv1 raw block, SHA-256.
pub fn probe_cid(data: &[u8]) -> Cid {
    *crate::Block::raw(data.to_vec()).cid()
}

/// Why a message could not be decoded or encoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A CID in the message does not parse.
    #[error("malformed CID in message")]
    BadCid,
    /// The message exceeds a protocol limit.
    #[error("message too large: {what} is {size}, limit {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

#[derive(Serialize, Deserialize)]
enum WireRequest<'a> {
    Get(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    Put(
        #[serde(borrow, with = "serde_bytes")] &'a [u8],
        #[serde(borrow, with = "serde_bytes")] &'a [u8],
        u8,
        u64,
        /// The group's CID, empty for none.
        #[serde(borrow, with = "serde_bytes")]
        &'a [u8],
    ),
    Has(#[serde(borrow)] Vec<&'a serde_bytes::Bytes>),
    Commit(u64),
    Prove(#[serde(borrow, with = "serde_bytes")] &'a [u8], [u8; 32]),
    Probe(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
}

#[derive(Serialize, Deserialize)]
enum WireResponse<'a> {
    Block(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    NotFound,
    Stored,
    Have(Vec<bool>),
    Refused(&'a str),
    Proof([u8; 32]),
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("in-memory encoding of plain data cannot fail")
}

fn malformed(e: postcard::Error) -> WireError {
    WireError::Malformed(e.to_string())
}

fn parse_cid(bytes: &[u8]) -> Result<Cid, WireError> {
    Cid::try_from(bytes)
        .map(|c| canonical(&c))
        .map_err(|_| WireError::BadCid)
}

fn check(what: &'static str, size: usize, limit: usize) -> Result<(), WireError> {
    if size > limit {
        return Err(WireError::TooLarge { what, size, limit });
    }
    Ok(())
}

impl BlockRequest {
    /// Encodes the request (without framing).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Get(cid) => encode(&WireRequest::Get(&cid.to_bytes())),
            Self::Put {
                cid,
                data,
                replicas,
                session,
                group,
            } => encode(&WireRequest::Put(
                &cid.to_bytes(),
                data,
                *replicas,
                *session,
                &group.map(|g| g.to_bytes()).unwrap_or_default(),
            )),
            Self::Commit { session } => encode(&WireRequest::Commit(*session)),
            Self::Prove { cid, nonce } => encode(&WireRequest::Prove(&cid.to_bytes(), *nonce)),
            Self::Probe(data) => encode(&WireRequest::Probe(data)),
            Self::Has(cids) => {
                let bytes: Vec<Vec<u8>> = cids.iter().map(Cid::to_bytes).collect();
                let refs = bytes.iter().map(|b| serde_bytes::Bytes::new(b)).collect();
                encode(&WireRequest::Has(refs))
            }
        }
    }

    /// Decodes a request, enforcing the protocol limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        check("request", bytes.len(), MAX_REQUEST_SIZE)?;
        Ok(match postcard::from_bytes(bytes).map_err(malformed)? {
            WireRequest::Get(cid) => Self::Get(parse_cid(cid)?),
            WireRequest::Put(cid, data, replicas, session, group) => {
                check("block", data.len(), MAX_BLOCK_SIZE)?;
                let cid = parse_cid(cid)?;
                let group = match group {
                    [] => None,
                    bytes => Some(parse_cid(bytes)?).filter(|g| *g != cid),
                };
                Self::Put {
                    cid,
                    data: data.to_vec(),
                    replicas,
                    session,
                    group,
                }
            }
            WireRequest::Commit(session) => Self::Commit { session },
            WireRequest::Prove(cid, nonce) => Self::Prove {
                cid: parse_cid(cid)?,
                nonce,
            },
            WireRequest::Probe(data) => {
                check("probe", data.len(), MAX_PROBE)?;
                Self::Probe(data.to_vec())
            }
            WireRequest::Has(cids) => {
                check("Has list", cids.len(), MAX_HAS)?;
                Self::Has(
                    cids.iter()
                        .map(|c| parse_cid(c))
                        .collect::<Result<_, _>>()?,
                )
            }
        })
    }
}

impl BlockResponse {
    /// The [`BUSY`] refusal: the peer is too loaded now; retry after a pause.
    pub fn busy() -> Self {
        Self::Refused(BUSY.into())
    }

    /// Whether this is the [`BUSY`] refusal.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Refused(r) if r == BUSY)
    }

    /// Encodes the response (without framing). Refusal reasons are cut to 512 bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Block(data) => encode(&WireResponse::Block(data)),
            Self::NotFound => encode(&WireResponse::NotFound),
            Self::Stored => encode(&WireResponse::Stored),
            Self::Have(flags) => encode(&WireResponse::Have(flags.clone())),
            Self::Proof(hash) => encode(&WireResponse::Proof(*hash)),
            Self::Refused(reason) => {
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                encode(&WireResponse::Refused(&reason[..end]))
            }
        }
    }

    /// The encoding in two parts whose concatenation is [`encode`](Self::encode)'s: a short
    /// head and, for a block, its bytes, so a sender writes a block without copying it first.
    pub fn encode_parts(&self) -> (Vec<u8>, &[u8]) {
        match self {
            Self::Block(data) => {
                // The variant's tag, then the bytes' length prefix (postcard: a varint), which
                // for no bytes is the single byte 0.
                let mut head = encode(&WireResponse::Block(&[]));
                head.pop();
                head.extend_from_slice(&encode(&data.len()));
                (head, data)
            }
            other => (other.encode(), &[]),
        }
    }

    /// Decodes a response, enforcing the protocol limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        check("response", bytes.len(), MAX_RESPONSE_SIZE)?;
        Ok(match postcard::from_bytes(bytes).map_err(malformed)? {
            WireResponse::Block(data) => {
                check("block", data.len(), MAX_BLOCK_SIZE)?;
                Self::Block(data.to_vec())
            }
            WireResponse::NotFound => Self::NotFound,
            WireResponse::Stored => Self::Stored,
            WireResponse::Have(flags) => {
                check("Have list", flags.len(), MAX_HAS)?;
                Self::Have(flags)
            }
            WireResponse::Refused(reason) => {
                Self::Refused(reason.chars().take(MAX_REASON).collect())
            }
            WireResponse::Proof(hash) => Self::Proof(hash),
        })
    }
}

/// How many of the peers closest to each of a key's two places in Kademlia's keyspace are
/// candidates to hold it: Kademlia's `k`, what one lookup finds for certain.
pub const NEIGHBOURHOOD: usize = 20;

/// A key's or a peer's position in Kademlia's keyspace: SHA-256 of its bytes (libp2p-kad's
/// `kbucket::Key`; a peer's bytes are its binary peer id).
pub fn keyspace_position(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The two keys a placement key's neighbourhood is looked up by in Kademlia: its multihash,
/// and its multihash followed by `/2`.
///
/// The peers closest to one place are crowded together: a part of the keyspace with few
/// peers has the same few closest to every key in it, and they must hold all those keys
/// whatever the loads say (with one place of 20 peers and two choices, the fullest held 1.55
/// times the mean). Two places are two independent parts of the keyspace, and the least
/// loaded of either side takes the copies ("the power of two choices" in a DHT).
pub fn keyspace_keys(cid: &Cid) -> [Vec<u8>; 2] {
    let key = cid.hash().to_bytes();
    let mut second = key.clone();
    second.extend_from_slice(b"/2");
    [key, second]
}

/// The XOR distance between two keyspace positions (libp2p-kad's `Distance`, as bytes: a
/// smaller array is closer).
pub fn keyspace_distance(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// The placement rule: ranks `peers` (their binary peer ids) for holding `cid`, best first.
///
/// Two steps. First the key's neighbourhood: the [`NEIGHBOURHOOD`] peers closest to each of
/// its two [`keyspace_keys`] in Kademlia's keyspace ([`keyspace_distance`] of
/// [`keyspace_position`]s), which a peer that does not know every other finds with two
/// lookups in O(log n) steps. Then, within the neighbourhood, rendezvous
/// (highest-random-weight) hashing: each peer scores `sha256(peer || multihash)` and the
/// highest scores come first; the peers past the neighbourhood follow it, closest to either
/// place first. With at most [`NEIGHBOURHOOD`] peers the order is rendezvous alone.
///
/// Why both: every peer computes the same order from the same peer set; rendezvous spreads a
/// key's first places evenly over its candidates, where closeness alone favours the peers in
/// the keyspace's sparse regions; and when a peer leaves or joins, the others' relative order
/// within the neighbourhood is unchanged (a leaver's place goes to the next closest peer), so
/// after a holder dies the surviving replicas are still the first ones asked.
pub fn rank_peers<'a, P: AsRef<[u8]> + ?Sized>(
    cid: &Cid,
    peers: impl IntoIterator<Item = &'a P>,
) -> Vec<&'a P> {
    let key = cid.hash().to_bytes();
    let mut peers: Vec<&P> = peers.into_iter().collect();
    let mut near = peers.len();
    if peers.len() > NEIGHBOURHOOD {
        let places = keyspace_keys(cid).map(|k| keyspace_position(&k));
        // Each peer's distance to either place, and whether it is among the closest to one.
        let mut placed: Vec<([[u8; 32]; 2], bool, &P)> = peers
            .iter()
            .map(|p| {
                let at = keyspace_position(p.as_ref());
                (
                    places.map(|place| keyspace_distance(&at, &place)),
                    false,
                    *p,
                )
            })
            .collect();
        for side in 0..2 {
            placed.sort_unstable_by(|a, b| a.0[side].cmp(&b.0[side]));
            for p in &mut placed[..NEIGHBOURHOOD] {
                p.1 = true;
            }
        }
        // The neighbourhood first, then the rest by their distance to the nearer place.
        // Equal distances mean equal peer ids: the order between them does not matter.
        placed.sort_unstable_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0[0].min(a.0[1]).cmp(&b.0[0].min(b.0[1])))
        });
        near = placed.iter().filter(|p| p.1).count();
        peers = placed.into_iter().map(|(_, _, p)| p).collect();
    }
    let mut scored: Vec<([u8; 32], &P)> = peers[..near]
        .iter()
        .map(|p| {
            let mut h = Sha256::new();
            h.update(p.as_ref());
            h.update(&key);
            (h.finalize().into(), *p)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.as_ref().cmp(b.1.as_ref())));
    let mut ranked: Vec<&P> = scored.into_iter().map(|(_, p)| p).collect();
    ranked.extend_from_slice(&peers[near..]);
    ranked
}

/// How many of a placement group's best-ranked daemons each of its copies chooses among:
/// [`least_loaded_first`] puts its `replicas` copies on the least loaded of the first
/// `CHOICES × replicas`.
pub const CHOICES: usize = 2;

/// Reorders `ranked` (a [`rank_peers`] ranking, best first) so that the `replicas` least
/// loaded of its first [`CHOICES`] `× replicas` entries come first, equal loads in rank order;
/// the rest of the head follows them and everything past it keeps its place. Equal loads
/// leave the ranking as it is.
///
/// Rank alone spreads a group's copies like balls thrown into bins: with tens of groups per
/// daemon the fullest holds nearly twice the mean. Choosing the less loaded of two candidates
/// per copy keeps the fullest near the mean ("the power of two choices"), and a reader still
/// finds a group among its first few ranked daemons.
pub fn least_loaded_first<P>(ranked: &mut [P], replicas: usize, load: impl FnMut(&P) -> u64) {
    let head = ranked.len().min(CHOICES.saturating_mul(replicas));
    // A stable sort: equal loads keep their rank order.
    ranked[..head].sort_by_cached_key(load);
}

/// Like [`least_loaded_first`], but first tries to keep a group on `keep`, the holders of the
/// group placed just before it (a file's preceding leaves): when there are `replicas` of them
/// and all are among its first [`CHOICES`] `× replicas` ranked, they come first (in rank
/// order) whatever their loads, and the call returns `true`.
///
/// Consecutive groups on the same daemons make one map task over both; a placer keeps a run
/// going up to a split's worth and then lets loads choose again. A reader still finds each
/// group among its first few ranked daemons.
pub fn keep_or_least_loaded<P: PartialEq>(
    ranked: &mut [P],
    replicas: usize,
    load: impl FnMut(&P) -> u64,
    keep: Option<&[P]>,
) -> bool {
    let head = ranked.len().min(CHOICES.saturating_mul(replicas));
    let candidates = &ranked[..head];
    match keep {
        Some(keep) if keep.len() == replicas && keep.iter().all(|p| candidates.contains(p)) => {
            // A stable sort on "not kept": the kept first, each side in rank order.
            ranked[..head].sort_by_key(|p| !keep.contains(p));
            true
        }
        _ => {
            least_loaded_first(ranked, replicas, load);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Block;

    #[test]
    fn a_probe_longer_than_the_limit_is_refused() {
        let bytes = BlockRequest::Probe(vec![1; MAX_PROBE + 1]).encode();
        assert!(matches!(
            BlockRequest::decode(&bytes),
            Err(WireError::TooLarge { what: "probe", .. })
        ));
    }

    fn cids(n: usize) -> Vec<Cid> {
        (0..n)
            .map(|i| *Block::raw(i.to_le_bytes().to_vec()).cid())
            .collect()
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let block = Block::raw(b"hello".to_vec());
        for req in [
            BlockRequest::Get(*block.cid()),
            BlockRequest::Put {
                cid: *block.cid(),
                data: block.data().to_vec(),
                replicas: 3,
                session: u64::MAX,
                group: None,
            },
            BlockRequest::Put {
                cid: *block.cid(),
                data: block.data().to_vec(),
                replicas: 2,
                session: 1,
                group: Some(cids(1)[0]),
            },
            BlockRequest::Commit { session: 7 },
            BlockRequest::Prove {
                cid: cids(1)[0],
                nonce: [9; 32],
            },
            BlockRequest::Has(cids(3)),
            BlockRequest::Has(vec![]),
            BlockRequest::Probe(vec![5; MAX_PROBE]),
            BlockRequest::Probe(vec![]),
        ] {
            assert_eq!(BlockRequest::decode(&req.encode()).unwrap(), req);
        }
        for resp in [
            BlockResponse::Block(vec![1, 2, 3]),
            BlockResponse::Block(vec![]),
            BlockResponse::Block(vec![7; 127]),
            BlockResponse::Block(vec![7; 128]),
            BlockResponse::Block(vec![7; MAX_BLOCK_SIZE]),
            BlockResponse::NotFound,
            BlockResponse::Stored,
            BlockResponse::Have(vec![true, false]),
            BlockResponse::Proof([7; 32]),
            BlockResponse::Refused("disk full".into()),
        ] {
            assert_eq!(BlockResponse::decode(&resp.encode()).unwrap(), resp);
            let (head, tail) = resp.encode_parts();
            assert_eq!([head.as_slice(), tail].concat(), resp.encode());
        }
    }

    #[test]
    fn limits_are_enforced() {
        let too_big = BlockRequest::Put {
            cid: cids(1)[0],
            data: vec![0; MAX_BLOCK_SIZE + 1],
            replicas: 1,
            session: 0,
            group: None,
        };
        assert!(matches!(
            BlockRequest::decode(&too_big.encode()),
            Err(WireError::TooLarge { what: "block", .. })
        ));
        let too_many = BlockRequest::Has(cids(MAX_HAS + 1));
        assert!(matches!(
            BlockRequest::decode(&too_many.encode()),
            Err(WireError::TooLarge { .. })
        ));
        assert!(BlockRequest::decode(&vec![0; MAX_REQUEST_SIZE + 1]).is_err());
        let long = BlockResponse::Refused("é".repeat(1000));
        match BlockResponse::decode(&long.encode()).unwrap() {
            BlockResponse::Refused(r) => assert!(r.len() <= MAX_REASON),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_bytes_never_panic() {
        // Truncations and single-byte corruptions of every kind of message, plus noise.
        let mut samples: Vec<Vec<u8>> = vec![
            BlockRequest::Get(cids(1)[0]).encode(),
            BlockRequest::Has(cids(5)).encode(),
            BlockResponse::Have(vec![true; 9]).encode(),
            BlockResponse::Refused("x".into()).encode(),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            samples.push(seed.to_le_bytes().repeat((seed % 9) as usize));
        }
        for s in &samples {
            for cut in 0..=s.len() {
                let _ = BlockRequest::decode(&s[..cut]);
                let _ = BlockResponse::decode(&s[..cut]);
            }
            for i in 0..s.len() {
                let mut m = s.clone();
                m[i] ^= 0x5a;
                let _ = BlockRequest::decode(&m);
                let _ = BlockResponse::decode(&m);
            }
        }
        assert_eq!(
            BlockRequest::decode(&[0, 3, 1, 2, 3]),
            Err(WireError::BadCid)
        );
    }

    #[test]
    fn the_least_loaded_of_the_first_choices_come_first() {
        // (ranked loads, replicas, expected order of the ranked positions)
        let cases: &[(&[u64], usize, &[usize])] = &[
            (&[], 2, &[]),
            (&[5], 1, &[0]),
            (&[5], 2, &[0]),
            // Equal loads: rank order.
            (&[1, 1, 1, 1, 1], 2, &[0, 1, 2, 3, 4]),
            // One copy chooses between the first two only.
            (&[3, 2, 1, 0], 1, &[1, 0, 2, 3]),
            // Two copies among the first four; a lighter fifth is not a candidate.
            (&[9, 4, 7, 1, 0], 2, &[3, 1, 2, 0, 4]),
            // Ties among the chosen keep rank order.
            (&[2, 1, 1, 0, 5, 0], 2, &[3, 1, 2, 0, 4, 5]),
            // Fewer daemons than candidates: all of them choose.
            (&[8, 3, 5], 2, &[1, 2, 0]),
            // Three copies among six.
            (&[6, 5, 4, 3, 2, 1, 0], 3, &[5, 4, 3, 2, 1, 0, 6]),
        ];
        for &(loads, replicas, expected) in cases {
            let mut ranked: Vec<usize> = (0..loads.len()).collect();
            least_loaded_first(&mut ranked, replicas, |&i| loads[i]);
            assert_eq!(ranked, expected, "loads {loads:?}, {replicas} replicas");
        }
    }

    #[test]
    fn a_run_is_kept_only_on_candidates() {
        let loads = [9u64, 0, 5, 1, 0, 0];
        // (holders to keep, replicas, kept?, expected order of the ranked positions)
        type Case<'a> = (Option<&'a [usize]>, usize, bool, &'a [usize]);
        let cases: &[Case] = &[
            (None, 2, false, &[1, 3, 2, 0, 4, 5]),
            // Kept whatever their loads, in rank order.
            (Some(&[2, 0]), 2, true, &[0, 2, 1, 3, 4, 5]),
            (Some(&[3, 1]), 2, true, &[1, 3, 0, 2, 4, 5]),
            // One of them is not a candidate (ranked fifth): loads choose.
            (Some(&[0, 4]), 2, false, &[1, 3, 2, 0, 4, 5]),
            // As many as the copies, no fewer.
            (Some(&[0]), 2, false, &[1, 3, 2, 0, 4, 5]),
            (Some(&[0]), 1, true, &[0, 1, 2, 3, 4, 5]),
            (Some(&[2]), 1, false, &[1, 0, 2, 3, 4, 5]),
        ];
        for &(keep, replicas, kept, expected) in cases {
            let mut ranked: Vec<usize> = (0..loads.len()).collect();
            let was = keep_or_least_loaded(&mut ranked, replicas, |&i| loads[i], keep);
            assert_eq!((was, ranked.as_slice()), (kept, expected), "keep {keep:?}");
        }
    }

    #[test]
    fn two_choices_keep_the_fullest_daemon_near_the_mean() {
        let peers: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 38]).collect();
        // Ten groups per daemon, two copies each.
        let groups = cids(500);
        let mut by_rank = vec![0u64; peers.len()];
        let mut chosen = vec![0u64; peers.len()];
        for cid in &groups {
            let mut ranked: Vec<usize> = rank_peers(cid, &peers)
                .into_iter()
                .map(|p| p[0] as usize)
                .collect();
            for &p in &ranked[..2] {
                by_rank[p] += 1;
            }
            least_loaded_first(&mut ranked, 2, |&p| chosen[p]);
            for &p in &ranked[..2] {
                chosen[p] += 1;
            }
        }
        let (by_rank, chosen) = (by_rank.iter().max(), chosen.iter().max());
        // A mean of 10 copies: rank alone puts 20 on the fullest here, two choices 12.
        assert!(by_rank >= Some(&16), "{by_rank:?}");
        assert!(chosen <= Some(&12), "{chosen:?} {by_rank:?}");
    }

    #[test]
    fn past_a_neighbourhood_the_closest_peers_are_ranked_and_a_leaver_is_replaced_by_the_next() {
        let peers: &'static [Vec<u8>] = Vec::leak((0..150u8).map(|i| vec![i; 38]).collect());
        let mut apart = 0;
        for cid in cids(200) {
            let places = keyspace_keys(&cid).map(|k| keyspace_position(&k));
            let distance =
                |p: &[u8], side: usize| keyspace_distance(&keyspace_position(p), &places[side]);
            let closest = |peers: &[&'static Vec<u8>]| -> Vec<&'static Vec<u8>> {
                let mut hood = Vec::new();
                for side in 0..2 {
                    let mut by_distance = peers.to_vec();
                    by_distance.sort_by_key(|p| distance(p, side));
                    hood.extend_from_slice(&by_distance[..NEIGHBOURHOOD]);
                }
                hood.sort();
                hood.dedup();
                hood
            };
            let all: Vec<&Vec<u8>> = peers.iter().collect();
            let hood = closest(&all);
            // Two places in one crowded part of the keyspace have the same closest peers.
            assert!(hood.len() >= NEIGHBOURHOOD);
            apart += usize::from(hood.len() > NEIGHBOURHOOD);
            let ranked = rank_peers(&cid, peers);
            assert_eq!(ranked.len(), peers.len());
            // The neighbourhood first, ranked as it would be alone; then the rest, nearer
            // place first.
            let mut near = ranked[..hood.len()].to_vec();
            near.sort();
            assert_eq!(near, hood);
            assert_eq!(rank_peers(&cid, hood.iter().copied()), ranked[..hood.len()]);
            let far = |p: &&Vec<u8>| distance(p, 0).min(distance(p, 1));
            assert!(ranked[hood.len()..]
                .windows(2)
                .all(|w| far(&w[0]) <= far(&w[1])));
            // One of the neighbourhood leaves: the others keep their order; the peers that
            // take its place come from outside.
            let gone = ranked[3];
            let without: Vec<&Vec<u8>> = all.iter().filter(|p| **p != gone).copied().collect();
            let reranked = rank_peers(&cid, without.iter().copied());
            let now = closest(&without);
            let kept: Vec<_> = reranked[..now.len()]
                .iter()
                .filter(|p| hood.contains(p))
                .copied()
                .collect();
            let before: Vec<_> = ranked[..hood.len()]
                .iter()
                .filter(|p| **p != gone)
                .copied()
                .collect();
            assert_eq!(kept, before);
        }
        assert!(
            apart > 150,
            "two places, mostly two sets of closest: {apart}"
        );
    }

    #[test]
    fn placement_is_stable_and_even() {
        let peers: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 38]).collect();
        let blocks = cids(5000);
        let mut firsts = [0usize; 5];
        for cid in &blocks {
            let ranked = rank_peers(cid, &peers);
            assert_eq!(ranked.len(), 5);
            firsts[ranked[0][0] as usize] += 1;
            // Removing a peer keeps the others' order.
            let without: Vec<&Vec<u8>> = peers.iter().filter(|p| p[0] != 2).collect();
            let reranked = rank_peers(cid, without.iter().copied());
            let expected: Vec<_> = ranked.iter().filter(|p| p[0] != 2).copied().collect();
            assert_eq!(reranked, expected);
        }
        for n in firsts {
            assert!((850..1150).contains(&n), "uneven placement {firsts:?}");
        }
    }
}
