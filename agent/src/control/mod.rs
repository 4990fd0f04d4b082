//! The operator's control channel behind `/v1/config`, `/v1/logs` and `/v1/diagnostics`: live
//! configuration, the in-memory log ring and the diagnostics bundle. The event bus behind
//! `/v1/events` is `crate::events`, below the model that publishes on it.
//!
//! Owns the effective configuration and the log ring; it reaches the running parts (server
//! policy, discovery, probes) only through their own live setters, never their internals.

pub mod config;
pub mod diagnostics;
pub mod logs;

use std::{path::PathBuf, sync::Arc, time::Duration};

use self::{
    config::{LiveConfig, Targets},
    logs::{LogLevel, LogRing},
};
use crate::{config::Config, discovery::Discovery, model::Model, policy::ListenerPolicy};

/// How often the config file is checked for changes (besides SIGHUP).
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// Everything the control routes need.
pub struct Control {
    pub config: LiveConfig,
    pub logs: Arc<LogRing>,
}

impl Control {
    pub fn new(
        config: Config,
        path: Option<PathBuf>,
        model: Arc<Model>,
        server: Arc<ListenerPolicy>,
        discovery: Option<Arc<Discovery>>,
        log_level: LogLevel,
        logs: Arc<LogRing>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: LiveConfig::new(
                config,
                path,
                Targets {
                    model,
                    server,
                    discovery,
                    log_level,
                },
            ),
            logs,
        })
    }

    /// No discovery, no subscriber to switch, defaults (unit tests of the router).
    #[cfg(test)]
    pub fn detached(model: Arc<Model>, server: Arc<ListenerPolicy>) -> Arc<Self> {
        Self::new(
            Config::default(),
            None,
            model,
            server,
            None,
            LogLevel::detached(),
            Arc::new(LogRing::default()),
        )
    }

    /// Applies the config file again on SIGHUP and whenever its content changes (polled every
    /// [`FILE_POLL`]); through the same validation as `PATCH /v1/config`.
    pub fn spawn_file_watch(self: Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let path = self.config.path()?.to_path_buf();
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; the config file is still polled");
                None
            }
        };
        Some(crate::tasks::spawn("config-file-watch", async move {
            // None: the first poll re-reads the file, so a change written between the start's
            // read and this task's first look is not missed (an unchanged file changes nothing).
            let mut last: Option<Vec<u8>> = None;
            let mut tick = tokio::time::interval(FILE_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = tick.tick() => {
                        let now = tokio::fs::read(&path).await.ok();
                        if now == last || now.is_none() {
                            continue;
                        }
                        last = now;
                        "changed"
                    }
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                        last = tokio::fs::read(&path).await.ok();
                        "SIGHUP"
                    }
                };
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.config.reload_file()).await {
                    Ok(Ok(applied)) if applied.changed.is_empty() => {
                        tracing::debug!(why, "config file read; nothing changed")
                    }
                    Ok(Ok(applied)) => tracing::info!(
                        why,
                        changed = applied.changed.len(),
                        generation = applied.generation,
                        "config file applied"
                    ),
                    Ok(Err(e)) => {
                        tracing::error!(why, error = %e, "config file refused; nothing changed")
                    }
                    Err(e) => tracing::error!(error = %e, "config reload task failed"),
                }
            }
        }))
    }
}
