//! Token checks: JWT verification without the cache (RS256, ES256), the cached path a repeat request
//! takes (cache hit + revocation/halt lookups + residency decision), and an introspection cache hit.
//!
//! Run with: cargo bench --bench tokens

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use residency_gateway::config::Config;
use residency_gateway::dev::{EMBEDDED_POLICIES, Pki, Signer, serve_http};
use residency_gateway::metrics::Metrics;
use residency_gateway::token::{Presented, Verifier, now_secs};
use serde_json::json;

struct Setup {
    _dir: tempfile::TempDir,
    config: Config,
    verifier: Arc<Verifier>,
    rs256: String,
    es256: String,
    opaque: &'static str,
}

fn rsa_signer() -> Signer {
    let pair = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap();
    Signer::from_key("rsa-1", jsonwebtoken::Algorithm::RS256, key).unwrap()
}

async fn setup() -> Setup {
    // As the binary does, before the first token is signed or verified.
    residency_gateway::token::crypto::install();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let pki = Pki::new("bench CA").unwrap();
    let leaf = pki.issue(&["localhost"]).unwrap();
    std::fs::write(p.join("gw.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(p.join("gw.key"), &leaf.key_pem).unwrap();
    std::fs::create_dir_all(p.join("policies")).unwrap();
    for (name, text) in EMBEDDED_POLICIES {
        std::fs::write(p.join("policies").join(name), text).unwrap();
    }
    let (rsa, ec) = (rsa_signer(), Signer::es256("ec-1").unwrap());
    std::fs::write(p.join("jwks.json"), json!({"keys": [rsa.jwk, ec.jwk]}).to_string()).unwrap();
    std::fs::write(p.join("secret"), "bench-secret").unwrap();
    let now = now_secs();
    let opaque = "opaque-bench-token";
    let introspection = serve_http(move |_req| async move {
        let body = json!({"active": true, "exp": now + 3600, "sub": "bob", "allowed_regions": ["EEA"]});
        http::Response::new(residency_gateway::full_body(Bytes::from(body.to_string())))
    })
    .await
    .unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[server.tls]
cert = "gw.crt"
key = "gw.key"
[[issuers]]
name = "corp"
issuer = "https://idp.example/"
audiences = ["api"]
jwks_file = "jwks.json"
[[issuers]]
name = "partner"
issuer = "https://as.partner.example/"
introspection_uri = "http://{introspection}/introspect"
client_id = "gw"
client_secret_file = "secret"
[[routes]]
name = "orders-de"
path_prefix = "/orders"
upstream = "http://127.0.0.1:1"
jurisdiction = "DE"
issuers = ["corp", "partner"]
"#
    );
    std::fs::write(p.join("gateway.toml"), text).unwrap();
    let config = Config::load(&p.join("gateway.toml")).unwrap();
    let verifier = Arc::new(Verifier::new(&config, &Metrics::new()).await.unwrap());
    for i in verifier.issuers() {
        if let Some(j) = &i.jwt {
            j.refresh().await.unwrap();
        }
    }
    let claims = json!({"iss": "https://idp.example/", "aud": "api", "sub": "alice", "iat": now,
        "exp": now + 3600, "allowed_regions": ["EEA"]});
    Setup { rs256: rsa.mint(&claims), es256: ec.mint(&claims), _dir: dir, config, verifier, opaque }
}

fn tokens(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(setup());
    let route = &s.config.routes[0];
    let corp = s.verifier.issuers().find(|i| &*i.name == "corp").unwrap().clone();
    let jwt = corp.jwt.as_ref().unwrap();

    c.bench_function("jwt_rs256_verify_uncached", |b| {
        b.to_async(&rt).iter(|| async { jwt.verify(&s.rs256).await.unwrap().unwrap() })
    });
    c.bench_function("jwt_es256_verify_uncached", |b| {
        b.to_async(&rt).iter(|| async { jwt.verify(&s.es256).await.unwrap().unwrap() })
    });
    // The path of every repeat request: cache lookup (hash of issuer and token), then the residency
    // decision, which is made again on every hit.
    c.bench_function("jwt_cached_check_and_decide", |b| {
        b.to_async(&rt).iter(|| async {
            let p = s.verifier.check(route, &Presented::new(&s.rs256)).await.unwrap().unwrap();
            s.config.policy.decide(&p.allowed_regions, &route.jurisdiction).unwrap()
        })
    });
    c.bench_function("introspection_cached_check_and_decide", |b| {
        b.to_async(&rt).iter(|| async {
            let p = s.verifier.check(route, &Presented::new(s.opaque)).await.unwrap().unwrap();
            s.config.policy.decide(&p.allowed_regions, &route.jurisdiction).unwrap()
        })
    });
}

criterion_group!(benches, tokens);
criterion_main!(benches);
