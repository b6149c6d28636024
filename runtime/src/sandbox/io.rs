//! Attaching the caller's stdio to a process in the sandbox: stdout and
//! stderr stream back through blocking `ReadStdout`/`ReadStderr` calls (the
//! agent answers when there is data: no polling), stdin goes out with
//! `WriteStdin`, a terminal gets raw mode and window-size updates.

use std::os::fd::AsRawFd;
use std::time::Duration;

use airlock_protocol::agent;
use airlock_protocol::agent_ttrpc::AgentServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{agent_err, ctx, no_timeout, SandboxError, CONTAINER_ID};

/// Bytes asked for per read; the agent caps it at 1 MiB.
const READ_CHUNK: u32 = 1 << 20;
/// Bytes sent per stdin write.
const WRITE_CHUNK: usize = 64 << 10;
/// How long output may keep flowing after the process exited (a child it
/// left behind may still hold the pipe open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Streams `exec_id`'s stdio until it exits and its output ends; returns
/// how it ended.
pub async fn attach(
    client: &AgentServiceClient,
    exec_id: &str,
    how: Attach,
) -> Result<ProcessExit, SandboxError> {
    let _raw = if how.tty && how.interactive {
        RawMode::enable()
    } else {
        None
    };
    let stdout = tokio::spawn(pump_out(client.clone(), exec_id.to_string(), false));
    let stderr =
        (!how.tty).then(|| tokio::spawn(pump_out(client.clone(), exec_id.to_string(), true)));
    let stdin = if how.interactive {
        Some(tokio::spawn(pump_in(client.clone(), exec_id.to_string())))
    } else {
        close_stdin(client, CONTAINER_ID, exec_id).await?;
        None
    };
    let winch = how
        .tty
        .then(|| tokio::spawn(forward_window_size(client.clone(), exec_id.to_string())));

    let waited = wait(client, CONTAINER_ID, exec_id).await;
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
            Ok(Err(e)) => return Err(SandboxError::Io(format!("output task failed: {e}"))),
            Err(_) => tracing::warn!(
                "output still open {DRAIN_TIMEOUT:?} after the process exited; detaching"
            ),
        }
    }
    Ok(exit)
}

/// One of a process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Copies `which` of process `exec_id` in `container_id` to `out` until
/// it ends. A reader of `out` that went away (`EPIPE`) ends the copy
/// quietly.
pub async fn copy_output(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
    which: Output,
    out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<(), SandboxError> {
    let req = agent::ReadStreamRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        len: READ_CHUNK,
        ..Default::default()
    };
    loop {
        let resp = match which {
            Output::Stderr => client
                .read_stderr(no_timeout(), &req)
                .await
                .map_err(agent_err("ReadStderr"))?,
            Output::Stdout => client
                .read_stdout(no_timeout(), &req)
                .await
                .map_err(agent_err("ReadStdout"))?,
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
                return Err(SandboxError::Io(format!("writing output: {e}")));
            }
        }
        if resp.eof {
            return Ok(());
        }
    }
}

/// Copies `input` to the stdin of process `exec_id` in `container_id`,
/// and closes that stdin at end of file.
pub async fn copy_input(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
    input: &mut (dyn tokio::io::AsyncRead + Unpin + Send),
) -> Result<(), SandboxError> {
    let mut buf = vec![0u8; WRITE_CHUNK];
    loop {
        let n = input
            .read(&mut buf)
            .await
            .map_err(|e| SandboxError::Io(format!("reading stdin: {e}")))?;
        if n == 0 {
            return close_stdin(client, container_id, exec_id).await;
        }
        let req = agent::WriteStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data: buf[..n].to_vec(),
            ..Default::default()
        };
        client
            .write_stdin(no_timeout(), &req)
            .await
            .map_err(agent_err("WriteStdin"))?;
    }
}

/// Closes the stdin of process `exec_id` in `container_id`.
pub async fn close_stdin(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
) -> Result<(), SandboxError> {
    let req = agent::CloseStdinRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    client
        .close_stdin(ctx(), &req)
        .await
        .map_err(agent_err("CloseStdin"))?;
    Ok(())
}

/// Waits until process `exec_id` in `container_id` exits.
pub async fn wait(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
) -> Result<ProcessExit, SandboxError> {
    let req = agent::WaitProcessRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    // No deadline (the process may run for days), but not past the agent.
    let what = format!("process {exec_id:?} of container {container_id} to exit");
    let waited = async {
        client
            .wait_process(no_timeout(), &req)
            .await
            .map_err(agent_err("WaitProcess"))
    };
    let resp = super::liveness::while_agent_answers(client, &what, waited).await?;
    Ok(ProcessExit {
        status: resp.exit_status,
        signal: resp.signal,
        oom_killed: resp.oom_killed,
    })
}

/// Sets the terminal size of process `exec_id` in `container_id`.
pub async fn resize(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
    rows: u32,
    columns: u32,
) -> Result<(), SandboxError> {
    let req = agent::TtyWinResizeRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        rows,
        columns,
        ..Default::default()
    };
    client
        .tty_win_resize(ctx(), &req)
        .await
        .map_err(agent_err("TtyWinResize"))?;
    Ok(())
}

async fn pump_out(
    client: AgentServiceClient,
    exec_id: String,
    stderr: bool,
) -> Result<(), SandboxError> {
    let (which, mut out): (_, Box<dyn tokio::io::AsyncWrite + Unpin + Send>) = if stderr {
        (Output::Stderr, Box::new(tokio::io::stderr()))
    } else {
        (Output::Stdout, Box::new(tokio::io::stdout()))
    };
    copy_output(&client, CONTAINER_ID, &exec_id, which, &mut out).await
}

async fn pump_in(client: AgentServiceClient, exec_id: String) -> Result<(), SandboxError> {
    copy_input(&client, CONTAINER_ID, &exec_id, &mut tokio::io::stdin()).await
}

/// Sends our terminal's size now and on every SIGWINCH.
async fn forward_window_size(client: AgentServiceClient, exec_id: String) {
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    loop {
        if let Some((rows, columns)) = window_size() {
            resize(&client, CONTAINER_ID, &exec_id, rows.into(), columns.into())
                .await
                .ok();
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
