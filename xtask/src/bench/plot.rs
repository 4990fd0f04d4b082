//! A small SVG line plot of our own for the soak report: time on x, one or more lines, events
//! marked with vertical lines. The y axis starts at zero when every value is positive, so a
//! flat curve looks flat and a small wobble is not blown up to the plot's height.

use std::fmt::Write as _;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 320.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
];

/// One curve: (seconds, value) points in time order. A gap longer than `GAP_S` between two
/// points breaks the line (the agent was down, or a scrape failed).
pub struct Line<'a> {
    pub label: &'a str,
    pub points: &'a [(f64, f64)],
}

const GAP_S: f64 = 3.0;

/// A step of 1, 2, 2.5 or 5 times a power of ten that cuts `range` into about `parts`.
fn nice_step(range: f64, parts: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / parts;
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

fn tick_label(v: f64, step: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The plot as an SVG document: `title` above, `y_label` along the y axis, seconds on x from 0
/// to `x_max`, and a dashed vertical line with its text at each of `marks`.
// Long: one SVG template, element by element in drawing order.
pub fn svg(
    title: &str,
    y_label: &str,
    x_max: f64,
    lines: &[Line],
    marks: &[(f64, &str)],
) -> String {
    let values = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let (lo, hi) = values().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let y_min = if lo >= 0.0 {
        0.0
    } else {
        lo - (hi - lo) * 0.05
    };
    let y_step = nice_step((hi * 1.05 - y_min).max(f64::EPSILON), 5.0);
    let y_max = ((hi * 1.05 / y_step).ceil() * y_step).max(y_min + y_step);
    let x_max = if x_max > 0.0 { x_max } else { 1.0 };
    let x_step = nice_step(x_max, 10.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: f64| LEFT + t / x_max * plot_w;
    let y = |v: f64| TOP + plot_h - (v - y_min) / (y_max - y_min) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid and ticks.
    let mut v = y_min;
    while v <= y_max + y_step * 0.01 {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            tick_label(v, y_step),
            y = y(v)
        );
        v += y_step;
    }
    let mut t = 0.0;
    while t <= x_max + x_step * 0.01 {
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            tick_label(t, x_step),
            x = x(t)
        );
        t += x_step;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/><text x="{}" y="{}" text-anchor="middle">time (s)</text><text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (at, text) in marks {
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#d62728" stroke-dasharray="5,4"/><text x="{:.1}" y="{}" fill="#d62728">{}</text>"##,
            TOP + plot_h,
            x(*at) + 4.0,
            TOP + 14.0,
            escape(text),
            x = x(*at)
        );
    }
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        for run in line.points.chunk_by(|a, b| b.0 - a.0 <= GAP_S) {
            let pts: Vec<String> = run
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
        }
        if lines.len() > 1 {
            let ly = TOP + 16.0 + 16.0 * i as f64;
            let lx = WIDTH - RIGHT - 190.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                lx + 18.0,
                lx + 22.0,
                ly + 4.0,
                escape(line.label),
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_two_two_and_a_half_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(600.0, 10.0), 100.0);
        assert_eq!(nice_step(12.0, 5.0), 2.5);
        assert_eq!(nice_step(0.3, 5.0), 0.1);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
    }

    #[test]
    fn a_gap_breaks_the_line_and_marks_are_drawn() {
        let points = [(0.0, 1.0), (1.0, 2.0), (10.0, 2.0), (11.0, 3.0)];
        let doc = svg(
            "rss",
            "MiB",
            11.0,
            &[Line {
                label: "rss",
                points: &points,
            }],
            &[(5.0, "kill -9")],
        );
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains("kill -9"));
        assert!(doc.starts_with("<svg") && doc.ends_with("</svg>\n"));
    }
}
