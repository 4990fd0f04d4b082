//! Per-pod listeners (`server.pod_listeners`): for each running broker in a network namespace
//! of its own, a listener on `server.pod_listen_port` bound inside that namespace, where
//! Strimzi's Cluster Operator dials the pod's address. It serves only that broker's
//! `/v1/broker-state` and `/v1/ready` (`routes::pod_router`), with the broker's own certificate
//! and the cluster CA read from the broker's root filesystem, confined to it (`files::confine`).
//!
//! Owns those sockets and their TLS sources; reads the broker table, never kernel maps.
//! A listener belongs to a network namespace, not to a process: it answers for whichever broker
//! runs there, so a broker replaced in its pod (a new pid, perhaps a new id) seen in one pass of
//! discovery keeps the socket; one that is gone with nothing running in its place closes it.
//! **No namespace descriptor is kept**: a socket is bound on a short-lived thread that entered
//! the namespace and exits after. The socket itself holds the namespace (the kernel's
//! reference from the socket), so it is closed as soon as its broker is gone.
//! A port already taken there (Strimzi's in-JVM agent) is reported and left alone until the
//! broker restarts.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{oneshot, watch};

use super::{
    ListenerPolicy,
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

/// What errors call a pod's files: they are named by their paths in the broker's container.
const POD_ROLES: tls::Roles = tls::Roles {
    cert: "broker certificate",
    key: "broker key",
    cas: "cluster CA",
};

/// Why a broker's certificate could not be read. Paths are as the broker's container names
/// them, never the node's view of them nor the node listener's config keys.
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
    let cas = format!("{CLUSTER_CA_CERTS}/*.crt");
    Ok(tls::load_pem(
        &tls::Pem {
            chain: (&cert, &material.chain),
            key: (&key, &material.key),
            cas: (&cas, &material.cas),
            roles: &POD_ROLES,
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

/// Keeps one pod listener's TLS config current: polls the files of the broker it serves now
/// (that process's root, so a restart is followed) as `reload` polls the node's. A set that
/// cannot be loaded keeps the one in use and is reported in `error` until the files change
/// back or to a usable set.
async fn follow_certificate(
    model: Arc<Model>,
    serves: watch::Receiver<Arc<str>>,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    initial: u64,
    error: Arc<Mutex<Option<String>>>,
) {
    let mut watch = Watch::new(initial);
    let mut in_use = initial;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let set_error = |e: Option<String>| {
        if let Ok(mut slot) = error.lock() {
            *slot = e;
        }
    };
    loop {
        tick.tick().await;
        let id = serves.borrow().clone();
        let Some(broker) = model.broker(&id).filter(Broker::is_running) else {
            continue;
        };
        let pod = broker.pod.clone().unwrap_or_default();
        let Ok((material, print)) = tokio::task::spawn_blocking(move || {
            let m = read_material(&broker);
            let print = fingerprint(&m);
            (m, print)
        })
        .await
        else {
            continue;
        };
        if print == in_use {
            set_error(None);
        }
        if watch.observe(print) != Decision::Apply {
            continue;
        }
        match material.and_then(|m| load(&m, &pod)) {
            Ok(loaded) => {
                tracing::info!(
                    broker = %id,
                    %pod,
                    serial = %loaded.leaf.serial,
                    "pod listener: broker certificate reloaded; new connections use it"
                );
                tx.send_replace(loaded.config);
                in_use = print;
                set_error(None);
            }
            Err(e) => {
                tracing::warn!(
                    broker = %id,
                    %pod,
                    error = %e,
                    "pod listener: broker certificate not reloaded; keeping the one in use"
                );
                set_error(Some(e.to_string()));
            }
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
    port: u16,
    pod: String,
    /// The broker it answers for now: (id, pid).
    broker: (String, u32),
    serves: watch::Sender<Arc<str>>,
    certificate_error: Arc<Mutex<Option<String>>>,
    state: Arc<ListenerPolicy>,
    _stop: oneshot::Sender<()>,
    _reloader: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A pod where the port was found taken, left alone until another process runs there.
struct Taken {
    id: String,
    pid: u32,
    port: u16,
    pod: String,
}

/// The pod listeners: open, left alone, or failing.
#[derive(Default)]
struct Pods {
    /// By network namespace inode.
    open: HashMap<u32, Open>,
    taken: HashMap<u32, Taken>,
    /// By broker id: the last reason a listener could not be opened (logged when it changes).
    failed: HashMap<String, PodListener>,
}

/// Follows the broker table (woken by every change, and every [`RECHECK`]) and opens and
/// closes the pod listeners, one per network namespace; runs until the process ends.
pub async fn run(model: Arc<Model>, node: Arc<ListenerPolicy>, section: ServerSection) {
    let own = crate::proc::ProcFs::default().own_netns().ok();
    let mut pods = Pods::default();
    loop {
        let port = node.pod_listeners();
        let brokers = model.brokers();
        let in_ns = if port.is_some() {
            pod_brokers(&brokers, own)
        } else {
            BTreeMap::new()
        };
        pods.close_gone(&in_ns, port);
        for o in pods.open.values() {
            o.state.follow(&node);
        }
        if let Some(port) = port {
            pods.open_new(&in_ns, port, &model, &node, &section).await;
        }
        model.set_pod_listeners(pods.status());
        tokio::select! {
            () = model.broker_table.notified() => {}
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// The broker each pod's namespace answers for: the one running there (the first by id
/// should several share a namespace). The agent's own namespace is no pod's.
fn pod_brokers(brokers: &[Broker], own: Option<u32>) -> BTreeMap<u32, &Broker> {
    let mut in_ns: BTreeMap<u32, &Broker> = BTreeMap::new();
    for b in brokers.iter().filter(|b| b.is_running()) {
        if let Some(ns) = b.netns.filter(|&ns| Some(ns) != own) {
            in_ns
                .entry(ns)
                .and_modify(|first| {
                    if b.id < first.id {
                        *first = b;
                    }
                })
                .or_insert(b);
        }
    }
    in_ns
}

impl Pods {
    /// Closes the listeners (and forgets the taken ports and failures) of pods whose broker
    /// is gone or whose port changed; a listener whose pod runs another broker now serves it.
    fn close_gone(&mut self, in_ns: &BTreeMap<u32, &Broker>, port: Option<u16>) {
        self.open.retain(|ns, o| match in_ns.get(ns) {
            Some(b) if port == Some(o.port) => {
                if o.broker.0 != b.id || o.broker.1 != b.pid {
                    tracing::info!(
                        broker = %b.id, pid = b.pid, pod = %o.pod, port = o.port,
                        previous = %o.broker.0, previous_pid = o.broker.1,
                        "pod listener kept for the broker now running in the pod"
                    );
                    o.broker = (b.id.clone(), b.pid);
                    o.serves.send_replace(Arc::from(b.id.as_str()));
                }
                true
            }
            _ => {
                tracing::info!(broker = %o.broker.0, pod = %o.pod, port = o.port, "pod listener closed");
                false
            }
        });
        self.taken
            .retain(|ns, t| in_ns.get(ns).is_some_and(|b| b.pid == t.pid) && port == Some(t.port));
        self.failed
            .retain(|id, _| in_ns.values().any(|b| &b.id == id));
    }

    /// Opens a listener in each pod that has none and is not left alone.
    async fn open_new(
        &mut self,
        in_ns: &BTreeMap<u32, &Broker>,
        port: u16,
        model: &Arc<Model>,
        node: &Arc<ListenerPolicy>,
        section: &ServerSection,
    ) {
        for (&ns, &b) in in_ns {
            if self.open.contains_key(&ns) || self.taken.contains_key(&ns) {
                continue;
            }
            let b = b.clone();
            let id = b.id.clone();
            let pid = b.pid;
            match tokio::task::spawn_blocking(move || open_one(&b, port)).await {
                Ok(Ok(bound)) => {
                    self.failed.remove(&id);
                    self.open
                        .insert(ns, start(model, node, section, (id, pid), bound, port));
                }
                Ok(Err(OpenError::Taken { pod })) => {
                    tracing::warn!(
                        broker = %id, %pod, port,
                        "pod listener: the port is already taken in the pod (Strimzi's in-JVM \
                         agent?); leaving this pod alone"
                    );
                    self.taken.insert(ns, Taken { id, pid, port, pod });
                }
                Ok(Err(OpenError::Failed { pod, reason })) => {
                    let new = PodListener::Failed { port, pod, reason };
                    if self.failed.get(&id) != Some(&new)
                        && let PodListener::Failed { pod, reason, .. } = &new
                    {
                        tracing::warn!(
                            broker = %id, %pod, port, %reason,
                            "pod listener not opened; retried"
                        );
                    }
                    self.failed.insert(id, new);
                }
                Err(_) => {}
            }
        }
    }

    /// Each broker's pod listener, for `/v1/brokers`.
    fn status(&self) -> HashMap<String, PodListener> {
        let mut status: HashMap<String, PodListener> = self.failed.clone();
        for t in self.taken.values() {
            status.insert(
                t.id.clone(),
                PodListener::PortTaken {
                    port: t.port,
                    pod: t.pod.clone(),
                },
            );
        }
        for o in self.open.values() {
            let certificate_error = crate::locks::lock(&o.certificate_error).clone();
            status.insert(
                o.broker.0.clone(),
                PodListener::Serving {
                    port: o.port,
                    pod: o.pod.clone(),
                    certificate_error,
                },
            );
        }
        status
    }
}

enum OpenError {
    Taken { pod: String },
    Failed { pod: String, reason: String },
}

struct Bound {
    listener: std::net::TcpListener,
    pod: String,
    config: Arc<rustls::ServerConfig>,
    initial: u64,
}

/// Reads the broker's certificate, then binds: a pod without a usable certificate is not
/// listened on.
fn open_one(b: &Broker, port: u16) -> Result<Bound, OpenError> {
    let pod = b.pod.clone().unwrap_or_default();
    let (loaded, initial) = first_config(b).map_err(|e| OpenError::Failed {
        pod: pod.clone(),
        reason: e.to_string(),
    })?;
    match bind_in(b.pid, b.netns.unwrap_or_default(), port) {
        Ok(listener) => Ok(Bound {
            listener,
            pod,
            config: loaded.config,
            initial,
        }),
        Err(BindError::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(OpenError::Taken { pod })
        }
        Err(e) => Err(OpenError::Failed {
            pod,
            reason: format!("cannot listen in the pod: {e}"),
        }),
    }
}

fn start(
    model: &Arc<Model>,
    node: &Arc<ListenerPolicy>,
    section: &ServerSection,
    broker: (String, u32),
    bound: Bound,
    port: u16,
) -> Open {
    let (serves, serving) = watch::channel(Arc::<str>::from(broker.0.as_str()));
    let (tx, configs) = watch::channel(bound.config);
    let certificate_error = Arc::new(Mutex::new(None));
    let reloader = crate::tasks::spawn(
        "pod-tls-reload",
        follow_certificate(
            model.clone(),
            serving.clone(),
            tx,
            bound.initial,
            certificate_error.clone(),
        ),
    );
    let state =
        ListenerPolicy::for_listener(section, node.stats.clone(), format!("pod/{}", bound.pod));
    state.follow(node);
    let app = super::routes::pod_router(model.clone(), state.clone(), serving);
    let (stop, stopped) = oneshot::channel::<()>();
    tracing::info!(broker = %broker.0, pod = %bound.pod, port, "pod listener open");
    match tokio::net::TcpListener::from_std(bound.listener) {
        Ok(listener) => {
            crate::tasks::spawn(
                "pod-listener",
                super::serve_with(
                    listener,
                    configs,
                    state.clone(),
                    app,
                    async move {
                        let _ = stopped.await;
                    },
                    POD_BUDGET,
                ),
            );
        }
        Err(e) => tracing::warn!(broker = %broker.0, error = %e, "pod listener: cannot register"),
    }
    Open {
        port,
        pod: bound.pod,
        broker,
        serves,
        certificate_error,
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

    #[test]
    fn errors_name_the_pods_files_not_the_node_keys() {
        let (dir, root) = root_with_material();
        let certs = root.join("opt/kafka/broker-certs");
        let other = dir.path().join("other");
        crate::pki::generate_dev(&other, crate::pki::Validity::days(1)).unwrap();
        // A key that is not the certificate's, then one that is no key at all.
        std::fs::copy(other.join("tls.key"), certs.join("pod-0.key")).unwrap();
        let err = load(&material(&root, "pod-0").unwrap(), "pod-0")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("/opt/kafka/broker-certs/pod-0.key")
                && err.contains("/opt/kafka/broker-certs/pod-0.crt")
                && !err.contains("server."),
            "{err}"
        );
        std::fs::write(certs.join("pod-0.key"), "not a key\n").unwrap();
        let err = load(&material(&root, "pod-0").unwrap(), "pod-0")
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "broker key: /opt/kafka/broker-certs/pod-0.key holds no PEM private key"
        );
        // A missing file: its path in the container, without the node's hint.
        std::fs::remove_file(certs.join("pod-0.crt")).unwrap();
        let err = material(&root, "pod-0").err().unwrap().to_string();
        assert_eq!(
            err,
            "/opt/kafka/broker-certs/pod-0.crt: no such file or directory"
        );
    }

    fn nix_mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
