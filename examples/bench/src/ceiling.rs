//! `p2pmr-bench ceiling`: the main job against what the machine's cores allow, and where a
//! user's `p2pmr run` spends its time.
//!
//! The ceiling for wordcount on 2 daemons on this machine is every core running the wasm job
//! at its own speed: the shipped wasm wordcount through the executor on one thread, times the
//! cores. Each round measures, interleaved: wordcount's own code compiled natively through the
//! SDK (one thread), the wasm module through the executor (one thread), both again on every
//! core at once (one thread per core, each over its share of the input, as map tasks share
//! the cores: what the cores give together, against the ceiling's assumption that they add
//! up), the module on every core again in as many tasks as the automatic split makes, each
//! with the job's 2 partitions (a job's map phase without the store, the network or the
//! scheduler: what cutting the input into tasks costs), and `p2pmr run`
//! (wordcount, 2 reducers, a new process as a user runs it) on 2 daemons holding the corpus
//! with 2 replicas (or on clusters of the sizes given with `--daemons`, side by side). The run's `--json` events are timed as the client reads them, which splits
//! its wall time into phases: start (process start to the job's acceptance: connecting,
//! publishing the module), plan, map, reduce, store (the output's copies) and exit.

use crate::engine::{cluster, wordcount_cmd};
use crate::jobs::{native_sdk, native_sdk_at_once, wasm, wasm_at_once};
use crate::peers::{client, output, DaemonProc};
use crate::suite::cores;
use crate::{corpus, median, p2pmr_bin, tempdir_in_target, time};
use anyhow::{bail, Context, Result};
use p2pmr_node::engine::runtime::{Executor, Limits};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

/// The moments a run's events mark, in the order they come.
const MARKS: [&str; 6] = ["accepted", "planned", "map", "reduce", "store", "completed"];
/// The phases between process start, the marks and process exit.
const PHASES: [&str; 7] = [
    "start (connect, publish the module, submit)",
    "plan",
    "after planning (memo lookups)",
    "map",
    "reduce",
    "store (output copies)",
    "exit",
];

/// One `p2pmr run` with `--json`: the seconds from process start to each mark and to exit,
/// and the output CID.
fn timed_run(
    bin: &Path,
    daemons: &[&DaemonProc],
    cid: &str,
    tag: &str,
) -> Result<(Vec<f64>, String)> {
    let started = Instant::now();
    let mut child = wordcount_cmd(bin, daemons, cid, tag)
        .arg("--json")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut at = vec![None; MARKS.len()];
    let mut out = None;
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let t = started.elapsed().as_secs_f64();
        let event: serde_json::Value = serde_json::from_str(&line?)?;
        let name = match event["event"].as_str() {
            Some("phase") => event["phase"].as_str().unwrap_or_default(),
            Some(other) => other,
            None => continue,
        };
        if name == "completed" {
            out = event["output"].as_str().map(str::to_owned);
        }
        if let Some(i) = MARKS.iter().position(|m| *m == name) {
            at[i].get_or_insert(t);
        }
    }
    if !child.wait()?.success() {
        bail!("p2pmr run failed");
    }
    let exit = started.elapsed().as_secs_f64();
    let mut marks: Vec<f64> = at
        .into_iter()
        .zip(MARKS)
        .map(|(t, m)| t.with_context(|| format!("no {m} event")))
        .collect::<Result<_>>()?;
    marks.push(exit);
    Ok((marks, out.context("no output CID")?))
}

/// One cluster's runs: the marks of each, and the output CIDs.
#[derive(Default)]
struct Runs {
    marks: Vec<Vec<f64>>,
    outputs: Vec<String>,
}

pub(crate) fn ceiling(sizes_mib: &[u64], daemon_counts: &[usize], rounds: usize) -> Result<()> {
    let bin = p2pmr_bin()?;
    let exec = Executor::new(Limits::default())?;
    let cores = cores();
    let scratch = tempdir_in_target("ceiling")?;
    for &mib in sizes_mib {
        let input = corpus(mib)?;
        let bytes = input.metadata()?.len() as f64;
        // One cluster per daemon count, each holding the corpus with 2 replicas.
        let mut clusters = Vec::new();
        for &n in daemon_counts {
            let daemons = cluster(&bin, &scratch, &format!("c{mib}-{n}"), n, 0)?;
            let cid = {
                let refs: Vec<&DaemonProc> = daemons.iter().collect();
                output(
                    client(&bin, &refs)
                        .args(["add", "--replicas", &n.min(2).to_string()])
                        .arg(&input),
                )?
            };
            clusters.push((daemons, cid));
        }
        // Warm up: page cache, the module compiled in this process and on the daemons.
        wasm(&exec, &input)?;
        for (daemons, cid) in &clusters {
            let refs: Vec<&DaemonProc> = daemons.iter().collect();
            timed_run(&bin, &refs, cid, "warm")?;
        }
        let threads = cores as usize;
        // As many tasks as the automatic split makes, with the job's 2 partitions each.
        let split = p2pmr_protocol::job::auto_split(bytes as u64, cores as u64);
        let tasks = (bytes as u64).div_ceil(split) as usize;
        let (mut sdk, mut wasm_t, mut sdk_all, mut wasm_all) = (vec![], vec![], vec![], vec![]);
        let mut wasm_tasks = vec![];
        let mut runs: Vec<Runs> = clusters.iter().map(|_| Runs::default()).collect();
        for round in 0..rounds {
            eprintln!("{mib} MiB: round {}/{rounds}", round + 1);
            sdk.push(time(|| native_sdk(&input))?.0);
            wasm_t.push(time(|| wasm(&exec, &input))?.0);
            sdk_all.push(time(|| native_sdk_at_once(&input, threads))?.0);
            wasm_all.push(time(|| wasm_at_once(&exec, &input, threads, threads, 1))?.0);
            wasm_tasks.push(time(|| wasm_at_once(&exec, &input, threads, tasks, 2))?.0);
            for ((daemons, cid), r) in clusters.iter().zip(&mut runs) {
                let refs: Vec<&DaemonProc> = daemons.iter().collect();
                let (m, out) = timed_run(&bin, &refs, cid, &round.to_string())?;
                r.marks.push(m);
                r.outputs.push(out);
            }
        }
        let mut outputs: Vec<&String> = runs.iter().flat_map(|r| &r.outputs).collect();
        outputs.dedup();
        if outputs.len() != 1 {
            bail!("outputs differ between runs: {outputs:?}");
        }
        let (sdk_m, wasm_m) = (median(sdk), median(wasm_t));
        let run_m: Vec<f64> = runs
            .iter()
            .map(|r| median(r.marks.iter().map(|m| *m.last().expect("exit")).collect()))
            .collect();
        let ceiling_s = wasm_m / cores;
        let mb = |s: f64| bytes / s / 1e6;
        println!(
            "\n{mib} MiB, {rounds} rounds, {cores} cores, wasm/native {:.2}:",
            sdk_m / wasm_m
        );
        println!("| measurement | median s | MB/s | ratio to SDK-native | share of the ceiling |");
        println!("|---|---:|---:|---:|---:|");
        let mut rows = vec![
            ("wordcount via the SDK, native, 1 thread".to_string(), sdk_m),
            (
                "the wasm module through the executor, 1 thread".into(),
                wasm_m,
            ),
            ("ceiling: the wasm module on every core".into(), ceiling_s),
            (
                format!("SDK-native, {threads} threads at once, 1/{threads} each"),
                median(sdk_all),
            ),
            (
                format!("the wasm module, {threads} tasks at once, 1/{threads} each"),
                median(wasm_all),
            ),
            (
                format!("the wasm module, {tasks} tasks of 2 partitions, {threads} at a time"),
                median(wasm_tasks),
            ),
        ];
        for (&n, &s) in daemon_counts.iter().zip(&run_m) {
            rows.push((
                format!("`p2pmr run`, {n} daemons, {} replicas", n.min(2)),
                s,
            ));
        }
        for (name, s) in rows {
            println!(
                "| {name} | {s:.3} | {:.0} | {:.2} | {:.0}% |",
                mb(s),
                sdk_m / s,
                100.0 * ceiling_s / s
            );
        }
        let heads: Vec<String> = daemon_counts
            .iter()
            .map(|n| format!("{n} daemons"))
            .collect();
        println!("\n| phase | {} |", heads.join(" | "));
        println!("|---|{}", "---:|".repeat(heads.len()));
        for (i, phase) in PHASES.iter().enumerate() {
            let cells: Vec<String> = runs
                .iter()
                .zip(&run_m)
                .map(|(r, total)| {
                    let spans = r
                        .marks
                        .iter()
                        .map(|m| m[i] - if i == 0 { 0.0 } else { m[i - 1] })
                        .collect();
                    let s = median(spans);
                    format!("{s:.3} s ({:.0}%)", 100.0 * s / total)
                })
                .collect();
            println!("| {phase} | {} |", cells.join(" | "));
        }
    }
    Ok(())
}
