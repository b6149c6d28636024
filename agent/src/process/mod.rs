//! A process the agent started in a container: its pid, its stdio and how
//! it ended.

pub mod exits;
pub mod stdio;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use exits::Exit;
use stdio::FdStream;

/// How a process ended, as `WaitProcess` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit status itself.
    pub exit: Exit,
    /// Its container's memory cgroup ran the OOM killer while it ran, and a
    /// SIGKILL ended it.
    pub oom_killed: bool,
}

/// The agent's ends of a process's stdio.
pub enum Stdio {
    /// Separate pipes.
    Pipes {
        /// Write end of the process's stdin; `None` once closed.
        stdin: Mutex<Option<FdStream>>,
        /// Read ends of stdout and stderr.
        stdout: Mutex<FdStream>,
        stderr: Mutex<FdStream>,
    },
    /// A pseudo-terminal: stdout and stderr are both the master.
    Tty {
        /// The master, read for output and written for input.
        master: Arc<FdStream>,
        /// Serialises reads of the master.
        read_lock: Mutex<()>,
        /// Set once stdin was "closed": the agent sends the terminal's EOF
        /// character (^D) and refuses further writes.
        closed: std::sync::atomic::AtomicBool,
    },
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Errors using a process's stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("stdin of this process is closed")]
    StdinClosed,
    #[error("this process has a terminal: its stderr is merged into stdout")]
    NoStderrWithTty,
    #[error("this process has no terminal to resize")]
    NoTty,
    #[error("stdio I/O failed")]
    Io(#[from] std::io::Error),
}

/// A started process.
pub struct Process {
    /// Its pid in the guest's (PID 1's) namespace.
    pub pid: i32,
    /// Its stdio.
    pub stdio: Stdio,
    /// `None` while it runs.
    exit: watch::Receiver<Option<ExitInfo>>,
}

impl Process {
    /// A process whose exit arrives on `exit` (see [`Process::exit_channel`]).
    pub fn new(pid: i32, stdio: Stdio, exit: watch::Receiver<Option<ExitInfo>>) -> Self {
        Self { pid, stdio, exit }
    }

    /// A channel for a process's exit.
    pub fn exit_channel() -> (
        watch::Sender<Option<ExitInfo>>,
        watch::Receiver<Option<ExitInfo>>,
    ) {
        watch::channel(None)
    }

    /// Waits until the process has exited.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender is gone without a status: the agent lost track
                // of the process. Report it as killed rather than hang.
                return ExitInfo {
                    exit: Exit::Signal(libc::SIGKILL),
                    oom_killed: false,
                };
            }
        }
    }

    /// Whether it has exited.
    pub fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Reads from stdout or stderr; empty means end of file.
    pub async fn read(&self, stream: Stream, max: usize) -> Result<Vec<u8>, StdioError> {
        match (&self.stdio, stream) {
            (Stdio::Pipes { stdout, .. }, Stream::Stdout) => {
                Ok(stdout.lock().await.read(max).await?)
            }
            (Stdio::Pipes { stderr, .. }, Stream::Stderr) => {
                Ok(stderr.lock().await.read(max).await?)
            }
            (
                Stdio::Tty {
                    master, read_lock, ..
                },
                Stream::Stdout,
            ) => {
                let _guard = read_lock.lock().await;
                Ok(master.read(max).await?)
            }
            (Stdio::Tty { .. }, Stream::Stderr) => Err(StdioError::NoStderrWithTty),
        }
    }

    /// Writes all of `data` to stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize, StdioError> {
        match &self.stdio {
            Stdio::Pipes { stdin, .. } => match stdin.lock().await.as_ref() {
                Some(w) => Ok(w.write_all(data).await?),
                None => Err(StdioError::StdinClosed),
            },
            Stdio::Tty { master, closed, .. } => {
                if closed.load(std::sync::atomic::Ordering::Acquire) {
                    return Err(StdioError::StdinClosed);
                }
                Ok(master.write_all(data).await?)
            }
        }
    }

    /// Closes stdin: the process reads end of file.
    pub async fn close_stdin(&self) -> Result<(), StdioError> {
        match &self.stdio {
            Stdio::Pipes { stdin, .. } => {
                stdin.lock().await.take();
                Ok(())
            }
            Stdio::Tty { master, closed, .. } => {
                if !closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    // A terminal has no half-close: ^D at the start of a line
                    // is its end of file (in canonical mode).
                    master.write_all(&[0x04]).await?;
                }
                Ok(())
            }
        }
    }

    /// Resizes the terminal.
    pub fn resize(&self, rows: u16, columns: u16) -> Result<(), StdioError> {
        match &self.stdio {
            Stdio::Tty { master, .. } => Ok(stdio::set_window_size(master.as_fd(), rows, columns)?),
            Stdio::Pipes { .. } => Err(StdioError::NoTty),
        }
    }
}

/// The process's ends of its stdio, handed to the launcher.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Makes the pipes for a process without a terminal.
pub fn pipes() -> std::io::Result<(Stdio, ChildStdio)> {
    let (in_r, in_w) = stdio::pipe()?;
    let (out_r, out_w) = stdio::pipe()?;
    let (err_r, err_w) = stdio::pipe()?;
    let ours = Stdio::Pipes {
        stdin: Mutex::new(Some(FdStream::new(in_w)?)),
        stdout: Mutex::new(FdStream::new(out_r)?),
        stderr: Mutex::new(FdStream::new(err_r)?),
    };
    let theirs = ChildStdio {
        stdin: in_r,
        stdout: out_w,
        stderr: err_w,
    };
    Ok((ours, theirs))
}

/// Wraps a terminal master received from the container.
pub fn tty(master: OwnedFd) -> std::io::Result<Stdio> {
    Ok(Stdio::Tty {
        master: Arc::new(FdStream::new(master)?),
        read_lock: Mutex::new(()),
        closed: std::sync::atomic::AtomicBool::new(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_whose_peer_is_gone_ends_or_fails_without_hanging() {
        let (ours, theirs) = pipes().unwrap();
        let (_exit_tx, exit_rx) = Process::exit_channel();
        let p = Process::new(1, ours, exit_rx);
        // The process's ends close (it exited, or the launcher failed).
        drop(theirs);
        assert!(p.read(Stream::Stdout, 16).await.unwrap().is_empty());
        assert!(p.read(Stream::Stderr, 16).await.unwrap().is_empty());
        let err = p.write_stdin(b"x").await.unwrap_err();
        match err {
            StdioError::Io(e) => assert_eq!(e.raw_os_error(), Some(libc::EPIPE)),
            other => panic!("{other}"),
        }
        p.close_stdin().await.unwrap();
        assert!(matches!(
            p.write_stdin(b"x").await,
            Err(StdioError::StdinClosed)
        ));
        assert!(matches!(p.resize(1, 1), Err(StdioError::NoTty)));
    }

    #[tokio::test]
    async fn wait_after_kill_returns_the_signal_every_time() {
        let (ours, _theirs) = pipes().unwrap();
        let (exit_tx, exit_rx) = Process::exit_channel();
        let p = Process::new(1, ours, exit_rx);
        assert!(!p.exited());
        let killed = ExitInfo {
            exit: Exit::Signal(libc::SIGKILL),
            oom_killed: false,
        };
        exit_tx.send(Some(killed)).unwrap();
        assert!(p.exited());
        assert_eq!(p.wait().await, killed);
        assert_eq!(p.wait().await, killed);
        assert_eq!(p.wait().await.exit.status(), 128 + libc::SIGKILL);
    }

    #[tokio::test]
    async fn a_process_the_agent_lost_track_of_waits_as_killed() {
        let (ours, _theirs) = pipes().unwrap();
        let (exit_tx, exit_rx) = Process::exit_channel();
        let p = Process::new(1, ours, exit_rx);
        drop(exit_tx);
        let info = tokio::time::timeout(std::time::Duration::from_secs(5), p.wait())
            .await
            .expect("no hang");
        assert_eq!(info.exit, Exit::Signal(libc::SIGKILL));
    }
}
