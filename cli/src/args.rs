//! The command line: every subcommand and flag, with the help text users see.

use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use p2pmr_node::MinFree;
use std::path::PathBuf;

/// p2pmr: a peer-to-peer, content-addressed MapReduce network.
///
/// Files are split into kubo-compatible blocks addressed by CID and kept in a repository
/// directory (--home, else $P2PMR_HOME, else ~/.p2pmr).
#[derive(Debug, Parser)]
#[command(name = "p2pmr", version, max_term_width = 100)]
pub(crate) struct Cli {
    /// Repository directory holding this peer's blocks [default: $P2PMR_HOME, else ~/.p2pmr]
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,

    #[command(flatten)]
    pub(crate) net: NetArgs,

    /// Show no progress bars (add, cat, get and dag show them on a terminal)
    #[arg(long, short, global = true)]
    pub(crate) quiet: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How this peer finds others (used by daemon, add, cat, stat and peers).
#[derive(Debug, clap::Args)]
pub(crate) struct NetArgs {
    /// A peer to dial, e.g. /ip4/10.0.0.2/tcp/4001/p2p/12D3Koo... (repeatable; also
    /// $P2PMR_PEERS, separated by commas or spaces)
    #[arg(long = "peer", global = true, value_name = "MULTIADDR")]
    pub(crate) peers: Vec<Multiaddr>,
    /// Do not discover peers on the LAN with mDNS
    #[arg(long, global = true)]
    pub(crate) no_mdns: bool,
    /// Most daemons to connect to as they are discovered; past it, the daemons each placement
    /// group needs are found with Kademlia lookups
    #[arg(long, global = true, value_name = "DAEMONS", default_value_t = p2pmr_node::DEFAULT_MESH as u16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) mesh: u16,
    /// A private swarm's key (kubo's swarm.key format): connect only to peers holding it
    /// [default: $P2PMR_SWARM_KEY, else <home>/swarm.key if it exists]
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) swarm_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Add a file: split it into blocks, store them, print its CID.
    ///
    /// The CID is the one `ipfs add --cid-version=1` prints for the same bytes (256 KiB chunks,
    /// raw leaves, sha2-256, balanced DAG). It is printed only once every block is on disk.
    ///
    /// By default the blocks go to --replicas daemons found on the LAN or given with --peer,
    /// and the CID is printed only when every block is durably stored on that many daemons.
    Add(AddArgs),
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
    Daemon(DaemonArgs),
    /// Run a job on the network: hand it to a coordinating daemon and watch it.
    ///
    /// Shows live progress on stderr and prints the output CID (a directory of part-00000,
    /// ...) as the last line on stdout. The job goes on if this command is stopped; `p2pmr
    /// watch JOBID` follows it again. Exit status 0 only if the job succeeded.
    Run(RunArgs),
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
    Demo(DemoArgs),
    /// Run a job in this process over local files, on all cores (what job authors test with).
    ///
    /// Output is `key<TAB>value` lines, partition after partition, each in key order.
    RunLocal(RunLocalArgs),
    /// Inspect or check the local repository.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Print this repository's peer id: the one its client commands connect with (what a
    /// daemon's --allow-jobs takes), or with --daemon the one its daemon runs as.
    ///
    /// The identity is created on first use in <home>/identity.key; the client's id is
    /// derived from it, so it is stable but never the daemon's own.
    Id {
        /// Print the daemon's peer id instead
        #[arg(long)]
        daemon: bool,
    },
    /// Make keys for private swarms.
    ///
    /// Every daemon and client of a private swarm holds the same key (`--swarm-key FILE`,
    /// $P2PMR_SWARM_KEY or <home>/swarm.key, as kubo reads it); peers without it cannot
    /// connect. A private swarm runs over TCP only. $P2PMR_FORCE_PNET=1 refuses to run
    /// without a key.
    #[command(subcommand)]
    SwarmKey(SwarmKeyCommand),
    /// Move DAGs in and out as CAR files (kubo's `dag export` / `dag import`).
    #[command(subcommand)]
    Dag(DagCommand),
    /// Keep DAGs on the daemons, fetched from wherever they are (kubo's `pin`).
    #[command(subcommand)]
    Pin(PinCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum PinCommand {
    /// Have the daemons fetch the DAG under CID and keep it on --replicas of them.
    ///
    /// A daemon fetches every block, verifying each, from the daemons or, for data only IPFS
    /// nodes hold, from the IPFS peers it is connected to over Bitswap (give a daemon an IPFS
    /// node's address with --peer); then it keeps one copy and places the others by group,
    /// as add does. Shows the blocks and bytes fetched; prints the CID when it is stored.
    Add {
        /// Distinct daemons that must each hold every block
        #[arg(long, default_value_t = 2, value_name = "N",
              value_parser = clap::value_parser!(u16).range(1..))]
        replicas: u16,
        /// The daemon that fetches [default: the one the CID ranks first]
        #[arg(long, value_name = "PEERID")]
        daemon: Option<libp2p::PeerId>,
        /// Print one JSON event per line
        #[arg(long)]
        json: bool,
        /// The DAG's root CID
        cid: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DagCommand {
    /// Write the DAG under CID to standard output as a CARv1 file.
    Export {
        /// The root CID
        cid: String,
    },
    /// Read a CAR file (v1 or v2), verify every block and store them; print the roots.
    ///
    /// Nothing is stored unless every block is intact and the DAG under every root is
    /// complete. By default the blocks go to --replicas daemons, as with add.
    Import(ImportArgs),
}

fn parse_secs(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds from 0.1 to 3600")),
    }
}

/// A garbage-collection grace period: from 0 (collect at once) to 30 days.
fn parse_gc_secs(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=2_592_000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds from 0 to 2592000 (30 days)"
        )),
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
pub(crate) enum RepoCommand {
    /// Print the number of blocks and bytes stored.
    Stat,
    /// Read and verify every block; quarantine corrupt ones and report them.
    Verify,
    /// Delete the blocks clients pushed here for adds that never completed (interrupted or
    /// refused), once nothing has been added to them for the grace period. A running daemon
    /// does this by itself; stop it first to run it by hand.
    Gc {
        /// How long an add may go without a block or a commit before its blocks go
        #[arg(long, default_value_t = 3600.0, value_name = "SECS", value_parser = parse_gc_secs)]
        grace_secs: f64,
    },
}

/// `p2pmr swarm-key ...`
#[derive(Debug, Subcommand)]
pub(crate) enum SwarmKeyCommand {
    /// Write a new random key to FILE (never overwriting one) and print its fingerprint.
    New {
        /// Where to write the key, e.g. <home>/swarm.key
        file: PathBuf,
    },
}

/// The arguments of `p2pmr add`.
#[derive(Debug, clap::Args)]
pub(crate) struct AddArgs {
    /// How the file is cut into leaves, as kubo's --chunker: size-N (N bytes each, up to
    /// 2 MiB) or buzhash (content-defined, 128-512 KiB: an insertion moves the boundaries
    /// around it only, so an edited file shares the rest of its blocks, and jobs their work)
    #[arg(long, default_value = "size-262144", value_name = "CHUNKER")]
    pub(crate) chunker: p2pmr_protocol::chunker::Chunker,
    /// Only compute and print the CID; store nothing, contact no one (as kubo's `add -n`)
    #[arg(short = 'n', long, conflicts_with_all = ["local", "replicas"])]
    pub(crate) only_hash: bool,
    /// Store the blocks in the local repository only, without the network
    #[arg(long)]
    pub(crate) local: bool,
    /// Distinct daemons that must each hold every block
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) replicas: u16,
    /// The file to add; `-` reads standard input
    pub(crate) file: PathBuf,
}

/// The arguments of `p2pmr daemon`.
#[derive(Debug, clap::Args)]
pub(crate) struct DaemonArgs {
    /// Address to listen on (repeatable) [default: all interfaces, TCP and QUIC, port
    /// 4001 or the next free one]
    #[arg(long, value_name = "MULTIADDR")]
    pub(crate) listen: Vec<Multiaddr>,
    /// Tasks to run at once [default: the number of cores, shared with the other daemons
    /// on the machine that use the default; at most 128]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=128))]
    pub(crate) slots: Option<u32>,
    /// When coordinating, give up on a worker that does not answer a probe within this
    /// many seconds (it is stalled or cut off): its tasks run elsewhere
    #[arg(long, default_value_t = 3.0, value_name = "SECS",
          value_parser = parse_secs)]
    pub(crate) liveness_secs: f64,
    /// Copy this daemon's blocks to other daemons when a daemon holding copies of them
    /// has been gone this many seconds, so each block is back to its replica count
    #[arg(long, default_value_t = 60.0, value_name = "SECS", value_parser = parse_secs)]
    pub(crate) grace_secs: f64,
    /// Delete the blocks a client pushed here for an add that never completed once it has
    /// gone this many seconds without a block or a commit
    #[arg(long, default_value_t = 3600.0, value_name = "SECS", value_parser = parse_gc_secs)]
    pub(crate) gc_grace_secs: f64,
    /// Serve the HTTP API and gateway here (port 0: any free port), or `off` [default:
    /// 127.0.0.1:5001 or the next free port]
    #[arg(long, value_name = "ADDR:PORT|off", value_parser = parse_api)]
    pub(crate) api: Option<ApiArg>,
    /// A file holding the bearer token HTTP requests must carry (required when --api is not
    /// on loopback)
    #[arg(long, value_name = "FILE")]
    pub(crate) api_token_file: Option<PathBuf>,
    /// Only this peer (a peer id, or a file of them, one per line, `#` comments) may start and
    /// stop jobs here, besides the daemons of the swarm (repeatable) [default: anyone who
    /// reaches the daemon]. A user's peer id is what `p2pmr id` prints
    #[arg(long = "allow-jobs", value_name = "PEERID|FILE")]
    pub(crate) allow_jobs: Vec<String>,
    /// Bytes one client peer may store here, e.g. 16GiB (daemons replicating to each other
    /// are not counted)
    #[arg(long, value_name = "SIZE", default_value = "16GiB", value_parser = parse_size)]
    pub(crate) max_client_bytes: u64,
    /// Outputs of tasks run here to remember for later jobs that run the same task on the
    /// same bytes, by the bytes they name, e.g. 2GiB; the least recently used are forgotten
    /// first, and 0 remembers none
    #[arg(long, value_name = "SIZE", default_value = "2GiB", value_parser = parse_size)]
    pub(crate) memo_bytes: u64,
    /// Free space to keep on the repository's disk: a share (5%) or a size (20GiB); a write
    /// that would pass it is refused
    #[arg(long, value_name = "PCT%|SIZE", default_value = "5%", value_parser = parse_min_free)]
    pub(crate) min_free_disk: MinFree,
}

/// A size: a whole number of bytes, optionally with a unit (K, M, G, T: powers of 1024, with
/// or without `iB`/`B`).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512MiB, 16GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}': unknown unit (use K, M, G or T)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A number of MiB from 1 to the most that fits in bytes (so `<< 20` never wraps).
fn mib(s: &str) -> Result<u64, String> {
    const MAX: u64 = u64::MAX >> 20;
    match s.trim().parse::<u64>() {
        Ok(n @ 1..=MAX) => Ok(n),
        Ok(0) => Err("must be at least 1".into()),
        _ => Err(format!("must be a whole number of MiB from 1 to {MAX}")),
    }
}

/// `--min-free-disk`: a percentage (`5%`) or a size.
fn parse_min_free(s: &str) -> Result<MinFree, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => match p.trim().parse::<u8>() {
            Ok(p) if p <= 100 => Ok(MinFree::Percent(p)),
            _ => Err(format!("'{s}' is not a percentage from 0% to 100%")),
        },
        None => parse_size(s).map(MinFree::Bytes),
    }
}

/// Where `--api` says to serve HTTP.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ApiArg {
    Off,
    At(std::net::SocketAddr),
}

fn parse_api(s: &str) -> std::result::Result<ApiArg, String> {
    if s == "off" {
        return Ok(ApiArg::Off);
    }
    s.parse()
        .map(ApiArg::At)
        .map_err(|_| format!("'{s}' is not ADDR:PORT (e.g. 127.0.0.1:5001) or off"))
}

/// The arguments of `p2pmr run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// A shipped job (wordcount, grep, indexer), a .wasm file (published first), or the
    /// CID of a published module
    #[arg(long, value_name = "JOB")]
    pub(crate) job: String,
    /// Input file CID (repeatable); NAME=CID names it for the job
    #[arg(long = "input", value_name = "CID", required = true)]
    pub(crate) inputs: Vec<String>,
    /// Number of reduce partitions
    #[arg(long, default_value_t = 1, value_name = "R",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) reducers: u32,
    /// A job argument (repeatable), e.g. --arg pattern=foo
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_arg)]
    pub(crate) args: Vec<(String, String)>,
    /// Map split size [default: the total input over the daemons' task slots, from 4 to
    /// 128 MiB]
    #[arg(long, value_name = "MIB", value_parser = mib)]
    pub(crate) split_mib: Option<u64>,
    /// Memory limit per task
    #[arg(long, default_value_t = 512, value_name = "MIB", value_parser = mib)]
    pub(crate) memory_mib: u64,
    /// Time limit per task
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub(crate) timeout_secs: u64,
    /// Leave out input records that make a map task fail twice (trap, time or memory
    /// limit), up to MAX of them, instead of failing the job; the count of skipped
    /// records is reported
    #[arg(long, value_name = "MAX", num_args = 0..=1, default_missing_value = "100",
          value_parser = clap::value_parser!(u32)
              .range(1..=i64::from(p2pmr_protocol::job::MAX_SKIPPED_RECORDS)))]
    pub(crate) skip_bad_records: Option<u32>,
    /// Verified execution: run every map and reduce task on K distinct daemons and go on
    /// only with the output a majority of them produce; daemons whose output differs are
    /// named and left out of the rest of the job
    #[arg(long, value_name = "K",
          value_parser = clap::value_parser!(u32)
              .range(2..=i64::from(p2pmr_protocol::job::MAX_VERIFY)))]
    pub(crate) verify: Option<u32>,
    /// Run every task, reusing no output the daemons remember from earlier jobs (nor this
    /// job's previous result)
    #[arg(long)]
    pub(crate) no_memo: bool,
    /// Print one JSON event per line on stdout instead of progress bars
    #[arg(long)]
    pub(crate) json: bool,
    /// Print the job id once the job is accepted, and exit
    #[arg(long)]
    pub(crate) detach: bool,
    /// The daemon to coordinate the job [default: the one the job id ranks first]
    #[arg(long, value_name = "PEERID")]
    pub(crate) coordinator: Option<libp2p::PeerId>,
}

/// The arguments of `p2pmr demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Count the words of this file instead of a generated corpus
    #[arg(long, value_name = "FILE")]
    pub(crate) input: Option<PathBuf>,
    /// Size of the generated corpus
    #[arg(long, default_value_t = 48, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub(crate) size: u64,
    /// Number of reduce partitions
    #[arg(long, default_value_t = 2, value_name = "R",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) reducers: u32,
    /// Print one JSON event per line instead of progress bars
    #[arg(long)]
    pub(crate) json: bool,
}

/// The arguments of `p2pmr run-local`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunLocalArgs {
    /// A shipped job (wordcount, grep, indexer), a .wasm file, or the CID of one in the
    /// local repository
    #[arg(long, value_name = "JOB")]
    pub(crate) job: String,
    /// Input files (repeatable; each is also the name map tasks see)
    #[arg(long = "input", value_name = "FILE", required = true)]
    pub(crate) inputs: Vec<PathBuf>,
    /// Number of reduce partitions
    #[arg(long, default_value_t = 1, value_name = "R",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) reducers: u32,
    /// A job argument (repeatable), e.g. --arg pattern=foo
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_arg)]
    pub(crate) args: Vec<(String, String)>,
    /// Write one file per partition (part-00000, ...) into DIR instead of stdout
    #[arg(long, value_name = "DIR")]
    pub(crate) output: Option<PathBuf>,
    /// Memory limit per task
    #[arg(long, default_value_t = 512, value_name = "MIB", value_parser = mib)]
    pub(crate) memory_mib: u64,
    /// Time limit per task
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub(crate) timeout_secs: u64,
    /// Most bytes a task may emit (for a map task, with its sort index: what it holds in memory)
    #[arg(long, default_value_t = 256, value_name = "MIB", value_parser = mib)]
    pub(crate) output_limit_mib: u64,
    /// Map split size
    #[arg(long, default_value_t = 64, value_name = "MIB", value_parser = mib)]
    pub(crate) split_mib: u64,
    /// Worker threads [default: the number of cores; at most 128]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=128))]
    pub(crate) threads: Option<u64>,
}

/// The arguments of `p2pmr dag import`.
#[derive(Debug, clap::Args)]
pub(crate) struct ImportArgs {
    /// Store the blocks in the local repository only, without the network
    #[arg(long, conflicts_with = "replicas")]
    pub(crate) local: bool,
    /// Distinct daemons that must each hold every block
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) replicas: u16,
    /// The CAR file; `-` reads standard input
    pub(crate) file: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_free_space_floors() {
        for (given, want) in [
            ("0", Ok(0)),
            ("1024", Ok(1024)),
            ("1K", Ok(1 << 10)),
            ("512MiB", Ok(512 << 20)),
            ("16GiB", Ok(16 << 30)),
            ("2 gb", Ok(2 << 30)),
            ("1T", Ok(1 << 40)),
            ("16777215TiB", Ok(16_777_215 << 40)),
        ] {
            assert_eq!(parse_size(given), want, "{given}");
        }
        for bad in [
            "",
            "GiB",
            "-1",
            "1.5G",
            "16XiB",
            "16777216TiB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_min_free("5%"), Ok(MinFree::Percent(5)));
        assert_eq!(parse_min_free("100%"), Ok(MinFree::Percent(100)));
        assert_eq!(parse_min_free("20GiB"), Ok(MinFree::Bytes(20 << 30)));
        for bad in ["101%", "-5%", "x%", "%"] {
            assert!(parse_min_free(bad).is_err(), "{bad}");
        }
        // MiB flags: never 0, never so large that the byte count wraps.
        let max = u64::MAX >> 20;
        assert_eq!(mib("1"), Ok(1));
        assert_eq!(mib(&max.to_string()), Ok(max));
        assert_eq!(mib(&max.to_string()).map(|m| m << 20 >> 20), Ok(max));
        for bad in ["0", "17592186044416", "-1", "x", ""] {
            assert!(mib(bad).is_err(), "{bad}");
        }
    }
}
