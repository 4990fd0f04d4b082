//! A stand-in Kafka broker for the end-to-end tests: a real process whose command line looks
//! like a broker's (`fake-broker kafka.Kafka /path/server.properties [--override k=v ...]`), that
//! reads a real server.properties, listens on its `listeners`, and serves a tiny protocol.
//!
//! Protocol (big-endian), any number of requests per connection:
//! - `b'R'`, u32 request length N, u32 response length M, N bytes → M bytes of `b'x'`.
//! - `b'F'`, u16 path length, path → u64 file length L, then the file's L bytes by sendfile(2)
//!   (so kernel byte counters can be checked against a sendfile of known size).
//!
//! Prints `pid <pid>`, `listening <name> <port>` per listener, then `ready` on stdout, and exits
//! when stdin closes. Like a JVM (`-XX:+MaxFDLimit`), it raises its open-file limit to the hard
//! limit first, so it can hold thousands of segments open.
//!
//! Options after the properties path, for the broker-state and resources tests:
//! - `--defer-listen`: print `ready` without listening; the `listen` command listens later.
//! - `--term-wait-ms N`: on SIGTERM (caught by a handler, as a JVM does), print `sigterm`, wait
//!   N ms, then exit 0.
//!
//! Commands on stdin, one per line, each answered by one line when done:
//! - `listen` → `listening <name> <port>`... then `listened`.
//! - `recover MS` → opens every `*.log` under `log.dirs` (sorted), one every MS ms, keeping them
//!   open, as Kafka's log recovery does → `recovered <n>`.
//! - `recover-step` → opens the next of those → `opened <path>`, or `recovered` when none is
//!   left. Every segment opened stays open until exit (Kafka keeps each loaded segment's `.log`
//!   FileChannel), so a test can pause recovery after k of n segments and know what is held.
//! - `recover-step N` → opens the next N (fewer when fewer are left) → `opened <count>`, or
//!   `recovered` when none is left.
//! - `burn MS` → spins until its thread had MS ms of CPU → `burned`.
//! - `fsync N PATH` / `fdatasync N PATH` → writes a byte and syncs PATH N times → `synced N`.
//! - `direct PATH BYTES` → writes BYTES (a multiple of 4096) to PATH with O_DIRECT in 64 KiB
//!   blocks, then reads them back → `direct BYTES`.
//! - `threads N STRIDE` → starts N threads whose ids are equal modulo STRIDE (choosing each id
//!   through `/proc/sys/kernel/ns_last_pid`, so it needs root; a thread that got another id
//!   returns at once), has each sleep 1 ms 50 times, and joins them → `threads [<id>, ...]
//!   spawned <threads started, those included>`.
//! - `switches` → `switches <n>`: the process's context switches so far, voluntary and not
//!   (getrusage, its exited threads' included).
//!
//! With `FAKE_BROKER_SKIP_PROPERTIES` set it does not read the file at all (the hostile-input
//! tests name FIFOs and devices). A missing
//! properties file is not fatal (discovery must still list the process): it then listens on
//! nothing. Which network namespace it runs in is the caller's choice (`ip netns exec`).

use std::{
    collections::HashMap,
    io::{self, BufRead as _, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(main_class) = args.iter().position(|a| a == "kafka.Kafka") else {
        eprintln!("usage: fake-broker kafka.Kafka SERVER_PROPERTIES [--override key=value]...");
        std::process::exit(2);
    };
    let Some(path) = args.get(main_class + 1) else {
        eprintln!("fake-broker: no properties file after kafka.Kafka");
        std::process::exit(2);
    };
    let skip = std::env::var_os("FAKE_BROKER_SKIP_PROPERTIES").is_some();
    let read = |path: &str| {
        if skip {
            Err(io::Error::other("not read (FAKE_BROKER_SKIP_PROPERTIES)"))
        } else {
            std::fs::read_to_string(path)
        }
    };
    let mut props = match read(path) {
        Ok(text) => parse_properties(&text),
        Err(e) => {
            eprintln!("fake-broker: cannot read {path}: {e}; listening on nothing");
            HashMap::new()
        }
    };
    let mut rest = args[main_class + 2..].iter();
    let mut defer_listen = false;
    while let Some(arg) = rest.next() {
        if arg == "--override"
            && let Some((k, v)) = rest.next().and_then(|kv| kv.split_once('='))
        {
            props.insert(k.to_string(), v.to_string());
        } else if arg == "--defer-listen" {
            defer_listen = true;
        } else if arg == "--term-wait-ms"
            && let Some(ms) = rest.next().and_then(|v| v.parse::<u64>().ok())
        {
            on_sigterm_wait(ms);
        }
    }

    raise_nofile();
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "pid {}", std::process::id());
    if !defer_listen {
        listen(&props, &mut out);
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    drop(out);
    // Serve until killed, or until stdin closes: a test that dies without killing us (its
    // pipe closes) leaves nothing behind. Run by hand as `sleep inf | fake-broker ...`.
    let mut line = String::new();
    let stdin = io::stdin();
    let mut recovery = Recovery::default();
    while stdin.lock().read_line(&mut line).is_ok_and(|n| n > 0) {
        let answer = command(&props, &mut recovery, line.trim());
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
        line.clear();
    }
}

/// Soft RLIMIT_NOFILE up to the hard limit, as the JVM does at start.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the calls to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

static SIGTERM_SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    SIGTERM_SEEN.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Catches SIGTERM with a handler (so the kernel delivers it, as to a JVM), then waits `ms` and
/// exits 0.
fn on_sigterm_wait(ms: u64) {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); sigaction is given a
    // zeroed, then filled, struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        while !SIGTERM_SEEN.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        println!("sigterm");
        std::thread::sleep(std::time::Duration::from_millis(ms));
        std::process::exit(0);
    });
}

/// Segments opened one command at a time (`recover-step`), kept open.
#[derive(Default)]
struct Recovery {
    segments: Option<Vec<std::path::PathBuf>>,
    open: Vec<std::fs::File>,
}

/// Every `*.log` under `log.dirs` (else `log.dir`), sorted.
fn segments(props: &HashMap<String, String>) -> Vec<std::path::PathBuf> {
    let dirs = props
        .get("log.dirs")
        .or_else(|| props.get("log.dir"))
        .cloned()
        .unwrap_or_default();
    let mut segments = Vec::new();
    for dir in dirs.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        for part in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(part.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.file_name().to_string_lossy().ends_with(".log") {
                    segments.push(f.path());
                }
            }
        }
    }
    segments.sort();
    segments
}

fn command(props: &HashMap<String, String>, recovery: &mut Recovery, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["recover-step"] => recover_step(props, recovery),
        ["recover-step", n] => recover_steps(props, recovery, n.parse().unwrap_or(1)),
        ["listen"] => {
            let mut out = io::stdout().lock();
            listen(props, &mut out);
            "listened".into()
        }
        ["recover", ms] => recover(props, ms.parse().unwrap_or(100)),
        ["burn", ms] => burn(std::time::Duration::from_millis(ms.parse().unwrap_or(0))),
        [kind @ ("fsync" | "fdatasync"), n, path] => sync(kind, n.parse().unwrap_or(0), path),
        ["direct", path, bytes] => match direct_io(path, bytes.parse().unwrap_or(0)) {
            Ok(n) => format!("direct {n}"),
            Err(e) => format!("error {e}"),
        },
        ["threads", n, stride] => {
            match one_set_threads(n.parse().unwrap_or(0), stride.parse().unwrap_or(0)) {
                Ok((tids, spawned)) => format!("threads {tids:?} spawned {spawned}"),
                Err(e) => format!("error {e}"),
            }
        }
        ["switches"] => {
            // SAFETY: an all-zero rusage is valid, and getrusage fills it.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: `usage` is a valid rusage to fill.
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
            format!("switches {}", usage.ru_nvcsw + usage.ru_nivcsw)
        }
        _ => format!("error unknown command {line}"),
    }
}

/// `recover-step`: opens the next segment.
fn recover_step(props: &HashMap<String, String>, recovery: &mut Recovery) -> String {
    let all = recovery.segments.get_or_insert_with(|| segments(props));
    match all.get(recovery.open.len()) {
        Some(path) => match std::fs::File::open(path) {
            Ok(f) => {
                recovery.open.push(f);
                format!("opened {}", path.display())
            }
            Err(e) => format!("error {e}"),
        },
        None => "recovered".into(),
    }
}

/// `recover-step N`: opens the next `n` segments.
fn recover_steps(props: &HashMap<String, String>, recovery: &mut Recovery, n: usize) -> String {
    let all = recovery.segments.get_or_insert_with(|| segments(props));
    let from = recovery.open.len();
    let next = all.get(from..(from + n).min(all.len())).unwrap_or_default();
    if next.is_empty() {
        return "recovered".into();
    }
    for path in next {
        match std::fs::File::open(path) {
            Ok(f) => recovery.open.push(f),
            Err(e) => {
                return format!(
                    "error {} after {}: {e}",
                    path.display(),
                    recovery.open.len() - from
                );
            }
        }
    }
    format!("opened {}", recovery.open.len() - from)
}

/// `recover MS`: opens every segment, one each `ms` milliseconds, and keeps them open.
fn recover(props: &HashMap<String, String>, ms: u64) -> String {
    let segments = segments(props);
    let mut open = Vec::new();
    for s in &segments {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        if let Ok(f) = std::fs::File::open(s) {
            open.push(f);
        }
    }
    let n = open.len();
    // Kafka keeps its segments open; so do we.
    std::mem::forget(open);
    format!("recovered {n}")
}

/// `burn MS`: until this thread has had `want` of CPU, however long that takes on a busy
/// machine.
fn burn(want: std::time::Duration) -> String {
    let start = thread_cpu();
    let mut x = 0u64;
    while thread_cpu().saturating_sub(start) < want {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
    "burned".into()
}

/// `fsync|fdatasync N PATH`: appends a byte and syncs it, `n` times.
fn sync(kind: &str, n: u32, path: &str) -> String {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return "error open".into();
    };
    for _ in 0..n {
        let _ = f.write_all(b"x");
        let _ = if kind == "fsync" {
            f.sync_all()
        } else {
            f.sync_data()
        };
    }
    format!("synced {n}")
}

/// Starts `n` threads whose ids are equal modulo `stride`, and not to that of any thread of this
/// process already, each sleeping 1 ms at a time until all are started and it has slept 50
/// times; their ids once joined.
fn one_set_threads(n: usize, stride: u32) -> io::Result<(Vec<u32>, usize)> {
    let read_u32 = |path: &str| -> io::Result<u32> {
        std::fs::read_to_string(path)?
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("{path}: {e}")))
    };
    let pid_max = read_u32("/proc/sys/kernel/pid_max")?;
    if stride == 0 || pid_max / stride < n as u32 + 2 {
        return Err(io::Error::other(format!("stride {stride}")));
    }
    let ours: Vec<u32> = std::fs::read_dir("/proc/self/task")?
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect();
    let residue = (0..stride)
        .map(|r| (read_u32("/proc/sys/kernel/ns_last_pid").unwrap_or(0) + 100 + r) % stride)
        .find(|r| r > &300 && ours.iter().all(|t| t % stride != *r))
        .ok_or_else(|| io::Error::other("no free residue"))?;
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut spawned = 0;
    let mut wanted = residue;
    while threads.len() < n && wanted < pid_max {
        let tid = wanted;
        wanted += stride;
        if std::path::Path::new(&format!("/proc/{tid}")).exists() {
            continue;
        }
        std::fs::write("/proc/sys/kernel/ns_last_pid", (tid - 1).to_string())?;
        let (tx, rx) = std::sync::mpsc::channel();
        let all_started = started.clone();
        spawned += 1;
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let got = unsafe { libc::gettid() } as u32;
            let _ = tx.send(got);
            let mut slept = 0;
            while got == tid
                && (slept < 50 || !all_started.load(std::sync::atomic::Ordering::Relaxed))
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
                slept += 1;
            }
        });
        match rx.recv() {
            Ok(got) if got == tid => threads.push((tid, handle)),
            // Another process took the id first: that thread has returned; try the next one.
            _ => {
                let _ = handle.join();
            }
        }
    }
    started.store(true, std::sync::atomic::Ordering::Relaxed);
    let enough = threads.len() == n;
    let tids = threads
        .into_iter()
        .map(|(tid, handle)| {
            let _ = handle.join();
            tid
        })
        .collect();
    if !enough {
        return Err(io::Error::other("not enough free thread ids"));
    }
    Ok((tids, spawned))
}

/// CPU time of the calling thread.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call fills.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Writes `bytes` to `path` with O_DIRECT from an aligned buffer, then reads them back.
fn direct_io(path: &str, bytes: u64) -> io::Result<u64> {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    const BLOCK: usize = 64 * 1024;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let layout = std::alloc::Layout::from_size_align(BLOCK, 4096).map_err(io::Error::other)?;
    // SAFETY: the layout is non-zero sized; the buffer is freed below and only used as a
    // BLOCK-byte slice in between.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(io::Error::other("out of memory"));
    }
    // SAFETY: `ptr` is a live allocation of BLOCK bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, BLOCK) };
    buf.fill(b'k');
    let mut done = 0u64;
    let result = (|| {
        while done < bytes {
            let n = usize::try_from(bytes - done).unwrap_or(BLOCK).min(BLOCK);
            f.write_all_at(&buf[..n], done)?;
            done += n as u64;
        }
        let mut read = 0u64;
        while read < bytes {
            let n = usize::try_from(bytes - read).unwrap_or(BLOCK).min(BLOCK);
            f.read_exact_at(&mut buf[..n], read)?;
            read += n as u64;
        }
        Ok(done)
    })();
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    result
}

fn listen(props: &HashMap<String, String>, out: &mut impl Write) {
    let listeners = props.get("listeners").map(String::as_str).unwrap_or("");
    for entry in listeners
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let (name, addr) = match entry.split_once("://") {
            Some(pair) => pair,
            None => {
                eprintln!("fake-broker: bad listener {entry}");
                std::process::exit(2);
            }
        };
        let (host, port) = addr.rsplit_once(':').unwrap_or(("", addr));
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let bind = match host {
            "" => format!("0.0.0.0:{port}"),
            h if h.contains(':') => format!("[{h}]:{port}"),
            h => format!("{h}:{port}"),
        };
        let listener = match TcpListener::bind(&bind) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("fake-broker: cannot listen on {bind} ({name}): {e}");
                std::process::exit(1);
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let _ = writeln!(out, "listening {name} {port}");
        std::thread::spawn(move || accept_loop(listener));
    }
    let _ = out.flush();
}

/// `key=value`, `key: value` and `key value` lines, `#`/`!` comments, and `\` continuations.
/// Enough for test files (escapes are discovery's business, not the fake broker's).
fn parse_properties(text: &str) -> HashMap<String, String> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim_start();
        if current.is_empty() && (line.starts_with('#') || line.starts_with('!')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    logical.push(current);
    logical
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let i = l.find(['=', ':', ' ', '\t'])?;
            Some((l[..i].trim().to_string(), l[i + 1..].trim().to_string()))
        })
        .collect()
}

fn accept_loop(listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || {
                    let _ = serve(s);
                });
            }
            Err(e) => eprintln!("fake-broker: accept: {e}"),
        }
    }
}

/// Largest response or request the fake broker accepts (bounded like everything else).
const MAX_LEN: u32 = 64 * 1024 * 1024;

fn serve(mut s: TcpStream) -> io::Result<()> {
    loop {
        let mut op = [0u8; 1];
        if s.read(&mut op)? == 0 {
            return Ok(());
        }
        match op[0] {
            b'R' => {
                let n = read_u32(&mut s)?;
                let m = read_u32(&mut s)?;
                if n > MAX_LEN || m > MAX_LEN {
                    return Err(io::Error::other("request too large"));
                }
                io::copy(&mut (&mut s).take(u64::from(n)), &mut io::sink())?;
                let chunk = [b'x'; 8192];
                let mut left = m as usize;
                while left > 0 {
                    let k = left.min(chunk.len());
                    s.write_all(&chunk[..k])?;
                    left -= k;
                }
            }
            b'F' => {
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut path = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut path)?;
                let file = std::fs::File::open(String::from_utf8_lossy(&path).as_ref())?;
                let size = file.metadata()?.len();
                s.write_all(&size.to_be_bytes())?;
                send_file(&s, &file, size)?;
            }
            other => return Err(io::Error::other(format!("unknown op {other}"))),
        }
    }
}

fn read_u32(s: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn send_file(s: &TcpStream, file: &std::fs::File, size: u64) -> io::Result<()> {
    let mut offset: libc::off_t = 0;
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: both fds are open for the duration of the call and `offset` is a valid
        // off_t the kernel updates in place.
        let sent = unsafe { libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut offset, want) };
        match sent {
            -1 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::Error::other("file shrank during sendfile")),
            n => left -= n as u64,
        }
    }
    Ok(())
}
