//! What every command starts from: the repository directory, how to reach peers, and the
//! [`Node`] built from them.

use crate::args::NetArgs;
use anyhow::{bail, Context, Result};
use libp2p::Multiaddr;
use p2pmr_node::engine::shipped;
use p2pmr_node::{Node, Repo, SwarmKey, SWARM_KEY_FILE};
use p2pmr_protocol::Cid;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Environment variable listing peers to dial, as `--peer` does.
const PEERS_ENV: &str = "P2PMR_PEERS";
/// Environment variable naming the swarm key file, as `--swarm-key` does.
const SWARM_KEY_ENV: &str = "P2PMR_SWARM_KEY";
/// Environment variable that, set to 1, refuses to run without a swarm key (kubo's
/// LIBP2P_FORCE_PNET).
const FORCE_PNET_ENV: &str = "P2PMR_FORCE_PNET";

/// The repository directory as given (not yet opened) and the peers to dial.
#[derive(Debug)]
pub(crate) struct Env {
    home: Option<PathBuf>,
    pub(crate) peers: Vec<Multiaddr>,
    pub(crate) mdns: bool,
    pub(crate) mesh: usize,
    swarm_key: Option<PathBuf>,
    /// No progress bars.
    pub(crate) quiet: bool,
}

impl Env {
    pub(crate) fn new(home: Option<PathBuf>, net: &NetArgs, quiet: bool) -> Result<Self> {
        let mut peers = net.peers.clone();
        if let Some(env) = std::env::var_os(PEERS_ENV) {
            let env = env.to_string_lossy();
            for addr in env.split([',', ' ']).filter(|a| !a.is_empty()) {
                peers.push(addr.parse().map_err(|e| {
                    anyhow::anyhow!("{PEERS_ENV}: '{addr}' is not a multiaddr ({e})")
                })?);
            }
        }
        Ok(Self {
            home,
            peers,
            mdns: !net.no_mdns,
            mesh: net.mesh.into(),
            swarm_key: net.swarm_key.clone(),
            quiet,
        })
    }

    /// The private swarm's key: `--swarm-key`, else `$P2PMR_SWARM_KEY`, else the
    /// repository's `swarm.key` if there is one.
    pub(crate) fn swarm_key(&self) -> Result<Option<SwarmKey>> {
        let given = self.swarm_key.clone().or_else(|| {
            std::env::var_os(SWARM_KEY_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let key = match given {
            Some(path) => Some(SwarmKey::read(&path)?),
            None => match self.home_dir() {
                Ok(home) => SwarmKey::of_home(&home)?,
                Err(_) => None,
            },
        };
        let forced = std::env::var_os(FORCE_PNET_ENV).is_some_and(|v| v == "1");
        if forced && key.is_none() {
            bail!(
                "{FORCE_PNET_ENV}=1 but there is no swarm key (give --swarm-key FILE, set \
                 {SWARM_KEY_ENV}, or put one in <home>/{SWARM_KEY_FILE})"
            );
        }
        Ok(key)
    }

    /// A client node that reads `repo` first, if given.
    pub(crate) fn node(&self, repo: Option<Repo>) -> Result<Node> {
        let mut builder = Node::builder()
            .peers(self.peers.clone())
            .mdns(self.mdns)
            .mesh(self.mesh)
            .swarm_key(self.swarm_key()?);
        // The repository's client identity, if it has one (`p2pmr id` makes it): what
        // daemons started with --allow-jobs know this user by.
        if let Ok(home) = self.home_dir() {
            if let Some(identity) = p2pmr_node::client_identity(&home)? {
                builder = builder.identity(identity);
            }
        }
        if let Some(repo) = repo {
            builder = builder.repo(repo);
        }
        Ok(builder.build())
    }

    pub(crate) fn home_dir(&self) -> Result<PathBuf> {
        self.home
            .clone()
            .or_else(|| {
                std::env::var_os(p2pmr_node::HOME_ENV)
                    .filter(|h| !h.is_empty())
                    .map(PathBuf::from)
            })
            .or_else(p2pmr_node::default_home)
            .context("no repository: pass --home DIR or set P2PMR_HOME (HOME is not set)")
    }

    pub(crate) fn open_repo(&self) -> Result<Repo> {
        let home = self.home_dir()?;
        Repo::open(&home).with_context(|| format!("cannot open repository {}", home.display()))
    }

    /// The repository if one exists; client commands never create one.
    pub(crate) fn existing_repo(&self) -> Result<Option<Repo>> {
        let Ok(home) = self.home_dir() else {
            return Ok(None);
        };
        if !home.join("blocks").is_dir() {
            return Ok(None);
        }
        Repo::open(&home)
            .map(Some)
            .with_context(|| format!("cannot open repository {}", home.display()))
    }

    /// A job by shipped name, .wasm path, or CID in the local repository: `(name, module bytes)`.
    pub(crate) fn resolve_job(&self, job: &str) -> Result<(String, Vec<u8>)> {
        if let Some(wasm) = shipped::by_name(job) {
            return Ok((job.to_owned(), wasm.to_vec()));
        }
        let path = Path::new(job);
        if path.is_file() {
            let wasm = std::fs::read(path).with_context(|| format!("cannot read {job}"))?;
            return Ok((job.to_owned(), wasm));
        }
        if let Ok(cid) = Cid::try_from(job) {
            if let Some(repo) = self.existing_repo()? {
                let mut wasm = Vec::new();
                repo.cat(cid, 0, |b| {
                    wasm.extend_from_slice(b);
                    Ok(())
                })?;
                return Ok((job.to_owned(), wasm));
            }
            bail!("job {job} is not in the local repository");
        }
        let names: Vec<&str> = shipped::JOBS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| *n != "hostile")
            .collect();
        bail!(
            "no job '{job}': not a shipped job ({}), a .wasm file or a CID",
            names.join(", ")
        )
    }
}

pub(crate) fn open_input(path: &Path) -> Result<Box<dyn Read + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdin()));
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .is_dir()
    {
        bail!("{} is a directory, not a file", path.display());
    }
    Ok(Box::new(file))
}

pub(crate) fn parse_cid(s: &str) -> Result<Cid> {
    Cid::try_from(s.trim()).map_err(|e| anyhow::anyhow!("'{s}' is not a CID ({e})"))
}
