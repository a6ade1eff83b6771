//! An in-process network of daemons on 127.0.0.1, each with its own temporary repository:
//! what `p2pmr demo`, the integration tests and the benchmarks run on.

use crate::daemon::{Daemon, DaemonConfig};
use crate::error::Error;
use crate::net::SwarmKey;
use crate::node::Node;
use libp2p::{Multiaddr, PeerId};
use std::time::Duration;
use tempfile::TempDir;

/// How long the daemons of a linked cluster may take to find each other.
const LINK_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Daemons to start.
    pub daemons: usize,
    /// Task slots per daemon (0: one per core).
    pub slots: u32,
    /// Each daemon dials the first (identify and Kademlia do the rest), and `start` returns
    /// once all know each other. Without it the daemons know no one.
    pub linked: bool,
    /// Everything else, for every daemon (its `listen`, `bootstrap` and `mdns` are set here).
    pub daemon: DaemonConfig,
}

impl ClusterConfig {
    /// `n` linked daemons with `slots` slots each and default settings otherwise.
    pub fn linked(n: usize, slots: u32) -> Self {
        Self {
            daemons: n,
            slots,
            linked: true,
            daemon: DaemonConfig::default(),
        }
    }
}

/// Daemons on 127.0.0.1 in this process. Dropping it without [`Cluster::stop`] aborts them.
#[derive(Debug)]
pub struct Cluster {
    daemons: Vec<Option<Daemon>>,
    dirs: Vec<TempDir>,
    /// The daemons' private swarm key, which the cluster's clients hold too.
    swarm_key: Option<SwarmKey>,
}

impl Cluster {
    /// Starts the daemons (TCP on 127.0.0.1, no mDNS).
    pub async fn start(config: ClusterConfig) -> Result<Self, Error> {
        let mut cluster = Self {
            daemons: Vec::new(),
            dirs: Vec::new(),
            swarm_key: config.daemon.swarm_key,
        };
        for _ in 0..config.daemons {
            let bootstrap = match config.linked {
                true => cluster.addrs().into_iter().take(1).collect(),
                false => Vec::new(),
            };
            cluster
                .add(DaemonConfig {
                    listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")],
                    bootstrap,
                    mdns: false,
                    slots: config.slots,
                    ..config.daemon.clone()
                })
                .await?;
        }
        if config.linked {
            cluster.wait_linked().await?;
        }
        Ok(cluster)
    }

    /// Starts one more daemon with `config` in a fresh repository; returns its index.
    pub async fn add(&mut self, config: DaemonConfig) -> Result<usize, Error> {
        let dir = tempfile::tempdir().map_err(Error::TempDir)?;
        let daemon = Daemon::start(dir.path(), config).await?;
        self.daemons.push(Some(daemon));
        self.dirs.push(dir);
        Ok(self.daemons.len() - 1)
    }

    /// Waits until every running daemon is connected to every other.
    pub async fn wait_linked(&self) -> Result<(), Error> {
        let n = self.daemons().count();
        let all = async {
            for d in self.daemons() {
                let mut watch = d.net().watch_daemons();
                let _ = watch.wait_for(|m| m.len() + 1 >= n).await;
            }
        };
        tokio::time::timeout(LINK_TIMEOUT, all)
            .await
            .map_err(|_| Error::TimedOut("the cluster's daemons finding each other"))
    }

    /// The running daemons.
    pub fn daemons(&self) -> impl Iterator<Item = &Daemon> {
        self.daemons.iter().flatten()
    }

    /// Daemon `i` (panics if it was taken).
    pub fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().expect("daemon was taken")
    }

    /// The index of the running daemon with this peer id.
    pub fn index_of(&self, peer: &PeerId) -> Option<usize> {
        self.daemons
            .iter()
            .position(|d| d.as_ref().is_some_and(|d| d.peer_id() == *peer))
    }

    /// Takes daemon `i` out (to stop, abort or restart it); its repository stays.
    pub fn take(&mut self, i: usize) -> Option<Daemon> {
        self.daemons[i].take()
    }

    /// Starts daemon `i` again on its repository (same identity) with `config`.
    pub async fn restart(&mut self, i: usize, config: DaemonConfig) -> Result<&Daemon, Error> {
        let daemon = Daemon::start(self.dirs[i].path(), config).await?;
        Ok(self.daemons[i].insert(daemon))
    }

    /// The first listen address of each running daemon.
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.daemons()
            .map(|d| d.listen_addrs()[0].clone())
            .collect()
    }

    /// A client node that dials every running daemon (no mDNS).
    pub fn client(&self) -> Node {
        self.client_of(self.addrs())
    }

    /// A client node that dials only `peers` (no mDNS), holding the daemons' swarm key.
    pub fn client_of(&self, peers: Vec<Multiaddr>) -> Node {
        Node::builder()
            .peers(peers)
            .mdns(false)
            .swarm_key(self.swarm_key)
            .discovery(Duration::from_secs(5))
            .build()
    }

    /// Stops every daemon cleanly.
    pub async fn stop(mut self) {
        for d in self.daemons.iter_mut().filter_map(Option::take) {
            let _ = d.stop().await;
        }
    }
}
