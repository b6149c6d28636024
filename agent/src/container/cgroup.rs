//! The container's cgroup v2 directory, as the agent reads it: its
//! processes, its OOM kill count and `cgroup.kill`. libcontainer creates
//! it (from `linux.cgroupsPath`, which the agent sets) and removes it.
//! Their common parent caps the memory of all containers together, below
//! the guest's ([`limit_containers`]).
//!
//! Stats and updates are read and written here rather than through
//! libcgroups' v2 `Manager` (linked through libcontainer): its `stats()`
//! reads every controller (cpu, hugetlb, io, memory with swap, pids) and
//! fails as a whole on the first file that is missing, while the agent
//! enables `+memory +pids` below the root (hugetlb and io files may be
//! absent) and the guest has no swap, so all counters would be lost; and its `apply` takes whole
//! `LinuxResources`, writing more files than an update asks for. The few
//! files here read as zeros when absent.

use std::path::{Path, PathBuf};

use crate::sysinfo::SysinfoError;

/// Why the containers' common memory limit could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot tell the memory available")]
    Available(#[source] SysinfoError),
    #[error("only {0} KiB available, all kept for the agent")]
    NoRoom(u64),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Where the guest's cgroup2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every container's cgroup.
pub const PARENT: &str = "airlock";

/// The least memory the agent keeps out of the containers' reach: its own
/// heap, a launcher per operation, kernel buffers of the vsock streams.
const AGENT_RESERVE_MIN_KIB: u64 = 24 << 10;

/// What all containers together may use, in bytes, when the guest has
/// `available_kib` available: all of it less the agent's reserve (the
/// larger of 24 MiB and 1/16). `None` if nothing would be left.
pub fn containers_limit(available_kib: u64) -> Option<u64> {
    let reserve = AGENT_RESERVE_MIN_KIB.max(available_kib / 16);
    available_kib
        .checked_sub(reserve)
        .filter(|kib| *kib > 0)
        .and_then(|kib| kib.checked_mul(1024))
}

/// Caps the memory of all containers together (their parent's
/// `memory.max`, under the cgroup2 mount `root`) at `limit` bytes.
///
/// Without it, a container that allocates without bound drives the whole
/// guest into reclaim: the kernel evicts every file page, the agent's
/// included, and re-reads them for minutes before its global OOM killer
/// acts. Within the parent's limit the memory-cgroup OOM killer takes a
/// container process at once, and the agent keeps answering. A container's
/// own `linux.resources.memory.limit` applies below this one.
pub fn limit_containers(root: &Path, limit: u64) -> std::io::Result<()> {
    // A child has a controller's files only once its parent enables it.
    std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids")?;
    let parent = root.join(PARENT);
    std::fs::create_dir_all(&parent)?;
    std::fs::write(parent.join("memory.max"), limit.to_string())
}

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

/// A cgroup's counters and limits (0: no limit).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub oom_kills: u64,
}

impl Cgroup {
    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Reads the counters (a missing controller reads as zeros).
    pub fn stats(&self) -> Stats {
        let one = |file: &str| parse_limit(&self.read(file));
        let cpu = self.read("cpu.stat");
        let key = |k: &str| {
            cpu.lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(name, _)| *name == k)
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Stats {
            memory_usage: one("memory.current"),
            memory_limit: one("memory.max"),
            cpu_usage_usec: key("usage_usec"),
            cpu_user_usec: key("user_usec"),
            cpu_system_usec: key("system_usec"),
            pids_current: one("pids.current"),
            pids_limit: one("pids.max"),
            oom_kills: self.oom_kills(),
        }
    }

    /// Applies new limits: memory.limit, cpu quota/period and shares, and
    /// pids.limit from an OCI `LinuxResources`; what it leaves out stays.
    pub fn update(&self, r: &oci_spec::runtime::LinuxResources) -> std::io::Result<()> {
        let write = |file: &str, value: String| std::fs::write(self.dir.join(file), value);
        if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
            write("memory.max", limit_value(limit))?;
        }
        if let Some(cpu) = r.cpu() {
            if let Some(quota) = cpu.quota() {
                let period = cpu.period().unwrap_or(100_000);
                write("cpu.max", format!("{} {period}", limit_value(quota)))?;
            }
            if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                write("cpu.weight", shares_to_weight(shares).to_string())?;
            }
        }
        if let Some(pids) = r.pids().as_ref().map(|p| p.limit()) {
            write("pids.max", limit_value(pids))?;
        }
        Ok(())
    }
}

/// A cgroup v2 value: "max" (or garbage) is 0, meaning no limit.
fn parse_limit(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// An OCI limit for a cgroup v2 file: negative or zero means "max".
fn limit_value(v: i64) -> String {
    if v > 0 {
        v.to_string()
    } else {
        "max".into()
    }
}

/// cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), as runc
/// and the kernel documentation map them.
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
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
    fn stats_and_updates_through_the_cgroup_files() {
        let dir = tempfile::tempdir().unwrap();
        let cg = Cgroup {
            dir: dir.path().to_path_buf(),
        };
        for (f, v) in [
            ("memory.current", "1048576\n"),
            ("memory.max", "max\n"),
            (
                "cpu.stat",
                "usage_usec 500\nuser_usec 300\nsystem_usec 200\n",
            ),
            ("pids.current", "3\n"),
            ("pids.max", "64\n"),
            ("memory.events", "oom_kill 1\n"),
        ] {
            std::fs::write(dir.path().join(f), v).unwrap();
        }
        assert_eq!(
            cg.stats(),
            Stats {
                memory_usage: 1 << 20,
                memory_limit: 0,
                cpu_usage_usec: 500,
                cpu_user_usec: 300,
                cpu_system_usec: 200,
                pids_current: 3,
                pids_limit: 64,
                oom_kills: 1,
            }
        );
        let r: oci_spec::runtime::LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":268435456},"cpu":{"quota":50000,"period":100000,"shares":1024},"pids":{"limit":-1}}"#,
        )
        .unwrap();
        cg.update(&r).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "268435456");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "39");
        assert_eq!(read("pids.max"), "max");
    }

    #[test]
    fn containers_get_all_available_memory_but_the_agents_reserve() {
        // 128 MiB guest: about 100 MiB available, 24 MiB kept.
        assert_eq!(containers_limit(100 << 10), Some(76 << 20));
        // 4 GiB available: a sixteenth kept.
        assert_eq!(containers_limit(4 << 20), Some((4 << 30) - (256 << 20)));
        assert_eq!(containers_limit(24 << 10), None);
        assert_eq!(containers_limit(0), None);
        assert_eq!(containers_limit(u64::MAX), None);
    }

    #[test]
    fn the_parent_cgroup_gets_the_limit() {
        let root = tempfile::tempdir().unwrap();
        limit_containers(root.path(), 76 << 20).unwrap();
        let read = |f: &str| std::fs::read_to_string(root.path().join(f)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+memory +pids");
        assert_eq!(read("airlock/memory.max"), (76u64 << 20).to_string());
        // Again (the files exist): the same.
        limit_containers(root.path(), 1 << 20).unwrap();
        assert_eq!(read("airlock/memory.max"), "1048576");
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
