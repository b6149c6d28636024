//! The server name (SNI) of a TLS ClientHello, from a connection's first
//! bytes, for the proxy's decision.
//!
//! Parsed by hand rather than with `tls-parser`: only one extension of one
//! message is needed, and `tls-parser` brings `nom` and a full TLS message
//! model for it. Every read below is bounds-checked through `Reader`; the
//! input is the tenant's and at most the proxy's 16 KiB.
//!
//! A ClientHello split over several handshake records is reassembled (the
//! records' payloads joined); any other record type before it, a second SNI
//! extension or a malformed length is [`Sniff::NoName`].

use super::Sniff;

/// TLS record content type "handshake".
const HANDSHAKE: u8 = 22;
/// Handshake message type "client_hello".
const CLIENT_HELLO: u8 = 1;
/// Extension type "server_name" (RFC 6066).
const SERVER_NAME: u16 = 0;
/// Server name type "host_name".
const HOST_NAME: u8 = 0;
/// The largest plaintext record (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;
/// The longest DNS name, with a trailing dot.
const MAX_NAME: usize = 254;

/// What `buf`, the first bytes a client sent, says about its server name.
pub fn sniff(buf: &[u8]) -> Sniff {
    let Some(hello) = handshake(buf) else {
        return Sniff::NoName;
    };
    let Some(hello) = hello else {
        return Sniff::Incomplete;
    };
    match client_hello_name(hello) {
        Some(name) => Sniff::Name(name),
        None => Sniff::NoName,
    }
}

/// The SNI host name in `buf`, if `buf` holds a whole, well-formed
/// ClientHello that has one.
pub fn server_name(buf: &[u8]) -> Option<String> {
    match sniff(buf) {
        Sniff::Name(name) => Some(name),
        Sniff::Incomplete | Sniff::NoName => None,
    }
}

/// The ClientHello message body, joined from the handshake records at the
/// start of `buf`: `Some(None)` if more bytes are needed, `None` if these
/// are not handshake records starting with a ClientHello.
fn handshake(buf: &[u8]) -> Option<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut rest = buf;
    loop {
        // The message: type (1), length (3), body.
        if let [kind, a, b, c, ..] = message[..] {
            if kind != CLIENT_HELLO {
                return None;
            }
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            let body = message.get(4..)?;
            if body.len() >= len {
                return Some(Some(body.get(..len)?.to_vec()));
            }
        }
        // The next record: type (1), version (2), length (2), payload.
        let Some(&[kind, major, _minor, hi, lo]) = rest.get(..5) else {
            return Some(None);
        };
        if kind != HANDSHAKE || major != 3 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len == 0 || len > MAX_RECORD {
            return None;
        }
        let payload = rest.get(5..)?;
        match payload.get(..len) {
            Some(whole) => {
                message.extend_from_slice(whole);
                rest = payload.get(len..)?;
            }
            None => return Some(None),
        }
    }
}

/// The host name of the body of a ClientHello (RFC 8446 4.1.2).
fn client_hello_name(body: Vec<u8>) -> Option<String> {
    let mut r = Reader(&body);
    r.take(2 + 32)?; // legacy_version, random
    let session_len = r.u8()?;
    r.take(usize::from(session_len))?;
    let suites_len = r.u16()?;
    r.take(usize::from(suites_len))?;
    let compression_len = r.u8()?;
    r.take(usize::from(compression_len))?;
    let extensions_len = r.u16()?;
    let mut extensions = Reader(r.take(usize::from(extensions_len))?);
    if !r.0.is_empty() {
        return None; // nothing follows the extensions
    }
    let mut name = None;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let len = extensions.u16()?;
        let data = extensions.take(usize::from(len))?;
        if kind == SERVER_NAME {
            if name.is_some() {
                return None; // two SNI extensions: ambiguous
            }
            name = Some(host_name(data)?);
        }
    }
    name
}

/// The one `host_name` entry of a `server_name` extension (RFC 6066 3).
fn host_name(data: &[u8]) -> Option<String> {
    let mut r = Reader(data);
    let list_len = r.u16()?;
    let mut list = Reader(r.take(usize::from(list_len))?);
    if !r.0.is_empty() {
        return None; // the list is the whole extension
    }
    let mut name = None;
    while !list.0.is_empty() {
        let kind = list.u8()?;
        let len = list.u16()?;
        let value = list.take(usize::from(len))?;
        if kind == HOST_NAME {
            if name.is_some() || value.is_empty() || value.len() > MAX_NAME {
                return None;
            }
            if !value.iter().all(|b| b.is_ascii_graphic()) {
                return None;
            }
            name = Some(String::from_utf8(value.to_vec()).ok()?);
        }
    }
    name
}

/// A cursor over bytes whose every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes(b.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests;
