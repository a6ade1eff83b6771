//! The jobs shipped with p2pmr, built from `wasm-jobs/` by `build.rs` and embedded in the
//! binary, so `--job wordcount` needs no file.

/// `(name, wasm module)` of every shipped job.
pub const JOBS: [(&str, &[u8]); 4] = [
    (
        "wordcount",
        include_bytes!(concat!(env!("OUT_DIR"), "/wordcount.wasm")),
    ),
    (
        "grep",
        include_bytes!(concat!(env!("OUT_DIR"), "/grep.wasm")),
    ),
    (
        "indexer",
        include_bytes!(concat!(env!("OUT_DIR"), "/indexer.wasm")),
    ),
    (
        "hostile",
        include_bytes!(concat!(env!("OUT_DIR"), "/hostile.wasm")),
    ),
];

/// The module of the shipped job `name`.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    JOBS.iter().find(|(n, _)| *n == name).map(|(_, w)| *w)
}
