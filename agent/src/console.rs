//! The console: PID 1's stdin, stdout and stderr.
//!
//! Output never panics or fails: a console that cannot be written to must
//! not bring down init (that would panic the guest kernel).

use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::{major, minor, Mode};

const CONSOLE: &str = "/dev/console";

/// Errors connecting stdio to the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("Cannot open /dev/console")]
    Open(#[source] nix::Error),
    #[error("Cannot duplicate the console onto fd {0}")]
    Dup(i32, #[source] nix::Error),
}

/// Writes one line to stdout (progress, results).
pub fn info(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    out.write_fmt(args).ok();
    out.write_all(b"\n").ok();
}

/// Writes one line to stderr (warnings, errors).
pub fn warn(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    err.write_fmt(args).ok();
    err.write_all(b"\n").ok();
}

/// Where [`log`] writes: the kernel's log, read with `dmesg`.
const KMSG: &str = "/dev/kmsg";

/// Writes one informational line to the kernel log (`dmesg` shows it), or,
/// when the kernel log cannot be written, to stdout as [`info`] does.
///
/// For what is worth keeping but not worth the serial console: every
/// console byte costs the booting guest two VM exits (the 8250 driver
/// polls the line status, then writes the byte), and a guest that serves
/// requests has no need to wait for them. At `KERN_INFO`, below the
/// console's log level under `quiet`, the kernel keeps the line without
/// printing it.
pub fn log(args: fmt::Arguments<'_>) {
    let line = kmsg_record(args);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(KMSG)
        // One write(2) per record: /dev/kmsg takes each write as one line.
        .and_then(|mut kmsg| kmsg.write_all(line.as_bytes()));
    if written.is_err() {
        info(format_args!("{}", &line[KERN_INFO.len()..line.len() - 1]));
    }
}

/// The `KERN_INFO` level prefix of a kernel log record.
const KERN_INFO: &str = "<6>";

/// `args` as one kernel log record at `KERN_INFO`: newlines inside would
/// split it into records without a level, so they become spaces.
fn kmsg_record(args: fmt::Arguments<'_>) -> String {
    let text = args.to_string().replace('\n', " ");
    format!("{KERN_INFO}{text}\n")
}

/// Flushes buffered output, e.g. before a reboot.
pub fn flush() {
    io::stdout().flush().ok();
    io::stderr().flush().ok();
}

/// Makes fds 0, 1 and 2 refer to the console if any of them is closed or is
/// /dev/null (which Rust's runtime puts in place of a closed one).
///
/// Needs /dev (devtmpfs, or the initramfs's own /dev/console node).
pub fn ensure_stdio() -> Result<(), ConsoleError> {
    let broken: Vec<i32> = (0..=2).filter(|&fd| !usable(fd)).collect();
    if broken.is_empty() {
        return Ok(());
    }
    // No O_CLOEXEC: the console may land on one of 0..=2 itself, and those
    // must stay open across exec. (PID 1 is single-threaded here.)
    let console: OwnedFd = open(CONSOLE, OFlag::O_RDWR | OFlag::O_NOCTTY, Mode::empty())
        .map_err(ConsoleError::Open)?;
    for fd in broken {
        let res = match fd {
            0 => nix::unistd::dup2_stdin(&console),
            1 => nix::unistd::dup2_stdout(&console),
            _ => nix::unistd::dup2_stderr(&console),
        };
        res.map_err(|e| ConsoleError::Dup(fd, e))?;
    }
    // If the console landed on 0..=2 itself, keep it open: it is in use now.
    if console.as_raw_fd() <= 2 {
        let _ = console.into_raw_fd();
    }
    Ok(())
}

/// Whether `fd` is open and not /dev/null (char device 1:3).
fn usable(fd: i32) -> bool {
    // SAFETY: all zeroes is a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`, which lives here; an invalid fd
    // just makes it fail with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    !(is_char && major(st.st_rdev) == 1 && minor(st.st_rdev) == 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_log_record_is_one_info_line() {
        assert_eq!(
            kmsg_record(format_args!("airlock-agent: {} MiB", 91)),
            "<6>airlock-agent: 91 MiB\n"
        );
        assert_eq!(kmsg_record(format_args!("a\nb")), "<6>a b\n");
    }

    #[test]
    fn dev_null_is_not_usable_but_a_file_is() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(!usable(null.as_raw_fd()));
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(usable(file.as_raw_fd()));
        assert!(!usable(-1));
    }
}
