//! What the guest got: online CPUs, memory, kernel release.

use std::fmt;
use std::io;

use procfs::{Current, Meminfo};

const CPUS_ONLINE: &str = "/sys/devices/system/cpu/online";

/// Errors gathering or parsing system information.
#[derive(Debug, thiserror::Error)]
pub enum SysinfoError {
    #[error("Cannot read {0}")]
    Read(&'static str, #[source] io::Error),
    #[error("Invalid CPU list {0:?}")]
    CpuList(String),
    #[error("Cannot read /proc/meminfo")]
    Meminfo(#[source] procfs::ProcError),
    #[error("No MemAvailable line in /proc/meminfo")]
    NoMemAvailable,
    #[error("uname failed")]
    Uname(#[source] nix::Error),
}

/// A summary of the guest's resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysInfo {
    /// The online CPUs as the kernel lists them, e.g. `0-1`.
    pub cpu_list: String,
    /// How many CPUs that list names.
    pub cpus: u32,
    /// MemTotal in KiB.
    pub mem_kib: u64,
    /// The kernel release, e.g. `6.1.0`.
    pub kernel: String,
}

impl SysInfo {
    /// Reads the running guest's information (needs /proc and /sys).
    pub fn gather() -> Result<Self, SysinfoError> {
        let read = |path| std::fs::read_to_string(path).map_err(|e| SysinfoError::Read(path, e));
        let cpu_list = read(CPUS_ONLINE)?.trim().to_owned();
        Ok(Self {
            cpus: count_cpus(&cpu_list)?,
            cpu_list,
            mem_kib: meminfo()?.mem_total / 1024,
            kernel: kernel_release()?,
        })
    }
}

impl fmt::Display for SysInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.cpus == 1 { "" } else { "s" };
        write!(
            f,
            "{} CPU{plural} online ({}), {} MiB memory, kernel {}",
            self.cpus,
            self.cpu_list,
            self.mem_kib / 1024,
            self.kernel
        )
    }
}

/// Counts the CPUs in a kernel CPU list such as `0-3,5` (see cpulist_parse).
pub fn count_cpus(list: &str) -> Result<u32, SysinfoError> {
    let bad = || SysinfoError::CpuList(list.to_owned());
    let list = list.trim();
    if list.is_empty() {
        return Err(bad());
    }
    let mut count: u32 = 0;
    for part in list.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let first: u32 = first.parse().map_err(|_| bad())?;
        let last: u32 = last.parse().map_err(|_| bad())?;
        if last < first {
            return Err(bad());
        }
        count = (last - first)
            .checked_add(1)
            .and_then(|n| count.checked_add(n))
            .ok_or_else(bad)?;
    }
    Ok(count)
}

/// The memory available now (MemAvailable: free plus reclaimable), in KiB.
pub fn mem_available_kib() -> Result<u64, SysinfoError> {
    let bytes = meminfo()?
        .mem_available
        .ok_or(SysinfoError::NoMemAvailable)?;
    Ok(bytes / 1024)
}

/// /proc/meminfo; its figures are in bytes.
fn meminfo() -> Result<Meminfo, SysinfoError> {
    Meminfo::current().map_err(SysinfoError::Meminfo)
}

fn kernel_release() -> Result<String, SysinfoError> {
    let uts = nix::sys::utsname::uname().map_err(SysinfoError::Uname)?;
    Ok(uts.release().to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpus("0").unwrap(), 1);
        assert_eq!(count_cpus("0-1\n").unwrap(), 2);
        assert_eq!(count_cpus("0-3,5").unwrap(), 5);
        assert_eq!(count_cpus("0,2,4-7,9-9").unwrap(), 7);
    }

    #[test]
    fn bad_cpu_lists() {
        for list in ["", " ", "a", "0-", "-1", "3-1", "0,,1", "0-1-2", "1 2"] {
            assert!(count_cpus(list).is_err(), "{list:?}");
        }
        assert!(count_cpus("0-4294967295").is_err());
        assert_eq!(
            count_cpus("x").unwrap_err().to_string(),
            "Invalid CPU list \"x\""
        );
    }

    #[test]
    fn summary_line() {
        let info = SysInfo {
            cpu_list: "0-1".into(),
            cpus: 2,
            mem_kib: 248932,
            kernel: "6.1.0".into(),
        };
        assert_eq!(
            info.to_string(),
            "2 CPUs online (0-1), 243 MiB memory, kernel 6.1.0"
        );
    }

    #[test]
    fn gathers_on_this_machine() {
        let info = SysInfo::gather().unwrap();
        assert!(info.cpus >= 1 && info.mem_kib > 0 && !info.kernel.is_empty());
        assert!(mem_available_kib().unwrap() <= info.mem_kib);
    }
}
