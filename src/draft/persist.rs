//! What every drafter state file shares: an FNV-1a checksum over the body,
//! a bounds-checked reader, and an atomic write (temp file, fsync, rename).
//!
//! The checksum is FNV-1a, written by hand: it is a few lines, needs no
//! dependency, and its job is to catch truncated or bit-flipped files
//! (interrupted copies, disk trouble), not tampering. Tampering is harmless
//! anyway: loaders also check every token id against the vocabulary.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Appends the checksum of everything in `buf` so far.
pub(crate) fn seal(buf: &mut Vec<u8>) {
    let sum = fnv1a64(buf);
    buf.extend_from_slice(&sum.to_le_bytes());
}

/// The body of a sealed file, or `None` when it is too short or its
/// checksum does not match.
pub(crate) fn unseal(bytes: &[u8]) -> Option<&[u8]> {
    let body_end = bytes.len().checked_sub(8)?;
    let stored = u64::from_le_bytes(bytes[body_end..].try_into().ok()?);
    (fnv1a64(&bytes[..body_end]) == stored).then_some(&bytes[..body_end])
}

/// Reads fixed-size fields from a byte slice, failing (never panicking) on
/// a short file.
pub(crate) struct Reader<'a> {
    pub bytes: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }
}

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: into `<path>.tmp` in the same
/// directory, fsync, then rename over `path` (a crash leaves either the old
/// file or the new one, never half of one).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every platform lets us open a
        // directory, and the data is already safe, so best effort.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
