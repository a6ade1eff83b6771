//! `hostile`: a test fixture that misbehaves on purpose, chosen with `--arg mode=...`:
//! `loop` (map never returns), `oom` (map grows memory without bound), `trap` (map panics on
//! any record containing `TRAP`; fine otherwise), `flood` (map emits without bound), `slow`
//! (counts lines, taking about `ms` milliseconds per batch: tests that need a job to last).
//! Otherwise it counts lines, like a well-behaved job.

use p2pmr_guest::{Emit, Input, Job, Records, Values};

/// The job.
#[derive(Debug)]
pub struct Hostile;

impl Job for Hostile {
    fn map(input: &Input, records: Records, emit: &mut Emit) {
        match input.arg("mode").unwrap_or("") {
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "flood" => loop {
                emit.emit("flood", "x".repeat(1000));
            },
            "slow" => {
                // No clock in the sandbox: spin a calibrated amount (~1 ms per 300k rounds
                // of this loop on a 2020s core).
                let ms: u64 = input.arg("ms").and_then(|v| v.parse().ok()).unwrap_or(100);
                let mut x = 0u64;
                for _ in 0..ms.saturating_mul(300_000) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                std::hint::black_box(x);
                for _ in records {
                    emit.emit("lines", "1");
                }
            }
            mode => {
                for record in records {
                    if mode == "trap" && record.bytes.windows(4).any(|w| w == b"TRAP") {
                        panic!("record at offset {} asked for it", record.offset());
                    }
                    emit.emit("lines", "1");
                }
            }
        }
    }

    fn reduce(key: &[u8], values: &mut Values, emit: &mut Emit) {
        emit.emit(key, values.sum_u64().to_string());
    }
}

p2pmr_guest::export!(Hostile);
