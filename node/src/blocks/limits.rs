//! How much a daemon lets others write to it: never past a floor of free disk space (for
//! anyone), and at most so many bytes per client peer (daemons replicating among themselves
//! are not counted). A write that would pass either is refused before anything is stored, so
//! what is already durable stays.

use libp2p::PeerId;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The default per-client allowance.
pub const DEFAULT_MAX_CLIENT_BYTES: u64 = 16 << 30;
/// The most copies a client may ask the daemons to keep of a block: the keeper keeps a block's
/// target up for good, so a client asking for 255 would have every block it writes copied to
/// every daemon.
pub const MAX_CLIENT_REPLICAS: u8 = 8;
/// The default free-space floor: this share of the filesystem.
pub const DEFAULT_MIN_FREE_PERCENT: u8 = 5;

/// How much free space a daemon keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    /// This many bytes.
    Bytes(u64),
    /// This percentage of the filesystem (0-100).
    Percent(u8),
}

impl Default for MinFree {
    fn default() -> Self {
        Self::Percent(DEFAULT_MIN_FREE_PERCENT)
    }
}

/// A daemon's write policy: [`MinFree`] and a per-client allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritePolicy {
    /// Free space kept on the repository's filesystem.
    pub min_free: MinFree,
    /// Bytes one client peer may store here.
    pub max_client_bytes: u64,
}

impl Default for WritePolicy {
    fn default() -> Self {
        Self {
            min_free: MinFree::default(),
            max_client_bytes: DEFAULT_MAX_CLIENT_BYTES,
        }
    }
}

/// [`WritePolicy`] applied to one repository, with each client's bytes so far.
#[derive(Debug, Clone)]
pub(crate) struct WriteLimits {
    policy: WritePolicy,
    home: PathBuf,
    /// Bytes each client peer has stored here (as the ledger counted them at start, and
    /// since).
    by_client: Arc<Mutex<HashMap<PeerId, u64>>>,
}

impl WriteLimits {
    /// The limits of `policy` on the repository at `home`, with each client's bytes stored so
    /// far.
    pub(crate) fn new(policy: WritePolicy, home: &Path, stored: HashMap<PeerId, u64>) -> Self {
        Self {
            policy,
            home: home.to_owned(),
            by_client: Arc::new(Mutex::new(stored)),
        }
    }

    /// Takes `size` bytes of `peer`'s allowance (none for a daemon) if the disk and the
    /// allowance have room; else why not. Give them back with [`WriteLimits::release`] if the
    /// block turns out not to be stored after all.
    pub(crate) fn reserve(&self, peer: PeerId, is_daemon: bool, size: u64) -> Result<(), String> {
        if let Some((free, total)) = free_space(&self.home) {
            let floor = match self.policy.min_free {
                MinFree::Bytes(b) => b,
                MinFree::Percent(p) => total / 100 * u64::from(p.min(100)),
            };
            if free.saturating_sub(size) < floor {
                return Err(format!(
                    "this daemon's disk is full: it keeps {} free and has {} (--min-free-disk)",
                    mib(floor),
                    mib(free)
                ));
            }
        }
        if is_daemon {
            return Ok(());
        }
        let mut by_client = self.by_client.lock().expect("poisoned");
        let used = by_client.entry(peer).or_default();
        let max = self.policy.max_client_bytes;
        if used.saturating_add(size) > max {
            return Err(format!(
                "{peer} has stored {} here and may store at most {} (--max-client-bytes)",
                mib(*used),
                mib(max)
            ));
        }
        *used += size;
        Ok(())
    }

    /// Gives back bytes [`WriteLimits::reserve`] took for a block that was not stored.
    pub(crate) fn release(&self, peer: PeerId, is_daemon: bool, size: u64) {
        if !is_daemon {
            if let Some(used) = self.by_client.lock().expect("poisoned").get_mut(&peer) {
                *used = used.saturating_sub(size);
            }
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Free bytes (for unprivileged users) and total bytes of the filesystem holding `path`.
#[cfg(target_os = "linux")]
fn free_space(path: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some((
        s.f_bavail.saturating_mul(s.f_frsize),
        s.f_blocks.saturating_mul(s.f_frsize),
    ))
}

#[cfg(not(target_os = "linux"))]
fn free_space(_: &Path) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_get_an_allowance_and_nobody_passes_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let (client, daemon) = (PeerId::random(), PeerId::random());
        let tight = WriteLimits::new(
            WritePolicy {
                min_free: MinFree::Bytes(0),
                max_client_bytes: 1000,
            },
            dir.path(),
            HashMap::new(),
        );
        assert!(tight.reserve(client, false, 600).is_ok());
        let over = tight.reserve(client, false, 600).unwrap_err();
        assert!(over.contains("--max-client-bytes"), "{over}");
        tight.release(client, false, 600);
        assert!(
            tight.reserve(client, false, 600).is_ok(),
            "released bytes count again"
        );
        assert!(
            tight.reserve(PeerId::random(), false, 1000).is_ok(),
            "per client"
        );
        assert!(
            tight.reserve(daemon, true, 1 << 30).is_ok(),
            "daemons are not counted"
        );

        let full = WriteLimits::new(
            WritePolicy {
                min_free: MinFree::Percent(100),
                max_client_bytes: u64::MAX,
            },
            dir.path(),
            HashMap::new(),
        );
        if free_space(dir.path()).is_some() {
            for is_daemon in [false, true] {
                let refused = full.reserve(daemon, is_daemon, 1).unwrap_err();
                assert!(refused.contains("--min-free-disk"), "{refused}");
            }
        }
    }
}
