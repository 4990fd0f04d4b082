//! The exposition text itself: the two formats and their content types, the writer that puts
//! out one family at a time (HELP and TYPE once, then its samples), sample values, label
//! escaping and the `le` bounds of log2 histograms. Knows no metric; the sibling modules name
//! the families.

use std::fmt::Write as _;

use brokerscope_common::sockets::log2_bucket_upper_us;

/// `Content-Type` of the text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The two exposition formats. They differ in three places: the content type, counters'
/// metadata lines (OpenMetrics names the family without `_total`; samples keep it), and the
/// `# EOF` terminator OpenMetrics requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

pub(super) const PREFIX: &str = "brokerscope_";

/// Builds the exposition text one family at a time.
pub(super) struct Exposition {
    pub(super) out: String,
    pub(super) format: Format,
}

/// A family's type, as its `# TYPE` line names it.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    pub(super) fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        let (kind, meta_name) = match kind {
            Kind::Counter if self.format == Format::OpenMetrics => {
                ("counter", name.strip_suffix("_total").unwrap_or(name))
            }
            Kind::Counter => ("counter", name),
            Kind::Gauge => ("gauge", name),
            Kind::Histogram => ("histogram", name),
        };
        let _ = writeln!(self.out, "# HELP {PREFIX}{meta_name} {help}");
        let _ = writeln!(self.out, "# TYPE {PREFIX}{meta_name} {kind}");
        Family {
            out: &mut self.out,
            name: format!("{PREFIX}{name}"),
        }
    }
}

/// A family's samples. Written with `push_str` and a hand-rolled integer formatter, not
/// `write!`: a page with ten brokers has about 3000 lines, most of them histogram buckets.
pub(super) struct Family<'a> {
    out: &'a mut String,
    /// The metric name with its prefix.
    name: String,
}

/// A sample's value as the exposition text writes it.
pub(super) trait SampleValue {
    fn write_to(&self, out: &mut String);
}

macro_rules! unsigned_sample {
    ($($t:ty),*) => {$(
        impl SampleValue for $t {
            fn write_to(&self, out: &mut String) {
                write_u64(out, u64::from(*self));
            }
        }
    )*};
}
unsigned_sample!(u8, u16, u32, u64);

impl SampleValue for usize {
    fn write_to(&self, out: &mut String) {
        write_u64(out, *self as u64);
    }
}

impl SampleValue for i32 {
    fn write_to(&self, out: &mut String) {
        if *self < 0 {
            out.push('-');
        }
        write_u64(out, u64::from(self.unsigned_abs()));
    }
}

impl SampleValue for i64 {
    fn write_to(&self, out: &mut String) {
        if *self < 0 {
            out.push('-');
        }
        write_u64(out, self.unsigned_abs());
    }
}

impl SampleValue for f64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl<T: SampleValue + ?Sized> SampleValue for &T {
    fn write_to(&self, out: &mut String) {
        (**self).write_to(out);
    }
}

/// An integer or a float, for code that picks per family.
#[derive(Clone, Copy)]
pub(super) enum Number {
    Int(u64),
    Float(f64),
}

impl SampleValue for Number {
    fn write_to(&self, out: &mut String) {
        match self {
            Number::Int(n) => n.write_to(out),
            Number::Float(x) => x.write_to(out),
        }
    }
}

/// Decimal digits of `n`.
fn write_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
}

impl Family<'_> {
    pub(super) fn sample(&mut self, labels: &[(&str, &str)], value: impl SampleValue) -> &mut Self {
        self.sample_suffixed("", labels, value)
    }

    /// A log2 histogram in microseconds as a Prometheus histogram in seconds: cumulative
    /// `_bucket{le}` at every `stride`-th bucket boundary (plus `+Inf`), `_sum`, `_count`.
    pub(super) fn log2_histogram(
        &mut self,
        labels: &[(&str, &str)],
        buckets: &[u64],
        sum_us: u64,
        stride: usize,
    ) -> &mut Self {
        // Everything up to the `le` value is the same on every bucket line: written once.
        let mut head = String::with_capacity(160);
        head.push_str(&self.name);
        head.push_str("_bucket{");
        write_labels(&mut head, labels);
        if !labels.is_empty() {
            head.push(',');
        }
        head.push_str("le=\"");
        let bucket = |out: &mut String, le: &str, count: u64| {
            out.push_str(&head);
            out.push_str(le);
            out.push_str("\"} ");
            write_u64(out, count);
            out.push('\n');
        };
        let mut cumulative = 0u64;
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            // The last bucket is open-ended: it only appears as +Inf.
            if i + 1 < buckets.len() && (i + 1) % stride == 0 {
                bucket(self.out, bucket_le(i), cumulative);
            }
        }
        bucket(self.out, "+Inf", cumulative);
        self.sample_suffixed("_sum", labels, sum_us as f64 / 1e6);
        self.sample_suffixed("_count", labels, cumulative)
    }

    /// A sample of the family's `_bucket`, `_sum` or `_count` series (histograms).
    pub(super) fn sample_suffixed(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl SampleValue,
    ) -> &mut Self {
        self.out.push_str(&self.name);
        self.out.push_str(suffix);
        if !labels.is_empty() {
            self.out.push('{');
            write_labels(self.out, labels);
            self.out.push('}');
        }
        self.out.push(' ');
        value.write_to(self.out);
        self.out.push('\n');
        self
    }
}

/// `k="v",...` with escaped values, without braces.
fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label(out, v);
        out.push('"');
    }
}

/// The `le` of log2 bucket `i` (its upper bound) in seconds, formatted once per process.
fn bucket_le(i: usize) -> &'static str {
    static LE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LE.get_or_init(|| {
        // 1 << 63 is the largest bound a u64 holds.
        (0..63)
            .map(|i| (log2_bucket_upper_us(i) as f64 / 1e6).to_string())
            .collect()
    })
    .get(i)
    .map_or("+Inf", String::as_str)
}

/// Label values escape backslash, double quote and newline (exposition format spec).
pub(super) fn escape_label(out: &mut String, value: &str) {
    if !value.contains(['\\', '"', '\n']) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}
