//! The in-process event bus behind `GET /v1/events`: broker start/stop/state changes from the
//! broker table, connection events from the kernel. Below the model (which publishes) and the
//! server (which subscribes); it knows neither.
//!
//! Bounded: a `tokio::sync::broadcast` channel of [`CAPACITY`] events. A subscriber that falls
//! behind loses the oldest events and is told how many (`Lagged`); publishers never wait and
//! memory never grows. The number of subscribers is tracked so the kernel side only emits
//! connection events while someone listens.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::broadcast;

use crate::locks::Recover as _;

/// Events buffered for the slowest subscriber.
pub const CAPACITY: usize = 4096;

/// One event.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Event {
    /// `broker_started`, `broker_stopped`, `broker_state`, `connection_open`,
    /// `connection_close`, `connection_reset`, `retransmit`.
    pub kind: &'static str,
    /// Unix milliseconds.
    pub time_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// Kind-specific fields.
    pub detail: serde_json::Value,
}

impl Event {
    pub fn new(kind: &'static str, broker: Option<String>, detail: serde_json::Value) -> Self {
        Self {
            kind,
            time_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
            broker,
            listener: None,
            detail,
        }
    }
}

/// The user-facing event for a kernel connection event (broker and listener attributed by the
/// caller).
pub fn conn_event(e: &brokerscope_common::sockets::ConnEvent, broker: Option<String>) -> Event {
    use brokerscope_common::sockets::*;
    let kind = match e.kind {
        CONN_OPEN => "connection_open",
        CONN_CLOSE => "connection_close",
        CONN_RESET_SENT | CONN_RESET_RECEIVED => "connection_reset",
        _ => "retransmit",
    };
    let mut detail = serde_json::json!({ "netns": e.netns, "port": e.port });
    if e.family != 0 {
        detail["local"] = address(e.family, e.local_addr, e.port).into();
        detail["remote"] = address(e.family, e.remote_addr, e.remote_port).into();
    }
    match e.kind {
        CONN_CLOSE => {
            detail["bytes_sent"] = e.bytes_sent.into();
            detail["bytes_received"] = e.bytes_received.into();
            detail["duration_ns"] = e.duration_ns.into();
        }
        CONN_RESET_SENT => detail["direction"] = "sent".into(),
        CONN_RESET_RECEIVED => detail["direction"] = "received".into(),
        CONN_RETRANSMIT => detail["segments"] = e.count.into(),
        _ => {}
    }
    Event::new(kind, broker, detail)
}

/// `ip:port` (IPv4 from its mapped form for AF_INET, `[ip]:port` for IPv6).
fn address(family: u16, bytes: [u8; 16], port: u16) -> String {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (2, Some(v4)) => format!("{v4}:{port}"),
        _ => format!("[{v6}]:{port}"),
    }
}

/// What to do when interest in events starts (`true`) or stops (`false`).
type InterestFn = Box<dyn Fn(bool) + Send + Sync>;

/// The bus. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    subscribers: Arc<AtomicUsize>,
    /// Called with `true` when the first subscriber arrives, `false` when the last leaves.
    on_interest: Arc<std::sync::Mutex<Option<InterestFn>>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl EventBus {
    pub fn with_capacity(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            subscribers: Arc::new(AtomicUsize::new(0)),
            on_interest: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Never blocks; an event nobody listens to is dropped at once.
    pub fn publish(&self, event: Event) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(event));
        }
    }

    /// Whether anyone listens (the kernel source checks it before emitting).
    pub fn has_subscribers(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }

    /// Sets what to do when interest starts or stops (turning kernel events on and off), and
    /// does it at once for whether anyone listens now. The count is read under the lock a
    /// subscriber's first call takes, so one who arrives meanwhile is never missed: either it
    /// is counted here, or its call waits for `f` and makes it.
    pub fn on_interest(&self, f: impl Fn(bool) + Send + Sync + 'static) {
        let mut slot = self.on_interest.lock().recover();
        f(self.has_subscribers());
        *slot = Some(Box::new(f));
    }

    pub fn subscribe(&self) -> Subscription {
        let rx = self.tx.subscribe();
        if self.subscribers.fetch_add(1, Ordering::Relaxed) == 0 {
            self.interest_changed();
        }
        Subscription {
            rx,
            bus: self.clone(),
        }
    }

    /// Applies whether anyone listens now, read under the lock: a subscriber arriving while
    /// the last one leaves cannot have its "on" overtaken by the leaver's "off".
    fn interest_changed(&self) {
        if let Some(f) = self.on_interest.lock().recover().as_ref() {
            f(self.has_subscribers());
        }
    }
}

/// A subscriber; leaving (drop) is counted.
pub struct Subscription {
    pub rx: broadcast::Receiver<Arc<Event>>,
    bus: EventBus,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.bus.subscribers.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.bus.interest_changed();
        }
    }
}

/// `?broker=&listener=&kind=` of `/v1/events`; each a comma-separated list, absent = any.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub broker: Option<String>,
    pub listener: Option<String>,
    pub kind: Option<String>,
}

/// Every kind an event may have.
pub const KINDS: [&str; 7] = [
    "broker_started",
    "broker_stopped",
    "broker_state",
    "connection_open",
    "connection_close",
    "connection_reset",
    "retransmit",
];

impl Filter {
    /// The first unknown kind, if any.
    pub fn unknown_kind(&self) -> Option<String> {
        self.kind
            .as_deref()?
            .split(',')
            .find(|k| !KINDS.contains(&k.trim()))
            .map(str::to_string)
    }

    pub fn matches(&self, e: &Event) -> bool {
        let any = |want: &Option<String>, have: Option<&str>| match want {
            None => true,
            Some(list) => have.is_some_and(|h| list.split(',').any(|w| w.trim() == h)),
        };
        any(&self.kind, Some(e.kind))
            && any(&self.broker, e.broker.as_deref())
            && any(&self.listener, e.listener.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slow_subscriber_learns_how_many_it_lost() {
        let bus = EventBus::with_capacity(4);
        let mut sub = bus.subscribe();
        for i in 0..10 {
            bus.publish(Event::new(
                "broker_started",
                Some(i.to_string()),
                serde_json::json!({}),
            ));
        }
        assert_eq!(
            sub.rx.recv().await.unwrap_err(),
            broadcast::error::RecvError::Lagged(6)
        );
        assert_eq!(sub.rx.recv().await.unwrap().broker.as_deref(), Some("6"));
    }

    #[test]
    fn interest_follows_the_first_and_last_subscriber() {
        let bus = EventBus::default();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.on_interest(move |on| s.lock().unwrap().push(on));
        let a = bus.subscribe();
        let b = bus.subscribe();
        drop(a);
        drop(b);
        assert_eq!(*seen.lock().unwrap(), [false, true, false]);
    }

    /// Subscribers arriving and leaving on several threads at once: whatever the interleaving,
    /// the last word the kernel side got matches whether anyone listens. Each round, one thread
    /// ends by staying subscribed while the others still come and go.
    #[test]
    fn interest_ends_right_when_subscribers_come_and_go_on_many_threads() {
        let bus = EventBus::default();
        let on = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let o = on.clone();
        // A slow switch (as the kernel map write is, beside these loops) keeps the lock held
        // often, so the threads' turns at it come in another order than their counts changed.
        bus.on_interest(move |now| {
            std::thread::sleep(std::time::Duration::from_micros(20));
            o.store(now, Ordering::SeqCst);
        });
        let churn = |times: usize| {
            for _ in 0..times {
                drop(bus.subscribe());
            }
        };
        for round in 0..200 {
            let kept = std::thread::scope(|scope| {
                for _ in 0..3 {
                    scope.spawn(|| churn(100));
                }
                scope
                    .spawn(|| {
                        churn(50);
                        bus.subscribe()
                    })
                    .join()
                    .unwrap()
            });
            assert!(
                on.load(Ordering::SeqCst),
                "round {round}: off with one listening"
            );
            drop(kept);
            assert!(!on.load(Ordering::SeqCst), "round {round}: on with nobody");
        }
    }

    #[test]
    fn kernel_events_read_as_users_expect() {
        use brokerscope_common::sockets::*;
        let mut local = [0u8; 16];
        local[10..12].copy_from_slice(&[0xff, 0xff]);
        local[12..].copy_from_slice(&[127, 0, 0, 1]);
        let close = ConnEvent {
            kind: CONN_CLOSE,
            netns: 4026531840,
            port: 9092,
            remote_port: 51000,
            family: 2,
            local_addr: local,
            remote_addr: local,
            bytes_sent: 10,
            bytes_received: 20,
            duration_ns: 30,
            ..ConnEvent::default()
        };
        let e = conn_event(&close, Some("1".into()));
        assert_eq!(e.kind, "connection_close");
        assert_eq!(
            e.detail,
            serde_json::json!({"netns": 4026531840u32, "port": 9092, "local": "127.0.0.1:9092",
                "remote": "127.0.0.1:51000", "bytes_sent": 10, "bytes_received": 20, "duration_ns": 30})
        );
        let reset = ConnEvent {
            kind: CONN_RESET_RECEIVED,
            netns: 1,
            port: 9092,
            ..ConnEvent::default()
        };
        assert_eq!(
            conn_event(&reset, None).detail,
            serde_json::json!({"netns": 1, "port": 9092, "direction": "received"})
        );
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(address(10, v6, 9092), "[::1]:9092");
    }

    #[test]
    fn filters_match_by_lists() {
        let mut e = Event::new("connection_open", Some("1".into()), serde_json::json!({}));
        e.listener = Some("PLAINTEXT".into());
        let f = |b: Option<&str>, l: Option<&str>, k: Option<&str>| Filter {
            broker: b.map(Into::into),
            listener: l.map(Into::into),
            kind: k.map(Into::into),
        };
        assert!(f(None, None, None).matches(&e));
        assert!(f(Some("2,1"), Some("PLAINTEXT"), Some("connection_open")).matches(&e));
        assert!(!f(Some("2"), None, None).matches(&e));
        assert!(!f(None, None, Some("retransmit")).matches(&e));
        assert_eq!(
            f(None, None, Some("open,retransmit"))
                .unknown_kind()
                .as_deref(),
            Some("open")
        );
    }
}
