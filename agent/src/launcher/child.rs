//! The launcher process itself (`airlock-agent launch`): reads one
//! [`Request`] from fd 0, performs it with libcontainer, replies, exits.
//!
//! It stays single-threaded: no tokio, no logging threads (libcontainer's
//! `tracing` events go nowhere, its errors come back in the reply).

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;

use super::exec_check::{self, Checked, ExecFailure};
use super::{wire, Reply, Request, YOUKI_ROOT};

const SOCK: RawFd = 0;

pub fn main() -> ExitCode {
    // Rust's runtime ignores SIGPIPE, and an ignored signal stays ignored
    // across exec: the container's processes would inherit it (`yes | head`
    // would never end). Give them the default, as any shell would.
    // SAFETY: resetting a disposition to SIG_DFL installs no handler; this
    // process is single-threaded.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let (req, fds) = match wire::recv::<Request>(SOCK, wire::FDS_MAX) {
        Ok((Some(req), fds)) => (req, fds),
        Ok((None, _)) => return ExitCode::from(2),
        Err(e) => {
            eprintln!("airlock-agent launch: {e}");
            return ExitCode::from(2);
        }
    };
    let reply = match perform(req, fds) {
        Ok(reply) => reply,
        Err(Failure(message, exec)) => Reply::Failed { message, exec },
    };
    match wire::send(SOCK, &reply, &[]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-agent launch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A failed operation: libcontainer's error chain, and why the program
/// could not be run if that was the cause.
struct Failure(String, Option<ExecFailure>);

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self(message, None)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Self(message.into(), None)
    }
}

fn perform(req: Request, fds: Vec<OwnedFd>) -> Result<Reply, Failure> {
    // The container's init process reports on it why its program cannot
    // be run (see exec_check); read once the build is over.
    let (report_read, report_write) = exec_check::pipe().map_err(|e| airlock_report::chain(&e))?;
    let checked = Checked::new(report_write.as_fd());
    let failed = |e: &dyn std::error::Error| {
        Failure(airlock_report::chain(e), exec_check::reported(&report_read))
    };
    match req {
        Request::Create {
            id,
            bundle,
            console_socket,
        } => {
            let builder = with_stdio(base(&id, console_socket)?, fds)?.with_executor(checked);
            let container = builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| failed(&e))?;
            let pid = container.pid().ok_or("the container has no init process")?;
            Ok(Reply::Pid(pid.as_raw()))
        }
        Request::Start { id } => {
            load(&id)?.start().map_err(|e| airlock_report::chain(&e))?;
            Ok(Reply::Done)
        }
        Request::Exec {
            id,
            process,
            console_socket,
        } => {
            let builder = with_stdio(base(&id, console_socket)?, fds)?.with_executor(checked);
            let pid = builder
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| failed(&e))?;
            Ok(Reply::Pid(pid.as_raw()))
        }
        Request::Delete { id } => {
            load(&id)?
                .delete(true)
                .map_err(|e| airlock_report::chain(&e))?;
            Ok(Reply::Done)
        }
    }
}

fn base(id: &str, console_socket: Option<PathBuf>) -> Result<ContainerBuilder, String> {
    ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_root_path(YOUKI_ROOT)
        .map_err(|e| airlock_report::chain(&e))
        .map(|b| b.with_console_socket(console_socket))
}

fn with_stdio(builder: ContainerBuilder, fds: Vec<OwnedFd>) -> Result<ContainerBuilder, String> {
    match <[OwnedFd; 3]>::try_from(fds) {
        Ok([stdin, stdout, stderr]) => Ok(builder
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr)),
        Err(fds) if fds.is_empty() => Ok(builder),
        Err(fds) => Err(format!("expected 0 or 3 stdio fds, got {}", fds.len())),
    }
}

fn load(id: &str) -> Result<Container, String> {
    Container::load(PathBuf::from(YOUKI_ROOT).join(id)).map_err(|e| airlock_report::chain(&e))
}
