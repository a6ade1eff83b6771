//! Pure data layer of p2pmr: content identifiers, verified blocks, and the kubo-compatible
//! UnixFS file format (dag-pb nodes over raw leaves).
//!
//! Beside them: the peers' wire messages and placement rule ([`wire`]), the job ABI between host
//! and wasm modules ([`abi`]), the record rule map tasks read by ([`records`]) and the job spec
//! whose CID is a job's id ([`job`]), the job protocol's messages and events ([`engine`]), and
//! CAR archives for moving DAGs between tools ([`car`]), the messages of IPFS's block
//! exchange, Bitswap ([`bitswap`]), how files are cut into leaves ([`chunker`]), and the keys
//! under which workers remember task outputs across jobs ([`memo`]).
//!
//! Nothing here does I/O or depends on an async runtime. The block store, the network and the
//! scheduler in `p2pmr-node` drive the sans-I/O state machines defined here
//! ([`unixfs::FileBuilder`] to chunk and link a file, [`unixfs::FileReader`] to walk one back from
//! any byte offset), so every layer shares one implementation of the format.
#![deny(missing_docs)]

pub mod abi;
pub mod bitswap;
pub mod block;
pub mod car;
pub mod chunker;
pub mod dagpb;
pub mod engine;
pub mod job;
pub mod memo;
mod pb;
pub mod records;
pub mod tar;
pub mod unixfs;
pub mod wire;

pub use block::{Block, BlockError, Seal, MAX_BLOCK_SIZE};
pub use cid::Cid;
