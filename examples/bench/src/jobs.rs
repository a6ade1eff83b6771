//! `p2pmr-bench jobs`: the wasm job runtime's figures.
//!
//! - wordcount in wasm (the shipped module, through the executor) against the same Rust code
//!   compiled natively (`p2pmr_guest::local::MapTask`), one thread each, same 1 MiB batches of
//!   the 256 MiB corpus;
//! - `p2pmr run-local --job wordcount` on 1 GiB (the binary, all cores) against a plain native
//!   single-thread wordcount of the same semantics (a `HashMap` of words and counts, a
//!   byte-at-a-time word splitter, no SDK);
//!   peak RSS of the run-local process;
//! - per-task overhead: instantiate a module and run an empty map task, median.

use crate::{corpus, median, p2pmr_bin, time, write_results, Row};
use anyhow::{bail, Result};
use p2pmr_job_wordcount::WordCount;
use p2pmr_node::engine::runtime::{Executor, Limits, TaskName};
use p2pmr_node::engine::shipped;
use p2pmr_protocol::records::RecordSplitter;
use p2pmr_protocol::Block;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

const BATCH: usize = 1 << 20;

/// Calls `f` with each batch of whole records of the file, as run-local makes them (the whole
/// records of each 1 MiB read, not copied).
fn batches(path: &Path, f: impl FnMut(&[u8], u64) -> Result<()>) -> Result<()> {
    batches_in(path, 0, path.metadata()?.len(), f)
}

/// [`batches`] over the records starting in `[start, end)` of the file.
fn batches_in(
    path: &Path,
    start: u64,
    end: u64,
    mut f: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let mut splitter = RecordSplitter::new(start, end, BATCH);
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(splitter.feed_from()))?;
    let mut buf = vec![0u8; BATCH];
    while !splitter.is_done() {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        splitter.feed(&buf[..n], |offset, batch| f(batch, offset))?;
    }
    if let Some((offset, batch)) = splitter.finish() {
        f(&batch, offset)?;
    }
    Ok(())
}

// The baseline's word splitter: the SDK's byte-at-a-time scanner as it was when the baseline
// was first measured, kept verbatim (the SDK now scans 8 bytes at a time; a rewrite of this
// copy measured 6-11% slower, which would have flattered every ratio).

fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    c.general_category_group() == GeneralCategoryGroup::Letter
}

/// Decodes one UTF-8 character at the start of `b`: `(char, length)`, or `None` if the bytes
/// there are not valid UTF-8 (then the first byte is a separator).
fn decode(b: &[u8]) -> Option<(char, usize)> {
    let len = match b[0] {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return None,
    };
    let s = std::str::from_utf8(b.get(..len)?).ok()?;
    s.chars().next().map(|c| (c, len))
}

/// The words of `bytes`, in order.
fn plain_words(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        // Skip separators.
        let start = loop {
            let b = *bytes.get(i)?;
            if b < 0x80 {
                if b.is_ascii_alphabetic() {
                    break i;
                }
                i += 1;
            } else {
                match decode(&bytes[i..]) {
                    Some((c, _)) if is_letter(c) => break i,
                    Some((_, n)) => i += n,
                    None => i += 1,
                }
            }
        };
        // Take letters.
        while let Some(&b) = bytes.get(i) {
            if b < 0x80 {
                if !b.is_ascii_alphabetic() {
                    break;
                }
                i += 1;
            } else {
                match decode(&bytes[i..]) {
                    Some((c, n)) if is_letter(c) => i += n,
                    _ => break,
                }
            }
        }
        Some(&bytes[start..i])
    })
}

/// The baseline: what one would write by hand, single-threaded.
pub(crate) fn native_plain(path: &Path) -> Result<usize> {
    let mut counts: HashMap<Box<[u8]>, u64> = HashMap::new();
    batches(path, |batch, _| {
        for line in batch.split(|&b| b == b'\n') {
            for w in plain_words(line) {
                match counts.get_mut(w) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(w.into(), 1);
                    }
                }
            }
        }
        Ok(())
    })?;
    let mut out: Vec<_> = counts.into_iter().collect();
    out.sort();
    Ok(std::hint::black_box(out).len())
}

/// The shipped job's code compiled natively, through the SDK, one thread.
pub(crate) fn native_sdk(path: &Path) -> Result<usize> {
    native_sdk_in(path, 0, path.metadata()?.len())
}

/// The shipped wasm module through the executor, one thread.
pub(crate) fn wasm(exec: &Executor, path: &Path) -> Result<usize> {
    wasm_in(exec, path, 0, path.metadata()?.len(), 1)
}

/// The shipped wasm module through the executor over the records starting in `[start, end)`,
/// its output in `partitions` sorted runs.
fn wasm_in(exec: &Executor, path: &Path, start: u64, end: u64, partitions: u32) -> Result<usize> {
    let wasm = shipped::by_name("wordcount").expect("shipped");
    let module = exec.load(*Block::raw(wasm.to_vec()).cid(), "wordcount", wasm)?;
    let mut task = exec.map_task(
        &module,
        TaskName::default(),
        &[],
        partitions,
        Limits::default(),
    )?;
    batches_in(path, start, end, |batch, offset| {
        Ok(task.batch(batch, offset)?)
    })?;
    let parts = task.finish()?;
    Ok(std::hint::black_box(parts)
        .iter()
        .map(p2pmr_node::engine::runtime::Run::len)
        .sum())
}

/// The SDK's code compiled natively over the records starting in `[start, end)`.
fn native_sdk_in(path: &Path, start: u64, end: u64) -> Result<usize> {
    let mut task = p2pmr_guest::local::MapTask::<WordCount>::new("corpus", &[]);
    batches_in(path, start, end, |batch, offset| {
        task.batch(batch, offset);
        Ok(())
    })?;
    Ok(std::hint::black_box(task.finish()).len())
}

/// Runs `one` over `tasks` equal ranges of the file, `threads` at a time, as the map tasks of
/// a job share the cores (each task its own state, no merge): thread `i` takes range `i`, then
/// the ranges past the threads' in turn.
fn at_once(
    path: &Path,
    threads: usize,
    tasks: usize,
    one: impl Fn(&Path, u64, u64) -> Result<usize> + Sync,
) -> Result<usize> {
    let size = path.metadata()?.len();
    let (threads, tasks) = (threads.max(1) as u64, tasks.max(1) as u64);
    let next = std::sync::atomic::AtomicU64::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.min(tasks))
            .map(|first| {
                let (one, next) = (&one, &next);
                s.spawn(move || {
                    let (mut i, mut total) = (first, 0);
                    while i < tasks {
                        total += one(path, size * i / tasks, size * (i + 1) / tasks)?;
                        i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(total)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    })
}

/// The SDK's code compiled natively, one thread per core at once.
pub(crate) fn native_sdk_at_once(path: &Path, threads: usize) -> Result<usize> {
    at_once(path, threads, threads, native_sdk_in)
}

/// The shipped wasm module through the executor over `tasks` equal ranges of the file, each
/// with `partitions` partitions, `threads` tasks at a time (as many tasks as threads and one
/// partition: one task per core; more: a job's map phase without the store, the network or
/// the scheduler).
pub(crate) fn wasm_at_once(
    exec: &Executor,
    path: &Path,
    threads: usize,
    tasks: usize,
    partitions: u32,
) -> Result<usize> {
    at_once(path, threads, tasks, |p, start, end| {
        wasm_in(exec, p, start, end, partitions)
    })
}

pub(crate) fn jobs(size_mib: u64, big_mib: u64, rounds: usize) -> Result<()> {
    let bin = p2pmr_bin()?;
    let input = corpus(size_mib)?;
    let big = corpus(big_mib)?;
    let bytes = input.metadata()?.len() as f64;
    let big_bytes = big.metadata()?.len() as f64;
    let exec = Executor::new(Limits::default())?;
    // Warm up: page cache, module compilation.
    native_plain(&input)?;
    wasm(&exec, &input)?;
    native_plain(&big)?;

    let (mut plain, mut sdk, mut wasm_t, mut plain_big, mut local_big) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut rss = 0;
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        plain.push(time(|| native_plain(&input))?.0);
        sdk.push(time(|| native_sdk(&input))?.0);
        wasm_t.push(time(|| wasm(&exec, &input))?.0);
        plain_big.push(time(|| native_plain(&big))?.0);
        let (t, kib) = time(|| run_local_rss(&bin, &big))?;
        local_big.push(t);
        rss = rss.max(kib);
    }

    // Per-task overhead: instantiate and run an empty map task.
    let wasm_bytes = shipped::by_name("wordcount").expect("shipped");
    let module = exec.load(
        *Block::raw(wasm_bytes.to_vec()).cid(),
        "wordcount",
        wasm_bytes,
    )?;
    let mut overhead = Vec::new();
    for _ in 0..2000 {
        let started = Instant::now();
        let task = exec.map_task(&module, TaskName::default(), &[], 1, Limits::default())?;
        std::hint::black_box(task.finish()?);
        overhead.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let overhead_us = median(overhead);

    let row = Row::new;
    let plain_m = median(plain.clone());
    let sdk_m = median(sdk.clone());
    let plain_big_m = median(plain_big.clone());
    let rows = vec![
        row(
            &format!("native plain wordcount, 1 thread, {size_mib} MiB (baseline)"),
            plain,
            plain_m,
            bytes,
        ),
        row(
            &format!("native wordcount via the SDK, 1 thread, {size_mib} MiB (second baseline)"),
            sdk,
            sdk_m,
            bytes,
        ),
        row(
            &format!("wasm wordcount (ratio to the SDK row), 1 thread, {size_mib} MiB"),
            wasm_t,
            sdk_m,
            bytes,
        ),
        row(
            &format!("native plain wordcount, 1 thread, {big_mib} MiB (baseline)"),
            plain_big,
            plain_big_m,
            big_bytes,
        ),
        row(
            &format!("p2pmr run-local --job wordcount, all cores, {big_mib} MiB"),
            local_big,
            plain_big_m,
            big_bytes,
        ),
    ];
    println!(
        "\njobs: {rounds} interleaved rounds, medians; ratios to the baseline named in each row"
    );
    write_results(
        "jobs",
        &rows,
        &format!("\"task_overhead_us\":{overhead_us:.1},\"run_local_peak_rss_kib\":{rss}"),
    )?;
    println!(
        "\nper-task overhead (instantiate + empty map task): median {overhead_us:.1} µs; run-local peak RSS {:.1} MiB",
        rss as f64 / 1024.0
    );
    Ok(())
}

/// Runs `p2pmr run-local --job wordcount` under GNU time; returns peak RSS in KiB.
fn run_local_rss(bin: &Path, input: &Path) -> Result<u64> {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(bin)
        .args([
            "run-local",
            "--job",
            "wordcount",
            "--reducers",
            "2",
            "--input",
        ])
        .arg(input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        bail!("run-local failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let err = String::from_utf8(out.stderr)?;
    Ok(err.lines().last().unwrap_or("0").trim().parse()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_baseline_splits_words_as_the_sdk_does() {
        let text = [
            &b"Hello, world! it's x2y \r\n"[..],
            "naïve Straße ΔΣ 日本語 e\u{301}x a\u{2161}b — ".as_bytes(),
            b"ab\xffcd\xe6\x97 abcdefghijklmnop",
        ]
        .concat();
        let plain: Vec<_> = super::plain_words(&text).collect();
        let sdk: Vec<_> = p2pmr_guest::text::words(&text).collect();
        assert_eq!(plain, sdk);
        assert_eq!(plain.len(), 17);
    }
}
