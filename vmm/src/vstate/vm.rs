//! The KVM VM: opening `/dev/kvm`, the in-kernel interrupt controllers and
//! timer, and registering guest memory.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors from setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "no /dev/kvm: this host has no KVM. Enable hardware virtualisation (VT-x/AMD-V) and \
         load kvm_intel or kvm_amd, or on a cloud VM enable nested virtualisation"
    )]
    NoKvm,
    #[error("cannot open /dev/kvm (add this user to the 'kvm' group, or check its permissions)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host's KVM is paravirtual and cannot run unmodified guests.
    #[error(
        "this host's /dev/kvm is a paravirtual KVM (kvm_pvm) that cannot boot unmodified Linux \
         guests; run on a host with VT-x/AMD-V, or inside the test host: \
         tests/testhost/run target/release/airlock-vmm ..."
    )]
    ParavirtKvm,
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    #[error("KVM setup failed: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Checks that the host's KVM can run an unmodified Linux guest.
/// `sys_root` is `/` except in tests.
pub fn check_kvm_host(sys_root: &Path) -> Result<(), VmError> {
    if !sys_root.join("dev/kvm").exists() {
        return Err(VmError::NoKvm);
    }
    if sys_root.join("sys/module/kvm_pvm").exists() {
        return Err(VmError::ParavirtKvm);
    }
    Ok(())
}

/// A KVM VM with its memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens KVM and creates a VM with the in-kernel IOAPIC/PIC and PIT.
    pub fn new() -> Result<Self, VmError> {
        check_kvm_host(Path::new("/"))?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(api));
        }
        let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set the identity map address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the interrupt controllers"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        Ok(Vm { kvm, fd })
    }

    /// The system KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM handle.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VMM keeps alive (and wipes) until after the VM fd is closed.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("register guest memory"))?;
        }
        Ok(())
    }

    /// Routes `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("register an irqfd"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_checks_name_the_problem() {
        let root = std::env::temp_dir().join(format!("airlock-kvmcheck-{}", std::process::id()));
        std::fs::create_dir_all(root.join("dev")).unwrap();
        assert!(matches!(check_kvm_host(&root), Err(VmError::NoKvm)));
        std::fs::write(root.join("dev/kvm"), b"").unwrap();
        assert!(check_kvm_host(&root).is_ok());
        std::fs::create_dir_all(root.join("sys/module/kvm_pvm")).unwrap();
        let err = check_kvm_host(&root).unwrap_err();
        assert!(err.to_string().contains("kvm_pvm"));
        assert!(err.to_string().contains("tests/testhost/run"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
