//! The raw image behind a drive: opening and checking it, and positioned
//! I/O between it and guest memory through a bounded bounce buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::{BlockError, SECTOR_SIZE};

/// The bounce buffer: the most bytes copied per system call.
pub const BOUNCE_SIZE: usize = 64 * 1024;

/// Errors from I/O between the image and guest memory.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image I/O failed")]
    Io(#[source] io::Error),
    #[error("cannot access guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("disk or guest address overflow")]
    Overflow,
}

/// An open image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    size: u64,
    read_only: bool,
    bounce: Vec<u8>,
}

impl DiskFile {
    /// Opens the image at `path` (a regular file or a block device whose
    /// size is a multiple of [`SECTOR_SIZE`]).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                BlockError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                BlockError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        // Check the type before opening: opening a FIFO would block.
        check_type(path, &std::fs::metadata(path).map_err(open_err)?)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        // And again on what was opened, in case the path changed meanwhile.
        let meta = file.metadata().map_err(open_err)?;
        check_type(path, &meta)?;
        let size = if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(DiskFile {
            file,
            size,
            read_only,
            bounce: vec![0; BOUNCE_SIZE],
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Copies `len` bytes at `offset` in the image to guest memory at
    /// `addr`. The caller has checked the range against [`Self::size`].
    pub fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), DiskError> {
        self.chunks(offset, addr, len, |file, buf, off, at| {
            file.read_exact_at(buf, off).map_err(DiskError::Io)?;
            mem.write_slice(buf, at).map_err(DiskError::GuestMemory)
        })
    }

    /// Copies `len` bytes of guest memory at `addr` to `offset` in the image.
    pub fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), DiskError> {
        self.chunks(offset, addr, len, |file, buf, off, at| {
            mem.read_slice(buf, at).map_err(DiskError::GuestMemory)?;
            file.write_all_at(buf, off).map_err(DiskError::Io)
        })
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(DiskError::Io)
    }

    /// Runs `f` over bounce-buffer-sized pieces of the transfer.
    fn chunks(
        &mut self,
        offset: u64,
        addr: GuestAddress,
        len: usize,
        mut f: impl FnMut(&File, &mut [u8], u64, GuestAddress) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(BOUNCE_SIZE);
            let buf = self.bounce.get_mut(..n).ok_or(DiskError::Overflow)?;
            let off = offset.checked_add(done as u64).ok_or(DiskError::Overflow)?;
            let at = addr
                .0
                .checked_add(done as u64)
                .map(GuestAddress)
                .ok_or(DiskError::Overflow)?;
            f(&self.file, buf, off, at)?;
            done += n;
        }
        Ok(())
    }
}

fn check_type(path: &Path, meta: &std::fs::Metadata) -> Result<(), BlockError> {
    let kind = meta.file_type();
    if kind.is_file() || kind.is_block_device() {
        Ok(())
    } else {
        Err(BlockError::NotAFile {
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("airlock-blk-{}-{name}", std::process::id()))
    }

    #[test]
    fn open_checks_the_image() {
        let missing = temp_path("missing");
        let err = DiskFile::open(&missing, true).unwrap_err();
        assert!(matches!(err, BlockError::NotFound { .. }));
        assert!(err.to_string().contains(missing.to_str().unwrap()));

        let err = DiskFile::open(&std::env::temp_dir(), true).unwrap_err();
        assert!(matches!(err, BlockError::NotAFile { .. }), "{err}");

        let odd = temp_path("odd");
        std::fs::write(&odd, [0u8; 513]).unwrap();
        let err = DiskFile::open(&odd, false).unwrap_err();
        std::fs::remove_file(&odd).unwrap();
        assert!(matches!(err, BlockError::Size { size: 513, .. }), "{err}");

        let good = temp_path("good");
        std::fs::write(&good, [0u8; 1024]).unwrap();
        let disk = DiskFile::open(&good, true).unwrap();
        std::fs::remove_file(&good).unwrap();
        assert_eq!(disk.size(), 1024);
        assert!(disk.read_only());
    }

    #[test]
    fn copies_span_several_bounce_buffers() {
        let path = temp_path("bounce");
        let data: Vec<u8> = (0..3 * BOUNCE_SIZE + 512)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let mut disk = DiskFile::open(&path, false).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        disk.read_to_guest(&mem, 0, GuestAddress(0x1000), data.len())
            .unwrap();
        let mut back = vec![0; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, data);
        // Outside guest memory: an error, not a panic.
        let err = disk.read_to_guest(&mem, 0, GuestAddress(0x3f_ff00), 0x1000);
        assert!(matches!(err, Err(DiskError::GuestMemory(_))));
        disk.write_from_guest(&mem, 512, GuestAddress(0x1000), 512)
            .unwrap();
        disk.flush().unwrap();
    }
}
