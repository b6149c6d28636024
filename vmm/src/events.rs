//! The VMM's end of the event channel (`airlock_vmm_api::event`): the file
//! its launcher named, opened once before the jail, written by the main
//! thread, the vCPUs and, after the fork, the keeper. The log is for
//! people; these lines are what programs read.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use airlock_vmm_api::{Event, EventSink};

static SINK: OnceLock<EventSink> = OnceLock::new();

/// Errors opening the event file.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("cannot open the event file {0}")]
    Open(PathBuf, #[source] std::io::Error),
}

/// Appends this process's events to `path` from now on (created with mode
/// 0600). Called once, before the keeper is forked: both write through the
/// same `O_APPEND` descriptor.
pub fn open(path: &Path) -> Result<(), EventsError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| EventsError::Open(path.to_path_buf(), e))?;
    let _ = SINK.set(EventSink::new(file));
    Ok(())
}

/// Reports `event`, if an event file is open. A write that fails (a full
/// disk, the jail's file-size limit) loses the event and is logged.
pub fn emit(event: Event) {
    if let Some(sink) = SINK.get() {
        if let Err(e) = sink.emit(&event) {
            tracing::warn!("cannot write the event {event:?}: {e}");
        }
    }
}

/// Milliseconds in `d`, as events carry them.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_vmm_api::EventLog;

    #[test]
    fn events_reach_the_file_once_it_is_open() {
        let dir = std::env::temp_dir().join(format!("airlock-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events");
        let _ = std::fs::remove_file(&path);
        // Before open: nowhere to go, and no error.
        emit(Event::Running { ms: 0.0 });
        open(&path).unwrap();
        emit(Event::AgentReady { ms: 2.0 });
        let events = EventLog::read(&path);
        assert_eq!(events, vec![Event::AgentReady { ms: 2.0 }]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(open(&dir.join("no/such/dir")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
