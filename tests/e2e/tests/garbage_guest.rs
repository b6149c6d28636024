//! The garbage guest: a hand-assembled kernel that, on two vCPUs, drives
//! every virtio-mmio device of a jailed sandbox VMM with rings it keeps
//! valid-looking (set up through the driver protocol, indices published
//! one by one) but fills with random descriptor chains: loops, zero and
//! huge lengths, addresses in RAM, past its end, in the MMIO window and
//! near 4 GiB and 2^64, device-readable and device-writable buffers mixed,
//! indirect flags; one vCPU resets a device while the other kicks it; and
//! it pokes every register and the config space with 1-, 2- and 4-byte
//! reads and writes. The VMM must stay alive within its memory bound, go
//! idle once the guest stops, and end cleanly (guest memory wiped) when
//! `airlock rm` asks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock_e2e::on_real_kvm;
use airlock_e2e::tiny_guest::{at, indexed, pvh_elf, table, Alu, Asm, Cond, Label, Width, R};

/// The virtio-mmio window and each device's slot (vmm/src/arch/x86_64/layout.rs).
const MMIO_START: u32 = 0xd000_0000;
const SLOT: u32 = 0x1000;
const SLOTS: u32 = 8;
/// Guest RAM, MiB.
const GUEST_MIB: u64 = 128;
/// The rings, shared by both vCPUs: slot n's queue q at RINGS + n * 0x1000
/// + q * 0x400 (descriptors; avail ring at + 0x100, used ring at + 0x200).
const RINGS: u32 = 0x20_0000;
const QUEUE_SIZE: u32 = 16;
/// The application processor's real-mode entry (SIPI vector 0x10).
const TRAMPOLINE: u32 = 0x1_0000;
/// How many rounds each vCPU plays before it halts: about 22 s in the
/// test host.
const ROUNDS: u32 = 15_000;

/// Where descriptors point: (base, random mask, high dword). Device-
/// written buffers only ever land at 16 MiB and above in RAM, away from
/// the code (1 MiB), the stacks and the rings (2 MiB).
const ADDRS: [(u32, u32, u32); 8] = [
    (0x0100_0000, 0x03ff_ffff, 0),           // in RAM, unaligned
    (0x0100_0000, 0x0000_0fff, 0),           // in RAM, buffers overlapping
    (0x0100_0000, 0x03ff_f000, 0),           // in RAM, page-aligned
    (0x07ff_f000, 0x0000_0fff, 0),           // straddling the end of RAM
    (0x0800_0000, 0x0fff_ffff, 0),           // past the end of RAM
    (0xd000_0000, 0x0000_7fff, 0),           // the virtio-mmio window
    (0xffff_f000, 0x0000_0fff, 0),           // just below 4 GiB
    (0xffff_f000, 0x0000_0fff, 0xffff_ffff), // just below 2^64
];
/// Descriptor lengths: (base, random mask).
const LENS: [(u32, u32); 8] = [
    (0, 0),                // zero
    (0, 0xff),             // small
    (0, 0xffff),           // up to 64 KiB
    (0xffff_ffff, 0),      // huge
    (0xffff_f000, 0x0fff), // huge
    (16, 0),               // a virtio-blk request header
    (1, 0),                // a status byte
    (0x200, 0),            // a sector
];

/// Code and data addresses the program needs (all inside the image).
struct Tables {
    addr_base: Label,
    addr_mask: Label,
    addr_hi: Label,
    len_base: Label,
    len_mask: Label,
    actions: Label,
    pokes: Label,
}

/// The guest: the boot vCPU sets every device up, starts vCPU 1 through
/// INIT/SIPI, and both play [`ROUNDS`] rounds of garbage, then halt.
fn garbage_guest() -> Vec<u8> {
    let mut a = Asm::default();
    let start = a.label();
    a.jmp(start);
    // Data: the random choices' tables.
    let t = Tables {
        addr_base: a.label(),
        addr_mask: a.label(),
        addr_hi: a.label(),
        len_base: a.label(),
        len_mask: a.label(),
        actions: a.label(),
        pokes: a.label(),
    };
    a.align(4).bind(t.addr_base);
    ADDRS.iter().for_each(|x| {
        a.dd(x.0);
    });
    a.bind(t.addr_mask);
    ADDRS.iter().for_each(|x| {
        a.dd(x.1);
    });
    a.bind(t.addr_hi);
    ADDRS.iter().for_each(|x| {
        a.dd(x.2);
    });
    a.bind(t.len_base);
    LENS.iter().for_each(|x| {
        a.dd(x.0);
    });
    a.bind(t.len_mask);
    LENS.iter().for_each(|x| {
        a.dd(x.1);
    });
    let (setup_act, poke_act, chains_act) = (a.label(), a.label(), a.label());
    // What a round does: 1 in 16 resets and sets up a device, 2 in 16
    // poke its registers, the rest publish chains and kick.
    a.bind(t.actions);
    for i in 0..16 {
        a.dd_label(match i {
            0 => setup_act,
            1 | 2 => poke_act,
            _ => chains_act,
        });
    }
    let pokes: Vec<Label> = (0..8).map(|_| a.label()).collect();
    a.bind(t.pokes);
    pokes.iter().for_each(|l| {
        a.dd_label(*l);
    });
    let ap_entry = a.label();
    let trampoline = trampoline(&mut a, ap_entry);

    let (rand, setup_slot, chains, poke) = (a.label(), a.label(), a.label(), a.label());
    let garbage = a.label();
    // The boot vCPU.
    a.bind(start).cli();
    a.mov_ri(R::Esi, trampoline.0)
        .mov_ri(R::Edi, TRAMPOLINE)
        .mov_ri(R::Ecx, trampoline.1)
        .rep_movsb();
    a.mov_ri(R::Esp, 0x1f_0000).mov_ri(R::Esi, 0x1234_5678);
    a.mov_ri(R::Edi, MMIO_START).mov_ri(R::Ebx, RINGS);
    let each = a.label();
    a.bind(each).call(setup_slot);
    a.alu_ri(Alu::Add, R::Edi, SLOT)
        .alu_ri(Alu::Add, R::Ebx, SLOT)
        .alu_ri(Alu::Cmp, R::Edi, MMIO_START + SLOTS * SLOT)
        .jcc(Cond::Below, each);
    start_ap(&mut a);
    a.jmp(garbage);

    // vCPU 1, from the trampoline: flat data segments, its own stack and seed.
    a.bind(ap_entry).mov_ri(R::Eax, 0x10);
    for sreg in [0, 2, 3, 4, 5] {
        a.mov_sreg(sreg, R::Eax);
    }
    a.mov_ri(R::Esp, 0x1e_0000).mov_ri(R::Esi, 0x9e37_79b9);

    // Both: ROUNDS rounds on a random slot and queue (queue 3 exists on no
    // device), then halt.
    a.bind(garbage).mov_ri(R::Ecx, ROUNDS);
    let round = a.label();
    let next = a.label();
    a.bind(round).push(R::Ecx);
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, SLOTS - 1)
        .shl(R::Eax, 12);
    a.mov_rr(R::Edi, R::Eax)
        .alu_ri(Alu::Add, R::Edi, MMIO_START)
        .mov_rr(R::Ebx, R::Eax)
        .alu_ri(Alu::Add, R::Ebx, RINGS);
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, 0xc00)
        .alu_rr(Alu::Add, R::Ebx, R::Eax);
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, 15)
        .jmp_mem(table(R::Eax, t.actions));
    a.bind(setup_act)
        .alu_ri(Alu::And, R::Ebx, !(SLOT - 1))
        .call(setup_slot)
        .jmp(next);
    a.bind(poke_act).call(poke).jmp(next);
    a.bind(chains_act).call(chains);
    a.bind(next).pop(R::Ecx).loop_ecx(round);
    a.halt_forever();

    rand_fn(&mut a, rand);
    setup_slot_fn(&mut a, setup_slot, rand);
    chains_fn(&mut a, chains, rand, &t);
    poke_fn(&mut a, poke, rand, &t, &pokes);
    pvh_elf(&a.finish())
}

/// vCPU 1's way into protected mode, as data in the image (the boot vCPU
/// copies it to [`TRAMPOLINE`]): 16-bit code that loads a flat GDT, sets
/// CR0.PE and far-jumps to `entry`. Returns where the copy starts in the
/// image and its length.
fn trampoline(a: &mut Asm, entry: Label) -> (u32, u32) {
    const GDT: u16 = 32;
    const GDTR: u16 = GDT + 24;
    let from = a.here();
    a.bytes(&[0xfa]) // cli
        .bytes(&[0x8c, 0xc8, 0x8e, 0xd8]) // mov ax, cs; mov ds, ax
        .bytes(&[0x0f, 0x01, 0x16]) // lgdt [GDTR]
        .bytes(&GDTR.to_le_bytes())
        .bytes(&[0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0]) // CR0.PE
        .bytes(&[0x66, 0xea]) // jmp dword 0x08:entry
        .dd_label(entry)
        .bytes(&0x08u16.to_le_bytes());
    assert!(a.here() - from <= u32::from(GDT));
    while a.here() - from < u32::from(GDT) {
        a.bytes(&[0xcc]);
    }
    // Null, flat 32-bit code (0x08), flat data (0x10).
    for d in [0u64, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff] {
        a.bytes(&d.to_le_bytes());
    }
    a.bytes(&23u16.to_le_bytes())
        .dd(TRAMPOLINE + u32::from(GDT));
    (from, a.here() - from)
}

/// The boot vCPU starts vCPU 1 (local APIC ID 1) at [`TRAMPOLINE`]: INIT,
/// then two start-up IPIs, through the local APIC's ICR.
fn start_ap(a: &mut Asm) {
    const APIC: u32 = 0xfee0_0000;
    a.mov_ri(R::Edi, APIC)
        .store_imm(Width::B4, at(R::Edi, 0xf0), 0x1ff); // software-enable
    for icr in [
        0x4500,
        0x4600 | (TRAMPOLINE >> 12),
        0x4600 | (TRAMPOLINE >> 12),
    ] {
        a.store_imm(Width::B4, at(R::Edi, 0x310), 1 << 24)
            .store_imm(Width::B4, at(R::Edi, 0x300), icr);
        let wait = a.label();
        a.mov_ri(R::Ecx, 10_000).bind(wait).loop_ecx(wait);
    }
}

/// `rand`: the next xorshift32 value of ESI, also in EAX.
fn rand_fn(a: &mut Asm, rand: Label) {
    a.bind(rand);
    for (left, n) in [(true, 13), (false, 17), (true, 5)] {
        a.mov_rr(R::Eax, R::Esi);
        if left {
            a.shl(R::Eax, n);
        } else {
            a.shr(R::Eax, n);
        }
        a.alu_rr(Alu::Xor, R::Esi, R::Eax);
    }
    a.mov_rr(R::Eax, R::Esi).ret();
}

/// `setup_slot`: resets the device at EDI and drives it to DRIVER_OK as a
/// driver would, its queues 0-2 at EBX (size 16, rings emptied), random
/// feature bits 0-31 and VIRTIO_F_VERSION_1.
fn setup_slot_fn(a: &mut Asm, setup_slot: Label, rand: Label) {
    a.bind(setup_slot);
    let reg = |a: &mut Asm, off: u32, v: u32| {
        a.store_imm(Width::B4, at(R::Edi, off), v);
    };
    reg(a, 0x70, 0);
    reg(a, 0x70, 1);
    reg(a, 0x70, 3);
    reg(a, 0x24, 1);
    reg(a, 0x20, 1);
    reg(a, 0x24, 0);
    a.call(rand).store(Width::B4, at(R::Edi, 0x20), R::Eax);
    reg(a, 0x70, 0xb);
    for q in 0..3u32 {
        let ring = q * 0x400;
        reg(a, 0x30, q);
        reg(a, 0x38, QUEUE_SIZE);
        a.store_imm(Width::B4, at(R::Ebx, ring + 0x100), 0) // avail flags, idx
            .store_imm(Width::B4, at(R::Ebx, ring + 0x200), 0); // used flags, idx
        a.mov_rr(R::Eax, R::Ebx).alu_ri(Alu::Add, R::Eax, ring);
        for (lo, hi) in [(0x80, 0x84), (0x90, 0x94), (0xa0, 0xa4)] {
            a.store(Width::B4, at(R::Edi, lo), R::Eax);
            reg(a, hi, 0);
            a.alu_ri(Alu::Add, R::Eax, 0x100);
        }
        reg(a, 0x44, 1);
    }
    reg(a, 0x70, 0xf);
    a.ret();
}

/// `chains`: fills the descriptor table at EBX with random descriptors,
/// publishes 1-4 random heads in its avail ring (the index bumped
/// atomically: the other vCPU may publish in the same ring) and kicks the
/// queue (EBX's queue number) of the device at EDI.
fn chains_fn(a: &mut Asm, chains: Label, rand: Label, t: &Tables) {
    a.bind(chains)
        .mov_rr(R::Edx, R::Ebx)
        .mov_ri(R::Ecx, QUEUE_SIZE);
    let desc = a.label();
    a.bind(desc);
    // addr = (rand & mask[k]) + base[k], high dword hi[k].
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, 7)
        .mov_rr(R::Ebp, R::Eax);
    a.load(Width::B4, R::Eax, table(R::Ebp, t.addr_hi))
        .store(Width::B4, at(R::Edx, 4), R::Eax);
    a.call(rand)
        .alu_rm(Alu::And, R::Eax, table(R::Ebp, t.addr_mask))
        .alu_rm(Alu::Add, R::Eax, table(R::Ebp, t.addr_base))
        .store(Width::B4, at(R::Edx, 0), R::Eax);
    // len = (rand & mask[k']) + base[k'].
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, 7)
        .mov_rr(R::Ebp, R::Eax);
    a.call(rand)
        .alu_rm(Alu::And, R::Eax, table(R::Ebp, t.len_mask))
        .alu_rm(Alu::Add, R::Eax, table(R::Ebp, t.len_base))
        .store(Width::B4, at(R::Edx, 8), R::Eax);
    // flags: NEXT, WRITE, INDIRECT at random; next: anywhere in the table.
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, (QUEUE_SIZE - 1) << 16 | 7)
        .store(Width::B4, at(R::Edx, 12), R::Eax);
    a.alu_ri(Alu::Add, R::Edx, 16).loop_ecx(desc);
    // Publish.
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, 3)
        .alu_ri(Alu::Add, R::Eax, 1)
        .mov_rr(R::Ecx, R::Eax);
    let publish = a.label();
    a.bind(publish);
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, QUEUE_SIZE - 1)
        .mov_rr(R::Ebp, R::Eax);
    a.load(Width::B2, R::Eax, at(R::Ebx, 0x102))
        .alu_ri(Alu::And, R::Eax, QUEUE_SIZE - 1)
        .store(Width::B2, indexed(Some(R::Ebx), R::Eax, 2, 0x104), R::Ebp)
        .lock_add16(at(R::Ebx, 0x102), 1);
    a.loop_ecx(publish);
    // Kick: the queue number is bits 10-11 of EBX.
    a.mov_rr(R::Eax, R::Ebx)
        .shr(R::Eax, 10)
        .alu_ri(Alu::And, R::Eax, 3)
        .store(Width::B4, at(R::Edi, 0x50), R::Eax);
    a.ret();
}

/// `poke`: eight random accesses to the device at EDI: a random offset in
/// its registers and config space (0-0x1ff), a random value, and at random
/// a 1-, 2- or 4-byte write, 1-, 2- and 4-byte reads, a 4-byte write
/// straddling the slot's end, or a random status.
fn poke_fn(a: &mut Asm, poke: Label, rand: Label, t: &Tables, pokes: &[Label]) {
    a.bind(poke).mov_ri(R::Ecx, 8);
    let (each, done) = (a.label(), a.label());
    a.bind(each);
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, 0x1ff)
        .mov_rr(R::Edx, R::Eax);
    a.call(rand).mov_rr(R::Ebp, R::Eax);
    a.call(rand)
        .alu_ri(Alu::And, R::Eax, 7)
        .jmp_mem(table(R::Eax, t.pokes));
    let m = indexed(Some(R::Edi), R::Edx, 1, 0);
    // 0-2: writes of each width.
    for (l, w) in pokes.iter().zip([Width::B1, Width::B2, Width::B4]) {
        a.bind(*l)
            .mov_rr(R::Eax, R::Ebp)
            .store(w, m, R::Eax)
            .jmp(done);
    }
    // 3, 4: reads of each width (device registers, write-only ones too).
    a.bind(pokes[3]).bind(pokes[4]);
    for w in [Width::B1, Width::B2, Width::B4] {
        a.load(w, R::Eax, m);
    }
    a.jmp(done);
    // 5: a 4-byte write across the slot's end (into the next device).
    a.bind(pokes[5])
        .store(Width::B4, at(R::Edi, SLOT - 2), R::Ebp)
        .jmp(done);
    // 6: a random status.
    a.bind(pokes[6])
        .store(Width::B4, at(R::Edi, 0x70), R::Ebp)
        .jmp(done);
    // 7: a write of each width into the config space.
    a.bind(pokes[7])
        .mov_rr(R::Eax, R::Ebp)
        .alu_ri(Alu::And, R::Edx, 0xff);
    let cfg = indexed(Some(R::Edi), R::Edx, 1, 0x100);
    a.store(Width::B1, cfg, R::Eax)
        .store(Width::B2, cfg, R::Eax)
        .store(Width::B4, cfg, R::Eax);
    a.bind(done).loop_ecx(each).ret();
}

/// `airlock` with `args`, its stdout and stderr piped.
fn airlock(config: &Path, args: &[&str]) -> Child {
    Command::new(airlock_e2e::airlock_binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits up to `secs` for `child`; its stdout and stderr, or a failure.
fn finish(mut child: Child, what: &str, secs: u64) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} took over {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    airlock_e2e::show(what, &out);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, text)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let value = airlock_e2e::proc_status(pid, key);
    value
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{key} of pid {pid}: {value:?}"))
}

/// utime + stime of a task, in clock ticks (`/proc/.../stat` fields 14, 15).
fn cpu_ticks(stat_path: &Path) -> u64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// (name, CPU ticks) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u64)> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let mut out: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            (comm.trim().to_string(), cpu_ticks(&t.path().join("stat")))
        })
        .collect();
    out.sort();
    out
}

fn ticks_of(threads: &[(String, u64)], name: &str) -> u64 {
    threads
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, t)| t)
        .sum()
}

/// The one sandbox under /run/airlock and its keeper's pid, once its VMM
/// (the keeper's child) runs: (id, keeper, VMM).
fn wait_for_vmm(secs: u64) -> (String, u32, u32) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let found = std::fs::read_dir("/run/airlock")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .find_map(|e| {
                let record: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path().join("sandbox.json")).ok()?)
                        .ok()?;
                let keeper = u32::try_from(record["vmm_pid"].as_u64()?).ok()?;
                let children =
                    std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children"))
                        .ok()?;
                let vmm = children.split_whitespace().next()?.parse().ok()?;
                Some((e.file_name().to_string_lossy().into_owned(), keeper, vmm))
            });
        if let Some(found) = found {
            return found;
        }
        assert!(Instant::now() < deadline, "no sandbox VMM after {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_garbage_guest_on_two_vcpus_leaves_the_jailed_vmm_bounded_and_stoppable() {
    on_real_kvm(
        "a_garbage_guest_on_two_vcpus_leaves_the_jailed_vmm_bounded_and_stoppable",
        || {
            let work = tempfile::tempdir().unwrap();
            let kernel = work.path().join("garbage.elf");
            std::fs::write(&kernel, garbage_guest()).unwrap();
            // The runtime waits for an agent that never comes; the test
            // ends the sandbox with `airlock rm` long before it gives up.
            let config = work.path().join("config.toml");
            std::fs::write(
                &config,
                format!(
                    "kernel = \"{}\"\n[timeouts]\nagent_connect_secs = 600\n",
                    kernel.display()
                ),
            )
            .unwrap();
            let run = airlock(
                &config,
                &[
                    "run",
                    "--cpus",
                    "2",
                    "--memory",
                    &GUEST_MIB.to_string(),
                    "--",
                    "true",
                ],
            );
            let (id, keeper, vmm) = wait_for_vmm(120);
            let started = Instant::now();
            println!("sandbox {id}: keeper {keeper}, VMM {vmm}");

            // The garbage: sample memory and CPU until both vCPUs halt.
            let guest_kib = GUEST_MIB << 10;
            let (mut peak_rss, mut peak_anon) = (0u64, 0u64);
            let mut last = threads(vmm);
            let mut idle_since: Option<Instant> = None;
            let mut ran;
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let rss = status_kib(vmm, "VmRSS");
                let anon = status_kib(vmm, "RssAnon");
                (peak_rss, peak_anon) = (peak_rss.max(rss), peak_anon.max(anon));
                assert!(
                    anon < 64 << 10,
                    "the VMM's own memory grew to {anon} KiB (RSS {rss} KiB)"
                );
                assert!(
                    rss < guest_kib + (64 << 10),
                    "the VMM's RSS {rss} KiB is over guest memory + 64 MiB"
                );
                let now = threads(vmm);
                ran = (ticks_of(&now, "vcpu0"), ticks_of(&now, "vcpu1"));
                let busy = ["vcpu0", "vcpu1"]
                    .iter()
                    .any(|v| ticks_of(&now, v) > ticks_of(&last, v));
                last = now;
                match (busy, idle_since) {
                    (true, _) => idle_since = None,
                    (false, None) => idle_since = Some(Instant::now()),
                    (false, Some(t)) if t.elapsed() > Duration::from_secs(2) => break,
                    _ => {}
                }
                assert!(
                    started.elapsed() < Duration::from_secs(240),
                    "the guest did not finish its rounds in 240 s: {last:?}"
                );
            }
            let garbage_time = started.elapsed();
            println!(
                "garbage over after {garbage_time:?}: peak RSS {peak_rss} KiB, anon {peak_anon} \
                 KiB; threads (name, CPU ticks): {last:?}"
            );
            // Both vCPUs played: a vCPU 1 never started would have no CPU time.
            assert!(
                ran.0 >= 100 && ran.1 >= 100,
                "vCPU CPU ticks {ran:?}: both must have run the garbage (1 s or more)"
            );
            // Jailed as the runtime jails: every thread seccomp-filtered, no privileges, a user
            // and pid namespace of its own, the sandbox's cgroup leaf.
            for task in std::fs::read_dir(format!("/proc/{vmm}/task")).unwrap() {
                let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
                assert!(
                    status.contains("\nSeccomp:\t2\n"),
                    "a thread unfiltered: {status}"
                );
            }
            assert_eq!(airlock_e2e::proc_status(vmm, "NoNewPrivs"), "1");
            assert_eq!(airlock_e2e::proc_status(vmm, "CapEff"), "0000000000000000");
            assert!(
                airlock_e2e::proc_status(vmm, "Uid")
                    .split_whitespace()
                    .all(|u| u != "0"),
                "the VMM runs as root"
            );
            assert_eq!(
                airlock_e2e::proc_status(vmm, "NSpid")
                    .split_whitespace()
                    .count(),
                2,
                "a pid namespace of its own"
            );
            let cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
            assert!(
                cgroup.trim().ends_with(&format!("/airlock/{id}/vmm")),
                "{cgroup}"
            );

            let root = std::fs::read_dir(format!("/proc/{vmm}/root"))
                .unwrap()
                .count();
            assert!(
                root < 10,
                "the VMM's root is not its jail's ({root} entries)"
            );
            // Once the guest stops, so does the VMM: no device thread spins
            // on what the garbage left in its rings.
            let before: u64 = threads(vmm).iter().map(|t| t.1).sum();
            std::thread::sleep(Duration::from_secs(3));
            let after = threads(vmm);
            let quiet: u64 = after.iter().map(|t| t.1).sum::<u64>() - before;
            println!("{quiet} CPU ticks in 3 s of an idle guest");
            assert!(
                quiet <= 30,
                "the VMM used {quiet} ticks of CPU in 3 s of an idle guest: {after:?}"
            );

            // What the devices made of it: chains were parsed and refused;
            // nothing panicked.
            let log_path = Path::new("/run/airlock").join(&id).join("vmm.log");
            let log = std::fs::read_to_string(&log_path).unwrap();
            println!("--- VMM log\n{log}");
            assert!(!log.contains("panicked"), "{log}");
            // Every line a guest can cause is rate-limited: the log stays small.
            assert!(log.len() < 1 << 20, "{} bytes of VMM log", log.len());
            assert!(
                log.contains("virtio-blk: dropping request"),
                "no virtio-blk request was parsed and refused"
            );

            // Asked to end, it ends: the memory wiped, nothing left.
            let asked = Instant::now();
            let (status, text) = finish(airlock(&config, &["rm", &id]), "airlock rm", 120);
            assert!(status.success(), "{text}");
            assert!(
                text.contains("guest memory wiped (") && !text.contains("(? MiB"),
                "{text}"
            );
            assert!(
                text.contains(&format!("of {GUEST_MIB} MiB)")),
                "the wipe covered the guest: {text}"
            );
            let (status, text) = finish(run, "airlock run", 60);
            assert!(!status.success(), "the VM never answered: {text}");
            assert!(!text.contains("panicked"), "{text}");
            println!("ended {:?} after it was asked", asked.elapsed());
            assert!(asked.elapsed() < Duration::from_secs(30), "too slow to end");
            airlock_e2e::assert_no_sandbox_left();
        },
    );
}

/// Without KVM: every label the guest uses is bound, and the code fits
/// below the rings.
#[test]
fn the_garbage_guest_assembles() {
    let elf = garbage_guest();
    assert!(elf.len() < 0x2000, "{} bytes", elf.len());
}
