//! A peer's repository: the directory `<home>` and what it holds (the block store, the
//! files stored in it, the identity key, the replica log and the job log).

pub mod files;
pub mod store;

use files::{Added, FileError};
use p2pmr_protocol::unixfs::Layout;
use p2pmr_protocol::Cid;
use std::io::Read;
use std::path::{Path, PathBuf};
use store::{BlockStore, StoreError};

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
