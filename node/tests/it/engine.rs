//! The MapReduce engine end to end: in-process daemons on 127.0.0.1 that know each other, a
//! client peer that adds inputs, publishes a shipped job, submits it to a coordinator and
//! follows its events; outputs are checked against `run-local` over the same bytes.

use super::{cat_all, linked};
use anyhow::Result;
use futures::StreamExt;
use p2pmr_node::cluster::Cluster;
use p2pmr_node::engine::local::{self, LocalJob};
use p2pmr_node::engine::runtime::{Executor, Limits};
use p2pmr_node::engine::shipped;
use p2pmr_node::{Error, Node, Replicas};
use p2pmr_protocol::engine::{Event, TaskKind};
use p2pmr_protocol::job::{JobInput, JobSpec, AUTO_SPLIT, MIN_SPLIT};
use p2pmr_protocol::Cid;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

/// A finished job: every event, and the output if it succeeded.
struct Ran {
    events: Vec<Event>,
    output: Option<Cid>,
    reason: Option<String>,
}

async fn run_job(
    client: &Node,
    module: Cid,
    inputs: &[(String, Cid)],
    reducers: u32,
    args: &[(&str, &str)],
    split: u64,
) -> Result<Ran> {
    run_spec(client, job_spec(module, inputs, reducers, args, split)?).await
}

fn job_spec(
    module: Cid,
    inputs: &[(String, Cid)],
    reducers: u32,
    args: &[(&str, &str)],
    split: u64,
) -> Result<JobSpec> {
    Ok(JobSpec::new(
        module,
        inputs
            .iter()
            .map(|(name, cid)| JobInput {
                name: name.clone(),
                cid: *cid,
            })
            .collect(),
        reducers,
        args.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )?
    .with_split_size(split))
}

async fn run_spec(client: &Node, spec: JobSpec) -> Result<Ran> {
    let job = client.jobs().submit(spec.clone(), None).await?;
    assert_eq!(job.id(), spec.id(), "the job id is the spec's CID");
    let mut events = Vec::new();
    let waited = tokio::time::timeout(
        Duration::from_secs(300),
        job.wait(|e| events.push(e.clone())),
    )
    .await?;
    Ok(match waited {
        Ok(output) => Ran {
            events,
            output: Some(output),
            reason: None,
        },
        Err(Error::JobFailed { reason, .. }) => Ran {
            events,
            output: None,
            reason: Some(reason),
        },
        Err(other) => return Err(other.into()),
    })
}

/// Wordcount over one input named `corpus`, in `reducers` partitions and splits of `split`.
async fn wordcount_of_corpus(client: &Node, input: Cid, reducers: u32, split: u64) -> Result<Ran> {
    let module = publish(client, "wordcount").await?;
    let inputs = [("corpus".to_string(), input)];
    run_job(client, module, &inputs, reducers, &[], split).await
}

/// Publishes a shipped job's module to every daemon.
async fn publish(client: &Node, job: &str) -> Result<Cid> {
    let wasm = shipped::by_name(job).expect("shipped").to_vec();
    Ok(client.jobs().publish(wasm).await?)
}

async fn add(client: &Node, bytes: Vec<u8>, replicas: usize) -> Result<Cid> {
    let added = client
        .blocks()
        .add(std::io::Cursor::new(bytes), Replicas::network(replicas))
        .await?;
    Ok(added.root)
}

/// The output read back from the network by a fresh client, as sorted lines.
async fn read_output(cluster: &Cluster, output: Cid) -> Result<Vec<Vec<u8>>> {
    let reader = cluster.client();
    reader.peers().wait_for(cluster.daemons().count()).await?;
    let bytes = cat_all(&reader, output).await?;
    reader.shutdown().await;
    Ok(sorted_lines(&bytes))
}

fn sorted_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    lines.sort();
    lines
}

/// `run-local` over the same inputs (written to files named as the job's inputs are).
fn run_local(
    job: &str,
    inputs: &[(String, Vec<u8>)],
    reducers: u32,
    args: &[(&str, &str)],
) -> Result<Vec<Vec<u8>>> {
    let dir = tempfile::tempdir()?;
    // Map tasks see the input's name; run-local names inputs by path, so give the files the
    // job's input names inside a directory we then run from.
    let mut paths = Vec::new();
    for (name, bytes) in inputs {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        paths.push(path);
    }
    let exec = Executor::new(Limits::default())?;
    let wasm = shipped::by_name(job).expect("shipped");
    let cid = p2pmr_node::repo::files::import(wasm, None, Default::default())?.root;
    let module = exec.load(cid, job, wasm)?;
    let spec = LocalJob {
        args: p2pmr_protocol::abi::encode_args(args.iter().copied()),
        reducers,
        split: MIN_SPLIT,
        ..LocalJob::default()
    };
    let out = tempfile::tempdir()?;
    let part = |r: u32| out.path().join(format!("part-{r:05}"));
    // Run from inside the directory with relative paths so the names match the job's.
    let rel: Vec<PathBuf> = inputs.iter().map(|(n, _)| PathBuf::from(n)).collect();
    // The working directory is the process's: one test at a time changes it.
    let _guard = CWD.lock().unwrap();
    let cwd = std::env::current_dir()?;
    std::env::set_current_dir(dir.path())?;
    let result = local::run(&exec, &module, &spec, &rel, |r| {
        std::fs::File::create(part(r))
    });
    std::env::set_current_dir(cwd)?;
    result?;
    let mut all = Vec::new();
    for r in 0..reducers {
        all.extend(std::fs::read(part(r))?);
    }
    drop(paths);
    Ok(sorted_lines(&all))
}

static CWD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Inputs whose records straddle block edges in every awkward way.
fn boundary_inputs() -> Vec<(String, Vec<u8>)> {
    const B: usize = 262_144;
    let mut long_line = b"start ".to_vec();
    while long_line.len() < 3 * B + 1000 {
        long_line.extend_from_slice(b"longword ");
    }
    long_line.extend_from_slice(b"end\nafter the long line\n");
    // Multi-byte letters (2, 3 and 4 bytes) placed across every block edge.
    let mut utf8 = Vec::new();
    let mut i = 0;
    while utf8.len() < 3 * B {
        let edge = (utf8.len() / B + 1) * B;
        if edge - utf8.len() < 8 {
            let c = ["é", "ж", "日本", "𐐷x"][i % 4];
            utf8.extend_from_slice(c.as_bytes());
            i += 1;
        } else {
            utf8.extend_from_slice("mot ".as_bytes());
        }
        if utf8.len() % 97 == 0 {
            utf8.push(b'\n');
        }
    }
    // Invalid UTF-8 (lone continuation bytes, truncated sequences) across edges too.
    let mut invalid = Vec::new();
    while invalid.len() < 2 * B + 100 {
        invalid.extend_from_slice(b"abc \xff\xfe word\xc3 \xe6\x97 ok\n");
    }
    vec![
        ("empty".into(), Vec::new()),
        ("no-final-newline".into(), b"one two\nthree".to_vec()),
        (
            "crlf".into(),
            b"alpha beta\r\ngamma\r\n\r\nalpha\r\n".repeat(30_000),
        ),
        ("long-line".into(), long_line),
        ("utf8-edges".into(), utf8),
        ("invalid-utf8".into(), invalid),
    ]
}

fn count_tasks(events: &[Event], kind: TaskKind) -> (usize, usize, HashSet<u32>) {
    let started: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::TaskStarted { kind: k, task, .. } if *k == kind => Some(*task),
            _ => None,
        })
        .collect();
    let finished = events
        .iter()
        .filter(|e| matches!(e, Event::TaskFinished { kind: k, .. } if *k == kind))
        .count();
    let distinct = started.iter().copied().collect();
    (started.len(), finished, distinct)
}

fn planned(events: &[Event]) -> (u32, u32) {
    events
        .iter()
        .find_map(|e| match e {
            Event::Planned { maps, reduces, .. } => Some((*maps, *reduces)),
            _ => None,
        })
        .expect("a Planned event")
}

/// Whether two tasks of `kind` ran at the same time on different peers: one started on a
/// peer while another, on another peer, had started and not finished.
fn ran_in_parallel(events: &[Event], kind: TaskKind) -> bool {
    let mut running: BTreeMap<u32, String> = BTreeMap::new();
    for e in events {
        match e {
            Event::TaskStarted {
                kind: k,
                task,
                peer,
                ..
            } if *k == kind => {
                if running.values().any(|p| p != peer) {
                    return true;
                }
                running.insert(*task, peer.clone());
            }
            Event::TaskFinished { kind: k, task, .. } if *k == kind => {
                running.remove(task);
            }
            _ => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordcount_on_boundary_inputs_equals_run_local_and_runs_each_task_once() -> Result<()> {
    let cluster = linked(3, 2).await?;
    let client = super::client(&cluster, 3).await?;
    let inputs = boundary_inputs();
    let mut named = Vec::new();
    for (name, bytes) in &inputs {
        named.push((name.clone(), add(&client, bytes.clone(), 2).await?));
    }
    let module = publish(&client, "wordcount").await?;
    // One-block splits: every block edge is a task edge.
    let ran = run_job(&client, module, &named, 3, &[], MIN_SPLIT).await?;
    let output = ran
        .output
        .ok_or_else(|| anyhow::anyhow!("{:?}", ran.reason))?;
    let expected = run_local("wordcount", &inputs, 3, &[])?;
    assert!(!expected.is_empty());
    assert_eq!(read_output(&cluster, output).await?, expected);

    // Exactly once, and in parallel on different peers.
    let (maps, reduces) = planned(&ran.events);
    let (started, finished, distinct) = count_tasks(&ran.events, TaskKind::Map);
    assert_eq!(
        (started, finished, distinct.len()),
        (maps as usize, maps as usize, maps as usize)
    );
    let (started, finished, distinct) = count_tasks(&ran.events, TaskKind::Reduce);
    assert_eq!(
        (started, finished, distinct.len()),
        (reduces as usize, reduces as usize, 3)
    );
    assert!(
        ran_in_parallel(&ran.events, TaskKind::Map),
        "maps ran one at a time"
    );
    assert!(
        ran_in_parallel(&ran.events, TaskKind::Reduce),
        "reduces ran one at a time"
    );
    // The last event is the completion (the job succeeded above); its counters must hold.
    let Some(Event::Completed { counters, .. }) = ran.events.last() else {
        panic!(
            "the last event is not the completion: {:?}",
            ran.events.last()
        );
    };
    let total: u64 = inputs.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(counters.input_bytes, total, "every input byte mapped once");
    assert_eq!(counters.map_attempts, u64::from(maps));
    assert_eq!(counters.reduce_output_records as usize, expected.len());
    // wordcount's combiner sees a task's first pairs at least (it may then step aside: its
    // mapper already counts) and never gives back more than it took.
    assert!(counters.combine_output_records <= counters.map_output_records);
    assert!(counters.combine_input_records >= counters.combine_output_records);
    assert!(counters.combine_output_records > 0);

    // The same job again: the coordinator answers with the job it ran (same events, same
    // output); nothing runs again.
    let again = run_job(&client, module, &named, 3, &[], MIN_SPLIT).await?;
    assert_eq!(again.output, Some(output));
    assert_eq!(again.events, ran.events);
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexer_over_eight_inputs_and_grep_equal_run_local() -> Result<()> {
    let cluster = linked(3, 2).await?;
    let client = super::client(&cluster, 3).await?;
    let words = [
        "apple", "banana", "cherry", "date", "elder", "fig", "grape", "hazel",
    ];
    let inputs: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            let mut text = Vec::new();
            for line in 0..(20_000 + i * 3_000) {
                let a = words[(line * 7 + i) % 8];
                let b = words[(line * 3 + i * 5) % 8];
                text.extend_from_slice(format!("{a} {b} line{line} in{i}\n").as_bytes());
            }
            (format!("doc-{i}"), text)
        })
        .collect();
    let mut named = Vec::new();
    for (name, bytes) in &inputs {
        named.push((name.clone(), add(&client, bytes.clone(), 2).await?));
    }
    for (job, args, reducers) in [
        ("indexer", &[][..], 2),
        ("grep", &[("pattern", "^cherry [a-f]")][..], 1),
    ] {
        let module = publish(&client, job).await?;
        let ran = run_job(&client, module, &named, reducers, args, MIN_SPLIT).await?;
        let output = ran
            .output
            .ok_or_else(|| anyhow::anyhow!("{job}: {:?}", ran.reason))?;
        let expected = run_local(job, &inputs, reducers, args)?;
        assert!(!expected.is_empty(), "{job}");
        assert_eq!(read_output(&cluster, output).await?, expected, "{job}");
    }
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_fail_with_a_reason_and_harm_no_daemon() -> Result<()> {
    let cluster = linked(2, 2).await?;
    let client = super::client(&cluster, 2).await?;
    let text = b"good line\nthis one TRAPs\nfine\n".repeat(1000);
    let input = add(&client, text.clone(), 2).await?;
    let wordcount = publish(&client, "wordcount").await?;

    // An input nobody has.
    let unknown = *p2pmr_protocol::Block::raw(b"never added".to_vec()).cid();
    let ran = run_job(
        &client,
        wordcount,
        &[("x".into(), unknown)],
        1,
        &[],
        AUTO_SPLIT,
    )
    .await?;
    let reason = ran.reason.expect("fails");
    assert!(
        reason.contains("input x") && reason.contains(&unknown.to_string()),
        "{reason}"
    );

    // Bytes that are not WebAssembly.
    let garbage = client.jobs().publish(b"\0asm garbage".to_vec()).await?;
    let ran = run_job(
        &client,
        garbage,
        &[("in".into(), input)],
        1,
        &[],
        AUTO_SPLIT,
    )
    .await?;
    let reason = ran.reason.expect("fails");
    assert!(reason.contains("not valid WebAssembly"), "{reason}");

    // A job that traps on some record: the reason names the task and the record.
    let hostile = publish(&client, "hostile").await?;
    let ran = run_job(
        &client,
        hostile,
        &[("in".into(), input)],
        1,
        &[("mode", "trap")],
        AUTO_SPLIT,
    )
    .await?;
    let reason = ran.reason.expect("fails");
    assert!(reason.contains("map task 0"), "{reason}");
    // Tried three times, on both daemons, before the job gave up.
    let failures: Vec<&String> = ran
        .events
        .iter()
        .filter_map(|e| match e {
            Event::TaskFailed { peer, .. } => Some(peer),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 3, "{:?}", ran.events);
    assert_eq!(failures.iter().collect::<HashSet<_>>().len(), 2);
    assert!(
        ran.events
            .iter()
            .any(|e| matches!(e, Event::TaskFailed { retry: false, .. })),
        "the failure is an event"
    );

    // With --skip-bad-records the job leaves out each record that failed its task twice, and
    // counts them: two bad records in one task, so the task fails four times and succeeds on
    // its fifth attempt.
    let mut text = b"good line\n".repeat(3000);
    text.extend_from_slice(b"TRAP one\n");
    text.extend_from_slice(&b"fine\n".repeat(2000));
    text.extend_from_slice(b"TRAP two, the last record without a newline");
    let bad = add(&client, text, 2).await?;
    let spec = |skip| {
        Ok::<_, anyhow::Error>(
            job_spec(
                hostile,
                &[("in".into(), bad)],
                1,
                &[("mode", "trap")],
                AUTO_SPLIT,
            )?
            .with_skip_bad_records(skip),
        )
    };
    let ran = run_spec(&client, spec(2)?).await?;
    let output = ran
        .output
        .ok_or_else(|| anyhow::anyhow!("{:?}", ran.reason))?;
    assert_eq!(
        read_output(&cluster, output).await?,
        vec![b"lines\t5000".to_vec()]
    );
    let skipped = ran.events.iter().find_map(|e| match e {
        Event::Completed { counters, .. } => Some(counters.skipped_records),
        _ => None,
    });
    assert_eq!(skipped, Some(2));
    let skipping = ran.events.iter().filter(|e| {
        matches!(e, Event::TaskFailed { reason, retry: true, .. } if reason.contains("skipping that record"))
    });
    assert_eq!(skipping.count(), 2, "{:?}", ran.events);
    // A limit of one is not enough: the job fails, naming the limit.
    let ran = run_spec(&client, spec(1)?).await?;
    let reason = ran.reason.expect("fails");
    assert!(reason.contains("limit of 1 bad records"), "{reason}");

    // The daemons still work.
    let ran = run_job(
        &client,
        wordcount,
        &[("in".into(), input)],
        2,
        &[],
        AUTO_SPLIT,
    )
    .await?;
    let output = ran.output.expect("succeeds");
    let lines = read_output(&cluster, output).await?;
    assert!(lines.contains(&b"TRAPs\t1000".to_vec()), "{lines:?}");
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

/// The corpus for the large test: `make-corpus.sh` text when the script is available (it is in
/// this project's development setup), else the demo's generated corpus.
fn big_corpus(mib: u64) -> Result<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = std::env::var_os("P2PMR_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("shared"))
        .join("bench/make-corpus.sh");
    if script.is_file() {
        // Tests run at once: the first to want a size makes its file while the others wait,
        // so none reads it half written.
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(format!("corpus-{mib}.txt"));
        if !out.is_file() {
            let status = std::process::Command::new("bash")
                .arg(&script)
                .arg(&out)
                .arg(mib.to_string())
                .stdout(std::process::Stdio::null())
                .status()?;
            if !status.success() {
                let _ = std::fs::remove_file(&out);
            }
        }
        if out.is_file() {
            return Ok(std::fs::read(out)?);
        }
    }
    eprintln!(
        "{} unavailable: using the generated corpus",
        script.display()
    );
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut p2pmr_node::corpus::Corpus::new(mib << 20), &mut bytes)?;
    Ok(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordcount_over_100_mib_on_four_daemons_equals_run_local() -> Result<()> {
    let corpus = big_corpus(101)?;
    assert!(corpus.len() >= 100 << 20);
    let expected = run_local("wordcount", &[("corpus".into(), corpus.clone())], 3, &[])?;
    let cluster = linked(4, 2).await?;
    let client = super::client(&cluster, 4).await?;
    let input = add(&client, corpus, 3).await?;
    // The file is three placement groups (174 leaves of 256 KiB, twice, then the rest), each
    // stored whole on the same daemons.
    let whole = tempfile::tempdir()?;
    let store = p2pmr_node::BlockStore::open(whole.path())?;
    client.blocks().copy_into(input, &store).await?;
    let groups = p2pmr_node::blocks::placement_groups(&store, &[input]);
    let holders = |cid: &Cid| -> Vec<usize> {
        (0..4)
            .filter(|&i| cluster.daemon(i).repo().blocks().has(cid))
            .collect()
    };
    let keys: HashSet<Cid> = groups.values().copied().collect();
    assert_eq!(keys.len(), 3);
    for (leaf, group) in &groups {
        assert_eq!(
            holders(leaf),
            holders(group),
            "leaf {leaf} of group {group}"
        );
        assert_eq!(holders(leaf).len(), 3);
    }
    let ran = wordcount_of_corpus(&client, input, 3, AUTO_SPLIT).await?;
    let output = ran
        .output
        .ok_or_else(|| anyhow::anyhow!("{:?}", ran.reason))?;
    assert!(ran_in_parallel(&ran.events, TaskKind::Map));
    // Each daemon was given two slots (so it does not share the machine's): eight slots,
    // an eighth of the input each, and a task also ends where the next group is on none of
    // the daemons that hold the task so far.
    let planned = ran.events.iter().find_map(|e| match e {
        Event::Planned { maps, .. } => Some(*maps),
        _ => None,
    });
    assert!(
        planned.is_some_and(|n| (8..=11).contains(&n)),
        "{planned:?}"
    );
    // No early exit: the output is complete and readable from any peer, here a new client.
    assert_eq!(read_output(&cluster, output).await?, expected);
    // The last event is the completion (the job succeeded above); its counters must hold.
    let Some(Event::Completed { counters, .. }) = ran.events.last() else {
        panic!(
            "the last event is not the completion: {:?}",
            ran.events.last()
        );
    };
    // Each task's leaves are on its group's holders, and the first round of tasks goes to
    // holders. A later one may not: a daemon that finished early and holds none of the rest
    // takes one once no holder has started a task for a while.
    let mut local_starts = ran.events.iter().filter_map(|e| match e {
        Event::TaskStarted {
            kind: TaskKind::Map,
            local_percent,
            ..
        } => Some(*local_percent),
        _ => None,
    });
    assert!(
        local_starts.by_ref().take(4).all(|l| l == 100),
        "{:?}",
        ran.events
    );
    let local = counters.local_map_bytes as f64
        / (counters.local_map_bytes + counters.remote_map_bytes) as f64;
    assert!(
        local >= 0.75,
        "only {local:.2} of the map input was read locally"
    );
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_task_is_cut_in_two_for_an_idle_daemon_and_the_output_is_exact() -> Result<()> {
    // One map task over 101 MiB on two daemons: the idle one is given the task's second half.
    let corpus = big_corpus(101)?;
    let expected = run_local("wordcount", &[("corpus".into(), corpus.clone())], 2, &[])?;
    let records = corpus.split_inclusive(|&b| b == b'\n').count() as u64;
    let size = corpus.len() as u64;
    let cluster = linked(2, 1).await?;
    let client = super::client(&cluster, 2).await?;
    let input = add(&client, corpus, 2).await?;
    let ran = wordcount_of_corpus(&client, input, 2, 1 << 30).await?;
    let output = ran
        .output
        .ok_or_else(|| anyhow::anyhow!("{:?}", ran.reason))?;
    let planned = ran.events.iter().find_map(|e| match e {
        Event::Planned { maps, .. } => Some(*maps),
        _ => None,
    });
    assert_eq!(planned, Some(1));
    let cuts: Vec<(u32, u64, u32)> = ran
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Split { task, at, rest } => Some((*task, *at, *rest)),
            _ => None,
        })
        .collect();
    let (task, at, rest) = *cuts.first().expect("a cut");
    assert_eq!((task, rest), (0, 1), "{cuts:?}");
    assert!(at >= p2pmr_protocol::engine::MIN_SPLIT_PART && at % (256 << 10) == 0);
    // Each part ran on its own daemon, at the same time, and finished once.
    let finished: Vec<(u32, String)> = ran
        .events
        .iter()
        .filter_map(|e| match e {
            Event::TaskFinished {
                kind: TaskKind::Map,
                task,
                peer,
                ..
            } => Some((*task, peer.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), cuts.len() + 1, "{finished:?}");
    assert_ne!(finished[0].1, finished[1].1);
    assert!(ran_in_parallel(&ran.events, TaskKind::Map));
    assert_eq!(read_output(&cluster, output).await?, expected);
    let Some(Event::Completed { counters, .. }) = ran.events.last() else {
        panic!("{:?}", ran.events.last());
    };
    // Every record was mapped once.
    assert_eq!(
        (counters.input_records, counters.input_bytes),
        (records, size)
    );
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

/// Adds an input and a job over it whose map tasks loop until their time limit (`millis`).
async fn looping_job(client: &Node, millis: u64) -> Result<(Cid, JobSpec)> {
    let input = add(client, b"spin here\n".repeat(100_000), 2).await?;
    let hostile = publish(client, "hostile").await?;
    let spec = JobSpec::new(
        hostile,
        vec![JobInput {
            name: "in".into(),
            cid: input,
        }],
        1,
        [("mode".to_string(), "loop".to_string())],
    )?
    .with_split_size(MIN_SPLIT)
    .with_limits(p2pmr_protocol::job::TaskLimits {
        timeout_ms: millis,
        ..Default::default()
    });
    Ok((input, spec))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_job_everywhere() -> Result<()> {
    let cluster = linked(2, 2).await?;
    let client = super::client(&cluster, 2).await?;
    let (input, spec) = looping_job(&client, 5_000).await?;
    let job = client.jobs().submit(spec, None).await?;
    let id = job.id();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let mut started_tx = Some(started_tx);
    let watcher = tokio::spawn(async move {
        job.wait(|e| {
            if matches!(e, Event::TaskStarted { .. }) {
                if let Some(tx) = started_tx.take() {
                    let _ = tx.send(());
                }
            }
        })
        .await
    });
    started_rx.await?;
    let cancelled_at = std::time::Instant::now();
    client.jobs().cancel(id, None).await?;
    let last = watcher.await?;
    assert!(
        matches!(last, Err(Error::JobCancelled { job }) if job == id),
        "{last:?}"
    );
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(3),
        "cancel took {:?}",
        cancelled_at.elapsed()
    );
    // Listed as cancelled; the daemons go on serving.
    let jobs = client.jobs().list().await?;
    assert!(jobs.iter().any(|(_, j)| j.as_ref().is_ok_and(|j| j
        .iter()
        .any(|s| s.job == id && s.state == p2pmr_protocol::engine::JobState::Cancelled))));
    let wordcount = publish(&client, "wordcount").await?;
    let ran = run_job(
        &client,
        wordcount,
        &[("in".into(), input)],
        1,
        &[],
        AUTO_SPLIT,
    )
    .await?;
    let lines = read_output(&cluster, ran.output.expect("succeeds")).await?;
    assert_eq!(
        lines,
        vec![b"here\t100000".to_vec(), b"spin\t100000".to_vec()]
    );
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

/// Runs `spec` while `kill_when` watches the events: when it names a daemon (by peer id), that
/// daemon is killed (its swarm dropped, as a crash). Returns the events and the output.
async fn run_and_kill(
    cluster: &mut Cluster,
    client: &Node,
    spec: &JobSpec,
    mut kill_when: impl FnMut(&Event, &str) -> Option<String>,
) -> Result<(Vec<Event>, Option<Cid>)> {
    let job = client.jobs().submit(spec.clone(), None).await?;
    let coordinator = job.coordinator().to_string();
    // The stream follows the job to another coordinator if this one dies.
    let mut stream = Box::pin(job.events());
    let mut events = Vec::new();
    let mut killed = false;
    while let Some(e) = stream.next().await {
        let e = e?;
        if !killed {
            if let Some(victim) = kill_when(&e, &coordinator) {
                let peer: libp2p::PeerId = victim.parse()?;
                let at = cluster.index_of(&peer).expect("a daemon of the cluster");
                cluster.take(at).expect("running").abort();
                killed = true;
            }
        }
        events.push(e);
    }
    assert!(killed, "the scenario's moment never came");
    let output = match events.last() {
        Some(Event::Completed { output, .. }) => Some(*output),
        _ => None,
    };
    Ok((events, output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outputs_copies_come_back_after_a_holder_is_lost_for_good() -> Result<()> {
    // A job's output is written by its reducers (its directory by the coordinator), which
    // hold it as much as the daemons they copied it to: the keepers leave a block short of
    // its target to its first-ranked holder, which may be its writer.
    let mut config = p2pmr_node::cluster::ClusterConfig::linked(4, 2);
    config.daemon.grace = Duration::from_secs(1);
    let mut cluster = Cluster::start(config).await?;
    let client = super::client(&cluster, 4).await?;
    let input = add(&client, words(20_000), 3).await?;
    let module = publish(&client, "wordcount").await?;
    let spec = job_spec(module, &[("words".into(), input)], 8, &[], MIN_SPLIT)?;
    let ran = run_spec(&client, spec).await?;
    let output = ran
        .output
        .ok_or_else(|| anyhow::anyhow!("{:?}", ran.reason))?;
    // The output's blocks (its directory and parts), and how many daemons hold each.
    let scratch = tempfile::tempdir()?;
    let store = p2pmr_node::BlockStore::open(scratch.path())?;
    client.blocks().copy_into(output, &store).await?;
    let cids: Vec<Cid> = store.list().collect::<Result<_, _>>()?;
    let copies = |cluster: &Cluster| -> Vec<usize> {
        cids.iter()
            .map(|c| {
                cluster
                    .daemons()
                    .filter(|d| d.repo().blocks().has(c))
                    .count()
            })
            .collect()
    };
    assert!(cids.len() >= 5, "parts and the directory: {}", cids.len());
    assert!(
        copies(&cluster).iter().all(|&n| n >= 3),
        "{:?}",
        copies(&cluster)
    );
    // The daemon holding the most of it dies for good; the copies come back on the others.
    let victim = (0..4)
        .max_by_key(|&i| {
            cids.iter()
                .filter(|c| cluster.daemon(i).repo().blocks().has(c))
                .count()
        })
        .unwrap();
    cluster.take(victim).unwrap().abort();
    let restored = tokio::time::timeout(Duration::from_secs(30), async {
        while !copies(&cluster).iter().all(|&n| n >= 3) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(restored.is_ok(), "copies now {:?}", copies(&cluster));
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_mappers_and_reducers_still_give_the_exact_output() -> Result<()> {
    let mut corpus = Vec::new();
    std::io::Read::read_to_end(&mut p2pmr_node::corpus::Corpus::new(12 << 20), &mut corpus)?;
    let expected = run_local("wordcount", &[("corpus".into(), corpus.clone())], 3, &[])?;
    // Three daemons die in turn: five, with four copies of the input, leave every block a
    // holder.
    let mut cluster = linked(5, 1).await?;
    let client = super::client(&cluster, 5).await?;
    let input = add(&client, corpus, 4).await?;
    let module = publish(&client, "wordcount").await?;
    let spec = |scenario: &str| -> Result<JobSpec> {
        Ok(JobSpec::new(
            module,
            vec![JobInput {
                name: "corpus".into(),
                cid: input,
            }],
            3,
            [("scenario".to_string(), scenario.to_string())],
        )?
        .with_split_size(MIN_SPLIT))
    };

    // A mapper dies after finishing a map task, during the map phase: the tasks it finished
    // run again elsewhere (their output went with it), the ones it was running too.
    // Then a reducer dies while reducing: its task runs elsewhere; the map outputs it held
    // are made again first. Partial output is never published.
    for (scenario, kind) in [("mapper", TaskKind::Map), ("reducer", TaskKind::Reduce)] {
        let (events, output) = run_and_kill(&mut cluster, &client, &spec(scenario)?, |e, coord| {
            // The first non-coordinator peer to finish a map task / to start a reduce task.
            let (k, peer) = match e {
                Event::TaskFinished { kind, peer, .. } if *kind == TaskKind::Map => (*kind, peer),
                Event::TaskStarted { kind, peer, .. } if *kind == TaskKind::Reduce => (*kind, peer),
                _ => return None,
            };
            (k == kind && peer != coord).then(|| peer.clone())
        })
        .await?;
        let output =
            output.ok_or_else(|| anyhow::anyhow!("{scenario}: failed: {:?}", events.last()))?;
        assert_eq!(read_output(&cluster, output).await?, expected, "{scenario}");
        let redone = events.iter().any(|e| match e {
            Event::TaskFailed {
                kind: TaskKind::Map,
                retry: true,
                reason,
                ..
            } => reason.contains("output lost"),
            Event::TaskFailed {
                kind: TaskKind::Reduce,
                retry: true,
                ..
            } => scenario == "reducer",
            _ => false,
        });
        assert!(redone, "{scenario}: lost work was not redone");
    }

    // The coordinator dies halfway through the map phase. The client hands the job to the
    // next daemon, which takes over the map outputs the live workers finished instead of
    // running those tasks again. The split is the automatic one: one task per slot, three
    // tasks on the three daemons left; the new coordinator sees two slots, and plans with
    // the split the workers report, not two tasks of its own.
    let mut finished = 0;
    let mut maps = u32::MAX;
    let auto = spec("coordinator")?.with_split_size(AUTO_SPLIT);
    let (events, output) = run_and_kill(&mut cluster, &client, &auto, |e, coord| {
        match e {
            Event::Planned { maps: m, .. } => maps = *m,
            Event::TaskFinished {
                kind: TaskKind::Map,
                ..
            } => finished += 1,
            _ => {}
        }
        (finished * 2 >= maps).then(|| coord.to_owned())
    })
    .await?;
    let output = output.ok_or_else(|| anyhow::anyhow!("coordinator: {:?}", events.last()))?;
    assert_eq!(
        read_output(&cluster, output).await?,
        expected,
        "coordinator"
    );
    let taken_over = events
        .iter()
        .rposition(|e| matches!(e, Event::Accepted { .. }));
    let reused = events.iter().find_map(|e| match e {
        Event::Reused { maps, .. } => Some(*maps),
        _ => None,
    });
    assert!(taken_over > Some(0), "no second coordinator took the job");
    let reused = reused.expect("the new coordinator reused no map output");
    // What the new coordinator ran again: every map task it did not reuse.
    let rerun = events[taken_over.unwrap()..]
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::TaskStarted {
                    kind: TaskKind::Map,
                    attempt: 1,
                    ..
                }
            )
        })
        .count();
    let done_before = events[..taken_over.unwrap()]
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::TaskFinished {
                    kind: TaskKind::Map,
                    ..
                }
            )
        })
        .count();
    eprintln!(
        "coordinator resume: {done_before} of {maps} map tasks had finished when the \
         coordinator died; the new one reused {reused} and ran {rerun} (of the finished ones \
         {} were redone: those whose output died with the coordinator)",
        done_before.saturating_sub(reused as usize)
    );
    // Whether any output died with the coordinator depends on whether it ran map tasks:
    // with placement groups it may hold none of the input and leave them to holders. A task
    // may also finish on a worker after the coordinator died, unseen by the client, and be
    // reused: more than the client saw finish.
    assert!(
        reused > 0 && reused <= maps,
        "{reused} of {maps}, {done_before} seen done before"
    );
    let planned: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Planned { maps, .. } => Some(*maps),
            _ => None,
        })
        .collect();
    assert_eq!(
        planned,
        [3, 3],
        "one map task per slot, the same plan after the takeover"
    );
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_daemons_leave_no_task_running() -> Result<()> {
    // Each test has its own runtime: every task the daemons started shows up in its count.
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = alive();
    let mut cluster = linked(2, 1).await?;
    let client = super::client(&cluster, 2).await?;
    let (_, spec) = looping_job(&client, 3_000).await?;
    // Stop the daemons mid-job: a coordinator driving it, workers running its tasks.
    let job = client.jobs().submit(spec, None).await?;
    let mut events = Box::pin(job.events());
    while let Some(e) = events.next().await {
        if matches!(e?, Event::TaskStarted { .. }) {
            break;
        }
    }
    drop(events);
    client.shutdown().await;
    for i in 0..2 {
        cluster.take(i).expect("running").stop().await?;
    }
    drop(cluster);
    // libp2p's connection tasks end once their swarm is gone; give them a moment, well under
    // the 3 s a task's wasm could still run (an untracked task would wait for it).
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while alive() > before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        alive(),
        before,
        "tasks left running after every daemon stopped"
    );
    Ok(())
}

/// Text of `lines` lines over a small vocabulary, the same each time.
fn words(lines: usize) -> Vec<u8> {
    let vocabulary = [
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
    ];
    let mut text = Vec::new();
    for i in 0..lines {
        for j in 0..8 {
            text.extend_from_slice(vocabulary[(i * 7 + j * 3) % vocabulary.len()].as_bytes());
            text.push(b' ');
        }
        text.extend_from_slice(format!("line{}\n", i % 997).as_bytes());
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_outvotes_a_daemon_that_returns_wrong_output_and_names_it() -> Result<()> {
    // Two honest daemons and one that alters a record of every map output it makes.
    let mut cluster = linked(2, 2).await?;
    let faulty = cluster
        .add(p2pmr_node::DaemonConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            bootstrap: cluster.addrs().into_iter().take(1).collect(),
            mdns: false,
            slots: 2,
            fault_wrong_output: true,
            ..p2pmr_node::DaemonConfig::default()
        })
        .await?;
    cluster.wait_linked().await?;
    let faulty = cluster.daemon(faulty).peer_id().to_string();
    let client = super::client(&cluster, 3).await?;
    let text = words(60_000); // ~3.5 MB: a dozen one-block map tasks
                              // On every daemon: the input is one placement group, and with fewer copies the faulty
                              // daemon might hold none of it and (holders starting tasks all along) run no map task.
    let input = vec![("words".to_string(), add(&client, text.clone(), 3).await?)];
    let expected = run_local("wordcount", &[("words".to_string(), text)], 2, &[])?;
    let module = publish(&client, "wordcount").await?;
    let spec = |verify| -> Result<JobSpec> {
        Ok(job_spec(module, &input, 2, &[], MIN_SPLIT)?.with_verify(verify))
    };
    let ran_on = |events: &[Event], peer: &str| {
        events.iter().any(
            |e| matches!(e, Event::TaskFinished { kind: TaskKind::Map, peer: p, .. } if p == peer),
        )
    };

    // Without verification the faulty daemon's maps corrupt the output.
    let plain = run_spec(&client, spec(1)?).await?;
    let output = plain
        .output
        .ok_or_else(|| anyhow::anyhow!("{:?}", plain.reason))?;
    assert!(
        ran_on(&plain.events, &faulty),
        "the faulty daemon ran no map task"
    );
    assert_ne!(
        read_output(&cluster, output).await?,
        expected,
        "the fault switch works"
    );

    // With --verify 2 the output is exact and the faulty daemon is named and left out.
    let verified = run_spec(&client, spec(2)?).await?;
    let output = verified
        .output
        .ok_or_else(|| anyhow::anyhow!("{:?}", verified.reason))?;
    assert_eq!(read_output(&cluster, output).await?, expected);
    let mismatches: Vec<(&Vec<String>, &Vec<String>)> = verified
        .events
        .iter()
        .filter_map(|e| match e {
            Event::VerifyMismatch {
                agreed, dissent, ..
            } => Some((agreed, dissent)),
            _ => None,
        })
        .collect();
    assert_eq!(mismatches.len(), 1, "excluded after its first mismatch");
    assert_eq!(mismatches[0].1, &vec![faulty.clone()]);
    assert!(!mismatches[0].0.contains(&faulty));
    let named_at = verified
        .events
        .iter()
        .position(|e| matches!(e, Event::VerifyMismatch { .. }))
        .expect("a mismatch");
    assert!(
        !verified.events[named_at..]
            .iter()
            .any(|e| matches!(e, Event::TaskStarted { peer, .. } if *peer == faulty)),
        "the faulty daemon got a task after it was named"
    );
    // Every task ran at least twice: once per verifying daemon.
    let (maps, _) = planned(&verified.events);
    let (started, _, distinct) = count_tasks(&verified.events, TaskKind::Map);
    assert_eq!(distinct.len(), maps as usize);
    assert!(started >= 2 * maps as usize);

    // More verifying daemons than there are is a clear failure before any task runs.
    let too_many = run_spec(&client, spec(4)?).await?;
    let reason = too_many.reason.expect("fails");
    assert!(reason.contains("needs 4 daemons"), "{reason}");
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_watches_neither_refuses_a_submission_nor_takes_a_tasks_handler() -> Result<()> {
    use p2pmr_protocol::engine::{JobRequest, JobResponse};
    let cluster = linked(2, 2).await?;
    let daemon = cluster.daemon(0).peer_id();
    let owner = super::client(&cluster, 2).await?;
    // A job that runs for a while, so its watchers wait for events.
    let (_, spec) = looping_job(&owner, 20_000).await?;
    let job = owner.jobs().submit(spec, Some(daemon)).await?;
    let mut events = std::pin::pin!(job.events());
    let first = events.next().await.expect("an event")?;
    assert!(matches!(first, Event::Accepted { .. }));
    let id = job.id();

    // 12 peers with 24 watches each (a connection carries 32 streams at most), all waiting for
    // events past the end of the log: more than the daemon's 256 handlers.
    let mut flooders = Vec::new();
    let mut watches = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let peer = super::client(&cluster, 2).await?;
        let net = peer.net(1).await?.clone();
        for _ in 0..24 {
            let net = net.clone();
            watches.spawn(async move {
                net.job_request(
                    daemon,
                    JobRequest::Watch {
                        job: id,
                        from: 1_000,
                    },
                )
                .await
            });
        }
        flooders.push(peer);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A submission and a task still get handlers while the watches wait.
    let other = super::client(&cluster, 2).await?;
    let module = publish(&other, "wordcount").await?;
    let input = add(&other, b"a b b\n".to_vec(), 1).await?;
    let ran = run_spec(
        &other,
        job_spec(module, &[("in".into(), input)], 1, &[], AUTO_SPLIT)?,
    )
    .await?;
    assert!(ran.output.is_some(), "{:?}", ran.reason);

    // Each flooder had its 8 watches; the rest were told why.
    let (mut waited, mut refused) = (0, 0);
    while let Some(answer) = watches.join_next().await {
        match answer? {
            Ok(JobResponse::Failed(reason)) if reason.contains("too many watches") => refused += 1,
            Ok(JobResponse::Events { .. }) => waited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((waited, refused), (12 * 8, 12 * 16));
    owner.jobs().cancel(id, Some(daemon)).await?;
    for peer in flooders {
        peer.shutdown().await;
    }
    owner.shutdown().await;
    other.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_four_daemons_in_a_chain_serve_clients_told_of_one_of_them() -> Result<()> {
    // Each daemon is told only of the one started before it and connects by itself to at
    // most 4 it discovers; the clients, to none past the one they are told of. So no peer
    // starts out knowing every daemon: placement, reads, `stat`, planning and the keeper find
    // the daemons each placement group needs with Kademlia lookups.
    let mut cluster = Cluster::start(p2pmr_node::cluster::ClusterConfig {
        daemons: 0,
        slots: 1,
        linked: false,
        daemon: p2pmr_node::DaemonConfig::default(),
    })
    .await?;
    for i in 0..24 {
        let bootstrap = cluster.addrs().into_iter().skip(i.max(1) - 1).collect();
        cluster
            .add(p2pmr_node::DaemonConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
                bootstrap,
                mdns: false,
                mesh: 4,
                slots: 1,
                ..p2pmr_node::DaemonConfig::default()
            })
            .await?;
    }
    let addrs = cluster.addrs();
    let told_of = |addr: &libp2p::Multiaddr| {
        Node::builder()
            .peers(vec![addr.clone()])
            .mdns(false)
            .mesh(1)
            .discovery(Duration::from_secs(5))
            .build()
    };
    let corpus = big_corpus(12)?;
    let expected = run_local("wordcount", &[("corpus".into(), corpus.clone())], 2, &[])?;
    // Added through the first, by a client that knows only it: two copies of each group
    // need the lookups.
    let writer = told_of(&addrs[0]);
    writer.peers().wait_for(1).await?;
    let net = writer.net(1).await?;
    assert_eq!(net.daemons().len(), 1);
    assert!(net.is_partial());
    let input = add(&writer, corpus.clone(), 2).await?;
    let blocks = writer.blocks().stat(input).await?.blocks;
    writer.shutdown().await;
    let ids: Vec<Vec<u8>> = cluster.daemons().map(|d| d.peer_id().to_bytes()).collect();
    // Each group went to 2 of its first 4 candidates by the rule over all 24 daemons, as a
    // placer that knew every daemon would have placed it.
    let leaves =
        p2pmr_node::engine::coordinator::leaves(cluster.daemon(0).node().fetcher(), input).await?;
    for leaf in &leaves {
        let holders: Vec<&Vec<u8>> = cluster
            .daemons()
            .filter(|d| d.repo().blocks().has(&leaf.cid))
            .map(|d| &ids[cluster.index_of(&d.peer_id()).expect("ours")])
            .collect();
        let candidates = &p2pmr_protocol::wire::rank_peers(&leaf.group, &ids)[..4];
        assert_eq!(holders.len(), 2, "leaf {}", leaf.cid);
        assert!(
            holders.iter().all(|h| candidates.contains(h)),
            "leaf {} of group {}",
            leaf.cid,
            leaf.group
        );
    }
    // Some daemon's mesh filled before it met every other.
    assert!(cluster.daemons().any(|d| d.net().is_partial()));
    // Read, counted and run through clients told only of the last daemon, or the middle one.
    for i in [23, 12] {
        let reader = told_of(&addrs[i]);
        reader.peers().wait_for(1).await?;
        // Kademlia's lookups over the daemons' routing tables find each key's neighbourhood,
        // the placement rule's candidates, as the rule computes it from every daemon.
        let net = reader.net(1).await?;
        for g in 0..6u64 {
            let key = *p2pmr_protocol::Block::raw(g.to_le_bytes().to_vec()).cid();
            let mut found: Vec<Vec<u8>> = net
                .neighbourhood(key)
                .await?
                .iter()
                .map(|p| p.to_bytes())
                .collect();
            found.sort();
            assert_eq!(
                found,
                neighbourhood(&key, &ids),
                "key {g} through daemon {i}"
            );
        }
        assert_eq!(cat_all(&reader, input).await?, corpus, "through daemon {i}");
        let stat = reader.blocks().stat(input).await?;
        assert_eq!(
            stat.replicas,
            vec![0, 0, blocks],
            "through daemon {i}: {stat:?}"
        );
        let module = publish(&reader, "wordcount").await?;
        let tag = i.to_string();
        let ran = run_job(
            &reader,
            module,
            &[("corpus".into(), input)],
            2,
            &[("through", &tag)],
            AUTO_SPLIT,
        )
        .await?;
        let output = ran
            .output
            .ok_or_else(|| anyhow::anyhow!("through daemon {i}: {:?}", ran.reason))?;
        assert_eq!(
            sorted_lines(&cat_all(&reader, output).await?),
            expected,
            "through daemon {i}"
        );
        reader.shutdown().await;
    }
    cluster.stop().await;
    Ok(())
}

/// The peers closest to either of `key`'s two places in Kademlia's keyspace, from every
/// peer's position: the neighbourhood a lookup should find.
fn neighbourhood(key: &Cid, peers: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use p2pmr_protocol::wire::{
        keyspace_distance, keyspace_keys, keyspace_position, NEIGHBOURHOOD,
    };
    let mut hood = Vec::new();
    for place in keyspace_keys(key) {
        let at = keyspace_position(&place);
        let mut by_distance = peers.to_vec();
        by_distance.sort_by_key(|p| keyspace_distance(&keyspace_position(p), &at));
        by_distance.truncate(NEIGHBOURHOOD);
        hood.extend(by_distance);
    }
    hood.sort();
    hood.dedup();
    hood
}

/// Map tasks of a job that started, and those whose outputs were reused from the workers'
/// memo, and reduce tasks of each.
fn memo_counts(ran: &Ran) -> ((usize, u32), (usize, u32)) {
    let (maps, _, _) = count_tasks(&ran.events, TaskKind::Map);
    let (reduces, _, _) = count_tasks(&ran.events, TaskKind::Reduce);
    let (mut reused_maps, mut reused_reduces) = (0, 0);
    for e in &ran.events {
        if let Event::Reused {
            maps,
            reduces,
            memo: true,
            ..
        } = e
        {
            reused_maps += maps;
            reused_reduces += reduces;
        }
    }
    ((maps, reused_maps), (reduces, reused_reduces))
}

/// `text` with `insert` put in at the first line start at or after `at`.
fn inserted(text: &[u8], at: usize, insert: &[u8]) -> Vec<u8> {
    let at = at + text[at..].iter().position(|&b| b == b'\n').unwrap_or(0) + 1;
    let mut out = text[..at].to_vec();
    out.extend_from_slice(insert);
    out.extend_from_slice(&text[at..]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_again_only_when_what_they_depend_on_changed() -> Result<()> {
    use p2pmr_protocol::chunker::Chunker;
    use p2pmr_protocol::unixfs::Layout;
    use std::io::Read;
    let cluster = linked(2, 2).await?;
    let client = super::client(&cluster, 2).await?;
    let mut text = Vec::new();
    p2pmr_node::corpus::Corpus::new(6 << 20).read_to_end(&mut text)?;
    let buzhash = Layout::KUBO.with_chunker(Chunker::Buzhash);
    let add_buzhash = |bytes: Vec<u8>| {
        let client = client.clone();
        async move {
            let added = client
                .blocks()
                .add_as(std::io::Cursor::new(bytes), Replicas::network(2), buzhash)
                .await?;
            anyhow::Ok(added.root)
        }
    };
    let input = add_buzhash(text.clone()).await?;
    let named = vec![("corpus".to_string(), input)];
    let wordcount = publish(&client, "wordcount").await?;
    let split = 1 << 20;
    let check = |ran: &Ran, bytes: &[u8], job: &str, reducers: u32, args: &[(&str, &str)]| {
        let output = ran
            .output
            .ok_or_else(|| anyhow::anyhow!("{job}: {:?}", ran.reason))?;
        let expected = run_local(job, &[("corpus".into(), bytes.to_vec())], reducers, args)?;
        anyhow::Ok((output, expected))
    };

    // The first run: every task runs.
    let first = run_job(&client, wordcount, &named, 2, &[], split).await?;
    let (output, expected) = check(&first, &text, "wordcount", 2, &[])?;
    assert_eq!(read_output(&cluster, output).await?, expected);
    let first_output = output;
    let (maps, reduces) = planned(&first.events);
    assert!(maps >= 4, "{maps} map tasks");
    assert_eq!(memo_counts(&first), ((maps as usize, 0), (2, 0)));

    // Another job doing the same tasks (only its time limit differs): every output is reused,
    // and the result is the same directory.
    let same =
        job_spec(wordcount, &named, 2, &[], split)?.with_limits(p2pmr_protocol::job::TaskLimits {
            timeout_ms: 30_000,
            ..Default::default()
        });
    let again = run_spec(&client, same.clone()).await?;
    assert_eq!(again.output, Some(output));
    assert_eq!(memo_counts(&again), ((0, maps), (0, reduces)));
    // Repeated content: tasks over the same leaves share a key, and one remembered output
    // serves them all.
    let tiled: Vec<u8> = text[..(1 << 20) + 77].repeat(5);
    let tiled_input = vec![("corpus".to_string(), add_buzhash(tiled.clone()).await?)];
    let tiled_spec = job_spec(wordcount, &tiled_input, 2, &[], split)?;
    let ran = run_spec(&client, tiled_spec.clone()).await?;
    let (tiled_output, expected) = check(&ran, &tiled, "wordcount", 2, &[])?;
    assert_eq!(read_output(&cluster, tiled_output).await?, expected);
    let n = planned(&ran.events).0;
    let ran = run_spec(&client, tiled_spec.with_skip_bad_records(1)).await?;
    assert_eq!(ran.output, Some(tiled_output));
    assert_eq!(memo_counts(&ran).0, (0, n), "every tiled task reused");

    // Under another name: wordcount never asks for it, so its map outputs are reused;
    // indexer keys its pairs by it, so its tasks run again.
    let renamed_input = vec![("other".to_string(), input)];
    let ran = run_job(&client, wordcount, &renamed_input, 2, &[], split).await?;
    assert_eq!(ran.output, Some(output));
    assert_eq!(memo_counts(&ran).0, (0, maps));
    let indexer = publish(&client, "indexer").await?;
    let first_name = run_job(&client, indexer, &named, 1, &[], split).await?;
    assert!(first_name.output.is_some(), "{:?}", first_name.reason);
    let ran = run_job(&client, indexer, &renamed_input, 1, &[], split).await?;
    let (output_renamed, expected) = {
        let output = ran
            .output
            .ok_or_else(|| anyhow::anyhow!("indexer: {:?}", ran.reason))?;
        let expected = run_local("indexer", &[("other".into(), text.clone())], 1, &[])?;
        (output, expected)
    };
    assert_eq!(read_output(&cluster, output_renamed).await?, expected);
    let n = planned(&ran.events).0 as usize;
    assert_eq!(memo_counts(&ran).0, (n, 0), "indexer under another name");

    // Without the memo, everything runs.
    let full = run_spec(&client, same.with_memo(false)).await?;
    assert_eq!(full.output, Some(output));
    assert_eq!(memo_counts(&full), ((maps as usize, 0), (2, 0)));

    // What a task depends on, changed one at a time: the module (the same code with a custom
    // section appended), an argument, the reducer count. Every task runs again.
    let mut renamed = shipped::by_name("wordcount").expect("shipped").to_vec();
    renamed.extend_from_slice(&[0, 6, 4, b'n', b'o', b't', b'e', 42]);
    let other_module = client.jobs().publish(renamed).await?;
    assert_ne!(other_module, wordcount);
    type Case<'a> = (&'a str, Cid, u32, &'a [(&'a str, &'a str)]);
    let cases: [Case; 3] = [
        ("module", other_module, 2, &[]),
        ("argument", wordcount, 2, &[("unused", "1")]),
        ("reducers", wordcount, 3, &[]),
    ];
    for (what, module, reducers, args) in cases {
        let ran = run_job(&client, module, &named, reducers, args, split).await?;
        let (output, expected) = check(&ran, &text, "wordcount", reducers, args)?;
        assert_eq!(read_output(&cluster, output).await?, expected, "{what}");
        let n = planned(&ran.events).0 as usize;
        assert_eq!(
            memo_counts(&ran),
            ((n, 0), (reducers as usize, 0)),
            "{what}"
        );
    }

    // A line inserted in the middle and one appended: the tasks around them run, the rest
    // are reused, and the output is exact.
    let mut edited = inserted(
        &text,
        text.len() / 2,
        b"an inserted line of brand new words\n",
    );
    edited.extend_from_slice(b"and one more at the end\n");
    let edited_input = add_buzhash(edited.clone()).await?;
    let edited_named = vec![("corpus".to_string(), edited_input)];
    let ran = run_job(&client, wordcount, &edited_named, 2, &[], split).await?;
    let (output, expected) = check(&ran, &edited, "wordcount", 2, &[])?;
    assert_eq!(read_output(&cluster, output).await?, expected);
    let n = planned(&ran.events).0;
    let ((ran_maps, reused_maps), _) = memo_counts(&ran);
    assert_eq!(ran_maps as u32 + reused_maps, n);
    assert!(
        (1..=3).contains(&ran_maps) && reused_maps >= 2,
        "{ran_maps} map tasks ran, {reused_maps} reused"
    );

    // grep keys its output by byte offset: after the insertion its tasks that moved run
    // again (and those before it are reused), and the output is exact.
    let grep = publish(&client, "grep").await?;
    let args: &[(&str, &str)] = &[("pattern", "^the ")];
    let before = run_job(&client, grep, &named, 1, args, split).await?;
    let (output, expected) = check(&before, &text, "grep", 1, args)?;
    assert_eq!(read_output(&cluster, output).await?, expected);
    let inserted_only = inserted(&text, text.len() / 2, b"the inserted line\n");
    let moved_input = add_buzhash(inserted_only.clone()).await?;
    let moved = vec![("corpus".to_string(), moved_input)];
    let after = run_job(&client, grep, &moved, 1, args, split).await?;
    let (output, expected) = check(&after, &inserted_only, "grep", 1, args)?;
    assert_eq!(read_output(&cluster, output).await?, expected);
    let ((ran_maps, reused_maps), _) = memo_counts(&after);
    let n = planned(&after.events).0 as usize;
    assert!(
        reused_maps >= 1,
        "the tasks before the insertion are reused"
    );
    assert!(
        ran_maps >= n / 3,
        "{ran_maps} of {n} grep tasks ran: those past the insertion must"
    );
    client.shutdown().await;

    // Both daemons restarted: what they remember comes back from their logs.
    let mut cluster = cluster;
    for i in 0..2 {
        cluster.take(i).expect("running").stop().await?;
    }
    let config = |bootstrap| p2pmr_node::DaemonConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")],
        bootstrap,
        mdns: false,
        slots: 2,
        ..Default::default()
    };
    cluster.restart(0, config(Vec::new())).await?;
    cluster.restart(1, config(cluster.addrs())).await?;
    cluster.wait_linked().await?;
    let client = super::client(&cluster, 2).await?;
    let later =
        job_spec(wordcount, &named, 2, &[], split)?.with_limits(p2pmr_protocol::job::TaskLimits {
            memory: 256 << 20,
            ..Default::default()
        });
    let ran = run_spec(&client, later).await?;
    assert_eq!(ran.output, Some(first_output));
    assert_eq!(
        memo_counts(&ran),
        ((0, maps), (0, reduces)),
        "after a restart"
    );
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}
