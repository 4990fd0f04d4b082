//! `/metrics` pages, rendered and compressed once per snapshot.
//!
//! Concurrent scrapes already share one [`Snapshot`](crate::model::Snapshot); rendering the
//! text (hundreds of kilobytes with ten brokers' histograms) and gzipping it are the larger
//! costs, so they are shared too: one slot per (format, encoding) keeps the last page and the
//! snapshot it came from. A request whose snapshot is the slot's takes the page as is; the
//! first request with a newer snapshot renders while the others for that slot wait for it.
//! Memory stays bounded by four pages.

use std::{
    io::Write as _,
    sync::{Arc, Mutex},
};

use axum::http::HeaderValue;
use bytes::Bytes;

use crate::{model::Snapshot, render::Format};

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

struct Page {
    snapshot: Arc<Snapshot>,
    body: Bytes,
}

/// The last page per (format, encoding).
#[derive(Default)]
pub struct Pages {
    slots: [Mutex<Option<Page>>; 4],
}

impl Pages {
    /// The page for `snapshot`, rendered by `render` unless this slot already holds it.
    pub fn get(
        &self,
        snapshot: &Arc<Snapshot>,
        format: Format,
        encoding: Encoding,
        render: impl FnOnce() -> String,
    ) -> Bytes {
        let slot = &self.slots[format as usize * 2 + encoding as usize];
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(page) = slot.as_ref()
            && Arc::ptr_eq(&page.snapshot, snapshot)
        {
            return page.body.clone();
        }
        let text = render();
        let body = match encoding {
            Encoding::Identity => Bytes::from(text),
            Encoding::Gzip => gzip(text.as_bytes()),
        };
        *slot = Some(Page {
            snapshot: snapshot.clone(),
            body: body.clone(),
        });
        body
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

    #[test]
    fn one_render_per_snapshot_and_slot() {
        let pages = Pages::default();
        let first = Arc::new(Snapshot::default());
        let mut renders = 0;
        let mut page = |s: &Arc<Snapshot>, f, e| {
            pages.get(s, f, e, || {
                renders += 1;
                format!("page {renders}\n")
            })
        };
        assert_eq!(
            page(&first, Format::Prometheus, Encoding::Identity),
            "page 1\n"
        );
        assert_eq!(
            page(&first, Format::Prometheus, Encoding::Identity),
            "page 1\n"
        );
        // Another slot renders its own.
        let gz = page(&first, Format::OpenMetrics, Encoding::Gzip);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "page 2\n");
        // A newer snapshot replaces the page.
        let second = Arc::new(Snapshot::default());
        assert_eq!(
            page(&second, Format::Prometheus, Encoding::Identity),
            "page 3\n"
        );
    }
}
