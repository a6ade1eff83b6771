//! `p2pmr-bench chaos`: the fault-tolerance acceptance run, with real `p2pmr daemon`
//! processes on 127.0.0.1 and the `p2pmr` CLI as a user runs it.
//!
//! N daemons (one task slot each), a corpus added with R replicas, wordcount with 4 reducers
//! run once without faults and once while daemons are killed with SIGKILL every few seconds
//! and restarted (never more than 2 unavailable at once) and one is frozen with SIGSTOP for
//! 20 s. The two runs differ only in an argument wordcount ignores, so their outputs must have
//! the same CID (same bytes). Prints both times and their ratio, and how long the coordinator
//! took to notice each fault (from the fault to the first `task_failed` event naming that
//! daemon, as the JSON event stream shows it).
//!
//! Then the data checks: with every daemon back, no block of the corpus may be lost; one
//! daemon is then killed for good, and the run measures how long the others take to bring
//! every block back to R copies (the grace period plus the copying). Exits non-zero if the
//! chaos run fails, its output differs, a block is lost, or replication is not restored.
//! `examples/chaos/run.sh` runs it; `.ci/run` runs that.

use crate::{corpus, tempdir_in_target, workspace};
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The chaos run's settings.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ChaosArgs {
    /// Daemons
    #[arg(long, default_value_t = 5)]
    daemons: usize,
    /// Corpus size (MiB)
    #[arg(long, default_value_t = 200)]
    mib: u64,
    /// Replicas of the corpus
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Reducers
    #[arg(long, default_value_t = 4)]
    reducers: u32,
    /// Map split size (MiB) [default: the automatic one]; a large one makes map tasks that are
    /// cut in two at the end of the map phase
    #[arg(long)]
    split_mib: Option<u64>,
    /// Seconds between kills
    #[arg(long, default_value_t = 3.0)]
    kill_every: f64,
    /// How long the frozen daemon stays frozen (seconds)
    #[arg(long, default_value_t = 20.0)]
    stop_secs: f64,
    /// Most daemons unavailable (killed or frozen) at once
    #[arg(long, default_value_t = 2)]
    max_down: usize,
    /// The `p2pmr` binary [default: the one built alongside this program]
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Seed for the choice of victims [default: from the clock]
    #[arg(long)]
    seed: Option<u64>,
    /// The daemons' replica grace period (seconds): how long a holder may be gone before its
    /// blocks are copied elsewhere
    #[arg(long, default_value_t = 10.0)]
    grace_secs: f64,
    /// How long replication may take to come back after a daemon is lost for good, beyond
    /// the grace period (seconds)
    #[arg(long, default_value_t = 120.0)]
    restore_limit_secs: f64,
}

/// One daemon of the run: its repo, its fixed port (a restarted daemon comes back on the same
/// address, as a rebooted machine would), and its process while it runs.
struct Node {
    home: PathBuf,
    port: u16,
    addr: String,
    peer: String,
    child: Option<Child>,
    restart_at: Option<Instant>,
    frozen_until: Option<Instant>,
}

impl Node {
    fn down(&self) -> bool {
        self.child.is_none() || self.frozen_until.is_some()
    }

    fn pid(&self) -> Option<String> {
        self.child.as_ref().map(|c| c.id().to_string())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = signal("CONT", &pid);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(name: &str, pid: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid)
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts (or restarts) `node`, dialling `peers`; waits for its listening line.
fn start(bin: &Path, node: &mut Node, peers: &[String], grace_secs: f64) -> Result<()> {
    let out_path = node.home.join("daemon.out");
    let mut cmd = Command::new(bin);
    cmd.args(["--home", node.home.to_str().unwrap(), "--no-mdns"]);
    for p in peers {
        cmd.args(["--peer", p]);
    }
    let err = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.home.join("daemon.err"))?;
    let child = cmd
        .args(["daemon", "--slots", "1"])
        .args(["--grace-secs", &grace_secs.to_string()])
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", node.port)])
        .stdout(File::create(&out_path)?)
        .stderr(err)
        .spawn()?;
    node.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(addr) = out.lines().find_map(|l| l.strip_prefix("listening on ")) {
            node.addr = addr.to_owned();
            node.peer = out
                .lines()
                .find_map(|l| l.strip_prefix("peer id: "))
                .unwrap_or_default()
                .to_owned();
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("daemon {} did not start", node.home.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn client(bin: &Path, dir: &Path, nodes: &[Node]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["--no-mdns", "--home", dir.join("client").to_str().unwrap()]);
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        cmd.args(["--peer", &n.addr]);
    }
    cmd
}

/// A small deterministic generator for the victims (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The corpus: the shared generator's when it is there, else the demo's deterministic one.
fn corpus_any(mib: u64) -> Result<PathBuf> {
    if workspace().join("../shared/bench/make-corpus.sh").is_file() {
        return corpus(mib);
    }
    let path = workspace().join(format!("target/bench-corpus/demo-corpus-{mib}.txt"));
    if !path.is_file() {
        fs::create_dir_all(path.parent().unwrap())?;
        let tmp = path.with_extension("tmp");
        std::io::copy(
            &mut p2pmr_node::corpus::Corpus::new(mib << 20),
            &mut File::create(&tmp)?,
        )?;
        fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

pub(crate) fn chaos(args: ChaosArgs) -> Result<()> {
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => crate::p2pmr_bin()?,
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    eprintln!("chaos: seed {seed}");
    let mut rng = Rng(seed);
    let corpus = corpus_any(args.mib)?;
    let dir = tempdir_in_target("chaos")?;
    let mut nodes = Vec::new();
    for i in 0..args.daemons {
        let home = dir.join(format!("d{i}"));
        fs::create_dir_all(&home)?;
        nodes.push(Node {
            home,
            port: free_port()?,
            addr: String::new(),
            peer: String::new(),
            child: None,
            restart_at: None,
            frozen_until: None,
        });
    }
    for i in 0..nodes.len() {
        let peers: Vec<String> = nodes[..i].iter().map(|n| n.addr.clone()).collect();
        start(&bin, &mut nodes[i], &peers, args.grace_secs)?;
    }
    std::thread::sleep(Duration::from_secs(1));

    let added = client(&bin, &dir, &nodes)
        .args(["add", "--replicas", &args.replicas.to_string()])
        .arg(&corpus)
        .stderr(Stdio::inherit())
        .output()?;
    if !added.status.success() {
        bail!("add failed");
    }
    let cid = String::from_utf8(added.stdout)?.trim().to_owned();
    eprintln!(
        "chaos: {} MiB added with {} replicas: {cid}",
        args.mib, args.replicas
    );
    let run = |nodes: &[Node], tag: &str| {
        let mut cmd = client(&bin, &dir, nodes);
        cmd.args([
            "run",
            "--job",
            "wordcount",
            "--input",
            &format!("corpus={cid}"),
        ])
        .args(["--reducers", &args.reducers.to_string()])
        .args(["--arg", &format!("run={tag}")]);
        if let Some(mib) = args.split_mib {
            cmd.args(["--split-mib", &mib.to_string()]);
        }
        cmd
    };

    // The fault-free run.
    let started = Instant::now();
    let clean = run(&nodes, "clean").stderr(Stdio::inherit()).output()?;
    let clean_s = started.elapsed().as_secs_f64();
    if !clean.status.success() {
        bail!("the fault-free run failed");
    }
    let clean_cid = last_line(&clean.stdout)?;
    eprintln!("chaos: fault-free run {clean_s:.1} s -> {clean_cid}");

    // The chaos run, with its events as timestamped JSON lines.
    let log = dir.join("chaos-run.err");
    let started = Instant::now();
    let mut job = run(&nodes, "chaos")
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(File::create(&log)?)
        .spawn()?;
    let (lines_tx, lines) = std::sync::mpsc::sync_channel::<(Instant, String)>(4096);
    let stdout = job.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut events: Vec<(Instant, serde_json::Value)> = Vec::new();
    // Faults: when, which daemon, what.
    let mut faults: Vec<(Instant, usize, &str)> = Vec::new();
    let (mut kills, mut next_kill) = (0, started + Duration::from_secs_f64(args.kill_every));
    let mut freeze_at = Some(started + Duration::from_millis(1500));
    let deadline = started + Duration::from_secs(900);
    let status = loop {
        events.extend(lines.try_iter().map(|(t, l)| (t, json_line(&l))));
        if let Some(status) = job.try_wait()? {
            break status;
        }
        let now = Instant::now();
        if now > deadline {
            let _ = job.kill();
            bail!(
                "the chaos run did not finish in 15 minutes (log: {})",
                log.display()
            );
        }
        let down = nodes.iter().filter(|n| n.down()).count();
        if freeze_at.is_some_and(|t| now >= t) && down < args.max_down {
            let up: Vec<usize> = (0..nodes.len()).filter(|&i| !nodes[i].down()).collect();
            let victim = up[rng.below(up.len())];
            signal("STOP", &nodes[victim].pid().expect("running"))?;
            nodes[victim].frozen_until = Some(now + Duration::from_secs_f64(args.stop_secs));
            faults.push((now, victim, "freeze"));
            eprintln!(
                "chaos: {:5.1}s froze d{victim}",
                started.elapsed().as_secs_f64()
            );
            freeze_at = None;
        } else if now >= next_kill {
            next_kill = now + Duration::from_secs_f64(args.kill_every);
            if down < args.max_down {
                let up: Vec<usize> = (0..nodes.len()).filter(|&i| !nodes[i].down()).collect();
                let victim = up[rng.below(up.len())];
                let mut child = nodes[victim].child.take().expect("running");
                let killed = child.kill(); // SIGKILL
                child.wait()?;
                killed?;
                kills += 1;
                faults.push((now, victim, "kill"));
                let back = 2.0 + rng.below(30) as f64 / 10.0;
                nodes[victim].restart_at = Some(now + Duration::from_secs_f64(back));
                eprintln!(
                    "chaos: {:5.1}s killed d{victim} (back in {back:.1}s)",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        for i in 0..nodes.len() {
            if nodes[i].frozen_until.is_some_and(|t| now >= t) {
                signal("CONT", &nodes[i].pid().expect("running"))?;
                nodes[i].frozen_until = None;
                eprintln!(
                    "chaos: {:5.1}s thawed d{i}",
                    started.elapsed().as_secs_f64()
                );
            }
            if nodes[i].restart_at.is_some_and(|t| now >= t) {
                let peers: Vec<String> = nodes
                    .iter()
                    .enumerate()
                    .filter(|(j, n)| *j != i && n.child.is_some())
                    .map(|(_, n)| n.addr.clone())
                    .collect();
                start(&bin, &mut nodes[i], &peers, args.grace_secs)?;
                nodes[i].restart_at = None;
                eprintln!(
                    "chaos: {:5.1}s restarted d{i}",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let chaos_s = started.elapsed().as_secs_f64();
    reader.join().expect("reader thread");
    events.extend(lines.try_iter().map(|(t, l)| (t, json_line(&l))));
    if !status.success() {
        bail!(
            "the chaos run failed: {}",
            fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .last()
                .unwrap_or("?")
        );
    }
    let chaos_cid = events
        .iter()
        .find(|(_, e)| e["event"] == "completed")
        .and_then(|(_, e)| e["output"].as_str())
        .context("no completed event with the output CID")?
        .to_owned();
    let handovers = fs::read_to_string(&log)?.matches("handing it over").count();
    // Map tasks cut in two for free slots, faults or not (each coordinator's own events).
    let cuts = events.iter().filter(|(_, e)| e["event"] == "split").count();
    println!("| run | s | output |");
    println!("|---|---:|---|");
    println!("| fault-free | {clean_s:.1} | {clean_cid} |");
    println!(
        "| chaos ({kills} kills, 1 freeze of {:.0} s, {handovers} coordinator handovers, {cuts} map tasks cut) | {chaos_s:.1} | {chaos_cid} |",
        args.stop_secs
    );
    println!("chaos / fault-free time: {:.2}", chaos_s / clean_s);
    report_detection(&nodes, &faults, &events);
    if chaos_cid != clean_cid {
        bail!("the chaos run's output {chaos_cid} differs from the fault-free {clean_cid}");
    }
    if kills == 0 {
        bail!("the job ended before any daemon was killed: nothing was tested");
    }
    println!("chaos: same output as the fault-free run");
    restore(&bin, &args, &mut nodes, &cid)
}

fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or(serde_json::Value::Null)
}

/// Prints, per kind of fault, how long the coordinator took to give up on the daemon: from
/// the fault to the first `task_failed` event naming it (faults that hit a daemon running none
/// of the job's tasks need no detecting and are not counted).
fn report_detection(
    nodes: &[Node],
    faults: &[(Instant, usize, &str)],
    events: &[(Instant, serde_json::Value)],
) {
    for kind in ["kill", "freeze"] {
        let mut delays: Vec<f64> = faults
            .iter()
            .filter(|(_, _, k)| *k == kind)
            .filter_map(|&(at, node, _)| {
                events
                    .iter()
                    .find(|(t, e)| {
                        *t >= at
                            && e["event"] == "task_failed"
                            && e["peer"] == nodes[node].peer.as_str()
                    })
                    .map(|(t, _)| t.duration_since(at).as_secs_f64())
                    // A failure long after the fault is about something else.
                    .filter(|d| *d < 15.0)
            })
            .collect();
        delays.sort_by(f64::total_cmp);
        match (delays.first(), delays.last()) {
            (Some(_), Some(max)) => println!(
                "time to detect a dead worker after a {kind}: median {:.2} s, max {max:.2} s ({} of {} faults hit a running task)",
                delays[delays.len() / 2],
                delays.len(),
                faults.iter().filter(|(_, _, k)| *k == kind).count()
            ),
            _ => println!("time to detect a dead worker after a {kind}: no {kind} hit a running task"),
        }
    }
}

/// Brings every daemon back, checks no block of `cid` is lost, then kills one for good and
/// measures how long the rest take to restore every block to `args.replicas` copies.
fn restore(bin: &Path, args: &ChaosArgs, nodes: &mut [Node], cid: &str) -> Result<()> {
    for i in 0..nodes.len() {
        if nodes[i].frozen_until.take().is_some() {
            signal("CONT", &nodes[i].pid().expect("running"))?;
        }
        if nodes[i].restart_at.take().is_some() {
            let peers: Vec<String> = nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| n.addr.clone())
                .collect();
            start(bin, &mut nodes[i], &peers, args.grace_secs)?;
        }
    }
    let rt = tokio::runtime::Runtime::new()?;
    let want = args.replicas;
    let copies = |nodes: &[Node]| -> Result<Vec<u64>> {
        let addrs: Vec<libp2p::Multiaddr> = nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.addr.parse())
            .collect::<Result<_, _>>()?;
        let live = addrs.len();
        let cid: p2pmr_protocol::Cid = cid.parse()?;
        rt.block_on(async {
            let node = p2pmr_node::Node::builder()
                .peers(addrs)
                .mdns(false)
                .discovery(Duration::from_secs(5))
                .build();
            node.peers().wait_for(live).await?;
            let stat = node.blocks().stat(cid).await;
            node.shutdown().await;
            Ok(stat?.replicas)
        })
    };
    let short = |replicas: &[u64]| replicas.iter().take(want).sum::<u64>();
    // Every daemon is back: nothing may be missing (restarted daemons serve their stores).
    let replicas = copies(nodes)?;
    if replicas.first().copied().unwrap_or(0) > 0 {
        bail!(
            "{} block(s) of the corpus are lost: {replicas:?}",
            replicas[0]
        );
    }
    println!("chaos: no block lost (blocks by number of copies: {replicas:?})");

    // One daemon lost for good.
    let victim = nodes.len() - 1;
    let mut child = nodes[victim].child.take().expect("running");
    let killed = child.kill(); // SIGKILL
    child.wait()?;
    killed?;
    let killed = Instant::now();
    let limit = Duration::from_secs_f64(args.grace_secs + args.restore_limit_secs);
    loop {
        let replicas = copies(nodes)?;
        if replicas.first().copied().unwrap_or(0) > 0 {
            bail!("{} block(s) lost after a daemon died for good", replicas[0]);
        }
        if short(&replicas) == 0 {
            let took = killed.elapsed().as_secs_f64();
            println!(
                "time to restore {want} copies of every block after losing a daemon for good: {took:.1} s (grace period {:.0} s + {:.1} s copying) of the {} MiB corpus",
                args.grace_secs,
                took - args.grace_secs,
                args.mib
            );
            return Ok(());
        }
        if killed.elapsed() > limit {
            bail!("replication not restored within {limit:?}: blocks by copies {replicas:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn last_line(out: &[u8]) -> Result<String> {
    String::from_utf8_lossy(out)
        .lines()
        .last()
        .map(str::to_owned)
        .context("no output CID printed")
}
