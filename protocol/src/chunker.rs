//! How a file's bytes are cut into leaves: fixed-size chunks (kubo's default `size-262144`) or
//! content-defined ones (kubo's `buzhash`), whose boundaries follow the bytes around them, so
//! an insertion early in a file moves no boundary after the next one.
//!
//! [`Buzhash`] is boxo's `chunker/buzhash.go` (what `ipfs add --chunker=buzhash` uses) as a
//! sans-I/O function over a buffer: a rolling hash of the last 32 bytes, a cut where its low 17
//! bits are zero, chunks of 128 KiB to 512 KiB. Checked against boundaries boxo's own code
//! gives (`tests/vectors/buzhash.tsv`).

use crate::unixfs::UnixFsError;
use std::fmt;
use std::str::FromStr;

/// How a file is cut into leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chunker {
    /// Chunks of this many bytes (the last one shorter).
    Size(usize),
    /// boxo's buzhash: content-defined chunks of 128 KiB to 512 KiB.
    Buzhash,
}

impl Chunker {
    /// kubo's default: 256 KiB chunks.
    pub const DEFAULT: Chunker = Chunker::Size(crate::unixfs::DEFAULT_CHUNK_SIZE);

    /// The largest chunk it makes.
    pub fn max_chunk(self) -> usize {
        match self {
            Self::Size(n) => n,
            Self::Buzhash => Buzhash::MAX,
        }
    }

    /// How many bytes of `buf` the next chunk takes, or `None` if more bytes are needed to
    /// tell (`buf` holds fewer than [`Chunker::max_chunk`] bytes and the input goes on).
    /// `eof`: `buf` holds the rest of the input. `Some(0)` only for an empty `buf` at the end.
    pub fn cut(self, buf: &[u8], eof: bool) -> Option<usize> {
        if buf.len() < self.max_chunk() && !eof {
            return None;
        }
        Some(match self {
            Self::Size(n) => buf.len().min(n),
            Self::Buzhash => Buzhash::cut(buf),
        })
    }
}

impl fmt::Display for Chunker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Size(n) => write!(f, "size-{n}"),
            Self::Buzhash => f.write_str("buzhash"),
        }
    }
}

impl FromStr for Chunker {
    type Err = UnixFsError;

    /// kubo's names: `size-N` (1 byte to 2 MiB) or `buzhash`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const WHAT: &str = "a chunker is size-N (N from 1 to 2097152) or buzhash";
        if s == "buzhash" {
            return Ok(Self::Buzhash);
        }
        let n: usize = s
            .strip_prefix("size-")
            .and_then(|n| n.parse().ok())
            .ok_or(UnixFsError::InvalidLayout(WHAT))?;
        if n == 0 || n > crate::MAX_BLOCK_SIZE {
            return Err(UnixFsError::InvalidLayout(WHAT));
        }
        Ok(Self::Size(n))
    }
}

/// boxo's buzhash chunker, as [`Chunker::Buzhash`] runs it.
#[derive(Debug)]
pub struct Buzhash;

impl Buzhash {
    /// The smallest chunk (unless the input ends sooner).
    pub const MIN: usize = 128 << 10;
    /// The largest chunk.
    pub const MAX: usize = 512 << 10;
    /// A cut where these bits of the hash are zero (one in 128 KiB on random bytes).
    const MASK: u32 = (1 << 17) - 1;
    /// Bytes the rolling hash covers.
    const WINDOW: usize = 32;

    /// The length of the next chunk of `buf`, which holds [`Buzhash::MAX`] bytes or the rest
    /// of the input: all of it if shorter than [`Buzhash::MIN`], else where the hash of the 32
    /// bytes before the cut first has its low 17 bits zero past the minimum, else all of it.
    pub fn cut(buf: &[u8]) -> usize {
        let buf = &buf[..buf.len().min(Self::MAX)];
        if buf.len() < Self::MIN {
            return buf.len();
        }
        let start = Self::MIN - Self::WINDOW;
        let mut state = 0u32;
        for &b in &buf[start..Self::MIN] {
            state = state.rotate_left(1) ^ BYTEHASH[b as usize];
        }
        // The window is buf[i..i + 32]; a cut after it leaves a chunk of i + 32 bytes. The
        // byte leaving the window is rotated 32 times, i.e. not at all, as in boxo.
        let mut i = start;
        while i + Self::WINDOW < buf.len() {
            if state & Self::MASK == 0 {
                break;
            }
            state = state.rotate_left(1)
                ^ BYTEHASH[buf[i] as usize]
                ^ BYTEHASH[buf[i + Self::WINDOW] as usize];
            i += 1;
        }
        i + Self::WINDOW
    }
}

/// boxo's table: a random 32-bit value per byte.
const BYTEHASH: [u32; 256] = [
    0x6236e7d5, 0x10279b0b, 0x72818182, 0xdc526514, 0x2fd41e3d, 0x777ef8c8, 0x83ee5285, 0x2c8f3637,
    0x2f049c1a, 0x57df9791, 0x9207151f, 0x9b544818, 0x74eef658, 0x2028ca60, 0x0271d91a, 0x27ae587e,
    0xecf9fa5f, 0x236e71cd, 0xf43a8a2e, 0x0bb13380, 0x9e57912c, 0x89a26cdb, 0x9fcf3d71, 0xa86da6f1,
    0x9c49f376, 0x346aecc7, 0xf094a9ee, 0xea99e9cb, 0xb01713c6, 0x088acffb, 0x2960a0fb, 0x344a626c,
    0x7ff22a46, 0x6d7a1aa5, 0x6a714916, 0x41d454ca, 0x8325b830, 0x0b65f563, 0x447fecca, 0xf9d0ea5e,
    0xc1d9d3d4, 0xcb5ec574, 0x55aae902, 0x86edc0e7, 0x0d3a9e33, 0xe70dc1e1, 0xe3c5f639, 0x9b43140a,
    0xc6490ac5, 0x5e4030fb, 0x8e976dd5, 0xa87468ea, 0xf830ef6f, 0xcc1ed5a5, 0x611f4e78, 0xddd11905,
    0xf2613904, 0x566c67b9, 0x905a5ccc, 0x7b37b3a4, 0x4b53898a, 0x6b8fd29d, 0xaad81575, 0x511be414,
    0x3cfac1e7, 0x8029a179, 0xd40efeda, 0x07380e02, 0xdc9beffd, 0x2d049082, 0x99bc7831, 0xff5002a8,
    0x21ce7646, 0x01cd049b, 0x0f43994f, 0xc3c6c5a5, 0xbbda5f50, 0x0ec15ec7, 0x9adb19b6, 0x0c1e80b9,
    0xb9b52968, 0xae162419, 0x2542b405, 0x91a42e9d, 0x6be0f668, 0x6ed7a6b9, 0xbc2777b4, 0xe162ce56,
    0x4266aad5, 0x60fdb704, 0x66f832a5, 0x9595f6ca, 0xfee83ced, 0x55228d99, 0x12bf0e28, 0x66896459,
    0x0789afda, 0x0282baa8, 0x2367a343, 0x591491b0, 0x2ff1a4b1, 0x410739b6, 0x9b7055a0, 0x2e0eb229,
    0x24fc8252, 0x3327d3df, 0xb0782669, 0x1c62e069, 0x7f503101, 0xf50593ae, 0xd9eb275d, 0xe00eb678,
    0x5917ccde, 0x97b9660a, 0xdd06202d, 0xed229e22, 0xa9c735bf, 0xd6316fe6, 0x6fc72e4c, 0x0206dfa2,
    0xd6b15c5a, 0x69d87b49, 0x09c97745, 0x13445d61, 0x35a975aa, 0x859aa9b9, 0x65380013, 0xd1fb6391,
    0xc29255fd, 0x784a3b91, 0xb9e74c26, 0x63ce4d40, 0xc07cbe9e, 0xe6e4529e, 0x0fb3632f, 0x9438d9c9,
    0x682f94a8, 0xf8fd4611, 0x257ec1ed, 0x475ce3d6, 0x60ee2db1, 0x2afab002, 0x2b9e4878, 0x86b340de,
    0x1482fdca, 0xfe41b3bf, 0xd4a412b0, 0xe09db98c, 0xc1af5d53, 0x7e55e25f, 0xd3346b38, 0xb7a12cbd,
    0x9c6827ba, 0x71f78bee, 0x8c3a0f52, 0x150491b0, 0xf26de912, 0x233e3a4e, 0xd309ebba, 0xa0a9e0ff,
    0xca2b5921, 0xeeb9893c, 0x33829e88, 0x9870cc2a, 0x23c4b9d0, 0xeba32ea3, 0xbdac4d22, 0x3bc8c44c,
    0x1e8d0397, 0xf9327735, 0x783b009f, 0x0eb83742, 0x2621dc71, 0xed017d03, 0x5c760aa1, 0x5a69814b,
    0x96e3047f, 0xa93c9cde, 0x615c86f5, 0xb4322aa5, 0x4225534d, 0x0d2e2de3, 0xccfccc4b, 0x0bac2a57,
    0xf0a06d04, 0xbc78d737, 0xf2d1f766, 0xf5a7953c, 0xbcdfda85, 0x5213b7d5, 0xbce8a328, 0xd38f5f18,
    0xdb094244, 0xfe571253, 0x317fa7ee, 0x4a324f43, 0x3ffc39d9, 0x51b3fa8e, 0x7a4bee9f, 0x78bbc682,
    0x9f5c0350, 0x02fe286c, 0x245ab686, 0xed6bf7d7, 0x0ac4988a, 0x3fe010fa, 0xc65fe369, 0xa45749cb,
    0x2b84e537, 0xde9ff363, 0x20540f9a, 0xaa8c9b34, 0x5bc476b3, 0x1d574bd7, 0x929100ad, 0x4721de4d,
    0x27df1b05, 0x58b18546, 0xb7e76764, 0xdf904e58, 0x97af57a1, 0xbd4dc433, 0xa6256dfd, 0xf63998f3,
    0xf1e05833, 0xe20acf26, 0xf57fd9d6, 0x90300b4d, 0x89df4290, 0x68d01cbc, 0xcf893ee3, 0xcc42a046,
    0x778e181b, 0x67265c76, 0xe981a4c4, 0x82991da1, 0x708f7294, 0xe6e2ae62, 0xfc441870, 0x95e1b0b6,
    0x0445f825, 0x5a93b47f, 0x5e9cf4be, 0x84da71e7, 0x9d9582b0, 0x9bf835ef, 0x591f61e2, 0x43325985,
    0x5d2de32e, 0x8d8fbf0f, 0x95b30f38, 0x07ad5b6e, 0x4e934edf, 0x3cd4990e, 0x9053e259, 0x5c41857d,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubo_names_parse_and_print() {
        for (name, chunker) in [
            ("size-262144", Chunker::DEFAULT),
            ("size-1", Chunker::Size(1)),
            ("buzhash", Chunker::Buzhash),
        ] {
            assert_eq!(name.parse::<Chunker>().unwrap(), chunker);
            assert_eq!(chunker.to_string(), name);
        }
        for bad in [
            "",
            "size-0",
            "size-2097153",
            "size-",
            "rabin",
            "buzhash-1",
            "size-x",
        ] {
            assert!(bad.parse::<Chunker>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cut_needs_a_full_buffer_or_the_end() {
        let bytes = vec![7u8; Buzhash::MAX];
        assert_eq!(Chunker::Buzhash.cut(&bytes[..1000], false), None);
        assert_eq!(Chunker::Buzhash.cut(&bytes[..1000], true), Some(1000));
        assert_eq!(Chunker::Buzhash.cut(&[], true), Some(0));
        assert_eq!(Chunker::DEFAULT.cut(&bytes[..1000], false), None);
        assert_eq!(Chunker::DEFAULT.cut(&bytes, false), Some(262144));
        let cut = Chunker::Buzhash.cut(&bytes, false).unwrap();
        assert!((Buzhash::MIN..=Buzhash::MAX).contains(&cut), "{cut}");
    }
}
