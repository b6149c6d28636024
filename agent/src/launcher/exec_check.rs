//! Why a container's program cannot be run, from the errno, for the
//! runtime's exit statuses 126 and 127.
//!
//! libcontainer checks the program in the container's init process (after
//! `pivot_root`) and sends back only a message. [`Checked`] wraps its
//! executor: when that check fails, it looks the program up itself, the way
//! `execvp` does, and writes an [`ExecFailure`] to a pipe the launcher
//! reads (the init process is a fork of the launcher, so it has the pipe).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::AccessFlags;
use serde::{Deserialize, Serialize};

/// What kept the program from running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecKind {
    /// ENOENT: no such file, as a path or in `$PATH`.
    NotFound,
    /// EACCES: found, but not an executable file.
    PermissionDenied,
    /// Found and executable, yet refused.
    Other,
}

/// A program that could not be run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFailure {
    pub kind: ExecKind,
    /// `args[0]` of the process spec.
    pub executable: String,
}

/// libcontainer's executor, reporting a failed check on `report`.
#[derive(Clone)]
pub struct Checked {
    report: RawFd,
}

impl Checked {
    /// Reports on `report`, which must stay open while the container is
    /// built.
    pub fn new(report: BorrowedFd<'_>) -> Self {
        Self {
            report: std::os::fd::AsRawFd::as_raw_fd(&report),
        }
    }
}

impl Executor for Checked {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let res = DefaultExecutor {}.validate(spec);
        if res.is_err() {
            if let Some(failure) = classify(spec) {
                if let Ok(bytes) = serde_json::to_vec(&failure) {
                    // SAFETY: `report` is the pipe's write end, open while the
                    // container is built (`new`); this fork of the launcher has it.
                    let fd = unsafe { BorrowedFd::borrow_raw(self.report) };
                    // Best effort: without it the failure is a plain one.
                    nix::unistd::write(fd, &bytes).ok();
                }
            }
        }
        res
    }
}

/// The report pipe (read end, write end), non-blocking and close-on-exec.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
}

/// What was reported on the pipe's read end, once the build is over.
pub fn reported(read: &OwnedFd) -> Option<ExecFailure> {
    let mut buf = [0u8; 4096];
    let n = nix::unistd::read(read.as_fd(), &mut buf).ok()?;
    serde_json::from_slice(buf.get(..n)?).ok()
}

/// Looks the spec's program up as `execvp` would.
fn classify(spec: &Spec) -> Option<ExecFailure> {
    let process = spec.process().as_ref()?;
    let executable = process.args().as_ref()?.first()?.clone();
    let path = process
        .env()
        .iter()
        .flatten()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("");
    Some(ExecFailure {
        kind: lookup(&executable, path),
        executable,
    })
}

/// The kind of failure to run `name`: `name` itself when it has a `/`,
/// else each directory of `path` in turn; EACCES anywhere wins over
/// ENOENT, as in `execvp`.
pub fn lookup(name: &str, path: &str) -> ExecKind {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(name))
            .collect()
    };
    let mut kind = ExecKind::NotFound;
    for candidate in candidates {
        match errno_of(&candidate) {
            None => return ExecKind::Other,
            Some(Errno::EACCES) => kind = ExecKind::PermissionDenied,
            Some(_) => {}
        }
    }
    kind
}

/// The errno `execve(path)` would fail with on account of the file, if any.
fn errno_of(path: &Path) -> Option<Errno> {
    if let Err(e) = nix::unistd::access(path, AccessFlags::X_OK) {
        return Some(e);
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        // A directory (or device) passes access(X_OK); execve refuses it.
        Ok(_) => Some(Errno::EACCES),
        Err(e) => Some(e.raw_os_error().map_or(Errno::ENOENT, Errno::from_raw)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn kinds_come_from_the_errno() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        file(d, "prog", 0o755);
        file(d, "data", 0o644);
        std::fs::create_dir(d.join("sub")).unwrap();
        let path = d.to_str().unwrap();
        let abs = |n: &str| d.join(n).to_str().unwrap().to_string();

        assert_eq!(lookup("nosuch", path), ExecKind::NotFound);
        assert_eq!(lookup(&abs("nosuch"), ""), ExecKind::NotFound);
        assert_eq!(lookup("nosuch", ""), ExecKind::NotFound);
        // Even root gets EACCES for a file without any x bit.
        assert_eq!(lookup("data", path), ExecKind::PermissionDenied);
        assert_eq!(lookup(&abs("data"), ""), ExecKind::PermissionDenied);
        assert_eq!(lookup(&abs("sub"), ""), ExecKind::PermissionDenied);
        assert_eq!(lookup("prog", path), ExecKind::Other);
    }

    #[test]
    fn eacces_in_one_path_entry_wins_over_enoent_in_another() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        file(b.path(), "data", 0o600);
        let path = format!("{}:{}", a.path().display(), b.path().display());
        assert_eq!(lookup("data", &path), ExecKind::PermissionDenied);
    }

    #[test]
    fn a_report_crosses_the_pipe_once() {
        let (read, write) = pipe().unwrap();
        assert_eq!(reported(&read), None, "empty pipe");
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["/no/such/prog"],"user":{"uid":0,"gid":0},
                "env":["PATH=/usr/bin"]}}"#,
        )
        .unwrap();
        let res = Checked::new(write.as_fd()).validate(&spec);
        assert!(res.is_err());
        assert_eq!(
            reported(&read),
            Some(ExecFailure {
                kind: ExecKind::NotFound,
                executable: "/no/such/prog".into(),
            })
        );
    }
}
