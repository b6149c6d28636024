//! What a running VMM accepts on its control socket
//! ([`crate::VmConfig::control`]): one JSON [`Command`] line per
//! connection, answered by one JSON [`Reply`] line. Later work adds pause,
//! snapshot, drive and network commands here.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest command line the VMM reads.
pub const MAX_COMMAND: usize = 4 << 10;

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Stop the VM now, as SIGTERM does: the vCPUs stop, guest memory is
    /// wiped, the VMM exits.
    Stop,
}

/// The VMM's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Error { message: String },
}

/// Errors sending a command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot reach the VMM's control socket {0}")]
    Connect(std::path::PathBuf, #[source] std::io::Error),
    #[error("the VMM's control socket failed mid-command")]
    Io(#[source] std::io::Error),
    #[error("the VMM answered {0:?}, which is not a reply")]
    BadReply(String),
    #[error("the VMM refused the command: {0}")]
    Refused(String),
}

/// Sends `command` to the VMM listening at `socket`; waits up to
/// `timeout` for each of the write and the reply.
pub fn send(socket: &Path, command: &Command, timeout: Duration) -> Result<(), CommandError> {
    let stream =
        UnixStream::connect(socket).map_err(|e| CommandError::Connect(socket.to_path_buf(), e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(CommandError::Io)?;
    let mut line = serde_json::to_string(command).unwrap_or_default();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(CommandError::Io)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .take(MAX_COMMAND as u64)
        .read_line(&mut answer)
        .map_err(CommandError::Io)?;
    match serde_json::from_str::<Reply>(answer.trim_end()) {
        Ok(Reply::Ok) => Ok(()),
        Ok(Reply::Error { message }) => Err(CommandError::Refused(message)),
        Err(_) => Err(CommandError::BadReply(answer)),
    }
}

/// Parses one command line as the VMM receives it.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let text = std::str::from_utf8(line).map_err(|_| Reply::Error {
        message: "a command must be UTF-8 JSON".into(),
    })?;
    serde_json::from_str(text.trim_end()).map_err(|e| Reply::Error {
        message: format!("not a command: {e}"),
    })
}

impl Reply {
    /// The reply as one JSON line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_replies_are_json_lines() {
        assert_eq!(parse(b"{\"command\":\"stop\"}\n"), Ok(Command::Stop));
        assert!(matches!(
            parse(b"{\"command\":\"reboot\"}"),
            Err(Reply::Error { .. })
        ));
        assert!(matches!(parse(&[0xff, 0xfe]), Err(Reply::Error { .. })));
        assert_eq!(Reply::Ok.to_line(), "{\"reply\":\"ok\"}\n");
    }

    #[test]
    fn send_reads_the_answer_of_a_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [Reply::Ok.to_line(), "garbage\n".to_string()] {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                assert_eq!(parse(line.as_bytes()), Ok(Command::Stop));
                (&stream).write_all(answer.as_bytes()).unwrap();
            }
        });
        let t = Duration::from_secs(5);
        send(&path, &Command::Stop, t).unwrap();
        assert!(matches!(
            send(&path, &Command::Stop, t),
            Err(CommandError::BadReply(_))
        ));
        server.join().unwrap();
        assert!(matches!(
            send(&dir.path().join("none"), &Command::Stop, t),
            Err(CommandError::Connect(..))
        ));
    }
}
