//! `/metrics` pages, built once for concurrent scrapes.
//!
//! Reading the kernel and /proc, rendering the text (hundreds of kilobytes with ten brokers'
//! histograms) and gzipping it are one pipeline, shared in single flight (see
//! [`crate::flight`]) per (format, encoding): a scrape takes the page whose build started after
//! it arrived or was in progress when it did. Sharing only the snapshot would leave every
//! scrape that arrives during a render to start a snapshot of its own, and each of those
//! another render. Memory stays bounded by four pages.

use std::{io::Write as _, sync::Arc, time::Instant};

use axum::http::HeaderValue;
use bytes::Bytes;

use crate::{flight::Flight, render::Format};

/// How the body is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// gzip when `Accept-Encoding` accepts it (`gzip` or `*` with a non-zero q), else identity.
    pub fn negotiate(accept: Option<&HeaderValue>) -> Self {
        let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
            return Encoding::Identity;
        };
        let accepted = accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && q > 0.0
        });
        if accepted {
            Encoding::Gzip
        } else {
            Encoding::Identity
        }
    }
}

/// The last page per (format, encoding).
#[derive(Default)]
pub struct Pages {
    slots: [Arc<Flight<Bytes>>; 4],
}

impl Pages {
    /// The page for a scrape that arrived at `arrived`: `render` (which reads a snapshot) and
    /// the encoding run, on the blocking pool, unless a build that serves this scrape is done or
    /// in progress; meanwhile the scrape waits as a task. `None` when the build panicked.
    pub async fn get(
        &self,
        arrived: Instant,
        format: Format,
        encoding: Encoding,
        render: impl FnOnce() -> String + Send + 'static,
    ) -> Option<Bytes> {
        let slot = self.slots[format as usize * 2 + encoding as usize].clone();
        slot.get_async(arrived, move || {
            let text = render();
            match encoding {
                Encoding::Identity => Bytes::from(text),
                Encoding::Gzip => gzip(text.as_bytes()),
            }
        })
        .await
    }
}

/// gzip at the fastest level: exposition text is repetitive enough that level 1 already
/// shrinks it about tenfold, at a fraction of the default level's cost.
fn gzip(text: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 8),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(text);
    Bytes::from(encoder.finish().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn gzip_only_when_accepted() {
        let n = |v: &str| Encoding::negotiate(Some(&header(v)));
        assert_eq!(Encoding::negotiate(None), Encoding::Identity);
        assert_eq!(n("gzip"), Encoding::Gzip);
        assert_eq!(n("br, GZIP;q=0.5"), Encoding::Gzip);
        assert_eq!(n("*"), Encoding::Gzip);
        assert_eq!(n("gzip;q=0"), Encoding::Identity);
        assert_eq!(n("identity, br"), Encoding::Identity);
        assert_eq!(n("x-gzip"), Encoding::Identity);
    }

    #[tokio::test]
    async fn one_build_per_arrival_and_slot() {
        let pages = Pages::default();
        let renders = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let page = |arrived, f, e| {
            let renders = renders.clone();
            let pages = &pages;
            async move {
                pages
                    .get(arrived, f, e, move || {
                        let n = renders.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        format!("page {n}\n")
                    })
                    .await
                    .unwrap()
            }
        };
        let arrived = Instant::now();
        assert_eq!(
            page(arrived, Format::Prometheus, Encoding::Identity).await,
            "page 1\n"
        );
        // A scrape that arrived before that build started shares it.
        assert_eq!(
            page(arrived, Format::Prometheus, Encoding::Identity).await,
            "page 1\n"
        );
        // Another slot builds its own, encoded as asked.
        let gz = page(arrived, Format::OpenMetrics, Encoding::Gzip).await;
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "page 2\n");
        // A scrape that arrives later gets a page built after it arrived.
        assert_eq!(
            page(Instant::now(), Format::Prometheus, Encoding::Identity).await,
            "page 3\n"
        );
    }
}
