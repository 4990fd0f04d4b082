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

use crate::{
    flight::Flight,
    render::{Format, Part},
};

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
    /// The page for a scrape that arrived at `arrived`: `prepare` (which reads a snapshot and
    /// returns what renders each [`Part`] of the page from it), the rendering and the encoding
    /// run on a side-by-side thread ([`crate::tasks::on_side`]), unless a build that serves
    /// this scrape is done or in progress; meanwhile the scrape waits as a task. `None` when
    /// the build panicked.
    pub async fn get<R>(
        &self,
        arrived: Instant,
        format: Format,
        encoding: Encoding,
        prepare: impl FnOnce() -> R + Send + 'static,
    ) -> Option<Bytes>
    where
        R: Fn(Part) -> String + Sync,
    {
        let slot = self.slots[format as usize * 2 + encoding as usize].clone();
        slot.get_async(arrived, move || {
            let render = prepare();
            match encoding {
                Encoding::Identity => {
                    let mut page = render(Part::First);
                    page.push_str(&render(Part::Second));
                    Bytes::from(page)
                }
                Encoding::Gzip => gzip(&render),
            }
        })
        .await
    }
}

/// gzip at the fastest level: exposition text is repetitive enough that level 1 already
/// shrinks it about tenfold, at a fraction of the default level's cost.
///
/// The page's two parts are rendered and deflated side by side, as one gzip member: the first
/// part ends on a sync flush (byte-aligned, not final), the second starts afresh and ends the
/// stream, and the CRC-32 of the whole is the two CRCs combined. Any inflater reads it as one
/// stream; the second part only loses back-references into the first (the page is no larger:
/// for ten brokers the parts deflate to 13,591 and 11,042 bytes, the whole page to 25,431; each
/// part's Huffman tables fit it better).
fn gzip(render: &(impl Fn(Part) -> String + Sync)) -> Bytes {
    let (first, second) = crate::tasks::side_by_side(
        || deflate(render(Part::First).as_bytes(), false),
        || deflate(render(Part::Second).as_bytes(), true),
    );
    let (Some((mut first, mut crc)), Some((mut second, second_crc))) = (first, second) else {
        let mut page = render(Part::First);
        page.push_str(&render(Part::Second));
        return gzip_whole(page.as_bytes());
    };
    let mut page = Vec::with_capacity(GZIP_HEADER.len() + first.len() + second.len() + 8);
    page.extend_from_slice(&GZIP_HEADER);
    page.append(&mut first);
    page.append(&mut second);
    crc.combine(&second_crc);
    page.extend_from_slice(&crc.sum().to_le_bytes());
    // ISIZE: the length modulo 2^32, as `Crc` counts it.
    page.extend_from_slice(&crc.amount().to_le_bytes());
    Bytes::from(page)
}

/// gzip's member header (RFC 1952): deflate, no flags, no time, fastest level, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

thread_local! {
    /// This thread's compressor, reset for each page. A compressor's state is about 300 KB of
    /// tables: made afresh per page it cost as much as deflating half the page (allocation and
    /// page faults; 310 KB page: 0.34 ms with a new compressor, 0.20 ms reusing one,
    /// 2026-12-06). Pages are deflated on the two side-by-side threads (see
    /// [`crate::tasks::side_by_side`]): two compressors in all.
    static COMPRESSOR: std::cell::RefCell<Option<flate2::Compress>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` deflated raw at level 1 with its CRC-32: ending the stream when `last`, else on a
/// sync flush that a following deflate stream may continue. `None` if the compressor fails.
fn deflate(data: &[u8], last: bool) -> Option<(Vec<u8>, flate2::Crc)> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    let mut crc = flate2::Crc::new();
    crc.update(data);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    COMPRESSOR.with(|kept| {
        let mut kept = kept.try_borrow_mut().ok()?;
        let compress = kept.get_or_insert_with(|| Compress::new(Compression::fast(), false));
        compress.reset();
        let mut out = Vec::with_capacity(data.len() / 8 + 64);
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity());
            }
            let consumed = usize::try_from(compress.total_in()).ok()?;
            let status = compress
                .compress_vec(data.get(consumed..)?, &mut out, flush)
                .ok()?;
            let all_in = usize::try_from(compress.total_in()).ok()? == data.len();
            // Done: the stream ended, or (a sync flush) everything is in and the output had
            // room left.
            if status == Status::StreamEnd || (!last && all_in && out.len() < out.capacity()) {
                return Some((out, crc));
            }
        }
    })
}

/// The page deflated in one piece (if [`deflate`] ever fails).
fn gzip_whole(text: &[u8]) -> Bytes {
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

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        // One member, read to its end: a second member or trailing bytes would be left unread.
        let mut decoder = flate2::read::GzDecoder::new(gz);
        decoder.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn a_page_deflated_in_two_parts_is_one_gzip_member_of_the_whole_page() {
        let mut page = String::new();
        let mut i = 0u64;
        while page.len() < 300 * 1024 {
            page.push_str(&format!(
                "brokerscope_bytes_sent_total{{broker=\"{}\",listener=\"L{}\"}} {}\n",
                i % 10,
                i % 4,
                i.wrapping_mul(2_654_435_761) % 1_000_003
            ));
            i += 1;
        }
        let parts = |cut: usize| {
            let page = page.clone();
            move |part: Part| match part {
                Part::First => page[..cut].to_string(),
                Part::Second => page[cut..].to_string(),
            }
        };
        for cut in [page.len() * 38 / 100, 0, page.len(), 1, page.len() - 1] {
            let gz = gzip(&parts(cut));
            assert_eq!(gunzip(&gz), page.as_bytes(), "cut at {cut}");
            let whole = gzip_whole(page.as_bytes());
            // One member, whose trailer (CRC-32, length) ends the body.
            assert_eq!(gz[gz.len() - 8..], whole[whole.len() - 8..], "cut at {cut}");
            // Two deflate streams, not the whole page's one.
            assert_ne!(gz, whole, "cut at {cut}");
            // Within a few percent of deflating it whole.
            assert!(
                gz.len() <= whole.len() + whole.len() / 20 + 16,
                "cut at {cut}: {} against {}",
                gz.len(),
                whole.len()
            );
        }
        // Empty parts are a page too.
        assert_eq!(gunzip(&gzip(&|_: Part| String::new())), b"");
        // The system's gzip reads it as one stream and finds nothing after it.
        let gz = gzip(&parts(page.len() / 3));
        let mut child = std::process::Command::new("gzip")
            .args(["-d", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feed = std::thread::spawn(move || stdin.write_all(&gz));
        let out = child.wait_with_output().unwrap();
        feed.join().unwrap().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, page.as_bytes());
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
                        move |part| match part {
                            Part::First => format!("page {n}"),
                            Part::Second => "\n".to_string(),
                        }
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
