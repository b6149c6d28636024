//! Guest memory as the host holds it: the keeper's memfd, opened by a test
//! through `/proc/PID/fd`, searched for a marker that a guest program wrote
//! (`airlock_test_guest::marker_word`), and the processes that hold it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The page size the marker is laid out in.
pub const PAGE: usize = 4096;

/// Pages of `file` that start with eight marker words.
pub fn marked_pages(file: &File, marker: u64) -> usize {
    let pattern: Vec<u8> = std::iter::repeat_n(marker.to_le_bytes(), 8)
        .flatten()
        .collect();
    let len = file.metadata().unwrap().len();
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut marked) = (0u64, 0);
    while at < len {
        let n = file.read_at(&mut buf, at).unwrap();
        assert!(n > 0, "short read of guest memory at {at}");
        marked += buf[..n]
            .chunks_exact(PAGE)
            .filter(|p| p[..64] == pattern[..])
            .count();
        at += n as u64;
    }
    marked
}

/// The guest memory file that `keeper` holds, opened anew (root may
/// open it through `/proc/PID/fd`).
pub fn guest_memory_of(keeper: u32) -> File {
    let fds = PathBuf::from(format!("/proc/{keeper}/fd"));
    for entry in std::fs::read_dir(&fds).unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().contains("memfd:airlock-guest-ram") {
            // Writable: a guest that waits for the test's go-ahead reads
            // it from its own memory.
            return std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(entry.path())
                .unwrap();
        }
    }
    panic!("keeper {keeper} holds no guest memory file");
}

/// The keeper's only child: the VMM.
pub fn vmm_of(keeper: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "keeper {keeper} has children {pids:?}");
    pids[0]
}

/// Whether `pid` has ended (gone, or a zombie nobody reaped yet).
pub fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X"),
        Err(_) => true,
    }
}

pub fn wait_ended(pid: u32, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !ended(pid) {
        if Instant::now() >= deadline {
            show_stuck(pid);
            panic!("{what} (pid {pid}) did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where `pid` and its children are: state, wait channel and kernel stack
/// of each thread.
pub fn show_stuck(pid: u32) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for p in std::iter::once(pid.to_string()).chain(children.split_whitespace().map(String::from)) {
        for t in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let t = t.path();
            let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
            println!(
                "pid {p} thread {}: {} wchan={}\n{}",
                t.display(),
                read("stat"),
                read("wchan"),
                read("stack")
            );
        }
    }
}

/// The one keeper on the host (`airlock-keeper` in its comm), waiting up to
/// `timeout` for it to appear.
pub fn the_keeper(timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        let keepers: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "airlock-keeper")
            })
            .collect();
        match keepers[..] {
            [one] => return one,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => panic!("keepers on the host: {keepers:?}"),
        }
    }
}

/// The offset of the first page of `file` that starts with eight marker
/// words (as [`marked_pages`] counts them).
pub fn first_marked_page(file: &File, marker: u64) -> Option<u64> {
    let len = file.metadata().unwrap().len();
    let mut words = [0u8; 64];
    (0..len).step_by(PAGE).find(|&at| {
        file.read_at(&mut words, at).is_ok()
            && words
                .chunks_exact(8)
                .all(|w| w == marker.to_le_bytes().as_slice())
    })
}

pub fn memory_write(file: &File, at: u64, bytes: &[u8]) {
    file.write_all_at(bytes, at).unwrap();
}

/// Waits up to `timeout` until at least `want` pages of `file` hold the
/// marker (a guest fills its memory some time after it boots); returns how
/// many do at the end.
pub fn wait_marked(file: &File, marker: u64, want: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let n = marked_pages(file, marker);
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
