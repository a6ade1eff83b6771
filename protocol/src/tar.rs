//! Tar (POSIX ustar) headers, for kubo's `get`, which answers a file or directory as a tar
//! stream: a 512-byte header per entry, the file's bytes padded to 512, two zero blocks at the
//! end. Sizes past ustar's 8 GiB use GNU's base-256 field, as GNU tar and kubo read it.

use thiserror::Error;

/// Tar's block size: headers are one block, contents are padded to a whole number of them.
pub const BLOCK: usize = 512;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file of this many bytes.
    File(u64),
    /// A directory.
    Directory,
}

/// Why an entry cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TarError {
    /// The path does not fit ustar's name and prefix fields.
    #[error("path {0:?} is too long for a tar header")]
    PathTooLong(String),
}

/// The header of the entry at `path` (a directory's path without its trailing `/`).
pub fn header(path: &str, kind: Kind) -> Result<[u8; BLOCK], TarError> {
    let mut h = [0u8; BLOCK];
    let name = match kind {
        Kind::Directory => format!("{path}/"),
        Kind::File(_) => path.to_owned(),
    };
    let (prefix, name) = split_path(&name).ok_or_else(|| TarError::PathTooLong(path.into()))?;
    h[..name.len()].copy_from_slice(name.as_bytes());
    let (mode, size, flag) = match kind {
        Kind::File(size) => (0o644, size, b'0'),
        Kind::Directory => (0o755, 0, b'5'),
    };
    octal(&mut h[100..108], mode);
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    if size < 1 << 33 {
        octal(&mut h[124..136], size);
    } else {
        // GNU base-256: the high bit of the first byte set, the size big-endian after it.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], 0); // mtime
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    // The checksum is taken with its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let digits = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(digits.as_bytes());
    Ok(h)
}

/// Zeros that pad `size` bytes of content to a whole block.
pub fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

/// The end of an archive: two zero blocks.
pub fn trailer() -> [u8; 2 * BLOCK] {
    [0; 2 * BLOCK]
}

/// Splits `path` into ustar's prefix (155 bytes) and name (100 bytes) at a `/`.
fn split_path(path: &str) -> Option<(&str, &str)> {
    if path.len() <= 100 {
        return Some(("", path));
    }
    // The name part may keep a directory's trailing slash.
    let search = path.trim_end_matches('/');
    search
        .char_indices()
        .filter(|&(i, c)| c == '/' && i <= 155 && path.len() - i - 1 <= 100)
        .map(|(i, _)| (&path[..i], &path[i + 1..]))
        .next()
}

/// Writes `value` as zero-padded octal filling `field` but its last byte (a NUL).
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let digits = format!("{value:0width$o}");
    field[..width].copy_from_slice(digits.as_bytes());
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_name_size_kind_and_a_valid_checksum() {
        let h = header("bafy/part-00000", Kind::File(1234)).unwrap();
        assert_eq!(&h[..15], b"bafy/part-00000");
        assert_eq!(&h[124..136], b"00000002322\0");
        assert_eq!(h[156], b'0');
        assert_eq!(&h[257..265], b"ustar\x0000");
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut blank = h;
        blank[148..156].fill(b' ');
        assert_eq!(stored, blank.iter().map(|&b| u32::from(b)).sum::<u32>());
        let d = header("bafy", Kind::Directory).unwrap();
        assert_eq!((&d[..5], d[156]), (&b"bafy/"[..], b'5'));
    }

    #[test]
    fn long_paths_use_the_prefix_and_huge_files_base_256() {
        let dir = "d".repeat(120);
        let h = header(&format!("{dir}/file"), Kind::File(1)).unwrap();
        assert_eq!(&h[..4], b"file");
        assert_eq!(&h[345..465], dir.as_bytes());
        assert!(header(&"x".repeat(300), Kind::File(1)).is_err());
        let big = header("big", Kind::File(1 << 40)).unwrap();
        assert_eq!(big[124], 0x80);
        assert_eq!(&big[128..136], &(1u64 << 40).to_be_bytes());
    }

    #[test]
    fn padding_fills_to_a_block() {
        for (size, pad) in [(0, 0), (1, 511), (511, 1), (512, 0), (513, 511)] {
            assert_eq!(padding(size), pad, "{size}");
        }
    }
}
