//! Cutting a byte range of an input into batches of whole records, the way every map task
//! reads its split (`p2pmr run-local` from files, the distributed engine from blocks).
//!
//! The rule, from the MapReduce paper: a record is a line (bytes up to and including `\n`; a
//! final line without `\n` is a record too), and a task over the range `[start, end)` processes
//! every record that *starts* in its range: it skips the partial record it begins inside and
//! reads past `end` to finish its last record. Ranges that tile an input therefore see every
//! record exactly once, wherever the range and block edges fall.
//!
//! [`RecordSplitter`] is sans-I/O: feed it the input's bytes from [`RecordSplitter::feed_from`]
//! on, in pieces of any size, until [`RecordSplitter::is_done`] or the end of the input.

/// Version of the record rule above and of how records are grouped into the batches a map
/// task is given (a module sees the batches, so its output may depend on them). Task outputs
/// are remembered under keys that include it ([`crate::memo`]): a change to either must change
/// it. Version 2: batches are the whole records as they lie in each piece fed, not ~1 MiB.
pub const RECORD_RULE: u32 = 2;

/// Cuts a range of an input into batches of whole records.
#[derive(Debug, Clone)]
pub struct RecordSplitter {
    start: u64,
    end: u64,
    /// Absolute offset of the next byte to be fed.
    pos: u64,
    skipping: bool,
    done: bool,
    carry: Vec<u8>,
    carry_offset: u64,
    batch: usize,
}

/// A batch of whole records and the input offset of its first byte.
pub type Batch = (u64, Vec<u8>);

impl RecordSplitter {
    /// A splitter for the records starting in `[start, end)`, making batches of about
    /// `batch` bytes (a batch is larger only when a single record is).
    pub fn new(start: u64, end: u64, batch: usize) -> Self {
        Self {
            start,
            end,
            pos: start.saturating_sub(1),
            skipping: start > 0,
            done: start >= end,
            carry: Vec::new(),
            carry_offset: start,
            batch: batch.max(1),
        }
    }

    /// The input offset the fed bytes must start at (one byte before the range, to see
    /// whether a record starts exactly at its start).
    pub fn feed_from(&self) -> u64 {
        self.pos
    }

    /// Whether the range's last record is complete: no more bytes are needed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The range's start: records starting from it on are the range's.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The range's end (exclusive): records starting before it are the range's.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Ends the range at `end` instead, if that leaves it a byte and no byte at or past
    /// `end - 1` has been fed yet (no record past it can have been handed out); says whether
    /// it did. The records from `end`
    /// on are then another range's, `[end, old end)`: the two still see every record once.
    pub fn shorten(&mut self, end: u64) -> bool {
        // The record holding byte `end - 1` is the last one; none of it may have been seen,
        // or a batch could already hold records past it.
        if self.done || end >= self.end || end <= self.pos || end <= self.start {
            return false;
        }
        self.end = end;
        true
    }

    /// Feeds the next bytes of the input, handing each batch they complete to `each`: whole
    /// records inside `bytes` are passed as they lie there, without being copied (in batches
    /// of at most `batch` bytes, or one longer record), and only a record that began in
    /// earlier bytes is assembled first. Stops at the first error `each` returns.
    pub fn feed<E>(
        &mut self,
        bytes: &[u8],
        mut each: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(mut data) = self.intake(bytes) else {
            return Ok(());
        };
        if !self.carry.is_empty() {
            // Finish the record the carry holds the start of.
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.carry.extend_from_slice(&data[..=i]);
                    data = &data[i + 1..];
                    if let Some((offset, batch)) = self.take_rest() {
                        each(offset, &batch)?;
                    }
                }
                None => {
                    self.carry.extend_from_slice(data);
                    data = &[];
                }
            }
        }
        while !data.is_empty() {
            let window = &data[..data.len().min(self.batch)];
            let end = match window.iter().rposition(|&b| b == b'\n') {
                Some(k) => k + 1,
                // A record longer than a batch: whole, if it ends in these bytes.
                None => match data.iter().position(|&b| b == b'\n') {
                    Some(k) => k + 1,
                    None => break,
                },
            };
            each(self.carry_offset, &data[..end])?;
            self.carry_offset += end as u64;
            data = &data[end..];
        }
        // A record these bytes only begin.
        self.carry.extend_from_slice(data);
        if self.done {
            if let Some((offset, batch)) = self.take_rest() {
                each(offset, &batch)?;
            }
        }
        Ok(())
    }

    /// The part of `bytes` that belongs to the range's records, after skipping the record
    /// the range begins inside and stopping after the record holding its last byte (then the
    /// splitter is done); `None` when none of it does.
    fn intake<'b>(&mut self, mut bytes: &'b [u8]) -> Option<&'b [u8]> {
        if self.done {
            return None;
        }
        if self.skipping {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let first = self.pos + i as u64 + 1;
                    self.pos = first;
                    bytes = &bytes[i + 1..];
                    self.skipping = false;
                    self.carry_offset = first;
                    if first >= self.end {
                        self.done = true;
                        return None;
                    }
                }
                None => {
                    self.pos += bytes.len() as u64;
                    return None;
                }
            }
        }
        // The last record is the one holding byte end-1: it ends at the first `\n` from there.
        let from = (self.end - 1).saturating_sub(self.pos);
        let take = match usize::try_from(from)
            .ok()
            .filter(|&f| f < bytes.len())
            .and_then(|f| {
                bytes[f..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|j| f + j + 1)
            }) {
            Some(stop) => {
                self.done = true;
                stop
            }
            None => bytes.len(),
        };
        self.pos += take as u64;
        Some(&bytes[..take])
    }

    /// The input has ended: returns the last batch, if any (it may lack a final `\n`).
    pub fn finish(&mut self) -> Option<Batch> {
        self.done = true;
        if self.skipping {
            return None;
        }
        self.take_rest()
    }

    fn take_rest(&mut self) -> Option<Batch> {
        if self.carry.is_empty() {
            return None;
        }
        let batch = std::mem::take(&mut self.carry);
        let offset = self.carry_offset;
        self.carry_offset += batch.len() as u64;
        Some((offset, batch))
    }
}

/// Splits a batch (first byte at input offset `offset`) around the records that start at the
/// offsets in `skip` (sorted), the bad records a job was told to leave out: returns the pieces
/// to map, each with its own input offset, and how many records were left out. Offsets in
/// `skip` that start no record of this batch are ignored.
pub fn without_records<'a>(
    batch: &'a [u8],
    offset: u64,
    skip: &[u64],
) -> (Vec<(u64, &'a [u8])>, u64) {
    let end = offset + batch.len() as u64;
    let first = skip.partition_point(|&s| s < offset);
    let mut pieces = Vec::new();
    let (mut from, mut skipped) = (0usize, 0u64);
    for &s in skip[first..].iter().take_while(|&&s| s < end) {
        let at = (s - offset) as usize;
        // Only a record start: the batch's first byte, or the byte after a newline.
        if at < from || (at > 0 && batch[at - 1] != b'\n') {
            continue;
        }
        let next = batch[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(batch.len(), |p| at + p + 1);
        if at > from {
            pieces.push((offset + from as u64, &batch[from..at]));
        }
        skipped += 1;
        from = next;
    }
    if from < batch.len() {
        pieces.push((offset + from as u64, &batch[from..]));
    }
    (pieces, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a splitter over `input` fed in pieces of `piece` bytes; checks that every batch
    /// keeps within the batch size unless it is one longer record.
    fn split(input: &[u8], start: u64, end: u64, batch: usize, piece: usize) -> Vec<Batch> {
        split_shortened(input, (start, end), batch, piece, (usize::MAX, &[])).0
    }

    /// Like [`split`], but once `after` bytes have been fed the range is shortened to the
    /// first of `ends` the splitter takes; returns the batches and the range's final end.
    fn split_shortened(
        input: &[u8],
        (start, end): (u64, u64),
        batch: usize,
        piece: usize,
        (after, ends): (usize, &[u64]),
    ) -> (Vec<Batch>, u64) {
        let mut s = RecordSplitter::new(start, end, batch);
        let mut out = Vec::new();
        let mut at = s.feed_from() as usize;
        let mut tried = false;
        while at < input.len() && !s.is_done() {
            if !tried && at >= after {
                tried = true;
                for &e in ends {
                    if s.shorten(e) {
                        break;
                    }
                }
            }
            let next = (at + piece).min(input.len());
            s.feed(&input[at..next], |offset, bytes| {
                out.push((offset, bytes.to_vec()));
                Ok::<_, ()>(())
            })
            .unwrap();
            at = next;
        }
        out.extend(s.finish());
        for (offset, bytes) in &out {
            let records = records(bytes);
            assert!(
                bytes.len() <= batch || records.len() == 1,
                "a slice at {offset} of {} bytes holds {} records",
                bytes.len(),
                records.len()
            );
        }
        (out, s.end())
    }

    /// A xorshift generator of numbers below its argument.
    fn numbers(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    fn records(input: &[u8]) -> Vec<(u64, &[u8])> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < input.len() {
            let end = input[start..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(input.len(), |i| start + i + 1);
            out.push((start as u64, &input[start..end]));
            start = end;
        }
        out
    }

    #[test]
    fn tiled_ranges_see_every_record_once() {
        let mut rand = numbers(12345);
        for case in 0..300 {
            let len = rand(200) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    if rand(6) == 0 {
                        b'\n'
                    } else {
                        b'a' + rand(3) as u8
                    }
                })
                .collect();
            let mut cuts = vec![0u64, len as u64];
            for _ in 0..rand(6) {
                cuts.push(rand(len as u64 + 1));
            }
            cuts.sort();
            let (batch, piece) = (1 + rand(20) as usize, 1 + rand(30) as usize);
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                for (offset, bytes) in split(&input, w[0], w[1], batch, piece) {
                    // Batches hold whole records only.
                    for (o, r) in records(&bytes) {
                        got.push((offset + o, r.to_vec()));
                    }
                }
            }
            let want: Vec<(u64, Vec<u8>)> = records(&input)
                .into_iter()
                .map(|(o, r)| (o, r.to_vec()))
                .collect();
            assert_eq!(
                got, want,
                "case {case}: {cuts:?} batch {batch} piece {piece}"
            );
        }
    }

    #[test]
    fn a_range_shortened_while_read_and_its_rest_see_every_record_once() {
        let mut rand = numbers(777);
        let mut shortened = 0;
        for case in 0..500 {
            let len = 1 + rand(200) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| if rand(5) == 0 { b'\n' } else { b'x' })
                .collect();
            let start = rand(len as u64);
            let end = start + 1 + rand(len as u64 - start);
            let after = rand(len as u64 + 1) as usize;
            let ends: Vec<u64> = (0..3).map(|_| rand(len as u64 + 2)).collect();
            let piece = 1 + rand(40) as usize;
            let (first, cut) = split_shortened(&input, (start, end), 7, piece, (after, &ends));
            let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut add = |batches: Vec<Batch>| {
                for (offset, bytes) in batches {
                    for (o, r) in records(&bytes) {
                        got.push((offset + o, r.to_vec()));
                    }
                }
            };
            add(first);
            if cut < end {
                shortened += 1;
                assert!(cut > start, "case {case}: cut at {cut}, start {start}");
                add(split(&input, cut, end, 7, piece));
            }
            let want: Vec<(u64, Vec<u8>)> = records(&input)
                .into_iter()
                .filter(|(o, _)| (start..end).contains(o))
                .map(|(o, r)| (o, r.to_vec()))
                .collect();
            assert_eq!(got, want, "case {case}: [{start}, {end}) cut at {cut}");
        }
        assert!(shortened > 100, "only {shortened} cases were cut short");
    }

    #[test]
    fn a_range_is_shortened_only_ahead_of_what_was_fed() {
        let input = b"aaaa\nbbbb\ncccc\n";
        let mut s = RecordSplitter::new(0, 15, 100);
        s.feed(&input[..7], |_, _| Ok::<_, ()>(())).unwrap();
        // Byte 6 was fed: the record holding it may already be out.
        for end in [0, 3, 6, 7, 15, 20] {
            assert!(!s.shorten(end), "{end}");
        }
        assert!(s.shorten(10));
        assert_eq!(s.end(), 10);
        let mut got = Vec::new();
        s.feed(&input[7..], |o, b| {
            got.push((o, b.to_vec()));
            Ok::<_, ()>(())
        })
        .unwrap();
        assert!(s.is_done());
        // "bbbb\n" holds byte 9: it is the last record; "cccc" is the rest's.
        assert_eq!(got, vec![(5, b"bbbb\n".to_vec())]);
        assert!(!s.shorten(12), "a finished range is not shortened");
    }

    #[test]
    fn a_long_record_is_one_batch() {
        let mut input = vec![b'x'; 5000];
        input.push(b'\n');
        input.extend_from_slice(b"short\n");
        let batches = split(&input, 0, input.len() as u64, 100, 64);
        // The long record is never cut: the first batch holds all of it.
        assert_eq!(batches[0].0, 0);
        assert!(batches[0].1.len() >= 5001, "{}", batches[0].1.len());
        assert!(batches[0].1.ends_with(b"\n"));
        let all: Vec<u8> = batches.iter().flat_map(|b| b.1.clone()).collect();
        assert!(all == input, "batches tile the input");
        // A range starting inside the long record skips it entirely.
        assert_eq!(split(&input, 10, 20, 100, 7), vec![]);
        assert_eq!(
            split(&input, 10, 5002, 100, 7),
            vec![(5001, b"short\n".to_vec())]
        );
    }

    #[test]
    fn bad_records_are_cut_out_of_batches() {
        let batch = b"aa\nbad\ncc\nbad2";
        let at = |b: &[u8], needle: &str| {
            b.windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u64
        };
        let (bad, bad2) = (100 + at(batch, "bad\n"), 100 + at(batch, "bad2"));
        let (pieces, n) = without_records(batch, 100, &[bad, bad2]);
        assert_eq!(n, 2);
        assert_eq!(pieces, vec![(100, &b"aa\n"[..]), (107, &b"cc\n"[..])]);
        // The first record, a skip list for other batches, and a non-record offset.
        let (pieces, n) = without_records(batch, 100, &[5, 100, 101, 500]);
        assert_eq!(n, 1);
        assert_eq!(pieces, vec![(103, &b"bad\ncc\nbad2"[..])]);
        // Every record.
        let all = [100, 103, 107, 110];
        assert_eq!(without_records(batch, 100, &all), (vec![], 4));
        assert_eq!(without_records(b"", 0, &[0]), (vec![], 0));
        assert_eq!(
            without_records(batch, 100, &[]),
            (vec![(100, &batch[..])], 0)
        );
    }
}
