//! Guests that fail in ways a VMM must report, on real KVM.

use std::time::Instant;

use airlock_e2e::on_real_kvm;
use airlock_e2e::tiny_guest::{pvh_elf, UD2};
use airlock_vmm::{ConsoleOutput, VmConfig, VmExit, Vmm};

#[test]
fn triple_fault_is_reported_and_memory_still_wiped() {
    on_real_kvm("triple_fault_is_reported_and_memory_still_wiped", || {
        let kernel = std::env::temp_dir().join(format!("airlock-ud2-{}.elf", std::process::id()));
        std::fs::write(&kernel, pvh_elf(UD2)).unwrap();
        let config = VmConfig {
            kernel: kernel.clone(),
            initrd: None,
            vcpus: 1,
            memory_mib: 32,
            extra_args: Vec::new(),
            console: ConsoleOutput::Off,
            ..airlock_vmm::config::with_defaults()
        };
        let report = Vmm::new(config, Instant::now()).run().expect("the VM runs");
        std::fs::remove_file(kernel).unwrap();
        assert_eq!(report.exit, VmExit::TripleFault { vcpu: 0 });
        assert_eq!(report.exit.exit_code(), 1);
        // The loader and boot structures touched guest memory; all of it
        // was wiped.
        assert!(report.wipe.expect("no keeper: the VMM wipes").wiped_pages > 0);
    });
}
