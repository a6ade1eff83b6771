//! The wasm job runtime end to end: the shipped jobs (built from `wasm-jobs/` by build.rs) give
//! the same output in wasm as natively, `run-local` output does not depend on the number of
//! reducers or on where splits fall, and hostile modules fail with typed errors within their
//! limits while the executor goes on serving.

use p2pmr_guest::Job;
use p2pmr_node::engine::local::{self, LocalJob};
use p2pmr_node::engine::runtime::{Executor, JobError, JobModule, Limits, TaskName};
use p2pmr_node::engine::shipped;
use p2pmr_protocol::abi::encode_args;
use p2pmr_protocol::Block;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn executor() -> Arc<Executor> {
    Executor::new(Limits::default()).unwrap()
}

fn load(exec: &Executor, name: &str) -> Arc<JobModule> {
    let wasm = shipped::by_name(name).unwrap();
    exec.load(*Block::raw(wasm.to_vec()).cid(), name, wasm)
        .unwrap()
}

/// Inputs with every awkward case in them.
fn awkward_inputs(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut long_line = "word ".repeat(300_000).into_bytes(); // 1.5 MiB, one record
    long_line.extend_from_slice(b"end\n");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty.txt", vec![]),
        ("no-newline.txt", b"the last line has no newline".to_vec()),
        (
            "crlf.txt",
            b"windows line\r\nanother one\r\nthe\r\n".to_vec(),
        ),
        ("long.txt", long_line),
        (
            "utf8.txt",
            "Straße naïve ΔΣ 日本語 the\nÉcole école\n"
                .as_bytes()
                .to_vec(),
        ),
        (
            "invalid.txt",
            b"ab\xffcd \xe6\x97 the\n\xc3\n\xf0\x9f\x98\x80x\n".to_vec(),
        ),
        (
            "text.txt",
            "the quick brown fox jumps over the lazy dog\n"
                .repeat(5000)
                .into_bytes(),
        ),
    ];
    files
        .into_iter()
        .map(|(name, bytes)| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect()
}

fn run_wasm(
    exec: &Executor,
    module: &JobModule,
    inputs: &[PathBuf],
    args: &[(&str, &str)],
    reducers: u32,
    split: u64,
) -> Vec<u8> {
    let job = LocalJob {
        args: encode_args(args.iter().copied()),
        reducers,
        split,
        batch: 4096,
        ..LocalJob::default()
    };
    let parts: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(vec![Vec::new(); reducers as usize]));
    struct Part(Arc<Mutex<Vec<Vec<u8>>>>, usize);
    impl std::io::Write for Part {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap()[self.1].extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    local::run(exec, module, &job, inputs, |r| {
        Ok(Part(parts.clone(), r as usize))
    })
    .unwrap();
    let parts = parts.lock().unwrap().clone();
    parts.concat()
}

fn run_native<J: Job>(inputs: &[PathBuf], args: &[(&str, &str)], reducers: u32) -> Vec<u8> {
    let data: Vec<(String, Vec<u8>)> = inputs
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read(p).unwrap()))
        .collect();
    let refs: Vec<(&str, &[u8])> = data
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    p2pmr_guest::local::run::<J>(&refs, args, reducers).concat()
}

fn sorted_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    lines.sort();
    lines
}

#[test]
fn shipped_jobs_match_native_for_any_reducers_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = awkward_inputs(dir.path());
    let exec = executor();
    type Native = fn(&[PathBuf], &[(&str, &str)], u32) -> Vec<u8>;
    type Case = (&'static str, Vec<(&'static str, &'static str)>, Native);
    let cases: Vec<Case> = vec![
        (
            "wordcount",
            vec![],
            run_native::<p2pmr_job_wordcount::WordCount>,
        ),
        (
            "grep",
            vec![("pattern", "the|ab")],
            run_native::<p2pmr_job_grep::Grep>,
        ),
        ("indexer", vec![], run_native::<p2pmr_job_indexer::Indexer>),
    ];
    for (name, args, native) in cases {
        let module = load(&exec, name);
        let reference = native(&inputs, &args, 1);
        assert!(reference.len() > 100, "{name} produced output");
        // Partition by partition, natively and in wasm, each in key order.
        for reducers in [1, 2, 7] {
            assert_eq!(
                run_wasm(&exec, &module, &inputs, &args, reducers, 64 << 20),
                native(&inputs, &args, reducers),
                "{name} with {reducers} reducers: wasm and native differ"
            );
        }
        // Splits that fall anywhere (even inside the 1.5 MiB line) change nothing.
        for (reducers, split) in [(1, 1000), (2, 4096), (7, 333_333)] {
            assert_eq!(
                sorted_lines(&run_wasm(&exec, &module, &inputs, &args, reducers, split)),
                sorted_lines(&reference),
                "{name}: {reducers} reducers, {split}-byte splits"
            );
        }
    }
}

#[test]
fn wordcount_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = awkward_inputs(dir.path());
    let exec = executor();
    let out = run_wasm(&exec, &load(&exec, "wordcount"), &inputs, &[], 1, 1 << 20);
    let out = String::from_utf8(out).unwrap();
    let count = |w: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{w}\t")))
            .map(|n| n.parse::<u64>().unwrap())
    };
    assert_eq!(count("the"), Some(10_000 + 1 + 1 + 1 + 1));
    assert_eq!(count("word"), Some(300_000));
    assert_eq!(count("École"), Some(1));
    assert_eq!(count("école"), Some(1));
    assert_eq!(count("Straße"), Some(1));
    assert_eq!(count("cd"), Some(1)); // split by an invalid byte
    assert_eq!(count("x"), Some(1)); // an emoji is not a letter
    assert!(out.lines().all(|l| !l.contains('\r')));
}

fn hostile(exec: &Executor, mode: &str, limits: Limits) -> (Result<(), JobError>, Duration) {
    let module = load(exec, "hostile");
    let task = TaskName {
        job: "hostile".into(),
        task: "map 0".into(),
        input: "in".into(),
    };
    let started = Instant::now();
    let result = (|| {
        let mut map = exec.map_task(&module, task, &encode_args([("mode", mode)]), 2, limits)?;
        map.batch(b"fine\nalso fine\nTRAP me\nnever\n", 100)?;
        map.finish().map(|_| ())
    })();
    (result, started.elapsed())
}

#[test]
fn hostile_modules_fail_with_typed_errors_and_the_executor_goes_on() {
    let exec = executor();
    let limits = Limits {
        memory: 32 << 20,
        timeout: Duration::from_millis(500),
        output: 1 << 20,
    };
    let (r, took) = hostile(&exec, "loop", limits);
    assert!(matches!(r, Err(JobError::Timeout { .. })), "{r:?}");
    assert!(took < Duration::from_secs(3), "timeout took {took:?}");
    let (r, _) = hostile(&exec, "oom", limits);
    assert!(
        matches!(r, Err(JobError::Memory { limit, .. }) if limit == 32 << 20),
        "{r:?}"
    );
    let (r, _) = hostile(&exec, "flood", limits);
    assert!(
        matches!(r, Err(JobError::Output { limit, .. }) if limit == 1 << 20),
        "{r:?}"
    );
    let (r, _) = hostile(&exec, "trap", limits);
    match r {
        Err(e @ JobError::Trap { .. }) => {
            let msg = e.to_string();
            // The record at byte 100 + 15 of the input holds TRAP.
            assert!(msg.contains("at record offset 115"), "{msg}");
            assert!(
                msg.contains("asked for it") && msg.contains("map 0 on in"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The same executor still runs well-behaved tasks, also concurrently with a bad one.
    let (r, _) = hostile(&exec, "", limits);
    assert!(r.is_ok(), "{r:?}");
    std::thread::scope(|s| {
        let bad = s.spawn(|| hostile(&exec, "loop", limits).0);
        for _ in 0..20 {
            assert!(hostile(&exec, "", limits).0.is_ok());
        }
        assert!(matches!(bad.join().unwrap(), Err(JobError::Timeout { .. })));
    });
}

/// A module with every ABI export, each returning `version`; with `start_loops`, a start
/// function that never returns (it runs when the module is instantiated, i.e. loaded).
fn fake_module(version: i32, skip: Option<&str>, start_loops: bool) -> Vec<u8> {
    use wasm_encoder::{
        BlockType, CodeSection, ExportKind, ExportSection, Function, FunctionSection, Instruction,
        MemorySection, MemoryType, Module, StartSection, TypeSection, ValType,
    };
    let mut types = TypeSection::new();
    types.ty().function([], [ValType::I32]);
    types.ty().function([ValType::I32], [ValType::I32]);
    types
        .ty()
        .function([ValType::I32, ValType::I64], [ValType::I32]);
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    let mut exports = ExportSection::new();
    let mut index = 0;
    for (name, params, _) in p2pmr_protocol::abi::REQUIRED_EXPORTS {
        if Some(name) == skip {
            continue;
        }
        funcs.function(params as u32);
        let mut f = Function::new([]);
        f.instruction(&Instruction::I32Const(version));
        f.instruction(&Instruction::End);
        code.function(&f);
        exports.export(name, ExportKind::Func, index);
        index += 1;
    }
    if start_loops {
        types.ty().function([], []);
        funcs.function(3);
        let mut f = Function::new([]);
        f.instruction(&Instruction::Loop(BlockType::Empty));
        f.instruction(&Instruction::Br(0));
        f.instruction(&Instruction::End);
        f.instruction(&Instruction::End);
        code.function(&f);
    }
    let mut memory = MemorySection::new();
    memory.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    exports.export("memory", ExportKind::Memory, 0);
    let mut module = Module::new();
    module
        .section(&types)
        .section(&funcs)
        .section(&memory)
        .section(&exports);
    if start_loops {
        module.section(&StartSection {
            function_index: index,
        });
    }
    module.section(&code);
    module.finish()
}

#[test]
fn bad_modules_are_rejected_before_any_task_runs() {
    let exec = executor();
    let load = |bytes: &[u8]| exec.load(*Block::raw(bytes.to_vec()).cid(), "bad", bytes);
    assert!(matches!(
        load(b"not wasm at all"),
        Err(JobError::InvalidWasm { .. })
    ));
    assert!(matches!(
        load(b"\0asm\x01\0\0\0"),
        Err(JobError::NotAJob { .. })
    ));
    let err = load(&fake_module(2, None, false)).unwrap_err();
    assert!(
        matches!(
            err,
            JobError::AbiVersion {
                found: 2,
                expected: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("ABI v2"), "{err}");
    let err = load(&fake_module(1, Some("p2pmr_reduce"), false)).unwrap_err();
    assert!(err.to_string().contains("p2pmr_reduce"), "{err}");
    // A start function that loops is stopped by the job's time limit, not a fixed one.
    let looping = fake_module(1, None, true);
    let limits = Limits {
        timeout: std::time::Duration::from_millis(500),
        ..Limits::default()
    };
    let started = Instant::now();
    let err = exec
        .load_with(
            *Block::raw(looping.clone()).cid(),
            "loops",
            &looping,
            limits,
        )
        .unwrap_err();
    assert!(matches!(err, JobError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The real thing loads, and loading is cached per CID.
    let a = load(shipped::by_name("wordcount").unwrap()).unwrap();
    let b = load(shipped::by_name("wordcount").unwrap()).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_jobs_whose_modules_loop_while_loading_do_not_stall_cat() -> anyhow::Result<()> {
    use futures::FutureExt;
    use p2pmr_node::Replicas;
    use p2pmr_protocol::job::{JobInput, JobSpec, TaskLimits};
    let cluster = super::linked(1, 2).await?;
    let client = super::client(&cluster, 1).await?;
    let text: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let root = client
        .blocks()
        .add(std::io::Cursor::new(text.clone()), Replicas::network(1))
        .await?
        .root;
    let timed_cat = || {
        let client = client.clone();
        let text = text.clone();
        async move {
            let started = Instant::now();
            let read = tokio::time::timeout(Duration::from_secs(20), super::cat_all(&client, root));
            assert!(read.await?? == text);
            Ok::<_, anyhow::Error>(started.elapsed())
        }
        .boxed()
    };
    let mut quiet = Vec::new();
    for _ in 0..5 {
        quiet.push(timed_cat().await?);
    }
    quiet.sort();

    // Eight modules whose start function loops (each a different CID: a custom section names
    // it), each run as a job with a 10 s limit: the daemon spends that long loading each.
    let mut jobs = Vec::new();
    for i in 0..8u8 {
        let mut wasm = fake_module(1, None, true);
        wasm.extend_from_slice(&[0, 3, 2, b'v', b'0' + i]);
        let module = client.jobs().publish(wasm).await?;
        let input = JobInput {
            name: "in".into(),
            cid: root,
        };
        let spec = JobSpec::new(module, vec![input], 1, [])?.with_limits(TaskLimits {
            timeout_ms: 10_000,
            ..TaskLimits::default()
        });
        jobs.push(client.jobs().submit(spec, None).await?);
    }
    let mut busy = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        busy.push(timed_cat().await?);
    }
    busy.sort();
    eprintln!(
        "cat of 4 MiB: median {:?} quiet; while 8 jobs' modules loop in loading: median {:?} \
         ({} runs), slowest {:?}",
        quiet[quiet.len() / 2],
        busy[busy.len() / 2],
        busy.len(),
        busy[busy.len() - 1]
    );
    assert!(
        busy[busy.len() - 1] < Duration::from_secs(5),
        "a cat took {:?}",
        busy[busy.len() - 1]
    );
    // The loads did loop until their limit.
    let first = tokio::time::timeout(Duration::from_secs(30), jobs[0].wait(|_| ())).await?;
    let reason = first
        .expect_err("a module that loops does not load")
        .to_string();
    assert!(reason.contains("time limit"), "{reason}");
    client.shutdown().await;
    cluster.stop().await;
    Ok(())
}
