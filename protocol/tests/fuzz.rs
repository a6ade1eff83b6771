//! Every decoder of bytes a peer or a file can send, fed random and mutated input for a bounded
//! time: none may panic, and what decodes must encode back to something that decodes the same.
//!
//! Seeded, so a failure repeats: `P2PMR_FUZZ_SEED=N` picks the seed (printed on failure),
//! `P2PMR_FUZZ_MILLIS=N` the time per decoder (default 1500; CI runs the default).

use p2pmr_protocol::abi;
use p2pmr_protocol::bitswap::{self, Frames, Presence, WantEntry, WantType, Wantlist};
use p2pmr_protocol::car::{self, CarEvent, CarReader};
use p2pmr_protocol::dagpb::{self, PbLink, PbNode};
use p2pmr_protocol::engine::{
    Counters, DaemonStatus, Event, JobRequest, JobResponse, MapOutput, MapTask, PartOut, TaskKind,
};
use p2pmr_protocol::job::{JobInput, JobSpec};
use p2pmr_protocol::unixfs::{self, DirEntry, FileBuilder, Layout, UnixFsData};
use p2pmr_protocol::wire::{BlockRequest, BlockResponse};
use p2pmr_protocol::{Block, Cid};
use std::time::{Duration, Instant};

mod common;
use common::Rng;

/// One input derived from `corpus`: random bytes, or a valid input cut, flipped, spliced,
/// or with a length-like byte run set to extremes.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    if corpus.is_empty() || rng.below(8) == 0 {
        let n = rng.below(512);
        return rng.bytes(n);
    }
    let mut m = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        if m.is_empty() {
            break;
        }
        let at = rng.below(m.len());
        match rng.below(6) {
            0 => m.truncate(at),
            1 => m[at] ^= 1 << rng.below(8),
            2 => m[at] = [0, 0x7f, 0x80, 0xff][rng.below(4)],
            3 => {
                let end = (at + 1 + rng.below(8)).min(m.len());
                m[at..end].fill(0xff);
            }
            4 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len().max(1));
                m.splice(at.., other[from.min(other.len())..].iter().copied());
            }
            _ => {
                let extra = rng.below(16);
                let bytes = rng.bytes(extra);
                m.splice(at..at, bytes);
            }
        }
    }
    m
}

fn seed() -> u64 {
    std::env::var("P2PMR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
}

/// Runs `check` on mutated inputs for the time budget; a panic names the seed and input.
fn fuzz(name: &str, corpus: Vec<Vec<u8>>, check: impl Fn(&[u8])) {
    let millis = std::env::var("P2PMR_FUZZ_MILLIS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let seed = seed();
    let mut rng = Rng(seed | 1);
    let until = Instant::now() + Duration::from_millis(millis);
    let mut runs = 0u64;
    for input in &corpus {
        check(input); // the valid inputs themselves
    }
    while Instant::now() < until {
        let input = mutate(&mut rng, &corpus);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if outcome.is_err() {
            panic!("{name}: seed {seed}, run {runs}, input {input:02x?}");
        }
        runs += 1;
    }
    assert!(runs > 0, "{name}: no run in the time given");
}

fn cid(n: u8) -> Cid {
    *Block::raw(vec![n]).cid()
}

fn spec() -> JobSpec {
    JobSpec::new(
        cid(0),
        vec![JobInput {
            name: "in".into(),
            cid: cid(1),
        }],
        3,
        [("k".to_string(), "v".to_string())],
    )
    .unwrap()
    .with_verify(2)
    .with_skip_bad_records(5)
}

#[test]
fn block_messages() {
    let block = Block::raw(b"some block".to_vec());
    let requests = [
        BlockRequest::Get(cid(2)),
        BlockRequest::Put {
            cid: *block.cid(),
            data: block.data().to_vec(),
            replicas: 2,
            session: 99,
            group: Some(cid(5)),
        },
        BlockRequest::Has(vec![cid(3), cid(4)]),
        BlockRequest::Commit { session: 7 },
        BlockRequest::Prove {
            cid: cid(9),
            nonce: [3; 32],
        },
        BlockRequest::Probe(vec![8; 64]),
    ];
    fuzz(
        "BlockRequest",
        requests.iter().map(BlockRequest::encode).collect(),
        |b| {
            if let Ok(m) = BlockRequest::decode(b) {
                assert_eq!(BlockRequest::decode(&m.encode()).unwrap(), m);
            }
        },
    );
    let responses = [
        BlockResponse::Block(vec![1, 2, 3]),
        BlockResponse::NotFound,
        BlockResponse::Stored,
        BlockResponse::Have(vec![true, false]),
        BlockResponse::Refused("busy".into()),
        BlockResponse::Proof([4; 32]),
    ];
    fuzz(
        "BlockResponse",
        responses.iter().map(BlockResponse::encode).collect(),
        |b| {
            if let Ok(m) = BlockResponse::decode(b) {
                assert_eq!(BlockResponse::decode(&m.encode()).unwrap(), m);
            }
        },
    );
}

#[test]
fn bitswap_messages_and_frames() {
    let message = bitswap::Message {
        wantlist: Wantlist {
            entries: vec![WantEntry {
                cid: cid(1),
                priority: -3,
                cancel: false,
                want_type: WantType::Have,
                send_dont_have: true,
            }],
            full: true,
        },
        blocks: vec![Block::raw(b"a block".to_vec())],
        presences: vec![(cid(2), Presence::DontHave)],
        pending_bytes: 77,
    };
    let seeds = vec![
        message.encode(),
        bitswap::Message::default().encode(),
        include_bytes!("vectors/bitswap.tsv").to_vec(),
    ];
    fuzz("bitswap::Message", seeds, |b| {
        if let Ok(m) = bitswap::Message::decode(b) {
            assert_eq!(bitswap::Message::decode(&m.encode()).unwrap(), m);
        }
    });
    let mut stream = message.framed();
    stream.extend(bitswap::Message::default().framed());
    fuzz("bitswap frames", vec![stream], |b| {
        // Fed in uneven pieces: frames come out whole or an error stops the stream.
        let mut frames = Frames::default();
        for piece in b.chunks(3) {
            frames.push(piece);
            loop {
                match frames.next_frame() {
                    Ok(Some(frame)) => {
                        assert!(frame.len() <= bitswap::MAX_MESSAGE);
                        let _ = bitswap::Message::decode(&frame);
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    });
}

#[test]
fn job_messages_and_specs() {
    let requests = [
        JobRequest::Submit {
            spec: spec().encode(),
        },
        JobRequest::Watch {
            job: cid(5),
            from: 3,
        },
        JobRequest::List,
        JobRequest::Status,
        JobRequest::Map(MapTask {
            spec: spec().encode(),
            task: 1,
            input: 0,
            start: 10,
            end: 20,
            split: 262_144,
            attempt: 2,
            skip: vec![12],
            run_chunk: 64 << 10,
        }),
        JobRequest::AbortTask {
            job: cid(6),
            kind: TaskKind::Reduce,
            task: 4,
        },
    ];
    fuzz(
        "JobRequest",
        requests.iter().map(JobRequest::encode).collect(),
        |b| {
            if let Ok(m) = JobRequest::decode(b) {
                assert_eq!(JobRequest::decode(&m.encode()).unwrap(), m);
            }
        },
    );
    let responses = [
        JobResponse::Events {
            events: vec![
                Event::Accepted {
                    job: cid(7),
                    coordinator: "me".into(),
                },
                Event::VerifyMismatch {
                    kind: TaskKind::Map,
                    task: 0,
                    agreed: vec!["a".into(), "b".into()],
                    dissent: vec!["c".into()],
                },
            ],
            times: vec![1, 2],
            next: 2,
            done: false,
        },
        JobResponse::MapDone(MapOutput {
            parts: vec![
                Some(PartOut {
                    cid: cid(8),
                    bytes: 9,
                }),
                None,
            ],
            counters: Counters::default(),
            cut: None,
        }),
        JobResponse::Status(DaemonStatus {
            slots: 2,
            running: 1,
            blocks: 3,
            bytes: 4,
            refusals: vec![],
            ipfs_peers: 0,
            memo_tasks: 0,
            memo_bytes: 0,
        }),
        JobResponse::busy(),
    ];
    fuzz(
        "JobResponse",
        responses.iter().map(JobResponse::encode).collect(),
        |b| {
            if let Ok(m) = JobResponse::decode(b) {
                assert_eq!(JobResponse::decode(&m.encode()).unwrap(), m);
            }
        },
    );
    fuzz("JobSpec", vec![spec().encode()], |b| {
        if let Ok(s) = JobSpec::decode(b) {
            assert_eq!(s.encode(), b, "only the canonical encoding decodes");
        }
    });
}

#[test]
fn dag_pb_unixfs_and_directories() {
    let mut builder = FileBuilder::new(Layout::new(1024, 4).unwrap());
    let mut blocks = Vec::new();
    for i in 0..9u8 {
        blocks.extend(builder.push_chunk(vec![i; 1024]).unwrap());
    }
    let (_, rest) = builder.finish();
    blocks.extend(rest);
    let dir = unixfs::directory(vec![
        DirEntry {
            name: "a".into(),
            cid: cid(1),
            tsize: 5,
        },
        DirEntry {
            name: "b".into(),
            cid: cid(2),
            tsize: 6,
        },
    ]);
    let mut corpus: Vec<Vec<u8>> = blocks.iter().map(|b| b.data().to_vec()).collect();
    corpus.push(dir.data().to_vec());
    corpus.push(dagpb::encode(
        &[PbLink {
            hash: cid(3),
            name: Some("x".into()),
            tsize: Some(1),
        }],
        Some(b"data"),
    ));
    fuzz("dag-pb, UnixFS", corpus, |b| {
        if let Ok(node) = PbNode::decode(b) {
            let again = node.encode();
            assert_eq!(PbNode::decode(&again).unwrap(), node);
            if let Some(data) = node.data {
                let _ = UnixFsData::decode(data);
            }
        }
        let _ = unixfs::directory_entries(&Block::dag_pb(b.to_vec()));
    });
}

#[test]
fn car_streams_in_any_pieces() {
    let blocks: Vec<Block> = (0..4u8).map(|i| Block::raw(vec![i; 100])).collect();
    let mut v1 = car::header_v1(&[*blocks[0].cid()]);
    for b in &blocks {
        v1.extend(car::section_prefix(b.cid(), b.data().len()));
        v1.extend_from_slice(b.data());
    }
    let seed = seed();
    fuzz("CAR", vec![v1], |b| {
        // Fed in pieces whose sizes depend on the input, as a stream would deliver them.
        let mut reader = CarReader::new();
        let mut pieces = Rng(seed ^ b.len() as u64 | 1);
        let mut at = 0;
        let mut events = 0;
        while at < b.len() {
            let n = 1 + pieces.below(64);
            reader.feed(&b[at..(at + n).min(b.len())]);
            at += n;
            loop {
                match reader.next_event() {
                    Ok(Some(CarEvent::Block(block))) => {
                        assert!(Block::new(*block.cid(), block.data().to_vec()).is_ok());
                        events += 1;
                    }
                    Ok(Some(CarEvent::Header { .. })) => events += 1,
                    Ok(None) | Err(_) => break,
                }
                assert!(events <= b.len() + 1, "more events than bytes");
            }
        }
        let _ = reader.end();
    });
}

#[test]
fn abi_pairs() {
    let mut pairs = Vec::new();
    abi::encode_pair(&mut pairs, b"key", b"value");
    abi::encode_pair(&mut pairs, b"", b"");
    fuzz(
        "ABI pairs",
        vec![pairs, abi::encode_args([("a", "b")])],
        |b| {
            if let Some(decoded) = abi::decode_pairs(b) {
                let mut again = Vec::new();
                for (k, v) in &decoded {
                    abi::encode_pair(&mut again, k, v);
                }
                assert_eq!(abi::decode_pairs(&again).unwrap(), decoded);
            }
        },
    );
}
