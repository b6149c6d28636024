//! What the VMM and its keeper report as a VM runs, in order: one JSON
//! line per [`Event`], appended to the file the launcher names
//! ([`crate::VmConfig::events`]; root's alone, outside the VMM's jail). The launcher, or any later
//! process of it, reads them back with an [`EventLog`]. The VMM's log is
//! for people; this is the one thing programs read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest line an [`EventLog`] accepts: a VMM that wrote more is not
/// speaking this contract, and its line is skipped.
pub const MAX_LINE: usize = 16 << 10;

/// One thing that happened to a VM. Times are milliseconds since the VMM
/// process started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The VM is built and its vCPUs run: setup errors are behind.
    Running { ms: f64 },
    /// The boot vCPU entered guest code for the first time.
    KernelEntered { ms: f64 },
    /// The guest's `/init` started (it wrote to the boot timer).
    InitStarted { ms: f64 },
    /// The guest agent serves its API (it wrote to the boot timer).
    AgentReady { ms: f64 },
    /// Guest memory was wiped: `touched_mib` of `total_mib` held data.
    Wiped {
        touched_mib: u64,
        total_mib: u64,
        ms: f64,
    },
    /// The VM ended; `status` is the VMM's exit status (128 + N for a VMM
    /// that signal N killed).
    Exited { reason: String, status: i32 },
    /// The VMM could not build or run the VM.
    Error { message: String },
}

impl Event {
    /// The event as one JSON line, newline included.
    pub fn to_line(&self) -> String {
        // An enum of numbers and strings always serializes.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// An event from one line; `None` for anything else.
    pub fn from_line(line: &str) -> Option<Self> {
        serde_json::from_str(line.trim_end()).ok()
    }
}

/// The writing end: a descriptor open for appending (`O_APPEND`), so that
/// the VMM's and the keeper's lines never overwrite each other.
#[derive(Debug)]
pub struct EventSink {
    file: File,
}

impl EventSink {
    /// A sink writing to `file`.
    pub fn new(file: File) -> Self {
        EventSink { file }
    }

    /// Appends `event` in one `write`; a sink that cannot be written (a
    /// full disk) loses the event, and says so to the caller.
    pub fn emit(&self, event: &Event) -> std::io::Result<()> {
        (&self.file).write_all(event.to_line().as_bytes())
    }

    /// A second handle on the same file (for the keeper after a fork).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventSink {
            file: self.file.try_clone()?,
        })
    }
}

/// The reading end: the events of a file, read as it grows.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    /// Bytes read so far.
    offset: u64,
    /// The start of a line not yet complete.
    partial: Vec<u8>,
    /// Whether `partial` is the middle of an overlong line, skipped.
    skipping: bool,
    events: Vec<Event>,
}

impl EventLog {
    /// The events at `path` (none yet if it does not exist).
    pub fn new(path: &Path) -> Self {
        EventLog {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            skipping: false,
            events: Vec::new(),
        }
    }

    /// All events at `path` now.
    pub fn read(path: &Path) -> Vec<Event> {
        let mut log = EventLog::new(path);
        log.refresh();
        log.events
    }

    /// The file this log reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended since the last call; returns how many new
    /// events it held. Lines that are not events are skipped.
    pub fn refresh(&mut self) -> usize {
        let before = self.events.len();
        let Ok(mut file) = File::open(&self.path) else {
            return 0;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        let mut chunk = [0u8; 8 << 10];
        loop {
            let n = match file.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.offset += n as u64;
            self.take(&chunk[..n]);
        }
        self.events.len() - before
    }

    fn take(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if !self.skipping {
                self.partial.extend_from_slice(&bytes[..end]);
                if let Some(e) = std::str::from_utf8(&self.partial)
                    .ok()
                    .and_then(Event::from_line)
                {
                    self.events.push(e);
                }
            }
            self.partial.clear();
            self.skipping = false;
            bytes = &bytes[end + 1..];
        }
        if !self.skipping {
            self.partial.extend_from_slice(bytes);
            if self.partial.len() > MAX_LINE {
                self.partial.clear();
                self.skipping = true;
            }
        }
    }

    /// Every event read so far, in order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The last event read that `pick` maps to something.
    pub fn last<T>(&self, pick: impl Fn(&Event) -> Option<T>) -> Option<T> {
        self.events.iter().rev().find_map(pick)
    }

    /// Whether the VM got as far as running.
    pub fn running(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::Running { .. }))
    }

    /// Whether the agent said it was ready.
    pub fn agent_ready(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::AgentReady { .. }))
    }

    /// The last wipe: (touched MiB, total MiB, ms).
    pub fn wiped(&self) -> Option<(u64, u64, f64)> {
        self.last(|e| match e {
            Event::Wiped {
                touched_mib,
                total_mib,
                ms,
            } => Some((*touched_mib, *total_mib, *ms)),
            _ => None,
        })
    }

    /// Why the VM could not run or ended badly: the last `Error`, else the
    /// last `Exited` with a non-zero status.
    pub fn failure(&self) -> Option<String> {
        self.last(|e| match e {
            Event::Error { message } => Some(message.clone()),
            _ => None,
        })
        .or_else(|| {
            self.last(|e| match e {
                Event::Exited { reason, status } if *status != 0 => Some(reason.clone()),
                _ => None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(path: &Path) -> EventSink {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        EventSink::new(file)
    }

    #[test]
    fn events_are_tagged_json_lines() {
        let e = Event::Wiped {
            touched_mib: 12,
            total_mib: 256,
            ms: 3.5,
        };
        assert_eq!(
            e.to_line(),
            "{\"event\":\"wiped\",\"touched_mib\":12,\"total_mib\":256,\"ms\":3.5}\n"
        );
        assert_eq!(Event::from_line(&e.to_line()), Some(e));
        assert_eq!(Event::from_line("{\"event\":\"reboot\"}"), None);
        assert_eq!(Event::from_line("VM running"), None);
    }

    #[test]
    fn a_log_reads_what_two_writers_append_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let mut log = EventLog::new(&path);
        assert_eq!(log.refresh(), 0, "no file yet");
        let vmm = sink(&path);
        let keeper = vmm.try_clone().unwrap();
        vmm.emit(&Event::Running { ms: 5.0 }).unwrap();
        assert_eq!(log.refresh(), 1);
        assert!(log.running() && !log.agent_ready());
        vmm.emit(&Event::AgentReady { ms: 800.0 }).unwrap();
        keeper
            .emit(&Event::Wiped {
                touched_mib: 1,
                total_mib: 2,
                ms: 0.5,
            })
            .unwrap();
        assert_eq!(log.refresh(), 2);
        assert!(log.agent_ready());
        assert_eq!(log.wiped(), Some((1, 2, 0.5)));
        assert_eq!(log.failure(), None);
        assert_eq!(EventLog::read(&path).len(), 3);
    }

    #[test]
    fn a_line_split_across_reads_is_whole_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let line = Event::Error {
            message: "no /dev/kvm".into(),
        }
        .to_line();
        let (a, b) = line.split_at(10);
        std::fs::write(&path, a).unwrap();
        let mut log = EventLog::new(&path);
        assert_eq!(log.refresh(), 0);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b.as_bytes()).unwrap();
        assert_eq!(log.refresh(), 1);
        assert_eq!(log.failure().as_deref(), Some("no /dev/kvm"));
    }

    #[test]
    fn garbage_and_overlong_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let mut text = String::from("not json\n{\"event\":\"nope\"}\n");
        text.push_str(&"x".repeat(MAX_LINE * 3));
        text.push_str(&Event::Running { ms: 1.0 }.to_line());
        text.push_str(
            &Event::Exited {
                reason: "guest panic".into(),
                status: 1,
            }
            .to_line(),
        );
        std::fs::write(&path, text).unwrap();
        let events = EventLog::read(&path);
        assert_eq!(
            events,
            vec![Event::Exited {
                reason: "guest panic".into(),
                status: 1
            }],
            "the overlong line swallowed the Running that shared it"
        );
        let mut log = EventLog::new(&path);
        log.refresh();
        assert_eq!(log.failure().as_deref(), Some("guest panic"));
    }
}
