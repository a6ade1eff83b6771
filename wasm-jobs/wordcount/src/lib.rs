//! `wordcount`: how often each word occurs, with the MIT 6.824 semantics. A word is a maximal
//! run of Unicode letters (general category L: Lu, Ll, Lt, Lm, Lo), case kept; anything else,
//! including bytes that are not valid UTF-8, separates words. With a combiner.

use p2pmr_guest::text::words;
use p2pmr_guest::{Emit, FxHashMap, Input, Job, Records, Values};

/// The job.
#[derive(Debug)]
pub struct WordCount;

impl Job for WordCount {
    fn map(_: &Input, records: Records, emit: &mut Emit) {
        // In-mapper combining: count a batch's words here and emit each distinct word once
        // per batch (about 15x fewer pairs for the combiner than one pair per word).
        let mut counts: FxHashMap<&[u8], u64> = FxHashMap::default();
        for record in records {
            for word in words(record.bytes) {
                *counts.entry(word).or_insert(0) += 1;
            }
        }
        for (word, n) in counts {
            emit.emit(word, n.to_string());
        }
    }

    fn reduce(key: &[u8], values: &mut Values, emit: &mut Emit) {
        emit.emit(key, values.sum_u64().to_string());
    }

    const HAS_COMBINE: bool = true;

    fn combine(key: &[u8], values: &mut Values, emit: &mut Emit) {
        emit.emit(key, values.sum_u64().to_string());
    }
}

p2pmr_guest::export!(WordCount);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let out =
            p2pmr_guest::local::run::<WordCount>(&[("a", b"the cat\nthe"), ("b", b"The")], &[], 1);
        assert_eq!(out.concat(), b"The\t1\ncat\t1\nthe\t2\n");
    }
}
