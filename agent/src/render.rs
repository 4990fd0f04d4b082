//! Renders a [`Snapshot`] (and the endpoint's own [`ServerSnapshot`]) as Prometheus text
//! exposition format 0.0.4, or as OpenMetrics 1.0.0.
//!
//! Pure: takes a snapshot, returns text. Each family gets its HELP and TYPE once, label values
//! are escaped, and output order is stable (sorted keys) so scrapes diff cleanly.
//!
//! The text writer and the formats are in `text`; each other child names one group of
//! families: `agent` (the agent's own, its kernel programs and maps), `brokers`, `strimzi`,
//! `resources` (per broker), `listeners` (per listener socket) and `endpoint` (the endpoint's
//! own). This module puts them on the page, in page order.

mod agent;
mod brokers;
#[cfg(test)]
mod client_eval;
mod endpoint;
mod listeners;
mod resources;
mod strimzi;
#[cfg(test)]
mod tests;
mod text;

use text::Exposition;
pub use text::Format;
/// The routes' tests compare a response's `Content-Type` with it.
#[cfg(test)]
pub use text::PROMETHEUS_CONTENT_TYPE;

use crate::{broker::ListenerIndex, model::Snapshot, stats::ServerSnapshot};

/// The agent's families in the Prometheus text format (without the endpoint's own).
#[cfg(test)]
pub fn prometheus(snapshot: &Snapshot) -> String {
    let mut e = Exposition {
        out: String::with_capacity(4096),
        format: Format::Prometheus,
    };
    agent_families(&mut e, snapshot);
    e.out
}

/// The whole /metrics page in `format`.
pub fn exposition(snapshot: &Snapshot, server: &ServerSnapshot, format: Format) -> String {
    // Sized from the last page: growing a string of hundreds of kilobytes by doubling copies
    // it a dozen times.
    static LAST_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(8192);
    let mut e = Exposition {
        out: String::with_capacity(LAST_LEN.load(std::sync::atomic::Ordering::Relaxed) + 4096),
        format,
    };
    agent_families(&mut e, snapshot);
    endpoint::families(&mut e, server);
    if format == Format::OpenMetrics {
        e.out.push_str("# EOF\n");
    }
    LAST_LEN.store(e.out.len(), std::sync::atomic::Ordering::Relaxed);
    e.out
}

/// The agent's families (all but the endpoint's own), in page order.
fn agent_families(e: &mut Exposition, snapshot: &Snapshot) {
    let p = &snapshot.probes;
    agent::process(e, snapshot);
    agent::programs(e, snapshot);
    agent::maps(e, &p.maps);
    if let Some(w) = &p.walk {
        agent::open_sockets_walk(e, w);
    }
    agent::file_work(e, &snapshot.file_work);
    brokers::brokers(e, &snapshot.brokers);
    strimzi::broker_states(e, &snapshot.broker_states);
    strimzi::pod_listeners(e, &snapshot.pod_listeners);
    resources::resources(e, snapshot);
    listeners::listeners(e, &p.listeners, &ListenerIndex::new(&snapshot.brokers));
}
