//! The `p2pmr` command: parses arguments, calls the `p2pmr_node` library, and maps every error
//! to one line on stderr and a non-zero exit code (2 for usage errors, 1 for everything else).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use p2pmr_node::{files, FileError, Repo};
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

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add a file: split it into blocks, store them, print its CID.
    ///
    /// The CID is the one `ipfs add --cid-version=1` prints for the same bytes (256 KiB chunks,
    /// raw leaves, sha2-256, balanced DAG). It is printed only once every block is on disk.
    Add {
        /// Only compute and print the CID; store nothing (as kubo's `add -n`)
        #[arg(short = 'n', long)]
        only_hash: bool,
        /// The file to add; `-` reads standard input
        file: PathBuf,
    },
    /// Write the bytes of the file CID to standard output, verifying every block.
    Cat {
        /// Start at this byte offset
        #[arg(long, default_value_t = 0, value_name = "BYTES")]
        offset: u64,
        /// The file's CID (as printed by `add`)
        cid: String,
    },
    /// Inspect or check the local repository.
    #[command(subcommand)]
    Repo(RepoCommand),
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Print the number of blocks and bytes stored.
    Stat,
    /// Read and verify every block; quarantine corrupt ones and report them.
    Verify,
}

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
    match cli.command {
        Command::Add { only_hash, file } => {
            let source = open_input(&file)?;
            let added = if only_hash {
                files::import(source, None, Layout::KUBO)?
            } else {
                open_repo(cli.home)?.add(source)?
            };
            println!("{}", added.root);
        }
        Command::Cat { offset, cid } => {
            let cid = parse_cid(&cid)?;
            let repo = open_repo(cli.home)?;
            let mut out = io::stdout().lock();
            repo.cat(cid, offset, |bytes| out.write_all(bytes))?;
            out.flush().map_err(FileError::Output)?;
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

fn open_repo(home: Option<PathBuf>) -> Result<Repo> {
    let home = home
        .or_else(|| {
            std::env::var_os(p2pmr_node::HOME_ENV)
                .filter(|h| !h.is_empty())
                .map(PathBuf::from)
        })
        .or_else(p2pmr_node::default_home)
        .context("no repository: pass --home DIR or set P2PMR_HOME (HOME is not set)")?;
    Repo::open(&home).with_context(|| format!("cannot open repository {}", home.display()))
}

fn open_input(path: &Path) -> Result<Box<dyn Read>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdin().lock()));
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .init();
}
