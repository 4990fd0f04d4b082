//! Why a connection never became an authenticated one: a small fixed set of reasons, counted in
//! `brokerscope_tls_handshake_failures_total{reason}` and logged at info, per reason at most
//! [`LOG_BURST`] lines at once and then one per [`LOG_EVERY`] (each line with the number of
//! failures not logged before it), so a flood never sets the log's pace.
//!
//! Classifying only; the accept loop and the connection tasks (`server`) decide and count.

use std::{
    fmt, io,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::locks::Recover as _;

pub use crate::stats::Failure;

/// Once its burst is spent, a reason's failures are logged once per this.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Lines a reason may log back to back (a few distinct failures in a row stay visible).
pub const LOG_BURST: u32 = 5;

/// The reason for a handshake that ended with `error` (tokio-rustls wraps rustls errors in
/// `io::Error`; anything else is the socket's).
pub fn classify(error: &io::Error) -> Failure {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        // EOF, reset, broken pipe, unreachable: the peer or the path to it is gone.
        return Failure::PeerClosed;
    };
    match tls {
        rustls::Error::NoCertificatesPresented => Failure::NoCertificate,
        rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_) => {
            Failure::BadCertificate
        }
        rustls::Error::AlertReceived(_) => Failure::PeerClosed,
        _ => Failure::Protocol,
    }
}

/// Lets log lines through as a token bucket: `burst` at once, then one per `every`; counts the
/// ones held back.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    burst: u32,
    state: Mutex<ThrottleState>,
}

#[derive(Debug)]
struct ThrottleState {
    /// Lines that may be written now.
    tokens: u32,
    /// When the next token is due (while `tokens < burst`).
    refill_at: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub fn new(every: Duration, burst: u32) -> Self {
        let burst = burst.max(1);
        Self {
            every,
            burst,
            state: Mutex::new(ThrottleState {
                tokens: burst,
                refill_at: None,
                suppressed: 0,
            }),
        }
    }

    /// One more event at `now`: Some(events held back since the last line) when a line may be
    /// written, None when this one is held back.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().recover();
        while let Some(at) = s.refill_at
            && now >= at
        {
            s.tokens += 1;
            s.refill_at = (s.tokens < self.burst).then(|| at + self.every);
        }
        if s.tokens == 0 {
            s.suppressed += 1;
            return None;
        }
        s.tokens -= 1;
        if s.refill_at.is_none() {
            s.refill_at = Some(now + self.every);
        }
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// One [`Throttle`] per reason.
#[derive(Debug)]
pub struct FailureLog {
    throttles: [Throttle; Failure::ALL.len()],
}

impl Default for FailureLog {
    fn default() -> Self {
        Self {
            throttles: std::array::from_fn(|_| Throttle::new(LOG_EVERY, LOG_BURST)),
        }
    }
}

impl FailureLog {
    /// Logs at info, unless this reason's [`Throttle`] holds the line back.
    pub fn log(&self, failure: Failure, peer: SocketAddr, detail: &dyn fmt::Display) {
        if let Some(suppressed) = self.throttles[failure.index()].check(Instant::now()) {
            tracing::info!(
                %peer,
                reason = %failure,
                suppressed,
                error = %detail,
                "TLS handshake refused"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn labels_are_fixed_and_indexed() {
        let labels: Vec<_> = Failure::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(
            labels,
            [
                "timeout",
                "no_certificate",
                "bad_certificate",
                "protocol",
                "peer_closed",
                "shed_per_peer",
                "shed_total"
            ]
        );
        for (i, f) in Failure::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
        }
        assert!(Failure::ShedTotal.is_shed() && Failure::ShedPerPeer.is_shed());
        assert!(!Failure::Timeout.is_shed());
    }

    #[test]
    fn rustls_and_socket_errors_map_to_reasons() {
        use rustls::{AlertDescription, CertificateError, PeerIncompatible};
        let cases = [
            (
                wrapped(rustls::Error::NoCertificatesPresented),
                Failure::NoCertificate,
            ),
            (
                wrapped(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                )),
                Failure::BadCertificate,
            ),
            (
                wrapped(rustls::Error::InvalidCertificate(CertificateError::Expired)),
                Failure::BadCertificate,
            ),
            (
                wrapped(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidYet,
                )),
                Failure::BadCertificate,
            ),
            (
                wrapped(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                Failure::Protocol,
            ),
            (
                wrapped(rustls::Error::PeerIncompatible(
                    PeerIncompatible::SupportedVersionsExtensionRequired,
                )),
                Failure::Protocol,
            ),
            (
                wrapped(rustls::Error::NoApplicationProtocol),
                Failure::Protocol,
            ),
            (
                wrapped(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
                Failure::PeerClosed,
            ),
            (
                io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"),
                Failure::PeerClosed,
            ),
            (
                io::Error::from(io::ErrorKind::ConnectionReset),
                Failure::PeerClosed,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(classify(&error), want, "{error}");
        }
    }

    #[test]
    fn the_throttle_lets_a_burst_then_one_line_per_period_through_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.check(t0), Some(0));
        }
        for i in 1..=1000 {
            assert_eq!(t.check(t0 + Duration::from_millis(i)), None);
        }
        // One token back after 10 s: the line says how many were held back.
        assert_eq!(t.check(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(t.check(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.check(t0 + Duration::from_secs(20)), Some(1));
        // A long quiet spell refills the burst, never more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(t.check(later), Some(0));
        }
        assert_eq!(t.check(later), None);
        // Under a flood: one line per period, whatever the rate.
        let mut lines = 0;
        for ms in 0..60_000 {
            if t.check(later + Duration::from_millis(ms)).is_some() {
                lines += 1;
            }
        }
        assert_eq!(lines, 5);
    }
}
