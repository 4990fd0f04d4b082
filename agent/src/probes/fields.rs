//! Writes this kernel's field offsets over the placeholders of the programs' direct loads (see
//! `brokerscope_common::fields`), in a copy of the object, before it is loaded.

use brokerscope_common::{
    fields::{BPF_FUNC_SKC_TO_TCP_SOCK, CAST_CALL_PLACEHOLDER, CAST_TYPE_PLACEHOLDER, Field},
    processes::NO_FIELD,
    resources::ResourceOffsets,
    sockets::{EventOffsets, SocketOffsets},
};

use super::btf::Btf;

/// This kernel's offset of each [`Field`], by index (`None` where its BTF has no such
/// member), and how the programs cast a socket to `struct tcp_sock *`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldOffsets {
    fields: [Option<u32>; Field::ALL.len()],
    cast: Cast,
}

/// What the cast's call instruction becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cast {
    /// The `bpf_rdonly_cast` kfunc (Linux 6.2+), by its BTF id, to `struct tcp_sock` by its
    /// BTF id. The verifier turns the call into a register move: no call, no return. The
    /// program checks the socket's protocol itself.
    Kfunc { func: u32, tcp_sock: u32 },
    /// The `bpf_skc_to_tcp_sock` helper: a call, which also checks the protocol.
    Helper,
}

impl FieldOffsets {
    /// From the offsets already resolved for the helper-reading programs. Socket fields are
    /// counted from the start of `struct tcp_sock`, the type the programs' pointer has; its
    /// `struct sock` is nested at the front. Task fields from `struct task_struct`.
    pub fn resolve(
        btf: &Btf,
        socket: &SocketOffsets,
        events: &EventOffsets,
        tasks: &ResourceOffsets,
    ) -> Result<Self, PatchError> {
        let sock = btf
            .offset_of("tcp_sock", &["inet_conn", "icsk_inet", "sk"])
            .map_err(|e| PatchError::NoSock(e.to_string()))?;
        let in_sock = |offset: u32| (offset != NO_FIELD).then(|| sock + offset);
        let known = |offset: u32| (offset != NO_FIELD).then_some(offset);
        let high = |offset: Option<u32>| offset.map(|o| o + 8);
        let mut offsets = [None; Field::ALL.len()];
        for field in Field::ALL {
            offsets[field as usize] = match field {
                Field::SockNum => in_sock(socket.sock_num),
                Field::SockFlags => in_sock(socket.sock_flags),
                Field::SockNet => in_sock(socket.sock_net),
                Field::NetInum => known(socket.net_inum),
                Field::TcpBytesReceived => known(socket.tcp_bytes_received),
                Field::TcpBytesAcked => known(socket.tcp_bytes_acked),
                Field::TcpSndUna => known(socket.tcp_snd_una),
                Field::TcpWriteSeq => known(socket.tcp_write_seq),
                Field::TcpTotalRetrans => known(socket.tcp_total_retrans),
                Field::TcpSrttUs => known(socket.tcp_srtt_us),
                Field::SockDport => in_sock(events.sock_dport),
                Field::SockFamily => in_sock(events.sock_family),
                Field::SockDaddr => in_sock(events.sock_daddr),
                Field::SockRcvSaddr => in_sock(events.sock_rcv_saddr),
                Field::SockV6Daddr => in_sock(events.sock_v6_daddr),
                Field::SockV6DaddrHigh => high(in_sock(events.sock_v6_daddr)),
                Field::SockV6RcvSaddr => in_sock(events.sock_v6_rcv_saddr),
                Field::SockV6RcvSaddrHigh => high(in_sock(events.sock_v6_rcv_saddr)),
                Field::TaskRunDelay => known(run_delay_load(tasks)),
                Field::TaskState => known(tasks.task_state),
                Field::TaskSumExec => known(tasks.task_sum_exec),
                Field::TaskPrevSumExec => known(tasks.task_prev_sum_exec),
                Field::TaskPid => btf.offset_of("task_struct", &["pid"]).ok(),
                Field::TaskTgid => btf.offset_of("task_struct", &["tgid"]).ok(),
                Field::SockProtocol => in_sock(socket.sock_protocol),
                Field::TcpClockCache => btf.offset_of("tcp_sock", &["tcp_clock_cache"]).ok(),
                Field::TaskFlags => known(tasks.task_flags),
            };
        }
        let cast = match (btf.func_id("bpf_rdonly_cast"), btf.struct_id("tcp_sock")) {
            (Some(func), Some(tcp_sock)) => Cast::Kfunc { func, tcp_sock },
            _ => Cast::Helper,
        };
        Ok(Self {
            fields: offsets,
            cast,
        })
    }

    fn get(&self, field: Field) -> Option<u32> {
        self.fields[field as usize]
    }

    pub fn cast(&self) -> Cast {
        self.cast
    }
}

/// Where the run-delay load points: `sched_info.run_delay`, or without CONFIG_SCHED_INFO a
/// stand-in u64 field of the task. The program then reads `task_run_delay` as `NO_FIELD` in its
/// `RESOURCE_OFFSETS` and skips the load; the placeholder still needs a valid offset, so that
/// the other BTF programs are not refused for a field only this one wants.
fn run_delay_load(tasks: &ResourceOffsets) -> u32 {
    if tasks.task_run_delay == NO_FIELD {
        tasks.task_sum_exec
    } else {
        tasks.task_run_delay
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("cannot find struct sock in struct tcp_sock: {0}")]
    NoSock(String),
    #[error("the kernel's BTF has no member for {0:?}")]
    Missing(Field),
    #[error("offset {offset} of {field:?} does not fit a load instruction")]
    TooLarge { field: Field, offset: u32 },
    #[error("placeholder of {field:?} in a non-load instruction (opcode {code:#04x}) in {section}")]
    NotALoad {
        field: Field,
        code: u8,
        section: String,
    },
    #[error("the eBPF object is not a little-endian ELF64 file: {0}")]
    Elf(&'static str),
}

/// A patched copy of the object, 8-byte aligned as the ELF parser needs.
pub struct Object {
    words: Vec<u64>,
    len: usize,
    /// Instructions rewritten.
    pub patched: usize,
    /// Code sections left unpatched, and why: the programs in them cannot load here (`.text`,
    /// the shared functions, refuses every program that loads fields directly).
    pub refused: Vec<(String, PatchError)>,
}

impl Object {
    /// Why the program in code section `section` cannot be loaded, if it cannot.
    pub fn refusal(&self, section: &str) -> Option<&PatchError> {
        self.refused
            .iter()
            .find(|(name, _)| name == section || name == ".text")
            .map(|(_, e)| e)
    }
}

impl Object {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes, and u8 has no alignment.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

const BPF_CLASS_MASK: u8 = 0x07;
/// `BPF_JMP | BPF_CALL`, and `BPF_ALU64 | BPF_MOV | BPF_K`.
const CALL: u8 = 0x85;
const MOV64_IMM: u8 = 0xb7;
/// `src_reg` of a call of a kernel function by BTF id (in the high nibble of the regs byte).
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const BPF_LDX: u8 = 0x01;
const BPF_MODE_MASK: u8 = 0xe0;
const BPF_MEM: u8 = 0x60;
const SHF_EXECINSTR: u64 = 0x4;
const SHT_NOBITS: u32 = 8;

/// Copies `object` and rewrites every placeholder load in its code sections with `offsets`.
/// A section that loads a field this kernel does not have (or cannot fit) is left as it was
/// and listed in [`Object::refused`], naming the field: the caller refuses the program in it
/// and keeps every other. Only an object that is not an ELF file fails whole.
pub fn patch(object: &[u8], offsets: &FieldOffsets) -> Result<Object, PatchError> {
    let mut copy = Object {
        words: vec![0; object.len().div_ceil(8)],
        len: object.len(),
        patched: 0,
        refused: Vec::new(),
    };
    copy.bytes_mut().copy_from_slice(object);
    for (name, range) in code_sections(object)? {
        let code = &mut copy.bytes_mut()[range.clone()];
        match patch_section(code, &name, offsets) {
            Ok(patched) => copy.patched += patched,
            Err(e) => {
                copy.bytes_mut()[range.clone()].copy_from_slice(&object[range]);
                copy.refused.push((name, e));
            }
        }
    }
    Ok(copy)
}

/// Patches one code section in place; the instructions rewritten.
fn patch_section(code: &mut [u8], name: &str, offsets: &FieldOffsets) -> Result<usize, PatchError> {
    let mut patched = 0;
    for insn in code.chunks_exact_mut(8) {
        if patch_cast(insn, offsets.cast) {
            patched += 1;
            continue;
        }
        let offset = i16::from_le_bytes([insn[2], insn[3]]);
        let Some(field) = Field::from_placeholder(offset) else {
            continue;
        };
        let opcode = insn[0];
        if opcode & BPF_CLASS_MASK != BPF_LDX || opcode & BPF_MODE_MASK != BPF_MEM {
            return Err(PatchError::NotALoad {
                field,
                code: opcode,
                section: name.to_string(),
            });
        }
        let real = offsets.get(field).ok_or(PatchError::Missing(field))?;
        let real = i16::try_from(real)
            .ok()
            .filter(|o| *o < brokerscope_common::fields::PLACEHOLDER_BASE)
            .ok_or(PatchError::TooLarge {
                field,
                offset: real,
            })?;
        insn[2..4].copy_from_slice(&real.to_le_bytes());
        patched += 1;
    }
    Ok(patched)
}

/// Rewrites `insn` if it is the cast's call or its type argument; whether it was.
fn patch_cast(insn: &mut [u8], cast: Cast) -> bool {
    let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
    let (regs, new) = match (insn[0], imm, cast) {
        (CALL, CAST_CALL_PLACEHOLDER, Cast::Kfunc { func, .. }) => {
            (BPF_PSEUDO_KFUNC_CALL << 4, func as i32)
        }
        (CALL, CAST_CALL_PLACEHOLDER, Cast::Helper) => (0, BPF_FUNC_SKC_TO_TCP_SOCK),
        (MOV64_IMM, CAST_TYPE_PLACEHOLDER, Cast::Kfunc { tcp_sock, .. }) => {
            (insn[1], tcp_sock as i32)
        }
        // The helper takes one argument: the move is left, harmless, with a zero.
        (MOV64_IMM, CAST_TYPE_PLACEHOLDER, Cast::Helper) => (insn[1], 0),
        _ => return false,
    };
    insn[1] = regs;
    insn[4..8].copy_from_slice(&new.to_le_bytes());
    true
}

/// Name and byte range of each section holding instructions.
fn code_sections(elf: &[u8]) -> Result<Vec<(String, std::ops::Range<usize>)>, PatchError> {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or(PatchError::Elf("truncated header"))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or(PatchError::Elf("truncated section header"))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or(PatchError::Elf("truncated section header"))
    };
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB.
    if elf.get(0..6) != Some(b"\x7fELF\x02\x01") {
        return Err(PatchError::Elf("bad identification"));
    }
    let table = u64_at(0x28)? as usize;
    let (entry, count, names) = (u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    if entry < 64 || names >= count {
        return Err(PatchError::Elf("bad section header table"));
    }
    let header = |i: usize| table + i * entry;
    let strings = u64_at(header(names) + 0x18)? as usize;
    let mut sections = Vec::new();
    for i in 0..count {
        let at = header(i);
        let (kind, flags) = (u32_at(at + 4)?, u64_at(at + 8)?);
        if flags & SHF_EXECINSTR == 0 || kind == SHT_NOBITS {
            continue;
        }
        let (start, size) = (u64_at(at + 0x18)? as usize, u64_at(at + 0x20)? as usize);
        if start.checked_add(size).is_none_or(|end| end > elf.len()) || !size.is_multiple_of(8) {
            return Err(PatchError::Elf("code section out of bounds"));
        }
        let name_at = strings + u32_at(at)? as usize;
        let name = elf
            .get(name_at..)
            .and_then(|rest| rest.split(|b| *b == 0).next())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .ok_or(PatchError::Elf("section name out of bounds"))?;
        sections.push((name, start..start + size));
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with a code section of `code` and a data section of `data`.
    fn elf(code: &[[u8; 8]], data: &[u8]) -> Vec<u8> {
        let names = b"\0.text\0.data\0.shstrtab\0";
        let mut out = vec![0u8; 64];
        out[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let code_at = out.len();
        out.extend(code.iter().flatten());
        let data_at = out.len();
        out.extend_from_slice(data);
        let names_at = out.len();
        out.extend_from_slice(names);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let table = out.len();
        out[0x28..0x30].copy_from_slice(&(table as u64).to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&3u16.to_le_bytes());
        let section = |name: u32, kind: u32, flags: u64, at: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&flags.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(at as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        out.extend_from_slice(&[0u8; 64]);
        out.extend_from_slice(&section(1, 1, 0x6, code_at, code.len() * 8));
        out.extend_from_slice(&section(7, 1, 0x3, data_at, data.len()));
        out.extend_from_slice(&section(13, 3, 0, names_at, names.len()));
        out
    }

    fn insn(code: u8, offset: i16) -> [u8; 8] {
        let mut i = [0u8; 8];
        i[0] = code;
        i[1] = 0x21;
        i[2..4].copy_from_slice(&offset.to_le_bytes());
        i
    }

    fn offsets(known: &[(Field, u32)]) -> FieldOffsets {
        let mut o = FieldOffsets {
            fields: [None; Field::ALL.len()],
            cast: Cast::Helper,
        };
        for (field, offset) in known {
            o.fields[*field as usize] = Some(*offset);
        }
        o
    }

    fn with_imm(code: u8, regs: u8, imm: i32) -> [u8; 8] {
        let mut i = [0u8; 8];
        i[0] = code;
        i[1] = regs;
        i[4..8].copy_from_slice(&imm.to_le_bytes());
        i
    }

    #[test]
    fn the_cast_becomes_the_kfunc_where_the_kernel_has_it_and_the_helper_elsewhere() {
        let code = [
            with_imm(MOV64_IMM, 0x02, CAST_TYPE_PLACEHOLDER), // r2 = placeholder
            with_imm(CALL, 0x00, CAST_CALL_PLACEHOLDER),      // call placeholder
            with_imm(CALL, 0x00, 14),                         // an ordinary helper call
            with_imm(MOV64_IMM, 0x02, 7),                     // an ordinary move
        ];
        let object = elf(&code, &[]);
        let mut kfunc = offsets(&[]);
        kfunc.cast = Cast::Kfunc {
            func: 52_000,
            tcp_sock: 9_000,
        };
        let patched = patch(&object, &kfunc).unwrap();
        assert_eq!(patched.patched, 2);
        let bytes = patched.bytes();
        assert_eq!(&bytes[64..72], &with_imm(MOV64_IMM, 0x02, 9_000));
        assert_eq!(&bytes[72..80], &with_imm(CALL, 0x20, 52_000));
        assert_eq!(&bytes[80..96], &object[80..96]);

        let patched = patch(&object, &offsets(&[])).unwrap();
        assert_eq!(patched.patched, 2);
        let bytes = patched.bytes();
        assert_eq!(&bytes[64..72], &with_imm(MOV64_IMM, 0x02, 0));
        assert_eq!(
            &bytes[72..80],
            &with_imm(CALL, 0x00, BPF_FUNC_SKC_TO_TCP_SOCK)
        );
        assert_eq!(&bytes[80..96], &object[80..96]);
    }

    fn offset_of(bytes: &[u8], insn_at: usize) -> i16 {
        i16::from_le_bytes([bytes[insn_at + 2], bytes[insn_at + 3]])
    }

    #[test]
    fn loads_get_the_kernels_offsets_and_nothing_else_changes() {
        let code = [
            insn(0x79, Field::TcpBytesAcked.placeholder()), // r1 = *(u64 *)(r2 + ph)
            insn(0x61, Field::TcpSrttUs.placeholder()),     // r1 = *(u32 *)(r2 + ph)
            insn(0x79, 16),                                 // an ordinary load
            insn(0x07, Field::SockNum.placeholder()),       // ALU with the same bits in off
        ];
        // Data that looks like a placeholder load is not code.
        let data = insn(0x79, Field::SockNum.placeholder());
        let object = elf(&code[..3], &data);
        let patched = patch(
            &object,
            &offsets(&[(Field::TcpBytesAcked, 1824), (Field::TcpSrttUs, 1680)]),
        )
        .unwrap();
        assert_eq!(patched.patched, 2);
        let bytes = patched.bytes();
        assert_eq!(bytes.len(), object.len());
        assert_eq!(patched.words.as_ptr() as usize % 8, 0);
        assert_eq!(offset_of(bytes, 64), 1824);
        assert_eq!(offset_of(bytes, 72), 1680);
        assert_eq!(offset_of(bytes, 80), 16);
        assert_eq!(&bytes[88..96], &data, "data sections are left alone");
        // Every byte but the two patched offsets is as it was.
        let unpatched = |b: &[u8]| -> Vec<u8> {
            let patched = |i: &usize| (66..68).contains(i) || (74..76).contains(i);
            b.iter()
                .enumerate()
                .filter(|(i, _)| !patched(i))
                .map(|(_, b)| *b)
                .collect()
        };
        assert_eq!(unpatched(&object), unpatched(bytes));

        // A placeholder anywhere but a load is a build mismatch, said with the field.
        let object = elf(&code, &[]);
        let all = offsets(&[
            (Field::TcpBytesAcked, 1824),
            (Field::TcpSrttUs, 1680),
            (Field::SockNum, 14),
        ]);
        assert_eq!(
            patch(&object, &all).unwrap().refused,
            vec![(
                ".text".to_string(),
                PatchError::NotALoad {
                    field: Field::SockNum,
                    code: 0x07,
                    section: ".text".into()
                }
            )]
        );
    }

    #[test]
    fn a_kernel_without_run_delay_still_patches_the_load_the_program_skips() {
        let tasks = ResourceOffsets {
            task_sum_exec: 232,
            task_run_delay: 3080,
            ..ResourceOffsets::UNSET
        };
        assert_eq!(run_delay_load(&tasks), 3080);
        let without = ResourceOffsets {
            task_run_delay: NO_FIELD,
            ..tasks
        };
        assert_eq!(run_delay_load(&without), 232);
    }

    #[test]
    fn a_field_the_kernel_lacks_or_cannot_fit_is_refused_by_name() {
        let object = elf(&[insn(0x79, Field::SockV6Daddr.placeholder())], &[]);
        let refused = |o: &FieldOffsets| patch(&object, o).unwrap().refused;
        assert_eq!(
            refused(&offsets(&[])),
            vec![(".text".to_string(), PatchError::Missing(Field::SockV6Daddr))]
        );
        assert_eq!(
            refused(&offsets(&[(Field::SockV6Daddr, 0x7f00)])),
            vec![(
                ".text".to_string(),
                PatchError::TooLarge {
                    field: Field::SockV6Daddr,
                    offset: 0x7f00
                }
            )]
        );
        // The refused section is left as it was.
        let copy = patch(&object, &offsets(&[])).unwrap();
        assert_eq!(copy.bytes(), &object[..]);
        assert!(copy.refusal("tp_btf/sched_switch").is_some());
        assert!(matches!(
            patch(b"not an elf file at all, just bytes", &offsets(&[])),
            Err(PatchError::Elf(_))
        ));
    }
}
