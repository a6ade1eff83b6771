//! `add`, `cat`, `get`, `stat`, `peers` and `repo`: files, blocks and who holds them.

use crate::args::{AddArgs, ImportArgs};
use crate::env::{open_input, parse_cid, Env};
use anyhow::{bail, Result};
use p2pmr_node::{FileError, Ledger, Replicas, StoreError};
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

pub(crate) async fn add(env: &Env, args: AddArgs) -> Result<()> {
    let source = open_input(&args.file)?;
    let (repo, replicas) = if args.only_hash {
        (None, Replicas::OnlyHash)
    } else if args.local {
        (Some(env.open_repo()?), Replicas::Local)
    } else {
        (None, Replicas::network(args.replicas.into()))
    };
    let node = env.node(repo)?;
    let added = node.blocks().add(source, replicas).await;
    node.shutdown().await;
    println!("{}", added?.root);
    Ok(())
}

pub(crate) async fn cat(env: &Env, offset: u64, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    let node = env.node(env.existing_repo()?)?;
    let mut out = io::stdout().lock();
    let mut sink = |bytes: &[u8]| out.write_all(bytes);
    let result = if offset == 0 {
        // Files and directories (a job's output: its parts in order).
        node.blocks().cat_tree(cid, &mut sink).await
    } else {
        node.blocks().cat(cid, offset, sink).await
    };
    node.shutdown().await;
    result?;
    out.flush().map_err(FileError::Output)?;
    Ok(())
}

pub(crate) async fn get(env: &Env, output: &Path, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    if output.exists() {
        bail!("{} exists; get does not overwrite", output.display());
    }
    let node = env.node(env.existing_repo()?)?;
    let result = node.blocks().get(cid, output).await;
    node.shutdown().await;
    result?;
    Ok(())
}

pub(crate) async fn stat(env: &Env, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    let node = env.node(None)?;
    let stat = node.blocks().stat(cid).await;
    node.shutdown().await;
    let stat = stat?;
    println!("cid:     {cid}");
    println!("size:    {} bytes", stat.size);
    println!("blocks:  {}", stat.blocks);
    for (copies, n) in stat.replicas.iter().enumerate().filter(|(_, n)| **n > 0) {
        println!("copies:  {n} blocks on {copies} daemon(s)");
    }
    for (peer, n) in &stat.holders {
        println!("holder:  {peer} {n} blocks");
    }
    for (peer, (n, why)) in &stat.unproven {
        println!("unproven: {peer} claims {n} blocks but could not prove it holds one ({why}); not counted");
    }
    Ok(())
}

pub(crate) async fn peers(env: &Env) -> Result<()> {
    let node = env.node(None)?;
    let daemons = node.peers().list().await;
    node.shutdown().await;
    for (id, info) in daemons? {
        let addrs: Vec<String> = info.addrs.iter().map(ToString::to_string).collect();
        println!("{id} {} {}", info.agent, addrs.join(" "));
    }
    Ok(())
}

pub(crate) async fn dag_export(env: &Env, cid: &str) -> Result<()> {
    let cid = parse_cid(cid)?;
    let node = env.node(env.existing_repo()?)?;
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    let result = node.blocks().export_car(cid, &mut out).await;
    node.shutdown().await;
    result?;
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(FileError::Output)?;
    Ok(())
}

pub(crate) async fn dag_import(env: &Env, args: ImportArgs) -> Result<()> {
    let source = open_input(&args.file)?;
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
        match repo.blocks().get(&cid?) {
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
