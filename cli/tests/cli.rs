//! The `p2pmr` binary end to end, on real files in temporary repositories: CIDs at the chunk
//! and fan-out boundaries, round trips, corruption, a kill -9 in the middle of `add`, and the
//! one-line errors for bad input.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_p2pmr");
const CHUNK: u64 = 262_144;

fn p2pmr(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--home")
        .arg(home)
        // Only the peers a test names: never whatever else is on this machine's LAN.
        .arg("--no-mdns")
        .args(args)
        .env_remove("P2PMR_HOME")
        .env_remove("P2PMR_PEERS")
        .env_remove("P2PMR_SWARM_KEY")
        .env_remove("P2PMR_FORCE_PNET")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

/// The "mix" content of the vector file (see protocol/tests/vectors/gen-vectors.mjs).
fn mix(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| (7 * i + i / 2048 + 13 * (i / 262_144)) as u8)
        .collect()
}

fn expected_cid(size: u64) -> String {
    let table = include_str!("../../protocol/tests/vectors/unixfs.tsv");
    table
        .lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f[0] == "mix" && f[1] == size.to_string() && f[2] == CHUNK.to_string())
        .unwrap_or_else(|| panic!("no vector for {size}"))[4]
        .to_owned()
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

fn block_files(home: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in fs::read_dir(home.join("blocks")).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

#[test]
fn public_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let hello = write_file(dir.path(), "hello", b"hello world\n");
    let empty = write_file(dir.path(), "empty", b"");
    for (file, cid) in [
        (
            &hello,
            "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4",
        ),
        (
            &empty,
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
        ),
    ] {
        let out = p2pmr(&home, &["add", "-n", file.to_str().unwrap()]);
        assert!(out.status.success());
        assert_eq!(stdout(&out), cid);
        let out = p2pmr(&home, &["add", "--local", file.to_str().unwrap()]);
        assert_eq!(stdout(&out), cid);
        let out = p2pmr(&home, &["cat", cid]);
        assert!(out.status.success());
        assert_eq!(out.stdout, fs::read(file).unwrap());
    }
}

#[test]
fn boundary_sizes_round_trip_with_kubo_cids() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    for size in [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        174 * CHUNK,
        174 * CHUNK + 1,
    ] {
        let data = mix(size);
        let file = write_file(dir.path(), "input", &data);
        let only_hash = p2pmr(&home, &["add", "--only-hash", file.to_str().unwrap()]);
        let added = p2pmr(&home, &["add", "--local", file.to_str().unwrap()]);
        assert!(
            added.status.success(),
            "{size}: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        let cid = stdout(&added);
        assert_eq!(cid, expected_cid(size), "size {size}");
        assert_eq!(stdout(&only_hash), cid, "size {size}: --only-hash differs");
        // Adding again is stable and stores nothing new.
        let before = block_files(&home).len();
        assert_eq!(
            stdout(&p2pmr(&home, &["add", "--local", file.to_str().unwrap()])),
            cid
        );
        assert_eq!(block_files(&home).len(), before);
        let cat = p2pmr(&home, &["cat", &cid]);
        assert!(cat.status.success());
        assert!(cat.stdout == data, "size {size}: cat differs");
        let tail = p2pmr(&home, &["cat", "--offset", &(size / 3).to_string(), &cid]);
        assert!(
            tail.stdout[..] == data[(size / 3) as usize..],
            "size {size}: cat --offset differs"
        );
    }
}

/// Runs `p2pmr ARGS` on a pseudo-terminal (util-linux `script`), as a user at a terminal
/// would; returns what the terminal showed.
fn on_a_terminal(home: &Path, args: &[&str]) -> String {
    let mut command = format!("{BIN} --home {} --no-mdns", home.display());
    for a in args {
        command.push(' ');
        command.push_str(a);
    }
    let typescript = home.with_extension("typescript");
    let out = Command::new("script")
        .args(["-qfec", &command])
        .arg(&typescript)
        .env_remove("P2PMR_HOME")
        .env_remove("P2PMR_PEERS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&fs::read(&typescript).unwrap()).into_owned()
}

#[test]
fn data_commands_show_progress_on_a_terminal_and_nothing_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let input = write_file(dir.path(), "in.bin", &mix(16 << 20));
    let input = input.to_str().unwrap();
    // Not a terminal: the CID alone on stdout, nothing on stderr.
    let added = p2pmr(&home, &["add", "--local", input]);
    assert!(
        added.status.success() && added.stderr.is_empty(),
        "{added:?}"
    );
    let cid = stdout(&added);
    // A terminal: a bar with bytes, rate and ETA, then the CID.
    let shown = on_a_terminal(&home, &["add", "--local", input]);
    let bar = |what: &str| format!("{what} [");
    assert!(
        shown.contains(&bar("add")) && shown.contains("/16.00 MiB") && shown.contains("B/s"),
        "{shown}"
    );
    assert!(shown.contains(&cid), "{shown}");
    let out = dir.path().join("out.bin");
    let shown = on_a_terminal(&home, &["get", "-o", out.to_str().unwrap(), &cid]);
    assert!(
        shown.contains(&bar("get")) && shown.contains("/16.00 MiB"),
        "{shown}"
    );
    let shown = on_a_terminal(&home, &["cat", &cid, ">", "/dev/null"]);
    assert!(
        shown.contains(&bar("cat")) && shown.contains("ETA"),
        "{shown}"
    );
    assert_eq!(fs::read(&out).unwrap(), mix(16 << 20));
    let shown = on_a_terminal(&home, &["dag", "export", &cid, ">", "/dev/null"]);
    assert!(
        shown.contains("export ") && shown.contains("B/s"),
        "{shown}"
    );
    // --quiet: no bar.
    let shown = on_a_terminal(&home, &["--quiet", "add", "--local", input]);
    assert!(!shown.contains("B/s") && shown.contains(&cid), "{shown}");
}

#[test]
fn only_hash_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let file = write_file(dir.path(), "f", &mix(3 * CHUNK));
    assert!(p2pmr(&home, &["add", "-n", file.to_str().unwrap()])
        .status
        .success());
    assert!(
        !home.exists(),
        "--only-hash must not even create the repository"
    );
}

#[test]
fn dag_export_and_import_move_a_file_between_repositories() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let bytes = mix(2633785);
    let file = write_file(dir.path(), "f", &bytes);
    let added = p2pmr(&a, &["add", "--local", file.to_str().unwrap()]);
    let cid = stdout(&added);
    assert_eq!(cid, expected_cid(2633785));
    let export = p2pmr(&a, &["dag", "export", &cid]);
    assert!(export.status.success(), "{export:?}");
    let car = write_file(dir.path(), "f.car", &export.stdout);
    // Into another repository: the same file comes back out.
    let import = p2pmr(&b, &["dag", "import", "--local", car.to_str().unwrap()]);
    assert!(import.status.success(), "{import:?}");
    assert_eq!(stdout(&import), cid);
    assert_eq!(p2pmr(&b, &["cat", &cid]).stdout, bytes);
    // A corrupt CAR: one line naming the block, exit 1, nothing stored.
    let mut bad = export.stdout.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let bad = write_file(dir.path(), "bad.car", &bad);
    let c = dir.path().join("c");
    let refused = p2pmr(&c, &["dag", "import", "--local", bad.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("corrupt block"), "{err}");
    assert!(
        block_files(&c).is_empty(),
        "a refused CAR left blocks behind"
    );
    // Not a CAR at all.
    let refused = p2pmr(&c, &["dag", "import", "--local", file.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("CAR"));
}

#[test]
fn stdin_input() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let mut child = Command::new(BIN)
        .args(["--home", home.to_str().unwrap(), "add", "--local", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello world\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        stdout(&out),
        "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    );
}

#[test]
fn corrupt_block_is_detected_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let data = mix(5 * CHUNK);
    let file = write_file(dir.path(), "f", &data);
    let cid = stdout(&p2pmr(&home, &["add", "--local", file.to_str().unwrap()]));
    // Flip one bit of one leaf on disk.
    let leaf = block_files(&home)
        .into_iter()
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("bafk"))
        .unwrap();
    let mut bytes = fs::read(&leaf).unwrap();
    bytes[1000] ^= 0x10;
    fs::write(&leaf, bytes).unwrap();

    let out = p2pmr(&home, &["cat", &cid]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("corrupt") && err.contains(leaf.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    assert!(!leaf.exists(), "corrupt block moved out of the store");
    assert_eq!(fs::read_dir(home.join("quarantine")).unwrap().count(), 1);
    // Re-adding the file repairs the store.
    assert_eq!(
        stdout(&p2pmr(&home, &["add", "--local", file.to_str().unwrap()])),
        cid
    );
    assert!(p2pmr(&home, &["cat", &cid]).stdout == data);
    let verify = p2pmr(&home, &["repo", "verify"]);
    assert!(verify.status.success());
    assert_eq!(
        stdout(&verify),
        "6 blocks verified, 0 corrupt, 0 unreadable"
    ); // 5 leaves and their root

    // A directory where a leaf should be: not counted as a block, found by verify (which
    // goes on to check the rest), and replaced when the file is added again.
    fs::remove_file(&leaf).unwrap();
    fs::create_dir(&leaf).unwrap();
    let stat = stdout(&p2pmr(&home, &["repo", "stat"]));
    assert!(stat.contains("blocks: 5\n"), "5 blocks, not 6: {stat}");
    let verify = p2pmr(&home, &["repo", "verify"]);
    assert_eq!(verify.status.code(), Some(1));
    assert_eq!(
        stdout(&verify),
        "5 blocks verified, 1 corrupt, 0 unreadable"
    );
    fs::create_dir(&leaf).unwrap();
    assert_eq!(
        stdout(&p2pmr(&home, &["add", "--local", file.to_str().unwrap()])),
        cid
    );
    assert!(leaf.is_file(), "the block took its place back");
    assert!(p2pmr(&home, &["cat", &cid]).stdout == data);
}

#[test]
fn kill_during_add_leaves_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let data = mix(400 * CHUNK); // 100 MiB
    let file = write_file(dir.path(), "big", &data);
    // Kill at several points of the add, each time into the same repository.
    for delay_ms in [5, 40, 150] {
        let mut child = Command::new(BIN)
            .args([
                "--home",
                home.to_str().unwrap(),
                "add",
                "--local",
                file.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Every block under its final name is whole.
        let verify = p2pmr(&home, &["repo", "verify"]);
        assert!(
            verify.status.success(),
            "delay {delay_ms}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    // Opening the repository (by the verify above) removed the dead writers' temporaries.
    assert_eq!(fs::read_dir(home.join("tmp")).unwrap().count(), 0);
    let cid = stdout(&p2pmr(&home, &["add", "--local", file.to_str().unwrap()]));
    assert_eq!(
        cid,
        stdout(&p2pmr(&home, &["add", "-n", file.to_str().unwrap()]))
    );
    assert!(p2pmr(&home, &["cat", &cid]).stdout == data);
}

#[test]
fn bad_input_gives_one_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let file = write_file(dir.path(), "f", b"some data\n");
    let cid = stdout(&p2pmr(&home, &["add", "--local", file.to_str().unwrap()]));
    let unknown = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
    let missing = dir.path().join("nope");
    let input = cid.as_str();
    let wrap = move |flag| {
        vec![
            "run",
            "--job",
            "wordcount",
            "--input",
            input,
            flag,
            "17592186044416",
        ]
    };
    let cases: Vec<(Vec<&str>, u8, &str)> = vec![
        (vec!["add", missing.to_str().unwrap()], 1, "cannot open"),
        (
            vec!["add", dir.path().to_str().unwrap()],
            1,
            "is a directory",
        ),
        (vec!["add"], 2, "required"),
        (vec!["cat", "not-a-cid"], 1, "not a CID"),
        (vec!["cat", unknown], 1, "no daemon"),
        (vec!["stat", unknown], 1, "no daemon"),
        (
            vec!["add", file.to_str().unwrap()],
            1,
            "need 2 daemon(s) but found 0",
        ),
        (
            vec!["add", "--replicas", "0", file.to_str().unwrap()],
            2,
            "replicas",
        ),
        (vec!["peers", "--peer", "/ip4/nonsense"], 2, "--peer"),
        (vec!["cat", "--offset", "x", &cid], 2, "invalid value"),
        (vec!["frobnicate"], 2, "unrecognized subcommand"),
        (
            vec!["add", "--bogus", file.to_str().unwrap()],
            2,
            "unexpected argument",
        ),
        // Sizes that would wrap when turned into bytes, or mean nothing.
        (wrap("--memory-mib"), 2, "--memory-mib"),
        (wrap("--split-mib"), 2, "--split-mib"),
        (
            vec![
                "run-local",
                "--job",
                "wordcount",
                "--memory-mib",
                "0",
                "--input",
                file.to_str().unwrap(),
            ],
            2,
            "at least 1",
        ),
        (
            vec!["daemon", "--max-client-bytes", "1.5GiB"],
            2,
            "--max-client-bytes",
        ),
        // Not wasm: refused before anything is sent anywhere (no daemon is even looked for).
        (
            vec!["run", "--job", file.to_str().unwrap(), "--input", &cid],
            1,
            "not a WebAssembly module",
        ),
    ];
    for (args, code, needle) in cases {
        let out = p2pmr(&home, &args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(i32::from(code)), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // An OS error is named once, not once per layer.
    let out = p2pmr(
        Path::new("/proc/p2pmr-cannot-be-here"),
        &["add", "--local", file.to_str().unwrap()],
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    // Nothing was lost or added by any of it.
    let verify = p2pmr(&home, &["repo", "verify"]);
    assert_eq!(
        stdout(&verify),
        "1 blocks verified, 0 corrupt, 0 unreadable"
    );
}

#[test]
fn help_explains_every_command() {
    for args in [
        &["--help"][..],
        &["add", "--help"],
        &["cat", "--help"],
        &["repo", "--help"],
        &["repo", "stat", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8(out.stdout).unwrap().contains("Usage:"),
            "{args:?}"
        );
    }
}

#[test]
fn home_from_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "f", b"env home\n");
    let out = Command::new(BIN)
        .args(["add", "--local", file.to_str().unwrap()])
        .env("P2PMR_HOME", dir.path().join("envrepo"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("envrepo/blocks").is_dir());
}

#[test]
fn run_local_jobs_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("repo");
    let a = write_file(dir.path(), "a.txt", b"the cat\nthe dog\r\n");
    let b = write_file(dir.path(), "b.txt", b"TRAP the end");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out = p2pmr(
        &home,
        &[
            "run-local",
            "--job",
            "wordcount",
            "--input",
            a_s,
            "--input",
            b_s,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "TRAP\t1\ncat\t1\ndog\t1\nend\t1\nthe\t3\n"
    );
    // --output DIR: one file per partition, together the same lines.
    let parts = dir.path().join("out");
    let out = p2pmr(
        &home,
        &[
            "run-local",
            "--job",
            "wordcount",
            "--reducers",
            "3",
            "--input",
            a_s,
            "--input",
            b_s,
            "--output",
            parts.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let mut lines: Vec<String> = (0..3)
        .flat_map(|r| {
            fs::read_to_string(parts.join(format!("part-{r:05}")))
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort();
    assert_eq!(lines, ["TRAP\t1", "cat\t1", "dog\t1", "end\t1", "the\t3"]);

    let bad_wasm = write_file(dir.path(), "bad.wasm", b"\0asm garbage");
    let cases: Vec<(Vec<&str>, u8, &str)> = vec![
        (vec!["--job", "nope", "--input", a_s], 1, "no job 'nope'"),
        (
            vec!["--job", bad_wasm.to_str().unwrap(), "--input", a_s],
            1,
            "not valid WebAssembly",
        ),
        (
            vec![
                "--job",
                "hostile",
                "--arg",
                "mode=trap",
                "--input",
                a_s,
                "--input",
                b_s,
            ],
            1,
            "at record offset 0: panicked",
        ),
        (
            vec![
                "--job",
                "hostile",
                "--arg",
                "mode=loop",
                "--timeout-secs",
                "1",
                "--input",
                a_s,
            ],
            1,
            "time limit",
        ),
        (
            vec!["--job", "wordcount", "--input", "/nonexistent/x"],
            1,
            "cannot read",
        ),
        (
            vec!["--job", "wordcount", "--reducers", "0", "--input", a_s],
            2,
            "reducers",
        ),
        (
            vec!["--job", "grep", "--arg", "novalue", "--input", a_s],
            2,
            "KEY=VALUE",
        ),
        (vec!["--job", "wordcount"], 2, "--input"),
    ];
    for (args, code, needle) in cases {
        let mut full = vec!["run-local"];
        full.extend(args.iter().copied());
        let out = p2pmr(&home, &full);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(i32::from(code)), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// A `p2pmr daemon` process on 127.0.0.1, killed when dropped.
struct DaemonProcess {
    child: std::process::Child,
    addr: String,
    peer_id: String,
    _home: tempfile::TempDir,
}

impl DaemonProcess {
    fn start(peers: &[&str]) -> Self {
        Self::start_args(peers, &["--slots", "2"])
    }

    fn start_args(peers: &[&str], args: &[&str]) -> Self {
        Self::start_env(peers, args, &[])
    }

    fn start_env(peers: &[&str], args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let home = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--home")
            .arg(home.path())
            .args(["--no-mdns", "daemon", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(args);
        for p in peers {
            cmd.args(["--peer", p]);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .env_remove("P2PMR_PEERS")
            .env_remove("P2PMR_SWARM_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut peer_id = String::new();
        let addr = loop {
            let line = lines.next().expect("daemon printed its address").unwrap();
            if let Some(id) = line.strip_prefix("peer id: ") {
                peer_id = id.to_owned();
            }
            if let Some(addr) = line.strip_prefix("listening on ") {
                break addr.to_owned();
            }
        };
        Self {
            child,
            addr,
            peer_id,
            _home: home,
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn run_watch_jobs_get_and_demo_from_the_command_line() {
    let a = DaemonProcess::start(&[]);
    let b = DaemonProcess::start(&[&a.addr]);
    let client = tempfile::tempdir().unwrap();
    let with_peers = |args: &[&str]| {
        let mut all: Vec<&str> = vec!["--peer", &a.addr, "--peer", &b.addr];
        all.extend_from_slice(args);
        p2pmr(client.path(), &all)
    };
    let text = "the cat sat on the mat\nthe dog sat\n".repeat(5000);
    let input = write_file(client.path(), "in.txt", text.as_bytes());
    let added = with_peers(&["add", input.to_str().unwrap()]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let cid = stdout(&added);

    // Give the daemons a moment to find each other (a's address was given to b).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let ran = with_peers(&[
        "run",
        "--job",
        "wordcount",
        "--input",
        &cid,
        "--reducers",
        "2",
    ]);
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let output = stdout(&ran).lines().last().unwrap().to_owned();
    let cat = with_peers(&["cat", &output]);
    assert!(cat.status.success());
    let mut lines: Vec<&str> = std::str::from_utf8(&cat.stdout).unwrap().lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "cat\t5000",
            "dog\t5000",
            "mat\t5000",
            "on\t5000",
            "sat\t10000",
            "the\t15000"
        ]
    );

    // The same job with --json: one event per line, the last one completed with the output.
    let json = with_peers(&[
        "run",
        "--json",
        "--job",
        "wordcount",
        "--input",
        &cid,
        "--reducers",
        "2",
    ]);
    assert!(json.status.success());
    let events: Vec<serde_json::Value> = stdout(&json)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "accepted");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "completed");
    assert_eq!(last["output"], output.as_str());
    let job = events[0]["job"].as_str().unwrap().to_owned();

    // watch re-attaches; jobs lists; get writes the directory.
    let watched = with_peers(&["watch", &job]);
    assert!(watched.status.success());
    assert_eq!(stdout(&watched).lines().last(), Some(output.as_str()));
    let jobs = with_peers(&["jobs"]);
    assert!(stdout(&jobs).contains(&job) && stdout(&jobs).contains("succeeded"));
    let dir = client.path().join("out");
    let got = with_peers(&["get", &output, "-o", dir.to_str().unwrap()]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let parts: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert!(with_peers(&["get", &output, "-o", dir.to_str().unwrap()])
        .status
        .code()
        .is_some_and(|c| c != 0));

    // Bad jobs: one line, non-zero exit.
    let bad = with_peers(&["run", "--job", "nope", "--input", &cid]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no job 'nope'"));
    let looping = with_peers(&[
        "run",
        "--job",
        "hostile",
        "--arg",
        "mode=loop",
        "--timeout-secs",
        "1",
        "--input",
        &cid,
    ]);
    assert_eq!(looping.status.code(), Some(1));
    let err = String::from_utf8_lossy(&looping.stderr);
    assert!(err.contains("map task 0") && err.contains("time"), "{err}");
    let unknown = *p2pmr_protocol::Block::raw(b"nobody has this".to_vec()).cid();
    let missing = with_peers(&["run", "--job", "wordcount", "--input", &unknown.to_string()]);
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("failed") && err.contains(&unknown.to_string()),
        "{err}"
    );
    let no_daemons = p2pmr(
        client.path(),
        &["run", "--job", "wordcount", "--input", &cid],
    );
    assert_eq!(no_daemons.status.code(), Some(1));

    // The demo, small: the top words and an output CID readable from this repository after.
    let demo = p2pmr(client.path(), &["demo", "--size", "4"]);
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let out = stdout(&demo);
    assert!(out.contains("top 10 words"), "{out}");
    let demo_output = out.lines().last().unwrap();
    let shown = p2pmr(client.path(), &["cat", demo_output]);
    assert!(shown.status.success());
    assert!(shown.stdout.split(|&b| b == b'\n').count() > 1000);
}

/// Sends `sig` (`-STOP`, `-CONT`) to a daemon.
fn signal(sig: &str, d: &DaemonProcess) {
    let pid = d.child.id().to_string();
    assert!(Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success());
}

/// Adds 8 MiB of lines with `replicas` copies and starts `run --json` of a job with 8 tasks of
/// 1 MiB, each spinning ~600 ms; returns the running client and the number of lines.
fn start_slow_job(
    client: &std::path::Path,
    peer_args: &[&str],
    replicas: &str,
) -> (std::process::Child, usize) {
    let line = "a line of text to count\n";
    let n = (8 << 20) / line.len();
    let input = write_file(client, "in.txt", line.repeat(n).as_bytes());
    let mut add = peer_args.to_vec();
    add.extend(["add", "--replicas", replicas, input.to_str().unwrap()]);
    let added = p2pmr(client, &add);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let cid = stdout(&added);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let run = Command::new(BIN)
        .arg("--home")
        .arg(client)
        .arg("--no-mdns")
        .args(peer_args)
        .args(["run", "--json", "--job", "hostile", "--arg", "mode=slow"])
        .args(["--arg", "ms=600", "--split-mib", "1", "--input", &cid])
        .env_remove("P2PMR_PEERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (run, n)
}

#[test]
fn a_stalled_worker_is_given_up_on_and_its_tasks_run_elsewhere() {
    let args = ["--slots", "1", "--liveness-secs", "1"];
    let a = DaemonProcess::start_args(&[], &args);
    let b = DaemonProcess::start_args(&[&a.addr], &args);
    let c = DaemonProcess::start_args(&[&a.addr, &b.addr], &args);
    let client = tempfile::tempdir().unwrap();
    let all = [&a, &b, &c];
    let peer_args: Vec<&str> = all
        .iter()
        .flat_map(|d| ["--peer", d.addr.as_str()])
        .collect();
    let with_peers = |args: &[&str]| {
        let mut full = peer_args.clone();
        full.extend_from_slice(args);
        p2pmr(client.path(), &full)
    };
    // Follow the job's events; when a daemon other than the coordinator starts a task,
    // stop it (SIGSTOP: its connections stay up, it just never answers).
    let (mut run, n) = start_slow_job(client.path(), &peer_args, "3");
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut coordinator = String::new();
    let mut stopped: Option<&DaemonProcess> = None;
    let mut stopped_at = std::time::Instant::now();
    use std::io::BufRead;
    for line in std::io::BufReader::new(run.stdout.take().unwrap()).lines() {
        let e: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if e["event"] == "accepted" {
            coordinator = e["coordinator"].as_str().unwrap().to_owned();
        }
        if stopped.is_none() && e["event"] == "task_started" && e["peer"] != coordinator.as_str() {
            let victim = all.iter().find(|d| d.peer_id == e["peer"]).unwrap();
            signal("-STOP", victim);
            stopped = Some(victim);
            stopped_at = std::time::Instant::now();
        }
        events.push(e);
    }
    let took = stopped_at.elapsed();
    let status = run.wait().unwrap();
    if let Some(victim) = stopped {
        signal("-CONT", victim);
    }
    assert!(status.success(), "{events:?}");
    assert!(
        stopped.is_some(),
        "no task ran outside the coordinator: {events:?}"
    );
    let given_up = events.iter().any(|e| {
        e["event"] == "task_failed" && e["reason"].as_str().unwrap_or("").contains("liveness")
    });
    assert!(given_up, "{events:?}");
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
    let output = events.last().unwrap()["output"]
        .as_str()
        .unwrap()
        .to_owned();
    let counted = with_peers(&["cat", &output]);
    assert_eq!(stdout(&counted), format!("lines\t{n}"));
}

#[test]
fn a_straggler_gets_a_backup_copy_and_the_first_copy_to_finish_wins() {
    // Liveness probes so slow they never fire: only a backup copy can finish the map phase
    // while a worker is frozen.
    let args = ["--slots", "1", "--liveness-secs", "600"];
    let a = DaemonProcess::start_args(&[], &args);
    let b = DaemonProcess::start_args(&[&a.addr], &args);
    let client = tempfile::tempdir().unwrap();
    let all = [&a, &b];
    let peer_args: Vec<&str> = all
        .iter()
        .flat_map(|d| ["--peer", d.addr.as_str()])
        .collect();
    let (mut run, n) = start_slow_job(client.path(), &peer_args, "2");
    // Without backups the job would wait for the frozen worker for good: stop it after 90 s.
    let run_pid = run.id().to_string();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(90));
        let _ = Command::new("kill").args(["-9", &run_pid]).status();
    });
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut coordinator = String::new();
    let mut frozen: Option<&DaemonProcess> = None;
    let mut reduced_while_frozen = false;
    use std::io::BufRead;
    for line in std::io::BufReader::new(run.stdout.take().unwrap()).lines() {
        let e: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if e["event"] == "accepted" {
            coordinator = e["coordinator"].as_str().unwrap().to_owned();
        }
        if frozen.is_none() && e["event"] == "task_started" && e["peer"] != coordinator.as_str() {
            // Freeze the other worker in the middle of its first task.
            std::thread::sleep(std::time::Duration::from_millis(200));
            let victim = all.iter().find(|d| d.peer_id == e["peer"]).unwrap();
            signal("-STOP", victim);
            frozen = Some(victim);
        }
        if e["event"] == "phase" && e["phase"] == "reduce" {
            if let Some(victim) = frozen {
                // The map phase ended without it; let it go on with the reduces.
                reduced_while_frozen = true;
                signal("-CONT", victim);
            }
        }
        events.push(e);
    }
    let status = run.wait().unwrap();
    assert!(status.success(), "{events:?}");
    let victim = frozen.expect("a task ran outside the coordinator");
    assert!(reduced_while_frozen, "{events:?}");
    let backup = events
        .iter()
        .find(|e| e["event"] == "backup" && e["kind"] == "map")
        .unwrap_or_else(|| panic!("no backup: {events:?}"));
    assert_eq!(backup["slow"], victim.peer_id.as_str());
    assert!(
        !events.iter().any(|e| e["event"] == "task_failed"),
        "a backup is not a failure: {events:?}"
    );
    let output = events.last().unwrap()["output"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut cat = peer_args.clone();
    cat.extend(["cat", &output]);
    assert_eq!(stdout(&p2pmr(client.path(), &cat)), format!("lines\t{n}"));
}

#[test]
fn private_swarms_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    let key_arg = key.to_str().unwrap();
    // A new key in kubo's format; its fingerprint on stdout; never overwritten.
    let made = p2pmr(dir.path(), &["swarm-key", "new", key_arg]);
    assert!(made.status.success());
    assert_eq!(stdout(&made).len(), 32, "a fingerprint: {}", stdout(&made));
    let text = fs::read_to_string(&key).unwrap();
    assert!(
        text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"),
        "{text}"
    );
    let again = p2pmr(dir.path(), &["swarm-key", "new", key_arg]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(fs::read_to_string(&key).unwrap(), text);
    let said = String::from_utf8_lossy(&again.stderr).into_owned();
    assert_eq!(said.lines().count(), 1, "{said}");
    assert_eq!(
        said.matches("os error").count(),
        1,
        "the cause once: {said}"
    );

    // A daemon in the swarm; a client finds it with the key given by flag, by environment or
    // in its repository, and is refused in one line without it.
    let daemon = DaemonProcess::start_args(&[], &["--swarm-key", key_arg, "--api", "off"]);
    let client = tempfile::tempdir().unwrap();
    let peers = |extra: &[&str], env: Option<&Path>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--home")
            .arg(client.path())
            .args(["--no-mdns", "--peer", &daemon.addr])
            .args(extra)
            .arg("peers")
            .env_remove("P2PMR_HOME")
            .env_remove("P2PMR_PEERS")
            .env_remove("P2PMR_SWARM_KEY")
            .env_remove("P2PMR_FORCE_PNET");
        if let Some(path) = env {
            cmd.env("P2PMR_SWARM_KEY", path);
        }
        cmd.output().unwrap()
    };
    let by_flag = peers(&["--swarm-key", key_arg], None);
    assert!(
        by_flag.status.success(),
        "{}",
        String::from_utf8_lossy(&by_flag.stderr)
    );
    assert!(stdout(&by_flag).contains(&daemon.peer_id));
    assert!(peers(&[], Some(&key)).status.success());
    let without = peers(&[], None);
    assert_eq!(without.status.code(), Some(1));
    let said = String::from_utf8_lossy(&without.stderr).into_owned();
    assert!(
        said.ends_with("handshake failed: wrong or missing swarm key?\n"),
        "{said}"
    );
    assert_eq!(
        said.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{said}"
    );
    fs::copy(&key, client.path().join("swarm.key")).unwrap();
    assert!(
        peers(&[], None).status.success(),
        "the repository's swarm.key"
    );

    // P2PMR_FORCE_PNET=1 refuses to run without a key.
    let bare = tempfile::tempdir().unwrap();
    let forced = Command::new(BIN)
        .arg("--home")
        .arg(bare.path())
        .args(["--no-mdns", "daemon", "--api", "off"])
        .env_remove("P2PMR_SWARM_KEY")
        .env("P2PMR_FORCE_PNET", "1")
        .output()
        .unwrap();
    assert_eq!(forced.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&forced.stderr).contains("P2PMR_FORCE_PNET=1"));
}

#[test]
fn identities_and_who_may_run_jobs_from_the_command_line() {
    // A repository's ids: stable, made on first use, the client's never the daemon's.
    let user = tempfile::tempdir().unwrap();
    let id = |home: &Path, args: &[&str]| {
        let o = p2pmr(home, &[&["id"][..], args].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        stdout(&o)
    };
    let client_id = id(user.path(), &[]);
    assert!(client_id.starts_with("12D3Koo"), "{client_id}");
    assert_eq!(id(user.path(), &[]), client_id);
    let daemon_id = id(user.path(), &["--daemon"]);
    assert_ne!(daemon_id, client_id);

    // Bad --allow-jobs: one line naming what is wrong.
    let bad_list = write_file(user.path(), "allowed", b"# friends\n12D3KooNotAPeer\n");
    for (arg, says) in [
        ("nonsense", "neither a peer id nor a readable file"),
        (bad_list.to_str().unwrap(), "line 2"),
    ] {
        let o = p2pmr(
            user.path(),
            &["daemon", "--api", "off", "--allow-jobs", arg],
        );
        assert_eq!(o.status.code(), Some(1), "{arg}");
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(
            said.contains(says) && said.lines().count() == 1,
            "{arg}: {said}"
        );
    }

    // A daemon that lets only this user (listed in a file) start jobs, and itself.
    let list = write_file(
        user.path(),
        "friends",
        format!("# the one user\n{client_id}\n").as_bytes(),
    );
    let daemon = DaemonProcess::start_args(
        &[],
        &[
            "--slots",
            "2",
            "--api",
            "off",
            "--allow-jobs",
            list.to_str().unwrap(),
        ],
    );
    assert_eq!(id(daemon._home.path(), &["--daemon"]), daemon.peer_id);
    let text = write_file(user.path(), "text", &b"x y y\n".repeat(50));
    let as_user =
        |home: &Path, args: &[&str]| p2pmr(home, &[&["--peer", &daemon.addr][..], args].concat());
    let added = as_user(
        user.path(),
        &["add", "--replicas", "1", text.to_str().unwrap()],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let cid = stdout(&added);
    let run = ["run", "--job", "wordcount", "--input", &cid];
    let ran = as_user(user.path(), &run);
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let stranger = tempfile::tempdir().unwrap();
    let refused = as_user(stranger.path(), &run);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("not allowed to run jobs on this network"),
        "{said}"
    );
}

#[test]
fn verify_from_the_command_line_outvotes_a_faulty_daemon() {
    let a = DaemonProcess::start(&[]);
    let b = DaemonProcess::start(&[&a.addr]);
    let bad = DaemonProcess::start_env(
        &[&a.addr],
        &["--slots", "2"],
        &[("P2PMR_FAULT_WRONG_OUTPUT", "1")],
    );
    let client = tempfile::tempdir().unwrap();
    let with_peers = |args: &[&str]| {
        let mut all: Vec<&str> = vec!["--peer", &a.addr, "--peer", &b.addr, "--peer", &bad.addr];
        all.extend_from_slice(args);
        p2pmr(client.path(), &all)
    };
    // 4 MiB in 1 MiB splits: four map tasks. On every daemon: the input is one placement
    // group, and the faulty daemon must hold it to be given tasks while holders take them.
    let text = "the cat sat on the mat\nthe dog sat\n".repeat(4 << 20 >> 5);
    let input = write_file(client.path(), "in.txt", text.as_bytes());
    let added = with_peers(&["add", "--replicas", "3", input.to_str().unwrap()]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let cid = stdout(&added);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let n = text.matches("the cat").count();
    let expected = |out: &str| {
        let cat = with_peers(&["cat", out]);
        assert!(cat.status.success());
        let mut lines: Vec<String> = String::from_utf8(cat.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        lines.sort();
        lines
            == [
                format!("cat\t{n}"),
                format!("dog\t{n}"),
                format!("mat\t{n}"),
                format!("on\t{n}"),
                format!("sat\t{}", 2 * n),
                format!("the\t{}", 3 * n),
            ]
    };
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--json",
            "--job",
            "wordcount",
            "--input",
            &cid,
            "--split-mib",
            "1",
        ];
        args.extend_from_slice(extra);
        let ran = with_peers(&args);
        assert!(
            ran.status.success(),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        let events: Vec<serde_json::Value> = stdout(&ran)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let output = events.last().unwrap()["output"]
            .as_str()
            .unwrap()
            .to_owned();
        (events, output)
    };
    let by_bad = |events: &[serde_json::Value], what: &str| {
        events
            .iter()
            .any(|e| e["event"] == what && e["peer"] == bad.peer_id.as_str())
    };

    let (events, output) = run(&[]);
    assert!(
        by_bad(&events, "task_finished"),
        "the faulty daemon ran no task"
    );
    assert!(
        !expected(&output),
        "without --verify the faulty daemon corrupts the output"
    );

    let (events, output) = run(&["--verify", "2"]);
    assert!(expected(&output), "with --verify 2 the output is exact");
    let named: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "verify_mismatch")
        .collect();
    assert_eq!(named.len(), 1, "{named:?}");
    assert_eq!(named[0]["dissent"], serde_json::json!([bad.peer_id]));

    // The human form names it too; a K out of range is refused before anything runs.
    let human = with_peers(&[
        "run",
        "--job",
        "wordcount",
        "--input",
        &cid,
        "--split-mib",
        "1",
        "--verify",
        "3",
    ]);
    assert!(
        !human.status.success(),
        "3 daemons, one faulty: no majority of 3 is left"
    );
    let said = String::from_utf8_lossy(&human.stderr);
    assert!(said.contains("differs from that of"), "{said}");
    for k in ["1", "17", "x"] {
        let out = with_peers(&["run", "--job", "wordcount", "--input", &cid, "--verify", k]);
        assert_eq!(out.status.code(), Some(2), "--verify {k}");
    }
}

#[test]
fn repo_gc_collects_what_a_refused_add_left_and_waits_for_the_daemon() {
    let daemon = DaemonProcess::start_args(&[], &["--slots", "1", "--max-client-bytes", "1MiB"]);
    let client = tempfile::tempdir().unwrap();
    let input = write_file(client.path(), "big.bin", &mix(4 << 20));
    let refused = p2pmr(
        client.path(),
        &[
            "--peer",
            &daemon.addr,
            "add",
            "--replicas",
            "1",
            input.to_str().unwrap(),
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--max-client-bytes"));
    let home = daemon._home.path().to_owned();

    // Not while the daemon runs (it collects by itself).
    let busy = p2pmr(&home, &["repo", "gc"]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is a daemon running"));
    let mut daemon = daemon;
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();

    let held = |home: &Path| {
        let stat = stdout(&p2pmr(home, &["repo", "stat"]));
        let line = stat
            .lines()
            .find(|l| l.starts_with("blocks:"))
            .unwrap()
            .to_owned();
        line.split_whitespace()
            .last()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = held(&home);
    assert!(before > 0, "the refused add left blocks");
    // Within the grace period they stay; past it they go.
    let kept = p2pmr(&home, &["repo", "gc"]);
    assert!(kept.status.success());
    assert!(
        stdout(&kept).starts_with("collected 0 blocks"),
        "{}",
        stdout(&kept)
    );
    assert_eq!(held(&home), before);
    let gone = p2pmr(&home, &["repo", "gc", "--grace-secs", "0"]);
    assert!(
        gone.status.success(),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    assert!(
        stdout(&gone).starts_with(&format!("collected {before} blocks")),
        "{}",
        stdout(&gone)
    );
    assert_eq!(held(&home), 0);
    let bad = p2pmr(&home, &["repo", "gc", "--grace-secs", "-1"]);
    assert_eq!(bad.status.code(), Some(2));
}

mod abuse {
    //! Hostile peers against a daemon process: slow senders of large frames that never finish
    //! them, a flood of requests, a fake daemon; and a job's output against its memory.

    use super::*;
    use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
    use libp2p::request_response::{self, ProtocolSupport};
    use libp2p::swarm::SwarmEvent;
    use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
    use p2pmr_node::net::BlockCodec;
    use p2pmr_protocol::engine::{JOB_PROTOCOL, MAX_JOB_MESSAGE};
    use p2pmr_protocol::wire::{BlockRequest, BlockResponse, BLOCK_PROTOCOL};
    use std::io;
    use std::time::{Duration, Instant};

    /// Sends the length of a largest job message and all its bytes but the last, then nothing.
    #[derive(Clone, Default)]
    struct Stall;

    impl request_response::Codec for Stall {
        type Protocol = StreamProtocol;
        type Request = ();
        type Response = ();

        async fn read_request<T: AsyncRead + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            _: &mut T,
        ) -> io::Result<()> {
            Ok(())
        }

        async fn read_response<T: AsyncRead + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            _: &mut T,
        ) -> io::Result<()> {
            futures::future::pending().await
        }

        async fn write_request<T: AsyncWrite + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            io: &mut T,
            _: (),
        ) -> io::Result<()> {
            io.write_all(&(MAX_JOB_MESSAGE as u32).to_be_bytes())
                .await?;
            let piece = vec![0u8; 64 << 10];
            let mut left = MAX_JOB_MESSAGE - 1;
            while left > 0 {
                let n = left.min(piece.len());
                io.write_all(&piece[..n]).await?;
                left -= n;
            }
            io.flush().await?;
            futures::future::pending().await
        }

        async fn write_response<T: AsyncWrite + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            _: &mut T,
            _: (),
        ) -> io::Result<()> {
            Ok(())
        }
    }

    /// `p2pmr add --replicas 1 FILE` through the daemon at `addr`.
    fn add_once(dir: &std::path::Path, addr: &str, file: &std::path::Path) -> std::process::Output {
        p2pmr(
            dir,
            &[
                "--peer",
                addr,
                "add",
                "--replicas",
                "1",
                file.to_str().unwrap(),
            ],
        )
    }

    /// A peer of its own that opens `streams` stalled job requests to `daemon` at `addr`.
    fn stalling_peer(
        addr: Multiaddr,
        daemon: PeerId,
        streams: usize,
    ) -> Result<tokio::task::JoinHandle<()>, Box<dyn std::error::Error>> {
        let mut swarm = tcp_swarm(|_| {
            request_response::Behaviour::with_codec(
                Stall,
                [(StreamProtocol::new(JOB_PROTOCOL), ProtocolSupport::Outbound)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(300))
                    .with_max_concurrent_streams(streams),
            )
        });
        swarm.add_peer_address(daemon, addr);
        for _ in 0..streams {
            swarm.behaviour_mut().send_request(&daemon, ());
        }
        Ok(tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        }))
    }

    /// A libp2p peer of the test's own over TCP, running `behaviour`.
    fn tcp_swarm<B: libp2p::swarm::NetworkBehaviour>(
        behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
    ) -> libp2p::Swarm<B> {
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(behaviour)
            .unwrap()
            // Attackers keep their connections: the daemon, not idleness, must cut them.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build()
    }

    #[derive(libp2p::swarm::NetworkBehaviour)]
    struct FakeDaemon {
        identify: libp2p::identify::Behaviour,
        blocks: request_response::Behaviour<BlockCodec>,
    }

    /// A peer that lists the block protocol, says it stored every block it is sent and
    /// holds every block it is asked about, and stores nothing; it dials `daemon`. Returns
    /// its address.
    async fn fake_daemon(daemon: Multiaddr) -> (String, tokio::task::JoinHandle<()>) {
        let mut swarm = tcp_swarm(|key| FakeDaemon {
            identify: libp2p::identify::Behaviour::new(
                libp2p::identify::Config::new("/mapreduce/id/1.0.0".into(), key.public())
                    .with_agent_version(p2pmr_node::net::AGENT.into()),
            ),
            blocks: request_response::Behaviour::with_codec(
                BlockCodec::default(),
                [(StreamProtocol::new(BLOCK_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default(),
            ),
        });
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        let addr = format!("{addr}/p2p/{}", swarm.local_peer_id());
        swarm.dial(daemon).unwrap();
        let task = tokio::spawn(async move {
            loop {
                if let SwarmEvent::Behaviour(FakeDaemonEvent::Blocks(
                    request_response::Event::Message {
                        message:
                            request_response::Message::Request {
                                request: Ok(request),
                                channel,
                                ..
                            },
                        ..
                    },
                )) = swarm.select_next_some().await
                {
                    let answer = match request {
                        BlockRequest::Has(cids) => BlockResponse::Have(vec![true; cids.len()]),
                        BlockRequest::Get(_) | BlockRequest::Prove { .. } => {
                            BlockResponse::NotFound
                        }
                        _ => BlockResponse::Stored,
                    };
                    let _ = swarm.behaviour_mut().blocks.send_response(channel, answer);
                }
            }
        });
        (addr, task)
    }

    /// Outcomes of a request flood: answered, refused, reset.
    #[derive(Debug, Default)]
    struct Flood {
        answered: usize,
        refused: usize,
        reset: Vec<String>,
    }

    /// A peer that sends `daemon` 48 `Has` requests of 4096 CIDs at once, again and again,
    /// counting what comes back in `tally`.
    fn flooding_peer(
        addr: Multiaddr,
        daemon: PeerId,
        tally: std::sync::Arc<std::sync::Mutex<Flood>>,
    ) -> tokio::task::JoinHandle<()> {
        let mut swarm = tcp_swarm(|_| {
            request_response::Behaviour::with_codec(
                BlockCodec::default(),
                [(
                    StreamProtocol::new(BLOCK_PROTOCOL),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default().with_max_concurrent_streams(128),
            )
        });
        swarm.add_peer_address(daemon, addr);
        let cids: Vec<_> = (0..4096u32)
            .map(|i| *p2pmr_protocol::Block::raw(i.to_le_bytes().to_vec()).cid())
            .collect();
        tokio::spawn(async move {
            loop {
                for _ in 0..48 {
                    swarm
                        .behaviour_mut()
                        .send_request(&daemon, Ok(BlockRequest::Has(cids.clone())));
                }
                let mut left = 48;
                while left > 0 {
                    let event = swarm.select_next_some().await;
                    let mut tally = tally.lock().unwrap();
                    match event {
                        SwarmEvent::Behaviour(request_response::Event::Message {
                            message: request_response::Message::Response { response, .. },
                            ..
                        }) => {
                            left -= 1;
                            match response {
                                BlockResponse::Have(_) => tally.answered += 1,
                                _ => tally.refused += 1,
                            }
                        }
                        SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                            error,
                            ..
                        }) => {
                            left -= 1;
                            tally.reset.push(error.to_string());
                        }
                        _ => {}
                    }
                }
            }
        })
    }

    /// Resident memory of process `pid`, bytes.
    fn rss(pid: u32) -> u64 {
        memory(pid, "VmRSS:")
    }

    /// A memory figure (`VmRSS:`, `VmHWM:`) of process `pid` from its status, bytes.
    fn memory(pid: u32, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb << 10)
    }

    /// Runs `p2pmr run-local ARGS` and returns its output and its peak resident memory
    /// (the high-water mark, read until it exits).
    fn run_local_peak(home: &Path, args: &[&str]) -> (Output, u64) {
        let mut child = Command::new(BIN)
            .arg("--home")
            .arg(home)
            .arg("run-local")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            io::Read::read_to_end(&mut stdout, &mut out).map(|_| out)
        });
        let mut peak = 0;
        while child.try_wait().unwrap().is_none() {
            peak = peak.max(memory(pid, "VmHWM:"));
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut output = child.wait_with_output().unwrap();
        output.stdout = reader.join().unwrap().unwrap();
        (output, peak)
    }

    #[test]
    fn a_map_tasks_output_is_held_once_and_the_limit_bounds_it() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("repo");
        // 24 MiB of distinct lines; grep for everything keeps all of them as map output.
        let mut text = Vec::new();
        let mut i = 0u64;
        while text.len() < 24 << 20 {
            text.extend_from_slice(
                format!("line {i} of the input, padded to a length\n").as_bytes(),
            );
            i += 1;
        }
        let input = write_file(dir.path(), "in.txt", &text);
        let input = input.to_str().unwrap();
        let run = |pattern: &str, limit: &str| {
            let pattern = format!("pattern={pattern}");
            run_local_peak(
                &home,
                &[
                    "--job",
                    "grep",
                    "--arg",
                    &pattern,
                    "--input",
                    input,
                    "--split-mib",
                    "64",
                    "--threads",
                    "1",
                    "--output-limit-mib",
                    limit,
                ],
            )
        };
        let (none, base) = run("^never$", "256");
        assert!(none.status.success() && none.stdout.is_empty());
        let (all, peak) = run(".", "256");
        assert!(
            all.status.success(),
            "{}",
            String::from_utf8_lossy(&all.stderr)
        );
        // Output lines are `key TAB value NL`; the map held each pair as `klen key vlen value`
        // (6 bytes more) and one index entry.
        let pairs = all.stdout.iter().filter(|&&b| b == b'\n').count() as u64;
        let held = all.stdout.len() as u64 + 6 * pairs + 16 * pairs;
        eprintln!(
            "map output held {} MiB; run-local peak {} MiB, {} MiB with no output",
            held >> 20,
            peak >> 20,
            base >> 20
        );
        assert!(
            peak < base + held + (12 << 20),
            "peak {} MiB: more than the output held once ({} MiB) over {} MiB",
            peak >> 20,
            held >> 20,
            base >> 20
        );
        // A limit just under what it holds fails the task, saying so.
        let under = ((held >> 20) - 1).to_string();
        let (over, _) = run(".", &under);
        let error = String::from_utf8_lossy(&over.stderr);
        assert!(
            !over.status.success() && error.contains("output limit"),
            "{error}"
        );
    }

    #[test]
    fn one_peer_stalling_large_frames_cannot_make_another_peers_adds_busy() {
        let daemon = DaemonProcess::start_args(&[], &[]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr: Multiaddr = daemon.addr.parse().unwrap();
        let peer: PeerId = daemon.peer_id.parse().unwrap();
        let pid = daemon.child.id();
        let idle = rss(pid);
        // 40 streams announcing 4 MiB each and sending all of it but a byte: more than all
        // peers together may have this daemon hold.
        let attacker = {
            let _in_rt = rt.enter();
            stalling_peer(addr, peer, 40).unwrap()
        };
        let until = Instant::now() + Duration::from_secs(20);
        while rss(pid) < idle + (24 << 20) {
            assert!(
                Instant::now() < until,
                "the attacker's frames never arrived"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        let held = rss(pid);
        eprintln!(
            "one peer stalling 40 x 4 MiB: daemon RSS {} -> {} MiB",
            idle >> 20,
            held >> 20
        );
        // Another peer's add (blocks of 256 KiB, each over the frames read for free) goes
        // through at once, not after a while of being told the daemon is busy.
        let client = tempfile::tempdir().unwrap();
        let text = mix(4 << 20);
        let input = write_file(client.path(), "in.bin", &text);
        let started = Instant::now();
        let added = add_once(client.path(), &daemon.addr, &input);
        let took = started.elapsed();
        attacker.abort();
        assert!(
            added.status.success(),
            "{}",
            String::from_utf8_lossy(&added.stderr)
        );
        let read = p2pmr(
            client.path(),
            &["--peer", &daemon.addr, "cat", &stdout(&added)],
        );
        assert!(read.stdout == text);
        eprintln!("another peer's add of 4 MiB took {took:?}");
        assert!(took < Duration::from_secs(3), "the add took {took:?}");
    }

    #[test]
    fn forty_peers_stalling_large_frames_a_flood_and_a_fake_daemon_leave_it_serving() {
        let daemon = DaemonProcess::start_args(&[], &["--slots", "1"]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr: Multiaddr = daemon.addr.parse().unwrap();
        let peer: PeerId = daemon.peer_id.parse().unwrap();
        let client = tempfile::tempdir().unwrap();
        let text = mix(4 << 20);
        let input = write_file(client.path(), "in.bin", &text);
        let cat = |cid: &str| p2pmr(client.path(), &["--peer", &daemon.addr, "cat", cid]);
        let added = add_once(client.path(), &daemon.addr, &input);
        assert!(added.status.success());
        let cid = stdout(&added);

        // A fake daemon joins, and a user adds through it and the daemon: it is never counted
        // as a daemon, so the add goes to the real one, and reads back.
        let (fake, fake_task) = rt.block_on(fake_daemon(addr.clone()));
        let other = write_file(client.path(), "other.bin", &mix(3 << 20));
        let started = Instant::now();
        let with_fake = p2pmr(
            client.path(),
            &[
                "--peer",
                &daemon.addr,
                "--peer",
                &fake,
                "add",
                "--replicas",
                "1",
                other.to_str().unwrap(),
            ],
        );
        let took = started.elapsed();
        assert!(
            with_fake.status.success(),
            "{}",
            String::from_utf8_lossy(&with_fake.stderr)
        );
        let other_cid = stdout(&with_fake);
        let stat = p2pmr(
            client.path(),
            &["--peer", &daemon.addr, "--peer", &fake, "stat", &other_cid],
        );
        let stat = stdout(&stat);
        assert!(
            stat.contains(&format!("holder:  {} ", daemon.peer_id)),
            "{stat}"
        );
        assert!(!stat.contains(fake.rsplit('/').next().unwrap()), "{stat}");
        eprintln!("add of 3 MiB with a fake daemon present: succeeded in {took:?}, held by the real daemon only");

        let pid = daemon.child.id();
        let idle = rss(pid);
        // The same cat with no attack, for comparison.
        let mut quiet: Vec<Duration> = (0..5)
            .map(|_| {
                let started = Instant::now();
                assert!(cat(&cid).status.success());
                started.elapsed()
            })
            .collect();
        quiet.sort();

        // 40 peers, each with 32 streams announcing 4 MiB and sending all of it but a byte:
        // 5 GiB, were the daemon to buffer what it is told to expect; and one peer sending
        // 48 requests at once, again and again.
        let flood = std::sync::Arc::new(std::sync::Mutex::new(Flood::default()));
        let mut attackers: Vec<_> = {
            let _in_rt = rt.enter();
            (0..40)
                .map(|_| stalling_peer(addr.clone(), peer, 32).unwrap())
                .collect()
        };
        attackers.push({
            let _in_rt = rt.enter();
            flooding_peer(addr.clone(), peer, flood.clone())
        });
        let mut peak = idle;
        let mut cats = Vec::new();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            // A user's cat still gets through.
            let started = Instant::now();
            let read = cat(&cid);
            assert!(
                read.status.success(),
                "{}",
                String::from_utf8_lossy(&read.stderr)
            );
            assert!(read.stdout == text);
            cats.push(started.elapsed());
            peak = peak.max(rss(pid));
            std::thread::sleep(Duration::from_millis(200));
        }
        for a in attackers {
            a.abort();
        }
        fake_task.abort();
        let flood = flood.lock().unwrap();
        assert!(flood.reset.is_empty(), "{:?}", flood.reset);
        assert!(flood.answered + flood.refused >= 48, "{flood:?}");
        eprintln!(
            "a flood of 48 requests at once, repeated: {} answered, {} refused, none reset",
            flood.answered, flood.refused
        );
        cats.sort();
        eprintln!(
            "40 stalling peers x 32 streams: daemon RSS {} MiB idle, {} MiB peak; cat of 4 MiB: \
             median {:?} without them, during it median {:?} ({} runs), slowest {:?}",
            idle >> 20,
            peak >> 20,
            quiet[quiet.len() / 2],
            cats[cats.len() / 2],
            cats.len(),
            cats[cats.len() - 1]
        );
        assert!(
            peak < idle + (256 << 20),
            "memory grew from {} to {} MiB",
            idle >> 20,
            peak >> 20
        );
    }
}
