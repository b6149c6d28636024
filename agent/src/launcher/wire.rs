//! The launcher's wire format: one JSON message per `SOCK_SEQPACKET`
//! packet, with file descriptors attached as `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::cmsg_space;
use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest message: requests are a few paths and ids.
const MESSAGE_MAX: usize = 64 * 1024;
/// Most fds one message carries (stdin, stdout, stderr).
pub const FDS_MAX: usize = 3;

/// Errors on the launcher's socket.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("Cannot create the socket pair")]
    Pair(#[source] Errno),
    #[error("Cannot send a message")]
    Send(#[source] Errno),
    #[error("Cannot receive a message")]
    Recv(#[source] Errno),
    #[error("Malformed message")]
    Json(#[from] serde_json::Error),
    #[error("A message carried {0} fds, more than {FDS_MAX}")]
    TooManyFds(usize),
    #[error("A message was truncated")]
    Truncated,
}

/// A connected pair, close-on-exec.
pub fn pair() -> Result<(OwnedFd, OwnedFd), WireError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(WireError::Pair)
}

/// Sends `msg` with `fds` attached.
pub fn send<T: Serialize>(sock: RawFd, msg: &T, fds: &[OwnedFd]) -> Result<(), WireError> {
    let data = serde_json::to_vec(msg)?;
    let raw: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(&data)];
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    loop {
        match sendmsg::<UnixAddr>(sock, &iov, &cmsgs, MsgFlags::empty(), None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(WireError::Send(e)),
        }
    }
}

/// Receives one message and up to `max_fds` fds; `None` at end of file
/// (the peer closed its end without sending).
pub fn recv<T: DeserializeOwned>(
    sock: RawFd,
    max_fds: usize,
) -> Result<(Option<T>, Vec<OwnedFd>), WireError> {
    let (data, fds) = recv_raw(sock, max_fds)?;
    if data.is_empty() {
        return Ok((None, fds));
    }
    Ok((Some(serde_json::from_slice(&data)?), fds))
}

/// Receives one packet's bytes and up to `max_fds` fds (more is an error,
/// and closes them all).
pub fn recv_raw(sock: RawFd, max_fds: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut buf = vec![0u8; MESSAGE_MAX];
    let mut cmsg = cmsg_space!([RawFd; FDS_MAX]);
    let (len, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<UnixAddr>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(WireError::Recv)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: SCM_RIGHTS just installed these fds
                            // in this process; nothing else owns them.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(WireError::Recv(e)),
        }
    };
    if truncated {
        return Err(WireError::Truncated);
    }
    if fds.len() > max_fds {
        return Err(WireError::TooManyFds(fds.len()));
    }
    buf.truncate(len);
    Ok((buf, fds))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn message_and_fds_cross_the_pair() {
        let (a, b) = pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send(a.as_raw_fd(), &vec!["hello".to_string()], &[w]).unwrap();
        let (msg, mut fds) = recv::<Vec<String>>(b.as_raw_fd(), 1).unwrap();
        assert_eq!(msg.unwrap(), vec!["hello".to_string()]);
        // The received fd is the pipe's write end: it writes into `r`.
        let mut w = std::fs::File::from(fds.pop().unwrap());
        w.write_all(b"x").unwrap();
        drop(w);
        let mut got = String::new();
        std::fs::File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "x");
    }

    #[test]
    fn too_many_fds_and_eof() {
        let (a, b) = pair().unwrap();
        let fds: Vec<OwnedFd> = (0..2).map(|_| nix::unistd::pipe().unwrap().0).collect();
        send(a.as_raw_fd(), &1u32, &fds).unwrap();
        assert!(matches!(
            recv::<u32>(b.as_raw_fd(), 1),
            Err(WireError::TooManyFds(2))
        ));
        drop(a);
        let (msg, fds) = recv::<u32>(b.as_raw_fd(), 1).unwrap();
        assert!(msg.is_none() && fds.is_empty());
    }
}
