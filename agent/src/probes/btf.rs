//! Just enough of a BTF reader to find struct member offsets in the running kernel.
//!
//! The kernel programs chase `struct sock -> struct net -> inum` with `bpf_probe_read_kernel`;
//! the offsets differ between kernels and configs, so the loader resolves them here from
//! /sys/kernel/btf/vmlinux at load time (the CO-RE idea, done in userspace). Format:
//! Documentation/bpf/btf.rst.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF is truncated or malformed at byte {at}")]
    Malformed { at: usize },
    #[error("BTF has bad magic {magic:#x}")]
    Magic { magic: u16 },
    #[error("BTF has no struct named `{name}`")]
    NoStruct { name: String },
    #[error("struct `{ty}` has no member `{member}` in this kernel's BTF")]
    NoMember { ty: String, member: String },
    #[error("BTF has no enumerator `{name}`")]
    NoEnumerator { name: String },
    #[error("member `{member}` of `{ty}` is a bitfield or not byte-aligned")]
    Unaligned { ty: String, member: String },
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset in the containing struct.
    bit_offset: u32,
    bitfield: bool,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// For modifiers, typedefs and pointers: the referenced type.
    ty: u32,
    members: Vec<Member>,
    /// For enums: (name, value).
    enumerators: Vec<(u32, i64)>,
}

/// Parsed type graph (only structs, unions and the modifiers between them keep detail).
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; id 0 is void.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed { at })
}

impl Btf {
    /// Parses little-endian BTF (the only kind an x86_64/arm64 kernel produces).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let (strings, types_start, types_end) = Self::sections(data)?;
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            ty: 0,
            members: Vec::new(),
            enumerators: Vec::new(),
        }];
        let mut at = types_start;
        while at < types_end {
            let (ty, next) = Self::parse_type(data, at)?;
            types.push(ty);
            at = next;
        }

        let mut btf = Btf {
            strings,
            types,
            structs_by_name: HashMap::new(),
        };
        btf.structs_by_name = btf.index_structs();
        Ok(btf)
    }

    /// Checks the header; the string section, and where the type section starts and ends.
    fn sections(data: &[u8]) -> Result<(Vec<u8>, usize, usize), BtfError> {
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        match magic {
            Some(0xeb9f) => {}
            Some(magic) => return Err(BtfError::Magic { magic }),
            None => return Err(BtfError::Malformed { at: 0 }),
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed {
                at: hdr_len + str_off,
            })?
            .to_vec();
        if types_end > data.len() {
            return Err(BtfError::Malformed { at: types_end });
        }
        Ok((strings, types_start, types_end))
    }

    /// The type record at `at`, and where the next one starts.
    fn parse_type(data: &[u8], mut at: usize) -> Result<(Type, usize), BtfError> {
        let name = u32_at(data, at)?;
        let info = u32_at(data, at + 4)?;
        let size_or_type = u32_at(data, at + 8)?;
        at += 12;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let mut members = Vec::new();
        let mut enumerators = Vec::new();
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION => {
                for i in 0..vlen {
                    let m = at + i * 12;
                    let offset = u32_at(data, m + 8)?;
                    let (bit_offset, bitfield) = if kind_flag {
                        (offset & 0x00ff_ffff, offset >> 24 != 0)
                    } else {
                        (offset, false)
                    };
                    members.push(Member {
                        name: u32_at(data, m)?,
                        ty: u32_at(data, m + 4)?,
                        bit_offset,
                        bitfield,
                    });
                }
                vlen * 12
            }
            KIND_ENUM => {
                for i in 0..vlen {
                    let e = at + i * 8;
                    enumerators.push((u32_at(data, e)?, i64::from(u32_at(data, e + 4)? as i32)));
                }
                vlen * 8
            }
            KIND_FUNC_PROTO => vlen * 8,
            KIND_DATASEC | KIND_ENUM64 => vlen * 12,
            KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
            | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
            _ => return Err(BtfError::Malformed { at: at - 12 }),
        };
        at += extra;
        let ty = Type {
            name,
            kind,
            ty: size_or_type,
            members,
            enumerators,
        };
        Ok((ty, at))
    }

    /// Struct type ids by name.
    fn index_structs(&self) -> HashMap<String, u32> {
        let mut by_name = HashMap::new();
        for (id, ty) in self.types.iter().enumerate() {
            if ty.kind == KIND_STRUCT && ty.name != 0 {
                // The first complete definition wins; kernel BTF has one per name.
                by_name
                    .entry(self.str_at(ty.name).to_string())
                    .or_insert(id as u32);
            }
        }
        by_name
    }

    fn str_at(&self, offset: u32) -> &str {
        let start = offset as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and const/volatile/restrict/type-tag modifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.ty
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` in struct or union `id`, searching anonymous members too.
    /// Returns the offset and the member's type id.
    fn member(&self, id: u32, member: &str) -> Option<(u32, u32, bool)> {
        let ty = self.types.get(self.resolve(id) as usize)?;
        if ty.kind != KIND_STRUCT && ty.kind != KIND_UNION {
            return None;
        }
        for m in &ty.members {
            if m.name != 0 && self.str_at(m.name) == member {
                return Some((m.bit_offset, m.ty, m.bitfield || m.bit_offset % 8 != 0));
            }
        }
        for m in ty.members.iter().filter(|m| m.name == 0) {
            if let Some((bits, t, bad)) = self.member(m.ty, member) {
                return Some((m.bit_offset + bits, t, bad));
            }
        }
        None
    }

    /// The value of enumerator `name` (e.g. `SOCK_DONE` of `enum sock_flags`).
    pub fn enum_value(&self, name: &str) -> Result<i64, BtfError> {
        self.types
            .iter()
            .filter(|t| t.kind == KIND_ENUM)
            .flat_map(|t| t.enumerators.iter())
            .find(|(n, _)| self.str_at(*n) == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| BtfError::NoEnumerator { name: name.into() })
    }

    /// The type id of `struct <name>`.
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        self.structs_by_name.get(name).copied()
    }

    /// The type id of function `name`: what a call of it as a kfunc names.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_FUNC && self.str_at(t.name) == name)
            .map(|id| id as u32)
    }

    /// Byte offset of a member path such as `["__sk_common", "skc_net", "net"]` inside
    /// `struct <ty>`. Every step must be an embedded struct/union, not a pointer.
    pub fn offset_of(&self, ty: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut id = *self
            .structs_by_name
            .get(ty)
            .ok_or_else(|| BtfError::NoStruct { name: ty.into() })?;
        let mut bits = 0;
        let mut parent = ty.to_string();
        for step in path {
            let (offset, member_ty, unaligned) =
                self.member(id, step).ok_or_else(|| BtfError::NoMember {
                    ty: parent.clone(),
                    member: (*step).into(),
                })?;
            if unaligned {
                return Err(BtfError::Unaligned {
                    ty: parent,
                    member: (*step).into(),
                });
            }
            bits += offset;
            id = member_ty;
            parent = (*step).to_string();
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob by hand: `struct inner { int a; union { int b; int c; }; }` and
    /// `struct outer { long pad; const struct inner in; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0c\0outer\0pad\0in\0long\0";
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        push(&[s("int"), info(KIND_INT, 0), 4, 32]); // 1: int
        push(&[0, info(KIND_UNION, 2), 4, s("b"), 1, 0, s("c"), 1, 0]); // 2: anon union
        push(&[s("inner"), info(KIND_STRUCT, 2), 8, s("a"), 1, 0, 0, 2, 32]); // 3: inner
        push(&[s("long"), info(KIND_INT, 0), 8, 64]); // 4: long
        push(&[0, info(KIND_CONST, 0), 3]); // 5: const inner
        push(&[
            s("outer"),
            info(KIND_STRUCT, 2),
            16,
            s("pad"),
            4,
            0,
            s("in"),
            5,
            64,
        ]); // 6
        let mut blob = Vec::new();
        for w in [
            0xeb9f_u32 | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
        ] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn offsets_through_modifiers_and_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.offset_of("outer", &["pad"]).unwrap(), 0);
        assert_eq!(btf.offset_of("outer", &["in"]).unwrap(), 8);
        assert_eq!(btf.offset_of("outer", &["in", "a"]).unwrap(), 8);
        assert_eq!(btf.offset_of("outer", &["in", "c"]).unwrap(), 12);
    }

    #[test]
    fn missing_names_are_errors() {
        let btf = Btf::parse(&sample()).unwrap();
        assert!(matches!(
            btf.offset_of("nope", &[]),
            Err(BtfError::NoStruct { .. })
        ));
        assert!(matches!(
            btf.offset_of("outer", &["in", "zz"]),
            Err(BtfError::NoMember { .. })
        ));
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let blob = sample();
        for len in [0, 1, 3, 10, 30, blob.len() - 1] {
            assert!(Btf::parse(&blob[..len]).is_err(), "len {len}");
        }
        assert!(matches!(
            Btf::parse(&[0, 0, 0, 0]),
            Err(BtfError::Magic { .. })
        ));
    }

    #[test]
    fn running_kernel_has_the_socket_path() {
        let Ok(data) = std::fs::read(crate::kernel::BTF_PATH) else {
            eprintln!("skipped: no {} on this machine", crate::kernel::BTF_PATH);
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        let net = btf
            .offset_of("sock", &["__sk_common", "skc_net", "net"])
            .unwrap();
        let inum = btf.offset_of("net", &["ns", "inum"]).unwrap();
        assert_eq!(btf.enum_value("SOCK_DONE").unwrap(), 1);
        assert_eq!(btf.enum_value("TCP_LISTEN").unwrap(), 10);
        assert!(net > 0 && net < 512, "{net}");
        assert!(inum < 4096, "{inum}");
    }
}
