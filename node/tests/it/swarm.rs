//! Private swarms: daemons and clients that hold the same swarm key form a network and run
//! jobs; a peer without it, or with another, cannot reach them and is told why in one line;
//! a private swarm never listens on QUIC.

use super::{cat_all, client};
use anyhow::Result;
use p2pmr_node::cluster::{Cluster, ClusterConfig};
use p2pmr_node::engine::shipped;
use p2pmr_node::{DaemonConfig, Node, Replicas, SwarmKey};
use p2pmr_protocol::job::{JobInput, JobSpec};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_swarm_admits_only_holders_of_its_key() -> Result<()> {
    let key = SwarmKey::generate()?;
    let mut config = ClusterConfig::linked(3, 1);
    config.daemon.swarm_key = Some(key);
    // Linked: the daemons found each other through the key's handshake.
    let cluster = Cluster::start(config).await?;

    // A member runs a job.
    let member = client(&cluster, 3).await?;
    let text = b"one two two three three three\n".repeat(200);
    let input = member
        .blocks()
        .add(Cursor::new(text), Replicas::network(2))
        .await?
        .root;
    let module = member
        .jobs()
        .publish(shipped::by_name("wordcount").expect("shipped").to_vec())
        .await?;
    let inputs = vec![JobInput {
        name: "text".into(),
        cid: input,
    }];
    let spec = JobSpec::new(module, inputs, 1, BTreeMap::new())?;
    let output = member
        .jobs()
        .submit(spec.clone(), None)
        .await?
        .wait(|_| ())
        .await?;
    let counts = String::from_utf8(cat_all(&member, output).await?)?;
    assert_eq!(counts, "one\t200\nthree\t600\ntwo\t400\n");

    // Strangers: no key, another key. Each command gets the same clear refusal (each from a
    // node of its own, all at once: a failed handshake may take the dial timeout to show).
    let other = SwarmKey::generate()?;
    let stranger = |key: Option<SwarmKey>| {
        Node::builder()
            .peers(cluster.addrs())
            .mdns(false)
            .discovery(Duration::from_secs(2))
            .swarm_key(key)
            .build()
    };
    let tries = [None, Some(other)].map(|key| {
        let (a, b, c) = (stranger(key), stranger(key), stranger(key));
        let spec = spec.clone();
        async move {
            let said = |e: p2pmr_node::Error| e.to_string();
            let (blocks, peers, jobs) = (a.blocks(), b.peers(), c.jobs());
            let (cat, peers, run) = futures::join!(
                blocks.cat(input, 0, |_| Ok(())),
                peers.list(),
                jobs.submit(spec, None),
            );
            [
                ("cat", cat.map(drop).map_err(said)),
                ("peers", peers.map(drop).map_err(said)),
                ("run", run.map(drop).map_err(said)),
            ]
            .map(|(what, outcome)| (key, what, outcome))
        }
    });
    for (key, what, outcome) in futures::future::join_all(tries).await.into_iter().flatten() {
        let error = outcome.expect_err(what);
        assert!(
            error.contains("handshake failed: wrong or missing swarm key?"),
            "{what} with key {key:?}: {error}"
        );
    }
    member.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_swarm_never_listens_on_quic() -> Result<()> {
    let key = Some(SwarmKey::generate()?);
    // The default addresses: TCP and QUIC without a key, TCP alone with one.
    let home = tempfile::tempdir()?;
    let daemon = p2pmr_node::Daemon::start(
        home.path(),
        DaemonConfig {
            mdns: false,
            swarm_key: key,
            ..DaemonConfig::default()
        },
    )
    .await?;
    let addrs = daemon.listen_addrs();
    assert!(!addrs.is_empty());
    assert!(
        addrs.iter().all(|a| !a.to_string().contains("/quic")),
        "{addrs:?}"
    );
    daemon.stop().await?;
    // Asked for by name, QUIC is refused.
    let refused = p2pmr_node::Daemon::start(
        tempfile::tempdir()?.path(),
        DaemonConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
            mdns: false,
            swarm_key: key,
            ..DaemonConfig::default()
        },
    )
    .await;
    let error = refused
        .expect_err("a QUIC address in a private swarm")
        .to_string();
    assert!(error.contains("TCP only"), "{error}");
    Ok(())
}
