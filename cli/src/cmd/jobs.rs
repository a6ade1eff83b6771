//! `run`, `watch`, `jobs` and `cancel`: jobs on the network, through a coordinating daemon.

use crate::args::RunArgs;
use crate::env::{parse_cid, Env};
use crate::progress::{Mode, Progress};
use anyhow::Result;
use libp2p::PeerId;
use p2pmr_node::JobHandle;
use p2pmr_protocol::engine::{JobState, JobSummary};
use p2pmr_protocol::job::{JobInput, JobSpec, TaskLimits, AUTO_SPLIT};
use p2pmr_protocol::Cid;

pub(crate) async fn run(env: &Env, args: RunArgs) -> Result<()> {
    let inputs = args
        .inputs
        .iter()
        .map(|i| {
            let (name, cid) = match i.split_once('=') {
                Some((name, cid)) => (name.to_owned(), parse_cid(cid)?),
                None => (i.trim().to_owned(), parse_cid(i)?),
            };
            Ok(JobInput { name, cid })
        })
        .collect::<Result<Vec<_>>>()?;
    let node = env.node(None)?;
    let result = async {
        let module = match Cid::try_from(args.job.as_str()) {
            Ok(cid) => cid,
            Err(_) => {
                let (_, wasm) = env.resolve_job(&args.job)?;
                node.jobs().publish(wasm).await?
            }
        };
        let spec = JobSpec::new(module, inputs, args.reducers, args.args)?
            .with_split_size(args.split_mib.map_or(AUTO_SPLIT, |m| m << 20))
            .with_limits(TaskLimits {
                memory: args.memory_mib << 20,
                timeout_ms: args.timeout_secs.saturating_mul(1000),
                ..TaskLimits::default()
            })
            .with_skip_bad_records(args.skip_bad_records.unwrap_or(0))
            .with_verify(args.verify.unwrap_or(1))
            .with_memo(!args.no_memo);
        let job = node.jobs().submit(spec, args.coordinator).await?;
        if args.detach {
            println!("{}", job.id());
            return Ok(());
        }
        follow(&job, args.json).await
    }
    .await;
    node.shutdown().await;
    result
}

pub(crate) async fn watch(
    env: &Env,
    json: bool,
    coordinator: Option<PeerId>,
    job: &str,
) -> Result<()> {
    let job = parse_cid(job)?;
    let node = env.node(None)?;
    let result = async {
        let job = node.jobs().attach(job, coordinator).await?;
        follow(&job, json).await
    }
    .await;
    node.shutdown().await;
    result
}

pub(crate) async fn pin_add(
    env: &Env,
    replicas: u16,
    daemon: Option<PeerId>,
    json: bool,
    cid: &str,
) -> Result<()> {
    let root = parse_cid(cid)?;
    let node = env.node(None)?;
    let result = async {
        let pin = node.blocks().pin(root, u32::from(replicas), daemon).await?;
        follow(&pin, json).await
    }
    .await;
    node.shutdown().await;
    result
}

/// Shows a job's events until it ends; prints the output CID on success.
async fn follow(job: &JobHandle, json: bool) -> Result<()> {
    let mut progress = Progress::new(if json { Mode::Json } else { Mode::Human });
    let output = job.wait(|e| progress.event(e)).await?;
    if !json {
        println!("{output}");
    }
    Ok(())
}

pub(crate) async fn list(env: &Env) -> Result<()> {
    let node = env.node(None)?;
    let listed = node.jobs().list().await;
    node.shutdown().await;
    for (peer, jobs) in listed? {
        match jobs {
            Err(e) => eprintln!("{peer}: {e}"),
            Ok(jobs) => jobs
                .iter()
                .for_each(|j| println!("{}", summary_line(j, peer))),
        }
    }
    Ok(())
}

fn summary_line(j: &JobSummary, coordinator: PeerId) -> String {
    let state = match &j.state {
        JobState::Running => "running".to_string(),
        JobState::Succeeded { output } => format!("succeeded {output}"),
        JobState::Failed(reason) => format!("failed: {reason}"),
        JobState::Cancelled => "cancelled".to_string(),
    };
    format!(
        "{} maps {}/{} reduces {}/{} {:.1}s in={}B out={}lines {state} (coordinator {coordinator})",
        j.job,
        j.maps.0,
        j.maps.1,
        j.reduces.0,
        j.reduces.1,
        j.elapsed_ms as f64 / 1e3,
        j.counters.input_bytes,
        j.counters.reduce_output_records,
    )
}

pub(crate) async fn cancel(env: &Env, coordinator: Option<PeerId>, job: &str) -> Result<()> {
    let job = parse_cid(job)?;
    let node = env.node(None)?;
    let result = node.jobs().cancel(job, coordinator).await;
    node.shutdown().await;
    result?;
    eprintln!("cancelled {job}");
    Ok(())
}
