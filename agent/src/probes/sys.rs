//! The raw `bpf(2)` call, for what aya does not wrap (batched lookups, pins, map iterators,
//! program info). A leaf.

/// The `bpf(2)` system call with `attr` as its `union bpf_attr` (a prefix of it, sized as `A`).
///
/// # Safety
/// Every pointer inside `attr` must be valid for what `cmd` makes the kernel read or write
/// through it, for the duration of the call.
/// Some commands write results back into `attr` itself, hence `&mut`.
pub(super) unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, exclusive reference of `size_of::<A>()` bytes; the caller
    // vouches for the pointers it holds.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
