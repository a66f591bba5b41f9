//! Sender-constrained tokens and cross-border transport: certificate-bound tokens over mutual TLS
//! (RFC 8705), DPoP proofs (RFC 9449), and TLS (with client certificates) to upstreams abroad.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, Header};
use residency_gateway::config::Config;
use residency_gateway::dev::{CertPair, Pki, Signer};
use residency_gateway::token::now_secs;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use crate::support::{self, Gw, Idp, Upstream, config_text_with, root_store};

fn issuer(idp: &Idp) -> String {
    format!(
        "[[issuers]]\nname = \"corp\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n\n",
        idp.issuer(),
        idp.jwks_uri()
    )
}

fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n\
         jurisdiction = \"DE\"\nissuers = [\"corp\"]\n{extra}\n\n"
    )
}

/// base64url(SHA-256(DER)) of the first certificate in `pem`: the `x5t#S256` that binds a token to it.
fn x5t(pem: &str) -> String {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next().unwrap().unwrap();
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, der.as_ref()))
}

/// A client that trusts the gateway's CA and, when given, presents `identity`.
fn client(gw: &Gw, identity: Option<&CertPair>) -> reqwest::Client {
    let builder =
        rustls::ClientConfig::builder_with_provider(rustls::crypto::aws_lc_rs::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(root_store(&gw.pki));
    let tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let certs: Vec<_> =
                CertificateDer::pem_slice_iter(id.cert_pem.as_bytes()).map(Result::unwrap).collect();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(10)).build().unwrap()
}

async fn call(
    client: &reqwest::Client,
    url: String,
    auth: &str,
    proof: Option<&str>,
) -> (u16, String, String) {
    let mut req = client.get(url).header("authorization", auth);
    if let Some(p) = proof {
        req = req.header("dpop", p);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let challenge =
        resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body["reason"].as_str().unwrap_or("").to_string(), challenge)
}

struct Mtls {
    gw: Gw,
    idp: Idp,
    up: Upstream,
    alice: CertPair,
    mallory: CertPair,
}

async fn mtls(client_auth: &str) -> Mtls {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let clients = Pki::new("client CA").unwrap();
    let (alice, mallory) = (clients.issue(&["alice"]).unwrap(), clients.issue(&["mallory"]).unwrap());
    let body = format!(
        "{}{}{}",
        issuer(&idp),
        route("orders", "/orders", &up.url(), ""),
        route("strict", "/strict", &up.url(), "require_bound_tokens = true")
    );
    let text =
        config_text_with("", &format!("client_ca = \"clients.pem\"\nclient_auth = \"{client_auth}\""), &body);
    let gw = Gw::launch(None, &text, &[("clients.pem", &clients.ca_pem)]).await.unwrap();
    Mtls { gw, idp, up, alice, mallory }
}

#[tokio::test]
async fn a_certificate_bound_token_needs_its_certificate() {
    let m = mtls("optional").await;
    let mut claims = m.idp.claims(json!(["EU"]));
    claims["cnf"] = json!({ "x5t#S256": x5t(&m.alice.cert_pem) });
    let token = m.idp.rs256(&claims);
    let auth = format!("Bearer {token}");
    let url = format!("{}/orders/1", m.gw.base);

    let (status, reason, _) = call(&client(&m.gw, Some(&m.alice)), url.clone(), &auth, None).await;
    assert_eq!((status, reason.as_str()), (200, ""), "the right certificate");
    let (status, reason, challenge) = call(&client(&m.gw, Some(&m.mallory)), url.clone(), &auth, None).await;
    assert_eq!(
        (status, reason.as_str()),
        (401, "token_binding_mismatch"),
        "another certificate of the same CA"
    );
    assert!(
        challenge.contains("error=\"invalid_token\"") && challenge.contains("client certificate"),
        "{challenge}"
    );
    let (status, reason, _) = call(&client(&m.gw, None), url, &auth, None).await;
    assert_eq!((status, reason.as_str()), (401, "token_binding_mismatch"), "no certificate");
    assert_eq!(m.up.hits(), 1);
    let blocked = r#"residency_gateway_requests_total{outcome="unauthorized",route="orders"}"#;
    assert_eq!(m.gw.metric(blocked).await, 2.0);
    m.gw.shutdown().await;
}

#[tokio::test]
async fn a_route_can_refuse_unbound_tokens() {
    let m = mtls("optional").await;
    let unbound = format!("Bearer {}", m.idp.token(json!(["EU"])));
    let alice = client(&m.gw, Some(&m.alice));
    let (status, reason, _) = call(&alice, format!("{}/strict/1", m.gw.base), &unbound, None).await;
    assert_eq!((status, reason.as_str()), (401, "token_binding_mismatch"));
    let (status, _, _) = call(&alice, format!("{}/orders/1", m.gw.base), &unbound, None).await;
    assert_eq!(status, 200, "routes without the requirement take unbound tokens");
    let mut claims = m.idp.claims(json!(["EU"]));
    claims["cnf"] = json!({ "x5t#S256": x5t(&m.alice.cert_pem) });
    let bound = format!("Bearer {}", m.idp.rs256(&claims));
    let (status, _, _) = call(&alice, format!("{}/strict/1", m.gw.base), &bound, None).await;
    assert_eq!(status, 200);
    m.gw.shutdown().await;
}

#[tokio::test]
async fn required_client_certificates_are_enforced_in_the_handshake() {
    let m = mtls("required").await;
    let token = format!("Bearer {}", m.idp.token(json!(["EU"])));
    let url = format!("{}/orders/1", m.gw.base);
    assert!(client(&m.gw, None).get(&url).header("authorization", &token).send().await.is_err());
    let (status, _, _) = call(&client(&m.gw, Some(&m.alice)), url, &token, None).await;
    assert_eq!(status, 200);
    m.gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// DPoP

struct Dpop {
    gw: Gw,
    idp: Idp,
    up: Upstream,
    key: Signer,
    jwk: Jwk,
}

impl Dpop {
    async fn start() -> Dpop {
        let idp = Idp::start().await;
        let up = Upstream::start().await;
        let gw = Gw::start(&format!("{}{}", issuer(&idp), route("orders", "/orders", &up.url(), ""))).await;
        let key = Signer::es256("client-key").unwrap();
        let jwk = public_jwk(&key);
        Dpop { gw, idp, up, key, jwk }
    }

    fn htu(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.gw.addr().port())
    }

    fn token(&self) -> String {
        let mut claims = self.idp.claims(json!(["EU"]));
        claims["cnf"] = json!({ "jkt": self.jwk.thumbprint(ThumbprintHash::SHA256).unwrap() });
        self.idp.rs256(&claims)
    }

    /// Correct proof claims for `GET /orders/1` with `token`, under a fresh `jti`.
    fn claims(&self, token: &str) -> Value {
        let ath = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, token.as_bytes()));
        json!({"jti": format!("p-{}", rand_id()), "htm": "GET", "htu": self.htu("/orders/1"),
            "iat": now_secs(), "ath": ath})
    }

    /// A proof by `signer` (whose public key is `jwk`) with `overrides` merged over correct claims.
    fn proof_by(&self, signer: &Signer, jwk: &Jwk, token: &str, overrides: Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(jwk.clone());
        let mut claims = self.claims(token);
        for (k, v) in overrides.as_object().unwrap() {
            claims[k] = v.clone();
        }
        signer.sign(&header, &claims)
    }

    fn proof(&self, token: &str, overrides: Value) -> String {
        self.proof_by(&self.key, &self.jwk, token, overrides)
    }

    async fn send(&self, token: &str, proof: Option<&str>) -> (u16, String, String) {
        call(&self.gw.client, format!("{}/orders/1", self.gw.base), &format!("DPoP {token}"), proof).await
    }
}

/// `signer`'s public JWK without its `kid`, as a DPoP proof carries it.
fn public_jwk(signer: &Signer) -> Jwk {
    let mut public = signer.jwk.clone();
    public.as_object_mut().unwrap().remove("kid");
    serde_json::from_value(public).unwrap()
}

fn rand_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}-{}", now_secs(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
}

#[tokio::test]
async fn a_dpop_proof_admits_its_bound_token() {
    let d = Dpop::start().await;
    let token = d.token();
    let (status, reason, _) = d.send(&token, Some(&d.proof(&token, json!({})))).await;
    assert_eq!((status, reason.as_str()), (200, ""));
    assert_eq!(d.up.hits(), 1);
    d.gw.shutdown().await;
}

#[tokio::test]
async fn bad_dpop_proofs_are_refused_with_a_dpop_challenge() {
    let d = Dpop::start().await;
    let token = d.token();
    let stale = now_secs() - 600;
    let cases = [
        ("wrong htm", json!({"htm": "POST"})),
        ("wrong htu", json!({"htu": d.htu("/other")})),
        ("wrong htu port", json!({"htu": "https://localhost:1/orders/1"})),
        ("stale iat", json!({"iat": stale})),
        ("iat in the future", json!({"iat": now_secs() + 600})),
        ("wrong ath", json!({"ath": URL_SAFE_NO_PAD.encode([0u8; 32])})),
        ("no jti", json!({"jti": null})),
    ];
    for (what, overrides) in cases {
        let (status, reason, challenge) = d.send(&token, Some(&d.proof(&token, overrides))).await;
        assert_eq!((status, reason.as_str()), (401, "dpop_invalid"), "{what}");
        assert!(challenge.starts_with("DPoP algs=\"ES256 RS256 PS256 EdDSA\""), "{what}: {challenge}");
        assert!(challenge.contains("error=\"invalid_dpop_proof\""), "{what}: {challenge}");
    }
    let (status, reason, _) = d.send(&token, None).await;
    assert_eq!((status, reason.as_str()), (401, "dpop_invalid"), "no proof at all");
    assert_eq!(d.up.hits(), 0);
    d.gw.shutdown().await;
}

#[tokio::test]
async fn a_replayed_proof_is_refused() {
    let d = Dpop::start().await;
    let token = d.token();
    let proof = d.proof(&token, json!({}));
    assert_eq!(d.send(&token, Some(&proof)).await.0, 200);
    let (status, reason, _) = d.send(&token, Some(&proof)).await;
    assert_eq!((status, reason.as_str()), (401, "dpop_replay"));
    assert_eq!(d.send(&token, Some(&d.proof(&token, json!({})))).await.0, 200, "a fresh proof works");
    d.gw.shutdown().await;
}

#[tokio::test]
async fn a_proof_by_another_key_or_a_bearer_use_is_refused() {
    let d = Dpop::start().await;
    let token = d.token();
    let thief = Signer::es256("thief").unwrap();
    let thief_jwk = public_jwk(&thief);
    let (status, reason, _) = d.send(&token, Some(&d.proof_by(&thief, &thief_jwk, &token, json!({})))).await;
    assert_eq!(
        (status, reason.as_str()),
        (401, "token_binding_mismatch"),
        "valid proof, but not the bound key"
    );

    let (status, reason, challenge) =
        call(&d.gw.client, format!("{}/orders/1", d.gw.base), &format!("Bearer {token}"), None).await;
    assert_eq!((status, reason.as_str()), (401, "token_binding_mismatch"), "a DPoP-bound token as Bearer");
    assert!(challenge.starts_with("Bearer "), "{challenge}");

    // An unbound token with a proof is not bound to the proof's key either.
    let unbound = d.idp.token(json!(["EU"]));
    let (status, reason, _) = d.send(&unbound, Some(&d.proof(&unbound, json!({})))).await;
    assert_eq!((status, reason.as_str()), (401, "token_binding_mismatch"));
    assert_eq!(d.up.hits(), 0);
    d.gw.shutdown().await;
}

#[tokio::test]
async fn proof_keys_that_cannot_sign_are_refused_without_a_panic() {
    let d = Dpop::start().await;
    let token = d.token();
    // An EC key on a curve that is not for ECDSA, and a symmetric key: header-only checks refuse them.
    for jwk in [
        json!({"kty": "EC", "crv": "Ed25519", "x": "AAAA", "y": "AAAA"}),
        json!({"kty": "OKP", "crv": "P-256", "x": "AAAA"}),
        json!({"kty": "oct", "k": "c2VjcmV0"}),
    ] {
        let header =
            URL_SAFE_NO_PAD.encode(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}).to_string());
        let claims = URL_SAFE_NO_PAD.encode(json!({"jti": "x", "htm": "GET", "iat": now_secs()}).to_string());
        let proof = format!("{header}.{claims}.AAAA");
        let (status, reason, _) = d.send(&token, Some(&proof)).await;
        assert_eq!((status, reason.as_str()), (401, "dpop_invalid"), "{jwk}");
    }
    assert_eq!(d.send(&token, Some(&d.proof(&token, json!({})))).await.0, 200, "still serving");
    d.gw.shutdown().await;
}

#[tokio::test]
async fn a_proof_whose_jwk_holds_the_private_key_is_refused() {
    let d = Dpop::start().await;
    let token = d.token();
    let public = serde_json::to_value(&d.jwk).unwrap();
    let header = |jwk: &Value| json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
    // Control: the same raw-built proof with the public key alone is accepted.
    let ok = d.key.sign_raw(&header(&public), &d.claims(&token));
    assert_eq!(d.send(&token, Some(&ok)).await.0, 200, "the raw-built proof verifies");
    // Validly signed, but its jwk carries a private member: RFC 9449 §4.3 refuses it.
    let mut private = public.clone();
    private["d"] = json!(URL_SAFE_NO_PAD.encode([7u8; 32]));
    let proof = d.key.sign_raw(&header(&private), &d.claims(&token));
    let (status, reason, _) = d.send(&token, Some(&proof)).await;
    assert_eq!((status, reason.as_str()), (401, "dpop_invalid"));
    assert_eq!(d.up.hits(), 1, "only the control reached the upstream");
    d.gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// Cross-border transport

fn cross_border_config(extra_route: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let pki = Pki::new("test CA").unwrap();
    let dir = support::prepare_dir(&pki);
    let body = format!(
        "[[issuers]]\nname = \"corp\"\nissuer = \"https://idp.example/\"\naudiences = [\"api\"]\n\
         jwks_uri = \"https://idp.example/jwks\"\n\n[[routes]]\nname = \"us\"\npath_prefix = \"/us\"\n\
         upstream = \"http://orders.us.internal\"\njurisdiction = \"US-CA\"\nissuers = [\"corp\"]\n{extra_route}\n\n\
         [[routes]]\nname = \"de\"\npath_prefix = \"/de\"\nupstream = \"http://orders.de.internal\"\n\
         jurisdiction = \"DE\"\nissuers = [\"corp\"]\n"
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config_text_with("jurisdiction = \"aws:eu-central-1\"", "", &body)).unwrap();
    (dir, path)
}

#[test]
fn a_plaintext_upstream_abroad_is_a_config_error() {
    let (_dir, path) = cross_border_config("");
    let errors = Config::load(&path).unwrap_err().to_string();
    assert!(errors.contains("gateway.toml:"), "{errors}");
    assert!(
        errors.contains("routes[0].upstream: the upstream is in US-CA, outside the gateway's DE"),
        "{errors}"
    );
    assert!(!errors.contains("routes[1]"), "a plaintext upstream at home is fine: {errors}");

    let (_dir, path) = cross_border_config("allow_plaintext_cross_border = true");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let warning = config.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>().join("\n");
    assert!(
        warning.contains(
            "routes[0].allow_plaintext_cross_border: route `us` sends data from DE to US-CA without TLS"
        ),
        "{warning}"
    );
}

/// An https upstream that requires a client certificate from `clients` and serves `server`.
async fn mtls_upstream(server: &CertPair, clients: &Pki) -> std::net::SocketAddr {
    let certs: Vec<_> =
        CertificateDer::pem_slice_iter(server.cert_pem.as_bytes()).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(clients.ca_pem.as_bytes()).unwrap()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(support::json_response(200, &json!({"mtls": true})))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstreams_abroad_get_tls_with_a_client_certificate() {
    let idp = Idp::start().await;
    let upstream_pki = Pki::new("upstream CA").unwrap();
    let gateway_clients = Pki::new("gateway client CA").unwrap();
    let server_cert = upstream_pki.issue(&["localhost"]).unwrap();
    let addr = mtls_upstream(&server_cert, &gateway_clients).await;
    let gateway_identity = gateway_clients.issue(&["residency-gateway"]).unwrap();
    let routes = format!(
        "{}[upstream]\nca_file = \"upstream-ca.pem\"\n{{identity}}\n\n{}",
        issuer(&idp),
        route("abroad", "/abroad", &format!("https://localhost:{}", addr.port()), "")
    );
    let files = [
        ("upstream-ca.pem", upstream_pki.ca_pem.as_str()),
        ("gw-client.crt", gateway_identity.cert_pem.as_str()),
        ("gw-client.key", gateway_identity.key_pem.as_str()),
    ];
    let token = idp.token(json!(["DE"]));

    // Without a client certificate the upstream refuses the handshake: 502, nothing forwarded.
    let text = config_text_with("jurisdiction = \"FR\"", "", &routes.replace("{identity}", ""));
    let gw = Gw::launch(None, &text, &files).await.unwrap();
    assert_eq!(gw.status("/abroad/x", Some(&token)).await, (502, "upstream_unreachable".to_string()));
    gw.shutdown().await;

    let identity = "client_cert = \"gw-client.crt\"\nclient_key = \"gw-client.key\"";
    let text = config_text_with("jurisdiction = \"FR\"", "", &routes.replace("{identity}", identity));
    let gw = Gw::launch(None, &text, &files).await.unwrap();
    let resp = gw.get("/abroad/x", Some(&token)).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["mtls"], true);
    gw.shutdown().await;

    // An upstream certificate from a CA the gateway was not told to trust: refused.
    let text = config_text_with("jurisdiction = \"FR\"", "", &routes.replace("{identity}", identity));
    let wrong_ca = Pki::new("someone else").unwrap();
    let files = [
        ("upstream-ca.pem", wrong_ca.ca_pem.as_str()),
        ("gw-client.crt", gateway_identity.cert_pem.as_str()),
        ("gw-client.key", gateway_identity.key_pem.as_str()),
    ];
    let gw = Gw::launch(None, &text, &files).await.unwrap();
    assert_eq!(gw.status("/abroad/x", Some(&token)).await.0, 502);
    gw.shutdown().await;
}
