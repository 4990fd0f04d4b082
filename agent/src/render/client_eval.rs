//! Our renderer against the `prometheus-client` crate (a custom collector over the same
//! listener stats), on the families that make most of a busy node's page: the per-listener
//! socket families of 10 brokers x 4 listeners (about 85 % of its lines).
//!
//! Both must say the same thing: the samples of the two pages are parsed and compared, value
//! by value. `cost_against_prometheus_client` (ignored: it is a measurement, run by
//! `cargo xtask bench` in release) prints the time per page of each; the decision it fed is in
//! `docs/design.md`.

use std::time::{Duration, Instant};

use brokerscope_common::sockets::{ListenerCounters, ListenerKey, log2_bucket_upper_us};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::{
    listeners::{
        self, DURATION_HELP, LISTEN_DROPS_HELP, LISTENER_SCALARS, RTT_HELP, listener_labels,
    },
    text::{Exposition, Format, Kind, PREFIX},
};
use crate::{broker::ListenerIndex, probes::sockets::ListenerStats};

/// 10 brokers x 4 listeners with busy-looking counters and histograms.
fn stats() -> (Vec<ListenerStats>, ListenerIndex) {
    let mut listeners = Vec::new();
    let mut owners = Vec::new();
    for broker in 0..10u32 {
        for (i, name) in ["PLAIN", "TLS", "REPLICATION", "CONTROLPLANE"]
            .iter()
            .enumerate()
        {
            let port = 9092 + i as u16;
            let netns = 4026532000 + broker;
            let seed = u64::from(broker) * 7 + i as u64 + 1;
            let mut c = ListenerCounters {
                accepted: 1000 * seed,
                closed: 990 * seed,
                bytes_received: 123_456_789 * seed,
                bytes_sent: 987_654_321 * seed,
                retransmits: 17 * seed,
                resets_sent: 3 * seed,
                resets_received: 5 * seed,
                rtt_sum_us: 40_000 * seed,
                duration_sum_us: 9_000_000 * seed,
                ..ListenerCounters::ZERO
            };
            for (b, n) in c.rtt.iter_mut().enumerate().skip(4).take(12) {
                *n = seed * (b as u64 + 1);
            }
            for (b, n) in c.duration.iter_mut().enumerate().skip(10).take(20) {
                *n = seed + b as u64;
            }
            listeners.push(ListenerStats {
                key: ListenerKey::new(netns, port),
                counters: c,
                bytes_received: c.bytes_received + 4096,
                bytes_sent: c.bytes_sent + 8192,
                listen_drops: Some(seed),
            });
            owners.push((netns, port, broker.to_string(), name.to_string()));
        }
    }
    (listeners, ListenerIndex::from_owners(owners))
}

/// Ours, as OpenMetrics (the only format the crate writes).
fn ours(listeners: &[ListenerStats], index: &ListenerIndex) -> String {
    let mut e = Exposition {
        out: String::with_capacity(400 * 1024),
        format: Format::OpenMetrics,
    };
    listeners::counters(&mut e, listeners, index);
    listeners::histograms(&mut e, listeners, index);
    e.out.push_str("# EOF\n");
    e.out
}

/// The same families through `prometheus-client`: a collector that encodes the stats it holds
/// on every scrape.
#[derive(Debug)]
struct ListenerCollector {
    listeners: Vec<ListenerStats>,
    labels: Vec<Vec<(&'static str, String)>>,
}

impl ListenerCollector {
    fn new(listeners: Vec<ListenerStats>, index: &ListenerIndex) -> Self {
        let labels = listeners
            .iter()
            .map(|l| listener_labels(l, index))
            .collect();
        Self { listeners, labels }
    }

    fn histogram(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        of: impl Fn(&ListenerCounters) -> (&[u64], u64),
        stride: usize,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        let mut buckets = Vec::with_capacity(64);
        for (l, labels) in self.listeners.iter().zip(&self.labels) {
            let (counts, sum_us) = of(&l.counters);
            // Per-bucket counts at every `stride`-th boundary: the crate accumulates them.
            buckets.clear();
            let mut pending = 0;
            for (i, n) in counts.iter().enumerate() {
                pending += n;
                if i + 1 < counts.len() && (i + 1) % stride == 0 {
                    buckets.push((log2_bucket_upper_us(i) as f64 / 1e6, pending));
                    pending = 0;
                }
            }
            buckets.push((f64::INFINITY, pending));
            let count = counts.iter().sum();
            family
                .encode_family(labels)?
                .encode_histogram::<Vec<(&str, String)>>(
                    sum_us as f64 / 1e6,
                    count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

impl Collector for ListenerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, kind, help, value) in LISTENER_SCALARS {
            // The crate appends `_total` to counters itself.
            let (name, kind) = match kind {
                Kind::Counter => (
                    name.strip_suffix("_total").unwrap_or(name),
                    MetricType::Counter,
                ),
                _ => (name, MetricType::Gauge),
            };
            let name = format!("{}{name}", PREFIX);
            let mut family = encoder.encode_descriptor(&name, help, None, kind)?;
            for (l, labels) in self.listeners.iter().zip(&self.labels) {
                let v = value(l);
                let metric = family.encode_family(labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(v).encode(metric)?,
                    _ => ConstGauge::new(v as i64).encode(metric)?,
                }
            }
        }
        {
            let name = format!("{PREFIX}listen_drops");
            let mut family =
                encoder.encode_descriptor(&name, LISTEN_DROPS_HELP, None, MetricType::Counter)?;
            for (l, labels) in self.listeners.iter().zip(&self.labels) {
                if let Some(drops) = l.listen_drops {
                    ConstCounter::new(drops).encode(family.encode_family(labels)?)?;
                }
            }
        }
        let rtt = format!("{PREFIX}tcp_rtt_seconds");
        self.histogram(&mut encoder, &rtt, RTT_HELP, |c| (&c.rtt, c.rtt_sum_us), 1)?;
        let duration = format!("{PREFIX}connection_duration_seconds");
        self.histogram(
            &mut encoder,
            &duration,
            DURATION_HELP,
            |c| (&c.duration, c.duration_sum_us),
            2,
        )
    }
}

fn theirs(registry: &Registry) -> String {
    let mut out = String::with_capacity(400 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry).expect("encode");
    out
}

/// A sample: name, labels sorted by name, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Every sample of a page as (name, sorted labels, value), with `le` and values compared as
/// numbers: the two encoders print floats differently (`0.000001` against `1e-6`).
fn samples(page: &str) -> Vec<Sample> {
    let mut out: Vec<_> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut labels: Vec<(String, String)> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("k=v");
                    let v = v.trim_matches('"');
                    let v = match (k, v.parse::<f64>()) {
                        ("le", Ok(x)) => format!("{x:e}"),
                        _ => v.to_string(),
                    };
                    (k.to_string(), v)
                })
                .collect();
            labels.sort();
            (
                name.to_string(),
                labels,
                value.parse::<f64>().expect("a number"),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

fn registry(listeners: Vec<ListenerStats>, index: &ListenerIndex) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ListenerCollector::new(listeners, index)));
    registry
}

#[test]
fn both_encoders_write_the_same_samples() {
    let (listeners, index) = stats();
    let ours = ours(&listeners, &index);
    let theirs = theirs(&registry(listeners, &index));
    let (a, b) = (samples(&ours), samples(&theirs));
    assert_eq!(a.len(), b.len(), "sample counts");
    assert_eq!(a.len(), 40 * (9 + 26 + 2 + 20 + 2));
    assert_eq!(a, b);
}

#[test]
#[ignore = "a measurement: cargo xtask bench runs it in release"]
fn cost_against_prometheus_client() {
    let (listeners, index) = stats();
    let registry = registry(listeners.clone(), &index);
    let (mut ours_time, mut theirs_time) = (Duration::ZERO, Duration::ZERO);
    let (mut ours_len, mut theirs_len) = (0, 0);
    const ROUNDS: u32 = 20;
    const PAGES: u32 = 100;
    // Interleaved rounds: both see the same machine.
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..PAGES {
            ours_len = std::hint::black_box(ours(&listeners, &index)).len();
        }
        ours_time += t.elapsed();
        let t = Instant::now();
        for _ in 0..PAGES {
            theirs_len = std::hint::black_box(theirs(&registry)).len();
        }
        theirs_time += t.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(ROUNDS * PAGES);
    println!(
        "exposition-eval: listener families of 10 brokers x 4 listeners ({} samples): \
         ours {:.1} us/page ({ours_len} bytes), prometheus-client {:.1} us/page ({theirs_len} bytes), \
         ratio {:.2}",
        samples(&ours(&listeners, &index)).len(),
        per(ours_time),
        per(theirs_time),
        per(theirs_time) / per(ours_time)
    );
}
