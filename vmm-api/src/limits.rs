//! The numbers every side checks a VM against, defined once.

/// Most vCPUs a VM may have (the x86 MP table's limit in `airlock-vmm`).
pub const MAX_VCPUS: u8 = 32;

/// Smallest guest memory `airlock-vmm` accepts: what the default kernel and
/// a minimal initramfs boot in.
pub const VMM_MIN_MEMORY_MIB: u64 = 32;

/// Smallest guest memory `airlock-runtime` gives a sandbox: the VMM's
/// minimum plus room for the agent, the image's page cache and a workload.
pub const GUEST_MIN_MEMORY_MIB: u64 = 64;

/// Longest drive serial the guest can read (`/sys/block/vdX/serial`): the
/// virtio-blk `GET_ID` buffer.
pub const MAX_DRIVE_ID_LEN: usize = 20;

/// Lowest vsock context ID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// Default cap on the console file: 1 MiB, far more than a boot and an
/// agent write, small enough that a guest cannot fill the host's disk.
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 1 << 20;

/// This host's RAM in MiB, from `/proc/meminfo` (`None` if unreadable).
pub fn host_memory_mib() -> Option<u64> {
    memory_mib_in(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemTotal` of a `/proc/meminfo` text, in MiB.
fn memory_mib_in(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24554740 kB\nMemFree: 1 kB\n";
        assert_eq!(memory_mib_in(text), Some(23979));
        assert_eq!(memory_mib_in("MemFree: 1 kB\n"), None);
        assert!(host_memory_mib().is_some_and(|m| m > 0));
    }

    #[test]
    fn the_runtime_minimum_is_above_the_vmms() {
        const { assert!(GUEST_MIN_MEMORY_MIB >= VMM_MIN_MEMORY_MIB) };
    }
}
