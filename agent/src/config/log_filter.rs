//! `log.level` as a `tracing` filter: validated with the rest of the config, applied by
//! `control::logs`.

use tracing_subscriber::EnvFilter;

/// A `log.level` value as a `tracing` filter, each comma-separated directive trimmed first:
/// tracing-subscriber (0.3.23) reads a directive with leading blanks at the offsets of its
/// trimmed form, so it cut a multi-byte character (a panic, found by fuzzing) or read an ASCII
/// target one byte off. It splits on every comma itself, so trimming around commas changes
/// nothing else.
///
/// Stricter than `tracing`'s own parser, which takes any bare word as a target to enable at
/// every level (so `loud` would silence the agent): a bare directive must be a level, anything
/// else `target=level`.
pub fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    let directives: Vec<&str> = level.split(',').map(str::trim).collect();
    for d in &directives {
        let level_of = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word));
        let ok = match d.rsplit_once('=') {
            Some((target, level)) => !target.is_empty() && level_of(level),
            None => level_of(d),
        };
        if !ok {
            return Err(format!(
                "`{d}` is neither a level ({}) nor `target=level`",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::builder()
        .parse(directives.join(","))
        .map_err(|e| e.to_string())
}

/// The levels a filter directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
