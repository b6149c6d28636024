//! A process's stdio: containerd's FIFOs (paths in Create/Exec) joined to
//! the agent's streams. Output is pulled with blocking `ReadStdout` calls
//! (no polling); stdin is pushed until the FIFO's writer closes it.

use std::time::Duration;

use airlock_runtime::sandbox::io::{Output, DRAIN_TIMEOUT};
use airlock_runtime::sandbox::{Process, SandboxError};
use tokio::task::JoinHandle;

/// How long CloseIO waits for what is left in the stdin FIFO to go in.
pub const STDIN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a stdio FIFO may wait for containerd's end of it.
const FIFO_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors joining a process's stdio to containerd's FIFOs.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("cannot open the stdio FIFO {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the stdio FIFO {path}: its other end was not opened within {limit:?}")]
    OpenTimeout { path: String, limit: Duration },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// The FIFO paths containerd gave; empty means not wanted.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The copy tasks of one process.
pub struct Pumps {
    outputs: Vec<JoinHandle<Result<(), StdioError>>>,
    stdin: Option<JoinHandle<Result<(), StdioError>>>,
}

/// Starts copying between `stdio` and `process`.
pub async fn connect(process: &Process, stdio: &Stdio) -> Result<Pumps, StdioError> {
    let mut outputs = Vec::new();
    let mut streams = vec![(Output::Stdout, stdio.stdout.as_str())];
    if !stdio.terminal {
        streams.push((Output::Stderr, stdio.stderr.as_str()));
    }
    for (which, path) in streams {
        // No FIFO: drain anyway, or a full pipe would stall the process.
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if path.is_empty() {
            Box::new(tokio::io::sink())
        } else {
            Box::new(open_fifo(path, true).await?)
        };
        let p = process.clone();
        outputs.push(tokio::spawn(async move {
            Ok(p.copy_output(which, &mut out).await?)
        }));
    }
    let stdin = if stdio.stdin.is_empty() {
        process.close_stdin().await?;
        None
    } else {
        let p = process.clone();
        let path = stdio.stdin.clone();
        Some(tokio::spawn(async move {
            let mut input = open_fifo(&path, false).await?;
            Ok(p.copy_input(&mut input).await?)
        }))
    };
    Ok(Pumps { outputs, stdin })
}

impl Pumps {
    /// Stops forwarding stdin.
    pub fn stop_stdin(&mut self) {
        if let Some(t) = self.stdin.take() {
            t.abort();
        }
    }

    /// The stdin copy, for `CloseIO` to finish.
    pub fn take_stdin(&mut self) -> Option<JoinHandle<Result<(), StdioError>>> {
        self.stdin.take()
    }

    /// Waits (bounded) for the output to end after the process exited.
    pub async fn drain(mut self) {
        self.stop_stdin();
        for t in self.outputs {
            match tokio::time::timeout(DRAIN_TIMEOUT, t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("output copy failed: {e}"),
                Ok(Err(e)) => tracing::warn!("output task failed: {e}"),
                Err(_) => tracing::warn!(
                    "output still open {DRAIN_TIMEOUT:?} after the process exited; detaching"
                ),
            }
        }
    }
}

/// Opens a FIFO containerd made (containerd already holds its other end).
async fn open_fifo(path: &str, write: bool) -> Result<tokio::fs::File, StdioError> {
    open_fifo_within(path, write, FIFO_OPEN_TIMEOUT).await
}

/// [`open_fifo`], failing after `limit`: opening a FIFO blocks until its
/// other end is open, and a containerd that never opens it must not hold
/// the task call forever. (The blocked open goes on in its thread until
/// the other end opens; the shim does not wait for that thread at exit.)
async fn open_fifo_within(
    path: &str,
    write: bool,
    limit: Duration,
) -> Result<tokio::fs::File, StdioError> {
    let mut o = tokio::fs::OpenOptions::new();
    if write {
        o.write(true);
    } else {
        o.read(true);
    }
    match tokio::time::timeout(limit, o.open(path)).await {
        Ok(opened) => opened.map_err(|source| StdioError::Open {
            path: path.into(),
            source,
        }),
        Err(_) => Err(StdioError::OpenTimeout {
            path: path.into(),
            limit,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    /// Opens a FIFO's read end when dropped, even by a failed assertion:
    /// an open for writing still blocked in a thread then finishes (the
    /// test's runtime waits for that thread as it shuts down).
    struct ReaderOnDrop(std::path::PathBuf);

    impl Drop for ReaderOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
        }
    }

    #[tokio::test]
    async fn a_fifo_whose_reader_never_comes_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let release = ReaderOnDrop(fifo.clone());
        let path = fifo.to_str().unwrap();
        let waited = open_fifo_within(path, true, Duration::from_millis(200));
        let err = tokio::time::timeout(Duration::from_secs(10), waited)
            .await
            .expect("still opening after 10 s")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the stdio FIFO {path}: its other end was not opened within 200ms")
        );
        drop(release);
        // With a reader there, the open succeeds.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        open_fifo_within(path, true, Duration::from_secs(10))
            .await
            .unwrap();
    }
}
