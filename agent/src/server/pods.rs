//! Per-pod listeners (`server.pod_listeners`): for each running broker in a network namespace
//! of its own, a listener on `server.pod_listen_port` bound inside that namespace, where
//! Strimzi's Cluster Operator dials the pod's address. It serves only that broker's
//! `/v1/broker-state` and `/v1/ready` (`routes::pod_router`), with the broker's own certificate
//! and the cluster CA read from the broker's root filesystem, confined to it (`files::confine`).
//!
//! Owns those sockets and their TLS sources; reads the broker table, never kernel maps.
//! **No namespace descriptor is kept**: a socket is bound on a short-lived thread that entered
//! the namespace and exits after. The socket itself holds the namespace (the kernel's
//! reference from the socket), so it is closed as soon as its broker is gone.
//! A port already taken there (Strimzi's in-JVM agent) is reported and left alone until the
//! broker restarts.

use std::{
    collections::HashMap,
    fs::File,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{oneshot, watch};

use super::{
    ServerState,
    limits::Budget,
    reload::{Decision, POLL_INTERVAL, Watch},
    tls,
};
use crate::{
    broker::Broker,
    config::ServerConfig as ServerSection,
    files::confine::{ConfinedError, ProcessRoot},
    model::{Model, PodListener},
    probes::netns,
};

/// Where a Strimzi broker container has its node certificate: `<pod>.crt` and `<pod>.key`.
pub const BROKER_CERTS: &str = "/opt/kafka/broker-certs";
/// Where it has the cluster CA: every `*.crt` (several while the CA is renewed).
pub const CLUSTER_CA_CERTS: &str = "/opt/kafka/cluster-ca-certs";
/// Largest PEM file read from a broker's root.
const MAX_PEM_BYTES: u64 = 256 * 1024;
/// Most CA files trusted from `CLUSTER_CA_CERTS`.
const MAX_CA_FILES: usize = 16;
/// How often the listeners are checked against the broker table without being woken (a live
/// config change, a certificate that was missing).
const RECHECK: Duration = Duration::from_secs(1);

/// One pod listener's connection limits: the operator asks once every few seconds per broker.
const POD_BUDGET: Budget = Budget {
    pending: 16,
    pending_per_peer: 4,
    authenticated: 8,
    sockets: 16 + 8 + 8,
};

/// Why a broker's certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PodTlsError {
    #[error("the broker has no pod name (HOSTNAME) to find its certificate by")]
    NoPodName,
    #[error("{0}")]
    Confined(#[from] ConfinedError),
    #[error("cannot list {CLUSTER_CA_CERTS}: {0}")]
    ListCas(#[source] std::io::Error),
    #[error("no *.crt in {CLUSTER_CA_CERTS}")]
    NoCas,
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// Why a socket could not be bound in a pod's namespace.
#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error("the broker's process is gone")]
    Gone,
    #[error("{0}")]
    Netns(#[from] netns::NetnsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The PEM files as read from one broker's root.
#[derive(Hash)]
struct Material {
    chain: Vec<u8>,
    key: Vec<u8>,
    cas: Vec<u8>,
}

/// Reads the broker's certificate, key and cluster CAs through its root (`/proc/<pid>/root`),
/// resolution confined to it, regular files only, each at most [`MAX_PEM_BYTES`].
fn read_material(broker: &Broker) -> Result<Material, PodTlsError> {
    let pod = broker.pod.as_deref().ok_or(PodTlsError::NoPodName)?;
    let proc_dir = format!("/proc/{}", broker.pid);
    let root = ProcessRoot::open(
        Path::new(&proc_dir),
        broker.pid,
        Some(broker.start_time_ticks),
    )?;
    read_material_in(&root, pod)
}

fn read_material_in(root: &ProcessRoot, pod: &str) -> Result<Material, PodTlsError> {
    if pod.is_empty() || pod.contains('/') || pod.starts_with('.') {
        return Err(PodTlsError::NoPodName);
    }
    let chain = root.read_file(&format!("{BROKER_CERTS}/{pod}.crt"), MAX_PEM_BYTES)?;
    let key = root.read_file(&format!("{BROKER_CERTS}/{pod}.key"), MAX_PEM_BYTES)?;
    let (entries, _) = root
        .open_dir(CLUSTER_CA_CERTS)?
        .entries(4 * MAX_CA_FILES)
        .map_err(PodTlsError::ListCas)?;
    let mut names: Vec<String> = entries
        .iter()
        .map(|e| e.name_lossy())
        // A Secret volume's `..data` and timestamped directories are not files to read.
        .filter(|n| n.ends_with(".crt") && !n.starts_with(".."))
        .collect();
    names.sort();
    names.truncate(MAX_CA_FILES);
    let mut cas = Vec::new();
    for name in &names {
        cas.extend(root.read_file(&format!("{CLUSTER_CA_CERTS}/{name}"), MAX_PEM_BYTES)?);
        cas.push(b'\n');
    }
    if names.is_empty() {
        return Err(PodTlsError::NoCas);
    }
    Ok(Material { chain, key, cas })
}

fn fingerprint(material: &Result<Material, PodTlsError>) -> u64 {
    let mut h = DefaultHasher::new();
    match material {
        Ok(m) => {
            0u8.hash(&mut h);
            m.hash(&mut h);
        }
        Err(e) => {
            1u8.hash(&mut h);
            e.to_string().hash(&mut h);
        }
    }
    h.finish()
}

fn load(material: &Material, pod: &str) -> Result<tls::Loaded, PodTlsError> {
    let cert = format!("{BROKER_CERTS}/{pod}.crt");
    let key = format!("{BROKER_CERTS}/{pod}.key");
    Ok(tls::load_pem(
        &tls::Pem {
            chain: (&cert, &material.chain),
            key: (&key, &material.key),
            cas: (CLUSTER_CA_CERTS, &material.cas),
        },
        tls::unix_now(),
    )?)
}

/// The broker's TLS config, read once; `Err` leaves the pod without a listener for now.
fn first_config(broker: &Broker) -> Result<(tls::Loaded, u64), PodTlsError> {
    let material = read_material(broker);
    let print = fingerprint(&material);
    let pod = broker.pod.as_deref().unwrap_or_default();
    Ok((load(&material?, pod)?, print))
}

/// Keeps one pod listener's TLS config current: polls the broker's files (its current
/// process's root, so a restart is followed) as `reload` polls the node's.
async fn follow_certificate(
    model: Arc<Model>,
    id: String,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    initial: u64,
) {
    let mut watch = Watch::new(initial);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(broker) = model.broker(&id).filter(Broker::is_running) else {
            continue;
        };
        let Ok((material, print)) = tokio::task::spawn_blocking(move || {
            let m = read_material(&broker);
            let print = fingerprint(&m);
            (m.map(|m| (m, broker.pod.unwrap_or_default())), print)
        })
        .await
        else {
            continue;
        };
        if watch.observe(print) != Decision::Apply {
            continue;
        }
        match material.and_then(|(m, pod)| load(&m, &pod)) {
            Ok(loaded) => {
                tracing::info!(
                    broker = %id,
                    serial = %loaded.leaf.serial,
                    "pod listener: broker certificate reloaded; new connections use it"
                );
                tx.send_replace(loaded.config);
            }
            Err(e) => tracing::warn!(
                broker = %id,
                error = %e,
                "pod listener: broker certificate not reloaded; keeping the one in use"
            ),
        }
    }
}

/// Binds `0.0.0.0:port` inside the network namespace of `pid` (checked to be `netns`), on a
/// thread of its own that exits after; the namespace descriptor is closed before returning.
fn bind_in(pid: u32, netns_inode: u32, port: u16) -> Result<std::net::TcpListener, BindError> {
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(|_| BindError::Gone)?;
    if ns.metadata().map(|m| m.ino() as u32).ok() != Some(netns_inode) {
        return Err(BindError::Gone);
    }
    let listener = netns::run_in(&ns, || {
        let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
        listener.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(listener)
    })??;
    drop(ns);
    Ok(listener)
}

/// An open pod listener: dropping `stop` closes it.
struct Open {
    netns: u32,
    port: u16,
    state: Arc<ServerState>,
    _stop: oneshot::Sender<()>,
    _reloader: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows the broker table (woken by every change, and every [`RECHECK`]) and opens and
/// closes the pod listeners; runs until the process ends.
pub async fn run(model: Arc<Model>, node: Arc<ServerState>, section: ServerSection) {
    let own = File::open("/proc/self/ns/net")
        .and_then(|f| f.metadata())
        .map(|m| m.ino() as u32)
        .ok();
    let mut open: HashMap<String, Open> = HashMap::new();
    // Left alone until the broker restarts: (broker id) -> (pid, port) that found the port taken.
    let mut taken: HashMap<String, (u32, u16)> = HashMap::new();
    let mut status: HashMap<String, PodListener> = HashMap::new();
    loop {
        let port = node.pod_listeners();
        let brokers = model.brokers();
        let wanted =
            |b: &Broker| b.is_running() && b.netns.is_some() && b.netns != own && port.is_some();
        open.retain(|id, o| {
            let keep = brokers
                .iter()
                .any(|b| &b.id == id && wanted(b) && b.netns == Some(o.netns))
                && port == Some(o.port);
            if !keep {
                tracing::info!(broker = %id, port = o.port, "pod listener closed");
            }
            keep
        });
        taken.retain(|id, (pid, p)| {
            brokers
                .iter()
                .any(|b| &b.id == id && b.pid == *pid && wanted(b))
                && port == Some(*p)
        });
        status.retain(|id, _| open.contains_key(id) || taken.contains_key(id));
        for o in open.values() {
            o.state.follow(&node);
        }
        if let Some(port) = port {
            for b in brokers.iter().filter(|b| wanted(b)) {
                if open.contains_key(&b.id) || taken.contains_key(&b.id) {
                    continue;
                }
                let b = b.clone();
                let opened = tokio::task::spawn_blocking(move || open_one(&b, port)).await;
                match opened {
                    Ok((id, Ok((listener, configs, initial)))) => {
                        let pod = listener.pod.clone();
                        status.insert(id.clone(), PodListener::Serving { port, pod });
                        open.insert(
                            id.clone(),
                            start(&model, &node, &section, id, listener, configs, initial),
                        );
                    }
                    Ok((id, Err(OpenError::Taken { pid, pod }))) => {
                        tracing::warn!(
                            broker = %id, %pod, port,
                            "pod listener: the port is already taken in the pod (Strimzi's in-JVM \
                             agent?); leaving this pod alone"
                        );
                        taken.insert(id.clone(), (pid, port));
                        status.insert(id, PodListener::PortTaken { port, pod });
                    }
                    Ok((id, Err(OpenError::Failed(reason)))) => {
                        let new = PodListener::Failed { port, reason };
                        if status.get(&id) != Some(&new) {
                            tracing::warn!(broker = %id, port, reason = %match &new {
                                PodListener::Failed { reason, .. } => reason.as_str(),
                                _ => "",
                            }, "pod listener not opened; retried");
                        }
                        status.insert(id, new);
                    }
                    Err(_) => {}
                }
            }
        }
        model.set_pod_listeners(status.clone());
        tokio::select! {
            () = model.broker_table.notified() => {}
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

enum OpenError {
    Taken { pid: u32, pod: String },
    Failed(String),
}

struct Bound {
    listener: std::net::TcpListener,
    pod: String,
    netns: u32,
}

type Opened = (Bound, Arc<rustls::ServerConfig>, u64);

/// Reads the broker's certificate, then binds: a pod without a usable certificate is not
/// listened on.
fn open_one(b: &Broker, port: u16) -> (String, Result<Opened, OpenError>) {
    let id = b.id.clone();
    let result = (|| {
        let (loaded, initial) = first_config(b).map_err(|e| OpenError::Failed(e.to_string()))?;
        let pod = b.pod.clone().unwrap_or_default();
        let netns = b.netns.unwrap_or_default();
        match bind_in(b.pid, netns, port) {
            Ok(listener) => Ok((
                Bound {
                    listener,
                    pod,
                    netns,
                },
                loaded.config,
                initial,
            )),
            Err(BindError::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                Err(OpenError::Taken { pid: b.pid, pod })
            }
            Err(e) => Err(OpenError::Failed(format!("cannot listen in the pod: {e}"))),
        }
    })();
    (id, result)
}

fn start(
    model: &Arc<Model>,
    node: &Arc<ServerState>,
    section: &ServerSection,
    id: String,
    bound: Bound,
    config: Arc<rustls::ServerConfig>,
    initial: u64,
) -> Open {
    let netns = bound.netns;
    let port = bound.listener.local_addr().map_or(0, |a| a.port());
    let (tx, configs) = watch::channel(config);
    let reloader = tokio::spawn(follow_certificate(model.clone(), id.clone(), tx, initial));
    let state =
        ServerState::for_listener(section, node.stats.clone(), format!("pod/{}", bound.pod));
    state.follow(node);
    let app = super::routes::pod_router(model.clone(), state.clone(), id.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    tracing::info!(broker = %id, pod = %bound.pod, port, "pod listener open");
    match tokio::net::TcpListener::from_std(bound.listener) {
        Ok(listener) => {
            tokio::spawn(super::serve_with(
                listener,
                configs,
                state.clone(),
                app,
                async move {
                    let _ = stopped.await;
                },
                POD_BUDGET,
            ));
        }
        Err(e) => tracing::warn!(broker = %id, error = %e, "pod listener: cannot register"),
    }
    Open {
        netns,
        port,
        state,
        _stop: stop,
        _reloader: AbortOnDrop(reloader),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::confine::Resolver;

    /// A container root with the dev PKI laid out as Strimzi mounts it, and a node directory
    /// beside it that must stay out of reach.
    fn root_with_material() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        crate::pki::generate_dev(&pki, crate::pki::Validity::days(1)).unwrap();
        let root = dir.path().join("root");
        let certs = root.join("opt/kafka/broker-certs");
        let cas = root.join("opt/kafka/cluster-ca-certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::create_dir_all(&cas).unwrap();
        std::fs::copy(pki.join("tls.crt"), certs.join("pod-0.crt")).unwrap();
        std::fs::copy(pki.join("tls.key"), certs.join("pod-0.key")).unwrap();
        std::fs::copy(pki.join("ca.crt"), cas.join("ca.crt")).unwrap();
        // During a CA renewal: the old CA beside it; the PKCS#12 forms are not read.
        std::fs::copy(pki.join("ca.crt"), cas.join("ca-2026-01-01T00-00-00Z.crt")).unwrap();
        std::fs::write(cas.join("ca.p12"), b"binary").unwrap();
        (dir, root)
    }

    fn material(root: &Path, pod: &str) -> Result<Material, PodTlsError> {
        read_material_in(&ProcessRoot::at(root, None, Resolver::Auto), pod)
    }

    #[test]
    fn strimzi_layout_loads_with_every_ca() {
        let (_dir, root) = root_with_material();
        let m = material(&root, "pod-0").unwrap();
        let cas = rustls_pemfile::certs(&mut m.cas.as_slice()).count();
        assert_eq!(cas, 2);
        load(&m, "pod-0").unwrap();
    }

    #[test]
    fn links_out_of_the_root_and_special_files_are_not_read() {
        let (dir, root) = root_with_material();
        let certs = root.join("opt/kafka/broker-certs");
        // The node's own key, named by an absolute link and by a `..` chain.
        let node_key = dir.path().join("pki/tls.key");
        std::fs::remove_file(certs.join("pod-0.key")).unwrap();
        std::os::unix::fs::symlink(&node_key, certs.join("pod-0.key")).unwrap();
        assert!(material(&root, "pod-0").is_err());
        std::fs::remove_file(certs.join("pod-0.key")).unwrap();
        std::os::unix::fs::symlink("../../../../pki/tls.key", certs.join("pod-0.key")).unwrap();
        assert!(material(&root, "pod-0").is_err());
        // A FIFO is not a regular file; a huge file is not read.
        std::fs::remove_file(certs.join("pod-0.key")).unwrap();
        nix_mkfifo(&certs.join("pod-0.key"));
        let err = material(&root, "pod-0").err().unwrap().to_string();
        assert!(err.contains("FIFO"), "{err}");
        std::fs::remove_file(certs.join("pod-0.key")).unwrap();
        std::fs::write(
            certs.join("pod-0.key"),
            vec![b'a'; MAX_PEM_BYTES as usize + 1],
        )
        .unwrap();
        assert!(material(&root, "pod-0").is_err());
        // A pod name that is a path.
        assert!(matches!(
            material(&root, "../x"),
            Err(PodTlsError::NoPodName)
        ));
    }

    fn nix_mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
