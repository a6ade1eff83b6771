//! `grep`: the lines matching `--arg pattern=REGEX` (Rust `regex` syntax, matched against the
//! line's bytes), keyed `input:offset` with the offset zero-padded to 20 digits, so the output
//! is grouped by input and ordered by byte offset.

use p2pmr_guest::{Emit, Input, Job, Records, Values};
use regex::bytes::Regex;
use std::cell::RefCell;

/// The job.
#[derive(Debug)]
pub struct Grep;

thread_local! {
    /// The compiled pattern, kept across batches of a task.
    static PATTERN: RefCell<Option<(String, Regex)>> = const { RefCell::new(None) };
}

impl Job for Grep {
    fn map(input: &Input, records: Records, emit: &mut Emit) {
        let pattern = input
            .arg("pattern")
            .expect("grep needs --arg pattern=REGEX");
        PATTERN.with_borrow_mut(|cached| {
            if cached.as_ref().is_none_or(|(p, _)| p != pattern) {
                let re = Regex::new(pattern).unwrap_or_else(|e| panic!("bad pattern: {e}"));
                *cached = Some((pattern.to_owned(), re));
            }
            let re = &cached.as_ref().expect("set above").1;
            for record in records {
                if re.is_match(record.bytes) {
                    emit.emit(
                        format!("{}:{:020}", input.name(), record.offset()),
                        record.bytes,
                    );
                }
            }
        });
    }

    fn reduce(key: &[u8], values: &mut Values, emit: &mut Emit) {
        while let Some(line) = values.next() {
            emit.emit(key, line);
        }
    }
}

p2pmr_guest::export!(Grep);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_lines_by_input_and_offset() {
        let out = p2pmr_guest::local::run::<Grep>(
            &[("b", b"cat\ndog\ncatalog"), ("a", b"concat\n")],
            &[("pattern", "cat")],
            1,
        );
        assert_eq!(
            String::from_utf8(out.concat()).unwrap(),
            "a:00000000000000000000\tconcat\nb:00000000000000000000\tcat\nb:00000000000000000008\tcatalog\n"
        );
    }
}
