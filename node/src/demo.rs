//! `p2pmr demo`: a whole network in one process, to see p2pmr work before setting anything up.
//!
//! It starts three daemons on 127.0.0.1 (temporary repositories, no mDNS), adds a corpus with
//! two replicas (a file given by the user, or text generated here), runs the shipped
//! `wordcount` job through a coordinator with live progress, prints the ten most frequent
//! words, copies the output into the user's repository (so `p2pmr cat CID` works afterwards)
//! and shuts the network down cleanly.
//!
//! The generated corpus is deterministic: pseudo-words built from syllables, drawn with a
//! Zipf-like distribution (the frequency of the word of rank r is proportional to 1/r), in
//! lines of 6 to 17 words. It streams from a [`Read`] implementation and is never held whole.

use crate::client;
use crate::daemon::{Daemon, DaemonConfig};
use crate::progress::{Mode, Progress};
use crate::remote::{self, ClientConfig, ClientPeer, Fetcher};
use crate::shipped;
use crate::BlockStore;
use p2pmr_protocol::engine::Event;
use p2pmr_protocol::job::{JobInput, JobSpec};
use p2pmr_protocol::Cid;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Daemons the demo starts.
pub const DAEMONS: usize = 3;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// A text file to count; `None` generates `size` bytes.
    pub input: Option<PathBuf>,
    /// Size of the generated corpus in bytes.
    pub size: u64,
    /// Reduce partitions.
    pub reducers: u32,
    /// How progress is shown.
    pub mode: Mode,
    /// Where to copy the output (the user's repository), if anywhere.
    pub keep_in: Option<BlockStore>,
}

/// What the demo found.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The input's CID.
    pub input: Cid,
    /// Input size in bytes.
    pub input_bytes: u64,
    /// The output directory's CID.
    pub output: Cid,
    /// The most frequent words with their counts, most frequent first.
    pub top: Vec<(String, u64)>,
    /// Time to add the input.
    pub add_time: Duration,
    /// Time from submitting the job to its output.
    pub job_time: Duration,
}

/// Why the demo failed.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct DemoError(String);

fn fail(what: &str) -> impl FnOnce(String) -> DemoError + '_ {
    move |e| DemoError(format!("{what}: {e}"))
}

/// Runs the demo.
pub async fn run(config: DemoConfig) -> Result<DemoReport, DemoError> {
    let dirs: Vec<tempfile::TempDir> = (0..DAEMONS)
        .map(|_| {
            tempfile::tempdir()
                .map_err(|e| fail("cannot create a temporary directory")(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let mut daemons: Vec<Daemon> = Vec::new();
    for dir in &dirs {
        let bootstrap = daemons
            .first()
            .map(|d| d.listen_addrs())
            .unwrap_or_default();
        let daemon = Daemon::start(
            dir.path(),
            DaemonConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")],
                bootstrap,
                mdns: false,
                slots: 0,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| fail("cannot start a daemon")(e.to_string()))?;
        daemons.push(daemon);
    }
    let result = drive(&daemons, &config).await;
    for d in daemons {
        let _ = d.stop().await;
    }
    result
}

async fn drive(daemons: &[Daemon], config: &DemoConfig) -> Result<DemoReport, DemoError> {
    // Wait until the daemons know each other (the coordinator schedules on those it knows).
    for d in daemons {
        let mut watch = d.net().watch_daemons();
        let all = tokio::time::timeout(
            Duration::from_secs(10),
            watch.wait_for(|m| m.len() >= daemons.len() - 1),
        )
        .await;
        if !matches!(all, Ok(Ok(_))) {
            return Err(DemoError("the demo daemons did not find each other".into()));
        }
    }
    let peers = daemons.iter().flat_map(Daemon::listen_addrs).collect();
    let client = ClientPeer::connect(
        ClientConfig {
            peers,
            mdns: false,
            discovery: Duration::from_secs(5),
        },
        daemons.len(),
    )
    .await
    .map_err(|e| fail("cannot connect to the demo daemons")(e.to_string()))?;
    let net = client.net().clone();

    let started = Instant::now();
    let source: Box<dyn Read + Send> = match &config.input {
        Some(path) => Box::new(
            std::fs::File::open(path)
                .map_err(|e| DemoError(format!("cannot open {}: {e}", path.display())))?,
        ),
        None => Box::new(Corpus::new(config.size)),
    };
    let progress_line = |text: String| {
        if config.mode == Mode::Human {
            eprintln!("{text}");
        }
    };
    progress_line(format!(
        "demo: {} daemons on 127.0.0.1; adding {} with 2 replicas...",
        daemons.len(),
        match &config.input {
            Some(p) => p.display().to_string(),
            None => format!("a generated corpus of {} MB", config.size / 1_000_000),
        }
    ));
    let added = remote::add(&net, source, 2)
        .await
        .map_err(|e| fail("cannot add the input")(e.to_string()))?;
    let add_time = started.elapsed();
    progress_line(format!(
        "added {} ({:.1} MB) in {:.2}s",
        added.root,
        added.size as f64 / 1e6,
        add_time.as_secs_f64()
    ));

    let wasm = shipped::by_name("wordcount").expect("wordcount is shipped");
    let module = client::publish_module(&net, wasm.to_vec(), usize::MAX)
        .await
        .map_err(|e| fail("cannot publish the job")(e.to_string()))?;
    let spec = JobSpec::new(
        module,
        vec![JobInput {
            name: "corpus".into(),
            cid: added.root,
        }],
        config.reducers,
        Vec::new(),
    )
    .map_err(|e| DemoError(e.to_string()))?;
    let started = Instant::now();
    let coordinator =
        client::coordinator_for(&net, &spec.id(), None).map_err(|e| DemoError(e.to_string()))?;
    let job = client::submit(&net, coordinator, &spec)
        .await
        .map_err(|e| DemoError(e.to_string()))?;
    let mut progress = Progress::new(config.mode);
    let last = client::follow(&net, coordinator, job, Some(spec), |e| progress.event(e))
        .await
        .map_err(|e| DemoError(e.to_string()))?;
    let job_time = started.elapsed();
    let output = match last {
        Event::Completed { output, .. } => output,
        Event::Failed { reason } => return Err(DemoError(format!("the job failed: {reason}"))),
        other => return Err(DemoError(format!("the job ended with {other:?}"))),
    };

    // The ten most frequent words, streaming through the output.
    let fetcher = Fetcher::new(Some(net.clone()), None);
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
    fetcher
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
        .await
        .map_err(|e| fail("cannot read the output")(e.to_string()))?;
    if let Some(store) = &config.keep_in {
        fetcher
            .copy_into(output, store)
            .await
            .map_err(|e| fail("cannot copy the output into the repository")(e.to_string()))?;
    }
    client.close().await;
    Ok(DemoReport {
        input: added.root,
        input_bytes: added.size,
        output,
        top,
        add_time,
        job_time,
    })
}

/// A deterministic English-like corpus: Zipf-distributed pseudo-words in lines.
#[derive(Debug)]
pub struct Corpus {
    remaining: u64,
    words: Vec<String>,
    /// Cumulative weights of `words`, for sampling by binary search.
    cumulative: Vec<f64>,
    state: u64,
    line: Vec<u8>,
    at: usize,
}

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ne", "ru", "sa", "te", "vi", "an", "or", "el", "is", "ta", "po", "de", "ri",
    "mo", "lu", "be", "ca", "fi", "go", "hu", "je",
];

impl Corpus {
    /// A corpus of exactly `size` bytes.
    pub fn new(size: u64) -> Self {
        let n = 20_000;
        let words: Vec<String> = (0..n)
            .map(|i: usize| {
                // Frequent words are short, as in natural language.
                let mut w = String::new();
                let mut x = i + 1;
                while x > 0 {
                    w.push_str(SYLLABLES[x % SYLLABLES.len()]);
                    x /= SYLLABLES.len();
                }
                w
            })
            .collect();
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|r| {
                total += 1.0 / r as f64;
                total
            })
            .collect();
        Self {
            remaining: size,
            words,
            cumulative,
            state: 0x2545_f491_4f6c_dd1d,
            line: Vec::new(),
            at: 0,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill_line(&mut self) {
        self.line.clear();
        self.at = 0;
        let len = 6 + self.next_random() % 12;
        let total = *self.cumulative.last().expect("words");
        for i in 0..len {
            let u = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let r = self
                .cumulative
                .partition_point(|&c| c < u)
                .min(self.words.len() - 1);
            if i > 0 {
                self.line.push(b' ');
            }
            self.line.extend_from_slice(self.words[r].as_bytes());
        }
        self.line.push(b'\n');
    }
}

impl Read for Corpus {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() && self.remaining > 0 {
            if self.at == self.line.len() {
                self.fill_line();
            }
            let take = (self.line.len() - self.at)
                .min(buf.len() - n)
                .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            buf[n..n + take].copy_from_slice(&self.line[self.at..self.at + take]);
            self.at += take;
            n += take;
            self.remaining -= take as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn corpus_is_deterministic_sized_and_zipf_like() {
        let mut a = Vec::new();
        Corpus::new(1 << 20).read_to_end(&mut a).unwrap();
        let mut b = Vec::new();
        Corpus::new(1 << 20).read_to_end(&mut b).unwrap();
        assert_eq!(a.len(), 1 << 20);
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for w in text.split_whitespace() {
            *counts.entry(w).or_default() += 1;
        }
        let mut by_count: Vec<u64> = counts.values().copied().collect();
        by_count.sort_unstable_by(|a, b| b.cmp(a));
        // Rank 1 is about twice rank 2 and ten times rank 10.
        let (r1, r2, r10) = (by_count[0] as f64, by_count[1] as f64, by_count[9] as f64);
        assert!((1.6..2.5).contains(&(r1 / r2)), "{r1} {r2}");
        assert!((7.0..13.0).contains(&(r1 / r10)), "{r1} {r10}");
        assert!(counts.len() > 5000, "a wide vocabulary: {}", counts.len());
    }
}
