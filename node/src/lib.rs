//! A p2pmr peer as a library, used alike by the `p2pmr` binary, the examples and the tests.
//!
//! The folders are the roles: [`repo`] is the local half of a peer (the directory that holds
//! its blocks and identity), [`net`] the libp2p swarm, [`blocks`] moving blocks between peers
//! (push, fetch, replica upkeep), [`engine`] the MapReduce engine (job client, coordinator,
//! worker and the wasm runtime), and [`daemon`] a serving peer that puts them together; a
//! daemon also speaks IPFS's Bitswap ([`bitswap`]), so IPFS nodes can fetch what it holds and
//! it can fetch what only they hold.

pub mod bitswap;
pub mod blocks;
pub mod cluster;
pub mod corpus;
pub mod daemon;
pub mod engine;
mod error;
mod http;
pub mod net;
mod node;
pub mod repo;
pub mod sim;
mod tasks;

pub use blocks::ledger::{Collected, Ledger, LedgerError, DEFAULT_GC_GRACE};
pub use blocks::limits::{MinFree, WritePolicy};
pub use daemon::{Daemon, DaemonConfig};
pub use error::Error;
pub use http::{ApiConfig, ApiStartError, DEFAULT_API_PORT, HEADER_TIMEOUT};
pub use net::{SwarmKey, SwarmKeyError, DEFAULT_MESH, SWARM_KEY_FILE};
pub use node::{Blocks, DaemonView, JobHandle, Jobs, Node, NodeBuilder, Peers, Replicas};

pub use repo::files::{Added, FileError};
pub use repo::store::{BlockStore, StoreError, StoreStats};
pub use repo::{client_identity, client_key, default_home, identity_at, Repo, HOME_ENV};
