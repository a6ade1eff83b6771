//! p2pmr's benchmark suite. Every figure is measured against a baseline in the same run and
//! reported as a median over interleaved rounds (this machine is noisy), with the ratio.
//!
//! `p2pmr-bench foundation` measures the content-addressing layer: `p2pmr add` (store and
//! `--only-hash`) and `p2pmr cat` throughput on a 256 MiB text corpus against plain
//! single-thread sha2-256 over the same bytes, and peak RSS of `add` and `cat` on 1 GiB.
//! It drives the release `p2pmr` binary as a user would, so process start-up is included.
//!
//! Corpora come from `../shared/bench/make-corpus.sh` and are cached in `target/bench-corpus/`.
//! Results are printed as a table and written to `target/bench-results/<suite>.json`.

mod ceiling;
mod chaos;
mod engine;
mod jobs;
mod peers;
mod suite;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "p2pmr benchmarks (build first: cargo build --release --workspace)")]
struct Args {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Debug, Subcommand)]
enum Suite {
    /// add / add --only-hash / cat throughput vs single-thread sha2-256; RSS of add and cat
    Foundation {
        /// Corpus size for the throughput rounds
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Corpus size for the peak-RSS runs
        #[arg(long, default_value_t = 1024)]
        rss_size_mib: u64,
        /// Interleaved rounds per measurement
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Block transfer vs raw loopback TCP; add with 2 replicas over 3 daemons vs sha2-256;
    /// daemon RSS idle and while serving
    Peers {
        /// Corpus size for the transfer rounds
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Corpus size for the replicated add and the RSS figures
        #[arg(long, default_value_t = 1024)]
        add_size_mib: u64,
        /// Interleaved rounds per measurement
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// wordcount over the network (2 daemons) vs native single-thread; daemon RSS; tiny-job
    /// latency on 3 daemons; per-task overhead
    Engine {
        /// Corpus size for the wordcount rounds
        #[arg(long, default_value_t = 1024)]
        big_mib: u64,
        /// Interleaved rounds per measurement
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// wordcount on 2 daemons against the ceiling (the wasm job on every core), with the
    /// time a `p2pmr run` spends in each phase
    Ceiling {
        /// Corpus sizes, one set of rounds each
        #[arg(long, value_delimiter = ',', default_value = "1024,256")]
        sizes_mib: Vec<u64>,
        /// Daemon counts, one cluster each (on this machine they share its cores)
        #[arg(long, value_delimiter = ',', default_value = "2")]
        daemons: Vec<usize>,
        /// Interleaved rounds per measurement
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Routing, placement and map scheduling over many virtual peers in virtual time, with
    /// the daemons' own routing tables, placement and scheduler code: lookup hops, balance,
    /// locality, bytes moved after failures
    Sim {
        /// Virtual peer counts, one simulation each
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,1000")]
        peers: Vec<usize>,
        /// Group copies per peer on average, for each peer count
        #[arg(long, value_delimiter = ',', default_value = "20,20,200")]
        copies_per_peer: Vec<usize>,
        /// Map tasks of the simulated job (one placement group each), for each peer count
        /// (0: none); twice the slots make two waves
        #[arg(long, value_delimiter = ',', default_value = "4000,40000,0")]
        tasks: Vec<usize>,
    },
    /// Fault tolerance: wordcount while daemons are killed, restarted and frozen; the output
    /// must equal the fault-free run's
    Chaos(chaos::ChaosArgs),
    /// Everything users compare, in one run: native, run-local, 1/2/4 daemons, add, tiny job,
    /// transfer vs TCP, PySpark local[2], 16 daemons; table + target/bench-results/suite.json
    All(suite::SuiteArgs),
    /// wordcount in wasm vs native; run-local on all cores vs native single-thread; per-task
    /// overhead
    Jobs {
        /// Corpus size for the wasm-vs-native rounds
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Corpus size for the run-local rounds
        #[arg(long, default_value_t = 1024)]
        big_mib: u64,
        /// Interleaved rounds per measurement
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

fn main() -> Result<()> {
    match Args::parse().suite {
        Suite::Foundation {
            size_mib,
            rss_size_mib,
            rounds,
        } => foundation(size_mib, rss_size_mib, rounds),
        Suite::Peers {
            size_mib,
            add_size_mib,
            rounds,
        } => peers::peers(size_mib, add_size_mib, rounds),
        Suite::Jobs {
            size_mib,
            big_mib,
            rounds,
        } => jobs::jobs(size_mib, big_mib, rounds),
        Suite::Engine { big_mib, rounds } => engine::engine(big_mib, rounds),
        Suite::Ceiling {
            sizes_mib,
            daemons,
            rounds,
        } => ceiling::ceiling(&sizes_mib, &daemons, rounds),
        Suite::Sim {
            peers,
            copies_per_peer,
            tasks,
        } => sim(&peers, &copies_per_peer, &tasks),
        Suite::Chaos(args) => chaos::chaos(args),
        Suite::All(args) => suite::suite(args),
    }
}

/// The workspace root (two levels above this crate).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The `p2pmr` binary built alongside this one.
fn p2pmr_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("p2pmr");
    if !bin.is_file() {
        bail!(
            "{} not found: run `cargo build --release --workspace` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// A corpus of `mib` MiB from the shared generator, cached under target/.
fn corpus(mib: u64) -> Result<PathBuf> {
    let dir = workspace().join("target/bench-corpus");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("corpus-{mib}.txt"));
    // The generator cuts the last copy at a line boundary, so a corpus is a little under size.
    if path.is_file() && (mib << 20).saturating_sub(path.metadata()?.len()) < 1 << 20 {
        return Ok(path);
    }
    let script = workspace().join("../shared/bench/make-corpus.sh");
    eprintln!("building {} with {}", path.display(), script.display());
    let status = Command::new("bash")
        .arg(&script)
        .arg(&path)
        .arg(mib.to_string())
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("{} failed", script.display());
    }
    Ok(path)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Seconds taken by `f`.
fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let start = Instant::now();
    let out = f()?;
    Ok((start.elapsed().as_secs_f64(), out))
}

/// The baseline: one thread hashing the file's bytes with sha2-256, reading in 256 KiB pieces.
fn sha256_file(path: &Path) -> Result<()> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 262_144];
    let mut h = Sha256::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    std::hint::black_box(h.finalize());
    Ok(())
}

/// A second baseline for `add`: no hashing, just the file's bytes copied into 256 KiB files
/// (as many as p2pmr writes) and one `sync`, i.e. what this machine's filesystem costs.
fn write_files(input: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut f = File::open(input)?;
    let mut buf = vec![0u8; 262_144];
    for i in 0.. {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        fs::write(dir.join(i.to_string()), &buf[..n])?;
    }
    let status = Command::new("sync").arg("-f").arg(dir).status()?;
    if !status.success() {
        bail!("sync -f failed");
    }
    Ok(())
}

/// Flushes the filesystem before a timed write, so the write does not pay for the previous
/// round's deletions (this VM's root is mounted with `discard`: freed blocks are trimmed as
/// the deletion is committed, which ran into whatever was timed next and halved its speed).
fn settle() -> Result<()> {
    let status = Command::new("sync").status()?;
    if !status.success() {
        bail!("sync failed");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Peak RSS in KiB of a command, from GNU time.
fn peak_rss_kib(cmd: &[&str], stdout_to: Option<&Path>) -> Result<u64> {
    let mut c = Command::new("/usr/bin/time");
    c.arg("-f").arg("%M").args(cmd).stderr(Stdio::piped());
    match stdout_to {
        Some(p) => c.stdout(File::create(p)?),
        None => c.stdout(Stdio::null()),
    };
    let out = c.output().context("/usr/bin/time")?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let err = String::from_utf8(out.stderr)?;
    Ok(err
        .lines()
        .last()
        .context("no output from time")?
        .trim()
        .parse()?)
}

struct Row {
    name: String,
    median_s: f64,
    mb_s: f64,
    ratio: f64,
}

impl Row {
    /// A row from a measurement's times over `bytes` bytes, its ratio taken against a
    /// baseline whose median is `base` seconds.
    fn new(name: &str, times: Vec<f64>, base: f64, bytes: f64) -> Self {
        let m = median(times);
        Self {
            name: name.to_owned(),
            median_s: m,
            mb_s: bytes / m / 1e6,
            ratio: base / m,
        }
    }
}

fn foundation(size_mib: u64, rss_size_mib: u64, rounds: usize) -> Result<()> {
    let bin = p2pmr_bin()?;
    let input = corpus(size_mib)?;
    let bytes = input.metadata()?.len() as f64;
    let scratch = tempdir_in_target("foundation")?;
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    // Warm the page cache so every contender reads from memory.
    sha256_file(&input)?;
    // ext4 without a journal (this VM's root) will not reuse an inode freed in the last 30 s
    // (35 s while its table block is dirty), and checks every such inode on each file creation:
    // right after a previous run (or `tempdir_in_target`) deleted its ~1000s of block files,
    // `recently_deleted` took a third of `add`'s time in `perf` and doubled it. The rounds
    // below delete nothing, so one wait here covers them all.
    eprintln!("waiting 36 s for recently deleted inodes to age out");
    settle()?;
    std::thread::sleep(Duration::from_secs(36));

    let (mut sha, mut add, mut add_n, mut cat, mut write_only) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        sha.push(time(|| sha256_file(&input))?.0);
        add_n.push(time(|| run(Command::new(&bin).args(["add", "-n", &s(&input)])))?.0);
        // Fresh directories each round, all removed only after the last round: this VM's root
        // filesystem has no journal, and there ext4 skips every inode freed in the last minute
        // when it allocates one (`recently_deleted`, a third of a write's time in `perf`), so
        // deleting one round's files made the next round's file creation pay for it.
        let home = scratch.join(format!("repo-{round}"));
        // Create the repository first (a one-time cost, as `ipfs init`), then time the add.
        run(Command::new(&bin).args(["--home", &s(&home), "repo", "stat"]))?;
        let plain = scratch.join(format!("plain-{round}"));
        settle()?;
        write_only.push(time(|| write_files(&input, &plain))?.0);
        settle()?;
        let (t, c) = time(|| {
            run(Command::new(&bin).args(["--home", &s(&home), "add", "--local", &s(&input)]))
        })?;
        add.push(t);
        cat.push(
            time(|| {
                run(Command::new(&bin)
                    .args(["--home", &s(&home), "cat", &c])
                    .stdout(Stdio::null()))
            })?
            .0,
        );
    }
    let base = median(sha.clone());
    let rows: Vec<Row> = [
        ("sha2-256, 1 thread (baseline)", sha),
        ("write only: copy into 256 KiB files + syncfs", write_only),
        ("p2pmr add --only-hash", add_n),
        ("p2pmr add (store + fsync)", add),
        ("p2pmr cat (verify every block)", cat),
    ]
    .into_iter()
    .map(|(name, ts)| Row::new(name, ts, base, bytes))
    .collect();

    // Peak RSS on the large corpus.
    let big = corpus(rss_size_mib)?;
    let big_home = scratch.join("rss-repo");
    let _ = fs::remove_dir_all(&big_home);
    let cid_file = scratch.join("cid");
    let add_rss = peak_rss_kib(
        &[
            &s(&bin),
            "--home",
            &s(&big_home),
            "add",
            "--local",
            &s(&big),
        ],
        Some(&cid_file),
    )?;
    let big_cid = fs::read_to_string(&cid_file)?.trim().to_owned();
    let cat_rss = peak_rss_kib(&[&s(&bin), "--home", &s(&big_home), "cat", &big_cid], None)?;
    let _ = fs::remove_dir_all(&scratch);

    println!("\nfoundation: {size_mib} MiB corpus, {rounds} interleaved rounds, medians, ratio to sha2-256");
    write_results(
        "foundation",
        &rows,
        &format!(
            "\"peak_rss_kib\":{{\"size_mib\":{rss_size_mib},\"add\":{add_rss},\"cat\":{cat_rss}}}"
        ),
    )?;
    println!(
        "\npeak RSS on {rss_size_mib} MiB: add {:.1} MiB, cat {:.1} MiB",
        add_rss as f64 / 1024.0,
        cat_rss as f64 / 1024.0
    );
    Ok(())
}

/// `p2pmr-bench sim`: one simulation per peer count, a table row each.
fn sim(peers: &[usize], copies_per_peer: &[usize], tasks: &[usize]) -> Result<()> {
    use p2pmr_node::sim::{simulate, SimConfig};
    println!(
        "| peers | copies per peer | groups | routing table | lookup hops (median / p99) \
         | requests per lookup | exact | placement max/mean | lookup and ranking time | map job \
         | 1% fail: copied, then max/mean | 10% fail |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|");
    for (i, &n) in peers.iter().enumerate() {
        let report = simulate(SimConfig {
            peers: n,
            replicas: 2,
            copies_per_peer: copies_per_peer.get(i).copied().unwrap_or(20),
            tasks: tasks.get(i).copied().unwrap_or(0),
            slots: 2,
            seed: 1,
        });
        println!("{report}");
    }
    Ok(())
}

/// Prints `rows` as a markdown table and writes them (plus `extra` JSON fields) to
/// `target/bench-results/<suite>.json`.
fn write_results(suite: &str, rows: &[Row], extra: &str) -> Result<()> {
    println!("| measurement | median s | MB/s | ratio |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.3} | {:.0} | {:.2} |",
            r.name, r.median_s, r.mb_s, r.ratio
        );
    }
    let json = format!(
        "{{\"suite\":\"{suite}\",\"rows\":[{}],{extra}}}\n",
        rows.iter()
            .map(|r| format!(
                "{{\"name\":\"{}\",\"median_s\":{:.4},\"mb_s\":{:.1},\"ratio\":{:.3}}}",
                r.name, r.median_s, r.mb_s, r.ratio
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let out_dir = workspace().join("target/bench-results");
    fs::create_dir_all(&out_dir)?;
    let path = out_dir.join(format!("{suite}.json"));
    fs::write(&path, json)?;
    println!("written to {}", path.display());
    Ok(())
}

/// A scratch directory under target/ (same filesystem as a user's repo would typically be).
fn tempdir_in_target(name: &str) -> Result<PathBuf> {
    let dir = workspace().join("target/bench-scratch").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}
