//! The TLS listener: version floor, cipher allowlist, handshake deadline and header-read deadline,
//! each failure counted under its reason. Legacy ClientHellos are written by hand on raw sockets
//! (rustls cannot speak TLS 1.1 or CBC suites); the rest uses rustls clients with chosen settings.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use rustls::version::{TLS12, TLS13};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Gw, Idp, Upstream, config_text_with, tls_client_config, tls_connect};

fn failures(reason: &str) -> String {
    format!("residency_gateway_tls_handshake_failures_total{{reason=\"{reason}\"}}")
}

/// The handshake-failure samples, for assertion messages.
async fn tls_lines(gw: &Gw) -> String {
    let text = gw.metrics().await;
    text.lines()
        .filter(|l| l.starts_with("residency_gateway_tls_handshake_failures_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `no_shared_cipher_suite` plus `protocol_version` failures.
async fn total_failures(gw: &Gw) -> f64 {
    gw.metric(&failures("no_shared_cipher_suite")).await + gw.metric(&failures("protocol_version")).await
}

/// A config with one issuer and one DE route, `server_extra` in `[server]`, `tls_extra` in
/// `[server.tls]`.
async fn start(server_extra: &str, tls_extra: &str) -> (Gw, Idp, Upstream) {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let body = format!(
        "[[issuers]]\nname = \"corp\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"{}\"\n\
         jurisdiction = \"DE\"\nissuers = [\"corp\"]\n",
        idp.issuer(),
        idp.jwks_uri(),
        up.url()
    );
    let gw = Gw::start_full(&config_text_with(server_extra, tls_extra, &body)).await;
    (gw, idp, up)
}

fn u16be(v: usize) -> [u8; 2] {
    (v as u16).to_be_bytes()
}

fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
    [&kind.to_be_bytes()[..], &u16be(data.len()), data].concat()
}

/// A ClientHello record: `version` in both the record and the hello, the given suites, null
/// compression, the given extensions.
fn client_hello(version: u16, suites: &[u16], extensions: &[Vec<u8>]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    body.push(0); // no session id
    body.extend(u16be(suites.len() * 2));
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]); // compression: null
    let ext: Vec<u8> = extensions.concat();
    body.extend(u16be(ext.len()));
    body.extend(ext);
    let mut hs = vec![1u8]; // client_hello
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![22u8];
    record.extend(version.to_be_bytes());
    record.extend(u16be(hs.len()));
    record.extend(hs);
    record
}

fn sni(name: &str) -> Vec<u8> {
    let entry = [&[0u8][..], &u16be(name.len()), name.as_bytes()].concat();
    extension(0x0000, &[&u16be(entry.len())[..], &entry].concat())
}

/// The extensions an OpenSSL-style client sends with a pre-1.2 hello (no signature_algorithms:
/// that extension only exists from TLS 1.2 on).
fn legacy_extensions() -> Vec<Vec<u8>> {
    vec![
        sni("localhost"),
        extension(0x000b, &[1, 0]), // ec_point_formats: uncompressed
        extension(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]), // supported_groups: x25519, P-256
        extension(0x0023, &[]),     // session_ticket
        extension(0xff01, &[0]),    // renegotiation_info
    ]
}

fn signature_algorithms() -> Vec<u8> {
    // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    extension(0x000d, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01])
}

/// Sends `hello` on a fresh connection and returns what the server answered before closing
/// (bounded by 3 s).
async fn send_hello(gw: &Gw, hello: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(gw.addr()).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server neither answered nor closed within 3 s");
    got
}

/// The answer is a fatal alert record (or nothing: a plain close), never a ServerHello.
fn assert_alert_or_close(answer: &[u8]) -> Option<u8> {
    if answer.is_empty() {
        return None;
    }
    assert_eq!(answer[0], 21, "expected an alert record, got {answer:02x?}");
    assert!(answer.len() >= 7, "short alert {answer:02x?}");
    assert_eq!(answer[5], 2, "the alert is fatal: {answer:02x?}");
    Some(answer[6])
}

#[tokio::test]
async fn a_tls_1_1_client_hello_is_refused_and_counted_as_protocol_version() {
    let (gw, _idp, _up) = start("", "").await;
    let sample = failures("protocol_version");
    let before = gw.metric(&sample).await;
    let hello = client_hello(0x0302, &[0xc013, 0xc014, 0x002f, 0x0035, 0x000a], &legacy_extensions());
    assert_alert_or_close(&send_hello(&gw, &hello).await);
    assert_eq!(gw.wait_metric(&sample, before + 1.0).await, before + 1.0, "{}", tls_lines(&gw).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_tls_1_1_client_hello_with_signature_algorithms_is_refused_as_protocol_version() {
    let (gw, _idp, _up) = start("", "").await;
    let sample = failures("protocol_version");
    let before = gw.metric(&sample).await;
    let mut ext = legacy_extensions();
    ext.push(signature_algorithms());
    let hello = client_hello(0x0302, &[0xc013, 0x002f, 0x0035], &ext);
    let alert = assert_alert_or_close(&send_hello(&gw, &hello).await);
    assert_eq!(alert, Some(70));
    assert_eq!(gw.wait_metric(&sample, before + 1.0).await, before + 1.0, "{}", tls_lines(&gw).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_tls_1_2_hello_with_only_cbc_suites_is_refused() {
    let (gw, _idp, _up) = start("", "").await;
    let sample = failures("no_shared_cipher_suite");
    let before = gw.metric(&sample).await;
    let mut ext = legacy_extensions();
    ext.push(signature_algorithms());
    // ECDHE-ECDSA/RSA AES-CBC-SHA and plain RSA AES-CBC: not in Mozilla intermediate.
    let hello = client_hello(0x0303, &[0xc009, 0xc013, 0xc00a, 0xc014, 0x002f, 0x0035], &ext);
    assert!(assert_alert_or_close(&send_hello(&gw, &hello).await).is_some(), "an alert is sent");
    assert_eq!(gw.wait_metric(&sample, before + 1.0).await, before + 1.0, "{}", tls_lines(&gw).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_suite_outside_the_allowlist_fails_the_handshake() {
    let (gw, _idp, _up) = start("", "cipher_suites = [\"TLS13_AES_256_GCM_SHA384\"]").await;
    let sample = failures("no_shared_cipher_suite");
    let before = gw.metric(&sample).await;
    let chacha = tls_client_config(&gw.pki, &[&TLS13], &["TLS13_CHACHA20_POLY1305_SHA256"]);
    assert!(tls_connect(gw.addr(), chacha).await.is_err(), "CHACHA20 is not on the list");
    assert_eq!(gw.wait_metric(&sample, before + 1.0).await, before + 1.0, "{}", tls_lines(&gw).await);

    // No TLS 1.2 suite is on the list, so TLS 1.2 is off altogether (counted as either reason).
    let total_before = total_failures(&gw).await;
    let tls12 = tls_client_config(&gw.pki, &[&TLS12], &["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]);
    assert!(tls_connect(gw.addr(), tls12).await.is_err(), "no TLS 1.2 suite is allowed");
    let counted = async {
        for _ in 0..150 {
            let (a, b) = (gw.metric(&sample).await, gw.metric(&failures("protocol_version")).await);
            if a + b > total_before {
                return a + b;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        total_before
    };
    assert_eq!(counted.await, total_before + 1.0, "{}", tls_lines(&gw).await);

    // The one allowed suite works.
    let aes = tls_client_config(&gw.pki, &[&TLS13], &["TLS13_AES_256_GCM_SHA384"]);
    let tls = tls_connect(gw.addr(), aes).await.expect("the allowed suite is accepted");
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    assert_eq!(suite.suite().as_str(), Some("TLS13_AES_256_GCM_SHA384"));
    gw.shutdown().await;
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_client() {
    let (gw, _idp, _up) = start("", "min_version = \"1.3\"").await;
    let sample = failures("protocol_version");
    let before = gw.metric(&sample).await;
    let tls12 = tls_client_config(&gw.pki, &[&TLS12], &[]);
    assert!(tls_connect(gw.addr(), tls12).await.is_err(), "TLS 1.2 is below the floor");
    assert_eq!(gw.wait_metric(&sample, before + 1.0).await, before + 1.0, "{}", tls_lines(&gw).await);
    let tls13 = tls_client_config(&gw.pki, &[&TLS13], &[]);
    let tls = tls_connect(gw.addr(), tls13).await.expect("TLS 1.3 is accepted");
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_default_config_accepts_tls_1_2_with_an_ecdhe_aead_suite() {
    let (gw, idp, up) = start("", "").await;
    for suite in ["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"]
    {
        let cfg = tls_client_config(&gw.pki, &[&TLS12], &[suite]);
        let tls = tls_connect(gw.addr(), cfg).await.unwrap_or_else(|e| panic!("{suite}: {e}"));
        let conn = tls.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
        assert_eq!(conn.negotiated_cipher_suite().unwrap().suite().as_str(), Some(suite));

        // And HTTP works over it.
        let (mut sender, c) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(c);
        let req = http::Request::get("/orders/1")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", idp.token(json!(["DE"]))))
            .body(residency_gateway::full_body(bytes::Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let _ = resp.into_body().collect().await;
    }
    assert_eq!(up.hits(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_dropped_at_the_handshake_deadline() {
    let (gw, _idp, _up) = start("handshake_timeout_seconds = 0.3", "").await;
    let sample = failures("timeout");
    let before = gw.metric(&sample).await;
    let mut tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
    let elapsed = start.elapsed();
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the server closed the connection: {read:?}");
    assert!(elapsed >= Duration::from_millis(250), "closed before the deadline: {elapsed:?}");
    assert_eq!(gw.wait_metric(&sample, before + 1.0).await, before + 1.0, "{}", tls_lines(&gw).await);
    gw.shutdown().await;
}

/// Reads until the server closes; `Err` when it is still open after `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> Result<Vec<u8>, ()> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .map_err(|_| ())?;
    Ok(got)
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_while_others_are_served() {
    let (gw, idp, up) = start("header_read_timeout_seconds = 0.3", "").await;
    let mut slow =
        tls_connect(gw.addr(), tls_client_config(&gw.pki, rustls::DEFAULT_VERSIONS, &[])).await.unwrap();
    let start = Instant::now();
    slow.write_all(b"GET /orders/1 HT").await.unwrap();
    slow.flush().await.unwrap();

    // Meanwhile another client is served.
    let (status, _) = gw.status("/orders/2", Some(&idp.token(json!(["DE"])))).await;
    assert_eq!(status, 200);
    assert_eq!(up.hits(), 1);

    let got = closed_within(&mut slow, Duration::from_secs(2)).await;
    let elapsed = start.elapsed();
    let got = got.unwrap_or_else(|_| panic!("the half-sent request was still open after {elapsed:?}"));
    assert!(elapsed >= Duration::from_millis(250), "closed before the deadline: {elapsed:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "unexpected answer: {text}");
    assert_eq!(up.hits(), 1, "the partial request never reached the upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_completes_tls_and_sends_nothing_is_cut_off() {
    let (gw, idp, _up) = start("header_read_timeout_seconds = 0.3", "").await;
    let mut idle =
        tls_connect(gw.addr(), tls_client_config(&gw.pki, rustls::DEFAULT_VERSIONS, &[])).await.unwrap();
    let start = Instant::now();
    let (status, _) = gw.status("/orders/2", Some(&idp.token(json!(["DE"])))).await;
    assert_eq!(status, 200);
    let got = closed_within(&mut idle, Duration::from_secs(2)).await;
    assert!(
        got.is_ok(),
        "a TLS connection that never sends a request head is still open after {:?} \
         (header_read_timeout_seconds = 0.3)",
        start.elapsed()
    );
    gw.shutdown().await;
}
