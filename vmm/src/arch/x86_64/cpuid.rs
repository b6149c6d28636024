//! Adjusts the CPUID KVM supports into what one vCPU of the guest sees.
//!
//! The topology presented is one package with `num_vcpus` cores of one thread
//! each, and vCPU `n` has APIC id `n`, on Intel and AMD alike.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 0x1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 ECX: the local APIC timer has TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;

/// Extended topology level types (leaf 0xb/0x1f ECX[15:8]).
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Number of APIC id bits needed to number `count` items: ceil(log2(count)).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Replaces bits `lo..=hi` of `reg` with `value` (truncated to fit).
fn set_bits(reg: u32, hi: u32, lo: u32, value: u32) -> u32 {
    let mask = (u32::MAX >> (31 - (hi - lo))) << lo;
    (reg & !mask) | ((value << lo) & mask)
}

/// Mutable access to every entry of `function` (all subleaves).
fn leaf_mut(cpuid: &mut CpuId, function: u32) -> impl Iterator<Item = &mut kvm_cpuid_entry2> {
    cpuid
        .as_mut_slice()
        .iter_mut()
        .filter(move |e| e.function == function)
}

/// Rewrites leaf 0xb or 0x1f (when KVM offers it) as an SMT level of one
/// thread and a core level of `num_vcpus` cores; higher subleaves are invalid.
/// Subleaves 0-2 are added if KVM left them out, capacity permitting.
fn set_extended_topology(cpuid: &mut CpuId, function: u32, vcpu_id: u8, num_vcpus: u8) {
    if !cpuid.as_slice().iter().any(|e| e.function == function) {
        return;
    }
    for index in 0..3 {
        let present = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == function && e.index == index);
        if !present {
            let entry = kvm_cpuid_entry2 {
                function,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            if cpuid.push(entry).is_err() {
                tracing::warn!(function, index, "no room to add a CPUID topology subleaf");
            }
        }
    }
    let cores = u32::from(num_vcpus);
    for entry in leaf_mut(cpuid, function) {
        let subleaf = entry.index & 0xff;
        let (shift, count, level) = match entry.index {
            0 => (0, 1, LEVEL_SMT),
            1 => (id_bits(cores), cores, LEVEL_CORE),
            _ => (0, 0, LEVEL_INVALID),
        };
        entry.eax = shift;
        entry.ebx = count;
        entry.ecx = (level << 8) | subleaf;
        entry.edx = u32::from(vcpu_id);
    }
}

/// Announces the TSC-deadline timer in leaf 0x1. KVM emulates it in its
/// local APIC (`KVM_CAP_TSC_DEADLINE_TIMER`) but leaves the bit out of
/// `KVM_GET_SUPPORTED_CPUID`. Without it the guest kernel calibrates the
/// APIC timer against jiffies at boot: ten ticks of waiting (100 ms at
/// HZ=100) and more under emulation. Firecracker and QEMU set it too.
pub fn set_tsc_deadline(cpuid: &mut CpuId) {
    for entry in leaf_mut(cpuid, 0x1) {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Adjusts `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `vcpu_id` of
/// `num_vcpus`, before `KVM_SET_CPUID2`:
///
/// - leaf 0x1: initial APIC id, logical processor count, CLFLUSH size,
///   hypervisor bit, HTT when there is more than one vCPU;
/// - leaves 0xb and 0x1f: x2APIC id and an SMT/core topology;
/// - leaf 0x4 (Intel) and 0x8000_001d (AMD) cache parameters: cores per
///   package and how many vCPUs share each cache;
/// - leaf 0x8000_0008 (AMD): core count and APIC id size;
/// - leaf 0x8000_001e (AMD): extended APIC id, core id and node.
///
/// Leaves that are absent stay absent (except missing 0xb/0x1f subleaves).
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, num_vcpus: u8) {
    let num_vcpus = num_vcpus.max(1);
    let cores = u32::from(num_vcpus);
    let apic_id = u32::from(vcpu_id);

    for entry in leaf_mut(cpuid, 0x1) {
        entry.ebx = set_bits(entry.ebx, 31, 24, apic_id);
        entry.ebx = set_bits(entry.ebx, 23, 16, cores);
        entry.ebx = set_bits(entry.ebx, 15, 8, CLFLUSH_LINE_SIZE);
        entry.ecx |= ECX_HYPERVISOR;
        if num_vcpus > 1 {
            entry.edx |= EDX_HTT;
        } else {
            entry.edx &= !EDX_HTT;
        }
    }

    set_extended_topology(cpuid, 0xb, vcpu_id, num_vcpus);
    set_extended_topology(cpuid, 0x1f, vcpu_id, num_vcpus);

    for function in [0x4, 0x8000_001d] {
        for entry in leaf_mut(cpuid, function) {
            // Cache type 0 marks the end of the list: leave it as KVM made it.
            if entry.eax & 0x1f == 0 {
                continue;
            }
            // L1 and L2 are per core (one thread each); L3 is shared by all.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { cores - 1 } else { 0 };
            entry.eax = set_bits(entry.eax, 25, 14, sharing);
            if function == 0x4 {
                entry.eax = set_bits(entry.eax, 31, 26, (cores - 1).min(63));
            }
        }
    }

    for entry in leaf_mut(cpuid, 0x8000_0008) {
        entry.ecx = set_bits(entry.ecx, 7, 0, cores - 1);
        entry.ecx = set_bits(entry.ecx, 15, 12, id_bits(cores));
    }

    for entry in leaf_mut(cpuid, 0x8000_001e) {
        entry.eax = apic_id;
        // Compute unit (core) id = vCPU id; one thread per core.
        entry.ebx = set_bits(entry.ebx, 7, 0, apic_id);
        entry.ebx = set_bits(entry.ebx, 15, 8, 0);
        // Node 0, one node per package.
        entry.ecx = set_bits(entry.ecx, 10, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn host() -> CpuId {
        CpuId::from_entries(&[
            leaf(0x0, 0, [0x1f, 0, 0, 0]),
            leaf(0x1, 0, [0x00a5_0f00, 0x0710_08ff, 0x7ed8_320b, 0x178b_fbff]),
            leaf(0x4, 0, [0x0400_0121, 0, 0, 0]),
            leaf(0x4, 1, [0x0400_0122, 0, 0, 0]),
            leaf(0x4, 2, [0x0400_4143, 0, 0, 0]),
            leaf(0x4, 3, [0x0403_c163, 0, 0, 0]),
            leaf(0x4, 4, [0, 0, 0, 0]),
            leaf(0xb, 0, [1, 2, 0x100, 7]),
            leaf(0xb, 1, [4, 16, 0x201, 7]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0x700f, 0]),
            leaf(0x8000_001d, 0, [0x121, 0, 0, 0]),
            leaf(0x8000_001d, 1, [0x0003_c163, 0, 0, 0]),
            leaf(0x8000_001e, 0, [7, 0x0103, 0x0101, 0]),
        ])
        .unwrap()
    }

    #[test]
    fn tsc_deadline_is_announced_in_leaf1() {
        let mut cpuid = host();
        assert_eq!(find(&cpuid, 0x1, 0).ecx & ECX_TSC_DEADLINE, 0);
        set_tsc_deadline(&mut cpuid);
        let l1 = find(&cpuid, 0x1, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ecx & !ECX_TSC_DEADLINE, find(&host(), 0x1, 0).ecx);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 32, 33].map(id_bits), [0, 1, 2, 2, 3, 5, 6]);
    }

    #[test]
    fn leaf1_identifies_the_vcpu() {
        let mut cpuid = host();
        filter_cpuid(&mut cpuid, 3, 4);
        let l1 = find(&cpuid, 0x1, 0);
        assert_eq!(l1.ebx, 0x0304_08ff);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);

        let mut cpuid = host();
        filter_cpuid(&mut cpuid, 0, 1);
        let l1 = find(&cpuid, 0x1, 0);
        assert_eq!(l1.ebx >> 16, 0x0001);
        assert_eq!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_is_flat() {
        let mut cpuid = host();
        filter_cpuid(&mut cpuid, 2, 3);
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!([smt.eax, smt.ebx, smt.ecx, smt.edx], [0, 1, 0x100, 2]);
        let core = find(&cpuid, 0xb, 1);
        assert_eq!([core.eax, core.ebx, core.ecx, core.edx], [2, 3, 0x201, 2]);
        // The terminating subleaf was added.
        let end = find(&cpuid, 0xb, 2);
        assert_eq!([end.eax, end.ebx, end.ecx, end.edx], [0, 0, 2, 2]);
        assert_eq!(end.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        // Leaf 0x1f was not offered, so it is not invented.
        assert!(!cpuid.as_slice().iter().any(|e| e.function == 0x1f));
    }

    #[test]
    fn intel_cache_leaf_counts_cores() {
        let mut cpuid = host();
        filter_cpuid(&mut cpuid, 0, 4);
        assert_eq!(find(&cpuid, 0x4, 0).eax, (3 << 26) | 0x121);
        assert_eq!(find(&cpuid, 0x4, 1).eax, (3 << 26) | 0x122);
        // L2 is per core, L3 shared by all four vCPUs.
        assert_eq!(find(&cpuid, 0x4, 2).eax, (3 << 26) | 0x143);
        assert_eq!(find(&cpuid, 0x4, 3).eax, (3 << 26) | (3 << 14) | 0x163);
        assert_eq!(find(&cpuid, 0x4, 4).eax, 0);
    }

    #[test]
    fn amd_leaves_describe_the_vcpus() {
        let mut cpuid = host();
        filter_cpuid(&mut cpuid, 5, 6);
        let l8 = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(l8.ecx, 0x3005);
        let l1e = find(&cpuid, 0x8000_001e, 0);
        assert_eq!([l1e.eax, l1e.ebx, l1e.ecx], [5, 0x05, 0]);
        assert_eq!(find(&cpuid, 0x8000_001d, 0).eax, 0x121);
        assert_eq!(find(&cpuid, 0x8000_001d, 1).eax, (5 << 14) | 0x163);
    }

    #[test]
    fn max_vcpus_fit_in_their_fields() {
        let mut cpuid = host();
        filter_cpuid(&mut cpuid, 253, 254);
        assert_eq!(find(&cpuid, 0x1, 0).ebx >> 16, 0xfdfe);
        assert_eq!(find(&cpuid, 0x4, 0).eax >> 26, 63);
        assert_eq!(find(&cpuid, 0xb, 1).eax, 8);
    }
}
