//! `p2pmr-bench all`: the one-command comparison with what users would pick instead, every
//! contender measured in the same run on the same corpora (`make-corpus.sh`, 256 MiB and
//! 1 GiB), with real `p2pmr daemon` processes on 127.0.0.1 and the `p2pmr` CLI as a user runs
//! it. Rounds are interleaved and medians reported; every speed ratio is against the native
//! single-thread wordcount of the same corpus in the same run.
//!
//! Measured: native wordcount (the baseline); `p2pmr run-local`; `p2pmr run` on 1, 2 and 4
//! daemons (the corpus added beforehand, not timed); `p2pmr add --replicas 2` over 3 daemons
//! (against single-thread sha2-256); a tiny job on 3 daemons (20 runs); block transfer
//! between two daemons (against raw loopback TCP); Polars (lazy, streaming engine) and DuckDB
//! (2 threads) on the large corpus, installed into `target/df-venv` with pip; PySpark
//! `local[2]`, both its RDD API and Spark SQL's DataFrame API, when it can be installed (into
//! `target/pyspark-venv`); each skipped with a note if it cannot be had; and 16
//! daemons on one machine running the 256 MiB job (its output must equal the 2-daemon run's).
//! For each: MB/s, ratio, CPU utilisation (the machine's busy CPU time over wall time times
//! cores) and peak RSS per daemon. Prints a table and writes
//! `target/bench-results/suite.json`.

use crate::engine::{cluster, run_job, tiny_jobs};
use crate::jobs::native_plain;
use crate::peers::{client, output, raw_tcp, DaemonProc};
use crate::{corpus, median, p2pmr_bin, sha256_file, tempdir_in_target, workspace};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The suite's settings.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SuiteArgs {
    /// The large corpus (MiB)
    #[arg(long, default_value_t = 1024)]
    big_mib: u64,
    /// The small corpus (MiB): transfer, PySpark, 16 daemons
    #[arg(long, default_value_t = 256)]
    small_mib: u64,
    /// Interleaved rounds per measurement
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Rounds of the PySpark run (slow)
    #[arg(long, default_value_t = 1)]
    spark_rounds: usize,
    /// Daemons for the scaling run
    #[arg(long, default_value_t = 16)]
    many: usize,
    /// Do not try to install or run PySpark (RDD and Spark SQL)
    #[arg(long)]
    no_spark: bool,
    /// Do not try to install or run Polars and DuckDB
    #[arg(long)]
    no_dataframes: bool,
}

/// Busy CPU seconds of the whole machine so far (all but idle and iowait, from /proc/stat):
/// every process a measurement involves counts, including those it does not wait for
/// (PySpark's JVM), and so does anything else running (the suite wants a quiet machine).
fn busy_secs() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse::<f64>())
        .collect::<Result<_, _>>()?;
    let (idle, iowait) = (ticks[3], ticks.get(4).copied().unwrap_or(0.0));
    // Guest time is already counted in user time, so only the first eight fields add up.
    let busy: f64 = ticks.iter().take(8).sum::<f64>() - idle - iowait;
    Ok(busy / 100.0) // USER_HZ is 100 on Linux
}

pub(crate) fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// One measurement's samples: wall seconds and CPU utilisation (0..1 of all cores).
#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Samples {
    /// Times `f`, and the machine's CPU use meanwhile.
    fn measure<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let (c0, t0) = (busy_secs()?, Instant::now());
        let out = f()?;
        let wall = t0.elapsed().as_secs_f64();
        self.cpu.push((busy_secs()? - c0) / (wall * cores()));
        self.wall.push(wall);
        Ok(out)
    }
}

/// wordcount with the default (automatic) split size.
fn wordcount(bin: &Path, daemons: &[&DaemonProc], cid: &str, tag: &str) -> Result<String> {
    run_job(bin, daemons, cid, None, tag)
}

/// A Python in `target/<venv>` that can `import <module>`, created and filled with
/// `pip install <packages>` on first use.
fn venv_with(venv: &str, module: &str, packages: &[&str]) -> Result<PathBuf> {
    let venv = workspace().join("target").join(venv);
    let python = venv.join("bin/python");
    let has = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&python) {
        eprintln!(
            "installing {} into {} (pip)",
            packages.join(", "),
            venv.display()
        );
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()?;
        if !made.success() {
            bail!("python3 -m venv failed");
        }
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(packages)
            .status()?;
        if !pip.success() || !has(&python) {
            bail!("pip install {} failed", packages.join(" "));
        }
    }
    Ok(python)
}

/// `examples/bench/df_wordcount.py ENGINE INPUT` (Polars, DuckDB or Spark SQL; the same word
/// rule as p2pmr's wordcount): the number of distinct words.
fn df_wordcount(python: &Path, engine: &str, input: &Path) -> Result<u64> {
    let script = workspace().join("examples/bench/df_wordcount.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(engine)
        .arg(input)
        .stderr(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("{} {engine} failed", script.display());
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("{engine} printed no word count"))
}

/// A Python with PySpark: `target/pyspark-venv`, created and filled with pip on first use.
fn pyspark() -> Result<PathBuf> {
    let python = venv_with("pyspark-venv", "pyspark", &["pyspark"])?;
    let java = Command::new("java")
        .arg("-version")
        .stderr(Stdio::null())
        .status();
    if !java.is_ok_and(|s| s.success()) {
        bail!("no java on PATH");
    }
    Ok(python)
}

/// PySpark `local[2]` wordcount of `input` (same word rule as p2pmr's wordcount: maximal runs
/// of Unicode letters, case kept), output saved as text like p2pmr stores its own; returns
/// the number of distinct words.
fn spark_wordcount(python: &Path, input: &Path, out: &Path) -> Result<u64> {
    let _ = fs::remove_dir_all(out);
    let script = workspace().join("examples/bench/spark_wordcount.py");
    let status = Command::new(python)
        .arg(&script)
        .arg(input)
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("{} failed", script.display());
    }
    let mut words = 0;
    for f in fs::read_dir(out)? {
        let path = f?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        {
            words += fs::read(&path)?.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    Ok(words)
}

/// Lines of a job's output (its distinct words, for wordcount).
fn output_lines(bin: &Path, daemons: &[&DaemonProc], cid: &str) -> Result<u64> {
    let out = client(bin, daemons).args(["cat", cid]).output()?;
    if !out.status.success() {
        bail!("cat {cid} failed");
    }
    Ok(out.stdout.iter().filter(|&&b| b == b'\n').count() as u64)
}

struct Line {
    name: String,
    samples: Samples,
    bytes: f64,
    /// Median seconds of this row's baseline.
    base: f64,
    rss_mib: Option<f64>,
}

pub(crate) fn suite(args: SuiteArgs) -> Result<()> {
    let bin = p2pmr_bin()?;
    let big = corpus(args.big_mib)?;
    let small = corpus(args.small_mib)?;
    let big_bytes = big.metadata()?.len() as f64;
    let small_bytes = small.metadata()?.len() as f64;
    let scratch = tempdir_in_target("suite")?;
    sha256_file(&big)?; // warm the page cache

    // Clusters of 1, 2 and 4 daemons (one slot per core), each holding the big corpus (added
    // now, not timed: the add has its own row), and 3 daemons for the add and the tiny job.
    let sizes = [1usize, 2, 4];
    let clusters: Vec<Vec<DaemonProc>> = sizes
        .iter()
        .map(|&n| cluster(&bin, &scratch, &format!("c{n}"), n, 0))
        .collect::<Result<_>>()?;
    let mut big_cids = Vec::new();
    for c in &clusters {
        let refs: Vec<&DaemonProc> = c.iter().collect();
        let replicas = refs.len().min(2).to_string();
        big_cids.push(output(
            client(&bin, &refs)
                .args(["add", "--replicas", &replicas])
                .arg(&big),
        )?);
    }
    let two: Vec<&DaemonProc> = clusters[1].iter().collect();
    let small_cid = output(
        client(&bin, &two)
            .args(["add", "--replicas", "2"])
            .arg(&small),
    )?;
    // Transfer: one daemon holds the small corpus; `cat` fetches every block from it.
    let holder = DaemonProc::start(&bin, &scratch.join("holder"))?;
    let held = output(
        client(&bin, &[&holder])
            .args(["add", "--replicas", "1"])
            .arg(&small),
    )?;

    let (
        mut native,
        mut local,
        mut sha,
        mut add,
        mut tcp,
        mut transfer,
        mut native_small,
        mut two_small,
    ) = Default::default();
    let mut runs: Vec<Samples> = sizes.iter().map(|_| Samples::default()).collect();
    let mut outputs = Vec::new();
    let mut notes = Vec::new();
    // Dataframe engines a user would reach for on one machine, run every round like the rest.
    let dataframes = if args.no_dataframes {
        notes.push("Polars and DuckDB skipped (--no-dataframes)".to_string());
        None
    } else {
        match venv_with("df-venv", "polars, duckdb", &["polars", "duckdb"]) {
            Ok(python) => Some(python),
            Err(e) => {
                notes.push(format!("Polars and DuckDB skipped: {e:#}"));
                None
            }
        }
    };
    let (mut polars, mut duckdb) = (Samples::default(), Samples::default());
    let mut df_words = Vec::new();
    let mut add_rss = 0u64;
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        Samples::measure(&mut native, || native_plain(&big))?;
        Samples::measure(&mut local, || {
            output(
                Command::new(&bin)
                    .args(["run-local", "--job", "wordcount", "--input"])
                    .arg(&big)
                    .stdout(Stdio::null()),
            )
        })?;
        for (i, c) in clusters.iter().enumerate() {
            let refs: Vec<&DaemonProc> = c.iter().collect();
            let tag = format!("{round}");
            outputs.push(Samples::measure(&mut runs[i], || {
                wordcount(&bin, &refs, &big_cids[i], &tag)
            })?);
        }
        if let Some(python) = &dataframes {
            for (engine, samples) in [("polars", &mut polars), ("duckdb", &mut duckdb)] {
                let words = Samples::measure(samples, || df_wordcount(python, engine, &big))?;
                df_words.push((engine, words));
            }
        }
        Samples::measure(&mut native_small, || native_plain(&small))?;
        // Its own tag: the small corpus begins with the big one's bytes, so a task of the
        // big job's with the same arguments would be reused from the daemons' memo.
        Samples::measure(&mut two_small, || {
            wordcount(&bin, &two, &small_cid, &format!("small-{round}"))
        })?;
        Samples::measure(&mut sha, || sha256_file(&big))?;
        // Fresh daemons per round, so every block is really written.
        let fresh: Vec<DaemonProc> = (0..3)
            .map(|i| DaemonProc::start(&bin, &scratch.join(format!("add{round}-{i}"))))
            .collect::<Result<_>>()?;
        let refs: Vec<&DaemonProc> = fresh.iter().collect();
        Samples::measure(&mut add, || {
            output(
                client(&bin, &refs)
                    .args(["add", "--replicas", "2"])
                    .arg(&big),
            )
        })?;
        for d in &fresh {
            add_rss = add_rss.max(d.status_kib("VmHWM:")?);
        }
        drop(fresh);
        for i in 0..3 {
            let _ = fs::remove_dir_all(scratch.join(format!("add{round}-{i}")));
        }
        Samples::measure(&mut tcp, || raw_tcp(&small))?;
        Samples::measure(&mut transfer, || {
            let status = client(&bin, &[&holder])
                .args(["cat", &held])
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("cat failed");
            }
            Ok(())
        })?;
    }
    outputs.dedup();
    if outputs.len() != 1 {
        bail!("wordcount outputs differ between daemon counts: {outputs:?}");
    }
    let rss: Vec<f64> = clusters
        .iter()
        .map(|c| {
            c.iter()
                .map(|d| d.status_kib("VmHWM:"))
                .collect::<Result<Vec<_>>>()
                .map(|v| v.into_iter().max().unwrap_or(0) as f64 / 1024.0)
        })
        .collect::<Result<_>>()?;

    // Tiny job on three daemons of their own.
    let three = cluster(&bin, &scratch, "tiny", 3, 0)?;
    let tiny = tokio::runtime::Runtime::new()?.block_on(tiny_jobs(&three, 20))?;
    drop(three);
    drop(holder);

    // The words p2pmr found in the big corpus, which the dataframe engines must find too.
    let big_words = output_lines(&bin, &two, &outputs[0])?;
    df_words.dedup();
    for (engine, words) in &df_words {
        if *words != big_words {
            notes.push(format!(
                "{engine} found {words} distinct words, p2pmr {big_words}"
            ));
        }
    }

    // PySpark local[2] on the small corpus: the RDD API and Spark SQL's DataFrame API.
    let (mut spark, mut spark_sql) = (Samples::default(), Samples::default());
    let mut spark_sql_words = None;
    let spark_words = if args.no_spark {
        notes.push("PySpark skipped (--no-spark)".to_string());
        None
    } else {
        match pyspark() {
            Ok(python) => {
                let mut words = 0;
                for round in 0..args.spark_rounds {
                    eprintln!("PySpark round {}/{}", round + 1, args.spark_rounds);
                    let out = scratch.join("spark-out");
                    words =
                        Samples::measure(&mut spark, || spark_wordcount(&python, &small, &out))?;
                    spark_sql_words = Some(Samples::measure(&mut spark_sql, || {
                        df_wordcount(&python, "spark-sql", &small)
                    })?);
                }
                Some(words)
            }
            Err(e) => {
                notes.push(format!("PySpark skipped: {e:#}"));
                None
            }
        }
    };
    let small_out = wordcount(&bin, &two, &small_cid, "lines")?;
    let p2pmr_words = output_lines(&bin, &two, &small_out)?;
    for (what, words) in [("PySpark", spark_words), ("Spark SQL", spark_sql_words)] {
        if let Some(w) = words.filter(|w| *w != p2pmr_words) {
            notes.push(format!(
                "{what} found {w} distinct words, p2pmr {p2pmr_words}"
            ));
        }
    }
    drop(clusters);

    // Scaling: many daemons on this one machine, the small corpus.
    let many = cluster(&bin, &scratch, "many", args.many, 1)?;
    let refs: Vec<&DaemonProc> = many.iter().collect();
    let many_cid = output(
        client(&bin, &refs)
            .args(["add", "--replicas", "2"])
            .arg(&small),
    )?;
    let mut scale = Samples::default();
    let many_out = Samples::measure(&mut scale, || wordcount(&bin, &refs, &many_cid, "many"))?;
    if many_out != small_out {
        bail!(
            "{} daemons gave {many_out}, 2 daemons {small_out}",
            args.many
        );
    }
    let many_rss: Vec<u64> = refs
        .iter()
        .map(|d| d.status_kib("VmHWM:"))
        .collect::<Result<_>>()?;
    let many_total = many_rss.iter().sum::<u64>() as f64 / 1024.0;
    drop(many);
    let _ = fs::remove_dir_all(&scratch);

    // The table.
    let native_m = median(native.wall.clone());
    let small_m = median(native_small.wall.clone());
    let sha_m = median(sha.wall.clone());
    let tcp_m = median(tcp.wall.clone());
    let two_small_m = median(two_small.wall.clone());
    let spark_m = (!spark.wall.is_empty()).then(|| median(spark.wall.clone()));
    let (big_mib, small_mib) = (args.big_mib, args.small_mib);
    let line = |name: String, samples: Samples, bytes, base, rss_mib| Line {
        name,
        samples,
        bytes,
        base,
        rss_mib,
    };
    let mut lines = vec![
        line(
            format!("native wordcount, 1 thread, {big_mib} MiB (baseline)"),
            native,
            big_bytes,
            native_m,
            None,
        ),
        line(
            format!("p2pmr run-local wordcount, all cores, {big_mib} MiB"),
            local,
            big_bytes,
            native_m,
            None,
        ),
    ];
    if dataframes.is_some() {
        lines.push(line(
            format!("Polars (lazy, streaming) wordcount, {big_mib} MiB"),
            polars,
            big_bytes,
            native_m,
            None,
        ));
        lines.push(line(
            format!("DuckDB (2 threads) wordcount, {big_mib} MiB"),
            duckdb,
            big_bytes,
            native_m,
            None,
        ));
    }
    for ((n, samples), rss) in sizes.iter().zip(runs).zip(&rss) {
        lines.push(line(
            format!("p2pmr run wordcount, {n} daemon(s), {big_mib} MiB"),
            samples,
            big_bytes,
            native_m,
            Some(*rss),
        ));
    }
    lines.push(line(
        format!("native wordcount, 1 thread, {small_mib} MiB (baseline)"),
        native_small,
        small_bytes,
        small_m,
        None,
    ));
    lines.push(line(
        format!("p2pmr run wordcount, 2 daemons, {small_mib} MiB"),
        two_small,
        small_bytes,
        small_m,
        None,
    ));
    if spark_m.is_some() {
        lines.push(line(
            format!("PySpark local[2] RDD wordcount, {small_mib} MiB"),
            spark,
            small_bytes,
            small_m,
            None,
        ));
        lines.push(line(
            format!("PySpark local[2] Spark SQL DataFrame wordcount, {small_mib} MiB"),
            spark_sql,
            small_bytes,
            small_m,
            None,
        ));
    }
    lines.push(line(
        format!(
            "p2pmr run wordcount, {} daemons (1 slot each), {small_mib} MiB",
            args.many
        ),
        scale,
        small_bytes,
        small_m,
        None,
    ));
    lines.push(line(
        format!("sha2-256, 1 thread, {big_mib} MiB (baseline)"),
        sha,
        big_bytes,
        sha_m,
        None,
    ));
    lines.push(line(
        format!("p2pmr add --replicas 2 over 3 daemons, {big_mib} MiB"),
        add,
        big_bytes,
        sha_m,
        Some(add_rss as f64 / 1024.0),
    ));
    lines.push(line(
        format!("raw loopback TCP, {small_mib} MiB (baseline)"),
        tcp,
        small_bytes,
        tcp_m,
        None,
    ));
    lines.push(line(
        format!("block transfer: p2pmr cat from one daemon, {small_mib} MiB"),
        transfer,
        small_bytes,
        tcp_m,
        None,
    ));

    println!("\nsuite: {} interleaved rounds, medians; ratio = baseline time / this time (> 1 is faster than the baseline)", args.rounds);
    println!("| measurement | median s | MB/s | ratio | CPU use | peak RSS per daemon MiB |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for l in &lines {
        let m = median(l.samples.wall.clone());
        let cpu = median(l.samples.cpu.clone());
        let rss = l.rss_mib.map_or(String::new(), |r| format!("{r:.0}"));
        println!(
            "| {} | {m:.3} | {:.0} | {:.2} | {:.0}% | {rss} |",
            l.name,
            l.bytes / m / 1e6,
            l.base / m,
            cpu * 100.0
        );
        rows.push(json!({"name": l.name, "median_s": m, "runs_s": l.samples.wall, "mb_s": l.bytes / m / 1e6,
            "ratio": l.base / m, "cpu_utilisation": cpu, "peak_rss_per_daemon_mib": l.rss_mib}));
    }
    let tiny_ms = median(tiny.clone()) * 1e3;
    println!(
        "\ntiny job (1 KiB, 3 daemons): median {tiny_ms:.1} ms over {} runs",
        tiny.len()
    );
    println!(
        "{} daemons on one machine, {small_mib} MiB: same output as 2 daemons; total peak RSS {many_total:.0} MiB ({:.0} MiB per daemon)",
        args.many,
        many_total / args.many as f64
    );
    if let Some(spark_m) = spark_m {
        println!(
            "p2pmr (2 daemons) vs PySpark local[2] on {small_mib} MiB: {:.1}x faster",
            spark_m / two_small_m
        );
    }
    for n in &notes {
        println!("note: {n}");
    }
    let doc = json!({
        "suite": "suite",
        "rounds": args.rounds,
        "rows": rows,
        "tiny_job_median_ms": tiny_ms,
        "tiny_job_runs_ms": tiny.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
        "many_daemons": {"daemons": args.many, "corpus_mib": small_mib, "total_peak_rss_mib": many_total},
        "notes": notes,
    });
    let out_dir = workspace().join("target/bench-results");
    fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("suite.json");
    fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("written to {}", path.display());
    Ok(())
}
