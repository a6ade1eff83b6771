//! `p2pmr run-local`: a job over local files on all cores, in this process.

use crate::args::RunLocalArgs;
use crate::env::Env;
use anyhow::{bail, Context, Result};
use p2pmr_node::engine::local::{self, LocalJob};
use p2pmr_node::engine::runtime::{Executor, Limits};
use p2pmr_node::repo::files;
use p2pmr_node::FileError;
use p2pmr_protocol::unixfs::Layout;
use std::fs::File;
use std::io::{self, Write};
use std::time::Duration;

pub(crate) fn run(env: &Env, args: RunLocalArgs) -> Result<()> {
    let (name, wasm) = env.resolve_job(&args.job)?;
    // Locally the user is the daemon: the CLI limits are the only ceiling.
    let exec = Executor::new(Limits {
        memory: usize::MAX,
        timeout: Duration::MAX,
        output: u64::MAX,
    })?;
    let cid = files::import(&wasm[..], None, Layout::KUBO)?.root;
    let module = exec.load(cid, &name, &wasm)?;
    let mut spec = LocalJob {
        args: p2pmr_protocol::abi::encode_args(
            args.args.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ),
        reducers: args.reducers,
        limits: Limits {
            memory: usize::try_from(args.memory_mib << 20).unwrap_or(usize::MAX),
            timeout: Duration::from_secs(args.timeout_secs),
            output: args.output_limit_mib << 20,
        },
        split: args.split_mib << 20,
        ..LocalJob::default()
    };
    if let Some(t) = args.threads {
        spec.threads = t as usize;
    }
    for input in &args.inputs {
        if input.is_dir() {
            bail!("{} is a directory; --input takes files", input.display());
        }
    }
    // Partitions are written to files as they are reduced (in DIR, or in a temporary directory
    // whose files are then copied to stdout in order): never all in memory.
    let scratch;
    let dir = match &args.output {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
            scratch.path().to_owned()
        }
    };
    let part = |r: u32| dir.join(format!("part-{r:05}"));
    let counters = local::run(&exec, &module, &spec, &args.inputs, |r| {
        File::create(part(r)).map(io::BufWriter::new)
    })?;
    tracing::info!("{counters:?}");
    if args.output.is_none() {
        let mut out = io::stdout().lock();
        for r in 0..args.reducers {
            let mut f = File::open(part(r)).context("cannot reopen output")?;
            io::copy(&mut f, &mut out).map_err(FileError::Output)?;
        }
        out.flush().map_err(FileError::Output)?;
    }
    Ok(())
}
