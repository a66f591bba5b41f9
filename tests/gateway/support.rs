//! In-process fakes on 127.0.0.1:0 for the integration tests: an upstream, an authorization server
//! (JWKS, discovery, introspection) with hit counters and switchable failures, and a gateway launcher
//! that writes a real config with a real certificate and talks to it over real TLS.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use jsonwebtoken::{Algorithm, EncodingKey};
use residency_gateway::config::Config;
use residency_gateway::dev::{EMBEDDED_POLICIES, Pki, Signer, serve_http};
use residency_gateway::server::{self, Handle};
use residency_gateway::token::now_secs;
use residency_gateway::{Body, full_body};
use serde_json::{Value, json};

pub fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(full_body(Bytes::from(v.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

// ---------------------------------------------------------------------------------------------------------
// Upstream

/// What the upstream saw of the last request.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 upstream. `/slow?ms=N` waits before answering; `/big?bytes=N` streams N bytes;
/// `/hop` answers with hop-by-hop headers; everything else echoes what it saw as JSON.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub last: Arc<Mutex<Option<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let hits = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None));
        let (h, l) = (hits.clone(), last.clone());
        let addr = serve_http(move |req: Request<Incoming>| {
            let (hits, last) = (h.clone(), l.clone());
            async move { upstream_handle(req, hits, last).await }
        })
        .await
        .unwrap();
        Upstream { addr, hits, last }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Seen {
        self.last.lock().unwrap().clone().expect("the upstream saw a request")
    }
}

fn query_num(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(&format!("{key}="))?.parse().ok()))
        .unwrap_or(0)
}

async fn upstream_handle(
    req: Request<Incoming>,
    hits: Arc<AtomicUsize>,
    last: Arc<Mutex<Option<Seen>>>,
) -> Response<Body> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_millis(query_num(&req, "ms"))).await;
    }
    if path.starts_with("/big") {
        let total = query_num(&req, "bytes") as usize;
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = (0..total.div_ceil(chunk.len())).map(move |i| {
            let n = (total - i * chunk.len()).min(chunk.len());
            Ok::<_, Infallible>(Frame::data(chunk.slice(..n)))
        });
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        return Response::new(body.map_err(|e: Infallible| match e {}).boxed_unsync());
    }
    let (parts, body) = req.into_parts();
    let mut body_len = 0;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => break,
        }
    }
    let seen = Seen {
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body_len,
    };
    *last.lock().unwrap() = Some(seen.clone());
    let mut resp = json_response(200, &json!({"path": seen.path_and_query, "body_len": body_len}));
    if path.starts_with("/hop") {
        let h = resp.headers_mut();
        h.insert("connection", "x-upstream-secret".parse().unwrap());
        h.insert("x-upstream-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-upstream-kept", "1".parse().unwrap());
    }
    resp
}

// ---------------------------------------------------------------------------------------------------------
// Authorization server

/// A fake authorization server: `/jwks.json`, `/.well-known/openid-configuration`, `/introspect`.
#[derive(Clone)]
pub struct Idp {
    pub addr: SocketAddr,
    pub state: Arc<IdpState>,
}

pub struct IdpState {
    pub rsa: Signer,
    pub ec: Signer,
    /// Extra keys served in the JWKS (raw JSON), for rotation and skipped-key tests.
    pub extra_keys: Mutex<Vec<Value>>,
    /// When false, the JWKS leaves the RSA key out (a removed key).
    pub serve_rsa: std::sync::atomic::AtomicBool,
    pub jwks_status: AtomicU16,
    pub jwks_hits: AtomicUsize,
    pub introspect_hits: AtomicUsize,
    pub discovery_hits: AtomicUsize,
    /// 0 = answer normally; otherwise answer introspection with this HTTP status.
    pub introspect_status: AtomicU16,
    /// Delay before answering introspection, in ms.
    pub introspect_delay_ms: AtomicU64,
    /// Token -> introspection response. Unknown tokens are `{"active": false}`.
    pub introspect: Mutex<HashMap<String, Value>>,
    /// A raw body to answer introspection with instead of JSON.
    pub introspect_raw: Mutex<Option<String>>,
    /// The last Authorization header and form seen at `/introspect`.
    pub introspect_auth: Mutex<Option<String>>,
    pub introspect_form: Mutex<Option<String>>,
    pub jwks_cache_control: Mutex<Option<String>>,
}

pub fn rsa_signer(kid: &str) -> Signer {
    // The binary's jsonwebtoken provider, installed before this process signs its first token.
    residency_gateway::token::crypto::install();
    let pair = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let key = EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap();
    Signer::from_key(kid, Algorithm::RS256, key).unwrap()
}

impl Idp {
    pub async fn start() -> Idp {
        residency_gateway::token::crypto::install();
        let state = Arc::new(IdpState {
            rsa: rsa_signer("rsa-1"),
            ec: Signer::es256("ec-1").unwrap(),
            extra_keys: Mutex::new(Vec::new()),
            serve_rsa: true.into(),
            jwks_status: AtomicU16::new(200),
            jwks_hits: AtomicUsize::new(0),
            introspect_hits: AtomicUsize::new(0),
            discovery_hits: AtomicUsize::new(0),
            introspect_status: AtomicU16::new(0),
            introspect_delay_ms: AtomicU64::new(0),
            introspect: Mutex::new(HashMap::new()),
            introspect_raw: Mutex::new(None),
            introspect_auth: Mutex::new(None),
            introspect_form: Mutex::new(None),
            jwks_cache_control: Mutex::new(None),
        });
        let addr_cell: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
        let (s, a) = (state.clone(), addr_cell.clone());
        let addr = serve_http(move |req: Request<Incoming>| {
            let (state, addr) = (s.clone(), a.clone());
            async move { idp_handle(req, &state, *addr.get().unwrap()).await }
        })
        .await
        .unwrap();
        addr_cell.set(addr).unwrap();
        Idp { addr, state }
    }

    pub fn issuer(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn jwks_uri(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    pub fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    pub fn introspect_hits(&self) -> usize {
        self.state.introspect_hits.load(Ordering::SeqCst)
    }

    /// Standard valid claims for this issuer, audience `api`, lifetime 10 minutes.
    pub fn claims(&self, regions: Value) -> Value {
        let now = now_secs();
        let mut c = json!({"iss": self.issuer(), "aud": "api", "sub": "alice", "client_id": "app-1",
            "iat": now, "exp": now + 600, "jti": format!("jti-{}", NEXT.fetch_add(1, Ordering::SeqCst))});
        if !regions.is_null() {
            c["allowed_regions"] = regions;
        }
        c
    }

    pub fn rs256(&self, claims: &Value) -> String {
        self.state.rsa.mint(claims)
    }

    pub fn es256(&self, claims: &Value) -> String {
        self.state.ec.mint(claims)
    }

    /// A valid RS256 token allowed in `regions`.
    pub fn token(&self, regions: Value) -> String {
        self.rs256(&self.claims(regions))
    }

    /// Registers an opaque token with its introspection response.
    pub fn opaque(&self, token: &str, response: Value) {
        self.state.introspect.lock().unwrap().insert(token.to_string(), response);
    }
}

static NEXT: AtomicU64 = AtomicU64::new(1);

async fn idp_handle(req: Request<Incoming>, s: &IdpState, addr: SocketAddr) -> Response<Body> {
    match req.uri().path() {
        "/jwks.json" => {
            s.jwks_hits.fetch_add(1, Ordering::SeqCst);
            let status = s.jwks_status.load(Ordering::SeqCst);
            if status != 200 {
                return json_response(status, &json!({"error": "down"}));
            }
            let mut keys = vec![s.ec.jwk.clone()];
            if s.serve_rsa.load(Ordering::SeqCst) {
                keys.push(s.rsa.jwk.clone());
            }
            keys.extend(s.extra_keys.lock().unwrap().iter().cloned());
            let mut resp = json_response(200, &json!({ "keys": keys }));
            if let Some(cc) = s.jwks_cache_control.lock().unwrap().clone() {
                resp.headers_mut().insert("cache-control", cc.parse().unwrap());
            }
            resp
        }
        "/.well-known/openid-configuration" => {
            s.discovery_hits.fetch_add(1, Ordering::SeqCst);
            json_response(
                200,
                &json!({"issuer": format!("http://{addr}/"), "jwks_uri": format!("http://{addr}/jwks.json"),
                    "introspection_endpoint": format!("http://{addr}/introspect")}),
            )
        }
        "/introspect" => {
            s.introspect_hits.fetch_add(1, Ordering::SeqCst);
            let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
            *s.introspect_auth.lock().unwrap() = auth;
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let form = String::from_utf8_lossy(&body).into_owned();
            *s.introspect_form.lock().unwrap() = Some(form.clone());
            let delay = s.introspect_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let status = s.introspect_status.load(Ordering::SeqCst);
            if status != 0 {
                return json_response(status, &json!({"error": "server_error"}));
            }
            if let Some(raw) = s.introspect_raw.lock().unwrap().clone() {
                let mut r = Response::new(full_body(Bytes::from(raw)));
                r.headers_mut().insert("content-type", "application/json".parse().unwrap());
                return r;
            }
            let token = form_urlencoded::parse(form.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let answer =
                s.introspect.lock().unwrap().get(&token).cloned().unwrap_or(json!({"active": false}));
            json_response(200, &answer)
        }
        _ => json_response(404, &json!({})),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Gateway

/// A running gateway with its files, and a client that trusts its certificate.
pub struct Gw {
    pub handle: Option<Handle>,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    pub base: String,
    pub admin: String,
    pub pki: Arc<Pki>,
}

/// The `[server]` part every test config starts with; `body` is the rest of the file.
pub fn config_text(body: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[server.tls]\ncert = \"gateway.crt\"\nkey = \"gateway.key\"\n\n{body}"
    )
}

/// Writes the certificate, key and shipped policies into a fresh directory.
pub fn prepare_dir(pki: &Pki) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let leaf = pki.issue(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.path().join("gateway.crt"), format!("{}{}", leaf.cert_pem, pki.ca_pem)).unwrap();
    std::fs::write(dir.path().join("gateway.key"), leaf.key_pem).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    for (name, text) in EMBEDDED_POLICIES {
        std::fs::write(dir.path().join("policies").join(name), text).unwrap();
    }
    dir
}

pub fn client_for(pki: &Pki) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls =
        rustls::ClientConfig::builder_with_provider(rustls::crypto::aws_lc_rs::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(20)).build().unwrap()
}

use rustls_pki_types::pem::PemObject;

impl Gw {
    /// Starts a gateway whose config is `[server]` (loopback, generated certificate) plus `body`.
    pub async fn start(body: &str) -> Gw {
        Gw::try_start(body).await.unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    pub async fn try_start(body: &str) -> Result<Gw, String> {
        Gw::launch(None, &config_text(body), &[]).await
    }

    /// The one way every helper starts a gateway: in `dir` (a fresh one from [`prepare_dir`] when `None`),
    /// with `files` written next to the config, then `text` as `gateway.toml`.
    pub async fn launch(
        dir: Option<(tempfile::TempDir, Arc<Pki>)>,
        text: &str,
        files: &[(&str, &str)],
    ) -> Result<Gw, String> {
        init_audit_capture();
        ensure_default_crypto_provider();
        let (dir, pki) = dir.unwrap_or_else(|| {
            let pki = Arc::new(Pki::new("test CA").unwrap());
            (prepare_dir(&pki), pki)
        });
        for (name, content) in files {
            let p = dir.path().join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(p, content).unwrap();
        }
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        let handle = server::start(config, Some(path)).await?;
        let base = format!("https://localhost:{}", handle.addr.port());
        let admin = format!("http://{}", handle.admin_addr.unwrap());
        Ok(Gw { client: client_for(&pki), handle: Some(handle), dir, base, admin, pki })
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().addr
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    /// GET and return status plus the problem body's reason (empty when forwarded).
    pub async fn status(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let resp = self.get(path, token).await;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (status, body.get("reason").and_then(Value::as_str).unwrap_or("").to_string())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }

    /// The value of one sample, by its exact name and label text, e.g.
    /// `residency_gateway_requests_total{outcome="forwarded",route="r"}`. Missing is 0.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// The `token_validations_total` sample of one issuer, method and result.
pub fn validations(issuer: &str, method: &str, result: &str) -> String {
    format!(
        r#"residency_gateway_token_validations_total{{issuer="{issuer}",method="{method}",result="{result}"}}"#
    )
}

/// The validation cache's `hit` or `miss` sample.
pub fn cache(result: &str) -> String {
    format!(r#"residency_gateway_token_cache_requests_total{{cache="validation",result="{result}"}}"#)
}

// ---------------------------------------------------------------------------------------------------------
// Audit capture

static AUDIT: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct Capture(Arc<Mutex<Vec<u8>>>);

impl residency_gateway::audit::LineSink for Capture {
    fn line(&self, line: Vec<u8>) {
        self.0.lock().unwrap().extend_from_slice(&line);
    }
}

/// Installs (once per test binary) the binary's audit layer, writing into memory instead of the batched
/// stdout writer.
pub fn init_audit_capture() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, filter::Targets};
    AUDIT.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let layer = residency_gateway::audit::AuditLayer::new(Capture(buf.clone()))
            .with_filter(Targets::new().with_target("audit", tracing::Level::INFO));
        let _ = tracing_subscriber::registry().with(layer).try_init();
        buf
    });
}

/// Every audit line captured so far in this test binary, parsed.
pub fn audit_lines() -> Vec<Value> {
    let buf = AUDIT.get().expect("audit capture installed").lock().unwrap().clone();
    String::from_utf8(buf).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The raw captured audit text.
pub fn audit_text() -> String {
    String::from_utf8(AUDIT.get().expect("audit capture installed").lock().unwrap().clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------------------
// Gateways with extra files (secrets, key sets) next to their config

impl Gw {
    /// Like [`Gw::start`], but first writes `files` (name relative to the gateway's directory, content)
    /// next to the config, so the config can name them (`client_secret_file = "secret.txt"`).
    pub async fn start_with_files(body: &str, files: &[(&str, &str)]) -> Gw {
        Gw::try_start_with_files(body, files).await.unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    pub async fn try_start_with_files(body: &str, files: &[(&str, &str)]) -> Result<Gw, String> {
        Gw::launch(None, &config_text(body), files).await
    }

    /// The HTTP status of `GET /readyz` on the admin listener.
    pub async fn readyz(&self) -> u16 {
        ensure_default_crypto_provider();
        reqwest::get(format!("{}/readyz", self.admin)).await.unwrap().status().as_u16()
    }
}

/// `reqwest::get` (used by [`Gw::metrics`]) builds a client from the process-wide rustls provider and
/// panics with "No provider set" when there is none; this installs aws-lc-rs once per test binary.
pub fn ensure_default_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

// ---------------------------------------------------------------------------------------------------------
// Raw clients: HTTP/2 over ALPN, hand-built rustls configs, hyper over TLS for requests reqwest would
// rewrite (dot segments, streamed bodies), and metric polling.

/// The test CA as a rustls root store.
pub fn root_store(pki: &Pki) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// Like [`client_for`], but offering ALPN `h2` and `http/1.1`, so HTTP/2 is negotiated.
pub fn client_h2(pki: &Pki) -> reqwest::Client {
    let mut tls =
        rustls::ClientConfig::builder_with_provider(rustls::crypto::aws_lc_rs::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(root_store(pki))
            .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(20)).build().unwrap()
}

/// A rustls client config trusting the test CA, limited to `versions` and the suites named in
/// `suites` (rustls names such as `TLS13_AES_128_GCM_SHA256`; empty = the provider's defaults).
pub fn tls_client_config(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: &[&str],
) -> rustls::ClientConfig {
    let base = rustls::crypto::aws_lc_rs::default_provider();
    let cipher_suites = if suites.is_empty() {
        base.cipher_suites.clone()
    } else {
        suites
            .iter()
            .map(|name| {
                *rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
                    .iter()
                    .find(|s| s.suite().as_str() == Some(*name))
                    .unwrap_or_else(|| panic!("unknown suite {name}"))
            })
            .collect()
    };
    let provider = rustls::crypto::CryptoProvider { cipher_suites, ..base };
    rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(root_store(pki))
        .with_no_client_auth()
}

/// A TLS connection to the gateway with `config` (SNI `localhost`), bounded by 5 s.
pub async fn tls_connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        connector.connect(name, tcp).await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS connect timed out"))?
}

impl Gw {
    /// Sends `req` as-is over a fresh HTTP/1.1 connection (hyper, no URL normalisation, the body
    /// streamed as given). The URI is origin-form (`/path?q`); `Host` is set when missing.
    pub async fn raw_request(&self, mut req: Request<Body>) -> Response<Incoming> {
        let tls = tls_connect(self.addr(), tls_client_config(&self.pki, rustls::DEFAULT_VERSIONS, &[]))
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        if !req.headers().contains_key("host") {
            let host = format!("localhost:{}", self.addr().port());
            req.headers_mut().insert("host", host.parse().unwrap());
        }
        tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
            .await
            .expect("the gateway answered within 30 s")
            .unwrap()
    }

    /// Polls `sample` every 20 ms until it reaches `want` or 3 s pass; returns the last value.
    pub async fn wait_metric(&self, sample: &str, want: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let v = self.metric(sample).await;
            if v >= want || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Installs aws-lc-rs as the process-wide rustls provider (same as [`ensure_default_crypto_provider`]):
/// [`Gw::metrics`] uses `reqwest::get`, which panics with "No provider set" without one.
pub fn install_crypto_provider() {
    ensure_default_crypto_provider();
}

/// A whole config file like [`config_text`], with `server_extra` lines in `[server]` and `tls_extra`
/// lines in `[server.tls]` (`config_text` leaves no room for either).
pub fn config_text_with(server_extra: &str, tls_extra: &str, body: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_extra}\n\n[server.tls]\ncert = \"gateway.crt\"\nkey = \"gateway.key\"\n{tls_extra}\n\n{body}"
    )
}

impl Gw {
    /// Starts a gateway from a whole config file (see [`config_text_with`]); the directory holds
    /// `gateway.crt`, `gateway.key`, `ca.pem` and `policies/` as for [`Gw::start`].
    pub async fn start_full(text: &str) -> Gw {
        Gw::launch(None, text, &[]).await.unwrap_or_else(|e| panic!("bad test config: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Gateways restarted on the same directory (state files survive a restart), config rewrites, and admin
// API calls.

impl Gw {
    /// Shuts the gateway down and hands back its directory and CA, so another gateway can start on the
    /// same files with [`Gw::start_in`].
    pub async fn stop_keep_dir(mut self) -> (tempfile::TempDir, Arc<Pki>) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
        let Gw { dir, pki, .. } = self;
        (dir, pki)
    }

    /// Starts a gateway on an existing directory (one [`prepare_dir`] made for `pki`, typically handed
    /// back by [`Gw::stop_keep_dir`]): (re)writes `gateway.toml` as [`config_text`]`(body)`; every other
    /// file in the directory (state files, secrets) is kept.
    pub async fn start_in(dir: tempfile::TempDir, pki: Arc<Pki>, body: &str) -> Gw {
        Gw::try_start_in(dir, pki, body).await.unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    /// Like [`Gw::start_in`], returning the start error (config or `server::start`) as text.
    pub async fn try_start_in(dir: tempfile::TempDir, pki: Arc<Pki>, body: &str) -> Result<Gw, String> {
        Gw::launch(Some((dir, pki)), &config_text(body), &[]).await
    }

    /// Rewrites this gateway's `gateway.toml` as [`config_text`]`(body)` (for reload tests).
    pub fn rewrite_config(&self, body: &str) {
        std::fs::write(self.dir.path().join("gateway.toml"), config_text(body)).unwrap();
    }

    /// One call to the admin listener: `method` on `path` with an optional bearer `token` and an optional
    /// raw JSON `body`. Returns the status and the body parsed as JSON (Null when it is not JSON).
    pub async fn admin_call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        ensure_default_crypto_provider();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = reqwest::Client::new().request(method, format!("{}{path}", self.admin));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), req.send())
            .await
            .expect("the admin listener answered within 10 s")
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Config tables

/// A `[[issuers]]` table for a JWT issuer: `idp`'s `iss`, audience `api`, its JWKS; `extra` lines go in
/// the table.
pub fn jwt_issuer_toml(name: &str, idp: &Idp, extra: &str) -> String {
    format!(
        "[[issuers]]\nname = \"{name}\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n{extra}\n\n",
        idp.issuer(),
        idp.jwks_uri()
    )
}

/// A `[[routes]]` table; `extra` lines go in the table.
pub fn route_toml(
    name: &str,
    prefix: &str,
    upstream: &str,
    jurisdiction: &str,
    issuers: &[&str],
    extra: &str,
) -> String {
    let issuers = issuers.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n\
         jurisdiction = \"{jurisdiction}\"\nissuers = [{issuers}]\n{extra}\n\n"
    )
}
