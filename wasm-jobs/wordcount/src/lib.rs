//! `wordcount`: how often each word occurs, with the MIT 6.824 semantics. A word is a maximal
//! run of Unicode letters (general category L: Lu, Ll, Lt, Lm, Lo), case kept; anything else,
//! including bytes that are not valid UTF-8, separates words. With a combiner.

use p2pmr_guest::{decimal, Counter, Emit, Input, Job, Records, Values};
use std::cell::RefCell;

thread_local! {
    /// The current map task's counts.
    static COUNTS: RefCell<Counter> = RefCell::new(Counter::new());
}

/// The job.
#[derive(Debug)]
pub struct WordCount;

impl Job for WordCount {
    fn map(_: &Input, records: Records, _: &mut Emit) {
        // In-mapper combining: the task counts its words in one table and emits each
        // distinct word once, at the end (the combiner then has little left to do).
        // Words never span a line end, so the batch is counted in one pass, not line by line.
        COUNTS.with_borrow_mut(|counts| counts.add_words(records.as_bytes()));
    }

    fn map_end(_: &Input, emit: &mut Emit) {
        let mut buf = [0; 20];
        COUNTS
            .take()
            .for_each(|word, n| emit.emit(word, decimal(n, &mut buf)));
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
