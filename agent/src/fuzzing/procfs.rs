//! The /proc text parsers: `stat` (discovery's and the resource reader's), `status` Tgid,
//! `cgroup`'s `0::` line, `environ`, `/proc/stat` btime, `net/tcp{,6}` LISTEN lines, the
//! descriptor directory's getdents64 records and link targets, `limits`, `io`, PSI files and
//! `mountinfo`.
//!
//! The first byte picks the parser (`0`..`9`, see [`proc`]); most are driven twice: the raw bytes as the whole file
//! (no panic, and what comes out must be in the text), and a well-formed file whose
//! process-chosen parts (the command name, a mount point, a cgroup path, descriptor names) and
//! numbers come from the fuzzer, where the planted values must come back exactly.

use std::path::Path;

use crate::{
    kernel,
    proc::{self as discovery_proc, ProcFs, Stat},
    strimzi::{self, fds},
    usage::{self, ProcStats},
};

/// Fuzzer bytes read as fields.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        let n = self.0.len().min(8);
        bytes[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_le_bytes(bytes)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(self.0).into_owned()
    }
}

/// The pid whose files the fake /proc tree holds.
const PID: u32 = 4242;

pub fn proc(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let input = Input(rest);
    // An ASCII digit picks, so seeds read `0...`, `1...`; any byte picks something.
    match which.wrapping_sub(b'0') % 10 {
        0 => stat(input),
        1 => status(input),
        2 => cgroup(input),
        3 => environ(input),
        4 => btime(input),
        5 => net_tcp(input),
        6 => fd_dir(input),
        7 => limits_io_pressure(input),
        8 => mountinfo(input),
        _ => stat_raw(input),
    }
}

/// A fake /proc with `<PID>/<file>` holding `bytes` (and nothing else of that pid).
fn fake_proc(file: &str, bytes: &[u8]) -> ProcFs {
    let root = super::scratch::scratch("proc");
    let dir = root.join(PID.to_string());
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    super::scratch::write(&dir.join(file), bytes);
    ProcFs::at(root)
}

/// `/proc/<pid>/stat` with a fuzzed command name (the process chooses it: spaces, parentheses
/// and newlines included) and fuzzed numbers: both readers find the planted fields.
fn stat(mut input: Input<'_>) {
    let state = b"RSDZTtWXxKPI"[usize::from(input.u8()) % 12] as char;
    let start = input.u64();
    let rss_pages = input.u64();
    let minor = input.u64();
    // The kernel prints the thread count as a C `long`: never above i64::MAX.
    let threads = input.u64() >> 1;
    let comm = input.text();
    // Fields 4.. of proc(5), numbered as there: index n holds field n.
    let mut fields = vec![0u64; 53];
    for (n, f) in fields.iter_mut().enumerate() {
        *f = n as u64;
    }
    fields[10] = minor;
    fields[12] = minor / 3;
    fields[20] = threads;
    fields[22] = start;
    fields[24] = rss_pages;
    let numbers: Vec<String> = fields[4..].iter().map(u64::to_string).collect();
    let line = format!("{PID} ({comm}) {state} {}\n", numbers.join(" "));

    assert_eq!(
        discovery_proc::parse_stat(&line),
        Some(Stat {
            start_ticks: start,
            state
        }),
        "{line:?}"
    );
    let mut s = ProcStats::default();
    usage::parse_stat(&line, 4096, &mut s);
    assert_eq!(s.minor_faults, Some(minor));
    assert_eq!(s.major_faults, Some(minor / 3));
    assert_eq!(s.threads, Some(threads));
    // Pages beyond what bytes can count are not a size.
    assert_eq!(s.rss_bytes, rss_pages.checked_mul(4096));

    // Through the file, as discovery reads it.
    let proc = fake_proc("stat", line.as_bytes());
    match proc.stat(PID) {
        Ok(got) => assert_eq!((got.state, got.start_ticks), (state, start)),
        Err(e) => panic!("{e}"),
    }
}

/// Any text as a stat line: no panic, and a parsed state is the character right after the
/// last `) ` (the kernel writes `pid (comm) state ...`, one space apart).
fn stat_raw(input: Input<'_>) {
    let text = input.text();
    if let Some(stat) = discovery_proc::parse_stat(&text) {
        let line = text.trim();
        let after = &line[line.rfind(')').expect("parsed lines have a `)`") + 1..];
        let state = after.strip_prefix(' ').and_then(|a| a.chars().next());
        assert_eq!(state, Some(stat.state), "{text:?}");
    }
    let mut s = ProcStats::default();
    usage::parse_stat(&text, 4096, &mut s);
    if let Some(rss) = s.rss_bytes {
        assert_eq!(rss % 4096, 0);
    }
}

/// `status`: any text; a Tgid found is on a `Tgid:` line. Then a real-looking file whose
/// `Name:` is fuzzed (the kernel escapes its newlines): its Tgid is found.
fn status(mut input: Input<'_>) {
    let tgid = u32::from_le_bytes([input.u8(), input.u8(), input.u8(), input.u8()]);
    let raw = input.0;
    let text = String::from_utf8_lossy(raw);
    if let Ok(n) = fake_proc("status", raw).tgid(PID) {
        assert!(
            text.lines()
                .any(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok()) == Some(n)),
            "Tgid {n} not in {text:?}"
        );
    }
    let name = text.replace('\\', "\\\\").replace('\n', "\\n");
    let file = format!(
        "Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{tgid}\nNgid:\t0\nPid:\t{tgid}\n"
    );
    match fake_proc("status", file.as_bytes()).tgid(PID) {
        Ok(n) => assert_eq!(n, tgid, "{file:?}"),
        Err(e) => panic!("{e}: {file:?}"),
    }
}

/// `cgroup`: any text; a path found is that of a `0::` line. Then v1 lines and a `0::` line
/// with a fuzzed path: that path is found.
fn cgroup(input: Input<'_>) {
    let text = input.text();
    if let Ok(path) = fake_proc("cgroup", text.as_bytes()).cgroup2_path(PID) {
        assert!(
            text.lines().any(|l| l == format!("0::{path}")),
            "{path:?} not in {text:?}"
        );
    }
    let path = text.replace(['\n', '\r'], "");
    let file = format!("12:memory:/kubepods\n1:name=systemd:/init.scope\n0::{path}\n");
    match fake_proc("cgroup", file.as_bytes()).cgroup2_path(PID) {
        Ok(got) => assert_eq!(got, path),
        Err(e) => panic!("{e}: {file:?}"),
    }
}

/// `environ`: NUL-separated `NAME=value` pairs. The variable named by the first line (or
/// HOSTNAME) is the first entry starting with `NAME=`; a longer name sharing the prefix is not
/// it.
fn environ(input: Input<'_>) {
    let (name, bytes) = super::scratch::first_line(input.0);
    let name = match std::str::from_utf8(name) {
        Ok(n) if !n.is_empty() && !n.contains(['=', '\0']) => n,
        _ => "HOSTNAME",
    };
    let got = match fake_proc("environ", bytes).env_var(PID, name) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let prefix = format!("{name}=");
    let want = bytes
        .split(|&b| b == 0)
        .find(|kv| kv.starts_with(prefix.as_bytes()))
        .map(|kv| String::from_utf8_lossy(&kv[prefix.len()..]).into_owned());
    assert_eq!(got, want);
    // Planted after a decoy whose name only starts with ours.
    let value: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0).collect();
    let mut planted = format!("{name}X=decoy\0{prefix}").into_bytes();
    planted.extend_from_slice(&value);
    planted.extend_from_slice(b"\0LANG=C.UTF-8\0");
    match fake_proc("environ", &planted).env_var(PID, name) {
        Ok(v) => assert_eq!(v, Some(String::from_utf8_lossy(&value).into_owned())),
        Err(e) => panic!("{e}"),
    }
}

/// `/proc/stat`: the boot time is a `btime` line's number.
fn btime(mut input: Input<'_>) {
    let planted = input.u64();
    let text = input.text();
    let root = super::scratch::scratch("proc");
    super::scratch::write(&root.join("stat"), text.as_bytes());
    let proc = ProcFs::at(root.clone());
    if let Some(b) = discovery_proc::boot_time(&proc) {
        assert!(
            text.lines()
                .any(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()) == Some(b)),
            "btime {b} not in {text:?}"
        );
    }
    let file = format!(
        "cpu  1 2 3 4 5 6 7 0 0 0\ncpu0 1 2 3 4 5 6 7 0 0 0\nintr 1 2 3\nctxt 99\nbtime {planted}\nprocesses 7\n"
    );
    super::scratch::write(&root.join("stat"), file.as_bytes());
    assert_eq!(discovery_proc::boot_time(&proc), Some(planted));
}

/// `/proc/<pid>/net/tcp{,6}` lines: the local port of a LISTEN (`0A`) line, nothing else.
fn net_tcp(mut input: Input<'_>) {
    let port = u16::from_le_bytes([input.u8(), input.u8()]);
    let st = input.u8();
    let v6 = input.u8() % 2 == 1;
    let raw = input.text();
    for line in raw.lines() {
        if strimzi::listen_port(line).is_some() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.get(3), Some(&"0A"), "{line:?}");
        }
    }
    let addr = if v6 {
        "00000000000000000000000001000000"
    } else {
        "0100007F"
    };
    let line = format!(
        "  {st}: {addr}:{port:04X} {addr}:0000 {st:02X} 00000000:00000000 00:00000000 00000000   1000        0 123456 1 0000000000000000 100 0 0 10 0"
    );
    assert_eq!(
        strimzi::listen_port(&line),
        (st == 0x0A).then_some(port),
        "{line:?}"
    );
}

/// `/proc/<pid>/fd`: getdents64 records (any bytes: the walk ends, each record consumed), names
/// planted in well-formed records come back, and only descriptor numbers count. Link targets:
/// only plain absolute paths pass.
fn fd_dir(input: Input<'_>) {
    let mut rest = input.0;
    let mut steps = 0;
    while let Some((name, next)) = fds::next_dirent(rest) {
        assert!(next.len() < rest.len(), "no progress");
        assert!(!name.contains(&0));
        rest = next;
        steps += 1;
    }
    assert!(steps <= input.0.len() / 20);

    if let Some(path) = fds::target_path(input.0) {
        assert!(path.starts_with('/') && !path.ends_with(" (deleted)") && !path.contains('\0'));
        assert!(path.len() < libc::PATH_MAX as usize);
    }

    // Names without NUL, one record each, padded to 8 bytes as the kernel does.
    let names: Vec<&[u8]> = input
        .0
        .split(|&b| b == b'/' || b == 0)
        .filter(|n| !n.is_empty() && n.len() <= 255)
        .collect();
    let mut records = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let reclen = (19 + name.len() + 1).div_ceil(8) * 8;
        records.extend_from_slice(&(i as u64 + 1).to_ne_bytes());
        records.extend_from_slice(&(i as u64 + 1).to_ne_bytes());
        records.extend_from_slice(&(reclen as u16).to_ne_bytes());
        records.push(10);
        records.extend_from_slice(name);
        records.resize(records.len() + reclen - 19 - name.len(), 0);
    }
    let mut got = Vec::new();
    let mut rest = records.as_slice();
    while let Some((name, next)) = fds::next_dirent(rest) {
        got.push(name);
        rest = next;
    }
    assert_eq!(got, names);
    for name in names {
        let want = (name.len() <= 10 && name.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(name).ok()?.parse::<u32>().ok())
            .flatten();
        assert_eq!(fds::parse_fd(name), want, "{name:?}");
    }
}

/// `limits`, `io` and PSI files: any text, then planted lines.
fn limits_io_pressure(mut input: Input<'_>) {
    let soft = input.u64();
    let bytes = input.u64();
    let total = input.u64();
    let text = input.text();
    let _ = usage::parse_max_fds(&text);
    let _ = usage::field(&text, "read_bytes:");
    for (kind, secs) in usage::parse_pressure(&text) {
        assert!(kind == "some" || kind == "full");
        assert!(secs >= 0.0 && secs.is_finite());
    }

    let limits = format!(
        "Limit                     Soft Limit           Hard Limit           Units\n\
         Max cpu time              unlimited            unlimited            seconds\n\
         Max open files            {soft}              {soft}              files\n"
    );
    assert_eq!(usage::parse_max_fds(&limits), Some(soft));
    let io = format!("rchar: 1\nwchar: 2\nsyscr: 3\nread_bytes: {bytes}\nwrite_bytes: 0\n");
    assert_eq!(usage::field(&io, "read_bytes:"), Some(bytes));
    let psi = format!(
        "some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    );
    assert_eq!(
        usage::parse_pressure(&psi),
        vec![("some", total as f64 / 1e6), ("full", 0.0)]
    );
}

/// `mountinfo`: a fuzzed (absolute) mount point, escaped as the kernel does (`\040` for a space, ...),
/// comes back decoded, with its filesystem type; any text yields at most one mount a line.
fn mountinfo(input: Input<'_>) {
    let text = input.text();
    assert!(kernel::parse_mountinfo(&text).len() <= text.lines().count());

    let (point, fstype) = text.split_once('\n').unwrap_or((&text, "ext4"));
    let fstype: String = fstype
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '\\')
        .collect();
    let fstype = if fstype.is_empty() {
        "tmpfs".into()
    } else {
        fstype
    };
    let mut escaped = String::new();
    for c in point.chars() {
        match c {
            ' ' => escaped.push_str("\\040"),
            '\t' => escaped.push_str("\\011"),
            '\n' => escaped.push_str("\\012"),
            '\\' => escaped.push_str("\\134"),
            c => escaped.push(c),
        }
    }
    // A mount point is an absolute path: a lone `-` field can only be the separator.
    let point = format!("/{point}");
    let escaped = format!("/{escaped}");
    let file = format!(
        "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
         36 35 98:0 /mnt1 {escaped} rw,noatime master:1 - {fstype} /dev/root rw,errors=continue\n"
    );
    let mounts = kernel::parse_mountinfo(&file);
    assert_eq!(mounts.len(), 2, "{file:?}");
    assert_eq!(mounts[1].mount_point, Path::new(&point), "{file:?}");
    assert_eq!(mounts[1].fstype, fstype);
}
