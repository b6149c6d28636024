//! The hybrid-vsock handshake a host process sends after connecting to the
//! device's Unix socket: `CONNECT <port>\n` (Firecracker's protocol).
//!
//! [`parse_connect`] is a pure function over the bytes received so far, so
//! that it can be fuzzed: it never panics, never allocates, and rejects a
//! line as soon as it can no longer become valid.

/// The longest accepted handshake line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

const PREFIX: &[u8] = b"CONNECT ";
/// u32::MAX has 10 decimal digits.
const MAX_PORT_DIGITS: usize = 10;

/// Why a handshake line was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// More than [`MAX_CONNECT_LINE`] bytes without a newline.
    #[error("handshake line too long")]
    TooLong,
    #[error("handshake line does not start with CONNECT")]
    BadCommand,
    /// The port is missing, not decimal digits, or beyond u32.
    #[error("bad port in handshake line")]
    BadPort,
    #[error("trailing bytes after the handshake line")]
    Trailing,
}

/// Parses the bytes a host client sent so far. `Ok(None)`: valid so far,
/// need more bytes; `Ok(Some(port))`: a complete line (`buf` must end right
/// after its newline); `Err`: close the client.
pub fn parse_connect(buf: &[u8]) -> Result<Option<u32>, ConnectError> {
    let (line, complete) = match buf.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            if nl + 1 != buf.len() {
                return Err(ConnectError::Trailing);
            }
            (&buf[..nl], true)
        }
        None => (buf, false),
    };
    if line.len() + usize::from(complete) > MAX_CONNECT_LINE
        || (!complete && line.len() >= MAX_CONNECT_LINE)
    {
        return Err(ConnectError::TooLong);
    }
    // The command, or a prefix of it while incomplete.
    let cmd_len = line.len().min(PREFIX.len());
    if line[..cmd_len] != PREFIX[..cmd_len] {
        return Err(ConnectError::BadCommand);
    }
    if line.len() < PREFIX.len() {
        return if complete {
            Err(ConnectError::BadCommand)
        } else {
            Ok(None)
        };
    }
    let digits = &line[PREFIX.len()..];
    if digits.len() > MAX_PORT_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ConnectError::BadPort);
    }
    if !complete {
        return Ok(None);
    }
    if digits.is_empty() {
        return Err(ConnectError::BadPort);
    }
    let mut port: u64 = 0;
    for &d in digits {
        // At most 10 digits: cannot overflow u64.
        port = port * 10 + u64::from(d - b'0');
    }
    u32::try_from(port)
        .map(Some)
        .map_err(|_| ConnectError::BadPort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Ok(Some(52)));
        assert_eq!(parse_connect(b"CONNECT 0\n"), Ok(Some(0)));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Ok(Some(u32::MAX)));
        assert_eq!(parse_connect(b"CONNECT 0000000001\n"), Ok(Some(1)));
    }

    #[test]
    fn incomplete_lines_need_more() {
        for p in [
            &b""[..],
            b"C",
            b"CONN",
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT 12",
        ] {
            assert_eq!(parse_connect(p), Ok(None), "{p:?}");
        }
    }

    #[test]
    fn bad_lines() {
        assert_eq!(parse_connect(b"connect 5\n"), Err(ConnectError::BadCommand));
        assert_eq!(parse_connect(b"X"), Err(ConnectError::BadCommand));
        assert_eq!(parse_connect(b"CONNECT\n"), Err(ConnectError::BadCommand));
        assert_eq!(parse_connect(b"CONNECT \n"), Err(ConnectError::BadPort));
        assert_eq!(parse_connect(b"CONNECT -1\n"), Err(ConnectError::BadPort));
        assert_eq!(parse_connect(b"CONNECT +1\n"), Err(ConnectError::BadPort));
        assert_eq!(parse_connect(b"CONNECT 1 \n"), Err(ConnectError::BadPort));
        assert_eq!(parse_connect(b"CONNECT 1\r\n"), Err(ConnectError::BadPort));
        assert_eq!(parse_connect(b"CONNECT  1\n"), Err(ConnectError::BadPort));
        assert_eq!(
            parse_connect(b"CONNECT 4294967296\n"),
            Err(ConnectError::BadPort)
        );
        assert_eq!(
            parse_connect(b"CONNECT 99999999999"),
            Err(ConnectError::BadPort)
        );
        assert_eq!(parse_connect(b"CONNECT 1\nx"), Err(ConnectError::Trailing));
        assert_eq!(parse_connect(&[b'C'; 40]), Err(ConnectError::TooLong));
        let mut long = b"CONNECT ".to_vec();
        long.extend_from_slice(&[b'0'; 30]);
        assert!(parse_connect(&long).is_err());
    }

    #[test]
    fn never_panics_on_arbitrary_prefixes() {
        let line = b"CONNECT 1234\n";
        for i in 0..=line.len() {
            let _ = parse_connect(&line[..i]);
        }
        for b in 0..=255u8 {
            let _ = parse_connect(&[b]);
            let _ = parse_connect(&[b'C', b'O', b, b'\n']);
        }
    }
}
