//! What the running kernel allows and what is attached to it, asked of the kernel directly,
//! never of the agent: the witnesses the hook-choice tests compare the agent's choices with.

use std::process::Command;

/// `bpf(2)` with a `union bpf_attr` prefix of `N` bytes.
fn sys_bpf<const N: usize>(cmd: libc::c_long, attr: &mut [u8; N]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid buffer of N bytes for the call; every pointer written into it
    // by the callers points at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), N) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// The BTF id of kernel function `name`, from `bpftool btf dump` of the kernel's BTF.
pub fn btf_func_id(name: &str) -> Option<u32> {
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file", "/sys/kernel/btf/vmlinux"])
        .output()
        .ok()?;
    let needle = format!("] FUNC '{name}' ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .and_then(|id| id.parse().ok())
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_PROG_TYPE_TRACING: u32 = 26;
/// `enum bpf_attach_type`.
pub const BPF_TRACE_ITER: u32 = 28;

/// Loads (and at once closes) the smallest program of type tracing with `attach_type` on
/// kernel function `func` (`bpf_iter_<target>` for an iterator): whether this kernel lets a
/// program of that kind load, asked the way the agent's loader would be answered.
pub fn tracing_program_loads(attach_type: u32, func: &str) -> std::io::Result<()> {
    let id = btf_func_id(func).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no BTF function {func}"),
        )
    })?;
    // r0 = 0; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_TRACING);
    put_u32(&mut attr, 4, 2);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 68, attach_type);
    put_u32(&mut attr, 108, id);
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the descriptor was just returned to us and is closed once.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Whether map-element iterators load here.
pub fn map_iterators_allowed() -> bool {
    tracing_program_loads(BPF_TRACE_ITER, "bpf_iter_bpf_map_elem").is_ok()
}

/// Whether tracepoint `category/name`'s record has `field` (tracefs).
pub fn tracepoint_has_field(category: &str, name: &str, field: &str) -> bool {
    std::fs::read_to_string(format!(
        "/sys/kernel/tracing/events/{category}/{name}/format"
    ))
    .is_ok_and(|f| {
        f.lines()
            .any(|l| l.contains(&format!(" {field};")) || l.contains(&format!(" {field}[")))
    })
}

/// Every perf-event link on the node that carries a tracepoint, as (program id, tracepoint
/// name), from the kernel's own link info (Linux 6.6+ names the tracepoint). `None` where the
/// kernel does not say which tracepoint some link is on.
pub fn tracepoint_links() -> Option<Vec<(u32, String)>> {
    const BPF_LINK_TYPE_PERF_EVENT: u32 = 7;
    const BPF_PERF_EVENT_TRACEPOINT: u32 = 5;
    let mut links = Vec::new();
    let mut saw_perf_link_without_name = false;
    let mut id = 0u32;
    loop {
        let mut attr = [0u8; 16];
        put_u32(&mut attr, 0, id);
        if sys_bpf(BPF_LINK_GET_NEXT_ID, &mut attr).is_err() {
            break;
        }
        id = get_u32(&attr, 4);
        let mut attr = [0u8; 16];
        put_u32(&mut attr, 0, id);
        let Ok(fd) = sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) else {
            continue;
        };
        // Asked twice: the type first, with nothing else set (the union's fields mean other
        // things for other link types), then a perf link's tracepoint name.
        let info_of = |info: &mut [u8; 64]| {
            let mut attr = [0u8; 16];
            put_u32(&mut attr, 0, fd as u32);
            put_u32(&mut attr, 4, info.len() as u32);
            put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
            sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        };
        let mut info = [0u8; 64];
        let is_perf = info_of(&mut info).is_ok() && get_u32(&info, 0) == BPF_LINK_TYPE_PERF_EVENT;
        let mut name = [0u8; 128];
        let mut info = [0u8; 64];
        put_u64(&mut info, 24, name.as_mut_ptr() as u64);
        put_u32(&mut info, 32, name.len() as u32);
        let got = if is_perf { info_of(&mut info) } else { Ok(0) };
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(fd as i32) };
        if !is_perf {
            continue;
        }
        if got.is_err() {
            // Kernels before 6.6 refuse the tracepoint name's buffer (E2BIG).
            saw_perf_link_without_name = true;
            continue;
        }
        let prog_id = get_u32(&info, 8);
        if get_u32(&info, 16) != BPF_PERF_EVENT_TRACEPOINT || get_u64(&info, 24) == 0 {
            saw_perf_link_without_name = true;
            continue;
        }
        let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        links.push((prog_id, String::from_utf8_lossy(&name[..len]).into_owned()));
    }
    (!saw_perf_link_without_name).then_some(links)
}

/// Asserts, from the kernel's link info, that none of `programs` (ids) is attached to a
/// syscall tracepoint; says so and passes where the kernel does not name link tracepoints
/// (before 6.6). The count of tracepoint links found among `programs`.
pub fn assert_no_syscall_tracepoint(programs: &[u32]) -> usize {
    let Some(links) = tracepoint_links() else {
        eprintln!(
            "this kernel's link info does not name tracepoints (before 6.6): no syscall check \
             from the kernel's side"
        );
        return 0;
    };
    let ours: Vec<&(u32, String)> = links
        .iter()
        .filter(|(prog, _)| programs.contains(prog))
        .collect();
    for (prog, tp) in &ours {
        assert!(
            !tp.starts_with("sys_enter_") && !tp.starts_with("sys_exit_"),
            "program {prog} is attached to syscall tracepoint {tp}"
        );
    }
    ours.len()
}
