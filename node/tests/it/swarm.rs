//! Trust: private swarms (daemons and clients that hold the same swarm key form a network and
//! run jobs; a peer without it, or with another, cannot reach them and is told why in one
//! line; a private swarm never listens on QUIC) and who may start and stop jobs.

use super::{cat_all, client};
use anyhow::Result;
use libp2p::identity::Keypair;
use p2pmr_node::cluster::{Cluster, ClusterConfig};
use p2pmr_node::engine::shipped;
use p2pmr_node::{DaemonConfig, MinFree, Node, Replicas, SwarmKey, WritePolicy};
use p2pmr_protocol::job::{JobInput, JobSpec};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::Duration;

/// `line` `times` over as a file on 2 daemons, and a one-reducer wordcount of it, published
/// through `node`.
async fn wordcount(
    node: &Node,
    line: &[u8],
    times: usize,
) -> Result<(p2pmr_protocol::Cid, JobSpec)> {
    let text = line.repeat(times);
    let input = node
        .blocks()
        .add(Cursor::new(text), Replicas::network(2))
        .await?
        .root;
    let module = node
        .jobs()
        .publish(shipped::by_name("wordcount").expect("shipped").to_vec())
        .await?;
    let inputs = vec![JobInput {
        name: "text".into(),
        cid: input,
    }];
    Ok((input, JobSpec::new(module, inputs, 1, BTreeMap::new())?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_swarm_admits_only_holders_of_its_key() -> Result<()> {
    let key = SwarmKey::generate()?;
    let mut config = ClusterConfig::linked(3, 1);
    config.daemon.swarm_key = Some(key);
    // Linked: the daemons found each other through the key's handshake.
    let cluster = Cluster::start(config).await?;

    // A member runs a job.
    let member = client(&cluster, 3).await?;
    let (input, spec) = wordcount(&member, b"one two two three three three\n", 200).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_peers_start_and_stop_jobs() -> Result<()> {
    let friend = Keypair::generate_ed25519();
    let mut config = ClusterConfig::linked(2, 1);
    config.daemon.allow_jobs = Some(vec![friend.public().to_peer_id()]);
    let cluster = Cluster::start(config).await?;
    let as_peer = |key: Keypair| {
        Node::builder()
            .peers(cluster.addrs())
            .mdns(false)
            .identity(key)
            .build()
    };
    let friend = as_peer(friend);
    let stranger_key = Keypair::generate_ed25519();
    let stranger_id = stranger_key.public().to_peer_id().to_string();
    let stranger = as_peer(stranger_key);
    friend.peers().wait_for(2).await?;
    stranger.peers().wait_for(2).await?;

    // Anyone may store blocks and follow jobs; only the friend starts one.
    let (_, spec) = wordcount(&stranger, b"a b b\n", 100).await?;
    let refused = stranger.jobs().submit(spec.clone(), None).await;
    let error = refused.expect_err("a stranger's job").to_string();
    assert!(
        error.contains("not allowed to run jobs on this network"),
        "{error}"
    );

    let job = friend.jobs().submit(spec.clone(), None).await?;
    let output = job.wait(|_| ()).await?;
    assert_eq!(
        String::from_utf8(cat_all(&stranger, output).await?)?,
        "a\t100\nb\t200\n"
    );
    let cancel = stranger.jobs().cancel(job.id(), None).await;
    let error = cancel.expect_err("a stranger's cancel").to_string();
    assert!(
        error.contains("not allowed to run jobs on this network"),
        "{error}"
    );

    // A daemon of the swarm may (its API runs jobs through it), and every daemon's status
    // names the stranger it turned away.
    let other = JobSpec::new(spec.module, spec.inputs.clone(), 2, BTreeMap::new())?;
    let daemon_node = cluster.daemon(0).node();
    daemon_node
        .jobs()
        .submit(other, None)
        .await?
        .wait(|_| ())
        .await?;
    let views = daemon_node.peers().status(Duration::from_secs(5)).await?;
    let refusals: Vec<_> = views
        .iter()
        .filter_map(|v| v.status.as_ref().ok())
        .flat_map(|s| s.refusals.iter())
        .collect();
    assert!(
        refusals
            .iter()
            .any(|r| r.peer == stranger_id && r.what == "submit"),
        "{refusals:?}"
    );
    assert!(refusals
        .iter()
        .any(|r| r.peer == stranger_id && r.what == "cancel"));
    friend.shutdown().await;
    stranger.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_a_clients_allowance_or_the_disk_floor_are_refused() -> Result<()> {
    for (policy, says) in [
        (
            WritePolicy {
                min_free: MinFree::Bytes(0),
                max_client_bytes: 1 << 20,
            },
            "--max-client-bytes",
        ),
        (
            WritePolicy {
                min_free: MinFree::Percent(100),
                max_client_bytes: u64::MAX,
            },
            "--min-free-disk",
        ),
    ] {
        let mut config = ClusterConfig::linked(1, 1);
        config.daemon.writes = policy;
        let cluster = Cluster::start(config).await?;
        let daemon = cluster.daemon(0);
        // What the daemon already holds (stored by itself, which no limit stops).
        let kept = daemon
            .node()
            .blocks()
            .add(Cursor::new(vec![7u8; 300_000]), Replicas::Local)
            .await?
            .root;
        let before = daemon.repo().blocks().stats()?.blocks;

        let writer = client(&cluster, 1).await?;
        let big = (0..3 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
        let refused = writer
            .blocks()
            .add(Cursor::new(big), Replicas::network(1))
            .await
            .expect_err("past the limit");
        assert!(refused.to_string().contains(says), "{says}: {refused}");
        // Nothing durable lost, and the daemon goes on serving.
        assert!(daemon.repo().blocks().stats()?.blocks >= before);
        assert_eq!(cat_all(&writer, kept).await?, vec![7u8; 300_000]);
        if says == "--max-client-bytes" {
            // Another client has an allowance of its own.
            let other = client(&cluster, 1).await?;
            let small = other
                .blocks()
                .add(Cursor::new(vec![1u8; 1000]), Replicas::network(1))
                .await?;
            assert_eq!(cat_all(&other, small.root).await?, vec![1u8; 1000]);
            other.shutdown().await;
        }
        writer.shutdown().await;
        cluster.stop().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_jobs_submitter_or_a_daemon_cancels_it() -> Result<()> {
    // No --allow-jobs: anyone may run jobs, but a job is stopped only by whoever started it.
    let cluster = Cluster::start(ClusterConfig::linked(2, 1)).await?;
    let (owner, other) = (client(&cluster, 2).await?, client(&cluster, 2).await?);
    let (_, spec) = wordcount(&owner, b"c d d\n", 50).await?;
    let job = owner.jobs().submit(spec, None).await?;
    job.wait(|_| ()).await?;
    let refused = other.jobs().cancel(job.id(), None).await;
    let error = refused.expect_err("a stranger's cancel").to_string();
    assert!(error.contains("only the peer that submitted"), "{error}");
    owner.jobs().cancel(job.id(), None).await?;
    cluster
        .daemon(0)
        .node()
        .jobs()
        .cancel(job.id(), None)
        .await?;
    owner.shutdown().await;
    other.shutdown().await;
    cluster.stop().await;
    Ok(())
}

/// A client of `cluster`'s daemons with a fixed identity, once it sees `want` of them.
async fn client_as(cluster: &Cluster, keypair: &Keypair, want: usize) -> Result<Node> {
    let node = Node::builder()
        .peers(cluster.addrs())
        .mdns(false)
        .identity(keypair.clone())
        .build();
    node.peers().wait_for(want).await?;
    Ok(node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_of_adds_that_never_complete_are_collected_and_allowances_persist() -> Result<()> {
    // Daemon 0 takes anything; daemon 1 at most 1 MiB from a client, so a 2-replica add of
    // 4 MiB is refused part way. Both collect what an add left after 2 s.
    let grace = Duration::from_secs(2);
    let mut config = ClusterConfig::linked(1, 1);
    config.daemon.gc_grace = grace;
    let mut cluster = Cluster::start(config).await?;
    let tight = DaemonConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        bootstrap: cluster.addrs(),
        mdns: false,
        slots: 1,
        gc_grace: grace,
        writes: WritePolicy {
            min_free: MinFree::Bytes(0),
            max_client_bytes: 1 << 20,
        },
        ..DaemonConfig::default()
    };
    cluster.add(tight.clone()).await?;
    cluster.wait_linked().await?;
    let me = Keypair::generate_ed25519();
    let writer = client_as(&cluster, &me, 2).await?;
    let bytes = |n: usize, seed: u8| (0..n).map(|i| (i % 253) as u8 ^ seed).collect::<Vec<u8>>();

    // A completed add (one 256 KiB block) is kept for good.
    let kept = writer
        .blocks()
        .add(Cursor::new(bytes(256 << 10, 1)), Replicas::network(2))
        .await?
        .root;
    let counts = |c: &Cluster| -> Result<Vec<u64>> {
        Ok(vec![
            c.daemon(0).repo().blocks().stats()?.blocks,
            c.daemon(1).repo().blocks().stats()?.blocks,
        ])
    };
    let before = counts(&cluster)?;
    let refused = writer
        .blocks()
        .add(Cursor::new(bytes(4 << 20, 2)), Replicas::network(2))
        .await
        .expect_err("past daemon 1's allowance");
    assert!(
        refused.to_string().contains("--max-client-bytes"),
        "{refused}"
    );
    let left = counts(&cluster)?;
    assert!(
        left[0] > before[0] && left[1] > before[1],
        "{before:?} -> {left:?}"
    );

    // Within a few ticks of the grace period the interrupted add is gone from both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while counts(&cluster)? != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not collected: {before:?} -> {:?}",
            counts(&cluster)?
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for d in 0..2 {
        assert!(cluster.daemon(d).repo().blocks().has(&kept), "daemon {d}");
    }
    assert_eq!(cat_all(&writer, kept).await?, bytes(256 << 10, 1));

    // The refused add's bytes were given back: 512 KiB more fits in daemon 1's 1 MiB.
    let second = writer
        .blocks()
        .add(Cursor::new(bytes(512 << 10, 3)), Replicas::network(2))
        .await?
        .root;
    writer.shutdown().await;

    // The allowance survives a restart: 768 KiB of 1 MiB used, 512 KiB more does not fit.
    cluster.take(1).expect("running").stop().await?;
    cluster.restart(1, tight).await?;
    cluster.wait_linked().await?;
    let writer = client_as(&cluster, &me, 2).await?;
    let refused = writer
        .blocks()
        .add(Cursor::new(bytes(512 << 10, 4)), Replicas::network(2))
        .await
        .expect_err("the allowance was kept across the restart");
    assert!(
        refused.to_string().contains("--max-client-bytes"),
        "{refused}"
    );
    assert_eq!(cat_all(&writer, second).await?, bytes(512 << 10, 3));
    writer.shutdown().await;
    cluster.stop().await;
    Ok(())
}
