//! A deterministic English-like text corpus of any size, streamed and never held whole: the
//! input of `p2pmr demo`, the integration tests and the benchmarks.
//!
//! Words are drawn with a Zipf-like distribution (the frequency of the word of rank r is
//! proportional to 1/r), in lines of 6 to 17 words. The first ranks are common English words
//! in about their order of use (`words.txt`, a word list), so the top of a wordcount reads as
//! English does ("the", "of", "and"...); rarer ranks are their inflections ("words",
//! "turned") and then compounds of two ("waterside"), a long tail as in real text.

use std::io::{self, Read};

/// A deterministic English-like corpus: Zipf-distributed words in lines.
#[derive(Debug)]
pub struct Corpus {
    remaining: u64,
    words: Vec<String>,
    /// Cumulative weights of `words`, for sampling by binary search.
    cumulative: Vec<f64>,
    state: u64,
    line: Vec<u8>,
    at: usize,
}

/// Common English words, most used first.
const WORDS: &str = include_str!("words.txt");
/// Endings that make the rarer ranks from the common words.
const SUFFIXES: [&str; 5] = ["s", "ed", "ing", "er", "ly"];
/// Distinct words drawn from.
const VOCABULARY: usize = 20_000;

/// The words by rank.
fn vocabulary() -> Vec<String> {
    let common: Vec<&str> = WORDS.split_whitespace().collect();
    let n = common.len();
    (0..VOCABULARY)
        .map(|r| {
            if r < n {
                return common[r].to_owned();
            }
            let i = r - n;
            if i < n * SUFFIXES.len() {
                return format!("{}{}", common[i % n], SUFFIXES[i / n]);
            }
            let i = i - n * SUFFIXES.len();
            format!("{}{}", common[i % n], common[(i / n + 1 + i % n) % n])
        })
        .collect()
}

impl Corpus {
    /// A corpus of exactly `size` bytes.
    pub fn new(size: u64) -> Self {
        let words = vocabulary();
        let n = words.len();
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|r| {
                total += 1.0 / r as f64;
                total
            })
            .collect();
        Self {
            remaining: size,
            words,
            cumulative,
            state: 0x2545_f491_4f6c_dd1d,
            line: Vec::new(),
            at: 0,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill_line(&mut self) {
        self.line.clear();
        self.at = 0;
        let len = 6 + self.next_random() % 12;
        let total = *self.cumulative.last().expect("words");
        for i in 0..len {
            let u = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let r = self
                .cumulative
                .partition_point(|&c| c < u)
                .min(self.words.len() - 1);
            if i > 0 {
                self.line.push(b' ');
            }
            self.line.extend_from_slice(self.words[r].as_bytes());
        }
        self.line.push(b'\n');
    }
}

impl Read for Corpus {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() && self.remaining > 0 {
            if self.at == self.line.len() {
                self.fill_line();
            }
            let take = (self.line.len() - self.at)
                .min(buf.len() - n)
                .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            buf[n..n + take].copy_from_slice(&self.line[self.at..self.at + take]);
            self.at += take;
            n += take;
            self.remaining -= take as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn corpus_is_deterministic_sized_and_zipf_like() {
        let mut a = Vec::new();
        Corpus::new(1 << 20).read_to_end(&mut a).unwrap();
        let mut b = Vec::new();
        Corpus::new(1 << 20).read_to_end(&mut b).unwrap();
        assert_eq!(a.len(), 1 << 20);
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for w in text.split_whitespace() {
            *counts.entry(w).or_default() += 1;
        }
        let mut by_count: Vec<u64> = counts.values().copied().collect();
        by_count.sort_unstable_by(|a, b| b.cmp(a));
        // Rank 1 is about twice rank 2 and ten times rank 10.
        let (r1, r2, r10) = (by_count[0] as f64, by_count[1] as f64, by_count[9] as f64);
        assert!((1.6..2.5).contains(&(r1 / r2)), "{r1} {r2}");
        assert!((7.0..13.0).contains(&(r1 / r10)), "{r1} {r10}");
        assert!(counts.len() > 5000, "a wide vocabulary: {}", counts.len());
        // The most frequent words are English's.
        let mut top: Vec<(&str, u64)> = counts.into_iter().collect();
        top.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let top: Vec<&str> = top.iter().take(3).map(|(w, _)| *w).collect();
        assert_eq!(top, ["the", "of", "and"]);
    }
}
