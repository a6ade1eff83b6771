//! CIDs of files built by an independent UnixFS importer configured as `ipfs add --cid-version=1`
//! (see `vectors/gen-vectors.mjs`), against ours: one leaf, many leaves, two and three levels,
//! and more than 174×174 chunks of 256 KiB.

use p2pmr_protocol::unixfs::{FileBuilder, FileReader, Layout};
use p2pmr_protocol::{Block, Cid};
use std::collections::HashMap;

/// The byte at offset `i` of a vector's content; mirrors `content()` in gen-vectors.mjs.
fn byte_at(pattern: &str, i: u64) -> u8 {
    match pattern {
        "zero" => 0,
        "mix" => (7 * i + i / 2048 + 13 * (i / 262_144)) as u8,
        other => panic!("unknown pattern {other}"),
    }
}

struct Vector {
    pattern: String,
    size: u64,
    layout: Layout,
    cid: String,
}

fn vectors() -> Vec<Vector> {
    include_str!("vectors/unixfs.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Vector {
                pattern: f[0].to_owned(),
                size: f[1].parse().unwrap(),
                layout: Layout::new(f[2].parse().unwrap(), f[3].parse().unwrap()).unwrap(),
                cid: f[4].to_owned(),
            }
        })
        .collect()
}

/// Builds the vector's file chunk by chunk; keeps the blocks when `keep` (small files only).
fn build(v: &Vector, keep: bool) -> (Cid, HashMap<Cid, Block>) {
    let mut builder = FileBuilder::new(v.layout);
    let mut blocks = HashMap::new();
    let chunk = v.layout.chunk_size() as u64;
    let mut off = 0;
    while off < v.size {
        let n = chunk.min(v.size - off);
        let bytes: Vec<u8> = if v.pattern == "zero" {
            vec![0; n as usize]
        } else {
            (off..off + n).map(|i| byte_at(&v.pattern, i)).collect()
        };
        for b in builder.push_chunk(bytes).unwrap() {
            if keep {
                blocks.insert(*b.cid(), b);
            }
        }
        off += n;
    }
    let (root, rest) = builder.finish();
    if keep {
        blocks.extend(rest.into_iter().map(|b| (*b.cid(), b)));
    }
    (root, blocks)
}

#[test]
fn matches_independent_importer_and_reads_back() {
    let vectors = vectors();
    assert!(vectors.len() >= 18, "vector file truncated?");
    for v in vectors.iter().filter(|v| v.size < 128 << 20) {
        let (root, blocks) = build(v, true);
        assert_eq!(
            root.to_string(),
            v.cid,
            "{} bytes, layout {:?}",
            v.size,
            v.layout
        );
        // Read back from the start and from a few offsets, checking every byte.
        for offset in [0, 1, v.size / 2, v.size.saturating_sub(1), v.size] {
            let mut reader = FileReader::starting_at(root, offset);
            let mut at = offset;
            while let Some(cid) = reader.next_needed() {
                for &byte in reader.feed(&blocks[cid]).unwrap() {
                    assert_eq!(byte, byte_at(&v.pattern, at), "{} bytes, byte {at}", v.size);
                    at += 1;
                }
            }
            assert_eq!(
                at,
                v.size.max(offset),
                "{} bytes from offset {offset}",
                v.size
            );
            assert_eq!(reader.file_size(), Some(v.size));
        }
    }
}

#[test]
fn more_than_174_squared_chunks() {
    // 7.4 GiB of zeros: three levels of 256 KiB chunks. Every chunk is hashed, none is kept.
    let v = vectors()
        .into_iter()
        .find(|v| v.size > 174 * 174 * 262_144)
        .expect("vector present");
    let (root, _) = build(&v, false);
    assert_eq!(root.to_string(), v.cid);
}
