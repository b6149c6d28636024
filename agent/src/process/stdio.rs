//! A process's stdio as the agent holds it: pipe ends or a pseudo-terminal
//! master, read and written through tokio's reactor (epoll), so a blocked
//! `ReadStdout` sleeps in the kernel instead of polling.
//!
//! Written here rather than with `tokio::net::unix::pipe` because the same
//! code must also drive a pty master, which is a character device.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest read handed out at once; stays well below ttrpc's 4 MiB frame.
pub const READ_MAX: usize = 1 << 20;

/// A non-blocking fd registered with the reactor.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Makes `fd` non-blocking and registers it for reading and writing.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        let interest = Interest::READABLE | Interest::WRITABLE;
        // SAFETY: `fd` is an OwnedFd that moves into the AsyncFd, so it stays
        // open and refers to the same file until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, interest) };
        let fd = fd.map_err(std::io::Error::from)?;
        Ok(Self { fd })
    }

    /// Reads up to `max` bytes (at most [`READ_MAX`]), waiting until at
    /// least one is there. An empty result means end of file. A pty master
    /// reports EIO once the terminal's last user closed it: that is its end
    /// of file too.
    pub async fn read(&self, max: usize) -> std::io::Result<Vec<u8>> {
        // Not zeroed: a reply usually carries far less than `max`, and
        // clearing a whole megabyte per reply cost more guest CPU than
        // the bytes it carried (measured: a 1 GiB stream under emulation).
        let mut buf = Vec::with_capacity(max.clamp(1, READ_MAX));
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| read_into_spare(fd.get_ref(), &mut buf).map_err(Into::into)) {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {
                    // Take whatever else is already there, without waiting:
                    // fewer, larger replies for a fast writer. An end of
                    // file found here shows up on the next read.
                    self.fill_more(&mut buf)?;
                    break;
                }
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EIO as i32) => break,
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(buf)
    }

    /// Non-blocking reads into `buf`'s spare capacity until it is full or
    /// nothing is left.
    fn fill_more(&self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        while buf.len() < buf.capacity() {
            match read_into_spare(self.fd.get_ref(), buf) {
                Ok(0) | Err(Errno::EAGAIN | Errno::EIO) => break,
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes some of `data`, waiting until the fd takes at least one byte.
    pub async fn write(&self, data: &[u8]) -> std::io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(Into::into)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<usize> {
        let len = data.len();
        while !data.is_empty() {
            let n = self.write(data).await?;
            data = &data[n..];
        }
        Ok(len)
    }
}

impl AsFd for FdStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsRawFd for FdStream {
    fn as_raw_fd(&self) -> i32 {
        self.fd.get_ref().as_raw_fd()
    }
}

/// One read(2) into `buf`'s spare capacity, which it then takes in.
fn read_into_spare(fd: &OwnedFd, buf: &mut Vec<u8>) -> Result<usize, Errno> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: read(2) writes at most `spare.len()` bytes at `spare`, the
    // vector's allocated, unaliased spare capacity (the &mut borrow).
    let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    let n = usize::try_from(Errno::result(n)?).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the kernel initialised the first `n` (<= spare.len()) bytes
    // of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Capacity asked for output pipes: a fast writer fills 1 MiB before it
/// waits for the host to read.
const PIPE_SIZE: i32 = 1 << 20;

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Best effort: the kernel may cap it (pipe-max-size).
    fcntl(&r, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).ok();
    Ok((r, w))
}

/// Sets a terminal's window size (TIOCSWINSZ).
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, columns: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call; the
    // fd is borrowed, so it stays open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_round_trip_and_eof() {
        let (r, w) = pipe().unwrap();
        let (r, w) = (FdStream::new(r).unwrap(), FdStream::new(w).unwrap());
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                // Dropping the write end gives the reader its end of file.
            })
        };
        let mut got = Vec::new();
        loop {
            let chunk = r.read(4096).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 4096);
            got.extend(chunk);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn window_size_on_a_pty() {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_window_size(pty.master.as_fd(), 33, 101).unwrap();
        let ws = nix::pty::Winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let mut ws = ws;
        // SAFETY: TIOCGWINSZ writes one winsize into ws, which outlives the
        // call; the fd is open.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
    }
}
