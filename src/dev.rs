//! `residency-gateway dev`: an embedded issuer (generated ES256 key, JWKS on loopback), two echo upstreams
//! declared `DE` and `US-CA`, a generated certificate and the gateway in front, all on 127.0.0.1. Prints
//! curl commands with minted tokens; `--smoke` runs them and fails on any unexpected decision.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::server::{self, Handle};
use crate::token::now_secs;

/// The policies shipped in `policies/`, embedded so `dev` runs from any directory.
pub const EMBEDDED_POLICIES: &[(&str, &str)] = &[
    ("eu.toml", include_str!("../policies/eu.toml")),
    ("adequacy.toml", include_str!("../policies/adequacy.toml")),
    ("us.toml", include_str!("../policies/us.toml")),
    ("br.toml", include_str!("../policies/br.toml")),
    ("cloud-regions.toml", include_str!("../policies/cloud-regions.toml")),
];

/// A throwaway certificate authority and the certificates it signs.
pub struct Pki {
    pub ca_pem: String,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

/// A certificate chain and its key, both PEM.
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Result<Pki, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_pem = params.self_signed(&ca_key)?.pem();
        Ok(Pki { ca_pem, ca_params: params, ca_key })
    }

    /// A server (or client) certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Result<CertPair, rcgen::Error> {
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A token signer with a generated key and its public JWK.
pub struct Signer {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    pub jwk: Value,
}

impl Signer {
    pub fn es256(kid: &str) -> Result<Signer, String> {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).map_err(|e| e.to_string())?;
        Signer::from_key(kid, Algorithm::ES256, key)
    }

    pub fn from_key(kid: &str, alg: Algorithm, key: EncodingKey) -> Result<Signer, String> {
        let mut jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        jwk["kid"] = kid.into();
        jwk["use"] = "sig".into();
        Ok(Signer { kid: kid.to_string(), alg, key, jwk })
    }

    pub fn mint(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        self.sign(&header, claims)
    }

    /// Signs `claims` under a header of the caller's making (a DPoP proof carries its `jwk` and `typ`).
    pub fn sign(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.key).expect("signing with a generated key works")
    }

    /// Signs `claims` under a header given as raw JSON, members jsonwebtoken's `Header` would not hold
    /// included (a test's malformed DPoP key, say).
    pub fn sign_raw(&self, header: &Value, claims: &Value) -> String {
        let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let message = format!("{}.{}", b64(header), b64(claims));
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &self.key, self.alg)
            .expect("signing with a generated key works");
        format!("{message}.{signature}")
    }
}

/// Serves `handler` over plain HTTP/1.1 on 127.0.0.1:0 until the process ends.
pub async fn serve_http<F, Fut>(handler: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<crate::Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let h = handler.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Ok(addr)
}

fn json_response(status: StatusCode, v: &Value) -> Response<crate::Body> {
    let mut r = Response::new(crate::full_body(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// An upstream that answers with what it received, naming itself.
async fn echo_upstream(label: &'static str) -> std::io::Result<SocketAddr> {
    serve_http(move |req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let size = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        json_response(
            StatusCode::OK,
            &json!({"upstream": label, "method": parts.method.as_str(), "path": parts.uri.path(), "body_bytes": size}),
        )
    })
    .await
}

/// Everything `dev` started.
pub struct DevEnv {
    pub gateway: Handle,
    pub dir: tempfile::TempDir,
    pub ca_file: std::path::PathBuf,
    pub base: String,
    pub metrics_url: String,
    pub tokens: DevTokens,
}

pub struct DevTokens {
    pub eu: String,
    pub us: String,
    pub no_claim: String,
}

async fn bind_or_any(preferred: &str) -> String {
    match TcpListener::bind(preferred).await {
        Ok(l) => {
            drop(l);
            preferred.to_string()
        }
        Err(_) => "127.0.0.1:0".to_string(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    std::fs::write(dir.join(name), text).map_err(|e| format!("cannot write {name}: {e}"))
}

pub async fn start() -> Result<DevEnv, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).map_err(|e| e.to_string())?;
    for (name, text) in EMBEDDED_POLICIES {
        write(&p.join("policies"), name, text)?;
    }
    let pki = Pki::new("residency-gateway dev CA").map_err(|e| e.to_string())?;
    let leaf = pki.issue(&["localhost", "127.0.0.1"]).map_err(|e| e.to_string())?;
    write(p, "ca.pem", &pki.ca_pem)?;
    write(p, "gateway.crt", &format!("{}{}", leaf.cert_pem, pki.ca_pem))?;
    write(p, "gateway.key", &leaf.key_pem)?;

    let signer = Signer::es256("dev-key-1")?;
    let jwks = json!({"keys": [signer.jwk.clone()]});
    let idp = serve_http(move |_req: Request<Incoming>| {
        let jwks = jwks.clone();
        async move { json_response(StatusCode::OK, &jwks) }
    })
    .await
    .map_err(|e| e.to_string())?;
    let eu = echo_upstream("orders-de").await.map_err(|e| e.to_string())?;
    let us = echo_upstream("orders-us-ca").await.map_err(|e| e.to_string())?;
    let issuer = format!("http://{idp}/");

    let listen = bind_or_any("127.0.0.1:8443").await;
    let admin = bind_or_any("127.0.0.1:9090").await;
    let config = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"
[server.tls]
cert = "gateway.crt"
key = "gateway.key"
[policy]
dir = "policies"
[[issuers]]
name = "dev-idp"
issuer = "{issuer}"
audiences = ["dev-api"]
jwks_uri = "http://{idp}/jwks.json"
algorithms = ["ES256"]
max_token_lifetime_seconds = 3600
[state]
path = "state.json"
[[routes]]
name = "orders-de"
path_prefix = "/eu"
upstream = "http://{eu}"
jurisdiction = "aws:eu-central-1"
issuers = ["dev-idp"]
[[routes]]
name = "orders-us-ca"
path_prefix = "/us"
upstream = "http://{us}"
jurisdiction = "US-CA"
issuers = ["dev-idp"]
"#
    );
    write(p, "gateway.toml", &config)?;
    let cfg = Config::load(&p.join("gateway.toml")).map_err(|e| e.to_string())?;
    let gateway = server::start(cfg, Some(p.join("gateway.toml"))).await?;

    let now = now_secs();
    let mint = |sub: &str, regions: Option<Value>| {
        let mut claims = json!({"iss": issuer, "aud": "dev-api", "sub": sub, "client_id": "dev-client",
            "iat": now, "exp": now + 3600, "jti": format!("{sub}-{now}")});
        if let Some(r) = regions {
            claims["allowed_regions"] = r;
        }
        signer.mint(&claims)
    };
    let tokens = DevTokens {
        eu: mint("eu-user", Some(json!(["EEA"]))),
        us: mint("us-user", Some(json!("US"))),
        no_claim: mint("no-claim-user", None),
    };
    let base = format!("https://localhost:{}", gateway.addr.port());
    let metrics_url = gateway.admin_addr.map(|a| format!("http://{a}/metrics")).unwrap_or_default();
    Ok(DevEnv { ca_file: p.join("ca.pem"), gateway, dir, base, metrics_url, tokens })
}

/// The requests `dev` shows, with the decision each must get.
struct Case {
    what: &'static str,
    path: &'static str,
    token: Option<String>,
    status: u16,
    reason: &'static str,
}

fn cases(env: &DevEnv) -> Vec<Case> {
    let t = &env.tokens;
    vec![
        Case {
            what: "EEA token to the DE upstream: forwarded",
            path: "/eu/orders",
            token: Some(t.eu.clone()),
            status: 200,
            reason: "",
        },
        Case {
            what: "EEA token to the US-CA upstream: blocked",
            path: "/us/orders",
            token: Some(t.eu.clone()),
            status: 403,
            reason: "region_not_allowed",
        },
        Case {
            what: "US token to the US-CA upstream: forwarded",
            path: "/us/orders",
            token: Some(t.us.clone()),
            status: 200,
            reason: "",
        },
        Case {
            what: "US token to the DE upstream: blocked",
            path: "/eu/orders",
            token: Some(t.us.clone()),
            status: 403,
            reason: "region_not_allowed",
        },
        Case {
            what: "token without a regions claim: blocked",
            path: "/eu/orders",
            token: Some(t.no_claim.clone()),
            status: 403,
            reason: "no_residency_claim",
        },
        Case {
            what: "no token: unauthorized",
            path: "/eu/orders",
            token: None,
            status: 401,
            reason: "missing_token",
        },
    ]
}

pub async fn run(smoke: bool) -> Result<bool, String> {
    let env = start().await?;
    let ca = env.ca_file.display();
    println!("residency-gateway dev is running on {} (files in {})\n", env.base, env.dir.path().display());
    for c in cases(&env) {
        let auth = c.token.as_ref().map(|t| format!(" -H 'Authorization: Bearer {t}'")).unwrap_or_default();
        println!("# {} (expect {})\ncurl --cacert {ca} {}{}{auth}\n", c.what, c.status, env.base, c.path);
    }
    println!("# a token in the URL is refused before anything else (expect 400)");
    println!("curl --cacert {ca} '{}/eu/orders?access_token=x'\n", env.base);
    println!("# metrics\ncurl {}\n", env.metrics_url);
    if !smoke {
        println!("Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
        env.gateway.shutdown().await;
        return Ok(true);
    }
    let ok = smoke_run(&env).await?;
    env.gateway.shutdown().await;
    Ok(ok)
}

async fn smoke_run(env: &DevEnv) -> Result<bool, String> {
    let tls =
        rustls::ClientConfig::builder_with_provider(rustls::crypto::aws_lc_rs::default_provider().into())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(crate::tls::load_roots(&env.ca_file)?)
            .with_no_client_auth();
    let client = reqwest::Client::builder().use_preconfigured_tls(tls).build().map_err(|e| e.to_string())?;
    let mut all_ok = true;
    let mut check = |what: &str, ok: bool, got: String| {
        println!(
            "{} {what}{}",
            if ok { "PASS" } else { "FAIL" },
            if ok { String::new() } else { format!(": {got}") }
        );
        all_ok &= ok;
    };
    for c in cases(env) {
        let mut req = client.get(format!("{}{}", env.base, c.path));
        if let Some(t) = &c.token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let reason = body.get("reason").and_then(Value::as_str).unwrap_or("");
                check(c.what, status == c.status && reason == c.reason, format!("{status} {reason}"));
            }
            Err(e) => check(c.what, false, e.to_string()),
        }
    }
    match client.get(format!("{}/eu/orders?access_token=x", env.base)).send().await {
        Ok(r) => check("token in the URL: refused", r.status() == 400, r.status().to_string()),
        Err(e) => check("token in the URL: refused", false, e.to_string()),
    }
    let metrics = client
        .get(&env.metrics_url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .unwrap_or_default();
    let blocked = metrics.contains(
        "residency_gateway_transfers_blocked_total{data_class=\"personal\",jurisdiction=\"US-CA\",reason=\"region_not_allowed\",route=\"orders-us-ca\"} 1",
    );
    check("metrics count the blocked transfer", blocked, "counter missing".into());
    Ok(all_ok)
}
