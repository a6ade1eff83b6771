//! Bitswap messages encoded by an independent implementation (@helia/bitswap's codec, see
//! `vectors/gen-bitswap.mjs`) decode to what they hold, stream framing included, and where
//! that implementation leaves defaults out as we do, our encoding is byte for byte the same.

use p2pmr_protocol::bitswap::{Frames, Message, Presence, WantEntry, WantType, Wantlist};
use p2pmr_protocol::{Block, Cid};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// (name, message bytes, framed bytes) from the vector file.
fn vectors() -> Vec<(String, Vec<u8>, Vec<u8>)> {
    include_str!("vectors/bitswap.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_owned(), unhex(f[1]), unhex(f[2]))
        })
        .collect()
}

fn raw(text: &str) -> Block {
    Block::raw(text.as_bytes().to_vec())
}

fn expected(name: &str) -> Message {
    let (hello, world) = (*raw("hello").cid(), *raw("world").cid());
    let v0: Cid = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n"
        .parse()
        .unwrap();
    let want = |cid, priority, want_type, send_dont_have| WantEntry {
        cid,
        priority,
        cancel: false,
        want_type,
        send_dont_have,
    };
    match name {
        "empty" => Message::default(),
        "wants" => Message {
            wantlist: Wantlist {
                entries: vec![
                    want(hello, 1, WantType::Have, true),
                    want(world, i32::MAX, WantType::Block, false),
                    want(v0, -5, WantType::Block, false),
                ],
                full: true,
            },
            ..Message::default()
        },
        "cancel" => Message {
            wantlist: Wantlist {
                entries: vec![WantEntry {
                    cancel: true,
                    ..want(hello, 0, WantType::Block, false)
                }],
                full: false,
            },
            ..Message::default()
        },
        "blocks" => Message {
            // The second under a CIDv0 prefix: the empty UnixFS directory's well-known CID.
            blocks: vec![
                raw("hello"),
                Block::new(
                    "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
                        .parse()
                        .unwrap(),
                    vec![0x0a, 0x02, 0x08, 0x01],
                )
                .unwrap(),
            ],
            ..Message::default()
        },
        "presences" => Message {
            presences: vec![(hello, Presence::Have), (world, Presence::DontHave)],
            pending_bytes: 262_144,
            ..Message::default()
        },
        other => panic!("no expectation for vector {other}"),
    }
}

#[test]
fn messages_encoded_by_helia_decode_to_what_they_hold() {
    let vectors = vectors();
    assert_eq!(vectors.len(), 5);
    let mut stream = Vec::new();
    for (name, bytes, framed) in &vectors {
        let msg = Message::decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(msg, expected(name), "{name}");
        assert_eq!(Message::decode(&msg.encode()).unwrap(), msg, "{name}");
        // Helia writes explicitly set defaults (a want type of Block, sendDontHave false);
        // otherwise the layout is the same.
        if name != "wants" {
            assert_eq!(&msg.encode(), bytes, "{name}");
            assert_eq!(&msg.framed(), framed, "{name}");
        }
        stream.extend_from_slice(framed);
    }
    // The five back to back on one stream, as Helia sends several messages per stream.
    let mut frames = Frames::default();
    frames.push(&stream);
    let mut got = Vec::new();
    while let Some(frame) = frames.next_frame().unwrap() {
        got.push(Message::decode(&frame).unwrap());
    }
    let want: Vec<Message> = vectors.iter().map(|(n, _, _)| expected(n)).collect();
    assert_eq!(got, want);
}
