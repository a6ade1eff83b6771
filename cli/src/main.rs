//! The `p2pmr` command: parses arguments, hands each subcommand to one small function over the
//! `p2pmr_node` library, and maps every error to one line on stderr and a non-zero exit code
//! (2 for usage errors, 1 for everything else).

mod args;
mod cmd;
mod demo;
mod env;
mod progress;

use anyhow::{Context, Result};
use args::{Cli, Command, DagCommand, PinCommand, RepoCommand, SwarmKeyCommand};
use clap::Parser;
use std::io;
use std::process::ExitCode;

// The daemon and the client move 256 KiB buffers through several tasks and threads; glibc's
// malloc serves those with mmap/munmap and page faults (a large share of a transfer's system
// time), mimalloc keeps them in reusable pages. Built with `no_thp`: on its own, mimalloc asks
// for transparent huge pages for its arenas, and memory it holds for reuse then counts in
// 2 MiB pages, which inflated a daemon's peak RSS (BENCHMARKS.md, "The engine").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// One function per subcommand; the async ones share one runtime.
fn run(cli: Cli) -> Result<()> {
    let env = env::Env::new(cli.home, &cli.net, cli.quiet)?;
    match cli.command {
        Command::Add(args) => block_on(cmd::blocks::add(&env, args)),
        Command::Cat { offset, cid } => block_on(cmd::blocks::cat(&env, offset, &cid)),
        Command::Get { output, cid } => block_on(cmd::blocks::get(&env, &output, &cid)),
        Command::Stat { cid } => block_on(cmd::blocks::stat(&env, &cid)),
        Command::Peers => block_on(cmd::blocks::peers(&env)),
        Command::Daemon(args) => block_on(cmd::daemon::run(&env, args)),
        Command::Run(args) => block_on(cmd::jobs::run(&env, args)),
        Command::Watch {
            json,
            coordinator,
            job,
        } => block_on(cmd::jobs::watch(&env, json, coordinator, &job)),
        Command::Jobs => block_on(cmd::jobs::list(&env)),
        Command::Cancel { coordinator, job } => {
            block_on(cmd::jobs::cancel(&env, coordinator, &job))
        }
        Command::Demo(args) => block_on(demo::run(&env, args)),
        Command::RunLocal(args) => cmd::local::run(&env, args),
        Command::Repo(RepoCommand::Stat) => cmd::blocks::repo_stat(&env),
        Command::Repo(RepoCommand::Verify) => cmd::blocks::repo_verify(&env),
        Command::Repo(RepoCommand::Gc { grace_secs }) => cmd::blocks::repo_gc(&env, grace_secs),
        Command::SwarmKey(SwarmKeyCommand::New { file }) => cmd::daemon::new_swarm_key(&file),
        Command::Id { daemon } => cmd::daemon::id(&env, daemon),
        Command::Dag(DagCommand::Export { cid }) => block_on(cmd::blocks::dag_export(&env, &cid)),
        Command::Dag(DagCommand::Import(args)) => block_on(cmd::blocks::dag_import(&env, args)),
        Command::Pin(PinCommand::Add {
            replicas,
            daemon,
            json,
            cid,
        }) => block_on(cmd::jobs::pin_add(&env, replicas, daemon, json, &cid)),
    }
}

fn block_on(work: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    runtime()?.block_on(work)
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

/// Clap renders usage errors over several lines; keep the message, drop the usage block.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:") && !l.starts_with("For more"))
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
