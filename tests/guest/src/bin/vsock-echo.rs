//! Test guest init for the vsock device. Two modes, from the kernel command
//! line:
//! * `airlock.test.vsock=listen:PORT:N`: accept N connections on PORT and
//!   echo each one back until its peer shuts down writing (host-initiated);
//! * `airlock.test.vsock=connect:PORT:MIB`: connect to the host (CID 2) on
//!   PORT, send MIB MiB of pattern data while reading the echo, and compare
//!   checksums (guest-initiated).
//!
//! * `airlock.test.vsock=sink:PORT`: accept one connection, read an 8-byte
//!   length and then that many bytes, answer one byte (for throughput);
//! * `airlock.test.vsock=source:PORT:MIB`: accept one connection and send
//!   MIB MiB (for throughput).
//!
//! Prints `RESULT ok ...` or `RESULT fail ...` and resets the VM.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use airlock_test_guest::{finish, init, param, pattern_block, Fnv};

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// A vsock stream as a std stream (same read/write/shutdown semantics).
fn stream(fd: OwnedFd) -> UnixStream {
    UnixStream::from(fd)
}

fn accept_one(port: u32) -> Result<UnixStream, String> {
    let sock = listener(port)?;
    use std::os::fd::AsRawFd;
    // SAFETY: accept(2) without an address buffer.
    let fd = unsafe { libc::accept(sock.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
    check(fd, "accept")?;
    // SAFETY: `fd` is the new connection, owned here.
    Ok(stream(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn sink(port: u32) -> Result<String, String> {
    let mut conn = accept_one(port)?;
    let mut len = [0u8; 8];
    conn.read_exact(&mut len).map_err(|e| e.to_string())?;
    let total = u64::from_le_bytes(len);
    let mut left = total;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = conn.read(&mut buf[..want]).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("end of stream with {left} bytes to go"));
        }
        left -= n as u64;
    }
    conn.write_all(b"k").map_err(|e| e.to_string())?;
    let _ = conn.read(&mut buf[..1]); // Until the host closes.
    Ok(format!("sank {total} bytes"))
}

fn source(port: u32, mib: u64) -> Result<String, String> {
    let mut conn = accept_one(port)?;
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        conn.write_all(&block).map_err(|e| e.to_string())?;
    }
    let mut b = [0u8; 1];
    let _ = conn.read(&mut b); // Until the host closes.
    Ok(format!("sourced {mib} MiB"))
}

/// A vsock socket listening on `port`; says so on the console.
fn listener(port: u32) -> Result<OwnedFd, String> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket().map_err(|e| e.to_string())?;
    let a = addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    let ptr = (&a as *const libc::sockaddr_vm).cast();
    // SAFETY: `ptr` points at `a`, a valid sockaddr_vm of `len` bytes.
    let rc = unsafe { libc::bind(sock.as_raw_fd(), ptr, len) };
    check(rc, "bind")?;
    // SAFETY: listen(2) on our socket.
    check(unsafe { libc::listen(sock.as_raw_fd(), 64) }, "listen")?;
    println!("vsock-echo: listening on port {port}");
    Ok(sock)
}

fn listen(port: u32, n: usize) -> Result<String, String> {
    use std::os::fd::AsRawFd;
    let sock = listener(port)?;
    let mut workers = Vec::new();
    for _ in 0..n {
        let sock_fd = sock.as_raw_fd();
        let (no_addr, no_len) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: accept(2) without an address buffer.
        let fd = unsafe { libc::accept(sock_fd, no_addr, no_len) };
        check(fd, "accept")?;
        // SAFETY: `fd` is the new connection, owned here.
        let conn = stream(unsafe { OwnedFd::from_raw_fd(fd) });
        workers.push(std::thread::spawn(move || echo(conn)));
    }
    let mut total = 0u64;
    for w in workers {
        total += w.join().map_err(|_| "echo thread panicked".to_string())??;
    }
    Ok(format!("echoed {n} connections, {total} bytes"))
}

fn echo(mut conn: UnixStream) -> Result<u64, String> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    // The host closes the connection once it has its echo back: a reset
    // or end of file both end the echo.
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if conn.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
    Ok(total)
}

fn connect(port: u32, mib: u64) -> Result<String, String> {
    let sock = vsock_socket().map_err(|e| e.to_string())?;
    let a = addr(libc::VMADDR_CID_HOST, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    let ptr = (&a as *const libc::sockaddr_vm).cast();
    // SAFETY: `ptr` points at `a`, a valid sockaddr_vm of `len` bytes.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), ptr, len) };
    check(rc, "connect")?;
    let conn = stream(sock);
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || {
        let mut sent = Fnv::default();
        let mut block = vec![0u8; 1 << 20];
        for n in 0..mib {
            pattern_block(7, n, &mut block);
            sent.update(&block);
            writer.write_all(&block).map_err(|e| format!("send: {e}"))?;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(sent)
    });
    let mut received = Fnv::default();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    let mut reader = conn;
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        received.update(&buf[..n]);
        total += n as u64;
    }
    let sent = sender.join().map_err(|_| "sender panicked".to_string())??;
    if sent == received && total == mib << 20 {
        Ok(format!(
            "round trip of {total} bytes, checksum {:016x}",
            sent.0
        ))
    } else {
        Err(format!(
            "mismatch: sent {:016x}, received {:016x} ({total} bytes)",
            sent.0, received.0
        ))
    }
}

fn main() {
    init();
    let spec = param("airlock.test.vsock").unwrap_or_default();
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |i: usize| {
        parts
            .get(i)
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let result = match parts.first() {
        Some(&"listen") => listen(num(1) as u32, num(2) as usize),
        Some(&"connect") => connect(num(1) as u32, num(2)),
        Some(&"sink") => sink(num(1) as u32),
        Some(&"source") => source(num(1) as u32, num(2)),
        _ => Err(format!("bad airlock.test.vsock '{spec}'")),
    };
    match result {
        Ok(msg) => finish(&format!("ok {msg}")),
        Err(msg) => finish(&format!("fail {msg}")),
    }
}
