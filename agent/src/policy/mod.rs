//! The endpoint's per-request policy, below both the server that enforces it and the control
//! channel that switches it live: allowed client names, the access log level, the rate limiter,
//! the in-flight cap, the pod listener settings ([`ListenerPolicy`]), and the fixed limits
//! ([`limits`]). Owns no socket and no route.

pub mod limits;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering},
};

use tokio::sync::Semaphore;

use self::limits::*;
use crate::{
    config::{AccessLog, ServerConfig as ServerSection},
    locks::Recover as _,
    stats::ServerStats,
};

/// Per-request policy shared by every connection; the values a live config change may switch
/// are read per request.
pub struct ListenerPolicy {
    allowed_client_names: std::sync::RwLock<Arc<[String]>>,
    access_log: AtomicU8,
    pub limiter: RateLimiter,
    pub in_flight: Arc<Semaphore>,
    pub stats: Arc<ServerStats>,
    /// Which listener this state serves, for the access log: `node`, or `pod/<name>`.
    pub listener: String,
    /// `server.pod_listeners` and `server.pod_listen_port`, switched live (read by `pods`).
    pod_listeners: AtomicBool,
    pod_listen_port: AtomicU16,
}

impl ListenerPolicy {
    pub fn new(section: &ServerSection, stats: Arc<ServerStats>) -> Arc<Self> {
        Self::for_listener(section, stats, "node".into())
    }

    /// The state of one listener: its own rate limiter and in-flight cap.
    pub fn for_listener(
        section: &ServerSection,
        stats: Arc<ServerStats>,
        listener: String,
    ) -> Arc<Self> {
        let state = Arc::new(Self {
            allowed_client_names: std::sync::RwLock::new(
                section.allowed_client_names.clone().into(),
            ),
            access_log: AtomicU8::new(0),
            limiter: RateLimiter::new(
                section.rate_limit_rps,
                section.rate_limit_burst,
                RATE_LIMIT_IDENTITIES,
            ),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            stats,
            listener,
            pod_listeners: AtomicBool::new(section.pod_listeners),
            pod_listen_port: AtomicU16::new(section.pod_listen_port),
        });
        state.set_access_log(section.access_log);
        state
    }

    pub fn allowed_client_names(&self) -> Arc<[String]> {
        self.allowed_client_names.read().recover().clone()
    }

    /// Takes effect from the next request (open connections included).
    pub fn set_allowed_client_names(&self, names: &[String]) {
        *self.allowed_client_names.write().recover() = names.into();
    }

    pub fn access_log(&self) -> AccessLog {
        match self.access_log.load(Ordering::Relaxed) {
            0 => AccessLog::Off,
            1 => AccessLog::Info,
            _ => AccessLog::Debug,
        }
    }

    /// Takes on `other`'s live-changeable policy (allowed names, rate limits, access log): a
    /// pod listener follows the node's.
    pub fn follow(&self, other: &ListenerPolicy) {
        let names = other.allowed_client_names();
        if *names != *self.allowed_client_names() {
            self.set_allowed_client_names(&names);
        }
        let rates = other.limiter.rates();
        if rates != self.limiter.rates() {
            self.limiter.set_rates(rates.0, rates.1);
        }
        self.set_access_log(other.access_log());
    }

    /// The pod listeners' switch and port; `None` when off.
    pub fn pod_listeners(&self) -> Option<u16> {
        self.pod_listeners
            .load(Ordering::Relaxed)
            .then(|| self.pod_listen_port.load(Ordering::Relaxed))
    }

    /// Takes effect at the pod listeners' next pass (at most a second later).
    pub fn set_pod_listeners(&self, on: bool, port: u16) {
        self.pod_listen_port.store(port, Ordering::Relaxed);
        self.pod_listeners.store(on, Ordering::Relaxed);
    }

    /// Takes effect from the next request.
    pub fn set_access_log(&self, level: AccessLog) {
        let v = match level {
            AccessLog::Off => 0,
            AccessLog::Info => 1,
            AccessLog::Debug => 2,
        };
        self.access_log.store(v, Ordering::Relaxed);
    }
}
