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

/// `sk`, a typed socket pointer, as a `struct tcp_sock *` for direct loads of its TCP fields:
/// a call the loader patches (see `brokerscope_common::fields::CAST_CALL_PLACEHOLDER`) into the
/// `bpf_rdonly_cast` kfunc, which costs a register move, or into the `bpf_skc_to_tcp_sock`
/// helper. The kfunc checks nothing: the caller checks the socket's protocol first, and the
/// result is 0 only from the helper, for a socket that is not a full TCP one.
#[inline(always)]
pub fn tcp_sock(sk: u64) -> u64 {
    let tp: u64;
    // SAFETY: a call of one of the two functions above with the socket and a constant type
    // id; it clobbers the argument registers, as declared, and reads no memory of ours.
    unsafe {
        core::arch::asm!(
            "r2 = {type_id}",
            "call {call}",
            type_id = const brokerscope_common::fields::CAST_TYPE_PLACEHOLDER,
            call = const brokerscope_common::fields::CAST_CALL_PLACEHOLDER,
            inout("r1") sk => _,
            lateout("r0") tp,
            out("r2") _,
            out("r3") _,
            out("r4") _,
            out("r5") _,
            options(nostack),
        )
    };
    tp
}

/// Zero, as a value the compiler cannot see through. Stores of constant zeros side by side (the
/// rest of a struct built with `..Default::default()`) are merged by LLVM into a `memset`, which
/// the BPF backend leaves as a call to a byte-by-byte subprogram: a loop of four instructions per
/// byte, then a return through the kernel's return thunk. Stores of this value stay single
/// 8-byte stores.
#[inline(always)]
pub fn opaque_zero() -> u64 {
    let zero: u64;
    // SAFETY: sets one register; touches no memory.
    unsafe {
        core::arch::asm!(
            "{zero} = 0",
            zero = lateout(reg) zero,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    zero
}
