//! The node's integration tests, in one binary (one link of libp2p and wasmtime): real peers
//! over TCP on 127.0.0.1 in this process, each with its own repository in a temporary
//! directory, started by the library's shared [`Cluster`](p2pmr_node::cluster::Cluster).
//!
//! - `bitswap`: the Bitswap 1.2.0 server against a peer speaking it over plain streams, and
//!   the client against IPFS peers that do not have what it wants.
//! - `blocks`: adding, reading and keeping blocks across peers (lying peers, corrupt disks,
//!   lost daemons, Kademlia discovery).
//! - `engine`: MapReduce jobs over the network, checked against `run-local`.
//! - `http`: the HTTP API and gateway over a real socket.
//! - `jobs`: the wasm runtime on its own (shipped jobs against native code, hostile modules).
//! - `swarm`: private swarms (a shared key: members only) and who may run jobs.

mod bitswap;
mod blocks;
mod engine;
mod http;
mod jobs;
mod swarm;

use anyhow::Result;
use p2pmr_node::cluster::{Cluster, ClusterConfig};
use p2pmr_node::{DaemonConfig, Node};
use p2pmr_protocol::Cid;

/// `n` daemons with `slots` slots each that know each other.
async fn linked(n: usize, slots: u32) -> Result<Cluster> {
    Ok(Cluster::start(ClusterConfig::linked(n, slots)).await?)
}

/// `n` daemons with 2 slots each that know no one (clients dial them all).
async fn unlinked(n: usize) -> Result<Cluster> {
    Ok(Cluster::start(ClusterConfig {
        daemons: n,
        slots: 2,
        linked: false,
        daemon: DaemonConfig::default(),
    })
    .await?)
}

/// A client of every daemon of `cluster`, once it sees `want` of them.
async fn client(cluster: &Cluster, want: usize) -> Result<Node> {
    let node = cluster.client();
    node.peers().wait_for(want).await?;
    Ok(node)
}

/// The whole file or directory at `root`, read through `node`.
async fn cat_all(node: &Node, root: Cid) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    node.blocks()
        .cat_tree(root, &mut |b: &[u8]| {
            out.extend_from_slice(b);
            Ok(())
        })
        .await?;
    Ok(out)
}

/// A libp2p peer of the test's own over TCP with `$security` (an upgrade's constructor) and
/// Yamux, running `$behaviour`; its connections stay open for a minute when idle.
macro_rules! tcp_swarm_over {
    ($security:expr, $behaviour:expr) => {
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                $security,
                libp2p::yamux::Config::default,
            )?
            .with_behaviour($behaviour)?
            .with_swarm_config(|c| {
                c.with_idle_connection_timeout(std::time::Duration::from_secs(60))
            })
            .build()
    };
}
use tcp_swarm_over;

/// A libp2p peer of the test's own, over TCP with Noise and Yamux, running `behaviour`.
fn tcp_swarm<B: libp2p::swarm::NetworkBehaviour>(
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> Result<libp2p::Swarm<B>> {
    Ok(tcp_swarm_over!(libp2p::noise::Config::new, behaviour))
}
