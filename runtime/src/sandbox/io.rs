//! Attaching the caller's stdio to a process in the sandbox: stdout and
//! stderr stream back through blocking `ReadStdout`/`ReadStderr` calls (the
//! agent answers when there is data: no polling), stdin goes out with
//! `WriteStdin`, a terminal gets raw mode and window-size updates.

use std::os::fd::AsRawFd;
use std::time::Duration;

use airlock_protocol::agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{call, no_timeout, Process, SandboxError};

/// Bytes asked for per read; the agent caps it at 1 MiB.
const READ_CHUNK: u32 = 1 << 20;
/// Bytes sent per stdin write.
const WRITE_CHUNK: usize = 64 << 10;
/// How long output may keep flowing after the process exited (a child it
/// left behind may still hold the pipe open).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How to attach.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attach {
    /// Forward our stdin (else the process's stdin is closed at once).
    pub interactive: bool,
    /// The process has a terminal.
    pub tty: bool,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProcessExit {
    /// Exit code, or 128 + signal.
    pub status: i32,
    /// The killing signal, 0 if it exited.
    pub signal: i32,
    /// Its memory limit was hit and the OOM killer ended it.
    pub oom_killed: bool,
}

/// One of a process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

impl Process {
    /// Streams its stdio to ours until it exits and its output ends;
    /// returns how it ended.
    pub async fn attach(&self, how: Attach) -> Result<ProcessExit, SandboxError> {
        let _raw = if how.tty && how.interactive {
            RawMode::enable()
        } else {
            None
        };
        let stdout = tokio::spawn(self.clone().pump_out(Output::Stdout));
        let stderr = (!how.tty).then(|| tokio::spawn(self.clone().pump_out(Output::Stderr)));
        let stdin = if how.interactive {
            Some(tokio::spawn(self.clone().pump_in()))
        } else {
            self.close_stdin().await?;
            None
        };
        let winch = how
            .tty
            .then(|| tokio::spawn(self.clone().forward_window_size()));

        let waited = self.wait().await;
        if let Some(t) = winch {
            t.abort();
        }
        if let Some(t) = stdin {
            t.abort();
        }
        let exit = waited?;
        for t in std::iter::once(stdout).chain(stderr) {
            match tokio::time::timeout(DRAIN_TIMEOUT, t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(e)) => return Err(SandboxError::Task(e)),
                Err(_) => tracing::warn!(
                    "output still open {DRAIN_TIMEOUT:?} after the process exited; detaching"
                ),
            }
        }
        Ok(exit)
    }

    /// Copies its output `which` to `out` until it ends. A reader of `out`
    /// that went away (`EPIPE`) ends the copy quietly.
    pub async fn copy_output(
        &self,
        which: Output,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<(), SandboxError> {
        let req = agent::ReadStreamRequest {
            container_id: self.container().into(),
            exec_id: self.exec_id().into(),
            len: READ_CHUNK,
            ..Default::default()
        };
        loop {
            let resp = match which {
                Output::Stderr => {
                    call(&self.agent, "ReadStderr", |c| {
                        c.read_stderr(no_timeout(), &req)
                    })
                    .await?
                }
                Output::Stdout => {
                    call(&self.agent, "ReadStdout", |c| {
                        c.read_stdout(no_timeout(), &req)
                    })
                    .await?
                }
            };
            tracing::trace!(
                ?which,
                bytes = resp.data.len(),
                eof = resp.eof,
                "output read"
            );
            if !resp.data.is_empty() {
                if let Err(e) = async {
                    out.write_all(&resp.data).await?;
                    out.flush().await
                }
                .await
                {
                    // Our reader went away (e.g. `| head`): stop reading.
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(SandboxError::Output(e));
                }
            }
            if resp.eof {
                return Ok(());
            }
        }
    }

    /// Copies `input` to its stdin, and closes that stdin at end of file.
    pub async fn copy_input(
        &self,
        input: &mut (dyn tokio::io::AsyncRead + Unpin + Send),
    ) -> Result<(), SandboxError> {
        let mut buf = vec![0u8; WRITE_CHUNK];
        loop {
            let n = input.read(&mut buf).await.map_err(SandboxError::Input)?;
            if n == 0 {
                return self.close_stdin().await;
            }
            let req = agent::WriteStreamRequest {
                container_id: self.container().into(),
                exec_id: self.exec_id().into(),
                data: buf[..n].to_vec(),
                ..Default::default()
            };
            call(&self.agent, "WriteStdin", |c| {
                c.write_stdin(no_timeout(), &req)
            })
            .await?;
        }
    }

    async fn pump_out(self, which: Output) -> Result<(), SandboxError> {
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match which {
            Output::Stderr => Box::new(tokio::io::stderr()),
            Output::Stdout => Box::new(tokio::io::stdout()),
        };
        self.copy_output(which, &mut out).await
    }

    async fn pump_in(self) -> Result<(), SandboxError> {
        self.copy_input(&mut tokio::io::stdin()).await
    }

    /// Sends our terminal's size now and on every SIGWINCH.
    async fn forward_window_size(self) {
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        loop {
            if let Some((rows, columns)) = window_size() {
                self.resize(rows.into(), columns.into()).await.ok();
            }
            match winch.as_mut() {
                Some(w) => {
                    if w.recv().await.is_none() {
                        return;
                    }
                }
                None => return,
            }
        }
    }
}

/// Our stdout's terminal size, if it is a terminal.
fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the
    // call; fd 1 is only read from.
    let rc = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Our terminal in raw mode while it lives (keys go to the process as
/// typed); restored on drop.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enable() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = nix::sys::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        )
        .ok();
    }
}
