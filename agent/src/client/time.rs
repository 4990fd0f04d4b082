//! Times and durations as an operator types and reads them: `5m` and `1h30m` in, local RFC 3339
//! and "12s ago" out.
//!
//! The local offset is read once, before the client starts any thread ([`init_local_offset`]):
//! the C library's time zone state is not thread-safe, and the `time` crate refuses to read it
//! in a process with several threads.

use std::{sync::OnceLock, time::Duration};

use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};

static LOCAL: OnceLock<UtcOffset> = OnceLock::new();

/// Reads the local UTC offset (`TZ`, else /etc/localtime); UTC when it cannot be read.
pub fn init_local_offset() {
    let _ = LOCAL.set(UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC));
}

fn local() -> UtcOffset {
    LOCAL.get().copied().unwrap_or(UtcOffset::UTC)
}

/// Longest duration accepted: about 31 years.
const MAX_SECONDS: u64 = 1_000_000_000;

/// `90`, `90s`, `5m`, `1h30m`, `2d`, `250ms`: a duration as people type it (a bare number is
/// seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "`{}` is not a duration: use a number with a unit, like 30s, 5m, 1h30m or 2d",
            text.chars().take(64).collect::<String>()
        )
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(err());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return (seconds <= MAX_SECONDS)
            .then(|| Duration::from_secs(seconds))
            .ok_or_else(err);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(err()),
        };
        rest = &rest[unit..];
        total = total.saturating_add(part);
    }
    if total.as_secs() > MAX_SECONDS {
        return Err(err());
    }
    Ok(total)
}

/// `logs --since`: how far back, or from when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    Ago(Duration),
    At(OffsetDateTime),
}

impl Since {
    /// The agent's `?since=`: seconds back from now, or RFC 3339 in UTC.
    pub fn query_value(&self) -> String {
        match self {
            Since::Ago(d) => format!("{}", d.as_secs_f64()),
            Since::At(t) => t
                .to_offset(UtcOffset::UTC)
                .format(&Rfc3339)
                .unwrap_or_default(),
        }
    }
}

/// clap's parser for `--since`: a duration back from now, or an RFC 3339 time.
pub fn parse_since(text: &str) -> Result<Since, String> {
    if let Ok(d) = parse_duration(text) {
        return Ok(Since::Ago(d));
    }
    OffsetDateTime::parse(text.trim(), &Rfc3339)
        .map(Since::At)
        .map_err(|_| {
            format!(
                "`{}` is neither a duration (30s, 5m, 1h30m) nor an RFC 3339 time \
                 (2026-11-26T17:00:00Z)",
                text.chars().take(64).collect::<String>()
            )
        })
}

/// An RFC 3339 time from the agent.
pub fn parse_rfc3339(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// A Unix time in milliseconds (events' `time_ms`).
pub fn from_unix_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// `2026-12-05T13:15:02.123+01:00`: RFC 3339 in the local offset, to the millisecond.
pub fn local_rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(local());
    let offset = t.offset();
    let (h, m, _) = offset.as_hms();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}{}{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond(),
        if offset.is_negative() { '-' } else { '+' },
        h.unsigned_abs(),
        m.unsigned_abs()
    )
}

/// A span the way `kubectl` prints ages: `45s`, `5m12s`, `3h4m`, `2d3h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `12s ago` (or `in 3s` for a time ahead of this machine's clock).
pub fn ago(then: OffsetDateTime, now: OffsetDateTime) -> String {
    let d = now - then;
    if d.is_negative() {
        format!("in {}", age(d.unsigned_abs()))
    } else {
        format!("{} ago", age(d.unsigned_abs()))
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn durations_as_people_type_them() {
        let s = Duration::from_secs;
        assert_eq!(parse_duration("90"), Ok(s(90)));
        assert_eq!(parse_duration("90s"), Ok(s(90)));
        assert_eq!(parse_duration("5m"), Ok(s(300)));
        assert_eq!(parse_duration("1h30m"), Ok(s(5400)));
        assert_eq!(parse_duration("2d"), Ok(s(172_800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in [
            "",
            "m",
            "5x",
            "-5m",
            "5m-",
            "1.5h",
            "yesterday",
            "99999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn since_is_a_duration_or_a_time() {
        assert_eq!(
            parse_since("5m").unwrap(),
            Since::Ago(Duration::from_secs(300))
        );
        assert_eq!(parse_since("5m").unwrap().query_value(), "300");
        assert_eq!(
            parse_since("2026-11-26T17:00:00+01:00")
                .unwrap()
                .query_value(),
            "2026-11-26T16:00:00Z"
        );
        let e = parse_since("yesterday").unwrap_err();
        assert!(e.contains("neither a duration"), "{e}");
    }

    #[test]
    fn ages_and_relative_times() {
        let s = Duration::from_secs;
        assert_eq!(age(s(0)), "0s");
        assert_eq!(age(s(45)), "45s");
        assert_eq!(age(s(312)), "5m12s");
        assert_eq!(age(s(3 * 3600 + 4 * 60 + 5)), "3h4m");
        assert_eq!(age(s(2 * 86_400 + 3 * 3600)), "2d3h");
        let now = datetime!(2026-12-05 12:00:12 UTC);
        assert_eq!(ago(datetime!(2026-12-05 12:00:00 UTC), now), "12s ago");
        assert_eq!(ago(datetime!(2026-12-05 12:00:15 UTC), now), "in 3s");
    }

    #[test]
    fn local_times_carry_their_offset() {
        // No offset was read in unit tests: UTC, written as +00:00 to the millisecond.
        assert_eq!(
            local_rfc3339(datetime!(2026-12-05 12:00:01.5 +02:00)),
            "2026-12-05T10:00:01.500+00:00"
        );
        assert_eq!(
            from_unix_ms(1_764_936_001_500).map(local_rfc3339).unwrap(),
            "2025-12-05T12:00:01.500+00:00"
        );
    }
}
