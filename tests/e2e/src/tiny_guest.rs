//! Hand-assembled guests: machine code wrapped in the smallest ELF
//! `vmlinux` that the VMM's loader accepts, entered through PVH (32-bit
//! protected mode, paging off). For testing how the VMM handles what a real
//! kernel would rarely do, such as a triple fault or garbage virtio rings.

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

/// A 32-bit general-purpose register, numbered as x86 encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum R {
    Eax = 0,
    Ecx = 1,
    Edx = 2,
    Ebx = 3,
    Esp = 4,
    Ebp = 5,
    Esi = 6,
    Edi = 7,
}

/// How wide a memory access is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    B1,
    B2,
    B4,
}

/// A memory operand: `[base + index * scale + disp]`.
#[derive(Debug, Clone, Copy)]
pub struct Mem {
    base: Option<R>,
    index: Option<(R, u8)>,
    disp: u32,
    /// A label whose absolute address is the displacement.
    label: Option<Label>,
}

/// `[base + disp]`.
pub fn at(base: R, disp: u32) -> Mem {
    Mem {
        base: Some(base),
        index: None,
        disp,
        label: None,
    }
}

/// `[base + index * scale + disp]`; no base: `[index * scale + disp]`.
pub fn indexed(base: Option<R>, index: R, scale: u8, disp: u32) -> Mem {
    assert!(index != R::Esp, "ESP cannot be an index");
    assert!(matches!(scale, 1 | 2 | 4 | 8), "scale {scale}");
    Mem {
        base,
        index: Some((index, scale)),
        disp,
        label: None,
    }
}

/// `[index * 4 + table]`: entry `index` of a table of dwords at `table`.
pub fn table(index: R, table: Label) -> Mem {
    Mem {
        label: Some(table),
        ..indexed(None, index, 4, 0)
    }
}

/// A jump target or a data address, bound once.
#[derive(Debug, Clone, Copy)]
pub struct Label(usize);

/// The two-operand ALU instructions, by their `/digit` in the 0x81 group.
#[derive(Debug, Clone, Copy)]
pub enum Alu {
    Add = 0,
    Or = 1,
    And = 4,
    Sub = 5,
    Xor = 6,
    Cmp = 7,
}

/// Condition codes for [`Asm::jcc`].
#[derive(Debug, Clone, Copy)]
pub enum Cond {
    Below = 0x2,
    AboveOrEqual = 0x3,
    Equal = 0x4,
    NotEqual = 0x5,
}

/// A 32-bit x86 assembler for the guests above, encoding by hand the few
/// instructions they use. Code is placed at [`LOAD_ADDR`], so a label's
/// absolute address is `LOAD_ADDR` + its offset.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (where the 4 bytes go, the label, absolute or relative).
    fixups: Vec<(usize, Label, bool)>,
}

impl Asm {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn imm32(&mut self, imm: u32) -> &mut Self {
        self.op(&imm.to_le_bytes())
    }

    /// Emits a ModRM (and SIB) byte with `reg` in its reg field, and the
    /// 32-bit displacement, for `m`.
    fn modrm(&mut self, reg: u8, m: Mem) -> &mut Self {
        match (m.base, m.index) {
            (Some(b), None) if b != R::Esp => self.op(&[0x80 | reg << 3 | b as u8]),
            (base, index) => {
                let (i, ss) = index.map_or((4, 0), |(i, s)| (i as u8, s.trailing_zeros() as u8));
                match base {
                    Some(b) => self.op(&[0x84 | reg << 3, ss << 6 | i << 3 | b as u8]),
                    None => self.op(&[0x04 | reg << 3, ss << 6 | i << 3 | 5]),
                }
            }
        };
        match m.label {
            Some(l) => self.fixup(l, true),
            None => self.imm32(m.disp),
        }
    }

    /// A new label, not yet bound.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the next instruction.
    pub fn bind(&mut self, l: Label) -> &mut Self {
        assert!(self.labels[l.0].is_none(), "label bound twice");
        self.labels[l.0] = Some(self.code.len());
        self
    }

    /// Where the next byte goes, as a guest physical address.
    pub fn here(&self) -> u32 {
        LOAD_ADDR as u32 + self.code.len() as u32
    }

    fn fixup(&mut self, l: Label, absolute: bool) -> &mut Self {
        self.fixups.push((self.code.len(), l, absolute));
        self.imm32(0)
    }

    /// The code, with every label's uses filled in.
    pub fn finish(mut self) -> Vec<u8> {
        for (at, l, absolute) in std::mem::take(&mut self.fixups) {
            let target = self.labels[l.0].expect("a label used but never bound");
            let value = if absolute {
                LOAD_ADDR as u32 + target as u32
            } else {
                (target as i64 - (at as i64 + 4)) as i32 as u32
            };
            self.code[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        self.code
    }

    /// Raw bytes (data, or code in another mode).
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.op(bytes)
    }

    /// A 32-bit data word.
    pub fn dd(&mut self, v: u32) -> &mut Self {
        self.imm32(v)
    }

    /// A 32-bit data word holding `l`'s absolute address.
    pub fn dd_label(&mut self, l: Label) -> &mut Self {
        self.fixup(l, true)
    }

    /// Pads with `int3` up to a multiple of `n` bytes.
    pub fn align(&mut self, n: usize) -> &mut Self {
        while !self.code.len().is_multiple_of(n) {
            self.code.push(0xcc);
        }
        self
    }

    /// r = imm.
    pub fn mov_ri(&mut self, r: R, imm: u32) -> &mut Self {
        self.op(&[0xb8 + r as u8]).imm32(imm)
    }

    /// dst = src.
    pub fn mov_rr(&mut self, dst: R, src: R) -> &mut Self {
        self.op(&[0x89, 0xc0 | (src as u8) << 3 | dst as u8])
    }

    /// Segment register `sreg` (0 ES, 2 SS, 3 DS, 4 FS, 5 GS) = r.
    pub fn mov_sreg(&mut self, sreg: u8, r: R) -> &mut Self {
        self.op(&[0x8e, 0xc0 | sreg << 3 | r as u8])
    }

    /// dst = dst `op` src.
    pub fn alu_rr(&mut self, op: Alu, dst: R, src: R) -> &mut Self {
        self.op(&[(op as u8) << 3 | 1, 0xc0 | (src as u8) << 3 | dst as u8])
    }

    /// r = r `op` imm.
    pub fn alu_ri(&mut self, op: Alu, r: R, imm: u32) -> &mut Self {
        self.op(&[0x81, 0xc0 | (op as u8) << 3 | r as u8])
            .imm32(imm)
    }

    /// r = r `op` dword [m].
    pub fn alu_rm(&mut self, op: Alu, r: R, m: Mem) -> &mut Self {
        self.op(&[(op as u8) << 3 | 3]).modrm(r as u8, m)
    }

    /// r <<= n.
    pub fn shl(&mut self, r: R, n: u8) -> &mut Self {
        self.op(&[0xc1, 0xe0 | r as u8, n])
    }

    /// r >>= n (logical).
    pub fn shr(&mut self, r: R, n: u8) -> &mut Self {
        self.op(&[0xc1, 0xe8 | r as u8, n])
    }

    /// [m] = the low `w` bytes of `src` (AL, CL, DL or BL for one byte).
    pub fn store(&mut self, w: Width, m: Mem, src: R) -> &mut Self {
        match w {
            Width::B1 => {
                assert!((src as u8) < 4, "no low byte of {src:?} without REX");
                self.op(&[0x88])
            }
            Width::B2 => self.op(&[0x66, 0x89]),
            Width::B4 => self.op(&[0x89]),
        };
        self.modrm(src as u8, m)
    }

    /// [m] = imm, `w` bytes wide.
    pub fn store_imm(&mut self, w: Width, m: Mem, imm: u32) -> &mut Self {
        match w {
            Width::B1 => self.op(&[0xc6]).modrm(0, m).op(&[imm as u8]),
            Width::B2 => self
                .op(&[0x66, 0xc7])
                .modrm(0, m)
                .op(&(imm as u16).to_le_bytes()),
            Width::B4 => self.op(&[0xc7]).modrm(0, m).imm32(imm),
        }
    }

    /// dst = [m], `w` bytes wide, zero-extended.
    pub fn load(&mut self, w: Width, dst: R, m: Mem) -> &mut Self {
        match w {
            Width::B1 => self.op(&[0x0f, 0xb6]),
            Width::B2 => self.op(&[0x0f, 0xb7]),
            Width::B4 => self.op(&[0x8b]),
        };
        self.modrm(dst as u8, m)
    }

    /// `lock add word [m], imm8`: an atomic 16-bit increment (a ring index
    /// that two vCPUs bump).
    pub fn lock_add16(&mut self, m: Mem, imm: i8) -> &mut Self {
        self.op(&[0xf0, 0x66, 0x83]).modrm(0, m).op(&[imm as u8])
    }

    pub fn push(&mut self, r: R) -> &mut Self {
        self.op(&[0x50 + r as u8])
    }

    pub fn pop(&mut self, r: R) -> &mut Self {
        self.op(&[0x58 + r as u8])
    }

    pub fn dec(&mut self, r: R) -> &mut Self {
        self.op(&[0x48 + r as u8])
    }

    pub fn call(&mut self, l: Label) -> &mut Self {
        self.op(&[0xe8]).fixup(l, false)
    }

    pub fn ret(&mut self) -> &mut Self {
        self.op(&[0xc3])
    }

    pub fn jmp(&mut self, l: Label) -> &mut Self {
        self.op(&[0xe9]).fixup(l, false)
    }

    /// Jumps to `l` if `c` holds.
    pub fn jcc(&mut self, c: Cond, l: Label) -> &mut Self {
        self.op(&[0x0f, 0x80 | c as u8]).fixup(l, false)
    }

    /// Jumps to the address held in dword [m] (a jump table).
    pub fn jmp_mem(&mut self, m: Mem) -> &mut Self {
        self.op(&[0xff]).modrm(4, m)
    }

    /// ECX -= 1; jumps to `l` unless it reached 0.
    pub fn loop_ecx(&mut self, l: Label) -> &mut Self {
        self.dec(R::Ecx).jcc(Cond::NotEqual, l)
    }

    /// Copies ECX bytes from [ESI] to [EDI].
    pub fn rep_movsb(&mut self) -> &mut Self {
        self.op(&[0xf3, 0xa4])
    }

    pub fn cli(&mut self) -> &mut Self {
        self.op(&[0xfa])
    }

    /// Halts for good: `hlt` in a loop, with interrupts off.
    pub fn halt_forever(&mut self) -> &mut Self {
        let l = self.label();
        self.bind(l).cli().op(&[0xf4]).jmp(l)
    }

    /// Resets the machine through the i8042 (the VMM's clean exit), then
    /// halts for good.
    pub fn reset(&mut self) -> &mut Self {
        self.op(&[0xb0, 0xfe, 0xe6, 0x64]).halt_forever()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_an_assembler() {
        // Expected bytes from GNU as (32-bit).
        type Case = (fn(&mut Asm), &'static [u8]);
        let cases: Vec<Case> = vec![
            (
                |a| {
                    a.mov_ri(R::Esi, 1);
                },
                &[0xbe, 1, 0, 0, 0],
            ),
            (
                |a| {
                    a.mov_rr(R::Edi, R::Eax);
                },
                &[0x89, 0xc7],
            ),
            (
                |a| {
                    a.alu_rr(Alu::Xor, R::Esi, R::Eax);
                },
                &[0x31, 0xc6],
            ),
            (
                |a| {
                    a.alu_ri(Alu::And, R::Eax, 7);
                },
                &[0x81, 0xe0, 7, 0, 0, 0],
            ),
            (
                |a| {
                    a.shl(R::Eax, 13);
                },
                &[0xc1, 0xe0, 13],
            ),
            (
                |a| {
                    a.shr(R::Eax, 17);
                },
                &[0xc1, 0xe8, 17],
            ),
            // mov [edi+0x70], al / ax / eax
            (
                |a| {
                    a.store(Width::B1, at(R::Edi, 0x70), R::Eax);
                },
                &[0x88, 0x87, 0x70, 0, 0, 0],
            ),
            (
                |a| {
                    a.store(Width::B2, at(R::Edi, 0x70), R::Eax);
                },
                &[0x66, 0x89, 0x87, 0x70, 0, 0, 0],
            ),
            // mov [esp+4], ecx needs a SIB byte.
            (
                |a| {
                    a.store(Width::B4, at(R::Esp, 4), R::Ecx);
                },
                &[0x89, 0x8c, 0x24, 4, 0, 0, 0],
            ),
            // mov [edi+edx*1+0], al
            (
                |a| {
                    a.store(Width::B1, indexed(Some(R::Edi), R::Edx, 1, 0), R::Eax);
                },
                &[0x88, 0x84, 0x17, 0, 0, 0, 0],
            ),
            // and eax, [ebp*4+0x100010]
            (
                |a| {
                    a.alu_rm(Alu::And, R::Eax, indexed(None, R::Ebp, 4, 0x10_0010));
                },
                &[0x23, 0x04, 0xad, 0x10, 0, 0x10, 0],
            ),
            (
                |a| {
                    a.store_imm(Width::B2, at(R::Ebx, 2), 0x1234);
                },
                &[0x66, 0xc7, 0x83, 2, 0, 0, 0, 0x34, 0x12],
            ),
            (
                |a| {
                    a.store_imm(Width::B1, at(R::Ebx, 2), 0x1ff);
                },
                &[0xc6, 0x83, 2, 0, 0, 0, 0xff],
            ),
            (
                |a| {
                    a.load(Width::B2, R::Eax, at(R::Ebx, 2));
                },
                &[0x0f, 0xb7, 0x83, 2, 0, 0, 0],
            ),
            (
                |a| {
                    a.load(Width::B1, R::Ecx, at(R::Edi, 0));
                },
                &[0x0f, 0xb6, 0x8f, 0, 0, 0, 0],
            ),
            (
                |a| {
                    a.lock_add16(at(R::Ebx, 0x102), 1);
                },
                &[0xf0, 0x66, 0x83, 0x83, 2, 1, 0, 0, 1],
            ),
            // jmp [eax*4+0x100000]
            (
                |a| {
                    a.jmp_mem(indexed(None, R::Eax, 4, 0x10_0000));
                },
                &[0xff, 0x24, 0x85, 0, 0, 0x10, 0],
            ),
            (
                |a| {
                    a.mov_sreg(3, R::Eax);
                },
                &[0x8e, 0xd8],
            ),
        ];
        for (i, (emit, want)) in cases.into_iter().enumerate() {
            let mut a = Asm::default();
            emit(&mut a);
            assert_eq!(a.finish(), want, "case {i}");
        }
    }

    #[test]
    fn labels_resolve_backward_forward_and_absolute() {
        let mut a = Asm::default();
        let (top, end) = (a.label(), a.label());
        a.bind(top).jmp(end).dd_label(end).jcc(Cond::NotEqual, top);
        a.bind(end);
        let code = a.finish();
        assert_eq!(&code[..5], &[0xe9, 10, 0, 0, 0]);
        assert_eq!(&code[5..9], &(LOAD_ADDR as u32 + 15).to_le_bytes());
        assert_eq!(&code[9..15], &[0x0f, 0x85, 0xf1, 0xff, 0xff, 0xff]);
    }
}
