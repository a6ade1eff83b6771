//! Showing progress: a job's events as live bars on stderr (map and reduce tasks, bytes/s,
//! ETA, active peers, retries; the bytes of a fetch phase or pin), plain lines when stderr is
//! not a terminal, or one JSON object per event on stdout (`--json`); and a bar for the bytes
//! a data command moves.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use p2pmr_node::engine::events::event_json;
use p2pmr_protocol::engine::{Event, Phase, TaskKind};
use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::time::Duration;
use std::time::Instant;

/// How to show events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Bars (or plain lines) on stderr.
    Human,
    /// One JSON object per line on stdout.
    Json,
    /// Nothing.
    Quiet,
}

/// Renders a job's events as they arrive.
#[derive(Debug)]
pub(crate) struct Progress {
    mode: Mode,
    tty: bool,
    multi: MultiProgress,
    map: Option<ProgressBar>,
    reduce: Option<ProgressBar>,
    started: Instant,
    input_bytes: u64,
    mapped: u64,
    running: HashMap<(TaskKind, u32), String>,
    /// Tasks counted as finished.
    finished: HashSet<(TaskKind, u32)>,
    retries: u32,
    /// The fetch phase's bar and the last progress it showed.
    fetch: Option<ProgressBar>,
    fetched: Option<Event>,
}

/// A bar for a data command moving `total` bytes (or an unknown number), labelled `what`,
/// with bytes, MiB/s and ETA; drawn on stderr only when it is a terminal and `quiet` is off
/// (hidden otherwise, so scripts and pipes see nothing).
pub(crate) fn transfer(what: &str, total: Option<u64>, quiet: bool) -> ProgressBar {
    if !shown(quiet) {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::new(total),
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{msg} {spinner} {binary_bytes} {binary_bytes_per_sec}",
        ),
    };
    let style = ProgressStyle::with_template(template)
        .expect("the template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Whether [`transfer`] bars are drawn.
pub(crate) fn shown(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(6)..]
}

impl Progress {
    /// A renderer in `mode`.
    pub(crate) fn new(mode: Mode) -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if mode == Mode::Human && tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            mode,
            tty,
            multi: MultiProgress::with_draw_target(target),
            map: None,
            reduce: None,
            started: Instant::now(),
            input_bytes: 0,
            mapped: 0,
            running: HashMap::new(),
            finished: HashSet::new(),
            retries: 0,
            fetch: None,
            fetched: None,
        }
    }

    fn line(&self, text: String) {
        if self.mode == Mode::Human {
            if self.tty {
                let _ = self.multi.println(text);
            } else {
                eprintln!("{text}");
            }
        }
    }

    fn bar(&self, prefix: &'static str, len: u32) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(u64::from(len)));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} tasks {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix);
        bar
    }

    fn status(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.mapped as f64 / secs;
        let eta = if self.mapped > 0 && self.input_bytes > self.mapped {
            format!(
                ", ETA {:.0}s",
                (self.input_bytes - self.mapped) as f64 / rate
            )
        } else {
            String::new()
        };
        let mut peers: Vec<&str> = self.running.values().map(|p| short(p)).collect();
        peers.sort();
        peers.dedup();
        format!(
            "{:.1} MB/s{eta}, {} peers busy, {} retries",
            rate / 1e6,
            peers.len(),
            self.retries
        )
    }

    /// Shows one event.
    pub(crate) fn event(&mut self, event: &Event) {
        if self.mode == Mode::Json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", event_json(event));
            let _ = out.flush();
            return;
        }
        if self.mode == Mode::Quiet {
            return;
        }
        match event {
            Event::Accepted { job, coordinator } => {
                self.line(format!("job {job} accepted by {coordinator}"));
            }
            Event::Planned {
                maps,
                reduces,
                input_bytes,
                workers,
            } => {
                self.input_bytes = *input_bytes;
                self.line(format!(
                    "{maps} map and {reduces} reduce tasks over {:.1} MB on {workers} daemons",
                    *input_bytes as f64 / 1e6
                ));
                self.map = Some(self.bar("map", *maps));
                self.reduce = Some(self.bar("reduce", *reduces));
            }
            Event::Reused {
                maps,
                reduces,
                input_bytes,
                memo,
            } => {
                self.line(if *memo {
                    let over = match input_bytes {
                        0 => String::new(),
                        n => format!(" (over {:.1} MB of input)", *n as f64 / 1e6),
                    };
                    format!("reused {maps} map and {reduces} reduce task outputs the daemons remember{over}")
                } else {
                    format!("took over the job: {maps} map and {reduces} reduce tasks already done are reused")
                });
                for (bar, n) in [(&self.map, maps), (&self.reduce, reduces)] {
                    if let Some(bar) = bar {
                        bar.inc(u64::from(*n));
                    }
                }
            }
            Event::Phase(Phase::Fetch) => {
                self.line("no daemon holds the input: fetching it from IPFS peers".into());
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>7} {spinner} {msg}")
                        .expect("valid template"),
                );
                bar.set_prefix("fetch");
                bar.enable_steady_tick(Duration::from_millis(200));
                self.fetch = Some(bar);
            }
            Event::Phase(_) => {}
            Event::Fetching { done, .. } => {
                let text = fetched_text(event);
                if let Some(bar) = &self.fetch {
                    bar.set_message(text.clone());
                }
                if *done {
                    if let Some(bar) = self.fetch.take() {
                        bar.finish_and_clear();
                    }
                    self.line(format!("fetched {text}"));
                } else if !self.tty {
                    self.line(format!("fetching: {text}"));
                }
                self.fetched = Some(event.clone());
            }
            Event::TaskStarted {
                kind, task, peer, ..
            } => {
                self.running.insert((*kind, *task), peer.clone());
            }
            Event::Backup {
                kind,
                task,
                slow,
                peer,
            } => {
                self.line(format!(
                    "{} task {task} is slow on {}: a backup copy runs on {}",
                    kind.name(),
                    short(slow),
                    short(peer)
                ));
            }
            Event::Split { .. } => {
                // The rest of a task cut in two is one more task to finish.
                if let Some(bar) = &self.map {
                    bar.inc_length(1);
                }
            }
            Event::VerifyMismatch {
                kind,
                task,
                agreed,
                dissent,
            } => {
                let names = |peers: &[String]| {
                    peers
                        .iter()
                        .map(|p| short(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                self.line(format!(
                    "{} task {task}: output of {} differs from that of {}; {} left out of the job",
                    kind.name(),
                    names(dissent),
                    names(agreed),
                    if dissent.len() == 1 {
                        "it is"
                    } else {
                        "they are"
                    }
                ));
            }
            Event::TaskFinished {
                kind, task, bytes, ..
            } => {
                self.running.remove(&(*kind, *task));
                // Verification and re-runs finish a task more than once: count it once.
                if self.finished.insert((*kind, *task)) {
                    let bar = match kind {
                        TaskKind::Map => {
                            self.mapped += bytes;
                            &self.map
                        }
                        TaskKind::Reduce => &self.reduce,
                    };
                    if let Some(bar) = bar {
                        bar.inc(1);
                    }
                }
            }
            Event::TaskFailed {
                kind,
                task,
                peer,
                reason,
                retry,
            } => {
                self.running.remove(&(*kind, *task));
                if *retry {
                    self.retries += 1;
                }
                self.line(format!(
                    "{} task {task} failed on {}{}: {reason}",
                    kind.name(),
                    short(peer),
                    if *retry { " (retrying)" } else { "" }
                ));
            }
            Event::Completed {
                output,
                counters,
                elapsed_ms,
                cached,
            } => {
                self.finish_bars();
                if self.map.is_none() && self.fetched.is_some() && self.input_bytes == 0 {
                    // A pin: fetching was all there was to do.
                    self.line(format!(
                        "pinned {output} in {:.2}s",
                        *elapsed_ms as f64 / 1e3
                    ));
                } else if *cached {
                    self.line("done: the same job ran before; its output is reused".into());
                } else {
                    let local = counters.local_map_bytes as f64
                        / (counters.local_map_bytes + counters.remote_map_bytes).max(1) as f64;
                    self.line(format!(
                        "done in {:.2}s: {} records in, {} lines out, {:.0}% of map input read locally",
                        *elapsed_ms as f64 / 1e3,
                        counters.input_records,
                        counters.reduce_output_records,
                        local * 100.0
                    ));
                    if counters.skipped_records > 0 {
                        self.line(format!(
                            "skipped {} bad record(s) that kept failing their map task",
                            counters.skipped_records
                        ));
                    }
                }
            }
            Event::Failed { .. } | Event::Cancelled => self.finish_bars(),
        }
        let status = self.status();
        for bar in [&self.map, &self.reduce].into_iter().flatten() {
            bar.set_message(status.clone());
        }
    }

    fn finish_bars(&mut self) {
        for bar in [self.map.take(), self.reduce.take()].into_iter().flatten() {
            bar.finish();
        }
        if let Some(bar) = self.fetch.take() {
            bar.finish_and_clear();
        }
    }
}

/// A `Fetching` event in words.
fn fetched_text(event: &Event) -> String {
    let Event::Fetching {
        root,
        blocks,
        bytes,
        from_ipfs,
        retries,
        ..
    } = event
    else {
        return String::new();
    };
    format!(
        "{root}: {blocks} blocks, {:.1} MB ({from_ipfs} blocks from IPFS peers), {retries} retries",
        *bytes as f64 / 1e6
    )
}
