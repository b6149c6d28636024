//! The container's cgroup v2 directory, as the agent reads it: its
//! processes, its OOM kill count and `cgroup.kill`. libcontainer creates
//! it (from `linux.cgroupsPath`, which the agent sets) and removes it.

use std::path::{Path, PathBuf};

/// Where the guest's cgroup2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every container's cgroup.
pub const PARENT: &str = "airlock";

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// The cgroup of container `id` (which need not exist yet).
    pub fn of(id: &str) -> Self {
        Self {
            dir: Path::new(CGROUP_ROOT).join(PARENT).join(id),
        }
    }

    /// The `cgroupsPath` to put in the container's spec.
    pub fn spec_path(id: &str) -> String {
        format!("/{PARENT}/{id}")
    }

    /// OOM kills so far (`oom_kill` in `memory.events`); 0 without a
    /// memory controller.
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .map(|text| parse_oom_kills(&text))
            .unwrap_or(0)
    }

    /// The pids of every process in it.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs every process in it, atomically (`cgroup.kill`, Linux 5.14).
    pub fn kill_all(&self) -> std::io::Result<()> {
        match std::fs::write(self.dir.join("cgroup.kill"), "1") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

fn parse_oom_kills(events: &str) -> u64 {
    events
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == "oom_kill")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_count_from_memory_events() {
        let text = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(text), 2);
        assert_eq!(parse_oom_kills("low 0\n"), 0);
        assert_eq!(parse_oom_kills("oom_kill garbage\n"), 0);
    }

    #[test]
    fn paths() {
        assert_eq!(Cgroup::spec_path("c1"), "/airlock/c1");
        assert_eq!(Cgroup::of("c1").dir, Path::new("/sys/fs/cgroup/airlock/c1"));
        // A cgroup that does not exist: nothing to kill, no pids, no OOMs.
        let gone = Cgroup {
            dir: PathBuf::from("/nonexistent/cgroup"),
        };
        assert!(gone.kill_all().is_ok());
        assert!(gone.pids().is_empty());
        assert_eq!(gone.oom_kills(), 0);
    }
}
