//! Direct loads of kernel fields at offsets the loader patches in (see
//! `brokerscope_common::fields`).

/// `load!(u32, ptr, Field::TcpSrttUs)`: one load instruction of a `u32` at the field's offset
/// from `ptr`, a typed kernel pointer the verifier knows: a BTF tracepoint's argument, a pointer
/// a helper returned from one, or a pointer loaded through one. The offset compiled in is the
/// field's placeholder; the loader writes the real one before the object is loaded.
macro_rules! load {
    ($ty:ident, $base:expr, $field:expr) => {{
        let value: u64;
        // SAFETY: a load through a BTF-typed pointer: the verifier checks the offset and size
        // against the struct's BTF, and the kernel's exception table turns a fault into a zero.
        unsafe {
            core::arch::asm!(
                concat!("{value} = *(", stringify!($ty), " *)({base} + {offset})"),
                value = lateout(reg) value,
                base = in(reg) $base,
                offset = const $field.placeholder(),
                options(readonly, nostack, preserves_flags),
            )
        };
        value as $ty
    }};
}

pub(crate) use load;
