//! Hand-assembled guests: a few bytes of machine code wrapped in the smallest
//! ELF `vmlinux` that the VMM's loader accepts, entered through PVH (32-bit
//! protected mode, paging off). For testing how the VMM handles what a real
//! kernel would rarely do, such as a triple fault.

/// Where the code is loaded and entered (the VMM's high-memory start).
pub const LOAD_ADDR: u64 = 0x10_0000;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const NOTE_OFFSET: usize = 0x100;
const CODE_OFFSET: usize = 0x1000;

/// `ud2`: with no IDT, the #UD escalates to a triple fault.
pub const UD2: &[u8] = &[0x0f, 0x0b];

/// An ELF64 executable with one loadable segment holding `code` at
/// [`LOAD_ADDR`] and a PVH entry note pointing at it.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; CODE_OFFSET + code.len()];
    let put = |elf: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        elf[at..at + bytes.len()].copy_from_slice(bytes)
    };
    // ELF header.
    put(&mut elf, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    put(&mut elf, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut elf, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut elf, 20, &1u32.to_le_bytes());
    put(&mut elf, 24, &LOAD_ADDR.to_le_bytes()); // e_entry
    put(&mut elf, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut elf, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut elf, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut elf, 56, &2u16.to_le_bytes()); // e_phnum
                                            // PT_LOAD, R+X.
    let note_len = 12 + 4 + 4;
    let load = phdr(
        1,
        5,
        CODE_OFFSET as u64,
        LOAD_ADDR,
        code.len() as u64,
        0x1000,
    );
    put(&mut elf, 64, &load);
    // PT_NOTE.
    let note = phdr(4, 4, NOTE_OFFSET as u64, 0, note_len, 4);
    put(&mut elf, 64 + 56, &note);
    // The note: namesz 4, descsz 4, type 18, "Xen\0", entry.
    put(&mut elf, NOTE_OFFSET, &4u32.to_le_bytes());
    put(&mut elf, NOTE_OFFSET + 4, &4u32.to_le_bytes());
    put(
        &mut elf,
        NOTE_OFFSET + 8,
        &XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes(),
    );
    put(&mut elf, NOTE_OFFSET + 12, b"Xen\0");
    put(
        &mut elf,
        NOTE_OFFSET + 16,
        &(LOAD_ADDR as u32).to_le_bytes(),
    );
    put(&mut elf, CODE_OFFSET, code);
    elf
}

fn phdr(kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(56);
    p.extend_from_slice(&kind.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    for v in [offset, addr, addr, size, size, align] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// A few 32-bit x86 instructions, encoded by hand for the guests above:
/// enough for loops that write to memory and MMIO (EDI the pointer, ESI a
/// linear congruential generator, EAX scratch, ECX a counter).
#[derive(Debug, Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn op_imm(&mut self, bytes: &[u8], imm: u32) -> &mut Self {
        self.op(bytes).op(&imm.to_le_bytes())
    }

    /// Where the next instruction goes: a jump target.
    pub fn here(&self) -> usize {
        self.code.len()
    }

    pub fn mov_esi(&mut self, imm: u32) -> &mut Self {
        self.op_imm(&[0xbe], imm)
    }

    pub fn mov_edi(&mut self, imm: u32) -> &mut Self {
        self.op_imm(&[0xbf], imm)
    }

    pub fn mov_ecx(&mut self, imm: u32) -> &mut Self {
        self.op_imm(&[0xb9], imm)
    }

    /// ESI = ESI * 1103515245 + 12345: the next pseudo-random value.
    pub fn next_random(&mut self) -> &mut Self {
        self.op_imm(&[0x69, 0xf6], 1_103_515_245)
            .op_imm(&[0x81, 0xc6], 12_345)
    }

    /// EAX = ESI & mask.
    pub fn random_eax(&mut self, mask: u32) -> &mut Self {
        self.op(&[0x89, 0xf0]).op_imm(&[0x25], mask)
    }

    /// EAX += imm.
    pub fn add_eax(&mut self, imm: u32) -> &mut Self {
        self.op_imm(&[0x05], imm)
    }

    /// [EDI + disp] = ESI.
    pub fn store_esi(&mut self, disp: u32) -> &mut Self {
        self.op_imm(&[0x89, 0xb7], disp)
    }

    /// [EDI + disp] = EAX.
    pub fn store_eax(&mut self, disp: u32) -> &mut Self {
        self.op_imm(&[0x89, 0x87], disp)
    }

    /// dword [EDI + disp] = imm.
    pub fn store_imm(&mut self, disp: u32, imm: u32) -> &mut Self {
        self.op_imm(&[0xc7, 0x87], disp).op(&imm.to_le_bytes())
    }

    pub fn add_edi(&mut self, imm: u32) -> &mut Self {
        self.op_imm(&[0x81, 0xc7], imm)
    }

    /// Jumps back to `target` while EDI < `limit` (unsigned).
    pub fn loop_while_edi_below(&mut self, limit: u32, target: usize) -> &mut Self {
        self.op_imm(&[0x81, 0xff], limit);
        self.jump(&[0x0f, 0x82], target)
    }

    /// ECX -= 1; jumps back to `target` unless it reached 0.
    pub fn loop_ecx(&mut self, target: usize) -> &mut Self {
        self.op(&[0x49]);
        self.jump(&[0x0f, 0x85], target)
    }

    fn jump(&mut self, opcode: &[u8], target: usize) -> &mut Self {
        let end = self.code.len() + opcode.len() + 4;
        let rel = target as i64 - end as i64;
        self.op_imm(opcode, rel as i32 as u32)
    }

    /// Resets the machine through the i8042 (the VMM's clean exit), then
    /// halts for good.
    pub fn reset(&mut self) -> &mut Self {
        self.op(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfe])
    }
}
