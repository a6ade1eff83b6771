//! The buzhash chunker against boundaries boxo's own code gives (`vectors/buzhash.tsv`, made by
//! `vectors/buzhash-go`: boxo's chunker/buzhash.go run by Go over the same inputs, which this
//! test rebuilds byte for byte).

use p2pmr_protocol::block::RAW;
use p2pmr_protocol::chunker::Chunker;
use p2pmr_protocol::unixfs::{FileBuilder, FileReader, Layout};
use p2pmr_protocol::{Block, Cid};
use std::collections::HashMap;

mod common;
use common::Rng;

fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut r = Rng(seed);
    (0..n).map(|_| (r.next() >> 56) as u8).collect()
}

fn text(seed: u64, n: usize) -> Vec<u8> {
    let words: Vec<&str> = "the of and a to in is was that for on with as by at from his her it \
         history river mountain quietly remember language between afternoon"
        .split_whitespace()
        .collect();
    let mut r = Rng(seed);
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        let v = r.next();
        out.extend_from_slice(words[(v % words.len() as u64) as usize].as_bytes());
        out.push(if v >> 60 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(n);
    out
}

fn input(name: &str) -> Vec<u8> {
    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;
    match name {
        "empty" => Vec::new(),
        "one" => vec![42],
        "small" => random(1, 1000),
        "min-1" => random(2, 128 * KIB - 1),
        "min" => random(3, 128 * KIB),
        "min+1" => random(4, 128 * KIB + 1),
        "max" => random(5, 512 * KIB),
        "max+1" => random(6, 512 * KIB + 1),
        "random-5MiB" => random(7, 5 * MIB),
        "random-3MiB+777" => random(8, 3 * MIB + 777),
        "zeros-2MiB" => vec![0; 2 * MIB],
        "zero-run" => {
            let mut bytes = random(9, 3 * MIB);
            bytes[MIB..2 * MIB + 12345].fill(0);
            bytes
        }
        "text-4MiB" => text(10, 4 * MIB),
        other => panic!("no input named {other}"),
    }
}

/// Chunk lengths as a reader would cut them: a buffer topped up to the largest chunk (here in
/// pieces of `step` bytes), cut, the rest kept.
fn chunk(bytes: &[u8], chunker: Chunker, step: usize) -> Vec<usize> {
    let (mut lens, mut buf, mut at) = (Vec::new(), Vec::new(), 0);
    loop {
        while buf.len() < chunker.max_chunk() && at < bytes.len() {
            let take = step.min(bytes.len() - at);
            buf.extend_from_slice(&bytes[at..at + take]);
            at += take;
            if let Some(n) = chunker.cut(&buf, at == bytes.len()).filter(|&n| n > 0) {
                lens.push(n);
                buf.drain(..n);
            }
        }
        match chunker.cut(&buf, at == bytes.len()) {
            Some(0) => return lens,
            Some(n) => {
                lens.push(n);
                buf.drain(..n);
            }
            None => unreachable!("a full buffer or the end can always be cut"),
        }
    }
}

#[test]
fn buzhash_cuts_where_boxo_does() {
    let vectors = include_str!("vectors/buzhash.tsv");
    let mut checked = 0;
    for line in vectors.lines() {
        let mut fields = line.split('\t');
        let (name, size, lens) = (
            fields.next().unwrap(),
            fields.next().unwrap().parse::<usize>().unwrap(),
            fields.next().unwrap_or(""),
        );
        let want: Vec<usize> = lens
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let bytes = input(name);
        assert_eq!(bytes.len(), size, "{name}");
        for step in [1 << 16, 100_003] {
            assert_eq!(
                chunk(&bytes, Chunker::Buzhash, step),
                want,
                "{name}, step {step}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 13);
}

#[test]
fn fixed_size_chunks_are_the_size_and_the_rest() {
    let bytes = random(3, 600_000);
    assert_eq!(
        chunk(&bytes, Chunker::DEFAULT, 1 << 16),
        [262_144, 262_144, 75_712]
    );
}

/// A file cut by buzhash is a DAG of kubo's balanced layout over those leaves: it reads back
/// whole and from an offset, its leaves in order are the chunks, and a file of fixed-size
/// chunks of the same bytes differs from it.
#[test]
fn a_buzhash_file_is_a_balanced_dag_over_its_chunks() {
    for name in ["empty", "one", "max+1", "zero-run", "text-4MiB"] {
        let bytes = input(name);
        let layout = Layout::KUBO.with_chunker(Chunker::Buzhash);
        let mut builder = FileBuilder::new(layout);
        let mut blocks: HashMap<Cid, Block> = HashMap::new();
        let lens = chunk(&bytes, Chunker::Buzhash, 1 << 16);
        let mut at = 0;
        for len in &lens {
            for b in builder.push_chunk(bytes[at..at + len].to_vec()).unwrap() {
                blocks.insert(*b.cid(), b);
            }
            at += len;
        }
        let (root, rest) = builder.finish();
        blocks.extend(rest.into_iter().map(|b| (*b.cid(), b)));
        for offset in [0, bytes.len() / 3] {
            let (mut read, mut leaves) = (Vec::new(), Vec::new());
            let mut reader = FileReader::starting_at(root, offset as u64);
            while let Some(cid) = reader.next_needed().copied() {
                if cid.codec() == RAW {
                    leaves.push(blocks[&cid].len());
                }
                read.extend_from_slice(reader.feed(&blocks[&cid]).unwrap());
            }
            assert_eq!(read, bytes[offset..], "{name} from {offset}");
            if offset == 0 && !bytes.is_empty() {
                assert_eq!(leaves, lens, "{name}");
            }
        }
        if bytes.len() > 262_144 {
            let mut fixed = FileBuilder::new(Layout::KUBO);
            for c in bytes.chunks(262_144) {
                fixed.push_chunk(c.to_vec()).unwrap();
            }
            assert_ne!(fixed.finish().0, root, "{name}");
        }
    }
}
