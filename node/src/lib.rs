//! A p2pmr peer as a library: its repository (block store today; identity, network and job
//! runtime as they arrive), used alike by the `p2pmr` binary, the examples and the tests.
//!
//! [`Repo`] is the local half of a peer: the directory that holds its blocks. The binary in
//! `main.rs` only parses arguments and calls into this crate.

pub mod client;
pub mod coordinator;
pub mod daemon;
pub mod demo;
pub mod files;
pub mod jobs;
pub mod keeper;
pub mod local;
pub mod net;
pub mod progress;
pub mod remote;
pub mod shipped;
pub mod shuffle;
pub mod store;
pub mod worker;

use p2pmr_protocol::unixfs::Layout;
use p2pmr_protocol::Cid;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use files::{Added, FileError};
pub use store::{BlockStore, StoreError, StoreStats};

/// Environment variable naming the repository directory when `--home` is not given.
pub const HOME_ENV: &str = "P2PMR_HOME";

/// The repository used when neither `--home` nor `$P2PMR_HOME` is set: `~/.p2pmr`.
pub fn default_home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".p2pmr"))
}

/// A peer's repository directory.
#[derive(Debug, Clone)]
pub struct Repo {
    home: PathBuf,
    blocks: BlockStore,
}

impl Repo {
    /// Opens the repository at `home`, creating it if it does not exist.
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            home: home.to_owned(),
            blocks: BlockStore::open(home)?,
        })
    }

    /// The repository directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The block store.
    pub fn blocks(&self) -> &BlockStore {
        &self.blocks
    }

    /// Imports a file with kubo's default layout and returns once every block is durable.
    pub fn add(&self, source: impl Read) -> Result<Added, FileError> {
        files::import(source, Some(&self.blocks), Layout::KUBO)
    }

    /// Streams the file at `root` from `offset` into `sink`.
    pub fn cat(
        &self,
        root: Cid,
        offset: u64,
        sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, FileError> {
        files::read(&self.blocks, root, offset, sink)
    }
}
