//! The `p2pmr` command: parses arguments, calls the `p2pmr_node` library, and maps every error
//! to one line on stderr and a non-zero exit code (2 for usage errors, 1 for everything else).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use p2pmr_node::client;
use p2pmr_node::daemon::{Daemon, DaemonConfig};
use p2pmr_node::demo::{self, DemoConfig};
use p2pmr_node::jobs::{Executor, Limits};
use p2pmr_node::local::{self, LocalJob};
use p2pmr_node::progress::{Mode, Progress};
use p2pmr_node::remote::{self, ClientConfig, ClientPeer, Fetcher};
use p2pmr_node::{files, shipped, FileError, Repo};
use p2pmr_protocol::engine::{Event, JobState};
use p2pmr_protocol::job::{JobInput, JobSpec, TaskLimits, AUTO_SPLIT};
use p2pmr_protocol::unixfs::Layout;
use p2pmr_protocol::Cid;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// p2pmr: a peer-to-peer, content-addressed MapReduce network.
///
/// Files are split into kubo-compatible blocks addressed by CID and kept in a repository
/// directory (--home, else $P2PMR_HOME, else ~/.p2pmr).
#[derive(Debug, Parser)]
#[command(name = "p2pmr", version, max_term_width = 100)]
struct Cli {
    /// Repository directory holding this peer's blocks [default: $P2PMR_HOME, else ~/.p2pmr]
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,

    #[command(flatten)]
    net: NetArgs,

    #[command(subcommand)]
    command: Command,
}

/// How this peer finds others (used by daemon, add, cat, stat and peers).
#[derive(Debug, clap::Args)]
struct NetArgs {
    /// A peer to dial, e.g. /ip4/10.0.0.2/tcp/4001/p2p/12D3Koo... (repeatable; also
    /// $P2PMR_PEERS, separated by commas or spaces)
    #[arg(long = "peer", global = true, value_name = "MULTIADDR")]
    peers: Vec<Multiaddr>,
    /// Do not discover peers on the LAN with mDNS
    #[arg(long, global = true)]
    no_mdns: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add a file: split it into blocks, store them, print its CID.
    ///
    /// The CID is the one `ipfs add --cid-version=1` prints for the same bytes (256 KiB chunks,
    /// raw leaves, sha2-256, balanced DAG). It is printed only once every block is on disk.
    ///
    /// By default the blocks go to --replicas daemons found on the LAN or given with --peer,
    /// and the CID is printed only when every block is durably stored on that many daemons.
    Add {
        /// Only compute and print the CID; store nothing, contact no one (as kubo's `add -n`)
        #[arg(short = 'n', long, conflicts_with_all = ["local", "replicas"])]
        only_hash: bool,
        /// Store the blocks in the local repository only, without the network
        #[arg(long)]
        local: bool,
        /// Distinct daemons that must each hold every block
        #[arg(long, default_value_t = 2, value_name = "N",
              value_parser = clap::value_parser!(u16).range(1..))]
        replicas: u16,
        /// The file to add; `-` reads standard input
        file: PathBuf,
    },
    /// Write the bytes of the file CID to standard output, verifying every block.
    ///
    /// Blocks come from the local repository when it has them, else from the daemons that
    /// hold them (found as for add).
    Cat {
        /// Start at this byte offset
        #[arg(long, default_value_t = 0, value_name = "BYTES")]
        offset: u64,
        /// The file's CID (as printed by `add`)
        cid: String,
    },
    /// Show a file's size, block count and which daemons hold how many of its blocks.
    Stat {
        /// The file's CID
        cid: String,
    },
    /// List the daemons this client can reach.
    Peers,
    /// Run a daemon: hold blocks in the repository and serve them to the network.
    ///
    /// Prints `peer id: ID` and one `listening on ADDR` line per address on stdout, then logs
    /// on stderr (RUST_LOG is respected). Stops cleanly on SIGINT or SIGTERM.
    Daemon {
        /// Address to listen on (repeatable) [default: all interfaces, TCP and QUIC, port
        /// 4001 or the next free one]
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<Multiaddr>,
        /// Tasks to run at once [default: the number of cores; at most 128]. Coordinators
        /// share a machine's slots out among the daemons running on it
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=128))]
        slots: Option<u32>,
        /// When coordinating, give up on a worker that does not answer a probe within this
        /// many seconds (it is stalled or cut off): its tasks run elsewhere
        #[arg(long, default_value_t = 3.0, value_name = "SECS",
              value_parser = parse_secs)]
        liveness_secs: f64,
        /// Copy this daemon's blocks to other daemons when a daemon holding copies of them
        /// has been gone this many seconds, so each block is back to its replica count
        #[arg(long, default_value_t = 60.0, value_name = "SECS", value_parser = parse_secs)]
        grace_secs: f64,
    },
    /// Run a job on the network: hand it to a coordinating daemon and watch it.
    ///
    /// Shows live progress on stderr and prints the output CID (a directory of part-00000,
    /// ...) as the last line on stdout. The job goes on if this command is stopped; `p2pmr
    /// watch JOBID` follows it again. Exit status 0 only if the job succeeded.
    Run {
        /// A shipped job (wordcount, grep, indexer), a .wasm file (published first), or the
        /// CID of a published module
        #[arg(long, value_name = "JOB")]
        job: String,
        /// Input file CID (repeatable); NAME=CID names it for the job
        #[arg(long = "input", value_name = "CID", required = true)]
        inputs: Vec<String>,
        /// Number of reduce partitions
        #[arg(long, default_value_t = 1, value_name = "R",
              value_parser = clap::value_parser!(u32).range(1..=10_000))]
        reducers: u32,
        /// A job argument (repeatable), e.g. --arg pattern=foo
        #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_arg)]
        args: Vec<(String, String)>,
        /// Map split size [default: the total input over the daemons' task slots, from 4 to
        /// 128 MiB]
        #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
        split_mib: Option<u64>,
        /// Memory limit per task
        #[arg(long, default_value_t = 512, value_name = "MIB")]
        memory_mib: u64,
        /// Time limit per task
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout_secs: u64,
        /// Leave out input records that make a map task fail twice (trap, time or memory
        /// limit), up to MAX of them, instead of failing the job; the count of skipped
        /// records is reported
        #[arg(long, value_name = "MAX", num_args = 0..=1, default_missing_value = "100",
              value_parser = clap::value_parser!(u32)
                  .range(1..=i64::from(p2pmr_protocol::job::MAX_SKIPPED_RECORDS)))]
        skip_bad_records: Option<u32>,
        /// Print one JSON event per line on stdout instead of progress bars
        #[arg(long)]
        json: bool,
        /// Print the job id once the job is accepted, and exit
        #[arg(long)]
        detach: bool,
        /// The daemon to coordinate the job [default: the one the job id ranks first]
        #[arg(long, value_name = "PEERID")]
        coordinator: Option<libp2p::PeerId>,
    },
    /// Follow a job's progress (from its first event) until it ends.
    Watch {
        /// Print one JSON event per line
        #[arg(long)]
        json: bool,
        /// The job's coordinator [default: the one the job id ranks first]
        #[arg(long, value_name = "PEERID")]
        coordinator: Option<libp2p::PeerId>,
        /// The job id
        job: String,
    },
    /// List the jobs of every reachable daemon.
    Jobs,
    /// Stop a job everywhere.
    Cancel {
        /// The job's coordinator [default: the one the job id ranks first]
        #[arg(long, value_name = "PEERID")]
        coordinator: Option<libp2p::PeerId>,
        /// The job id
        job: String,
    },
    /// Write a file or directory (e.g. a job's output) to PATH.
    Get {
        /// Where to write it (must not exist)
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
        /// The CID
        cid: String,
    },
    /// See p2pmr work: 3 daemons on 127.0.0.1, a corpus, wordcount, the top 10 words.
    ///
    /// Everything runs in this process with temporary repositories; the output is copied into
    /// your repository so `p2pmr cat` can show it afterwards.
    Demo {
        /// Count the words of this file instead of a generated corpus
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Size of the generated corpus
        #[arg(long, default_value_t = 48, value_name = "MIB",
              value_parser = clap::value_parser!(u64).range(1..=65536))]
        size: u64,
        /// Number of reduce partitions
        #[arg(long, default_value_t = 2, value_name = "R",
              value_parser = clap::value_parser!(u32).range(1..=10_000))]
        reducers: u32,
        /// Print one JSON event per line instead of progress bars
        #[arg(long)]
        json: bool,
    },
    /// Run a job in this process over local files, on all cores (what job authors test with).
    ///
    /// Output is `key<TAB>value` lines, partition after partition, each in key order.
    RunLocal {
        /// A shipped job (wordcount, grep, indexer), a .wasm file, or the CID of one in the
        /// local repository
        #[arg(long, value_name = "JOB")]
        job: String,
        /// Input files (repeatable; each is also the name map tasks see)
        #[arg(long = "input", value_name = "FILE", required = true)]
        inputs: Vec<PathBuf>,
        /// Number of reduce partitions
        #[arg(long, default_value_t = 1, value_name = "R",
              value_parser = clap::value_parser!(u32).range(1..=10_000))]
        reducers: u32,
        /// A job argument (repeatable), e.g. --arg pattern=foo
        #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_arg)]
        args: Vec<(String, String)>,
        /// Write one file per partition (part-00000, ...) into DIR instead of stdout
        #[arg(long, value_name = "DIR")]
        output: Option<PathBuf>,
        /// Memory limit per task
        #[arg(long, default_value_t = 512, value_name = "MIB")]
        memory_mib: u64,
        /// Time limit per task
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout_secs: u64,
        /// Most bytes a task may emit
        #[arg(long, default_value_t = 256, value_name = "MIB")]
        output_limit_mib: u64,
        /// Map split size
        #[arg(long, default_value_t = 64, value_name = "MIB",
              value_parser = clap::value_parser!(u64).range(1..))]
        split_mib: u64,
        /// Worker threads [default: the number of cores; at most 128]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=128))]
        threads: Option<u64>,
    },
    /// Inspect or check the local repository.
    #[command(subcommand)]
    Repo(RepoCommand),
}

fn parse_secs(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds from 0.1 to 3600")),
    }
}

fn parse_arg(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))?;
    if k.is_empty() || v.contains('\n') {
        return Err(format!("'{s}' is not KEY=VALUE (non-empty key, one line)"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Print the number of blocks and bytes stored.
    Stat,
    /// Read and verify every block; quarantine corrupt ones and report them.
    Verify,
}

// The daemon and the client move 256 KiB buffers through several tasks and threads; glibc's
// malloc serves those with mmap/munmap and page faults (a third of a transfer's system time,
// measured with perf), mimalloc keeps them in reusable pages. Built with `no_thp`: on its own,
// mimalloc asks for transparent huge pages for its arenas, and memory it holds for reuse then
// counts in 2 MiB pages (a daemon's peak RSS over the 1 GiB job: 263-275 MiB, 197-219 without).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Environment variable listing peers to dial, as `--peer` does.
const PEERS_ENV: &str = "P2PMR_PEERS";

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{} (see --help)", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let client = client_config(&cli.net)?;
    match cli.command {
        Command::Add {
            only_hash,
            local,
            replicas,
            file,
        } => {
            let source = open_input(&file)?;
            let added = if only_hash {
                files::import(source, None, Layout::KUBO)?
            } else if local {
                open_repo(cli.home)?.add(source)?
            } else {
                runtime()?.block_on(async {
                    let peer = ClientPeer::connect(client, replicas.into()).await?;
                    let added = remote::add(peer.net(), source, replicas.into()).await;
                    peer.close().await;
                    added
                })?
            };
            println!("{}", added.root);
        }
        Command::Cat { offset, cid } => {
            let cid = parse_cid(&cid)?;
            let local = existing_repo(cli.home)?;
            let mut out = io::stdout().lock();
            runtime()?.block_on(async {
                let fetcher = Fetcher::lazy(local.map(|r| r.blocks().clone()), client);
                if offset == 0 {
                    // Files and directories (a job's output: its parts in order).
                    let mut sink = |bytes: &[u8]| out.write_all(bytes);
                    fetcher.cat_tree(cid, &mut sink).await
                } else {
                    fetcher.cat(cid, offset, |bytes| out.write_all(bytes)).await
                }
            })?;
            out.flush().map_err(FileError::Output)?;
        }
        Command::Get { output, cid } => {
            let cid = parse_cid(&cid)?;
            if output.exists() {
                bail!("{} exists; get does not overwrite", output.display());
            }
            let local = existing_repo(cli.home)?;
            runtime()?.block_on(async {
                let fetcher = Fetcher::lazy(local.map(|r| r.blocks().clone()), client);
                fetcher.get(cid, &output).await
            })?;
        }
        Command::Run {
            job,
            inputs,
            reducers,
            args,
            split_mib,
            memory_mib,
            timeout_secs,
            skip_bad_records,
            json,
            detach,
            coordinator,
        } => {
            let inputs = inputs
                .iter()
                .map(|i| {
                    let (name, cid) = match i.split_once('=') {
                        Some((name, cid)) => (name.to_owned(), parse_cid(cid)?),
                        None => (i.trim().to_owned(), parse_cid(i)?),
                    };
                    Ok(JobInput { name, cid })
                })
                .collect::<Result<Vec<_>>>()?;
            let home = cli.home;
            runtime()?.block_on(async {
                let peer = ClientPeer::connect(client, 1).await?;
                let net = peer.net();
                let module = match Cid::try_from(job.as_str()) {
                    Ok(cid) => cid,
                    Err(_) => {
                        let (_, wasm) = resolve_job(&job, home)?;
                        client::publish_module(net, wasm, usize::MAX).await?
                    }
                };
                let spec = JobSpec::new(module, inputs, reducers, args)?
                    .with_split_size(split_mib.map_or(AUTO_SPLIT, |m| m << 20))
                    .with_limits(TaskLimits {
                        memory: memory_mib << 20,
                        timeout_ms: timeout_secs.saturating_mul(1000),
                        ..TaskLimits::default()
                    })
                    .with_skip_bad_records(skip_bad_records.unwrap_or(0));
                let coordinator = client::coordinator_for(net, &spec.id(), coordinator)?;
                // The spec goes on the network too: whoever watches the job can hand it to
                // another coordinator if this one dies.
                client::publish_spec(net, &spec, usize::MAX).await?;
                let job = client::submit(net, coordinator, &spec).await?;
                if detach {
                    println!("{job}");
                    peer.close().await;
                    return Ok(());
                }
                let result = follow(net, coordinator, job, Some(spec), json).await;
                peer.close().await;
                result
            })?;
        }
        Command::Watch {
            json,
            coordinator,
            job,
        } => {
            let job = parse_cid(&job)?;
            runtime()?.block_on(async {
                let peer = ClientPeer::connect(client, 1).await?;
                let coordinator = client::locate(peer.net(), &job, coordinator).await?;
                let result = follow(peer.net(), coordinator, job, None, json).await;
                peer.close().await;
                result
            })?;
        }
        Command::Jobs => {
            let listed = runtime()?.block_on(async {
                let peer = ClientPeer::connect(client, usize::MAX).await?;
                let listed = client::list(peer.net()).await;
                peer.close().await;
                Ok::<_, anyhow::Error>(listed)
            })?;
            for (peer, jobs) in listed {
                match jobs {
                    Err(e) => eprintln!("{peer}: {e}"),
                    Ok(jobs) => {
                        for j in jobs {
                            let state = match &j.state {
                                JobState::Running => "running".to_string(),
                                JobState::Succeeded { output } => format!("succeeded {output}"),
                                JobState::Failed(reason) => format!("failed: {reason}"),
                                JobState::Cancelled => "cancelled".to_string(),
                            };
                            println!(
                                "{} maps {}/{} reduces {}/{} {:.1}s in={}B out={}lines {state} (coordinator {peer})",
                                j.job,
                                j.maps.0,
                                j.maps.1,
                                j.reduces.0,
                                j.reduces.1,
                                j.elapsed_ms as f64 / 1e3,
                                j.counters.input_bytes,
                                j.counters.reduce_output_records,
                            );
                        }
                    }
                }
            }
        }
        Command::Cancel { coordinator, job } => {
            let job = parse_cid(&job)?;
            runtime()?.block_on(async {
                let peer = ClientPeer::connect(client, 1).await?;
                let coordinator = client::locate(peer.net(), &job, coordinator).await?;
                let r = client::cancel(peer.net(), coordinator, job).await;
                peer.close().await;
                r
            })?;
            eprintln!("cancelled {job}");
        }
        Command::Demo {
            input,
            size,
            reducers,
            json,
        } => {
            let keep_in = open_repo(cli.home).ok().map(|r| r.blocks().clone());
            let kept = keep_in.is_some();
            let report = runtime()?.block_on(demo::run(DemoConfig {
                input,
                size: size << 20,
                reducers,
                mode: if json { Mode::Json } else { Mode::Human },
                keep_in,
            }))?;
            let mut out = io::stdout().lock();
            if !json {
                writeln!(
                    out,
                    "top 10 words of {} ({:.1} MB):",
                    report.input,
                    report.input_bytes as f64 / 1e6
                )?;
                for (i, (word, n)) in report.top.iter().enumerate() {
                    writeln!(out, "{:>3}. {word:<16} {n}", i + 1)?;
                }
                writeln!(
                    out,
                    "add took {:.2}s, the job {:.2}s ({:.0} MB/s).",
                    report.add_time.as_secs_f64(),
                    report.job_time.as_secs_f64(),
                    report.input_bytes as f64 / 1e6 / report.job_time.as_secs_f64()
                )?;
                if kept {
                    writeln!(
                        out,
                        "the output was copied into your repository; see it all with:"
                    )?;
                    writeln!(out, "  p2pmr cat {}", report.output)?;
                }
                writeln!(out, "output CID:")?;
            }
            writeln!(out, "{}", report.output)?;
        }
        Command::Stat { cid } => {
            let cid = parse_cid(&cid)?;
            let stat = runtime()?.block_on(async {
                let fetcher = Fetcher::lazy(None, client);
                remote::stat(&fetcher, cid).await
            })?;
            println!("cid:     {cid}");
            println!("size:    {} bytes", stat.size);
            println!("blocks:  {}", stat.blocks);
            for (copies, n) in stat.replicas.iter().enumerate().filter(|(_, n)| **n > 0) {
                println!("copies:  {n} blocks on {copies} daemon(s)");
            }
            for (peer, n) in &stat.holders {
                println!("holder:  {peer} {n} blocks");
            }
        }
        Command::Peers => {
            let daemons = runtime()?.block_on(async {
                let peer = ClientPeer::connect(client, usize::MAX).await?;
                let daemons = peer.daemons();
                peer.close().await;
                Ok::<_, anyhow::Error>(daemons)
            })?;
            for (id, info) in daemons {
                let addrs: Vec<String> = info.addrs.iter().map(ToString::to_string).collect();
                println!("{id} {} {}", info.agent, addrs.join(" "));
            }
        }
        Command::Daemon {
            listen,
            slots,
            liveness_secs,
            grace_secs,
        } => {
            let home = home_dir(cli.home)?;
            runtime()?.block_on(async {
                let daemon = Daemon::start(
                    &home,
                    DaemonConfig {
                        listen,
                        bootstrap: cli.net.peers.clone(),
                        mdns: !cli.net.no_mdns,
                        slots: slots.unwrap_or(0),
                        liveness: std::time::Duration::from_secs_f64(liveness_secs),
                        grace: std::time::Duration::from_secs_f64(grace_secs),
                    },
                )
                .await
                .with_context(|| format!("cannot start the daemon in {}", home.display()))?;
                let mut out = io::stdout().lock();
                writeln!(out, "peer id: {}", daemon.peer_id())?;
                for addr in daemon.listen_addrs() {
                    writeln!(out, "listening on {addr}")?;
                }
                out.flush()?;
                drop(out);
                daemon.run_until(shutdown_signal()).await?;
                tracing::info!("stopped");
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Command::RunLocal {
            job,
            inputs,
            reducers,
            args,
            output,
            memory_mib,
            timeout_secs,
            output_limit_mib,
            split_mib,
            threads,
        } => {
            let (name, wasm) = resolve_job(&job, cli.home)?;
            // Locally the user is the daemon: the CLI limits are the only ceiling.
            let exec = Executor::new(Limits {
                memory: usize::MAX,
                timeout: std::time::Duration::MAX,
                output: u64::MAX,
            })?;
            let cid = files::import(&wasm[..], None, Layout::KUBO)?.root;
            let module = exec.load(cid, &name, &wasm)?;
            let mut spec = LocalJob {
                args: p2pmr_protocol::abi::encode_args(
                    args.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ),
                reducers,
                limits: Limits {
                    memory: usize::try_from(memory_mib << 20).unwrap_or(usize::MAX),
                    timeout: std::time::Duration::from_secs(timeout_secs),
                    output: output_limit_mib << 20,
                },
                split: split_mib << 20,
                ..LocalJob::default()
            };
            if let Some(t) = threads {
                spec.threads = t as usize;
            }
            for input in &inputs {
                if input.is_dir() {
                    bail!("{} is a directory; --input takes files", input.display());
                }
            }
            // Partitions are written to files as they are reduced (in DIR, or in a temporary
            // directory whose files are then copied to stdout in order): never all in memory.
            let scratch;
            let dir = match &output {
                Some(dir) => {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    dir.clone()
                }
                None => {
                    scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
                    scratch.path().to_owned()
                }
            };
            let part = |r: u32| dir.join(format!("part-{r:05}"));
            let counters = local::run(&exec, &module, &spec, &inputs, |r| {
                File::create(part(r)).map(io::BufWriter::new)
            })?;
            tracing::info!("{counters:?}");
            if output.is_none() {
                let mut out = io::stdout().lock();
                for r in 0..reducers {
                    let mut f = File::open(part(r)).context("cannot reopen output")?;
                    io::copy(&mut f, &mut out).map_err(FileError::Output)?;
                }
                out.flush().map_err(FileError::Output)?;
            }
        }
        Command::Repo(RepoCommand::Stat) => {
            let repo = open_repo(cli.home)?;
            let stats = repo.blocks().stats()?;
            println!("repo:   {}", repo.home().display());
            println!("blocks: {}", stats.blocks);
            println!("bytes:  {}", stats.bytes);
        }
        Command::Repo(RepoCommand::Verify) => {
            let repo = open_repo(cli.home)?;
            let (mut good, mut bad) = (0u64, 0u64);
            for cid in repo.blocks().list() {
                match repo.blocks().get(&cid?) {
                    Ok(_) => good += 1,
                    Err(e @ p2pmr_node::StoreError::Corrupt { .. }) => {
                        eprintln!("{e}");
                        bad += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            println!("{good} blocks verified, {bad} corrupt");
            if bad > 0 {
                bail!("{bad} corrupt blocks were quarantined");
            }
        }
    }
    Ok(())
}

/// Shows a job's events until it ends; prints the output CID on success.
async fn follow(
    net: &p2pmr_node::net::NetClient,
    coordinator: libp2p::PeerId,
    job: Cid,
    spec: Option<JobSpec>,
    json: bool,
) -> Result<()> {
    let mut progress = Progress::new(if json { Mode::Json } else { Mode::Human });
    let last = client::follow(net, coordinator, job, spec, |e| progress.event(e)).await?;
    match last {
        Event::Completed { output, .. } => {
            if !json {
                println!("{output}");
            }
            Ok(())
        }
        Event::Failed { reason } => bail!("job {job} failed: {reason}"),
        Event::Cancelled => bail!("job {job} was cancelled"),
        other => bail!("job {job} ended with {other:?}"),
    }
}

/// A job by shipped name, .wasm path, or CID in the local repository: `(name, module bytes)`.
fn resolve_job(job: &str, home: Option<PathBuf>) -> Result<(String, Vec<u8>)> {
    if let Some(wasm) = shipped::by_name(job) {
        return Ok((job.to_owned(), wasm.to_vec()));
    }
    let path = Path::new(job);
    if path.is_file() {
        let wasm = std::fs::read(path).with_context(|| format!("cannot read {job}"))?;
        return Ok((job.to_owned(), wasm));
    }
    if let Ok(cid) = Cid::try_from(job) {
        if let Some(repo) = existing_repo(home)? {
            let mut wasm = Vec::new();
            repo.cat(cid, 0, |b| {
                wasm.extend_from_slice(b);
                Ok(())
            })?;
            return Ok((job.to_owned(), wasm));
        }
        bail!("job {job} is not in the local repository");
    }
    let names: Vec<&str> = shipped::JOBS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != "hostile")
        .collect();
    bail!(
        "no job '{job}': not a shipped job ({}), a .wasm file or a CID",
        names.join(", ")
    )
}

fn home_dir(home: Option<PathBuf>) -> Result<PathBuf> {
    home.or_else(|| {
        std::env::var_os(p2pmr_node::HOME_ENV)
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
    })
    .or_else(p2pmr_node::default_home)
    .context("no repository: pass --home DIR or set P2PMR_HOME (HOME is not set)")
}

fn open_repo(home: Option<PathBuf>) -> Result<Repo> {
    let home = home_dir(home)?;
    Repo::open(&home).with_context(|| format!("cannot open repository {}", home.display()))
}

/// The repository if one exists; client commands never create one.
fn existing_repo(home: Option<PathBuf>) -> Result<Option<Repo>> {
    let Ok(home) = home_dir(home) else {
        return Ok(None);
    };
    if !home.join("blocks").is_dir() {
        return Ok(None);
    }
    Repo::open(&home)
        .map(Some)
        .with_context(|| format!("cannot open repository {}", home.display()))
}

fn client_config(net: &NetArgs) -> Result<ClientConfig> {
    let mut peers = net.peers.clone();
    if let Some(env) = std::env::var_os(PEERS_ENV) {
        let env = env.to_string_lossy();
        for addr in env.split([',', ' ']).filter(|a| !a.is_empty()) {
            peers.push(
                addr.parse().map_err(|e| {
                    anyhow::anyhow!("{PEERS_ENV}: '{addr}' is not a multiaddr ({e})")
                })?,
            );
        }
    }
    Ok(ClientConfig {
        peers,
        mdns: !net.no_mdns,
        discovery: remote::DISCOVERY,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        // Store calls run on the blocking pool; a few threads keep the disk busy, and every
        // extra thread keeps its own allocator pages (tokio's default allows 512).
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn open_input(path: &Path) -> Result<Box<dyn Read + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdin()));
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .is_dir()
    {
        bail!("{} is a directory; add takes a file", path.display());
    }
    Ok(Box::new(file))
}

fn parse_cid(s: &str) -> Result<Cid> {
    Cid::try_from(s.trim()).map_err(|e| anyhow::anyhow!("'{s}' is not a CID ({e})"))
}

/// Clap renders usage errors over several lines; keep the message, drop the usage block.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing() {
    // Kademlia warns "Failed to trigger bootstrap: No known peers" whenever a peer that knows
    // no other starts listening (every first daemon of a network): that is normal here, not
    // something to act on, so its warnings stay hidden unless RUST_LOG asks for them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .init();
}
