//! Both resolvers (`openat2` and the walk) against the same tree: a root holding a broker's
//! files, next to a "node" directory with a marker that nothing may reach.

use std::{os::unix::fs::symlink, path::Path};

use super::*;

struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// `<tmp>/node/marker` (the node's secret) beside `<tmp>/root`, the process's root:
/// - `/opt/kafka/config/server.properties` (a file) and `/etc/kafka/ok.properties -> /opt/...`
///   (an absolute link that stays inside);
/// - `/opt/kafka/abs.properties -> /node/marker`, `/opt/kafka/rel.properties ->
///   ../../../node/marker`, `/data -> /node`, `/up -> ..`: links that would reach the marker from
///   the node's root;
/// - `/loop -> /loop`, `/fifo` (a FIFO), `/big` (2 GiB, sparse);
/// - `/logs/topic-0/00000000000000000000.log`, `/logs/linked -> /node` (a link among partitions).
fn tree() -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    std::fs::create_dir(&node).unwrap();
    std::fs::write(node.join("marker"), b"node.id=666\n").unwrap();
    let root = dir.path().join("root");
    let mk = |p: &str| std::fs::create_dir_all(root.join(p)).unwrap();
    mk("opt/kafka/config");
    mk("etc/kafka");
    mk("logs/topic-0");
    std::fs::write(
        root.join("opt/kafka/config/server.properties"),
        b"node.id=1\n",
    )
    .unwrap();
    let ln = |target: &str, link: &str| symlink(target, root.join(link)).unwrap();
    ln(
        "/opt/kafka/config/server.properties",
        "etc/kafka/ok.properties",
    );
    ln("/node/marker", "opt/kafka/abs.properties");
    ln("../../../node/marker", "opt/kafka/rel.properties");
    ln("/node", "data");
    ln("..", "up");
    ln("/loop", "loop");
    ln("/node", "logs/linked");
    std::fs::write(root.join("logs/topic-0/00000000000000000000.log"), b"").unwrap();
    let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::File::create(root.join("big"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    Tree { _dir: dir, root }
}

fn both(tree: &Tree, cwd: Option<&str>) -> [ProcessRoot; 2] {
    [Resolver::Auto, Resolver::Walk].map(|r| ProcessRoot::at(&tree.root, cwd, r))
}

#[test]
fn files_inside_the_root_are_read_through_links_and_dot_dots() {
    let t = tree();
    for p in both(&t, Some("/opt/kafka")) {
        let read = |path: &str| p.read_file(path, 1024).map_err(|e| e.to_string());
        assert_eq!(
            read("/opt/kafka/config/server.properties").unwrap(),
            b"node.id=1\n"
        );
        assert_eq!(read("/etc/kafka/ok.properties").unwrap(), b"node.id=1\n");
        assert_eq!(read("config/server.properties").unwrap(), b"node.id=1\n");
        assert_eq!(
            read("../kafka/config/server.properties").unwrap(),
            b"node.id=1\n"
        );
        assert_eq!(
            read("/../../opt/./kafka/config/../config/server.properties").unwrap(),
            b"node.id=1\n"
        );
        assert_eq!(
            read("/up/up/opt/kafka/config/server.properties").unwrap(),
            b"node.id=1\n"
        );
    }
}

#[test]
fn nothing_reaches_outside_the_root() {
    let t = tree();
    for p in both(&t, Some("/opt/kafka")) {
        for path in [
            "/opt/kafka/abs.properties",
            "/opt/kafka/rel.properties",
            "abs.properties",
            "rel.properties",
            "../../../node/marker",
            "../../../../../../node/marker",
            "/../../node/marker",
            "/data/marker",
            "/up/up/node/marker",
        ] {
            let e = p.read_file(path, 1024).unwrap_err();
            assert!(
                e.is_not_found(),
                "{:?} {path}: {e} (the marker must not be reached)",
                p.resolver
            );
            // The error names the path as the process named it, nothing of the node.
            let text = e.to_string();
            assert!(text.starts_with(path), "{text}");
            assert!(!text.contains(t.root.to_str().unwrap()), "{text}");
        }
        assert!(p.open_dir("/data").unwrap_err().is_not_found());
        assert!(p.open_dir("/../../node").unwrap_err().is_not_found());
        // /data is a link to /node, which inside the root does not exist: its filesystem is the
        // root's (the nearest existing ancestor), never the node's /node.
        assert!(p.filesystem("/data/kafka-logs").is_ok());
    }
}

#[test]
fn only_small_regular_files_are_read_and_nothing_blocks() {
    let t = tree();
    for p in both(&t, None) {
        let started = std::time::Instant::now();
        let e = p.read_file("/fifo", 1024).unwrap_err();
        assert!(
            matches!(e, ConfinedError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let e = p.read_file("/big", 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "/big: larger than 1048576 bytes");
        let e = p.read_file("/loop", 1024).unwrap_err();
        assert!(matches!(e, ConfinedError::Loop { .. }), "{e}");
        let e = p.read_file("/logs", 1024).unwrap_err();
        assert!(
            matches!(
                e,
                ConfinedError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );
        // Relative paths need a working directory inside the root.
        let e = p.read_file("config/server.properties", 1024).unwrap_err();
        assert!(matches!(e, ConfinedError::CwdOutsideRoot { .. }), "{e}");
        assert!(p.read_file("", 1024).is_err());
        assert!(p.read_file("/a\0b", 1024).is_err());
    }
}

#[test]
fn devices_are_refused_before_they_are_opened() {
    // The agent's own root: /dev/zero is a character device there.
    for r in [Resolver::Auto, Resolver::Walk] {
        let p = ProcessRoot::at(Path::new("/"), None, r);
        let e = p.read_file("/dev/zero", 1024).unwrap_err();
        assert!(
            matches!(
                e,
                ConfinedError::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{e}"
        );
    }
}

#[test]
fn magic_links_are_refused_by_openat2_and_read_as_text_by_the_walk() {
    // /proc/self/root is a magic link: openat2 refuses to cross it. The walk reads its text
    // ("/") and resolves that inside the root, so it can never leave the root either.
    let auto = ProcessRoot::at(Path::new("/"), None, Resolver::Auto);
    let e = auto.read_file("/proc/self/root/etc/hostname", 4096);
    if openat2_usable() {
        assert!(matches!(e, Err(ConfinedError::Loop { .. })), "{e:?}");
    }
    let t = tree();
    let walk = ProcessRoot::at(&t.root, None, Resolver::Walk);
    std::fs::create_dir_all(t.root.join("proc")).unwrap();
    symlink("/node", t.root.join("proc/magic")).unwrap();
    assert!(
        walk.read_file("/proc/magic/marker", 64)
            .unwrap_err()
            .is_not_found()
    );
}

#[test]
fn directories_are_listed_by_descriptor_and_links_among_entries_are_not_followed() {
    let t = tree();
    for p in both(&t, None) {
        let logs = p.open_dir("/logs").unwrap();
        let (mut entries, more) = logs.entries(100).unwrap();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        assert!(!more);
        assert_eq!(
            entries,
            [
                Entry {
                    name: b"linked".to_vec(),
                    is_dir: false
                },
                Entry {
                    name: b"topic-0".to_vec(),
                    is_dir: true
                },
            ]
        );
        let part = logs.child_dir(b"topic-0").unwrap();
        let (files, _) = part.entries(100).unwrap();
        assert_eq!(files[0].name_lossy(), "00000000000000000000.log");
        assert!(logs.child_dir(b"linked").is_err(), "a link is not followed");
        assert!(logs.child_dir(b"..").is_err());
        assert!(logs.child_dir(b"a/b").is_err());
        let (one, more) = logs.entries(1).unwrap();
        assert_eq!((one.len(), more), (1, true));
    }
}

#[test]
fn this_process_is_opened_with_its_working_directory() {
    let me = std::process::id();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let start = crate::proc::parse_stat(&stat).unwrap().start_ticks;
    let dir = Path::new("/proc/self");
    let p = ProcessRoot::open(dir, me, Some(start)).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(p.cwd.as_deref(), cwd.to_str());
    assert!(
        ProcessRoot::open(dir, me, Some(start + 1)).is_err(),
        "another process"
    );
    let manifest = p.read_file("Cargo.toml", 1 << 20).unwrap();
    assert_eq!(manifest, std::fs::read("Cargo.toml").unwrap());
}
