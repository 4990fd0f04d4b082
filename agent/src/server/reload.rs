//! Hot rotation of the TLS material: the current `Arc<rustls::ServerConfig>` sits behind a
//! tokio `watch` channel; every new connection takes the current one, connections already
//! open keep theirs, so a rotation drops nothing.
//!
//! **Polling, on purpose.** Every [`POLL_INTERVAL`] the three files are read in full through
//! their paths (so symlinks are resolved on every read). That sees both shapes of update the
//! agent meets: a Kubernetes Secret volume swapping its `..data` symlink to a new timestamped
//! directory (the file paths never change, so inotify on them sees nothing), and a plain
//! in-place rewrite. The files are a few KiB; reading them four times a second costs nothing.
//!
//! **Settling.** A change is applied only once two consecutive polls read the same contents,
//! so a writer that updates `tls.crt` and `tls.key` one after the other is not caught in
//! between (and not counted as a failure). New material is therefore live 0.25–0.5 s after it is
//! written.
//!
//! **Failures.** A set that does not load (bad PEM, key not matching the certificate, expired
//! server certificate, unreadable file) keeps the old config, is logged with the reason and
//! counted once in `brokerscope_tls_reload_failures_total`; it is retried when the files change.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::watch;

use super::tls::{self, LeafInfo, TlsError};
use crate::{config::ServerConfig as ServerSection, stats::ServerStats};

pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What one poll decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The files are what was last applied (or last refused).
    Unchanged,
    /// The files differ from the last poll: wait one more poll for them to settle.
    Settling,
    /// The files changed and read the same twice: load them.
    Apply,
}

/// The reload decision, kept apart from I/O so it can be tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    /// Fingerprint of the set last applied or refused.
    settled: u64,
    /// Fingerprint read at the previous poll.
    last_seen: u64,
}

impl Watch {
    pub fn new(initial: u64) -> Self {
        Self {
            settled: initial,
            last_seen: initial,
        }
    }

    pub fn observe(&mut self, current: u64) -> Decision {
        let previous = std::mem::replace(&mut self.last_seen, current);
        if current == self.settled {
            Decision::Unchanged
        } else if current != previous {
            Decision::Settling
        } else {
            // Applied or refused, this set is done with until the files change again.
            self.settled = current;
            Decision::Apply
        }
    }
}

/// Fingerprint of the material as read now; an unreadable file contributes its error kind, so
/// a file that disappears is a change too.
pub fn fingerprint(section: &ServerSection) -> u64 {
    let mut h = DefaultHasher::new();
    for path in [
        &section.cert_file,
        &section.key_file,
        &section.client_ca_file,
    ] {
        match std::fs::read(path) {
            Ok(bytes) => {
                0u8.hash(&mut h);
                bytes.hash(&mut h);
            }
            Err(e) => {
                1u8.hash(&mut h);
                (e.kind() as u32).hash(&mut h);
            }
        }
    }
    h.finish()
}

/// Why an expiry deserves a warning, if it does: less than 24 h left, or less than a third of
/// the certificate's lifetime.
pub fn expiry_warning(leaf: &LeafInfo, now: i64) -> Option<String> {
    let left = leaf.not_after - now;
    let lifetime = (leaf.not_after - leaf.not_before).max(1);
    if left < 24 * 3600 {
        Some(format!(
            "server certificate expires in {}s, less than 24h",
            left.max(0)
        ))
    } else if left * 3 < lifetime {
        Some(format!(
            "server certificate expires in {}h, less than a third of its {}h lifetime",
            left / 3600,
            lifetime / 3600
        ))
    } else {
        None
    }
}

/// The TLS config in force and the task that keeps it current.
pub struct TlsSource {
    section: ServerSection,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    stats: Arc<ServerStats>,
    watch: Watch,
    leaf: LeafInfo,
    warned: bool,
}

impl TlsSource {
    /// Loads the material once; failing here fails the start.
    pub fn load(section: &ServerSection, stats: Arc<ServerStats>) -> Result<Self, TlsError> {
        let initial = fingerprint(section);
        let loaded = tls::load(section, tls::unix_now())?;
        stats
            .tls_cert_expiry
            .store(loaded.leaf.not_after, Ordering::Relaxed);
        let (tx, _) = watch::channel(loaded.config);
        let mut source = Self {
            section: section.clone(),
            tx,
            stats,
            watch: Watch::new(initial),
            leaf: loaded.leaf,
            warned: false,
        };
        source.warn_if_expiring();
        Ok(source)
    }

    pub fn leaf(&self) -> &LeafInfo {
        &self.leaf
    }

    /// A receiver whose current value is the config for the next handshake.
    pub fn subscribe(&self) -> watch::Receiver<Arc<rustls::ServerConfig>> {
        self.tx.subscribe()
    }

    /// Polls forever; run it as a task (it ends when the task is aborted).
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let section = self.section.clone();
            let Ok(current) = tokio::task::spawn_blocking(move || fingerprint(&section)).await
            else {
                continue;
            };
            if self.watch.observe(current) == Decision::Apply {
                let section = self.section.clone();
                match tokio::task::spawn_blocking(move || tls::load(&section, tls::unix_now()))
                    .await
                {
                    Ok(Ok(loaded)) => self.apply(loaded),
                    Ok(Err(e)) => self.refuse(&e),
                    Err(_) => {}
                }
            }
            self.warn_if_expiring();
        }
    }

    fn apply(&mut self, loaded: tls::Loaded) {
        tracing::info!(
            cert = %self.section.cert_file.display(),
            serial = %loaded.leaf.serial,
            not_after = loaded.leaf.not_after,
            "TLS material reloaded; new connections use it"
        );
        self.stats
            .tls_cert_expiry
            .store(loaded.leaf.not_after, Ordering::Relaxed);
        self.stats.tls_reloads.fetch_add(1, Ordering::Relaxed);
        self.leaf = loaded.leaf;
        self.warned = false;
        self.tx.send_replace(loaded.config);
    }

    fn refuse(&self, error: &TlsError) {
        self.stats
            .tls_reload_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %error,
            serial = %self.leaf.serial,
            "TLS reload refused; keeping the current certificate"
        );
    }

    fn warn_if_expiring(&mut self) {
        if self.warned {
            return;
        }
        if let Some(why) = expiry_warning(&self.leaf, tls::unix_now()) {
            tracing::warn!(
                cert = %self.section.cert_file.display(),
                not_after = self.leaf.not_after,
                "{why}; rotate it"
            );
            self.warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    #[test]
    fn a_change_applies_once_it_reads_the_same_twice() {
        let mut w = Watch::new(1);
        assert_eq!(w.observe(1), Decision::Unchanged);
        assert_eq!(w.observe(2), Decision::Settling);
        assert_eq!(w.observe(2), Decision::Apply);
        assert_eq!(w.observe(2), Decision::Unchanged);
        // Written in two steps (cert, then key): only the final set is applied.
        assert_eq!(w.observe(3), Decision::Settling);
        assert_eq!(w.observe(4), Decision::Settling);
        assert_eq!(w.observe(4), Decision::Apply);
        // A refused set is not retried every poll...
        assert_eq!(w.observe(4), Decision::Unchanged);
        // ...but going back to an earlier set is a change again.
        assert_eq!(w.observe(2), Decision::Settling);
        assert_eq!(w.observe(2), Decision::Apply);
        // A flap that returns to the settled set before settling applies nothing.
        assert_eq!(w.observe(5), Decision::Settling);
        assert_eq!(w.observe(2), Decision::Unchanged);
        assert_eq!(w.observe(2), Decision::Unchanged);
    }

    #[test]
    fn expiry_warnings_say_why() {
        let day = 86_400;
        let leaf = LeafInfo {
            serial: "01".into(),
            not_before: 0,
            not_after: 90 * day,
        };
        assert_eq!(expiry_warning(&leaf, 0), None);
        assert_eq!(expiry_warning(&leaf, 60 * day), None);
        assert_eq!(
            expiry_warning(&leaf, 61 * day),
            Some(
                "server certificate expires in 696h, less than a third of its 2160h lifetime"
                    .into()
            )
        );
        assert_eq!(
            expiry_warning(&leaf, 90 * day - 3600),
            Some("server certificate expires in 3600s, less than 24h".into())
        );
        // A 12-hour certificate is under 24h from birth.
        let short = LeafInfo {
            serial: "02".into(),
            not_before: 0,
            not_after: 12 * 3600,
        };
        assert!(expiry_warning(&short, 0).unwrap().contains("less than 24h"));
    }

    fn section(dir: &std::path::Path) -> ServerSection {
        ServerSection {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            client_ca_file: dir.join("ca.crt"),
            ..ServerSection::default()
        }
    }

    #[test]
    fn fingerprint_follows_symlinks_and_sees_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("..v1");
        let v2 = dir.path().join("..v2");
        pki::generate_dev(&v1, pki::Validity::days(1)).unwrap();
        pki::generate_dev(&v2, pki::Validity::days(1)).unwrap();
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink("..v1", &data).unwrap();
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
        }
        let s = section(dir.path());
        let first = fingerprint(&s);
        assert_eq!(fingerprint(&s), first);
        // Swap ..data as the kubelet does: a new link renamed over the old one.
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink("..v2", &tmp).unwrap();
        std::fs::rename(&tmp, &data).unwrap();
        let second = fingerprint(&s);
        assert_ne!(second, first);
        std::fs::remove_file(v2.join("tls.key")).unwrap();
        assert_ne!(fingerprint(&s), second);
    }

    #[tokio::test]
    async fn bad_replacement_keeps_the_old_config_and_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        pki::generate_dev(dir.path(), pki::Validity::days(1)).unwrap();
        let s = section(dir.path());
        let stats = Arc::new(ServerStats::default());
        let mut source = TlsSource::load(&s, stats.clone()).unwrap();
        let rx = source.subscribe();
        let before = rx.borrow().clone();
        let serial = source.leaf().serial.clone();

        std::fs::write(&s.cert_file, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
        let fp = fingerprint(&s);
        assert_eq!(source.watch.observe(fp), Decision::Settling);
        assert_eq!(source.watch.observe(fp), Decision::Apply);
        let err = tls::load(&s, tls::unix_now()).err().unwrap();
        source.refuse(&err);
        assert_eq!(source.watch.observe(fp), Decision::Unchanged);
        assert_eq!(stats.tls_reload_failures.load(Ordering::Relaxed), 1);
        assert!(Arc::ptr_eq(&before, &rx.borrow()));
        assert_eq!(source.leaf().serial, serial);

        // A good set replaces it and the expiry gauge follows.
        pki::generate_dev(dir.path(), pki::Validity::days(3)).unwrap();
        let loaded = tls::load(&s, tls::unix_now()).unwrap();
        let not_after = loaded.leaf.not_after;
        source.apply(loaded);
        assert!(!Arc::ptr_eq(&before, &rx.borrow()));
        assert_eq!(stats.tls_cert_expiry.load(Ordering::Relaxed), not_after);
        assert_eq!(stats.tls_reloads.load(Ordering::Relaxed), 1);
        assert_ne!(source.leaf().serial, serial);
    }
}
