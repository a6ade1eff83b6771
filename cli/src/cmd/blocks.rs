//! `add`, `cat`, `get`, `stat`, `peers` and `repo`: files, blocks and who holds them.

use crate::args::{AddArgs, ImportArgs};
use crate::env::{open_input, parse_cid, Env};
use crate::progress::{shown, transfer};
use anyhow::{bail, Result};
use p2pmr_node::{FileError, Ledger, Replicas, StoreError};
use p2pmr_protocol::unixfs::Layout;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

/// The size of a file given on the command line (`None` for standard input).
fn input_size(path: &Path) -> Option<u64> {
    (path != Path::new("-"))
        .then(|| std::fs::metadata(path).ok().map(|m| m.len()))
        .flatten()
}

pub(crate) async fn add(env: &Env, args: AddArgs) -> Result<()> {
    let bar = transfer("add", input_size(&args.file), env.quiet);
    let source = Box::new(bar.wrap_read(open_input(&args.file)?));
    let (repo, replicas) = if args.only_hash {
        (None, Replicas::OnlyHash)
    } else if args.local {
        (Some(env.open_repo()?), Replicas::Local)
    } else {
        (None, Replicas::network(args.replicas.into()))
    };
    let node = env.node(repo)?;
    let layout = Layout::KUBO.with_chunker(args.chunker);
    let added = node.blocks().add_as(source, replicas, layout).await;
    node.shutdown().await;
    bar.finish_and_clear();
    println!("{}", added?.root);
    Ok(())
}

pub(crate) async fn cat(env: &Env, offset: u64, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    let node = env.node(env.existing_repo()?)?;
    let bar = progress_of(env, &node, "cat", cid, offset).await;
    let mut out = io::stdout().lock();
    let mut sink = |bytes: &[u8]| {
        bar.inc(bytes.len() as u64);
        out.write_all(bytes)
    };
    let result = if offset == 0 {
        // Files and directories (a job's output: its parts in order).
        node.blocks().cat_tree(cid, &mut sink).await
    } else {
        node.blocks().cat(cid, offset, sink).await
    };
    node.shutdown().await;
    bar.finish_and_clear();
    result?;
    out.flush().map_err(FileError::Output)?;
    Ok(())
}

/// A transfer bar for reading `cid` from `offset`, sized from its root block when it is
/// shown (one fetch; a directory or an unreadable root gets a bar of unknown size, and the
/// read that follows reports any error).
async fn progress_of(
    env: &Env,
    node: &p2pmr_node::Node,
    what: &str,
    cid: p2pmr_protocol::Cid,
    offset: u64,
) -> indicatif::ProgressBar {
    let size = match shown(env.quiet) {
        true => node.blocks().size(cid).await.ok().flatten(),
        false => None,
    };
    transfer(what, size.map(|s| s.saturating_sub(offset)), env.quiet)
}

pub(crate) async fn get(env: &Env, output: &Path, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    if output.exists() {
        bail!("{} exists; get does not overwrite", output.display());
    }
    let node = env.node(env.existing_repo()?)?;
    let bar = progress_of(env, &node, "get", cid, 0).await;
    let result = node
        .blocks()
        .get_with(cid, output, &mut |n| bar.inc(n))
        .await;
    node.shutdown().await;
    bar.finish_and_clear();
    result?;
    Ok(())
}

pub(crate) async fn stat(env: &Env, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    let node = env.node(None)?;
    let stat = node.blocks().stat(cid).await;
    node.shutdown().await;
    let stat = stat?;
    // Written, not printed: a reader that stops early (`| head`) ends the command quietly.
    let mut out = io::stdout().lock();
    writeln!(out, "cid:     {cid}")?;
    writeln!(out, "size:    {} bytes", stat.size)?;
    writeln!(out, "blocks:  {}", stat.blocks)?;
    for (copies, n) in stat.replicas.iter().enumerate().filter(|(_, n)| **n > 0) {
        writeln!(out, "copies:  {n} blocks on {copies} daemon(s)")?;
    }
    for (peer, n) in &stat.holders {
        writeln!(out, "holder:  {peer} {n} blocks")?;
    }
    for (peer, (n, why)) in &stat.unproven {
        writeln!(
            out,
            "unproven: {peer} claims {n} blocks but could not prove it holds one ({why}); not counted"
        )?;
    }
    Ok(())
}

pub(crate) async fn peers(env: &Env) -> Result<()> {
    let node = env.node(None)?;
    let daemons = node.peers().list().await;
    node.shutdown().await;
    let mut out = io::stdout().lock();
    for (id, info) in daemons? {
        let addrs: Vec<String> = info.addrs.iter().map(ToString::to_string).collect();
        writeln!(out, "{id} {} {}", info.agent, addrs.join(" "))?;
    }
    Ok(())
}

pub(crate) async fn dag_export(env: &Env, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    let node = env.node(env.existing_repo()?)?;
    // The CAR's size is not known before it is written: bytes and rate only.
    let bar = transfer("export", None, env.quiet);
    let mut out = bar.wrap_async_write(tokio::io::BufWriter::new(tokio::io::stdout()));
    let result = node.blocks().export_car(cid, &mut out).await;
    node.shutdown().await;
    bar.finish_and_clear();
    result?;
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(FileError::Output)?;
    Ok(())
}

pub(crate) async fn dag_import(env: &Env, args: ImportArgs) -> Result<()> {
    let bar = transfer("import", input_size(&args.file), env.quiet);
    let source = Box::new(bar.wrap_read(open_input(&args.file)?));
    let (repo, replicas) = if args.local {
        (Some(env.open_repo()?), Replicas::Local)
    } else {
        (
            env.existing_repo()?,
            Replicas::network(args.replicas.into()),
        )
    };
    let node = env.node(repo)?;
    let roots = node.blocks().import_car(source, replicas).await;
    node.shutdown().await;
    bar.finish_and_clear();
    for root in roots? {
        println!("{root}");
    }
    Ok(())
}

pub(crate) fn repo_stat(env: &Env) -> Result<()> {
    let repo = env.open_repo()?;
    let stats = repo.blocks().stats()?;
    println!("repo:   {}", repo.home().display());
    println!("blocks: {}", stats.blocks);
    println!("bytes:  {}", stats.bytes);
    Ok(())
}

pub(crate) fn repo_gc(env: &Env, grace_secs: f64) -> Result<()> {
    let repo = env.open_repo()?;
    let ledger = Ledger::open(&repo.ledger())?;
    let done = ledger.collect(
        repo.blocks(),
        Duration::from_secs_f64(grace_secs),
        |_, _| {},
    )?;
    println!(
        "collected {} blocks ({:.1} MiB) of {} adds that never completed; {} provisional blocks kept",
        done.blocks,
        done.bytes as f64 / f64::from(1 << 20),
        done.sessions,
        done.kept
    );
    Ok(())
}

pub(crate) fn repo_verify(env: &Env) -> Result<()> {
    let repo = env.open_repo()?;
    let (mut good, mut bad, mut unreadable) = (0u64, 0u64, 0u64);
    for cid in repo.blocks().list() {
        match repo.blocks().get_rehashed(&cid?) {
            Ok(_) => good += 1,
            Err(e @ StoreError::Corrupt { .. }) => {
                eprintln!("{e}");
                bad += 1;
            }
            Err(StoreError::NotFound(_)) => {} // removed since it was listed
            // Unreadable (or corrupt and not movable, on a read-only repository): reported,
            // and the rest still checked.
            Err(e) => {
                eprintln!("{:#}", anyhow::Error::from(e));
                unreadable += 1;
            }
        }
    }
    println!("{good} blocks verified, {bad} corrupt, {unreadable} unreadable");
    if bad + unreadable > 0 {
        bail!("{bad} corrupt blocks were quarantined, {unreadable} could not be read");
    }
    Ok(())
}
