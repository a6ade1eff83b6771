//! `p2pmr demo`: a whole network in one process, to see p2pmr work before setting anything up.
//!
//! It starts three daemons on 127.0.0.1 (temporary repositories, no mDNS), adds a corpus with
//! two replicas (a file given by the user, or generated text), runs the shipped `wordcount` job
//! through a coordinator with live progress, prints the ten most frequent words, copies the
//! output into the user's repository (so `p2pmr cat CID` works afterwards) and shuts the
//! network down cleanly.

use crate::args::DemoArgs;
use crate::env::Env;
use crate::progress::{Mode, Progress};
use anyhow::{Context, Result};
use p2pmr_node::cluster::{Cluster, ClusterConfig};
use p2pmr_node::corpus::Corpus;
use p2pmr_node::engine::shipped;
use p2pmr_node::{Node, Replicas};
use p2pmr_protocol::job::{JobInput, JobSpec};
use p2pmr_protocol::Cid;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Daemons the demo starts.
const DAEMONS: usize = 3;

/// What the demo found.
struct Report {
    input: Cid,
    input_bytes: u64,
    output: Cid,
    top: Vec<(String, u64)>,
    add_time: Duration,
    job_time: Duration,
}

pub(crate) async fn run(env: &Env, args: DemoArgs) -> Result<()> {
    let mode = if args.json { Mode::Json } else { Mode::Human };
    let keep_in = env.open_repo().ok();
    let cluster = Cluster::start(ClusterConfig::linked(DAEMONS, 0))
        .await
        .context("cannot start the demo daemons")?;
    let node = cluster.client();
    let report = drive(&node, &args, mode).await;
    let kept = match (&report, &keep_in) {
        (Ok(report), Some(repo)) => {
            node.blocks()
                .copy_into(report.output, repo.blocks())
                .await
                .context("cannot copy the output into the repository")?;
            true
        }
        _ => false,
    };
    node.shutdown().await;
    cluster.stop().await;
    print(&report?, args.json, kept)
}

async fn drive(node: &Node, args: &DemoArgs, mode: Mode) -> Result<Report> {
    let source: Box<dyn Read + Send> = match &args.input {
        Some(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => Box::new(Corpus::new(args.size << 20)),
    };
    let say = |text: String| {
        if mode == Mode::Human {
            eprintln!("{text}");
        }
    };
    say(format!(
        "demo: {DAEMONS} daemons on 127.0.0.1; adding {} with 2 replicas...",
        match &args.input {
            Some(p) => p.display().to_string(),
            None => format!("a generated corpus of {} MB", (args.size << 20) / 1_000_000),
        }
    ));
    let started = Instant::now();
    let added = node
        .blocks()
        .add(source, Replicas::network(2))
        .await
        .context("cannot add the input")?;
    let add_time = started.elapsed();
    say(format!(
        "added {} ({:.1} MB) in {:.2}s",
        added.root,
        added.size as f64 / 1e6,
        add_time.as_secs_f64()
    ));

    let wasm = shipped::by_name("wordcount").expect("wordcount is shipped");
    let module = node
        .jobs()
        .publish(wasm.to_vec())
        .await
        .context("cannot publish the job")?;
    let input = JobInput {
        name: "corpus".into(),
        cid: added.root,
    };
    let spec = JobSpec::new(module, vec![input], args.reducers, Vec::new())?;
    let started = Instant::now();
    let job = node.jobs().submit(spec, None).await?;
    let mut progress = Progress::new(mode);
    let output = job.wait(|e| progress.event(e)).await?;
    let job_time = started.elapsed();
    let top = top_words(node, output)
        .await
        .context("cannot read the output")?;
    Ok(Report {
        input: added.root,
        input_bytes: added.size,
        output,
        top,
        add_time,
        job_time,
    })
}

/// The ten most frequent words of a wordcount output, streaming through it.
async fn top_words(node: &Node, output: Cid) -> Result<Vec<(String, u64)>> {
    let mut top: Vec<(String, u64)> = Vec::new();
    let mut partial = Vec::new();
    let keep = |line: &[u8], top: &mut Vec<(String, u64)>| {
        let text = String::from_utf8_lossy(line);
        if let Some((word, n)) = text.split_once('\t') {
            if let Ok(n) = n.trim().parse::<u64>() {
                top.push((word.to_owned(), n));
                top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                top.truncate(10);
            }
        }
    };
    node.blocks()
        .cat_tree(output, &mut |bytes: &[u8]| {
            partial.extend_from_slice(bytes);
            let mut start = 0;
            while let Some(nl) = partial[start..].iter().position(|&b| b == b'\n') {
                keep(&partial[start..start + nl], &mut top);
                start += nl + 1;
            }
            partial.drain(..start);
            Ok(())
        })
        .await?;
    Ok(top)
}

fn print(report: &Report, json: bool, kept: bool) -> Result<()> {
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
    Ok(())
}
