//! `p2pmr-bench engine`: the MapReduce engine's figures, with real `p2pmr daemon` processes on
//! 127.0.0.1 and the `p2pmr run` client as a user runs it.
//!
//! - wordcount of the 1 GiB corpus on 2 daemons (added beforehand with 2 replicas, not timed),
//!   end to end (`p2pmr run`: client start, module publish, map, shuffle, reduce, output
//!   replicated), against the plain native single-thread wordcount in the same run; with the
//!   automatic split size and with 8 and 16 MiB splits, and with one slot per daemon;
//! - peak RSS of each daemon over those jobs;
//! - a tiny job (1 KiB input) on 3 daemons, 20 runs: median submit-to-output latency, from an
//!   in-process client peer already connected;
//! - coordinator overhead per task: the same 16 MiB job as 64 tasks and as 1 task, the
//!   difference per extra task.
//!
//! Each round uses a different `--arg round=N` (ignored by wordcount) so every run is a new
//! job: the same spec would be answered from the coordinator's record of the last run.

use crate::jobs::native_plain;
use crate::peers::{client, output, DaemonProc};
use crate::{corpus, median, p2pmr_bin, tempdir_in_target, time, write_results, Row};
use anyhow::Result;
use p2pmr_node::engine::shipped;
use p2pmr_node::{Node, Replicas};
use p2pmr_protocol::job::{JobInput, JobSpec};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// `n` daemons with `slots` task slots each (0: the default, one per core), each dialling the
/// first, given a moment to identify each other.
pub(crate) fn cluster(
    bin: &Path,
    scratch: &Path,
    name: &str,
    n: usize,
    slots: u32,
) -> Result<Vec<DaemonProc>> {
    let slots_arg = slots.to_string();
    let args: Vec<&str> = if slots == 0 {
        vec![]
    } else {
        vec!["--slots", &slots_arg]
    };
    let first = DaemonProc::start_args(bin, &scratch.join(format!("{name}-0")), &[], &args)?;
    let addr = first.addr.clone();
    let mut all = vec![first];
    for i in 1..n {
        let home = scratch.join(format!("{name}-{i}"));
        all.push(DaemonProc::start_args(bin, &home, &[&addr], &args)?);
    }
    std::thread::sleep(Duration::from_millis(1000));
    Ok(all)
}

/// Runs wordcount (2 reducers) on `cid` with `split_mib` splits (`None`: the automatic
/// size); `tag` makes the spec new (an argument wordcount ignores). Returns the output CID.
pub(crate) fn run_job(
    bin: &std::path::Path,
    daemons: &[&DaemonProc],
    cid: &str,
    split_mib: Option<u64>,
    tag: &str,
) -> Result<String> {
    let split: Vec<String> = match split_mib {
        Some(mib) => vec!["--split-mib".into(), mib.to_string()],
        None => vec![],
    };
    output(wordcount_cmd(bin, daemons, cid, tag).args(&split))
}

/// The `p2pmr run` command of wordcount (2 reducers) on `cid`, `tag` making the spec new.
pub(crate) fn wordcount_cmd(
    bin: &std::path::Path,
    daemons: &[&DaemonProc],
    cid: &str,
    tag: &str,
) -> std::process::Command {
    let mut cmd = client(bin, daemons);
    cmd.args([
        "run",
        "--job",
        "wordcount",
        "--reducers",
        "2",
        "--input",
        cid,
    ])
    .args(["--arg", &format!("round={tag}")]);
    cmd
}

pub(crate) fn engine(big_mib: u64, rounds: usize) -> Result<()> {
    let bin = p2pmr_bin()?;
    let big = corpus(big_mib)?;
    let big_bytes = big.metadata()?.len() as f64;
    let scratch = tempdir_in_target("engine")?;

    // Two daemons holding the whole corpus: with the default slots (one per core each; the
    // coordinator shares the machine's out, so one task per core in all) and with one slot
    // each (the machine then has one, and each daemon still gets one).
    let default_slots = cluster(&bin, &scratch, "default", 2, 0)?;
    let one_slot = cluster(&bin, &scratch, "one", 2, 1)?;
    let a: Vec<&DaemonProc> = default_slots.iter().collect();
    let b: Vec<&DaemonProc> = one_slot.iter().collect();
    let cid = output(client(&bin, &a).args(["add", "--replicas", "2"]).arg(&big))?;
    output(client(&bin, &b).args(["add", "--replicas", "2"]).arg(&big))?;

    // (label, daemons, split MiB or automatic)
    let auto = |slots| p2pmr_protocol::job::auto_split(big_bytes as u64, slots) >> 20;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let configs: Vec<(String, &[&DaemonProc], Option<u64>)> = vec![
        (
            format!(
                "default slots ({} in all), automatic splits ({} MiB)",
                cores.max(2),
                auto(cores.max(2))
            ),
            &a,
            None,
        ),
        ("default slots, 8 MiB splits".into(), &a, Some(8)),
        ("default slots, 16 MiB splits".into(), &a, Some(16)),
        (
            format!("1 slot each, automatic splits ({} MiB)", auto(2)),
            &b,
            None,
        ),
    ];
    let mut native = Vec::new();
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        native.push(time(|| native_plain(&big))?.0);
        for (i, (_, daemons, split)) in configs.iter().enumerate() {
            runs[i].push(time(|| run_job(&bin, daemons, &cid, *split, &format!("{round}-{i}")))?.0);
        }
    }
    let rss: Vec<u64> = default_slots
        .iter()
        .chain(&one_slot)
        .map(|d| d.status_kib("VmHWM:"))
        .collect::<Result<_>>()?;

    // Per-task cost: 32 MiB as 32 tasks and as 4, both keeping the two slots busy.
    let small = corpus(32)?;
    let small_cid = output(
        client(&bin, &b)
            .args(["add", "--replicas", "2"])
            .arg(&small),
    )?;
    let (mut many, mut few) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(5) {
        for (times, split) in [(&mut many, "1"), (&mut few, "8")] {
            times.push(
                time(|| {
                    output(
                        client(&bin, &b)
                            .args(["run", "--job", "wordcount", "--input", &small_cid])
                            .args(["--split-mib", split])
                            .args(["--arg", &format!("r={round}")]),
                    )
                })?
                .0,
            );
        }
    }

    // Tiny job latency on three daemons, from a connected in-process client.
    let three = cluster(&bin, &scratch, "three", 3, 0)?;
    let latencies = tokio::runtime::Runtime::new()?.block_on(tiny_jobs(&three, 20))?;
    drop(three);
    let _ = fs::remove_dir_all(&scratch);

    let native_m = median(native.clone());
    let mut rows = vec![Row::new(
        &format!("native wordcount, 1 thread, {big_mib} MiB (baseline)"),
        native,
        native_m,
        big_bytes,
    )];
    for (i, times) in runs.into_iter().enumerate() {
        rows.push(Row::new(
            &format!(
                "p2pmr run wordcount, 2 daemons, {big_mib} MiB, {}",
                configs[i].0
            ),
            times,
            native_m,
            big_bytes,
        ));
    }
    let many_m = median(many);
    let few_m = median(few);
    let per_task_ms = (many_m - few_m) / 28.0 * 1e3;
    let tiny_ms = median(latencies.clone()) * 1e3;
    let rss_json: Vec<String> = rss.iter().map(|r| r.to_string()).collect();
    let extra = format!(
        "\"rss_kib\":[{}],\"tiny_job_median_ms\":{tiny_ms:.1},\"tiny_job_runs_ms\":[{}],\"per_task_ms\":{per_task_ms:.2},\"tasks32_s\":{many_m:.3},\"tasks4_s\":{few_m:.3}",
        rss_json.join(","),
        latencies
            .iter()
            .map(|l| format!("{:.1}", l * 1e3))
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("\nengine: {rounds} interleaved rounds, medians; ratios to the native baseline");
    write_results("engine", &rows, &extra)?;
    let mib = |k: &u64| format!("{:.0}", *k as f64 / 1024.0);
    println!(
        "\npeak RSS per daemon over the {big_mib} MiB jobs (MiB): default slots {} / {}, one slot {} / {}",
        mib(&rss[0]),
        mib(&rss[1]),
        mib(&rss[2]),
        mib(&rss[3])
    );
    println!("tiny job (1 KiB, 3 daemons), submit to output: median {tiny_ms:.1} ms of 20");
    println!(
        "per-task cost: 32 MiB as 32 tasks {many_m:.3}s vs as 4 tasks {few_m:.3}s = {per_task_ms:.2} ms per extra task"
    );
    Ok(())
}

/// Runs `n` tiny wordcount jobs (distinct specs) and returns each submit-to-output time.
pub(crate) async fn tiny_jobs(daemons: &[DaemonProc], n: usize) -> Result<Vec<f64>> {
    let node = Node::builder()
        .peers(
            daemons
                .iter()
                .map(|d| d.addr.parse())
                .collect::<Result<_, _>>()?,
        )
        .mdns(false)
        .discovery(Duration::from_secs(5))
        .build();
    node.peers().wait_for(daemons.len()).await?;
    let text = "the quick brown fox jumps over the lazy dog\n".repeat(24);
    let tiny = std::io::Cursor::new(text.into_bytes()[..1024].to_vec());
    let input = node.blocks().add(tiny, Replicas::network(2)).await?.root;
    let wordcount = shipped::by_name("wordcount").unwrap().to_vec();
    let module = node.jobs().publish(wordcount).await?;
    let mut times = Vec::new();
    for i in 0..n + 1 {
        let spec = JobSpec::new(
            module,
            vec![JobInput {
                name: "tiny".into(),
                cid: input,
            }],
            1,
            [("run".to_string(), i.to_string())],
        )?;
        let started = Instant::now();
        node.jobs().submit(spec, None).await?.wait(|_| {}).await?;
        // The first run compiles the module on each daemon: not what this measures.
        if i > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    node.shutdown().await;
    Ok(times)
}
