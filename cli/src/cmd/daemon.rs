//! `p2pmr daemon`: serve blocks and jobs until SIGINT or SIGTERM.

use crate::args::{ApiArg, DaemonArgs};
use crate::env::Env;
use anyhow::{Context, Result};
use libp2p::PeerId;
use p2pmr_node::{ApiConfig, Daemon, DaemonConfig, SwarmKey, WritePolicy};
use std::io::{self, Write};
use std::time::Duration;

pub(crate) async fn run(env: &Env, args: DaemonArgs) -> Result<()> {
    let home = env.home_dir()?;
    let token = match &args.api_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the API token from {}", path.display()))?
                .trim()
                .to_owned(),
        )
        .filter(|t| !t.is_empty()),
        None => None,
    };
    let api = match args.api {
        Some(ApiArg::Off) => None,
        Some(ApiArg::At(addr)) => Some(ApiConfig {
            addr,
            next_free: false,
            header_timeout: p2pmr_node::HEADER_TIMEOUT,
            token,
        }),
        None => Some(ApiConfig {
            token,
            ..ApiConfig::loopback()
        }),
    };
    let daemon = Daemon::start(
        &home,
        DaemonConfig {
            listen: args.listen,
            bootstrap: env.peers.clone(),
            mdns: env.mdns,
            mesh: env.mesh,
            slots: args.slots.unwrap_or(0),
            liveness: Duration::from_secs_f64(args.liveness_secs),
            grace: Duration::from_secs_f64(args.grace_secs),
            gc_grace: Duration::from_secs_f64(args.gc_grace_secs),
            memo_bytes: args.memo_bytes,
            api,
            swarm_key: env.swarm_key()?,
            allow_jobs: allowed_peers(&args.allow_jobs)?,
            writes: WritePolicy {
                min_free: args.min_free_disk,
                max_client_bytes: args.max_client_bytes,
            },
            // For tests of verified execution (README, "Tests"): never set otherwise.
            fault_wrong_output: std::env::var_os("P2PMR_FAULT_WRONG_OUTPUT")
                .is_some_and(|v| v == "1"),
        },
    )
    .await
    .with_context(|| format!("cannot start the daemon in {}", home.display()))?;
    let mut out = io::stdout().lock();
    writeln!(out, "peer id: {}", daemon.peer_id())?;
    // The API's line comes first: scripts read up to the first `listening on` line and may
    // close the pipe there.
    if let Some(addr) = daemon.api_addr() {
        writeln!(out, "api listening on http://{addr}")?;
    }
    for addr in daemon.listen_addrs() {
        writeln!(out, "listening on {addr}")?;
    }
    out.flush()?;
    drop(out);
    daemon.run_until(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The peers `--allow-jobs` names (each a peer id or a file of them); `None` if none is given.
fn allowed_peers(given: &[String]) -> Result<Option<Vec<PeerId>>> {
    if given.is_empty() {
        return Ok(None);
    }
    let mut peers = Vec::new();
    for arg in given {
        if let Ok(peer) = arg.parse::<PeerId>() {
            peers.push(peer);
            continue;
        }
        let text = std::fs::read_to_string(arg).with_context(|| {
            format!("--allow-jobs {arg}: neither a peer id nor a readable file")
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let peer = line.parse::<PeerId>().map_err(|e| {
                anyhow::anyhow!(
                    "--allow-jobs {arg}, line {}: '{line}' is not a peer id ({e})",
                    n + 1
                )
            })?;
            peers.push(peer);
        }
    }
    Ok(Some(peers))
}

/// `p2pmr id [--daemon]`.
pub(crate) fn id(env: &Env, daemon: bool) -> Result<()> {
    let home = env.home_dir()?;
    std::fs::create_dir_all(&home)
        .with_context(|| format!("cannot create the repository {}", home.display()))?;
    let key = p2pmr_node::identity_at(&home)?;
    let key = if daemon {
        key
    } else {
        p2pmr_node::client_key(&key)
    };
    println!("{}", key.public().to_peer_id());
    Ok(())
}

/// `p2pmr swarm-key new FILE`.
pub(crate) fn new_swarm_key(file: &std::path::Path) -> Result<()> {
    let key = SwarmKey::generate()?;
    key.write_new(file)?;
    println!("{}", key.fingerprint());
    Ok(())
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
