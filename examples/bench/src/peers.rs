//! `p2pmr-bench peers`: the network layer's figures, with real `p2pmr daemon` processes on
//! 127.0.0.1 and the `p2pmr` client as a user runs it.
//!
//! - transfer: `p2pmr cat` of a 256 MiB file held by one daemon (so every block crosses the
//!   network) against raw loopback TCP moving the same file's bytes in the same run;
//! - add: `p2pmr add --replicas 2` of 1 GiB over 3 fresh daemons against single-thread sha2-256;
//! - RSS: an idle daemon, and the high-water mark of daemons that took the 1 GiB add and then
//!   served it back.

use crate::{corpus, median, p2pmr_bin, sha256_file, tempdir_in_target, time, write_results, Row};
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A `p2pmr daemon` child process, killed when dropped.
pub(crate) struct DaemonProc {
    child: Child,
    pub(crate) addr: String,
}

impl DaemonProc {
    pub(crate) fn start(bin: &Path, home: &Path) -> Result<Self> {
        Self::start_with(bin, home, &[])
    }

    /// A daemon that dials `peers` at start (so the daemons of a job know each other).
    pub(crate) fn start_with(bin: &Path, home: &Path, peers: &[&str]) -> Result<Self> {
        Self::start_args(bin, home, peers, &[])
    }

    /// A daemon that dials `peers` at start, with extra daemon arguments (e.g. `--slots 1`).
    pub(crate) fn start_args(
        bin: &Path,
        home: &Path,
        peers: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        for p in peers {
            cmd.args(["--peer", p]);
        }
        let mut child = cmd
            .args(["--home", home.to_str().unwrap(), "--no-mdns", "daemon"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let Some(line) = lines.next() else {
                bail!("daemon exited before listening");
            };
            if let Some(addr) = line?.strip_prefix("listening on ") {
                break addr.to_owned();
            }
        };
        Ok(Self { child, addr })
    }

    /// A line of /proc/PID/status, in KiB.
    pub(crate) fn status_kib(&self, key: &str) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {key} in status"))
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn client(bin: &Path, daemons: &[&DaemonProc]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["--no-mdns", "--home", "/nonexistent-p2pmr-bench-home"]);
    for d in daemons {
        cmd.args(["--peer", &d.addr]);
    }
    cmd.stderr(Stdio::inherit());
    cmd
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The raw baseline: the file's bytes read in 256 KiB pieces and written to a loopback TCP
/// socket; a thread on the other end reads and discards them.
pub(crate) fn raw_tcp(path: &Path) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 262_144];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 262_144];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
    }
    drop(s);
    let got = reader.join().expect("reader thread")?;
    if got != path.metadata()?.len() {
        bail!("raw TCP moved {got} bytes");
    }
    Ok(())
}

pub(crate) fn peers(size_mib: u64, add_size_mib: u64, rounds: usize) -> Result<()> {
    let bin = p2pmr_bin()?;
    let input = corpus(size_mib)?;
    let big = corpus(add_size_mib)?;
    let scratch = tempdir_in_target("peers")?;
    let bytes = input.metadata()?.len() as f64;
    let big_bytes = big.metadata()?.len() as f64;
    sha256_file(&input)?;
    sha256_file(&big)?;

    // One daemon holds the whole file, so `cat` fetches every block over the network.
    let holder = DaemonProc::start(&bin, &scratch.join("holder"))?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let idle_rss = holder.status_kib("VmRSS:")?;
    let cid = output(
        client(&bin, &[&holder])
            .args(["add", "--replicas", "1"])
            .arg(&input),
    )?;

    let (mut tcp, mut cat, mut sha_big, mut add) = (vec![], vec![], vec![], vec![]);
    let mut serving_rss = 0;
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        tcp.push(time(|| raw_tcp(&input))?.0);
        cat.push(
            time(|| {
                let status = client(&bin, &[&holder])
                    .args(["cat", &cid])
                    .stdout(Stdio::null())
                    .status()?;
                if !status.success() {
                    bail!("cat failed");
                }
                Ok(())
            })?
            .0,
        );
        sha_big.push(time(|| sha256_file(&big))?.0);
        // Fresh daemons per round, so every block is really written.
        let homes: Vec<PathBuf> = (0..3)
            .map(|i| scratch.join(format!("r{round}-d{i}")))
            .collect();
        let three = homes
            .iter()
            .map(|h| DaemonProc::start(&bin, h))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&DaemonProc> = three.iter().collect();
        let (t, big_cid) = time(|| {
            output(
                client(&bin, &refs)
                    .args(["add", "--replicas", "2"])
                    .arg(&big),
            )
        })?;
        add.push(t);
        if round + 1 == rounds {
            // Then serve the 1 GiB back, and take the daemons' high-water marks.
            let status = client(&bin, &refs)
                .args(["cat", &big_cid])
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("cat of the 1 GiB file failed");
            }
            for d in &three {
                serving_rss = serving_rss.max(d.status_kib("VmHWM:")?);
            }
        }
        drop(three);
        for h in homes {
            let _ = fs::remove_dir_all(h);
        }
    }
    drop(holder);
    let _ = fs::remove_dir_all(&scratch);

    let row = Row::new;
    let tcp_m = median(tcp.clone());
    let sha_m = median(sha_big.clone());
    let rows = vec![
        row("raw loopback TCP, 256 MiB (baseline)", tcp, tcp_m, bytes),
        row("p2pmr cat from one daemon, 256 MiB", cat, tcp_m, bytes),
        row(
            &format!("sha2-256, 1 thread, {add_size_mib} MiB (baseline)"),
            sha_big,
            sha_m,
            big_bytes,
        ),
        row(
            &format!("p2pmr add --replicas 2 over 3 daemons, {add_size_mib} MiB"),
            add,
            sha_m,
            big_bytes,
        ),
    ];
    let extra = format!(
        "\"rss_kib\":{{\"idle_daemon\":{idle_rss},\"daemon_serving_{add_size_mib}mib\":{serving_rss}}}"
    );
    println!(
        "\npeers: {rounds} interleaved rounds, medians; each ratio is to the baseline above it"
    );
    write_results("peers", &rows, &extra)?;
    println!(
        "\ndaemon RSS: idle {:.1} MiB; peak while taking and serving {add_size_mib} MiB {:.1} MiB",
        idle_rss as f64 / 1024.0,
        serving_rss as f64 / 1024.0
    );
    Ok(())
}
