//! BPF iterators over a map's elements (`iter/bpf_map_elem`), which aya does not attach: the
//! link is created once with the map as its target, and each read instantiates the iterator
//! and reads it whole. A map iterator sees every network namespace at once, so unlike the
//! socket iterator it needs no thread inside a namespace.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type::BPF_TRACE_ITER, bpf_cmd};

/// An attached map iterator.
pub struct MapIter {
    link: OwnedFd,
}

fn bpf<A>(cmd: bpf_cmd, attr: &mut A) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix for `cmd` whose pointers (the link's
    // iterator info) outlive the call; the kernel only reads through them.
    let fd = unsafe { super::sys::sys_bpf(cmd as libc::c_long, attr) }?;
    // SAFETY: the call returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl MapIter {
    /// Links iterator program `prog` (loaded for `bpf_map_elem`) to `map`.
    pub fn attach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> std::io::Result<Self> {
        /// `union bpf_iter_link_info`: its `map.map_fd` member, zero-padded to the union's size.
        #[repr(C)]
        struct IterLinkInfo {
            map_fd: u32,
            _rest: [u32; 3],
        }
        /// `union bpf_attr` as BPF_LINK_CREATE reads it for an iterator.
        #[repr(C)]
        struct LinkCreate {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
            iter_info: u64,
            iter_info_len: u32,
            _pad: u32,
        }
        let info = IterLinkInfo {
            map_fd: map.as_raw_fd() as u32,
            _rest: [0; 3],
        };
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: 0,
            attach_type: BPF_TRACE_ITER as u32,
            flags: 0,
            iter_info: std::ptr::from_ref(&info) as u64,
            iter_info_len: size_of::<IterLinkInfo>() as u32,
            _pad: 0,
        };
        let link = bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?;
        Ok(Self { link })
    }

    /// A new instance of the iterator: reading it walks the whole map.
    pub fn open(&self) -> std::io::Result<File> {
        /// `union bpf_attr` as BPF_ITER_CREATE reads it.
        #[repr(C)]
        struct IterCreate {
            link_fd: u32,
            flags: u32,
        }
        let mut attr = IterCreate {
            link_fd: self.link.as_fd().as_raw_fd() as u32,
            flags: 0,
        };
        Ok(File::from(bpf(bpf_cmd::BPF_ITER_CREATE, &mut attr)?))
    }
}
