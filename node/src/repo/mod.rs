//! A peer's repository: the directory `<home>` and what it holds. [`Repo`] owns its layout:
//! `blocks/` (the block store, with `tmp/` and `quarantine/`), `identity.key`, `replicas` (the
//! replica-target log) and `jobs/` (a coordinator's finished jobs).

pub mod files;
pub mod store;

use files::{Added, FileError};
use libp2p::identity::Keypair;
use p2pmr_protocol::unixfs::Layout;
use p2pmr_protocol::Cid;
use std::fs;
use std::io::Read;
use std::io::Write;
use std::path::{Path, PathBuf};
use store::{BlockStore, StoreError};
use thiserror::Error;

/// The identity key (protobuf-encoded ed25519, mode 0600).
const IDENTITY_FILE: &str = "identity.key";
/// The replica-target log (see the keeper).
const REPLICA_LOG: &str = "replicas";
/// Finished jobs, one file each, named by job id.
const JOBS_DIR: &str = "jobs";

/// The identity key could not be read or written.
#[derive(Debug, Error)]
#[error("identity key {path}: {reason}")]
pub struct IdentityError {
    /// The key file.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// The identity key of the repository at `home` (its daemon's peer id), created on first use.
pub fn identity_at(home: &Path) -> Result<Keypair, IdentityError> {
    let path = home.join(IDENTITY_FILE);
    let err = |reason: String| IdentityError {
        path: path.display().to_string(),
        reason,
    };
    match fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            // Temp file + rename: a crash never leaves a half-written key behind.
            let tmp = home.join(format!("{IDENTITY_FILE}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut options = fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut f = options.open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                fs::rename(&tmp, &path)
            };
            write().map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The identity clients of the repository at `home` use, if the repository has an identity:
/// derived from it, so a user's peer id is stable across commands, yet never the same as the
/// daemon's on that repository (two peers with one id would confuse every other peer).
pub fn client_identity(home: &Path) -> Result<Option<Keypair>, IdentityError> {
    if !home.join(IDENTITY_FILE).exists() {
        return Ok(None);
    }
    identity_at(home).map(|daemon| Some(client_key(&daemon)))
}

/// The client key derived from a daemon key (see [`client_identity`]).
pub fn client_key(daemon: &Keypair) -> Keypair {
    use sha2::{Digest, Sha256};
    let secret = daemon
        .clone()
        .try_into_ed25519()
        .map(|k| k.secret().as_ref().to_vec())
        .unwrap_or_else(|_| daemon.to_protobuf_encoding().unwrap_or_default());
    let mut seed: [u8; 32] = Sha256::new()
        .chain_update(b"p2pmr client identity\0")
        .chain_update(&secret)
        .finalize()
        .into();
    Keypair::ed25519_from_bytes(&mut seed).expect("any 32 bytes are an ed25519 secret key")
}

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

    /// Loads the repository's identity key, creating one on first use, so the peer id survives
    /// restarts.
    pub fn identity(&self) -> Result<Keypair, IdentityError> {
        identity_at(&self.home)
    }

    /// The replica-target log the daemon's keeper keeps.
    pub fn replica_log(&self) -> PathBuf {
        self.home.join(REPLICA_LOG)
    }

    /// The ledger of client writes (see [`Ledger`](crate::blocks::ledger::Ledger)).
    pub fn ledger(&self) -> PathBuf {
        self.home.join("ledger")
    }

    /// Where a coordinator records its finished jobs.
    pub fn jobs_dir(&self) -> PathBuf {
        self.home.join(JOBS_DIR)
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
