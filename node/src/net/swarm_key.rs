//! Private swarms: a pre-shared key in kubo's `swarm.key` format, with which every connection
//! is encrypted before anything else is said, so only peers holding the same key can connect.

use libp2p::pnet::PreSharedKey;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use thiserror::Error;

/// The file a repository's swarm key is read from when none is given (kubo's name).
pub const SWARM_KEY_FILE: &str = "swarm.key";

/// A private swarm's key (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SwarmKey(PreSharedKey);

/// Why a swarm key could not be read or written.
#[derive(Debug, Error)]
pub enum SwarmKeyError {
    /// The file could not be read.
    #[error("cannot read the swarm key {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a key in kubo's format.
    #[error(
        "{path} is not a swarm key (expected /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits)"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be written.
    #[error("cannot write the swarm key {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The operating system gave no random bytes.
    #[error("no randomness for a new swarm key: {0}")]
    Random(String),
}

impl SwarmKey {
    /// A new random key.
    pub fn generate() -> Result<Self, SwarmKeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| SwarmKeyError::Random(e.to_string()))?;
        Ok(Self(PreSharedKey::new(bytes)))
    }

    /// Reads the key in `path`.
    pub fn read(path: &Path) -> Result<Self, SwarmKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| SwarmKeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        PreSharedKey::from_str(&text)
            .map(Self)
            .map_err(|_| SwarmKeyError::Malformed {
                path: path.to_owned(),
            })
    }

    /// The key of the repository at `home`, if it has one (`<home>/swarm.key`).
    pub fn of_home(home: &Path) -> Result<Option<Self>, SwarmKeyError> {
        let path = home.join(SWARM_KEY_FILE);
        match path.try_exists() {
            Ok(true) => Self::read(&path).map(Some),
            Ok(false) => Ok(None),
            Err(source) => Err(SwarmKeyError::Read { path, source }),
        }
    }

    /// Writes the key to `path`, readable by its owner only; an existing file is never
    /// overwritten (it may be the key a swarm runs on).
    pub fn write_new(&self, path: &Path) -> Result<(), SwarmKeyError> {
        let failed = |source| SwarmKeyError::Write {
            path: path.to_owned(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(failed)?;
        file.write_all(self.0.to_key_file().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(failed)
    }

    /// A short public name of the key (safe to print: it does not reveal the key).
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }

    pub(crate) fn psk(&self) -> PreSharedKey {
        self.0
    }
}

/// Shows the fingerprint, never the key.
impl fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SwarmKey({})", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_kubos_format_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SwarmKey::generate().unwrap();
        assert_ne!(key, SwarmKey::generate().unwrap());
        let path = dir.path().join(SWARM_KEY_FILE);
        key.write_new(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["/key/swarm/psk/1.0.0/", "/base16/"]);
        assert!(lines[2].len() == 64 && lines[2].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(SwarmKey::read(&path).unwrap(), key);
        assert_eq!(SwarmKey::of_home(dir.path()).unwrap(), Some(key));
        assert!(
            !format!("{key:?}").contains(lines[2]),
            "Debug shows the key"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Never overwritten.
        assert!(SwarmKey::generate().unwrap().write_new(&path).is_err());
        assert_eq!(SwarmKey::read(&path).unwrap(), key);

        let empty = tempfile::tempdir().unwrap();
        assert_eq!(SwarmKey::of_home(empty.path()).unwrap(), None);
        for bad in [
            "",
            "/key/swarm/psk/1.0.0/\n/base16/\nabc\n",
            "/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n",
            "just some text",
        ] {
            std::fs::write(empty.path().join("bad"), bad).unwrap();
            let read = SwarmKey::read(&empty.path().join("bad"));
            assert!(
                matches!(read, Err(SwarmKeyError::Malformed { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            SwarmKey::read(&empty.path().join("missing")),
            Err(SwarmKeyError::Read { .. })
        ));
    }
}
