//! The control socket (`airlock_vmm_api::command`): a Unix socket that the
//! VMM binds before it jails itself (mode 0600, in its launcher's own
//! directory) and serves on its main thread's event loop. Each connection
//! carries one JSON command line and gets one JSON reply line.
//!
//! Only the launcher (root) can reach the socket, but a peer that connects
//! and says nothing must not stall the loop: sockets are non-blocking, a
//! command is read as it arrives, at most [`MAX_CONNECTIONS`] are open and
//! a line longer than `MAX_COMMAND` ends its connection. The calls it makes
//! (`accept4`, `ioctl(FIONBIO)`, `read`, `write`, `close`, `epoll_ctl`) are
//! all on the main thread's seccomp filter (`recvfrom`, `sendto` and
//! `shutdown`, which std's socket calls use, are not: reads and writes go
//! through `read(2)` and `write(2)` themselves).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use airlock_vmm_api::command::{parse, MAX_COMMAND};
use airlock_vmm_api::{Command, Reply};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::exit::{ExitSignal, VmExit};

/// Most connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 4;

/// Errors binding the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot bind the control socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// Binds the control socket at `path`, replacing a socket left there by an
/// earlier VMM (never anything else).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |e| ControlError::Bind(path.to_path_buf(), e);
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// The control socket's subscriber on the VMM's event loop.
pub struct Control {
    listener: UnixListener,
    exit: ExitSignal,
    /// Open connections by descriptor, with what they sent so far.
    conns: HashMap<i32, (UnixStream, Vec<u8>)>,
}

impl Control {
    /// Serves `listener` (from [`bind`]); a stop command signals `exit`.
    pub fn new(listener: UnixListener, exit: ExitSignal) -> Self {
        Control {
            listener,
            exit,
            conns: HashMap::new(),
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            let Ok(token) = u32::try_from(fd) else {
                continue;
            };
            if ops
                .add(Events::with_data(&stream, token, EventSet::IN))
                .is_ok()
            {
                self.conns.insert(fd, (stream, Vec::new()));
            }
        }
    }

    /// Reads what connection `fd` sent; answers and closes it once a whole
    /// line (or too much, or nothing more) came.
    fn serve(&mut self, fd: i32, ops: &mut EventOps) {
        let Some((stream, buf)) = self.conns.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 512];
        let done = loop {
            match read(stream, &mut chunk) {
                Ok(0) => break Some(None),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                        break Some(Some(self::answer(&buf[..end], &self.exit)));
                    }
                    if buf.len() > MAX_COMMAND {
                        break Some(Some(Reply::Error {
                            message: format!("a command is at most {MAX_COMMAND} bytes"),
                        }));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break Some(None),
            }
        };
        let Some(reply) = done else {
            return;
        };
        if let Some((stream, _)) = self.conns.remove(&fd) {
            if let Some(reply) = reply {
                // write(2), not std's send(2), which is off the filter. A
                // reply of a few bytes fits the socket's buffer; a peer
                // that does not read it loses it.
                let _ = nix::unistd::write(stream.as_fd(), reply.to_line().as_bytes());
                // Closed with unread bytes, a Unix socket resets its peer,
                // which may then lose the reply: read what is there now
                // (a bounded amount), then close.
                let mut rest = [0u8; 512];
                for _ in 0..(2 * MAX_COMMAND / rest.len()) {
                    if !matches!(read(&stream, &mut rest), Ok(n) if n > 0) {
                        break;
                    }
                }
            }
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
        }
    }
}

/// `read(2)` on `stream`: std's socket reads are `recvfrom(2)` (and its
/// writes `sendto(2)`), which the main thread's seccomp filter does not
/// allow.
fn read(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    nix::unistd::read(stream.as_fd(), buf).map_err(std::io::Error::from)
}

/// Carries out one command line.
fn answer(line: &[u8], exit: &ExitSignal) -> Reply {
    match parse(line) {
        Ok(Command::Stop) => {
            tracing::info!("stop command received; stopping the VM");
            exit.signal(VmExit::Stopped);
            Reply::Ok
        }
        Err(reply) => reply,
    }
}

/// The listener's token; connections use their descriptor.
const LISTENER: u32 = u32::MAX;

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => self.accept(ops),
            fd => {
                if let Ok(fd) = i32::try_from(fd) {
                    self.serve(fd, ops);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.listener, LISTENER, EventSet::IN)) {
            tracing::error!("cannot serve the control socket: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use airlock_vmm_api::command::{send, CommandError};
    use event_manager::{EventManager, SubscriberOps};

    use std::io::{Read, Write};

    use super::*;

    /// A control socket served by an event loop on a thread of its own
    /// until `exit` is signalled.
    fn serve(path: &Path, exit: ExitSignal) -> std::thread::JoinHandle<()> {
        let control = Control::new(bind(path).unwrap(), exit.clone());
        std::thread::spawn(move || {
            let mut manager =
                EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
            manager.add_subscriber(Arc::new(Mutex::new(control)));
            while exit.reason().is_none() {
                manager.run_with_timeout(50).unwrap();
            }
        })
    }

    #[test]
    fn a_stop_command_stops_the_vm_after_silent_and_bad_peers() {
        let dir = std::env::temp_dir().join(format!("airlock-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let exit = ExitSignal::new().unwrap();
        let server = serve(&path, exit.clone());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A peer that says nothing, and one that says too much, do not
        // stall the loop.
        let _silent = UnixStream::connect(&path).unwrap();
        let mut flood = UnixStream::connect(&path).unwrap();
        flood.write_all(&vec![b'x'; MAX_COMMAND + 600]).unwrap();
        let mut answer = String::new();
        flood.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("at most"), "{answer}");
        let t = Duration::from_secs(5);
        let bad = UnixStream::connect(&path).unwrap();
        (&bad).write_all(b"{\"command\":\"reboot\"}\n").unwrap();
        let mut answer = String::new();
        (&bad).read_to_string(&mut answer).unwrap();
        assert!(answer.contains("not a command"), "{answer}");
        assert!(exit.reason().is_none());
        send(&path, &Command::Stop, t).unwrap();
        server.join().unwrap();
        assert!(matches!(exit.reason(), Some(VmExit::Stopped)));
        assert!(matches!(
            send(&path, &Command::Stop, t),
            Err(CommandError::Connect(..) | CommandError::Io(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn connections_past_the_cap_are_closed() {
        let dir = std::env::temp_dir().join(format!("airlock-control-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let exit = ExitSignal::new().unwrap();
        let server = serve(&path, exit.clone());
        let held: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut extra = UnixStream::connect(&path).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        assert_eq!(extra.read_to_end(&mut answer).unwrap(), 0, "closed at once");
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
        // Closed connections free their slots.
        send(&path, &Command::Stop, Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
