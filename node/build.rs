//! Builds the shipped jobs in `wasm-jobs/` for wasm32 so the `p2pmr` binary can embed them
//! (`--job wordcount` works with no manual step), the way wasmtime's test-programs artifacts
//! crate builds its guests: a nested cargo with its own target directory (no lock shared with
//! the outer build) and the `wasm-jobs` profile (optimised, stripped).

use std::path::PathBuf;
use std::process::Command;

const JOBS: [&str; 4] = ["wordcount", "grep", "indexer", "hostile"];

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_owned();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let target_dir = root.join("target/wasm-jobs");
    // Each source file, not the directory: cargo did not always see a change deep inside
    // a directory named here.
    watch(&root.join("wasm-jobs"));
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--profile",
            "wasm-jobs",
            "--target",
            "wasm32-unknown-unknown",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for job in JOBS {
        cmd.args(["-p", &format!("p2pmr-job-{job}")]);
    }
    // Flags meant for the host build must not leak into the guest build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the wasm jobs");
    assert!(
        status.success(),
        "building the wasm jobs failed; is the target installed? `rustup target add wasm32-unknown-unknown`"
    );
    for job in JOBS {
        let built = target_dir.join(format!(
            "wasm32-unknown-unknown/wasm-jobs/p2pmr_job_{job}.wasm"
        ));
        std::fs::copy(&built, out.join(format!("{job}.wasm")))
            .unwrap_or_else(|e| panic!("{}: {e}", built.display()));
    }
}

/// Asks cargo to rerun this script when a file under `dir` (but not in a `target` folder)
/// changes, or one is added or removed.
fn watch(dir: &std::path::Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                watch(&path);
            }
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
