//! Hostile clients and hostile upstreams: every `[server]` limit and timeout with short timers,
//! request smuggling in both directions (raw bytes over TLS), forged forwarding headers, upgrades and
//! `Expect` before authorisation, and a panic-freedom run of garbage, truncated TLS and abrupt
//! disconnects after which the gateway must still serve the next client.
//!
//! Everything is bounded: every read has a deadline ([`WAIT`] unless said otherwise), and timers in the
//! configs are fractions of a second.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use residency_gateway::dev::serve_http;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    self, Gw, Idp, Upstream, config_text_with, json_response, tls_client_config, tls_connect,
};

/// The longest any single read in these tests waits.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------------------
// Panics anywhere but in this file (the gateway, hyper, rustls, h2 on a runtime thread) are counted, so a
// connection task that panics fails the test even though tokio catches it.

static FOREIGN_PANICS: AtomicUsize = AtomicUsize::new(0);
static FOREIGN_PANIC_TEXT: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn count_foreign_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let here = info.location().is_some_and(|l| l.file().contains("tests/"));
            if !here {
                FOREIGN_PANICS.fetch_add(1, Ordering::SeqCst);
                FOREIGN_PANIC_TEXT.lock().unwrap_or_else(|e| e.into_inner()).push(info.to_string());
            }
            previous(info);
        }));
    });
}

fn assert_no_foreign_panics() {
    let n = FOREIGN_PANICS.load(Ordering::SeqCst);
    let text = FOREIGN_PANIC_TEXT.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
    assert_eq!(n, 0, "panics outside the tests (gateway or its libraries):\n{text}");
}

// ---------------------------------------------------------------------------------------------------------
// Setup

struct Env {
    gw: Gw,
    idp: Idp,
    up: Upstream,
}

impl Env {
    fn token(&self) -> String {
        self.idp.token(json!(["DE"]))
    }

    fn port(&self) -> u16 {
        self.gw.addr().port()
    }

    /// A fresh HTTP/1.1 connection over TLS (no ALPN, so the gateway speaks HTTP/1.1).
    async fn h1(&self) -> Conn<Tls> {
        Conn::new(h1_tls(&self.gw).await)
    }

    /// Sends `raw` on a fresh connection and reads until the gateway closes it (at most [`WAIT`]).
    async fn exchange(&self, raw: &[u8]) -> (String, bool) {
        let mut c = self.h1().await;
        c.send(raw).await;
        let (bytes, closed) = c.read_to_eof(WAIT).await;
        (String::from_utf8_lossy(&bytes).into_owned(), closed)
    }
}

/// One issuer, the echo upstream behind `/orders`, `/small` (`max_body_bytes = 1024`), `/roomy`
/// (4096), `/big` and `/slow`; `server_extra` goes into `[server]`, `routes` is appended.
async fn env_with(server_extra: &str, routes: &str) -> Env {
    count_foreign_panics();
    support::ensure_default_crypto_provider();
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let route = |name: &str, prefix: &str, extra: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{}\"\n\
             jurisdiction = \"DE\"\nissuers = [\"corp\"]\n{extra}\n",
            up.url()
        )
    };
    let mut body = format!(
        "[[issuers]]\nname = \"corp\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n\n",
        idp.issuer(),
        idp.jwks_uri()
    );
    body.push_str(&route("orders", "/orders", ""));
    body.push_str(&route("small", "/small", "max_body_bytes = 1024"));
    body.push_str(&route("roomy", "/roomy", "max_body_bytes = 4096"));
    body.push_str(&route("big", "/big", ""));
    body.push_str(&route("slow", "/slow", ""));
    body.push_str(routes);
    let server = format!("shutdown_grace_seconds = 1\n{server_extra}");
    let gw = Gw::start_full(&config_text_with(&server, "", &body)).await;
    Env { gw, idp, up }
}

async fn env(server_extra: &str) -> Env {
    env_with(server_extra, "").await
}

/// A route named `name` at `/{name}` to `upstream`, jurisdiction DE.
fn route_to(name: &str, upstream: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{upstream}\"\n\
         jurisdiction = \"DE\"\nissuers = [\"corp\"]\n\n"
    )
}

// ---------------------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TLS

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn h1_tls(gw: &Gw) -> Tls {
    tls_connect(gw.addr(), tls_client_config(&gw.pki, rustls::DEFAULT_VERSIONS, &[])).await.unwrap()
}

async fn h2_tls(gw: &Gw) -> Tls {
    let mut cfg = tls_client_config(&gw.pki, rustls::DEFAULT_VERSIONS, &[]);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tls_connect(gw.addr(), cfg).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// A request head (and body) as raw bytes: `extra` holds whole header lines, each ending in `\r\n`.
fn raw(method: &str, path: &str, token: Option<&str>, extra: &str, body: &[u8]) -> Vec<u8> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let mut v = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}{extra}\r\n").into_bytes();
    v.extend_from_slice(body);
    v
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn reason(&self) -> String {
        self.json().get("reason").and_then(Value::as_str).unwrap_or("").to_string()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A byte stream with a read buffer, for reading responses one at a time off a kept-alive connection.
struct Conn<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(s: S) -> Self {
        Conn { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// Like [`Conn::send`], but a write error (the peer closed) is returned, not a panic.
    async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes).await?;
        self.s.flush().await
    }

    /// Reads more into the buffer; false on EOF, error or [`WAIT`] without data.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, self.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// Reads until the peer closes (EOF, reset or TLS error: `true`) or `within` passes (`false`).
    async fn read_to_eof(&mut self, within: Duration) -> (Vec<u8>, bool) {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return (out, false),
                Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next response (a `100 Continue` is a response of its own); `None` when the connection ends
    /// or stays silent for [`WAIT`] first.
    async fn response(&mut self) -> Option<Resp> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut resp = Resp { status, headers, body: Vec::new() };
        if matches!(status, 100..=199 | 204 | 304) {
            return Some(resp);
        }
        if resp.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    if !self.fill().await {
                        return None;
                    }
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if !self.fill().await {
                        return None;
                    }
                }
                if size == 0 {
                    // No trailers in these tests: the last chunk is followed by an empty line.
                    self.buf.drain(..2);
                    return Some(resp);
                }
                resp.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
        }
        match resp.header("content-length").map(|v| v.parse::<usize>()) {
            Some(Ok(n)) => {
                while self.buf.len() < n {
                    if !self.fill().await {
                        return None;
                    }
                }
                resp.body = self.buf.drain(..n).collect();
            }
            Some(Err(_)) => return None,
            None => {
                let (rest, _) = self.read_to_eof(WAIT).await;
                resp.body = rest;
            }
        }
        Some(resp)
    }
}

/// Polls `f` every 20 ms for up to 3 s; returns its last value.
async fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn last_seen(up: &Upstream) -> Option<support::Seen> {
    up.last.lock().unwrap().clone()
}

// ---------------------------------------------------------------------------------------------------------
// A raw TCP upstream: answers each request head with bytes chosen by the test, so responses can be
// framed in ways hyper would never write.

#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// Close the connection.
    Close,
    /// Wait for the next request on the same connection.
    KeepAlive,
    /// Echo every byte that follows (a protocol switched by `101`).
    Echo,
}

struct RawUpstream {
    addr: std::net::SocketAddr,
    /// Request heads received, in order.
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl RawUpstream {
    /// `respond(n, head)` gets the request's index (over all connections) and head.
    async fn start(respond: impl Fn(usize, &str) -> (Vec<u8>, After) + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let respond = Arc::new(respond);
        let (h, c) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (heads, respond) = (h.clone(), respond.clone());
                tokio::spawn(async move {
                    let mut conn = Conn::new(tcp);
                    loop {
                        let end = loop {
                            if let Some(i) = find(&conn.buf, b"\r\n\r\n") {
                                break Some(i);
                            }
                            if !conn.fill().await {
                                break None;
                            }
                        };
                        let Some(end) = end else { return };
                        let head = String::from_utf8_lossy(&conn.buf[..end]).into_owned();
                        conn.buf.drain(..end + 4);
                        let n = {
                            let mut heads = heads.lock().unwrap();
                            heads.push(head.clone());
                            heads.len() - 1
                        };
                        let (bytes, after) = respond(n, &head);
                        if conn.try_send(&bytes).await.is_err() {
                            return;
                        }
                        match after {
                            After::Close => {
                                let _ = conn.s.shutdown().await;
                                return;
                            }
                            After::KeepAlive => continue,
                            After::Echo => {
                                let pending = std::mem::take(&mut conn.buf);
                                if conn.try_send(&pending).await.is_err() {
                                    return;
                                }
                                let (mut r, mut w) = conn.s.split();
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawUpstream { addr, heads, connections }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.heads.lock().unwrap().len()
    }
}

// =========================================================================================================
// Limits

#[tokio::test]
async fn a_header_block_over_max_header_bytes_is_431() {
    let e = env("max_header_bytes = 8192").await;
    let t = e.token();
    let pad = "a".repeat(10_000);
    let (text, closed) =
        e.exchange(&raw("GET", "/orders/1", Some(&t), &format!("X-Pad: {pad}\r\n"), b"")).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(closed, "the connection is closed after 431");
    // The same block spread over many lines is measured as a whole.
    let many: String = (0..40).map(|i| format!("X-Pad-{i}: {}\r\n", "b".repeat(250))).collect();
    let (text, _) = e.exchange(&raw("GET", "/orders/1", Some(&t), &many, b"")).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(e.up.hits(), 0);

    // Under the limit is served.
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), &format!("X-Pad: {}\r\n", "a".repeat(4000)), b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(e.up.hits(), 1);
}

#[tokio::test]
async fn more_headers_than_max_headers_is_431() {
    let e = env("max_headers = 20").await;
    let t = e.token();
    let lines = |n: usize| (0..n).map(|i| format!("X-H{i}: {i}\r\n")).collect::<String>();
    let (text, closed) = e.exchange(&raw("GET", "/orders/1", Some(&t), &lines(25), b"")).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(closed);
    assert_eq!(e.up.hits(), 0);

    // Host + Authorization + 15 = 17 headers: served.
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), &lines(15), b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
}

#[tokio::test]
async fn a_uri_over_max_uri_bytes_is_414_before_the_token_is_looked_at() {
    let e = env("max_uri_bytes = 1024").await;
    let t = e.token();
    let long_path = format!("/orders/{}", "a".repeat(1100));
    let long_query = format!("/orders/1?q={}", "b".repeat(1100));
    for (path, token) in [(&long_path, Some(t.as_str())), (&long_query, Some(t.as_str())), (&long_path, None)]
    {
        let mut c = e.h1().await;
        c.send(&raw("GET", path, token, "", b"")).await;
        let r = c.response().await.expect("a response");
        assert_eq!((r.status, r.reason().as_str()), (414, "uri_too_long"), "{path:.40}…");
    }
    assert_eq!(e.up.hits(), 0);

    let ok_path = format!("/orders/{}", "a".repeat(900));
    let mut c = e.h1().await;
    c.send(&raw("GET", &ok_path, Some(&t), "", b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(e.up.seen().path_and_query, ok_path);
}

#[tokio::test]
async fn a_declared_length_over_the_route_limit_is_413_before_the_body_is_sent() {
    // Server default 2048; `/small` lowers it to 1024, `/roomy` raises it to 4096.
    let e = env("max_body_bytes = 2048").await;
    let t = e.token();
    for (path, len) in [("/small/1", 1500), ("/orders/1", 3000), ("/roomy/1", 5000)] {
        let mut c = e.h1().await;
        // Only the head: the 413 must come without the body ever being sent.
        c.send(&raw("POST", path, Some(&t), &format!("Content-Length: {len}\r\n"), b"")).await;
        let r = c.response().await.unwrap_or_else(|| panic!("no answer for {path} without the body"));
        assert_eq!((r.status, r.reason().as_str()), (413, "body_too_large"), "{path} {len}");
    }
    assert_eq!(e.up.hits(), 0, "nothing over a limit reaches the upstream");

    for (path, len) in [("/small/1", 1024), ("/orders/1", 2048), ("/roomy/1", 3000)] {
        let mut c = e.h1().await;
        c.send(&raw("POST", path, Some(&t), &format!("Content-Length: {len}\r\n"), &vec![b'x'; len])).await;
        let r = c.response().await.unwrap();
        assert_eq!(r.status, 200, "{path} {len}");
        assert_eq!(r.json()["body_len"], len);
    }
}

#[tokio::test]
async fn a_chunked_body_growing_past_the_limit_is_413_and_the_upstream_gets_at_most_the_limit() {
    let e = env("").await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("POST", "/small/1", Some(&t), "Transfer-Encoding: chunked\r\n", b"")).await;
    let chunk = format!("100\r\n{}\r\n", "y".repeat(256));
    let mut write_failed = false;
    for _ in 0..8 {
        // 8 × 256 bytes against a limit of 1024; the gateway may stop reading (and close) once tripped.
        if c.try_send(chunk.as_bytes()).await.is_err() {
            write_failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !write_failed {
        let _ = c.try_send(b"0\r\n\r\n").await;
    }
    let r = c.response().await.expect("an answer to a body over the limit");
    assert_eq!((r.status, r.reason().as_str()), (413, "body_too_large"));
    // The upstream saw the head and then a body that was cut off at no more than the limit.
    let seen = eventually(|| last_seen(&e.up)).await.expect("the upstream recorded the cut-off request");
    assert!(seen.body_len <= 1024, "the upstream got {} bytes, over the limit", seen.body_len);
    assert_eq!(e.up.hits(), 1);
}

#[tokio::test]
async fn a_chunked_body_past_the_limit_after_the_upstream_answered_never_reaches_it_past_the_limit() {
    // An upstream that answers at once and reads the request body in the background.
    let received = Arc::new(AtomicUsize::new(0));
    let r2 = received.clone();
    let early = serve_http(move |req: Request<Incoming>| {
        let received = r2.clone();
        async move {
            tokio::spawn(async move {
                let mut body = req.into_body();
                while let Some(Ok(f)) = body.frame().await {
                    received.fetch_add(f.data_ref().map_or(0, |d| d.len()), Ordering::SeqCst);
                }
            });
            json_response(200, &json!({"early": true}))
        }
    })
    .await
    .unwrap();
    let e = env_with(
        "",
        &format!(
            "[[routes]]\nname = \"early\"\npath_prefix = \"/early\"\nupstream = \"http://{early}\"\n\
             jurisdiction = \"DE\"\nissuers = [\"corp\"]\nmax_body_bytes = 1024\n"
        ),
    )
    .await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("POST", "/early/1", Some(&t), "Transfer-Encoding: chunked\r\n", b"")).await;
    let chunk = format!("100\r\n{}\r\n", "y".repeat(256));
    let _ = c.try_send(chunk.as_bytes()).await;
    // The upstream's answer comes back while the body is still being sent…
    let r = c.response().await.expect("the upstream's early answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["early"], true);
    // …and the rest of the body, well past the limit, is cut off at the gateway.
    for _ in 0..8 {
        if c.try_send(chunk.as_bytes()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = c.try_send(b"0\r\n\r\n").await;
    // What the client sees next: the gateway closes the connection rather than leave a half-read body.
    let (rest, closed) = c.read_to_eof(Duration::from_secs(3)).await;
    assert!(
        closed,
        "the connection is closed after the cut-off body; got {:?}",
        String::from_utf8_lossy(&rest)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = received.load(Ordering::SeqCst);
    assert!(got <= 1024, "the upstream received {got} bytes, over the route's limit of 1024");
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_408_after_body_idle_timeout() {
    let e = env("body_idle_timeout_seconds = 0.3").await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("POST", "/orders/1", Some(&t), "Content-Length: 1000\r\n", &[b'z'; 100])).await;
    let start = Instant::now();
    let r = c.response().await.expect("an answer to a stalled body");
    let waited = start.elapsed();
    assert_eq!((r.status, r.reason().as_str()), (408, "body_timeout"));
    assert!(waited >= Duration::from_millis(250), "answered after {waited:?}, before the idle timeout");
    assert!(waited < Duration::from_millis(2500), "answered only after {waited:?}");
    let seen = eventually(|| last_seen(&e.up)).await.expect("the upstream saw the head");
    assert!(seen.body_len < 1000);

    // A chunked body that stops between chunks, too.
    let mut c = e.h1().await;
    c.send(&raw("POST", "/orders/2", Some(&t), "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n")).await;
    let r = c.response().await.expect("an answer to a stalled chunked body");
    assert_eq!((r.status, r.reason().as_str()), (408, "body_timeout"));
}

#[tokio::test]
async fn max_connections_closes_the_extra_connection_at_once_and_keeps_the_others() {
    let e = env("max_connections = 3").await;
    let t = e.token();
    let refused = "residency_gateway_connections_refused_total";
    let before = e.gw.metric(refused).await;
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut c = e.h1().await;
        c.send(&raw("GET", &format!("/orders/{i}"), Some(&t), "", b"")).await;
        assert_eq!(c.response().await.unwrap().status, 200);
        conns.push(c);
    }
    let start = Instant::now();
    let fourth = tls_connect(e.gw.addr(), tls_client_config(&e.gw.pki, rustls::DEFAULT_VERSIONS, &[])).await;
    assert!(fourth.is_err(), "a 4th connection completed its handshake");
    assert!(start.elapsed() < Duration::from_secs(2), "the 4th connection was not closed at once");
    assert_eq!(e.gw.wait_metric(refused, before + 1.0).await, before + 1.0);

    // The three established connections keep working.
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(&raw("GET", &format!("/orders/again-{i}"), Some(&t), "", b"")).await;
        assert_eq!(c.response().await.expect("an established connection still answers").status, 200);
    }
    // A freed slot is usable again.
    drop(conns.pop());
    let mut reopened = None;
    let deadline = Instant::now() + Duration::from_secs(3);
    while reopened.is_none() && Instant::now() < deadline {
        let cfg = tls_client_config(&e.gw.pki, rustls::DEFAULT_VERSIONS, &[]);
        match tls_connect(e.gw.addr(), cfg).await {
            Ok(tls) => reopened = Some(Conn::new(tls)),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut c = reopened.expect("a connection once a slot is free");
    c.send(&raw("GET", "/orders/new", Some(&t), "", b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
}

/// An upstream that holds each request for `ms` and records how many it held at once.
async fn counting_upstream(ms: u64) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n, m) = (now.clone(), max.clone());
    let addr = serve_http(move |_req: Request<Incoming>| {
        let (now, max) = (n.clone(), m.clone());
        async move {
            let cur = now.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(cur, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            json_response(200, &json!({"ok": true}))
        }
    })
    .await
    .unwrap();
    (addr, now, max)
}

#[tokio::test]
async fn http2_streams_over_the_limit_wait_and_the_connection_survives() {
    let (addr, _, max) = counting_upstream(200).await;
    let e = env_with("http2_max_concurrent_streams = 2", &route_to("conc", &format!("http://{addr}"))).await;
    let t = e.token();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2_tls(&e.gw).await))
            .await
            .unwrap();
    let conn_task = tokio::spawn(conn);
    let port = e.port();
    let get = |path: String| {
        let mut sender = sender.clone();
        let t = t.clone();
        async move {
            let req = Request::get(format!("https://localhost:{port}{path}"))
                .header("authorization", format!("Bearer {t}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        }
    };
    // One request first, so the client has the server's SETTINGS (max 2 streams).
    assert_eq!(get("/conc/warm".into()).await.unwrap(), 200);
    max.store(0, Ordering::SeqCst);
    let start = Instant::now();
    let results = futures_util::future::join_all((0..6).map(|i| get(format!("/conc/{i}")))).await;
    let took = start.elapsed();
    for r in &results {
        assert_eq!(*r.as_ref().expect("a stream over the limit failed instead of waiting"), 200);
    }
    assert_eq!(max.load(Ordering::SeqCst), 2, "at most (and up to) 2 streams were in flight at once");
    assert!(took >= Duration::from_millis(550), "6 streams of 200 ms, 2 at a time, took only {took:?}");
    // Same connection, still fine.
    assert_eq!(get("/conc/after".into()).await.unwrap(), 200);
    assert!(!conn_task.is_finished());
}

// --- A minimal HTTP/2 framer, for a client that ignores the server's SETTINGS ---------------------------

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

fn hpack_int(out: &mut Vec<u8>, flags: u8, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, name from the static table, value not Huffman-coded.
fn hpack_literal(out: &mut Vec<u8>, name_index: usize, value: &str) {
    hpack_int(out, 0x00, 4, name_index);
    hpack_int(out, 0x00, 7, value.len());
    out.extend(value.as_bytes());
}

/// A GET `path` header block: :method GET, :scheme https (both indexed), :authority, :path,
/// authorization.
fn h2_get(path: &str, token: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x87];
    hpack_literal(&mut b, 1, "localhost");
    hpack_literal(&mut b, 4, path);
    hpack_literal(&mut b, 23, &format!("Bearer {token}"));
    b
}

/// A literal header field without indexing, new name; neither string Huffman-coded.
fn hpack_literal_new(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    hpack_int(out, 0x00, 7, name.len());
    out.extend(name.as_bytes());
    hpack_int(out, 0x00, 7, value.len());
    out.extend(value.as_bytes());
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads whole frames as (type, flags, stream, payload) until `done` says so or `within` passes.
async fn h2_read_frames<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<S>,
    within: Duration,
    mut done: impl FnMut(&[(u8, u8, u32, Vec<u8>)]) -> bool,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let deadline = Instant::now() + within;
    let mut frames = Vec::new();
    while Instant::now() < deadline && !done(&frames) {
        while c.buf.len() >= 9 {
            let len = u32::from_be_bytes([0, c.buf[0], c.buf[1], c.buf[2]]) as usize;
            if c.buf.len() < 9 + len {
                break;
            }
            let head: Vec<u8> = c.buf.drain(..9).collect();
            let payload: Vec<u8> = c.buf.drain(..len).collect();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            frames.push((head[3], head[4], stream, payload));
        }
        if done(&frames) {
            break;
        }
        let mut chunk = [0u8; 16 * 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => c.buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    frames
}

const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_GOAWAY: u8 = 0x7;
const REFUSED_STREAM: u32 = 0x7;

#[tokio::test]
async fn http2_streams_opened_past_the_limit_are_refused_without_breaking_the_connection() {
    let (addr, _, max) = counting_upstream(300).await;
    let e = env_with("http2_max_concurrent_streams = 2", &route_to("conc", &format!("http://{addr}"))).await;
    let t = e.token();
    let mut c = Conn::new(h2_tls(&e.gw).await);
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
    c.send(&hello).await;
    let frames =
        h2_read_frames(&mut c, WAIT, |f| f.iter().any(|(k, fl, _, _)| *k == H2_SETTINGS && fl & 1 == 0))
            .await;
    let settings =
        frames.iter().find(|(k, fl, _, _)| *k == H2_SETTINGS && fl & 1 == 0).expect("server SETTINGS");
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 2 is announced.
    let announced =
        settings.3.chunks(6).find(|s| s[..2] == [0, 3]).map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(announced, Some(2));
    // ACK, then four streams at once, ignoring the limit.
    let mut burst = h2_frame(H2_SETTINGS, 1, 0, &[]);
    for id in [1u32, 3, 5, 7] {
        burst.extend(h2_frame(H2_HEADERS, 0x5, id, &h2_get(&format!("/conc/{id}"), &t)));
    }
    c.send(&burst).await;
    let answered =
        |f: &[(u8, u8, u32, Vec<u8>)], id: u32| f.iter().any(|(k, _, s, _)| *k == H2_HEADERS && *s == id);
    let refused = |f: &[(u8, u8, u32, Vec<u8>)], id: u32| {
        f.iter().any(|(k, _, s, p)| *k == H2_RST_STREAM && *s == id && p[..] == REFUSED_STREAM.to_be_bytes())
    };
    let frames =
        h2_read_frames(&mut c, WAIT, |f| [1, 3, 5, 7].iter().all(|id| answered(f, *id) || refused(f, *id)))
            .await;
    assert!(!frames.iter().any(|(k, ..)| *k == H2_GOAWAY), "the connection was torn down: {frames:?}");
    let ok: Vec<u32> = [1, 3, 5, 7].into_iter().filter(|id| answered(&frames, *id)).collect();
    let no: Vec<u32> = [1, 3, 5, 7].into_iter().filter(|id| refused(&frames, *id)).collect();
    assert_eq!((ok, no), (vec![1, 3], vec![5, 7]), "streams past the limit are refused with REFUSED_STREAM");
    assert!(max.load(Ordering::SeqCst) <= 2);
    // A new stream on the same connection, now that the first two are done, is served.
    c.send(&h2_frame(H2_HEADERS, 0x5, 9, &h2_get("/conc/9", &t))).await;
    let frames = h2_read_frames(&mut c, WAIT, |f| answered(f, 9) || refused(f, 9)).await;
    assert!(answered(&frames, 9), "stream 9 after the burst: {frames:?}");
}

#[tokio::test]
async fn an_idle_http1_connection_is_closed_after_keep_alive_timeout() {
    let e = env("keep_alive_timeout_seconds = 0.3").await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), "", b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    let idle = Instant::now();
    let (_, closed) = c.read_to_eof(Duration::from_secs(2)).await;
    let after = idle.elapsed();
    assert!(closed, "an idle HTTP/1.1 connection was kept past 2 s with keep_alive_timeout_seconds = 0.3");
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_millis(1500),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_keep_alive_timeout() {
    let e = env("keep_alive_timeout_seconds = 0.3").await;
    let t = e.token();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2_tls(&e.gw).await))
            .await
            .unwrap();
    let conn_task = tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{}/orders/2", e.port()))
        .header("authorization", format!("Bearer {t}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let idle = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), conn_task).await;
    let after = idle.elapsed();
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection was kept past 2 s with keep_alive_timeout_seconds = 0.3"
    );
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_millis(1500),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped_after_handshake_timeout() {
    let e = env("handshake_timeout_seconds = 0.3").await;
    let sample = "residency_gateway_tls_handshake_failures_total{reason=\"timeout\"}";
    let before = e.gw.metric(sample).await;
    let mut c = Conn::new(TcpStream::connect(e.gw.addr()).await.unwrap());
    let start = Instant::now();
    let (_, closed) = c.read_to_eof(Duration::from_secs(2)).await;
    let after = start.elapsed();
    assert!(
        closed && after >= Duration::from_millis(250) && after < Duration::from_millis(1500),
        "{after:?}"
    );
    assert_eq!(e.gw.wait_metric(sample, before + 1.0).await, before + 1.0);
}

#[tokio::test]
async fn a_client_that_sends_no_request_or_half_a_head_is_dropped_after_header_read_timeout() {
    let e = env("header_read_timeout_seconds = 0.3").await;
    // Nothing after the handshake.
    let mut c = e.h1().await;
    let start = Instant::now();
    let (_, closed) = c.read_to_eof(Duration::from_secs(2)).await;
    assert!(closed && start.elapsed() < Duration::from_millis(1500), "silent: {:?}", start.elapsed());
    assert!(start.elapsed() >= Duration::from_millis(250));
    // Slowloris: a head trickling in one byte every 50 ms never completes.
    let mut c = e.h1().await;
    let start = Instant::now();
    let head =
        b"GET /orders/1 HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in head {
        if c.try_send(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !closed {
        closed = c.read_to_eof(Duration::from_secs(2)).await.1;
    }
    assert!(closed && start.elapsed() < Duration::from_millis(2500), "slowloris: {:?}", start.elapsed());
    assert_eq!(e.up.hits(), 0);
}

#[tokio::test]
async fn stalled_and_slow_clients_do_not_stall_a_normal_client() {
    let e = env("").await;
    let t = e.token();
    let mut stalled: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for _ in 0..5 {
        // TCP only, not a byte of TLS.
        stalled.push(Box::new(TcpStream::connect(e.gw.addr()).await.unwrap()));
        // Half a ClientHello.
        let mut tcp = TcpStream::connect(e.gw.addr()).await.unwrap();
        let hello = client_hello_bytes(&e.gw);
        tcp.write_all(&hello[..hello.len() / 2]).await.unwrap();
        stalled.push(Box::new(tcp));
        // TLS done, nothing sent.
        stalled.push(Box::new(h1_tls(&e.gw).await));
        // Half a request head.
        let mut c = e.h1().await;
        c.send(b"GET /orders/1 HTTP/1.1\r\nHost: localhost\r\nX-Half: ").await;
        stalled.push(Box::new(c));
        // A full head and 10 bytes of a 1000-byte body: this one is authorised and holds an upstream request.
        let mut c = e.h1().await;
        c.send(&raw("POST", "/orders/stalled", Some(&t), "Content-Length: 1000\r\n", b"0123456789")).await;
        stalled.push(Box::new(c));
    }
    // Two clients that ask for 64 MiB and never read it.
    for _ in 0..2 {
        let mut c = e.h1().await;
        c.send(&raw("GET", "/big?bytes=67108864", Some(&t), "", b"")).await;
        stalled.push(Box::new(c));
    }
    // A normal client is served promptly, over both protocols, and so are the admin endpoints.
    for i in 0..5 {
        let start = Instant::now();
        let mut c = e.h1().await;
        c.send(&raw("GET", &format!("/orders/normal-{i}"), Some(&t), "", b"")).await;
        assert_eq!(c.response().await.unwrap().status, 200);
        assert!(start.elapsed() < Duration::from_secs(1), "a normal request took {:?}", start.elapsed());
    }
    let client = support::client_h2(&e.gw.pki);
    let start = Instant::now();
    let resp = client.get(format!("{}/orders/h2", e.gw.base)).bearer_auth(&t).send().await.unwrap();
    assert_eq!((resp.version(), resp.status().as_u16()), (http::Version::HTTP_2, 200));
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(reqwest::get(format!("{}/healthz", e.gw.admin)).await.unwrap().status(), 200);
    drop(stalled);
}

/// A real ClientHello as rustls writes it for this gateway.
fn client_hello_bytes(gw: &Gw) -> Vec<u8> {
    let cfg = tls_client_config(&gw.pki, rustls::DEFAULT_VERSIONS, &[]);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    assert!(out.len() > 100 && out[0] == 0x16, "a handshake record");
    out
}

// =========================================================================================================
// Request smuggling, client side: raw bytes over TLS

/// A request after the body, which must never be taken as a second request once framing is in doubt.
fn smuggled(t: &str) -> Vec<u8> {
    raw("GET", "/orders/smuggled", Some(t), "", b"")
}

/// Sends `head` + `body` + a smuggled request: the gateway must answer 400, close the connection, and send
/// nothing to the upstream.
async fn assert_refused(e: &Env, what: &str, head_extra: &str, body: &[u8]) {
    let t = e.token();
    let mut bytes = raw("POST", "/orders/1", Some(&t), head_extra, body);
    bytes.extend(smuggled(&t));
    let hits = e.up.hits();
    let (text, closed) = e.exchange(&bytes).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{what}: expected 400, got {text:?}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{what}: more than one response: {text:?}");
    assert!(closed, "{what}: the connection stayed open");
    assert_eq!(e.up.hits(), hits, "{what}: something reached the upstream");
}

#[tokio::test]
async fn ambiguous_request_framing_is_400_closed_and_never_forwarded() {
    let e = env("").await;
    let body = b"5\r\nhello\r\n0\r\n\r\n";
    let cases: &[(&str, &str, &[u8])] = &[
        ("TE xchunked", "Transfer-Encoding: xchunked\r\n", body),
        ("TE chunked, identity", "Transfer-Encoding: chunked, identity\r\n", body),
        ("TE identity", "Transfer-Encoding: identity\r\nContent-Length: 5\r\n", b"hello"),
        ("TE gzip", "Transfer-Encoding: gzip\r\n", body),
        ("space before colon", "Transfer-Encoding : chunked\r\n", body),
        ("tab before colon", "Transfer-Encoding\t: chunked\r\n", body),
        ("CL list 5, 6", "Content-Length: 5, 6\r\n", b"hello"),
        ("CL list 5, 5", "Content-Length: 5, 5\r\n", b"hello"),
        ("two different CL", "Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
        ("CL +5", "Content-Length: +5\r\n", b"hello"),
        ("CL -1", "Content-Length: -1\r\n", b"hello"),
        ("CL hex", "Content-Length: 0x5\r\n", b"hello"),
        ("CL with a control character", "Content-Length: 5\x01\r\n", b"hello"),
        ("CL with a NUL", "Content-Length: 5\x00\r\n", b"hello"),
        ("TE with a vertical tab", "Transfer-Encoding: \x0bchunked\r\n", body),
        ("TE with a NUL", "Transfer-Encoding: chunked\x00\r\n", body),
        ("TE with a bare CR", "Transfer-Encoding: chunked\rX: y\r\n", body),
        ("obs-fold in TE", "Transfer-Encoding: identity\r\n chunked\r\n", body),
        ("obs-fold in CL", "Content-Length: 5\r\n 6\r\n", b"hello"),
        ("obs-fold after TE", "Transfer-Encoding: chunked\r\n\tX-Folded: 1\r\n", body),
        ("header name with a space", "Bad Header: 1\r\nContent-Length: 5\r\n", b"hello"),
        ("header name with a NUL", "Bad\x00Header: 1\r\nContent-Length: 5\r\n", b"hello"),
        ("header line without a colon", "NoColonHere\r\nContent-Length: 5\r\n", b"hello"),
    ];
    for (what, head, body) in cases {
        assert_refused(&e, what, head, body).await;
    }

    // HTTP/1.0 knows no chunked encoding.
    let t = e.token();
    let mut bytes = format!(
        "POST /orders/1 HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    bytes.extend(body);
    let (text, closed) = e.exchange(&bytes).await;
    assert!(text.starts_with("HTTP/1.1 400") && closed, "HTTP/1.0 + chunked: {text:?}");
    assert_eq!(e.up.hits(), 0);
    assert_no_foreign_panics();
}

/// Sends one request with `head_extra` and `body` plus a smuggled one; returns the responses, whether
/// the gateway closed the connection, and what the upstream saw.
async fn normalised(e: &Env, head_extra: &str, body: &[u8], then: bool) -> (Vec<Resp>, bool, support::Seen) {
    let t = e.token();
    let mut bytes = raw("POST", "/orders/1", Some(&t), head_extra, body);
    if then {
        bytes.extend(smuggled(&t));
    }
    let mut c = e.h1().await;
    c.send(&bytes).await;
    let mut responses = Vec::new();
    for _ in 0..1 + usize::from(then) {
        match c.response().await {
            Some(r) => responses.push(r),
            None => break,
        }
    }
    let (_, closed) = c.read_to_eof(Duration::from_millis(500)).await;
    (responses, closed, e.up.seen())
}

#[tokio::test]
async fn content_length_and_transfer_encoding_together_are_normalised_to_chunked_and_the_connection_closed() {
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; an intermediary that forwards such a
    // message must drop Content-Length. hyper decodes it as chunked and closes the connection after the
    // response, so bytes after the chunked body are never read as a request.
    let e = env("").await;
    for head in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        "Content-Length: 40\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let hits = e.up.hits();
        let (responses, closed, seen) = normalised(&e, head, b"5\r\nhello\r\n0\r\n\r\n", true).await;
        assert_eq!(responses.len(), 1, "{head:?}: one response only, the smuggled request is never answered");
        assert_eq!(responses[0].status, 200);
        assert!(closed, "{head:?}: the connection is closed after the response");
        assert_eq!(e.up.hits(), hits + 1, "{head:?}: the smuggled request reached the upstream");
        assert_eq!(seen.path_and_query, "/orders/1");
        assert_eq!(seen.header("content-length"), None, "{head:?}: upstream got Content-Length with chunked");
        assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
        assert_eq!(seen.headers.iter().filter(|(k, _)| k == "transfer-encoding").count(), 1);
        assert_eq!(seen.body_len, 5, "{head:?}: the body as sent chunked");
    }
}

#[tokio::test]
async fn repeated_chunked_and_repeated_equal_lengths_are_normalised_to_one_framing() {
    // `chunked` twice (two lines or a list) still ends in chunked: hyper decodes it once, the gateway
    // drops the header and frames the forwarded body itself. Equal Content-Length lines collapse to one.
    let e = env("").await;
    for head in [
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
    ] {
        let (responses, _, seen) = normalised(&e, head, b"5\r\nhello\r\n0\r\n\r\n", false).await;
        assert_eq!(responses[0].status, 200, "{head:?}");
        assert_eq!(
            seen.headers.iter().filter(|(k, _)| k == "transfer-encoding").count(),
            1,
            "{head:?} {seen:?}"
        );
        assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
        assert_eq!(seen.header("content-length"), None);
        assert_eq!(seen.body_len, 5);
    }
    let (responses, _, seen) =
        normalised(&e, "Content-Length: 5\r\nContent-Length: 5\r\n", b"hello", false).await;
    assert_eq!(responses[0].status, 200);
    assert_eq!(
        seen.headers.iter().filter(|(k, _)| k == "content-length").collect::<Vec<_>>(),
        [&("content-length".to_string(), "5".to_string())]
    );
    assert_eq!(seen.body_len, 5);
    // Framing is unambiguous in all three, so the connection is kept and a pipelined request after the
    // body is a real request of its own.
    let hits = e.up.hits();
    let (responses, _, seen) =
        normalised(&e, "Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n", true).await;
    assert_eq!(responses.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
    assert_eq!(e.up.hits(), hits + 2);
    assert_eq!(seen.path_and_query, "/orders/smuggled");
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_client_error_not_an_upstream_error() {
    // The head is fine, so the request is authorised and forwarded; then the chunk framing breaks. The
    // fault is the client's: 400, not 502 `upstream_invalid_response` (which would page whoever runs the
    // upstream, and lets any client inflate upstream-error metrics).
    let e = env("").await;
    let t = e.token();
    for body in [&b"zz\r\nhello\r\n0\r\n\r\n"[..], b"5\r\nhelloXX0\r\n\r\n", b"ffffffffffffffffff\r\nx\r\n"] {
        let mut c = e.h1().await;
        c.send(&raw("POST", "/orders/1", Some(&t), "Transfer-Encoding: chunked\r\n", body)).await;
        let r = c.response().await;
        let (status, reason) = r.as_ref().map(|r| (r.status, r.reason())).unwrap_or((0, String::new()));
        assert!(
            status == 400 || r.is_none(),
            "a broken chunked body {:?} got {status} {reason} (expected 400 or a closed connection)",
            String::from_utf8_lossy(body)
        );
    }
    let upstream_errors =
        e.gw.metric("residency_gateway_requests_total{outcome=\"upstream_error\",route=\"orders\"}").await;
    assert_eq!(upstream_errors, 0.0, "client framing errors were counted as upstream errors");
}

#[tokio::test]
async fn http2_requests_that_would_desync_an_http1_upstream_never_reach_it() {
    // HTTP/2 -> HTTP/1.1 downgrade smuggling: connection-specific headers, CR/LF inside a value, and a
    // body longer than its content-length are malformed in HTTP/2 (RFC 9113 §8.1.1, §8.2.1, §8.2.2) and
    // must be reset, not rewritten into an HTTP/1.1 request.
    let e = env("").await;
    let t = e.token();
    let cases: &[(&str, &str, &str)] = &[
        ("transfer-encoding", "transfer-encoding", "chunked"),
        ("connection", "connection", "keep-alive"),
        ("keep-alive", "keep-alive", "timeout=5"),
        ("upgrade", "upgrade", "websocket"),
        ("CRLF in a value", "x-inject", "a\r\nTransfer-Encoding: chunked"),
        ("LF in a value", "x-inject", "a\nX-Smuggled: 1"),
        ("NUL in a value", "x-inject", "a\0b"),
        ("upper-case name", "X-Upper", "1"),
        ("space in a name", "x bad", "1"),
    ];
    for (what, name, value) in cases {
        let mut c = Conn::new(h2_tls(&e.gw).await);
        let mut block = h2_get("/orders/h2", &t);
        hpack_literal_new(&mut block, name, value);
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
        bytes.extend(h2_frame(H2_HEADERS, 0x5, 1, &block));
        c.send(&bytes).await;
        let frames = h2_read_frames(&mut c, WAIT, |f| {
            f.iter().any(|(k, _, s, _)| {
                (*k == H2_RST_STREAM && *s == 1) || *k == H2_GOAWAY || (*k == H2_HEADERS && *s == 1)
            })
        })
        .await;
        let reset = frames.iter().any(|(k, _, s, _)| (*k == H2_RST_STREAM && *s == 1) || *k == H2_GOAWAY);
        let answered = frames.iter().any(|(k, _, s, _)| *k == H2_HEADERS && *s == 1);
        assert!(reset || answered, "{what}: no answer at all: {frames:?}");
        assert_eq!(e.up.hits(), 0, "{what}: a malformed HTTP/2 request reached the upstream");
    }

    // DATA beyond the declared content-length: the upstream gets at most the declared 5 bytes.
    let mut c = Conn::new(h2_tls(&e.gw).await);
    let mut block = h2_get("/orders/cl", &t);
    block[0] = 0x83; // :method POST
    hpack_literal(&mut block, 28, "5"); // content-length
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
    bytes.extend(h2_frame(H2_HEADERS, 0x4, 1, &block));
    c.send(&bytes).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(&h2_frame(0x0, 0x1, 1, b"helloSMUGGLED")).await;
    let frames = h2_read_frames(&mut c, WAIT, |f| {
        f.iter().any(|(k, _, s, _)| {
            (*k == H2_RST_STREAM && *s == 1) || *k == H2_GOAWAY || (*k == H2_HEADERS && *s == 1)
        })
    })
    .await;
    assert!(!frames.is_empty());
    if let Some(seen) = eventually(|| last_seen(&e.up)).await {
        assert!(seen.body_len <= 5, "the upstream got {} bytes of a 5-byte body", seen.body_len);
    }
}

// =========================================================================================================
// Request smuggling, upstream side: responses framed badly by a raw TCP upstream

const OK_HELLO: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

async fn through_raw_upstream(response: &'static [u8]) -> (Env, RawUpstream, Option<Resp>) {
    let up = RawUpstream::start(move |_, _| (response.to_vec(), After::Close)).await;
    let e = env_with("", &route_to("raw", &up.url())).await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("GET", "/raw/1", Some(&t), "", b"")).await;
    let r = c.response().await;
    (e, up, r)
}

#[tokio::test]
async fn upstream_responses_with_invalid_framing_are_502() {
    let cases: &[(&str, &[u8])] = &[
        ("two different CL", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("CL list 5, 6", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!"),
        ("CL -5", b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello"),
        ("space before colon", b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello"),
        ("obs-fold", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n 2\r\n\r\nhello"),
        ("NUL in a value", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: a\x00b\r\n\r\nhello"),
        ("bad status line", b"HTTP/1.1 2x0 OK\r\nContent-Length: 5\r\n\r\nhello"),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        ("bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ];
    for (what, response) in cases {
        let (_e, up, r) = through_raw_upstream(response).await;
        assert_eq!(up.hits(), 1, "{what}");
        if *what == "bad chunk size" {
            // The head was fine, so the 200 is already on its way when the body breaks: the gateway can
            // only cut the response off (the client sees an incomplete chunked body and a closed
            // connection), never pass it on as if it were whole.
            assert!(r.as_ref().is_none_or(|r| r.status == 502), "{what}: passed on as a whole body: {r:?}");
            continue;
        }
        let r = r.unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!((r.status, r.reason().as_str()), (502, "upstream_invalid_response"), "{what}");
    }
    assert_no_foreign_panics();
}

#[tokio::test]
async fn upstream_responses_with_both_lengths_or_an_unknown_coding_reach_the_client_with_one_framing() {
    // RFC 9112 §6.3: with both, Transfer-Encoding wins and Content-Length is dropped before forwarding;
    // with a coding other than chunked last, a response runs until the upstream closes. Either way the
    // client gets one framing the gateway chose, and never the upstream's Transfer-Encoding.
    let cases: &[(&str, &[u8])] = &[
        ("CL + TE", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ("TE + CL", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ("TE xchunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nhello"),
        ("TE chunked, identity", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\nhello"),
    ];
    for (what, response) in cases {
        let (_e, _up, r) = through_raw_upstream(response).await;
        let r = r.unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(r.status, 200, "{what}");
        let te = r.header("transfer-encoding");
        let cl = r.header("content-length");
        assert!(!(te.is_some() && cl.is_some()), "{what}: both framings reached the client: {:?}", r.headers);
        assert!(te.is_none_or(|v| v.eq_ignore_ascii_case("chunked")), "{what}: TE {te:?} reached the client");
        assert_eq!(r.body, b"hello", "{what}");
    }
}

#[tokio::test]
async fn an_extra_response_from_the_upstream_is_never_served_to_the_next_client() {
    // Response-queue poisoning: the upstream sends two responses to one request. The second must not be
    // taken as the answer to the next request on the pooled connection.
    let up = RawUpstream::start(|n, _| match n {
        0 => (
            [OK_HELLO, b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Poison: 1\r\n\r\npoisoned"].concat(),
            After::KeepAlive,
        ),
        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond".to_vec(), After::KeepAlive),
    })
    .await;
    let e = env_with("", &route_to("raw", &up.url())).await;
    let t = e.token();
    for (i, want) in [(0, &b"hello"[..]), (1, b"second")] {
        let mut c = e.h1().await;
        c.send(&raw("GET", &format!("/raw/{i}"), Some(&t), "", b"")).await;
        let r = c.response().await.expect("a response");
        assert_ne!(r.body, b"poisoned", "request {i} got the upstream's extra response");
        assert_eq!(r.header("x-poison"), None);
        if r.status == 200 {
            assert_eq!(r.body, want, "request {i}");
        } else {
            assert_eq!(r.status, 502, "request {i}");
        }
    }
}

#[tokio::test]
async fn dot_segments_with_path_parameters_are_invalid_path() {
    // Servlet containers (Tomcat, Jetty) and some frameworks drop `;params` from a segment before
    // resolving dot segments, so `/orders/..;/admin` reaches `/admin` on the upstream: the same
    // escape from the route's prefix that plain `..` is refused for (src/route.rs `path_is_normal`).
    let e = env("").await;
    let t = e.token();
    for path in
        ["/orders/..;/admin", "/orders/..;x=1/admin", "/orders/%2e%2e;/admin", "/orders/a/..;/..;/admin"]
    {
        let mut c = e.h1().await;
        c.send(&raw("GET", path, Some(&t), "", b"")).await;
        let r = c.response().await.expect("a response");
        assert_eq!((r.status, r.reason().as_str()), (400, "invalid_path"), "{path}");
    }
    assert_eq!(e.up.hits(), 0);
}

// =========================================================================================================
// Forged forwarding headers

#[tokio::test]
async fn forged_forwarding_headers_are_replaced() {
    let e = env("").await;
    let t = e.token();
    let forged = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Proto: http\r\n\
                  X-Forwarded-Host: evil.example\r\nX-Request-Id: forged-id\r\nForwarded: for=203.0.113.7;proto=http\r\n";
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), forged, b"")).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    let seen = e.up.seen();
    let all = |name: &str| {
        seen.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect::<Vec<_>>()
    };
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(all("x-forwarded-proto"), ["https"]);
    assert_eq!(all("x-forwarded-host"), ["localhost"]);
    assert_eq!(all("forwarded"), Vec::<&str>::new());
    let id = all("x-request-id");
    assert_eq!(id.len(), 1);
    assert_ne!(id[0], "forged-id");
    assert_eq!(r.header("x-request-id"), Some(id[0]), "the client sees the id the upstream got");
}

#[tokio::test]
async fn naming_forwarding_headers_in_connection_does_not_strip_the_gateways_own() {
    let e = env("").await;
    let t = e.token();
    let extra = "Connection: keep-alive, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Request-Id\r\n\
                 X-Forwarded-For: 203.0.113.7\r\n";
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), extra, b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    let seen = e.up.seen();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("localhost"));
    assert!(seen.header("x-request-id").is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn a_trusted_proxys_chain_is_kept_and_appended_to() {
    let chain = "X-Forwarded-For: 203.0.113.7, 198.51.100.1\r\nX-Forwarded-For: 192.0.2.9\r\n";
    let e = env("trusted_proxies = [\"127.0.0.1/32\"]").await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), chain, b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(
        e.up.seen().header("x-forwarded-for"),
        Some("203.0.113.7, 198.51.100.1, 192.0.2.9, 127.0.0.1")
    );
    // No chain from a trusted proxy, or only empty values: just the peer.
    for extra in ["", "X-Forwarded-For: \r\n", "X-Forwarded-For: \r\nX-Forwarded-For:  \r\n"] {
        let mut c = e.h1().await;
        c.send(&raw("GET", "/orders/2", Some(&t), extra, b"")).await;
        assert_eq!(c.response().await.unwrap().status, 200);
        assert_eq!(e.up.seen().header("x-forwarded-for"), Some("127.0.0.1"), "{extra:?}");
    }
    // Empty values among real ones are left out.
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/3", Some(&t), "X-Forwarded-For: \r\nX-Forwarded-For: 192.0.2.9\r\n", b""))
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(e.up.seen().header("x-forwarded-for"), Some("192.0.2.9, 127.0.0.1"));

    // Trusting another range only: the chain is replaced.
    let e = env("trusted_proxies = [\"10.0.0.0/8\"]").await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), chain, b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(e.up.seen().header("x-forwarded-for"), Some("127.0.0.1"));
    // No trusted proxies at all: replaced.
    let e = env("").await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("GET", "/orders/1", Some(&t), chain, b"")).await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(e.up.seen().header("x-forwarded-for"), Some("127.0.0.1"));
}

// =========================================================================================================
// Upgrades and Expect: nothing happens before the request is authorised

const WS_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

async fn ws_upstream() -> RawUpstream {
    RawUpstream::start(|_, _| {
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec(),
            After::Echo,
        )
    })
    .await
}

#[tokio::test]
async fn a_websocket_upgrade_without_a_valid_token_is_refused_before_the_upstream() {
    let up = ws_upstream().await;
    let e = env_with("", &route_to("ws", &up.url())).await;
    let us_token = e.idp.token(json!(["US"]));
    for (what, token, status) in [
        ("no token", None, 401),
        ("bad token", Some("not.a.jwt"), 401),
        ("wrong region", Some(us_token.as_str()), 403),
    ] {
        let mut c = e.h1().await;
        c.send(&raw("GET", "/ws/chat", token, WS_HEADERS, b"")).await;
        let r = c.response().await.unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(r.status, status, "{what}");
        assert_ne!(r.header("upgrade"), Some("websocket"), "{what}");
        // The connection did not switch: bytes sent now are not echoed by anyone.
        let _ = c.try_send(b"\x81\x05hello").await;
        let (rest, _) = c.read_to_eof(Duration::from_millis(300)).await;
        assert!(find(&rest, b"hello").is_none(), "{what}: bytes were tunnelled");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(up.connections.load(Ordering::SeqCst), 0, "the upstream was connected to");
}

#[tokio::test]
async fn a_websocket_upgrade_with_a_valid_token_is_tunnelled() {
    let up = ws_upstream().await;
    let e = env_with("", &route_to("ws", &up.url())).await;
    let t = e.token();
    let mut c = e.h1().await;
    c.send(&raw("GET", "/ws/chat", Some(&t), WS_HEADERS, b"")).await;
    let r = c.response().await.expect("a 101");
    assert_eq!(r.status, 101);
    assert!(r.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")));
    c.send(b"\x81\x05hello-through-the-tunnel").await;
    let mut got = std::mem::take(&mut c.buf);
    while find(&got, b"hello-through-the-tunnel").is_none() {
        assert!(c.fill().await, "the tunnel did not echo; got {:?}", String::from_utf8_lossy(&got));
        got.append(&mut c.buf);
    }
    let head = up.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.contains("upgrade: websocket") && head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="), "{head}");
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_after_authorisation() {
    let e = env("").await;
    let t = e.token();
    let head = "Content-Length: 10\r\nExpect: 100-continue\r\n";
    // Bad token: 401 straight away, never `100 Continue`.
    for (what, token) in [("no token", None), ("bad token", Some("not.a.jwt"))] {
        let mut c = e.h1().await;
        c.send(&raw("POST", "/orders/1", token, head, b"")).await;
        let r = c.response().await.unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(r.status, 401, "{what}: first response");
    }
    // Over the route's limit: 413, never `100 Continue`.
    let mut c = e.h1().await;
    c.send(&raw("POST", "/small/1", Some(&t), "Content-Length: 5000\r\nExpect: 100-continue\r\n", b"")).await;
    assert_eq!(c.response().await.unwrap().status, 413);
    assert_eq!(e.up.hits(), 0);

    // Good token: `100 Continue`, then the body goes through.
    let mut c = e.h1().await;
    c.send(&raw("POST", "/orders/1", Some(&t), head, b"")).await;
    let r = c.response().await.expect("100 Continue");
    assert_eq!(r.status, 100);
    c.send(b"0123456789").await;
    let r = c.response().await.expect("the final response");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 10);
    let seen = e.up.seen();
    assert_eq!(seen.body_len, 10);
    assert_eq!(seen.header("expect"), None, "Expect was answered at this hop and not forwarded");
}

// =========================================================================================================
// Panic freedom: garbage in every layer, then the next client is served normally

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Drops `tcp` with SO_LINGER 0, so the peer gets a TCP reset instead of a FIN (zero linger does not
/// block on drop, which is what the deprecation warns about).
#[allow(deprecated)]
fn reset(tcp: TcpStream) {
    let _ = tcp.set_linger(Some(Duration::ZERO));
    drop(tcp);
}

async fn send_and_drop(mut tcp: TcpStream, bytes: &[u8]) {
    let _ = tcp.write_all(bytes).await;
    let _ = tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut [0u8; 1024])).await;
}

#[tokio::test]
async fn garbage_truncation_and_abrupt_disconnects_do_not_hurt_the_gateway() {
    let e = env("handshake_timeout_seconds = 1\nheader_read_timeout_seconds = 1").await;
    let t = e.token();
    let addr = e.gw.addr();
    let hello = client_hello_bytes(&e.gw);

    // Plain garbage, and plain HTTP, on the TLS port.
    for seed in 1..6 {
        send_and_drop(TcpStream::connect(addr).await.unwrap(), &noise(seed, 4096)).await;
    }
    send_and_drop(TcpStream::connect(addr).await.unwrap(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // Truncated and lying TLS records.
    for bytes in [
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00][..],
        &[0x16, 0x03, 0x01, 0xff, 0xff],
        &[0x16, 0x03, 0x03, 0x00, 0x00],
        &[0x17, 0x03, 0x03, 0x00, 0x10, 1, 2, 3],
        &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        &[0x80, 0x2e, 0x01, 0x00, 0x02],
    ] {
        send_and_drop(TcpStream::connect(addr).await.unwrap(), bytes).await;
    }
    // A real ClientHello cut at several points, and one with flipped bytes.
    for cut in [5, 9, hello.len() / 3, hello.len() / 2, hello.len() - 1] {
        send_and_drop(TcpStream::connect(addr).await.unwrap(), &hello[..cut]).await;
    }
    for seed in 1..6 {
        let mut bad = hello.clone();
        for (i, n) in noise(seed, 8).into_iter().enumerate() {
            let at = 5 + (n as usize * 7 + i * 31) % (bad.len() - 5);
            bad[at] ^= n | 1;
        }
        send_and_drop(TcpStream::connect(addr).await.unwrap(), &bad).await;
    }
    // After a valid handshake: garbage as application data (HTTP/1.1), and raw bytes that are not TLS
    // records at all.
    for seed in 1..4 {
        let mut c = e.h1().await;
        let _ = c.try_send(&noise(seed, 2048)).await;
        let _ = c.read_to_eof(Duration::from_millis(500)).await;
        let (mut tcp, _) = h1_tls(&e.gw).await.into_inner();
        let _ = tcp.write_all(&noise(seed + 10, 512)).await;
        let _ = tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut [0u8; 64])).await;
    }
    // HTTP/2: the preface then garbage; a HEADERS frame whose block is not HPACK; an h2 preface on an
    // HTTP/1.1 connection; an HTTP/1.1 request on an h2 connection.
    for seed in 1..4 {
        let mut c = Conn::new(h2_tls(&e.gw).await);
        let _ = c.try_send(&[H2_PREFACE, &noise(seed, 1024)].concat()).await;
        let _ = c.read_to_eof(Duration::from_millis(500)).await;
        let mut c = Conn::new(h2_tls(&e.gw).await);
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
        bytes.extend(h2_frame(H2_HEADERS, 0x5, 1, &noise(seed, 64)));
        let _ = c.try_send(&bytes).await;
        let _ = c.read_to_eof(Duration::from_millis(500)).await;
    }
    let mut c = e.h1().await;
    let _ = c.try_send(H2_PREFACE).await;
    let _ = c.read_to_eof(Duration::from_millis(500)).await;
    let mut c = Conn::new(h2_tls(&e.gw).await);
    let _ = c.try_send(&raw("GET", "/orders/1", Some(&t), "", b"")).await;
    let _ = c.read_to_eof(Duration::from_millis(500)).await;

    // Disconnects mid-head, mid-body (politely and with a TCP reset), and mid-response.
    let mut c = e.h1().await;
    c.send(b"GET /orders/1 HTTP/1.1\r\nHost: local").await;
    drop(c);
    let mut c = e.h1().await;
    c.send(&raw("POST", "/orders/cut", Some(&t), "Content-Length: 100000\r\n", &[b'x'; 1000])).await;
    drop(c);
    let mut c = e.h1().await;
    c.send(&raw("POST", "/orders/reset", Some(&t), "Content-Length: 100000\r\n", &[b'x'; 1000])).await;
    reset(c.s.into_inner().0);
    for _ in 0..3 {
        let mut c = e.h1().await;
        c.send(&raw("GET", "/big?bytes=33554432", Some(&t), "", b"")).await;
        let mut got = 0;
        while got < 200_000 && c.fill().await {
            got += c.buf.len();
            c.buf.clear();
        }
        assert!(got >= 200_000, "the big response started");
        drop(c);
    }
    let mut c = Conn::new(h2_tls(&e.gw).await);
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
    bytes.extend(h2_frame(H2_HEADERS, 0x5, 1, &h2_get("/big?bytes=33554432", &t)));
    c.send(&bytes).await;
    let _ = h2_read_frames(&mut c, Duration::from_millis(500), |f| f.len() > 3).await;
    reset(c.s.into_inner().0);

    // Let the gateway notice every one of those.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_no_foreign_panics();

    // The next clients are served normally.
    for i in 0..3 {
        let mut c = e.h1().await;
        c.send(&raw("GET", &format!("/orders/after-{i}"), Some(&t), "", b"")).await;
        let r = c.response().await.expect("a normal request after the garbage");
        assert_eq!(r.status, 200);
    }
    let resp =
        support::client_h2(&e.gw.pki).get(format!("{}/orders/h2", e.gw.base)).bearer_auth(&t).send().await;
    assert_eq!(resp.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("{}/healthz", e.gw.admin)).await.unwrap().status(), 200);
    let m = e.gw.metrics().await;
    assert!(m.contains("residency_gateway_tls_handshake_failures_total"), "metrics are still served");
    assert_no_foreign_panics();
}

// =========================================================================================================
// Found while fuzzing `config` (fuzz/fuzz_targets/config.rs): policy loading

#[test]
fn a_deep_chain_of_shared_groups_loads_in_linear_time() {
    // `G00 = ["G01", "G01"]`, `G01 = ["G02", "G02"]`, … : each group is expanded by walking every path
    // below it, so 40 lines of policy take 2^40 steps (src/policy.rs `expand`, called per group from
    // `Policy::from_sources`, without memoising groups already expanded). `check`, `run` and a reload
    // would hang on such a file. Expanded once per group, this is instant.
    use residency_gateway::config::Source;
    use residency_gateway::policy::Policy;
    let depth = 40;
    let mut text = String::from("[groups]\n");
    for i in 0..depth {
        text.push_str(&format!("G{i:02} = [\"G{:02}\", \"G{:02}\", \"FR\"]\n", i + 1, i + 1));
    }
    text.push_str(&format!("G{depth:02} = [\"DE\"]\n"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let src = Source::from_text("deep.toml", text).unwrap();
        let _ = tx.send(Policy::from_sources(&[src]).map(|p| p.group_size("G00")).map_err(|e| e.len()));
    });
    let loaded = rx.recv_timeout(Duration::from_secs(3));
    let loaded = loaded.expect("a 41-line policy file did not load within 3 s").expect("the policy is valid");
    assert_eq!(loaded, Some(2), "G00 expands to DE and FR");
}
