//! The agent's recent log lines, kept in memory for `GET /v1/logs` and diagnostics, and the
//! live log level.
//!
//! A bounded ring ([`LINES`] lines, each cut to [`MAX_LINE`] bytes) fed by a `tracing` layer:
//! every event that passes the level filter, the kernel side's aya-log lines included (they
//! arrive as events with target `kernel`). When full, the oldest line goes and is counted.
//! Owns no I/O.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{EnvFilter, Registry, layer::Context, reload};

use crate::config::parse_filter;
use crate::locks::Recover as _;

/// Lines the ring holds.
pub const LINES: usize = 4096;
/// Longest line kept, in bytes; the rest is cut.
pub const MAX_LINE: usize = 2048;

/// One log line.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LogLine {
    /// RFC 3339, UTC.
    pub time: String,
    #[serde(skip)]
    pub unix_nanos: i128,
    pub level: &'static str,
    pub target: String,
    /// The message, then ` key=value` per field.
    pub message: String,
}

/// The ring. Cheap to share.
pub struct LogRing {
    lines: Mutex<VecDeque<LogLine>>,
    capacity: usize,
    dropped: AtomicU64,
}

impl Default for LogRing {
    fn default() -> Self {
        Self::with_capacity(LINES)
    }
}

impl LogRing {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(LINES))),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn push(&self, line: LogLine) {
        let mut lines = self.lines.lock().recover();
        if lines.len() >= self.capacity {
            lines.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        lines.push_back(line);
    }

    /// Lines pushed out of the ring since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines at or after `since_unix_nanos` and at `level` or more severe, oldest first.
    pub fn query(&self, since_unix_nanos: Option<i128>, level: Option<Level>) -> Vec<LogLine> {
        let lines = self.lines.lock().recover();
        lines
            .iter()
            .filter(|l| since_unix_nanos.is_none_or(|s| l.unix_nanos >= s))
            .filter(|l| level.is_none_or(|want| level_of(l.level) <= want))
            .cloned()
            .collect()
    }
}

fn level_of(name: &str) -> Level {
    match name {
        "error" => Level::ERROR,
        "warn" => Level::WARN,
        "info" => Level::INFO,
        "debug" => Level::DEBUG,
        _ => Level::TRACE,
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// `?level=` of `/v1/logs`: the least severe level wanted.
pub fn parse_level(text: &str) -> Option<Level> {
    match text.to_ascii_lowercase().as_str() {
        "error" => Some(Level::ERROR),
        "warn" | "warning" => Some(Level::WARN),
        "info" => Some(Level::INFO),
        "debug" => Some(Level::DEBUG),
        "trace" => Some(Level::TRACE),
        _ => None,
    }
}

/// The `tracing` layer that feeds a [`LogRing`].
pub struct RingLayer(pub Arc<LogRing>);

impl<S: Subscriber> tracing_subscriber::Layer<S> for RingLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let mut message = visitor.message;
        if !visitor.fields.is_empty() {
            if !message.is_empty() {
                message.push(' ');
            }
            message.push_str(&visitor.fields);
        }
        cut(&mut message, MAX_LINE);
        let now = time::OffsetDateTime::now_utc();
        self.0.push(LogLine {
            time: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            unix_nanos: now.unix_timestamp_nanos(),
            level: level_name(meta.level()),
            target: meta.target().chars().take(128).collect(),
            message,
        });
    }
}

fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.add(field, format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.add(field, format_args!("{value:?}"));
        }
    }
}

impl Fields {
    fn add(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if self.fields.len() > MAX_LINE {
            return;
        }
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{}={}", field.name(), value);
    }
}

/// Switches the agent's log filter live (`log.level`).
#[derive(Clone)]
pub struct LogLevel {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("`{level}` is not a log level or filter: {reason}")]
    Parse { level: String, reason: String },
    #[error("the log filter cannot be changed: {source}")]
    Reload {
        #[source]
        source: reload::Error,
    },
}

impl LogLevel {
    pub fn new(handle: reload::Handle<EnvFilter, Registry>) -> Self {
        Self {
            handle: Some(handle),
        }
    }

    /// No subscriber to switch: setting a level only checks it (unit tests, fuzz targets).
    pub fn detached() -> Self {
        Self { handle: None }
    }

    pub fn set(&self, level: &str) -> Result<(), LogLevelError> {
        let filter = parse_filter(level).map_err(|reason| LogLevelError::Parse {
            level: level.into(),
            reason,
        })?;
        match &self.handle {
            Some(handle) => handle
                .reload(filter)
                .map_err(|source| LogLevelError::Reload { source }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn line(i: i128, level: &'static str) -> LogLine {
        LogLine {
            time: String::new(),
            unix_nanos: i,
            level,
            target: "t".into(),
            message: format!("line {i}"),
        }
    }

    #[test]
    fn directives_are_trimmed_before_tracing_reads_them() {
        // Found by fuzzing (config_file): a directive after `, ` whose target holds a
        // multi-byte character made tracing-subscriber slice inside it (a panic), and an ASCII
        // one was read one byte off (`, brokerscope=debug` named the target ` brokerscop`).
        for bad in ["loud", "info,loud", "brokerscope=loud", "=info", ""] {
            let e = parse_filter(bad).unwrap_err();
            assert!(e.contains("neither a level"), "{bad}: {e}");
        }
        for good in [
            "INFO",
            "off",
            "info,kernel=warn",
            "brokerscope::server=trace",
        ] {
            assert!(parse_filter(good).is_ok(), "{good}");
        }
        let f = parse_filter("warn, brokerscope=debug").unwrap();
        assert_eq!(f.to_string(), "brokerscope=debug,warn");
        assert!(parse_filter(" é=info").is_ok());
        assert!(parse_filter("info,\u{a0}é=nonsense").is_err());
        LogLevel::detached()
            .set("info , kafka\u{e9}=trace")
            .unwrap();
    }

    #[test]
    fn ring_is_bounded_and_counts_what_it_drops() {
        let ring = LogRing::with_capacity(3);
        for i in 0..5 {
            ring.push(line(i, "info"));
        }
        assert_eq!(ring.dropped(), 2);
        let all = ring.query(None, None);
        assert_eq!(
            all.iter().map(|l| l.unix_nanos).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(ring.query(Some(4), None).len(), 1);
    }

    #[test]
    fn level_filter_keeps_more_severe_lines() {
        let ring = LogRing::with_capacity(10);
        for (i, level) in ["error", "warn", "info", "debug"].into_iter().enumerate() {
            ring.push(line(i as i128, level));
        }
        let levels = |l| {
            ring.query(None, parse_level(l))
                .iter()
                .map(|l| l.level)
                .collect::<Vec<_>>()
        };
        assert_eq!(levels("error"), ["error"]);
        assert_eq!(levels("warn"), ["error", "warn"]);
        assert_eq!(levels("debug"), ["error", "warn", "info", "debug"]);
        assert_eq!(parse_level("loud"), None);
    }

    #[test]
    fn layer_records_message_fields_and_target() {
        let ring = Arc::new(LogRing::with_capacity(8));
        let subscriber = Registry::default().with(RingLayer(ring.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "kernel", "dropped {} events", 3);
            tracing::info!(broker = "1", port = 9092, "broker found");
        });
        let lines = ring.query(None, None);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (
                lines[0].level,
                lines[0].target.as_str(),
                lines[0].message.as_str()
            ),
            ("warn", "kernel", "dropped 3 events")
        );
        assert_eq!(lines[1].message, "broker found broker=1 port=9092");
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let mut s = "é".repeat(MAX_LINE);
        cut(&mut s, 5);
        assert_eq!(s, "éé");
    }
}
