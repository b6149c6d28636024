//! The Host of a plain-HTTP request, from a connection's first bytes, for
//! the proxy's decision. Parsed with `httparse` (hyper's request-head
//! parser: zero-copy, no allocation, bounded by its header array).
//!
//! Only an origin-form request (`GET /path`, or `OPTIONS *`) with exactly one
//! Host header names a host: an absolute-form target (`GET http://other/`)
//! or CONNECT would let the request name another host than its Host header,
//! so they are refused, as are requests with more than 64 headers.

use super::Sniff;

/// Headers a request head may have before it is refused.
const MAX_HEADERS: usize = 64;

/// What `buf`, the first bytes a client sent, says about its Host.
pub fn sniff(buf: &[u8]) -> Sniff {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Sniff::Incomplete,
        Err(_) => return Sniff::NoName,
    }
    let origin_form = matches!(request.path, Some(p) if p.starts_with('/') || p == "*");
    if request.method == Some("CONNECT") || !origin_form {
        return Sniff::NoName;
    }
    let mut hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => host_name(host.value).map_or(Sniff::NoName, Sniff::Name),
        _ => Sniff::NoName,
    }
}

/// The Host of `buf`, if it holds a whole, well-formed request head that
/// names one.
pub fn host(buf: &[u8]) -> Option<String> {
    match sniff(buf) {
        Sniff::Name(name) => Some(name),
        Sniff::Incomplete | Sniff::NoName => None,
    }
}

/// A Host header's name, without its port (RFC 9110 7.2: `host[:port]`).
/// An IPv6 literal (`[::1]:80`) is returned in brackets: no domain rule
/// matches it.
fn host_name(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (name, port) = match value.rsplit_once(':') {
        Some((name, _)) if !name.ends_with(']') && name.contains(':') => (value, None),
        Some((name, port)) => (name, Some(port)),
        None => (value, None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Sniff {
        Sniff::Name(s.to_string())
    }

    #[test]
    fn host_of_a_request() {
        let req = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHost: api.example.test\r\n\r\n";
        assert_eq!(sniff(req), name("api.example.test"));
        assert_eq!(host(req).as_deref(), Some("api.example.test"));
        let req =
            b"POST / HTTP/1.1\r\nhOsT:  API.Example.test:8080 \r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(sniff(req), name("API.Example.test"));
        assert_eq!(
            sniff(b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            name("a.test")
        );
    }

    #[test]
    fn literal_hosts_are_returned_as_they_are() {
        let req = b"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n";
        assert_eq!(sniff(req), name("192.0.2.1"));
        let req = b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n";
        assert_eq!(sniff(req), name("[2001:db8::1]"));
        let req = b"GET / HTTP/1.1\r\nHost: [2001:db8::1]\r\n\r\n";
        assert_eq!(sniff(req), name("[2001:db8::1]"));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let req = b"GET /x HTTP/1.1\r\nHost: api.example.test\r\n\r\n";
        for n in 0..req.len() {
            assert_eq!(sniff(&req[..n]), Sniff::Incomplete, "{n} bytes");
            assert_eq!(host(&req[..n]), None);
        }
    }

    #[test]
    fn no_single_host_is_no_name() {
        for req in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test:8o\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a .test\r\n\r\n",
            b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nBad Header\r\n\r\n",
            b"\x16\x03\x01\x00\x05hello",
            b"\x00\x01\x02\x03\r\n\r\n",
        ] {
            assert_eq!(
                sniff(req),
                Sniff::NoName,
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn too_many_headers() {
        let mut req = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            req.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        assert_eq!(sniff(&req), Sniff::NoName);
    }
}
