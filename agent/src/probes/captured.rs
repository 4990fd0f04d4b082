//! The loader against the kernels it is tested on, without booting them: each kernel's tracefs
//! formats and BTF, captured into `agent/testdata/kernels/<name>/` by
//! `cargo xtask vmtest --kernel <name> --capture`, go through the same offset resolution and
//! direct-load patching as at start-up. A format or BTF difference that would cost a program
//! fails here, naming the program and the field, instead of on a user's node.

use std::{io::Read as _, path::PathBuf};

use brokerscope_common::telemetry::Program;

use super::{Offsets, btf::Btf, fields, lacks::NO_OFFSET, loader::EBPF_OBJECT, tracefs::Format};

struct Captured {
    name: &'static str,
    formats: String,
    btf: Btf,
}

fn captured(name: &'static str) -> Captured {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/kernels")
        .join(name);
    let formats = std::fs::read_to_string(dir.join("formats.txt"))
        .unwrap_or_else(|e| panic!("{name}: formats.txt: {e}"));
    let gz = std::fs::read(dir.join("vmlinux.btf.gz"))
        .unwrap_or_else(|e| panic!("{name}: vmlinux.btf.gz: {e}"));
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{name}: vmlinux.btf.gz: {e}"));
    let btf = Btf::parse(&raw).unwrap_or_else(|e| panic!("{name}: BTF: {e}"));
    Captured { name, formats, btf }
}

/// What the loader decides before any program goes to the kernel: the offsets, the programs
/// the kernel lacks something for (with why), and the programs whose direct loads cannot be
/// patched.
fn plan(k: &Captured) -> (Offsets, Vec<(Program, String)>, Vec<Program>) {
    let formats = k.formats.as_str();
    let (offsets, lacks) = Offsets::resolve(
        |category: &str, name: &str| Format::from_capture(formats, category, name),
        &k.btf,
    );
    let lacking = lacks.iter().map(|(p, why)| (p, why.to_string())).collect();
    let field_offsets = fields::FieldOffsets::resolve(
        &k.btf,
        &offsets.sockets,
        &offsets.events,
        &offsets.resources,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", k.name));
    let object =
        fields::patch(EBPF_OBJECT, &field_offsets).unwrap_or_else(|e| panic!("{}: {e}", k.name));
    let unpatched = Program::ALL
        .into_iter()
        .filter(|p| p.btf_tracepoint().is_some() && object.refusal(p.hook()).is_some())
        .collect();
    (offsets, lacking, unpatched)
}

/// Every kernel of the matrix: the two Debian 12 kernels users run and the development kernel.
const KERNELS: [&str; 3] = ["debian12-6.1", "debian12-6.12", "dev-6.18"];

#[test]
fn every_program_has_what_it_reads_on_every_tested_kernel() {
    for name in KERNELS {
        let k = captured(name);
        let (_, lacking, unpatched) = plan(&k);
        assert_eq!(lacking, vec![], "{name}: programs lacking fields");
        assert_eq!(unpatched, vec![], "{name}: BTF programs left unpatched");
    }
}

#[test]
fn optional_record_fields_follow_each_kernel() {
    let offsets = |name| plan(&captured(name)).0;
    let (k61, k612, k618) = (
        offsets("debian12-6.1"),
        offsets("debian12-6.12"),
        offsets("dev-6.18"),
    );
    // tcp_send_reset's sockaddr came with Linux 6.10; 6.1's record has `sport` instead.
    assert_eq!(k61.sockets.tp_send_reset_saddr, NO_OFFSET);
    assert_ne!(k61.sockets.tp_send_reset_sport, NO_OFFSET);
    for k in [&k612, &k618] {
        assert_ne!(k.sockets.tp_send_reset_saddr, NO_OFFSET);
        assert_eq!(k.sockets.tp_send_reset_sport, NO_OFFSET);
    }
    // tcp_retransmit_skb's `err` (failed retransmits traced too) is newer than 6.12.
    assert_eq!(k61.sockets.tp_retransmit_err, NO_OFFSET);
    assert_eq!(k612.sockets.tp_retransmit_err, NO_OFFSET);
    assert_ne!(k618.sockets.tp_retransmit_err, NO_OFFSET);
    // sched_process_exit's `group_dead`: 6.13+.
    assert_eq!(k61.processes.exit_group_dead, NO_OFFSET);
    assert_eq!(k612.processes.exit_group_dead, NO_OFFSET);
    assert_ne!(k618.processes.exit_group_dead, NO_OFFSET);
    // The record tuples every kernel here has.
    for k in [&k61, &k612, &k618] {
        assert_ne!(k.events.retransmit_family, NO_OFFSET);
        assert_ne!(k.events.state_family, NO_OFFSET);
    }
}

#[test]
fn a_kernel_without_a_tracepoint_loses_only_its_programs() {
    let k = captured("debian12-6.1");
    // The same kernel without the tcp category, as one built without it would be.
    let formats: String = k
        .formats
        .split("\n== ")
        .filter(|section| !section.trim_start_matches("== ").starts_with("tcp/"))
        .collect::<Vec<_>>()
        .join("\n== ");
    let (_, lacks) = Offsets::resolve(
        |category: &str, name: &str| Format::from_capture(&formats, category, name),
        &k.btf,
    );
    let mut lacking: Vec<Program> = lacks.iter().map(|(p, _)| p).collect();
    lacking.sort_by_key(|p| *p as u32);
    assert_eq!(
        lacking,
        vec![
            Program::Retransmit,
            Program::SendReset,
            Program::ReceiveReset
        ]
    );
    let why = lacks.why(Program::SendReset).unwrap();
    assert!(
        why.contains("tcp:tcp_send_reset") && why.contains("does not exist"),
        "{why}"
    );
}
