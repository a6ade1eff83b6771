//! `indexer`: an inverted index over several inputs. For each word (as `wordcount` defines
//! words), the number of inputs containing it and their names, sorted:
//! `word<TAB>N name1,name2`. The combiner drops repeated names early.

use p2pmr_guest::text::words;
use p2pmr_guest::{Emit, Input, Job, Records, Values};
use std::collections::BTreeSet;

/// The job.
#[derive(Debug)]
pub struct Indexer;

/// The distinct values, sorted.
fn distinct(values: &mut Values) -> BTreeSet<Vec<u8>> {
    let mut names = BTreeSet::new();
    while let Some(v) = values.next() {
        if !names.contains(v) {
            names.insert(v.to_vec());
        }
    }
    names
}

impl Job for Indexer {
    fn map(input: &Input, records: Records, emit: &mut Emit) {
        // Words never span a line end: one pass over the batch.
        for word in words(records.as_bytes()) {
            emit.emit(word, input.name());
        }
    }

    fn reduce(key: &[u8], values: &mut Values, emit: &mut Emit) {
        let names = distinct(values);
        let list: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let mut value = format!("{} ", list.len()).into_bytes();
        value.extend_from_slice(&list.join(&b","[..]));
        emit.emit(key, value);
    }

    const HAS_COMBINE: bool = true;

    fn combine(key: &[u8], values: &mut Values, emit: &mut Emit) {
        for name in distinct(values) {
            emit.emit(key, name);
        }
    }
}

p2pmr_guest::export!(Indexer);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index() {
        let out = p2pmr_guest::local::run::<Indexer>(
            &[("b.txt", b"cat dog cat"), ("a.txt", b"cat\n")],
            &[],
            1,
        );
        assert_eq!(
            String::from_utf8(out.concat()).unwrap(),
            "cat\t2 a.txt,b.txt\ndog\t1 b.txt\n"
        );
    }
}
