//! One JSON audit line per decision and per admin action. Lines are tracing events with target `audit`;
//! [`AuditLayer`] writes each as one JSON object and hands it to a [`LineSink`]. In the binary the sink is
//! [`Batched`]: a bounded queue that a writer thread drains to stdout in batches, so a request costs no
//! write, no wake-up and no lock. Never a raw token, never a query string.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::route::Route;
use crate::token::{Fingerprint, Principal};

/// What one request led to, filled in as the pipeline learns it.
#[derive(Default)]
pub struct Record {
    pub request_id: String,
    pub method: http::Method,
    /// Only its path is written: a query string can carry personal data or a token.
    pub uri: http::Uri,
    /// The route the request matched; the line names it, its jurisdiction, data class and mode.
    pub route: Option<Arc<Route>>,
    pub fingerprint: Option<Fingerprint>,
    pub principal: Option<Arc<Principal>>,
    /// Set on monitor-mode routes when the request was forwarded but would have been blocked.
    pub would_block: Option<&'static str>,
}

impl Record {
    /// Writes the line. `decision` is `forward` or `block`; `reason` a stable reason code.
    pub fn emit(&self, decision: &str, reason: &str, status: u16) {
        let p = self.principal.as_deref();
        let r = self.route.as_deref().map(|r| &r.config);
        let regions = p.and_then(|p| p.allowed_regions.as_ref()).map(|r| r.join(" "));
        tracing::info!(
            target: "audit",
            request_id = self.request_id.as_str(),
            route = r.map(|r| r.name.as_str()),
            method = self.method.as_str(),
            path = self.uri.path(),
            jurisdiction = r.map(|r| r.jurisdiction.as_str()),
            data_class = r.map(|r| r.data_class.as_str()),
            mode = r.map(|r| r.mode.as_str()),
            decision,
            reason,
            would_block = self.would_block,
            status,
            issuer = p.map(|p| &*p.issuer),
            subject = p.and_then(|p| p.sub.as_deref()),
            client_id = p.and_then(|p| p.client_id.as_deref()),
            token_fingerprint = self.fingerprint.as_ref().map(Fingerprint::as_str),
            allowed_regions = regions.as_deref(),
        );
    }
}

/// An admin action: what was done, to which entry, and how it went.
pub fn admin(action: &str, entry: &str, result: &str, detail: &str) {
    tracing::info!(target: "audit", decision = "admin", action, entry, result, detail);
}

/// Where finished audit lines go (each ends with a newline).
pub trait LineSink: Send + Sync + 'static {
    fn line(&self, line: Vec<u8>);
}

/// Formats `audit` events as one flat JSON object per line: `timestamp`, `level`, `target`, then the
/// event's fields in the order they were written.
pub struct AuditLayer<S> {
    sink: S,
}

impl<S: LineSink> AuditLayer<S> {
    pub fn new(sink: S) -> Self {
        AuditLayer { sink }
    }
}

impl<S: LineSink, C: Subscriber> Layer<C> for AuditLayer<S> {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, C>) {
        let mut line = Vec::with_capacity(512);
        line.extend_from_slice(b"{\"timestamp\":\"");
        rfc3339_micros(&mut line, std::time::SystemTime::now());
        line.extend_from_slice(b"\",\"level\":");
        json_str(&mut line, event.metadata().level().as_str());
        line.extend_from_slice(b",\"target\":");
        json_str(&mut line, event.metadata().target());
        event.record(&mut Fields(&mut line));
        line.extend_from_slice(b"}\n");
        self.sink.line(line);
    }
}

/// Appends each field as `,"name":value`.
struct Fields<'a>(&'a mut Vec<u8>);

impl Fields<'_> {
    fn key(&mut self, field: &Field) {
        self.0.push(b',');
        json_str(self.0, field.name());
        self.0.push(b':');
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        json_str(self.0, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.0.extend_from_slice(Decimal::new(value, 1).as_str().as_bytes());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.0, "{value}");
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.0.extend_from_slice(if value { b"true" } else { b"false" });
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        json_str(self.0, &format!("{value:?}"));
    }
}

/// A JSON string. Most values (names, paths, ids) need no escaping and are copied as they are; anything
/// with a quote, a backslash or a control character is escaped by serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // A fold, not `any`: no early exit, so the compiler checks many bytes at a time.
    if !s.bytes().fold(false, |esc, b| esc | (b < 0x20) | (b == b'"') | (b == b'\\')) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(out, s);
    }
}

/// `t` as RFC 3339 UTC with microseconds, `2026-12-03T19:46:01.123456Z` (held to years 1970 to 9999).
fn rfc3339_micros(out: &mut Vec<u8>, t: std::time::SystemTime) {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs().min(253_402_300_799);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a proleptic Gregorian date, counted in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let micros = u64::from(since.subsec_micros());
    let (h, m, sec) = (rem / 3600, rem / 60 % 60, rem % 60);
    let fields =
        [(year, 4, b'-'), (month, 2, b'-'), (day, 2, b'T'), (h, 2, b':'), (m, 2, b':'), (sec, 2, b'.')];
    for (n, width, sep) in fields.into_iter().chain([(micros, 6, b'Z')]) {
        out.extend_from_slice(Decimal::new(n, width).as_str().as_bytes());
        out.push(sep);
    }
}

/// `n` in decimal, zero-padded to at least `width` digits (1 to 20), written without the fmt machinery: audit
/// lines and request ids need a few of these per request.
pub(crate) struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub(crate) fn new(n: u64, width: usize) -> Decimal {
        let mut digits = [b'0'; 20];
        let floor = digits.len() - width.clamp(1, 20);
        let (mut start, mut rest) = (digits.len(), n);
        while rest > 0 || start > floor {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        Decimal { digits, start }
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.digits[self.start..]).unwrap_or("")
    }
}

/// Lines dropped because the queue was full (the writer could not keep up with stdout).
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Msg {
    Line(Vec<u8>),
    /// Write everything queued before this, then acknowledge.
    Flush(SyncSender<()>),
}

/// A bounded queue of lines and the thread that writes them. Senders never wait and never wake the
/// writer while it is busy: it drains the queue, writes the batch in one call, and sleeps `interval`
/// before looking again; only when a look finds nothing does it block until the next line.
pub struct Batched {
    tx: SyncSender<Msg>,
}

/// Flushes the audit writer when dropped.
pub struct Guard {
    tx: SyncSender<Msg>,
}

impl Batched {
    pub fn spawn(
        mut out: impl std::io::Write + Send + 'static,
        capacity: usize,
        interval: Duration,
    ) -> (Batched, Guard) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_batches(&rx, &mut out, interval))
            .expect("audit writer thread starts");
        (Batched { tx: tx.clone() }, Guard { tx })
    }
}

impl LineSink for Batched {
    fn line(&self, line: Vec<u8>) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(2));
        }
    }
}

fn write_batches(rx: &Receiver<Msg>, out: &mut dyn std::io::Write, interval: Duration) {
    let mut batch = Vec::with_capacity(64 * 1024);
    // Idle: parked until a message comes. Busy: everything queued is written at once, then lines gather
    // for `interval` instead of each one waking this thread, until a look finds nothing.
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(first) = next {
            let mut acks = Vec::new();
            for m in std::iter::once(first).chain(rx.try_iter()) {
                match m {
                    Msg::Line(l) => batch.extend_from_slice(&l),
                    Msg::Flush(ack) => acks.push(ack),
                }
            }
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            for ack in acks {
                let _ = ack.send(());
            }
            std::thread::sleep(interval);
            next = rx.try_recv().ok();
        }
    }
}

/// Audit lines as JSON on stdout, operational logs as text on stderr (`RUST_LOG` filters them).
/// The returned guard flushes the audit writer when dropped.
pub fn init_logging() -> Guard {
    let (sink, guard) = Batched::spawn(std::io::stdout(), 16 * 1024, Duration::from_millis(10));
    let audit = AuditLayer::new(sink).with_filter(Targets::new().with_target("audit", LevelFilter::INFO));
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal, and not with NO_COLOR set: log files and collectors get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() != "audit"))
        .with_filter(env);
    let _ = tracing_subscriber::registry().with(audit).with(logs).try_init();
    guard
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl LineSink for Lines {
        fn line(&self, line: Vec<u8>) {
            self.0.lock().unwrap().extend_from_slice(&line);
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_flat_json_object_per_event() {
        let sink = Lines::default();
        let subscriber = tracing_subscriber::registry().with(AuditLayer::new(sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let none: Option<&str> = None;
            tracing::info!(
                target: "audit",
                path = "/a\"b\\c\n\u{e9}\u{1}",
                status = 403u16,
                delta = -2i64,
                flag = true,
                missing = none,
                shown = ?Some(1),
            );
            admin("halt", "DE", "ok", "");
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).expect("valid JSON")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        let l = &lines[0];
        assert_eq!(l["target"], "audit");
        assert_eq!(l["level"], "INFO");
        assert!(l["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(l["path"], "/a\"b\\c\n\u{e9}\u{1}");
        assert_eq!(l["status"], 403);
        assert_eq!(l["delta"], -2);
        assert_eq!(l["flag"], true);
        assert_eq!(l["shown"], "Some(1)");
        assert!(l.get("missing").is_none(), "an absent value is left out: {l}");
        assert_eq!(lines[1]["decision"], "admin");
        assert_eq!(lines[1]["entry"], "DE");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        use std::time::{Duration, UNIX_EPOCH};
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 123_456, "2000-02-29T00:00:00.123456Z"),
            (951_868_799, 999_999, "2000-02-29T23:59:59.999999Z"),
            (1_709_251_199, 1, "2024-02-29T23:59:59.000001Z"),
            (1_796_325_448, 42_000, "2026-12-03T19:17:28.042000Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000Z"),
            (253_402_300_799, 0, "9999-12-31T23:59:59.000000Z"),
            (253_402_300_800, 5, "9999-12-31T23:59:59.000005Z"),
            (1_000_000_000_000_000, 0, "9999-12-31T23:59:59.000000Z"),
        ];
        for (secs, micros, want) in cases {
            let mut out = Vec::new();
            rfc3339_micros(&mut out, UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros));
            assert_eq!(String::from_utf8(out).unwrap(), want, "{secs}");
        }
        let mut out = Vec::new();
        rfc3339_micros(&mut out, UNIX_EPOCH - Duration::from_secs(86_400));
        assert_eq!(out, b"1970-01-01T00:00:00.000000Z", "before 1970");
    }

    #[test]
    fn decimals_are_zero_padded_to_their_width() {
        for (n, width) in [(0, 1), (0, 0), (7, 4), (2026, 4), (12_345, 2), (u64::MAX, 1), (u64::MAX, 20)] {
            assert_eq!(Decimal::new(n, width).as_str(), format!("{n:0width$}"), "{n} {width}");
        }
    }

    #[test]
    fn strings_that_need_no_escaping_are_copied_and_the_rest_escaped() {
        for s in ["", "/orders/1", "caf\u{e9}", "a b~\u{7f}", "\"", "\\", "a\nb", "\u{1}", "\u{1f}x"] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn batched_writer_keeps_order_and_flushes_on_drop() {
        let out = Lines::default();
        let (sink, guard) = Batched::spawn(out.clone(), 1024, Duration::from_millis(5));
        for i in 0..500 {
            sink.line(format!("{i}\n").into_bytes());
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let got: Vec<usize> = text.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(got, (0..500).collect::<Vec<_>>());
    }

    /// A writer that blocks until released, standing in for a stalled stdout.
    struct Stalled(Arc<(Mutex<bool>, std::sync::Condvar)>, Lines);

    impl std::io::Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.1.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let out = Lines::default();
        let (sink, guard) = Batched::spawn(Stalled(gate.clone(), out.clone()), 8, Duration::from_millis(1));
        let before = dropped_lines();
        // The first line is taken by the writer, which then blocks; 8 more fill the queue; the rest drop.
        for i in 0..100 {
            sink.line(format!("{i}\n").into_bytes());
            if i == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        assert!(dropped_lines() - before >= 90, "dropped {}", dropped_lines() - before);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("0\n1\n"), "{text}");
        assert!(text.lines().count() <= 10, "{text}");
    }
}
