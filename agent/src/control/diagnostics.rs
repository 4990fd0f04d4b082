//! The diagnostics bundle behind `GET /v1/diagnostics`: one capture of everything an engineer
//! asks for first — agent build, kernel facts, programs with their run counts and run time,
//! map fill, brokers with their discovery evidence, TLS material, effective config, recent logs.
//!
//! Kernel BPF run-time statistics cost a little on every program run, so they are turned on
//! only for the capture: [`STATS_WINDOW`] with the `BPF_ENABLE_STATS` fd held, then dropped.
//! Reads program info (syscalls on program ids), never map contents; the model gives the rest.

use std::{collections::HashMap, io::Write as _, path::Path, time::Duration};

use serde_json::{Value, json};

use super::Control;
use crate::{
    model::{Model, Snapshot},
    probes::runs::{self, ProgramRun, program_runs},
};

/// How long BPF run-time statistics stay on during a capture.
pub const STATS_WINDOW: Duration = Duration::from_secs(1);
/// Recent log lines in a bundle.
pub const BUNDLE_LOG_LINES: usize = 1000;
/// Certificates described per PEM file.
const MAX_CERTS: usize = 16;

/// Each program's runs, by program id.
type Runs = HashMap<u32, ProgramRun>;

/// Program runs before and after [`STATS_WINDOW`] with the kernel's run-time statistics on,
/// and why they could not be turned on.
fn stats_window(ids: &[u32]) -> (Runs, Runs, Option<String>) {
    let stats_fd = runs::enable_run_time_stats();
    let stats_error = stats_fd.as_ref().err().map(|e| e.to_string());
    let before = program_runs(ids);
    if stats_fd.is_ok() {
        std::thread::sleep(STATS_WINDOW);
    }
    let after = program_runs(ids);
    drop(stats_fd);
    (before, after, stats_error)
}

/// Each attached program with its runs: in all, and within the window.
fn program_values(snapshot: &Snapshot, before: &Runs, after: &Runs) -> Vec<Value> {
    let events: HashMap<&str, u64> = snapshot
        .probes
        .programs
        .iter()
        .map(|p| (p.program, p.events))
        .collect();
    snapshot
        .attached
        .iter()
        .map(|a| {
            let b = before.get(&a.id).copied().unwrap_or_default();
            let n = after.get(&a.id).copied().unwrap_or_default();
            json!({
                "program": a.program,
                "hook": a.hook,
                "scope": a.scope,
                "id": a.id,
                "run_count": n.run_count,
                "run_time_ns": n.run_time.as_nanos() as u64,
                "window_run_count": n.run_count.saturating_sub(b.run_count),
                "window_run_time_ns": n.run_time.saturating_sub(b.run_time).as_nanos() as u64,
                "events": events.get(a.program).copied().unwrap_or(0),
            })
        })
        .collect()
}

/// Captures the bundle. Blocking (it waits [`STATS_WINDOW`] and reads /proc and files).
pub fn capture(model: &Model, control: &Control) -> Value {
    let snapshot = model.snapshot();
    let ids: Vec<u32> = snapshot.attached.iter().map(|a| a.id).collect();
    let (before, after, stats_error) = stats_window(&ids);
    let programs = program_values(&snapshot, &before, &after);
    let maps: Vec<Value> = snapshot
        .probes
        .maps
        .iter()
        .map(|m| json!({"map": m.map, "entries": m.entries, "capacity": m.capacity}))
        .collect();
    let errors: serde_json::Map<String, Value> = snapshot
        .probes
        .errors
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    let config = control.config.current();
    let stats = control.config.server_stats();
    let logs = control.logs.query(None, None);
    let recent = &logs[logs.len().saturating_sub(BUNDLE_LOG_LINES)..];
    json!({
        "agent": {
            "version": env!("CARGO_PKG_VERSION"),
            "build": {
                "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
                "target_arch": std::env::consts::ARCH,
                "target_os": std::env::consts::OS,
            },
            "pid": std::process::id(),
        },
        "kernel": {
            "release": model.kernel().map(|k| k.release),
            "facts": model.kernel(),
        },
        "readiness": snapshot.readiness,
        "verifier_logs": model
            .verifier_logs()
            .into_iter()
            .map(|(program, log)| json!({"program": program, "log": log}))
            .collect::<Vec<_>>(),
        "bpf_stats": {
            "enabled_for_ms": if stats_error.is_none() { STATS_WINDOW.as_millis() as u64 } else { 0 },
            "error": stats_error,
        },
        "programs": programs,
        "probe_errors": errors,
        "maps": maps,
        "brokers": snapshot.brokers,
        "tls": {
            "server": describe_pem(&config.server.cert_file),
            "server_in_use_not_after": stats.tls_cert_expiry,
            "client_ca": describe_pem(&config.server.client_ca_file),
            "reloads": stats.tls_reloads,
            "reload_failures": stats.tls_reload_failures,
        },
        "config": control.config.view(),
        "config_generation": stats.config_generation,
        "logs": {
            "dropped": control.logs.dropped(),
            "lines": recent,
        },
    })
}

/// Subject, issuer, names and validity of each certificate in a PEM file (never key material:
/// only CERTIFICATE blocks are read).
fn describe_pem(path: &Path) -> Value {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return json!({"file": path, "error": e.to_string()}),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut certs = Vec::new();
    for der in rustls_pemfile::certs(&mut reader).take(MAX_CERTS) {
        let Ok(der) = der else {
            certs.push(json!({"error": "unreadable PEM block"}));
            continue;
        };
        use x509_parser::prelude::FromDer as _;
        match x509_parser::certificate::X509Certificate::from_der(&der) {
            Ok((_, cert)) => {
                let names: Vec<String> = cert
                    .subject_alternative_name()
                    .ok()
                    .flatten()
                    .map(|san| {
                        san.value
                            .general_names
                            .iter()
                            .map(|n| n.to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                certs.push(json!({
                    "subject": cert.subject().to_string(),
                    "issuer": cert.issuer().to_string(),
                    "serial": cert.raw_serial_as_string(),
                    "san": names,
                    "not_before": cert.validity().not_before.timestamp(),
                    "not_after": cert.validity().not_after.timestamp(),
                }));
            }
            Err(e) => certs.push(json!({"error": e.to_string()})),
        }
    }
    json!({"file": path, "certificates": certs})
}

/// The bundle as a gzipped tar: `diagnostics.json` (everything), `logs.txt` (the log lines as
/// text) and `config.toml` (the effective config).
pub fn tar_gz(bundle: &Value, config_toml: &str) -> std::io::Result<Vec<u8>> {
    let mut logs = String::new();
    if let Some(lines) = bundle["logs"]["lines"].as_array() {
        for l in lines {
            logs.push_str(&format!(
                "{} {:5} {}: {}\n",
                l["time"].as_str().unwrap_or(""),
                l["level"].as_str().unwrap_or("").to_uppercase(),
                l["target"].as_str().unwrap_or(""),
                l["message"].as_str().unwrap_or("")
            ));
        }
    }
    let json = serde_json::to_vec_pretty(bundle).map_err(std::io::Error::other)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    let mut tar = Vec::new();
    for (name, data) in [
        ("diagnostics.json", json.as_slice()),
        ("logs.txt", logs.as_bytes()),
        ("config.toml", config_toml.as_bytes()),
    ] {
        tar.extend_from_slice(&ustar_header(name, data.len() as u64, now));
        tar.extend_from_slice(data);
        tar.resize(tar.len().next_multiple_of(512), 0);
    }
    // End of archive: two zero blocks.
    tar.resize(tar.len() + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    gz.finish()
}

/// A POSIX ustar header for a regular file (mode 0644, owner root).
fn ustar_header(name: &str, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, bytes: &[u8]| {
        h[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut h, 0, &name.as_bytes()[..name.len().min(100)]);
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, format!("{mtime:011o}\0").as_bytes());
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn tar_gz_holds_the_three_files_readably() {
        let bundle = json!({"agent": {"version": "0.1.0"},
            "logs": {"lines": [{"time": "t", "level": "info", "target": "x", "message": "hello"}]}});
        let gz = tar_gz(&bundle, "[server]\n").unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(tar.len() % 512, 0);
        // Walk the headers: name, size, checksum.
        let mut at = 0;
        let mut files = Vec::new();
        while tar[at] != 0 {
            let h = &tar[at..at + 512];
            let name =
                String::from_utf8(h[..100].split(|&b| b == 0).next().unwrap().to_vec()).unwrap();
            let size = u64::from_str_radix(std::str::from_utf8(&h[124..135]).unwrap(), 8).unwrap();
            let stored =
                u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
            let mut blank = h.to_vec();
            blank[148..156].copy_from_slice(b"        ");
            assert_eq!(stored, blank.iter().map(|&b| u32::from(b)).sum::<u32>());
            let data = &tar[at + 512..at + 512 + size as usize];
            files.push((name, String::from_utf8(data.to_vec()).unwrap()));
            at += 512 + (size as usize).next_multiple_of(512);
        }
        assert_eq!(files.len(), 3);
        assert_eq!(files[0].0, "diagnostics.json");
        assert_eq!(serde_json::from_str::<Value>(&files[0].1).unwrap(), bundle);
        assert_eq!(files[1], ("logs.txt".into(), "t INFO  x: hello\n".into()));
        assert_eq!(files[2], ("config.toml".into(), "[server]\n".into()));
    }
}
