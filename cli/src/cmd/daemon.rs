//! `p2pmr daemon`: serve blocks and jobs until SIGINT or SIGTERM.

use crate::args::{ApiArg, DaemonArgs};
use crate::env::Env;
use anyhow::{Context, Result};
use p2pmr_node::{ApiConfig, Daemon, DaemonConfig, SwarmKey};
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
            slots: args.slots.unwrap_or(0),
            liveness: Duration::from_secs_f64(args.liveness_secs),
            grace: Duration::from_secs_f64(args.grace_secs),
            api,
            swarm_key: env.swarm_key()?,
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
