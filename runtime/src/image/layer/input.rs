//! The layer's input: decompressed (gzip, or none), and metered against
//! the image's [`Limits`] as the tar parser reads it, so that a gzip bomb
//! or endless extension headers stop at their bound.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::{LayerError, Limits, GZIP_MAGIC, HEADER_WINDOW, ZSTD_MAGIC};

/// `layer`, decompressed if it starts with the gzip magic.
pub(super) fn decompressed<'a>(
    mut layer: impl Read + 'a,
) -> Result<Box<dyn Read + 'a>, LayerError> {
    let mut head = [0u8; 4];
    let n = read_up_to(&mut layer, &mut head).map_err(LayerError::Read)?;
    let head = head.get(..n).unwrap_or_default().to_vec();
    if head.starts_with(ZSTD_MAGIC) {
        return Err(LayerError::Zstd);
    }
    let gzip = head.starts_with(GZIP_MAGIC);
    let input = io::Cursor::new(head).chain(layer);
    if gzip {
        // Several gzip members are one stream, as Go's reader takes them.
        return Ok(Box::new(flate2::read::MultiGzDecoder::new(input)));
    }
    Ok(Box::new(input))
}

/// Fills `buf` unless the input ends first; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..).filter(|r| !r.is_empty()) {
        match r.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What the image has used of its [`Limits`]; shared with the [`Meter`]
/// under the tar parser, which cannot hand back our own error types.
#[derive(Debug)]
pub(super) struct Budget {
    pub(super) limits: Limits,
    bytes: AtomicU64,
    entries: AtomicU64,
    /// Bytes the parser may still read for headers; `u64::MAX`: no window.
    window: AtomicU64,
    tripped: AtomicU8,
}

const TRIPPED_NONE: u8 = 0;
const TRIPPED_BYTES: u8 = 1;
const TRIPPED_HEADERS: u8 = 2;
const NO_WINDOW: u64 = u64::MAX;

impl Budget {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            limits,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            window: AtomicU64::new(NO_WINDOW),
            tripped: AtomicU8::new(TRIPPED_NONE),
        }
    }

    /// Counts `n` decompressed bytes.
    pub(super) fn spend(&self, n: usize) -> io::Result<()> {
        let n = u64::try_from(n).map_err(|_| self.trip(TRIPPED_BYTES))?;
        let used = self
            .bytes
            .load(Ordering::Relaxed)
            .checked_add(n)
            .filter(|u| *u <= self.limits.bytes)
            .ok_or_else(|| self.trip(TRIPPED_BYTES))?;
        self.bytes.store(used, Ordering::Relaxed);
        let window = self.window.load(Ordering::Relaxed);
        if window != NO_WINDOW {
            let left = window
                .checked_sub(n)
                .ok_or_else(|| self.trip(TRIPPED_HEADERS))?;
            self.window.store(left, Ordering::Relaxed);
        }
        Ok(())
    }

    fn trip(&self, why: u8) -> io::Error {
        self.tripped.store(why, Ordering::Relaxed);
        io::Error::other("a limit of the image was reached")
    }

    /// The parser is about to read the next entry's headers.
    pub(super) fn open_window(&self) {
        self.window.store(HEADER_WINDOW, Ordering::Relaxed);
    }

    pub(super) fn close_window(&self) {
        self.window.store(NO_WINDOW, Ordering::Relaxed);
    }

    /// Counts one entry, or a directory created for one.
    pub(super) fn count_entry(&self) -> Result<(), LayerError> {
        let limit = self.limits.entries;
        let n = self
            .entries
            .load(Ordering::Relaxed)
            .checked_add(1)
            .filter(|n| *n <= limit)
            .ok_or(LayerError::TooManyEntries(limit))?;
        self.entries.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// A limit the meter hit, in place of the error that carried it up.
    pub(super) fn explain(&self, e: LayerError) -> LayerError {
        match self.tripped.load(Ordering::Relaxed) {
            TRIPPED_BYTES => LayerError::TooManyBytes(self.limits.bytes),
            TRIPPED_HEADERS => LayerError::HeadersTooLong(HEADER_WINDOW),
            _ => e,
        }
    }
}

/// Counts the decompressed bytes as the tar parser reads them.
pub(super) struct Meter<R> {
    pub(super) inner: R,
    pub(super) budget: Arc<Budget>,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.spend(n)?;
        Ok(n)
    }
}
