//! A daemon's Bitswap 1.2.0 server against a peer of the test's own speaking it with plain
//! libp2p streams: wants sent on one stream, answers read from the stream the daemon opens.

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
            let mut buf = vec![0; 64 << 10];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                frames.push(&buf[..n]);
                while let Ok(Some(frame)) = frames.next_frame() {
                    let _ = futures::SinkExt::send(&mut tx, Message::decode(&frame).unwrap()).await;
                }
            }
        }
    });
    Ok((control, rx, opened))
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
