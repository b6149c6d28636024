//! The VMM's own wipe, on real KVM: a guest fills its memory with a marker
//! and resets while holding it; a VMM with no keeper (embedded in this
//! test, as a library) wipes guest memory before unmapping it; a test hook
//! reads the mapping back just before and just after the wipe.
//! `wipe_exit_paths.rs` proves the keeper's wipe, through the runtime, on
//! every way a VM ends.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use airlock_e2e::{guest, on_real_kvm};
use airlock_test_guest::marker_word;
use airlock_vmm::{ConsoleOutput, VmConfig, VmExit, Vmm, WipePhase};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: usize = 4096;
const ZERO_PAGE: &[u8] = &[0; PAGE];

/// Counts pages that start with eight marker words, and pages not all zero.
fn scan(mem: &GuestMemoryMmap, marker: u64) -> (usize, usize) {
    let (mut marked, mut nonzero) = (0, 0);
    let pattern: Vec<u8> = std::iter::repeat_n(marker.to_le_bytes(), 8)
        .flatten()
        .collect();
    for region in mem.iter() {
        // SAFETY: the region is a live mapping of `len` bytes, kept mapped
        // for the duration of the hook; the vCPUs are stopped.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        for page in bytes.chunks_exact(PAGE) {
            if page[..64] == pattern[..] {
                marked += 1;
            }
            // Slice equality is a memcmp, fast even in a debug build.
            if page != ZERO_PAGE {
                nonzero += 1;
            }
        }
    }
    (marked, nonzero)
}

#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    before: (usize, usize),
    after: (usize, usize),
}

fn run_vm(
    initrd: std::path::PathBuf,
    args: Vec<String>,
    marker: u64,
    log: &std::path::Path,
) -> (VmExit, Seen) {
    let config = VmConfig {
        kernel: guest::kernel(),
        initrd: Some(initrd),
        vcpus: 1,
        memory_mib: 256,
        extra_args: args,
        console: ConsoleOutput::File(log.to_path_buf()),
        ..airlock_vmm::config::with_defaults()
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let hook_seen = seen.clone();
    let mut vmm = Vmm::new(config, Instant::now());
    vmm.set_wipe_hook(Box::new(move |phase, mem| {
        let counts = scan(mem, marker);
        let mut s = hook_seen.lock().unwrap();
        match phase {
            WipePhase::BeforeWipe => s.before = counts,
            WipePhase::AfterWipe => s.after = counts,
        }
    }));
    let report = vmm.run().expect("VM runs");
    println!(
        "console:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    println!("exit: {}, wipe: {:?}", report.exit, report.wipe);
    let seen = *seen.lock().unwrap();
    (report.exit, seen)
}

#[test]
fn guest_memory_is_wiped_by_a_vmm_without_keeper() {
    on_real_kvm("guest_memory_is_wiped_by_a_vmm_without_keeper", || {
        let dir = std::env::temp_dir().join(format!("airlock-wipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let marker = marker_word(seed);

        let filler = guest::initramfs_with_init("fill-memory", &dir);
        let args = vec![format!("airlock.test.seed={seed}")];
        let (exit, first) = run_vm(filler, args, marker, &dir.join("vm1.log"));
        println!("first VM: {first:?}");
        assert_eq!(exit, VmExit::Reboot);
        // 256 MiB guest, ~70% of MemAvailable filled: well over 100 MiB.
        assert!(
            first.before.0 > (100 << 20) / PAGE,
            "marker not in memory before the wipe"
        );
        assert_eq!(first.after, (0, 0), "memory not wholly zero after the wipe");

        std::fs::remove_dir_all(dir).unwrap();
    });
}
