//! SNI extraction from a real ClientHello and from broken ones.

use super::*;

/// A TLS 1.3 ClientHello for `api.example.test` (250 bytes, one record), as
/// OpenSSL 3.0.19 sent it: captured on a local listening socket from
/// `openssl s_client -connect 127.0.0.1:PORT -servername api.example.test -tls1_3`.
const HELLO_HEX: [&str; 8] = [
    "16030100f5010000f103038e62079301ecd6a14e14344d7c8da6b279795d5ce4",
    "e26d6f3947f7a6d466a1fc201cdc45fe8e09ad9f41c2fadeba439aaf81c51a0b",
    "6e380c9de41ced12e1e734ce000813021303130100ff010000a0000000150013",
    "0000106170692e6578616d706c652e74657374000b000403000102000a001600",
    "14001d0017001e00190018010001010102010301040023000000160000001700",
    "00000d001e001c040305030603080708080809080a080b080408050806040105",
    "010601002b0003020304002d00020101003300260024001d00203b989230f0d0",
    "8a828f0c8f2094f444a3420736de51b95951d273c999b470915c",
];

fn hello() -> Vec<u8> {
    let hex: String = HELLO_HEX.concat();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// `hello()`'s handshake message split over two records at `at`.
fn split_records(at: usize) -> Vec<u8> {
    let h = hello();
    let message = &h[5..];
    let mut out = Vec::new();
    for part in [&message[..at], &message[at..]] {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[test]
fn real_client_hello() {
    assert_eq!(hello().len(), 250);
    assert_eq!(server_name(&hello()).as_deref(), Some("api.example.test"));
    assert_eq!(sniff(&hello()), Sniff::Name("api.example.test".into()));
}

#[test]
fn trailing_bytes_do_not_matter() {
    let mut h = hello();
    h.extend_from_slice(b"\x17\x03\x03 more records");
    assert_eq!(server_name(&h).as_deref(), Some("api.example.test"));
}

#[test]
fn every_prefix_is_incomplete() {
    let h = hello();
    for n in 0..h.len() {
        assert_eq!(sniff(&h[..n]), Sniff::Incomplete, "prefix of {n} bytes");
        assert_eq!(server_name(&h[..n]), None);
    }
}

#[test]
fn a_hello_over_two_records() {
    for at in [1, 3, 4, 40, 100, 244] {
        let r = split_records(at);
        assert_eq!(
            server_name(&r).as_deref(),
            Some("api.example.test"),
            "split at {at}"
        );
        for n in 0..r.len() {
            assert_eq!(
                sniff(&r[..n]),
                Sniff::Incomplete,
                "split at {at}, {n} bytes"
            );
        }
    }
}

#[test]
fn not_tls() {
    assert_eq!(
        sniff(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"),
        Sniff::NoName
    );
    let mut h = hello();
    h[0] = 23; // application data, not handshake
    assert_eq!(sniff(&h), Sniff::NoName);
    let mut h = hello();
    h[5] = 2; // server_hello
    assert_eq!(sniff(&h), Sniff::NoName);
    let mut h = hello();
    h[3] = 0x50; // a record longer than TLS allows
    assert_eq!(sniff(&h), Sniff::NoName);
}

/// The offset of the server_name extension's host name in `hello()`.
fn name_offset() -> usize {
    let h = hello();
    h.windows(16)
        .position(|w| w == b"api.example.test")
        .unwrap()
}

#[test]
fn malformed_lengths_are_refused_not_trusted() {
    let at = name_offset();
    // The name's own length (2 bytes before it), the entry list's (5 before)
    // and the extension's (7 before), each too long and too short.
    for (field, delta) in [
        (at - 2, 1i16),
        (at - 2, -1),
        (at - 5, 1),
        (at - 5, -1),
        (at - 7, 1),
        (at - 7, -1),
    ] {
        let mut h = hello();
        let v = u16::from_be_bytes([h[field], h[field + 1]]).wrapping_add_signed(delta);
        h[field..field + 2].copy_from_slice(&v.to_be_bytes());
        assert_ne!(
            server_name(&h).as_deref(),
            Some("api.example.test"),
            "field at {field} {delta:+}"
        );
    }
}

#[test]
fn no_panic_on_any_corruption() {
    let h = hello();
    for i in 0..h.len() {
        for v in [0u8, 1, 0x7f, 0x80, 0xff] {
            let mut c = h.clone();
            c[i] = v;
            let _ = sniff(&c);
            let _ = sniff(&c[..i]);
        }
    }
    assert_eq!(sniff(&[]), Sniff::Incomplete);
    assert_eq!(sniff(&[22]), Sniff::Incomplete);
    assert_eq!(sniff(&[22, 3, 1, 0xff, 0xff]), Sniff::NoName);
    assert_eq!(sniff(&[22, 3, 1, 0, 0]), Sniff::NoName);
    // A message claiming 16 MiB: incomplete until the proxy's limit.
    assert_eq!(
        sniff(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
        Sniff::Incomplete
    );
}

#[test]
fn unprintable_or_empty_names_are_refused() {
    let at = name_offset();
    let mut h = hello();
    h[at + 3] = b'\n';
    assert_eq!(sniff(&h), Sniff::NoName);
    let mut h = hello();
    h[at + 3] = 0xc3;
    assert_eq!(sniff(&h), Sniff::NoName);
}

#[test]
fn no_server_name_extension() {
    let mut h = hello();
    let at = name_offset();
    // The extension's type (9 bytes before the name) becomes 0xfafa (GREASE).
    h[at - 9] = 0xfa;
    h[at - 8] = 0xfa;
    assert_eq!(sniff(&h), Sniff::NoName);
}
