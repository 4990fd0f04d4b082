//! Request and connection limits: the per-identity token bucket, and the fixed caps and timeouts
//! that keep slow, silent or greedy clients from pinning the endpoint.
//!
//! Connections have two budgets: *pending* ones (accepted, TLS handshake with a verified client
//! certificate not finished yet; per peer and in total, see `admission`) and *authenticated* ones
//! ([`MAX_CONNECTIONS`]). Both fit, with [`CLOSING_SLACK`], in the process's descriptor limit
//! ([`Budget::fit`]). docs/hostile-clients.md explains the numbers.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::locks::Recover as _;

/// Authenticated connections (handshake done, client certificate verified) served at once; the
/// next one is closed right after its handshake and counted.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections still in the TLS handshake, all peers together. A new one beyond it sheds a
/// pending connection of the peer with the most (`admission`).
pub const MAX_PENDING: usize = 256;
/// Connections still in the TLS handshake from one peer (an IPv4 address, an IPv6 /64). A new
/// one beyond it sheds one of that peer's pending connections.
pub const MAX_PENDING_PER_PEER: usize = 32;
/// Sockets allowed beyond both budgets: connections shed or refused whose task has not closed
/// them yet. Past `MAX_PENDING + MAX_CONNECTIONS + CLOSING_SLACK` sockets a new connection is
/// closed right after accept, so the process never runs out of descriptors.
pub const CLOSING_SLACK: usize = 64;
/// Descriptors kept for everything else the agent opens (BPF programs, maps and links, `/proc`
/// files, the config and TLS files being reloaded).
pub const FD_RESERVE: usize = 512;
/// Requests being handled at once, all connections together; beyond it, 503.
pub const MAX_IN_FLIGHT: usize = 256;
/// HTTP/2 streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Connections the kernel completes and queues while the accept loop is busy (capped by
/// `net.core.somaxconn`). The default of tokio and std, 128, overflows under a flood of a few
/// hundred connections on a busy node; a SYN dropped for it costs a real client a 1 s
/// retransmission. Queued connections take kernel memory, not descriptors.
pub const LISTEN_BACKLOG: i32 = 4096;
/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The handshake timeout of a connection accepted while the pending budget, in total or its
/// peer's, is at least half full. A real client's handshake takes milliseconds.
pub const HANDSHAKE_TIMEOUT_UNDER_PRESSURE: Duration = Duration::from_secs(3);
/// HTTP/1: a request's headers must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request handled or streamed, and none started or finished for this
/// long, is closed (HTTP/1 keep-alive and HTTP/2 alike; HTTP/2 gets a GOAWAY). A response body
/// that cannot write a byte for this long (the client stopped reading) drops the connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2: PING a quiet peer this often; no answer within `H2_KEEPALIVE_TIMEOUT` closes it.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header block (HTTP/1 read buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest request body; beyond it, 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Distinct client identities the rate limiter remembers.
pub const RATE_LIMIT_IDENTITIES: usize = 1024;

/// The connection budgets as this process can hold them: the fixed caps, cut down when
/// `RLIMIT_NOFILE` leaves less room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub pending: usize,
    pub pending_per_peer: usize,
    pub authenticated: usize,
    /// Sockets of the endpoint at most, every state together.
    pub sockets: usize,
}

impl Budget {
    /// Descriptors the fixed caps need (the soft `RLIMIT_NOFILE` [`raise_nofile`] asks for).
    pub const WANTED_FDS: u64 = (MAX_PENDING + MAX_CONNECTIONS + CLOSING_SLACK + FD_RESERVE) as u64;

    /// The budgets for a soft `RLIMIT_NOFILE` of `nofile`: the fixed caps when they fit beside
    /// [`FD_RESERVE`], else each cut in proportion (at least 1), so the pending budget can never
    /// take the sockets the authenticated one needs.
    pub fn fit(nofile: u64) -> Self {
        let want = MAX_PENDING + MAX_CONNECTIONS + CLOSING_SLACK;
        let room = usize::try_from(nofile)
            .unwrap_or(usize::MAX)
            .saturating_sub(FD_RESERVE);
        if room >= want {
            return Self {
                pending: MAX_PENDING,
                pending_per_peer: MAX_PENDING_PER_PEER,
                authenticated: MAX_CONNECTIONS,
                sockets: want,
            };
        }
        let part = |cap: usize| (cap * room / want).max(1);
        let pending = part(MAX_PENDING);
        let authenticated = part(MAX_CONNECTIONS);
        Self {
            pending,
            pending_per_peer: MAX_PENDING_PER_PEER.min(pending),
            authenticated,
            sockets: room.max(pending + authenticated),
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` towards `want` (never above the hard limit, never down) and
/// returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur >= want || limit.rlim_cur >= limit.rlim_max {
        return limit.rlim_cur;
    }
    let raised = libc::rlimit {
        rlim_cur: want.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we pass; no other effects on memory.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        raised.rlim_cur
    } else {
        limit.rlim_cur
    }
}

/// What the limiter says about one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Allow,
    /// Over the limit; a token is back after `retry_after`.
    Deny {
        retry_after: Duration,
    },
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A token bucket per client identity: `burst` requests at once, refilled at `rps` per second.
///
/// The table holds at most `capacity` identities. To admit a new one into a full table it
/// first forgets every identity whose bucket has refilled completely (forgetting those changes
/// nothing), then, if still full, the least recently seen one (which gets a fresh burst should
/// it come back: the price of bounded memory).
pub struct RateLimiter {
    capacity: usize,
    inner: Mutex<Limits>,
}

/// The rates and the buckets, under one lock so a live change is seen whole.
struct Limits {
    rps: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    pub fn new(rps: u32, burst: u32, capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Limits {
                rps: f64::from(rps.max(1)),
                burst: f64::from(burst.max(1)),
                buckets: HashMap::new(),
            }),
        }
    }

    /// Changes the rates live (`server.rate_limit_rps`, `server.rate_limit_burst`). Buckets keep
    /// their tokens, cut to the new burst: a change never hands out a fresh burst.
    pub fn set_rates(&self, rps: u32, burst: u32) {
        let mut inner = self.lock();
        inner.rps = f64::from(rps.max(1));
        inner.burst = f64::from(burst.max(1));
        let burst = inner.burst;
        for bucket in inner.buckets.values_mut() {
            bucket.tokens = bucket.tokens.min(burst);
        }
    }

    /// The rates in force: (per second, burst).
    pub fn rates(&self) -> (u32, u32) {
        let inner = self.lock();
        (inner.rps as u32, inner.burst as u32)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.inner.lock().recover()
    }

    /// Takes one token for `identity` at `now`.
    pub fn check(&self, identity: &str, now: Instant) -> Verdict {
        let mut inner = self.lock();
        let (rps, burst) = (inner.rps, inner.burst);
        if !inner.buckets.contains_key(identity) && inner.buckets.len() >= self.capacity {
            self.evict(&mut inner, now);
        }
        let bucket = inner.buckets.entry(identity.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rps).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Verdict::Allow
        } else {
            let wait = (1.0 - bucket.tokens) / rps;
            Verdict::Deny {
                retry_after: Duration::from_secs_f64(wait),
            }
        }
    }

    /// Identities currently remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().buckets.len()
    }

    fn evict(&self, inner: &mut Limits, now: Instant) {
        let refill = Duration::from_secs_f64(inner.burst / inner.rps);
        let buckets = &mut inner.buckets;
        buckets.retain(|_, b| now.saturating_duration_since(b.last) < refill);
        if buckets.len() >= self.capacity
            && let Some(oldest) = buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone())
        {
            buckets.remove(&oldest);
        }
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_rate() {
        let limiter = RateLimiter::new(2, 3, 16);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(limiter.check("op", t0), Verdict::Allow, "request {i}");
        }
        assert_eq!(
            limiter.check("op", t0),
            Verdict::Deny {
                retry_after: Duration::from_millis(500)
            }
        );
        // 250 ms at 2/s is half a token: still denied, 250 ms to go.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(
            limiter.check("op", t1),
            Verdict::Deny {
                retry_after: Duration::from_millis(250)
            }
        );
        let t2 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check("op", t2), Verdict::Allow);
        assert!(matches!(limiter.check("op", t2), Verdict::Deny { .. }));
        // Never more than the burst, however long the pause.
        let t3 = t2 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limiter.check("op", t3), Verdict::Allow);
        }
        assert!(matches!(limiter.check("op", t3), Verdict::Deny { .. }));
    }

    #[test]
    fn identities_are_limited_separately() {
        let limiter = RateLimiter::new(1, 1, 16);
        let t0 = Instant::now();
        assert_eq!(limiter.check("a", t0), Verdict::Allow);
        assert!(matches!(limiter.check("a", t0), Verdict::Deny { .. }));
        assert_eq!(limiter.check("b", t0), Verdict::Allow);
    }

    #[test]
    fn table_is_bounded_and_evicts_idle_then_oldest() {
        let limiter = RateLimiter::new(1, 2, 3);
        let t0 = Instant::now();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            limiter.check(id, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(limiter.len(), 3);
        // Nobody has refilled yet: the least recently seen ("a") goes.
        let t1 = t0 + Duration::from_millis(10);
        limiter.check("d", t1);
        assert_eq!(limiter.len(), 3);
        assert_eq!(limiter.check("b", t1), Verdict::Allow);
        assert!(matches!(limiter.check("b", t1), Verdict::Deny { .. }));
        // "a" was forgotten: it starts with a full burst again.
        limiter.check("c", t1);
        limiter.check("d", t1);
        for _ in 0..2 {
            assert_eq!(limiter.check("a", t1), Verdict::Allow);
        }
        assert_eq!(limiter.len(), 3);
        // After a full refill period everyone idle is dropped at once.
        let t2 = t1 + Duration::from_secs(10);
        limiter.check("e", t2);
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn rates_change_live_without_a_fresh_burst() {
        let limiter = RateLimiter::new(1, 4, 16);
        let t0 = Instant::now();
        assert_eq!(limiter.check("op", t0), Verdict::Allow);
        // 3 tokens left; a burst of 2 cuts them to 2.
        limiter.set_rates(10, 2);
        assert_eq!(limiter.check("op", t0), Verdict::Allow);
        assert_eq!(limiter.check("op", t0), Verdict::Allow);
        assert_eq!(
            limiter.check("op", t0),
            Verdict::Deny {
                retry_after: Duration::from_millis(100)
            }
        );
        // Refilled at the new rate: 100 ms is one token at 10/s.
        assert_eq!(
            limiter.check("op", t0 + Duration::from_millis(100)),
            Verdict::Allow
        );
    }

    #[test]
    fn budgets_fit_the_descriptor_limit() {
        let full = Budget::fit(20_000);
        assert_eq!(
            full,
            Budget {
                pending: MAX_PENDING,
                pending_per_peer: MAX_PENDING_PER_PEER,
                authenticated: MAX_CONNECTIONS,
                sockets: MAX_PENDING + MAX_CONNECTIONS + CLOSING_SLACK,
            }
        );
        assert_eq!(Budget::fit(Budget::WANTED_FDS), full);
        // 1024, a common default: 512 after the reserve, each cap cut in proportion.
        let small = Budget::fit(1024);
        assert_eq!(small.sockets, 512);
        assert_eq!(small.pending, MAX_PENDING * 512 / 832);
        assert_eq!(small.authenticated, MAX_CONNECTIONS * 512 / 832);
        assert!(small.pending + small.authenticated <= small.sockets);
        assert_eq!(small.pending_per_peer, MAX_PENDING_PER_PEER);
        // Nothing left: one of each, never zero.
        let none = Budget::fit(10);
        assert_eq!(
            (none.pending, none.pending_per_peer, none.authenticated),
            (1, 1, 1)
        );
        assert_eq!(none.sockets, 2);
    }

    #[test]
    fn nofile_is_raised_to_what_the_budgets_need() {
        // The test process's own limit: raised (or already enough), never lowered.
        let mut before = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we pass.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut before) },
            0
        );
        let now = raise_nofile(Budget::WANTED_FDS);
        assert!(now >= before.rlim_cur);
        assert!(now >= Budget::WANTED_FDS.min(before.rlim_max));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
