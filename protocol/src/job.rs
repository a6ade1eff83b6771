//! The job spec: what a client hands a coordinator. It names the wasm module and the inputs
//! by CID, with the reducer count, arguments, per-task limits and split size, and encodes
//! deterministically, so the job id (the CID of the encoded spec) is the same on every peer for
//! the same job, which is what lets a finished job's output be found again instead of recomputed.

use crate::block::Block;
use crate::wire::WireError;
use crate::Cid;
use serde::{Deserialize, Serialize};

/// Most inputs one job may name.
pub const MAX_INPUTS: usize = 1024;
/// Most reducers one job may ask for.
pub const MAX_REDUCERS: u32 = 10_000;
/// Smallest split size: one block (smaller splits would re-read the same block per task).
pub const MIN_SPLIT: u64 = 262_144;
/// The split size that asks the coordinator to pick one with [`auto_split`].
pub const AUTO_SPLIT: u64 = 0;
/// Smallest split [`auto_split`] picks (Spark's `openCostInBytes`): below it a task's fixed
/// costs (a round trip, a wasm instance, R run files) start to show.
pub const AUTO_SPLIT_MIN: u64 = 4 << 20;
/// Largest split [`auto_split`] picks (Spark's `maxPartitionBytes`, Hadoop's block size):
/// bigger inputs get more tasks than slots, so a lost task is cheap to redo.
pub const AUTO_SPLIT_MAX: u64 = 128 << 20;
/// Most bad records a job may skip (bounds the skip lists sent with map tasks).
pub const MAX_SKIPPED_RECORDS: u32 = 10_000;
/// Largest encoded spec.
pub const MAX_SPEC_SIZE: usize = 1 << 20;
/// Most daemons a job may ask to run each task for verification (see [`JobSpec::verify`]).
pub const MAX_VERIFY: u32 = 16;

/// One input of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput {
    /// The name map tasks see (by default the CID in text).
    pub name: String,
    /// The input file's root CID.
    pub cid: Cid,
}

/// Limits every task of the job runs under (a daemon may lower them to its own maximum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// Linear memory cap, bytes.
    pub memory: u64,
    /// Time limit per task, milliseconds.
    pub timeout_ms: u64,
    /// Output cap per task, bytes.
    pub output: u64,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            memory: 512 << 20,
            timeout_ms: 60_000,
            output: 256 << 20,
        }
    }
}

/// A MapReduce job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// CID of the wasm module (as `p2pmr add` prints it).
    pub module: Cid,
    /// The inputs, in order.
    pub inputs: Vec<JobInput>,
    /// Number of reduce partitions.
    pub reducers: u32,
    /// Job arguments; kept sorted by key (and unique), so equal argument sets encode equally.
    args: Vec<(String, String)>,
    /// Per-task limits.
    pub limits: TaskLimits,
    /// Bytes of input per map task (a multiple of nothing in particular; tasks are ranges),
    /// or [`AUTO_SPLIT`] (the default): [`auto_split`] of the total input size.
    pub split_size: u64,
    /// Most input records the job may leave out because they make map tasks fail again and
    /// again (the MapReduce paper's skipping of bad records); 0 means none: such a record
    /// fails the job.
    pub skip_bad_records: u32,
    /// Daemons that run each task, whose outputs' CIDs must agree before the job goes on
    /// (verified execution); 1, the default, runs each task once and believes its answer.
    pub verify: u32,
    /// Whether tasks may reuse outputs the workers remember from earlier jobs
    /// ([`crate::memo`]); off (`p2pmr run --no-memo`) every task runs. It is part of the job's
    /// id, so a run without the memo is a new job, not the last result of the same one.
    pub memo: bool,
}

/// Why a spec is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobSpecError {
    /// The bytes are not a spec.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A field is out of range or inconsistent.
    #[error("invalid job spec: {0}")]
    Invalid(String),
}

#[derive(Serialize, Deserialize)]
struct WireSpec<'a> {
    version: u8,
    #[serde(borrow, with = "serde_bytes")]
    module: &'a [u8],
    #[serde(borrow)]
    inputs: Vec<(&'a str, &'a serde_bytes::Bytes)>,
    reducers: u32,
    #[serde(borrow)]
    args: Vec<(&'a str, &'a str)>,
    limits: (u64, u64, u64),
    split_size: u64,
    skip_bad_records: u32,
    verify: u32,
    memo: bool,
}

const SPEC_VERSION: u8 = 4;

/// The split size picked for `input_bytes` of input over `slots` task slots in all: one task
/// per slot, each from [`AUTO_SPLIT_MIN`] to [`AUTO_SPLIT_MAX`] bytes (Spark's rule).
///
/// Fewer, bigger tasks cost less in all: each map task emits every distinct key of its split
/// once (a small split of English text already has a large share of all its words), and the
/// reducers take them all in again. A
/// coordinator taking over a job does not call this: it plans with the split the first one
/// used (workers report it with their finished tasks), so task ranges match and the work
/// done is reused.
pub fn auto_split(input_bytes: u64, slots: u64) -> u64 {
    input_bytes
        .div_ceil(slots.max(1))
        .clamp(AUTO_SPLIT_MIN, AUTO_SPLIT_MAX)
}

impl JobSpec {
    /// A spec with default limits and an automatic split size. Arguments may come in any order;
    /// a repeated key keeps its last value.
    pub fn new(
        module: Cid,
        inputs: Vec<JobInput>,
        reducers: u32,
        args: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, JobSpecError> {
        let mut sorted: Vec<(String, String)> = Vec::new();
        for (k, v) in args {
            match sorted.binary_search_by(|(key, _)| key.as_str().cmp(&k)) {
                Ok(i) => sorted[i].1 = v,
                Err(i) => sorted.insert(i, (k, v)),
            }
        }
        let spec = Self {
            module,
            inputs,
            reducers,
            args: sorted,
            limits: TaskLimits::default(),
            split_size: AUTO_SPLIT,
            skip_bad_records: 0,
            verify: 1,
            memo: true,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// This spec with a fixed split size (at least [`MIN_SPLIT`]), or the automatic one for
    /// [`AUTO_SPLIT`].
    pub fn with_split_size(mut self, bytes: u64) -> Self {
        self.split_size = match bytes {
            AUTO_SPLIT => AUTO_SPLIT,
            bytes => bytes.max(MIN_SPLIT),
        };
        self
    }

    /// The split size for inputs of `input_bytes` in total over `slots` task slots: the fixed
    /// one, or [`auto_split`].
    pub fn split_for(&self, input_bytes: u64, slots: u64) -> u64 {
        if self.split_size == AUTO_SPLIT {
            auto_split(input_bytes, slots)
        } else {
            self.split_size
        }
    }

    /// This spec with other task limits (each at least 1).
    pub fn with_limits(mut self, limits: TaskLimits) -> Self {
        self.limits = TaskLimits {
            memory: limits.memory.max(1),
            timeout_ms: limits.timeout_ms.max(1),
            output: limits.output.max(1),
        };
        self
    }

    /// This spec allowing up to `records` bad records to be skipped (at most
    /// [`MAX_SKIPPED_RECORDS`]).
    pub fn with_skip_bad_records(mut self, records: u32) -> Self {
        self.skip_bad_records = records.min(MAX_SKIPPED_RECORDS);
        self
    }

    /// This spec with the task memo on (the default) or off.
    pub fn with_memo(mut self, memo: bool) -> Self {
        self.memo = memo;
        self
    }

    /// This spec with each task run on `daemons` distinct daemons whose outputs must agree
    /// (1 to [`MAX_VERIFY`]; 1 turns verification off).
    pub fn with_verify(mut self, daemons: u32) -> Self {
        self.verify = daemons.clamp(1, MAX_VERIFY);
        self
    }

    /// The arguments, sorted by key.
    pub fn args(&self) -> &[(String, String)] {
        &self.args
    }

    /// The arguments as a module receives them ([`crate::abi::encode_args`]).
    pub fn encoded_args(&self) -> Vec<u8> {
        crate::abi::encode_args(self.args.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// Whether this job's tasks may take outputs the workers remember ([`crate::memo`]): the
    /// memo is on and the job does not verify its tasks, since a remembered output is one
    /// daemon's word.
    pub fn reuses_memo(&self) -> bool {
        self.memo && self.verify == 1
    }

    fn validate(&self) -> Result<(), JobSpecError> {
        let invalid = |m: String| Err(JobSpecError::Invalid(m));
        if self.inputs.is_empty() || self.inputs.len() > MAX_INPUTS {
            return invalid(format!("{} inputs (1 to {MAX_INPUTS})", self.inputs.len()));
        }
        if !(1..=MAX_REDUCERS).contains(&self.reducers) {
            return invalid(format!("{} reducers (1 to {MAX_REDUCERS})", self.reducers));
        }
        if self.split_size != AUTO_SPLIT && self.split_size < MIN_SPLIT {
            return invalid(format!(
                "split size {} (at least {MIN_SPLIT})",
                self.split_size
            ));
        }
        let mut names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        names.sort();
        if names.iter().any(|n| n.is_empty() || n.contains('\n')) {
            return invalid("an input name is empty or has a newline".into());
        }
        if names.windows(2).any(|w| w[0] == w[1]) {
            return invalid("two inputs have the same name".into());
        }
        for (k, v) in &self.args {
            if k.is_empty() || k.contains(['=', '\n']) || v.contains('\n') {
                return invalid(format!("argument '{k}' is not KEY=VALUE on one line"));
            }
        }
        if self.args.windows(2).any(|w| w[0].0 >= w[1].0) {
            return invalid("arguments are not sorted and unique".into());
        }
        if self.limits.memory == 0 || self.limits.timeout_ms == 0 || self.limits.output == 0 {
            return invalid("a task limit is zero".into());
        }
        if self.skip_bad_records > MAX_SKIPPED_RECORDS {
            return invalid(format!(
                "{} bad records to skip (at most {MAX_SKIPPED_RECORDS})",
                self.skip_bad_records
            ));
        }
        if !(1..=MAX_VERIFY).contains(&self.verify) {
            return invalid(format!(
                "verification by {} daemons (1 to {MAX_VERIFY})",
                self.verify
            ));
        }
        Ok(())
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let module = self.module.to_bytes();
        let cids: Vec<Vec<u8>> = self.inputs.iter().map(|i| i.cid.to_bytes()).collect();
        let wire = WireSpec {
            version: SPEC_VERSION,
            module: &module,
            inputs: self
                .inputs
                .iter()
                .zip(&cids)
                .map(|(i, c)| (i.name.as_str(), serde_bytes::Bytes::new(c)))
                .collect(),
            reducers: self.reducers,
            args: self
                .args
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            limits: (
                self.limits.memory,
                self.limits.timeout_ms,
                self.limits.output,
            ),
            split_size: self.split_size,
            skip_bad_records: self.skip_bad_records,
            verify: self.verify,
            memo: self.memo,
        };
        postcard::to_allocvec(&wire).expect("in-memory encoding of plain data cannot fail")
    }

    /// Decodes and validates a spec; only the canonical encoding of a valid spec is accepted,
    /// so a decoded spec's id is the id of the bytes it came from.
    pub fn decode(bytes: &[u8]) -> Result<Self, JobSpecError> {
        if bytes.len() > MAX_SPEC_SIZE {
            return Err(WireError::TooLarge {
                what: "job spec",
                size: bytes.len(),
                limit: MAX_SPEC_SIZE,
            }
            .into());
        }
        let wire: WireSpec<'_> =
            postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        if wire.version != SPEC_VERSION {
            return Err(JobSpecError::Invalid(format!(
                "spec version {} (this peer reads {SPEC_VERSION})",
                wire.version
            )));
        }
        let cid = |b: &[u8]| Cid::try_from(b).map_err(|_| WireError::BadCid);
        let spec = Self {
            module: cid(wire.module)?,
            inputs: wire
                .inputs
                .iter()
                .map(|(name, c)| {
                    Ok(JobInput {
                        name: (*name).to_owned(),
                        cid: cid(c)?,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            reducers: wire.reducers,
            args: wire
                .args
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            limits: TaskLimits {
                memory: wire.limits.0,
                timeout_ms: wire.limits.1,
                output: wire.limits.2,
            },
            split_size: wire.split_size,
            skip_bad_records: wire.skip_bad_records,
            verify: wire.verify,
            memo: wire.memo,
        };
        spec.validate()?;
        if spec.encode() != bytes {
            return Err(JobSpecError::Invalid("not the canonical encoding".into()));
        }
        Ok(spec)
    }

    /// The job id: the CID (raw codec, sha2-256) of the encoded spec.
    pub fn id(&self) -> Cid {
        *Block::raw(self.encode()).cid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u8) -> Cid {
        *Block::raw(vec![n]).cid()
    }

    fn spec(args: &[(&str, &str)]) -> JobSpec {
        JobSpec::new(
            cid(0),
            vec![
                JobInput {
                    name: "a".into(),
                    cid: cid(1),
                },
                JobInput {
                    name: "b".into(),
                    cid: cid(2),
                },
            ],
            3,
            args.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_stable_ids() {
        let s = spec(&[("pattern", "x"), ("mode", "y")]);
        assert_eq!(JobSpec::decode(&s.encode()).unwrap(), s);
        // Argument order does not matter; values and everything else do.
        assert_eq!(s.id(), spec(&[("mode", "y"), ("pattern", "x")]).id());
        assert_ne!(s.id(), spec(&[("mode", "z"), ("pattern", "x")]).id());
        let mut more = s.clone();
        more.reducers = 4;
        assert_ne!(s.id(), more.id());
        assert_eq!(s.args()[0].0, "mode");
        // The id is the raw CID of the bytes.
        assert_eq!(s.id().codec(), crate::block::RAW);
    }

    #[test]
    fn split_sizes() {
        let auto = spec(&[]);
        assert_eq!(auto.split_size, AUTO_SPLIT);
        assert_eq!(JobSpec::decode(&auto.encode()).unwrap(), auto);
        // Boundaries of the automatic size: the floor, the range it scales in, the ceiling;
        // no slots counts as one.
        for (input, slots, split) in [
            (0, 4, 4 << 20),
            (1, 4, 4 << 20),
            (16 << 20, 4, 4 << 20),
            ((16 << 20) + 1, 4, (4 << 20) + 1),
            (256 << 20, 4, 64 << 20),
            (256 << 20, 32, 8 << 20),
            (256 << 20, 2, 128 << 20),
            (256 << 20, 1, 128 << 20),
            (256 << 20, 0, 128 << 20),
            (100 << 20, 0, 100 << 20),
            (1 << 30, 4, 128 << 20),
            (1 << 40, 1024, 128 << 20),
        ] {
            assert_eq!(
                auto.split_for(input, slots),
                split,
                "{input} bytes, {slots} slots"
            );
        }
        assert_eq!(spec(&[]).with_split_size(AUTO_SPLIT), auto);
        let fixed = spec(&[]).with_split_size(1);
        assert_eq!(fixed.split_size, MIN_SPLIT);
        assert_eq!(fixed.split_for(1 << 40, 4), MIN_SPLIT);
        assert_ne!(fixed.id(), auto.id());
    }

    #[test]
    fn invalid_specs_are_refused() {
        let bad = |f: &dyn Fn(&mut JobSpec)| {
            let mut s = spec(&[]);
            f(&mut s);
            JobSpec::decode(&s.encode()).unwrap_err()
        };
        assert!(matches!(bad(&|s| s.reducers = 0), JobSpecError::Invalid(_)));
        assert!(matches!(
            bad(&|s| s.inputs.clear()),
            JobSpecError::Invalid(_)
        ));
        assert!(matches!(
            bad(&|s| s.inputs[1].name = "a".into()),
            JobSpecError::Invalid(_)
        ));
        assert!(matches!(
            bad(&|s| s.split_size = 1),
            JobSpecError::Invalid(_)
        ));
        assert!(matches!(
            bad(&|s| s.split_size = MIN_SPLIT - 1),
            JobSpecError::Invalid(_)
        ));
        assert!(matches!(
            bad(&|s| s.limits.timeout_ms = 0),
            JobSpecError::Invalid(_)
        ));
        assert!(matches!(
            bad(&|s| s.args = vec![("b".into(), "1".into()), ("a".into(), "2".into())]),
            JobSpecError::Invalid(_)
        ));
        assert!(JobSpec::new(cid(0), vec![], 1, []).is_err());
    }

    #[test]
    fn verification_is_part_of_the_job() {
        // A verified run must not reuse an unverified one's output: different ids.
        let plain = spec(&[]);
        assert_eq!(plain.verify, 1);
        for (asked, kept) in [
            (0, 1),
            (1, 1),
            (2, 2),
            (MAX_VERIFY, MAX_VERIFY),
            (99, MAX_VERIFY),
        ] {
            let s = spec(&[]).with_verify(asked);
            assert_eq!(s.verify, kept, "asked {asked}");
            assert_eq!(JobSpec::decode(&s.encode()).unwrap(), s);
            assert_eq!(s.id() == plain.id(), kept == 1, "asked {asked}");
        }
        for bad in [0, MAX_VERIFY + 1] {
            let mut s = spec(&[]);
            s.verify = bad;
            assert!(matches!(
                JobSpec::decode(&s.encode()),
                Err(JobSpecError::Invalid(_))
            ));
        }
    }

    #[test]
    fn a_run_without_the_memo_is_another_job() {
        let plain = spec(&[]);
        assert!(plain.memo);
        let full = spec(&[]).with_memo(false);
        assert_eq!(JobSpec::decode(&full.encode()).unwrap(), full);
        assert_ne!(full.id(), plain.id());
        assert_eq!(spec(&[]).with_memo(true).id(), plain.id());
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let good = spec(&[("k", "v")]).encode();
        for cut in 0..good.len() {
            assert!(JobSpec::decode(&good[..cut]).is_err());
        }
        for i in 0..good.len() {
            for x in [1u8, 0x80, 0xff] {
                let mut m = good.clone();
                m[i] ^= x;
                let _ = JobSpec::decode(&m);
            }
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(JobSpec::decode(&trailing).is_err());
    }
}
