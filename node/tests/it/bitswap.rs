//! A daemon's Bitswap 1.2.0 server and client against peers of the test's own that speak it
//! over plain libp2p streams: wants sent on one stream, answers read from the stream the
//! daemon opens; and IPFS peers that do not have what a daemon wants.

use anyhow::Result;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Stream, StreamProtocol};
use p2pmr_node::cluster::{Cluster, ClusterConfig};
use p2pmr_node::DaemonConfig;
use p2pmr_protocol::bitswap::{
    Frames, Message, Presence, WantEntry, WantType, Wantlist, BITSWAP_PROTOCOL, MAX_ENTRIES,
};
use p2pmr_protocol::{Block, Cid};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BITSWAP: StreamProtocol = StreamProtocol::new(BITSWAP_PROTOCOL);

/// A libp2p peer with only the stream behaviour, connected to `daemon` at `addr`; returns its
/// control, the daemon's answers as they arrive, and a count of the streams the daemon opened.
async fn peer_of(
    addr: libp2p::Multiaddr,
) -> Result<(
    libp2p_stream::Control,
    futures::channel::mpsc::Receiver<Message>,
    Arc<AtomicUsize>,
)> {
    let mut swarm = super::tcp_swarm(|_| libp2p_stream::Behaviour::new())?;
    let mut control = swarm.behaviour().new_control();
    let mut incoming = control.accept(BITSWAP)?;
    swarm.dial(addr)?;
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await {
            break;
        }
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let (mut tx, rx) = futures::channel::mpsc::channel(64);
    let opened = Arc::new(AtomicUsize::new(0));
    let counted = opened.clone();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let mut frames = Frames::default();
            while let Some(messages) = read_messages(&mut stream, &mut frames).await {
                for msg in messages {
                    let _ = futures::SinkExt::send(&mut tx, msg).await;
                }
            }
        }
    });
    Ok((control, rx, opened))
}

/// The messages the next read from `stream` completes (`None` once the stream ends).
async fn read_messages(stream: &mut Stream, frames: &mut Frames) -> Option<Vec<Message>> {
    let mut buf = vec![0; 64 << 10];
    let n = stream.read(&mut buf).await.ok().filter(|&n| n > 0)?;
    frames.push(&buf[..n]);
    let mut messages = Vec::new();
    while let Ok(Some(frame)) = frames.next_frame() {
        messages.push(Message::decode(&frame).expect("a well-formed message"));
    }
    Some(messages)
}

fn want(cid: Cid, want_type: WantType, send_dont_have: bool) -> WantEntry {
    WantEntry {
        cid,
        priority: 1,
        cancel: false,
        want_type,
        send_dont_have,
    }
}

fn wants(entries: Vec<WantEntry>) -> Message {
    Message {
        wantlist: Wantlist {
            entries,
            full: false,
        },
        ..Message::default()
    }
}

/// Collects answers until `n` blocks and presences have come, or 10 s pass.
async fn answers(
    rx: &mut futures::channel::mpsc::Receiver<Message>,
    n: usize,
) -> (Vec<Block>, Vec<(Cid, Presence)>) {
    let (mut blocks, mut presences) = (Vec::new(), Vec::new());
    while blocks.len() + presences.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(msg)) => {
                blocks.extend(msg.blocks);
                presences.extend(msg.presences);
            }
            _ => break,
        }
    }
    (blocks, presences)
}

async fn send(stream: &mut Stream, msg: &Message) -> Result<()> {
    stream.write_all(&msg.framed()).await?;
    stream.flush().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_answers_wants_as_bitswap_1_2_0_has_it() -> Result<()> {
    let cluster = Cluster::start(ClusterConfig {
        daemons: 1,
        slots: 1,
        linked: false,
        daemon: DaemonConfig::default(),
    })
    .await?;
    let daemon = cluster.daemon(0);
    let store = daemon.repo().blocks().clone();
    let (small, large) = (
        Block::raw(b"small".to_vec()),
        Block::raw(vec![7; 300 << 10]),
    );
    store.put(&small)?;
    store.put(&large)?;
    let missing = *Block::raw(b"nobody has this".to_vec()).cid();
    let daemon_id: PeerId = daemon.peer_id();
    let (mut control, mut rx, opened) = peer_of(cluster.addrs()[0].clone()).await?;
    let mut stream = control.open_stream(daemon_id, BITSWAP).await?;

    // want-have: a small block comes whole, a large one as Have; a missing one as DontHave
    // only when asked.
    send(
        &mut stream,
        &wants(vec![
            want(*small.cid(), WantType::Have, true),
            want(*large.cid(), WantType::Have, true),
            want(missing, WantType::Have, true),
        ]),
    )
    .await?;
    let (blocks, mut presences) = answers(&mut rx, 3).await;
    presences.sort_by_key(|(c, _)| c.to_bytes());
    let mut expected = vec![
        (*large.cid(), Presence::Have),
        (missing, Presence::DontHave),
    ];
    expected.sort_by_key(|(c, _)| c.to_bytes());
    assert_eq!((blocks, presences), (vec![small.clone()], expected));

    // want-block for the large one (an upgrade of the want-have): the block; for a missing
    // one without sendDontHave: nothing.
    send(
        &mut stream,
        &wants(vec![
            want(*large.cid(), WantType::Block, false),
            want(
                *Block::raw(b"also missing".to_vec()).cid(),
                WantType::Block,
                false,
            ),
        ]),
    )
    .await?;
    let (blocks, presences) = answers(&mut rx, 1).await;
    assert_eq!((blocks, presences), (vec![large.clone()], vec![]));
    let more = tokio::time::timeout(Duration::from_millis(500), rx.next()).await;
    assert!(
        more.is_err(),
        "answered a missing block without sendDontHave: {more:?}"
    );

    // A block wanted while missing is sent once it arrives in the store, for want-block and
    // (as Have) for want-have.
    let (later, later_have) = (
        Block::raw(vec![9; 2000]),
        Block::raw(b"arrives later, small".to_vec()),
    );
    send(
        &mut stream,
        &wants(vec![
            want(*later.cid(), WantType::Block, true),
            want(*later_have.cid(), WantType::Have, false),
        ]),
    )
    .await?;
    let (_, presences) = answers(&mut rx, 1).await;
    assert_eq!(presences, vec![(*later.cid(), Presence::DontHave)]);
    store.put(&later)?;
    store.put(&later_have)?;
    let (mut blocks, presences) = answers(&mut rx, 2).await;
    blocks.sort_by_key(|b| b.cid().to_bytes());
    let mut expected = vec![later.clone(), later_have.clone()];
    expected.sort_by_key(|b| b.cid().to_bytes());
    assert_eq!((blocks, presences), (expected, vec![]));

    // A CIDv0 want of a dag-pb block is answered under the CIDv0.
    let node = Block::dag_pb(vec![0x0a, 0x02, 0x08, 0x01]);
    store.put(&node)?;
    let v0: Cid = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn".parse()?;
    send(&mut stream, &wants(vec![want(v0, WantType::Block, true)])).await?;
    let (blocks, _) = answers(&mut rx, 1).await;
    assert_eq!(blocks.iter().map(|b| *b.cid()).collect::<Vec<_>>(), [v0]);

    // A wantlist over the limit breaks the protocol: the stream is closed, and the daemon
    // goes on answering on a new one.
    let many: Vec<WantEntry> = (0..=MAX_ENTRIES as u32)
        .map(|i| {
            want(
                *Block::raw(i.to_le_bytes().to_vec()).cid(),
                WantType::Have,
                false,
            )
        })
        .collect();
    send(&mut stream, &wants(many)).await?;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await?;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let mut again = control.open_stream(daemon_id, BITSWAP).await?;
    let cancel_then_want = wants(vec![
        WantEntry {
            cancel: true,
            ..want(*small.cid(), WantType::Have, true)
        },
        want(*small.cid(), WantType::Block, true),
    ]);
    send(&mut again, &cancel_then_want).await?;
    let (blocks, _) = answers(&mut rx, 1).await;
    assert_eq!(blocks, vec![small]);

    // A peer that opens a stream per message and closes it (Helia does): its wantlist
    // carries over (a want-have, then a want-block upgrading it), and every answer still
    // comes on the one stream the daemon opened to it.
    let other = Block::raw(vec![3; 200 << 10]);
    store.put(&other)?;
    for (kind, whole) in [(WantType::Have, false), (WantType::Block, true)] {
        let mut once = control.open_stream(daemon_id, BITSWAP).await?;
        send(&mut once, &wants(vec![want(*other.cid(), kind, true)])).await?;
        once.close().await?;
        let got = answers(&mut rx, 1).await;
        if whole {
            assert_eq!(got, (vec![other.clone()], vec![]));
        } else {
            assert_eq!(got, (vec![], vec![(*other.cid(), Presence::Have)]));
        }
    }
    assert_eq!(
        opened.load(Ordering::Relaxed),
        1,
        "answers came on more than one stream"
    );
    cluster.stop().await;
    Ok(())
}

/// An IPFS node as far as a daemon can tell (identify lists Bitswap, not our block
/// protocol) that has no blocks: it answers every want with `DontHave` if `dont_have`, else
/// never. Returns its address and the count of wants it received.
async fn blockless_ipfs_peer(dont_have: bool) -> Result<(libp2p::Multiaddr, Arc<AtomicUsize>)> {
    #[derive(libp2p::swarm::NetworkBehaviour)]
    struct Ipfs {
        identify: libp2p::identify::Behaviour,
        streams: libp2p_stream::Behaviour,
    }
    let mut swarm = super::tcp_swarm(|key| Ipfs {
        identify: libp2p::identify::Behaviour::new(libp2p::identify::Config::new(
            "/ipfs/id/1.0.0".into(),
            key.public(),
        )),
        streams: libp2p_stream::Behaviour::new(),
    })?;
    let mut control = swarm.behaviour().streams.new_control();
    let mut incoming = control.accept(BITSWAP)?;
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address.with(libp2p::multiaddr::Protocol::P2p(*swarm.local_peer_id()));
        }
    };
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let wanted = Arc::new(AtomicUsize::new(0));
    let counted = wanted.clone();
    tokio::spawn(async move {
        while let Some((peer, mut stream)) = incoming.next().await {
            let (counted, mut control) = (counted.clone(), control.clone());
            tokio::spawn(async move {
                let mut frames = Frames::default();
                while let Some(messages) = read_messages(&mut stream, &mut frames).await {
                    for msg in messages {
                        let asked: Vec<Cid> = msg
                            .wantlist
                            .entries
                            .iter()
                            .filter(|e| !e.cancel)
                            .map(|e| e.cid)
                            .collect();
                        counted.fetch_add(asked.len(), Ordering::Relaxed);
                        if dont_have && !asked.is_empty() {
                            let answer = Message {
                                presences: asked.iter().map(|c| (*c, Presence::DontHave)).collect(),
                                ..Message::default()
                            };
                            if let Ok(mut out) = control.open_stream(peer, BITSWAP).await {
                                let _ = send(&mut out, &answer).await;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok((addr, wanted))
}

/// `pin add` of a CID that neither the daemons nor the IPFS node they know hold: an IPFS node
/// that says so fails it at once; one that never answers is asked three times, the retries
/// showing in the pin's progress, and then it fails with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_nobody_can_serve_fails_at_once_or_after_its_retries() -> Result<()> {
    for dont_have in [true, false] {
        let (ipfs, wanted) = blockless_ipfs_peer(dont_have).await?;
        let cluster = Cluster::start(ClusterConfig::linked(1, 1)).await?;
        cluster.daemon(0).net().dial(ipfs).await?;
        for _ in 0..100 {
            if !cluster.daemon(0).net().bitswap_sources().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(cluster.daemon(0).net().bitswap_sources().len(), 1);
        let missing = *Block::raw(b"held by no one".to_vec()).cid();
        let client = cluster.client();
        let started = std::time::Instant::now();
        let pin = client.blocks().pin(missing, 1, None).await?;
        let mut retries = 0;
        let outcome = pin
            .wait(|e| {
                if let p2pmr_protocol::engine::Event::Fetching { retries: r, .. } = e {
                    retries = retries.max(*r);
                }
            })
            .await;
        let took = started.elapsed();
        let error = format!("{:#}", outcome.expect_err("nobody holds it"));
        if dont_have {
            assert!(error.contains("none of 1 IPFS peer(s) has"), "{error}");
            assert!(took < Duration::from_secs(3), "{took:?}");
            assert_eq!(wanted.load(Ordering::Relaxed), 1);
        } else {
            assert!(error.contains("after 3 tries"), "{error}");
            assert_eq!(retries, 2, "the retries shown in the pin's progress");
            assert!(wanted.load(Ordering::Relaxed) >= 3);
        }
        client.shutdown().await;
        cluster.stop().await;
    }
    Ok(())
}
