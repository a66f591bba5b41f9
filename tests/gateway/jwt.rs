//! JWT validation through real requests: every way a token is refused is a 401 with an RFC 6750
//! challenge and a stable reason, nothing of the token is echoed, and the upstream is never reached.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use residency_gateway::dev::Signer;
use residency_gateway::token::{fingerprint, now_secs};
use serde_json::{Value, json};

use crate::support::{Gw, Idp, Upstream, audit_lines, audit_text, cache, rsa_signer, validations};

const REALM: &str = "Bearer realm=\"residency-gateway\"";

fn issuer_block(name: &str, idp: &Idp, extra: &str) -> String {
    format!(
        "[[issuers]]\nname = \"{name}\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n{extra}\n",
        idp.issuer(),
        idp.jwks_uri()
    )
}

fn route_block(name: &str, prefix: &str, up: &Upstream, issuers: &[&str]) -> String {
    let issuers: Vec<String> = issuers.iter().map(|i| format!("\"{i}\"")).collect();
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{}\"\njurisdiction = \"DE\"\nissuers = [{}]\n\n",
        up.url(),
        issuers.join(", ")
    )
}

/// One issuer `corp` (with `extra` config lines) and one DE route `/orders`.
async fn setup(extra: &str) -> (Gw, Idp, Upstream) {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let body = format!(
        "{}\n{}",
        issuer_block("corp", &idp, extra),
        route_block("orders", "/orders", &up, &["corp"])
    );
    (Gw::start(&body).await, idp, up)
}

/// Asserts a 401 with `reason`, the invalid_token challenge, no trace of `token` in the response,
/// and no request at the upstream.
async fn assert_invalid(gw: &Gw, up: &Upstream, token: &str, reason: &str) {
    let before = up.hits();
    let resp = gw.get("/orders/1", Some(token)).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 401, "body: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["reason"], reason, "body: {text}");
    let challenge =
        headers.get("www-authenticate").expect("a 401 carries WWW-Authenticate").to_str().unwrap();
    assert!(challenge.starts_with(REALM), "{challenge}");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    assert_not_echoed(&headers, &text, token);
    assert_eq!(up.hits(), before, "a refused token never reaches the upstream");
    assert!(!audit_text().contains(token), "the audit log holds the raw token");
    let fp = fingerprint(token);
    let line = audit_lines()
        .into_iter()
        .rev()
        .find(|l| l["token_fingerprint"] == fp.as_str())
        .expect("an audit line for the refused token");
    assert_eq!(line["decision"], "block", "{line}");
    assert_eq!(line["reason"], reason, "{line}");
}

/// Neither the token nor any of its three parts appears in the response.
fn assert_not_echoed(headers: &http::HeaderMap, body: &str, token: &str) {
    let mut needles = vec![token];
    needles.extend(token.split('.').filter(|p| p.len() >= 8));
    for n in needles {
        assert!(!body.contains(n), "the body echoes the token: {body}");
        for (k, v) in headers {
            let v = String::from_utf8_lossy(v.as_bytes());
            assert!(!v.contains(n), "header {k} echoes the token: {v}");
        }
    }
}

fn unsigned_token(header: &Value, claims: &Value) -> String {
    format!("{}.{}.", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()))
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len = n.to_be_bytes();
        let len: Vec<u8> = len.iter().copied().skip_while(|&b| b == 0).collect();
        out.push(0x80 | len.len() as u8);
        out.extend(len);
    }
    out.extend_from_slice(content);
    out
}

fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if v.first().is_some_and(|b| b & 0x80 != 0) {
        v.insert(0, 0);
    }
    tlv(0x02, &v)
}

/// The SubjectPublicKeyInfo PEM of an RSA JWK: what an attacker reads from the public JWKS.
fn rsa_public_pem(jwk: &Value) -> String {
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
    let rsa_key = tlv(0x30, &[der_uint(&n), der_uint(&e)].concat());
    let oid = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let alg = tlv(0x30, &[tlv(0x06, &oid), vec![0x05, 0x00]].concat());
    let mut bits = vec![0u8];
    bits.extend(rsa_key);
    let spki = tlv(0x30, &[alg, tlv(0x03, &bits)].concat());
    let b64 = STANDARD.encode(spki);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"))
}

fn hs256(secret: &[u8], kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret).unwrap()).unwrap()
}

#[tokio::test]
async fn missing_authorization_is_401_with_a_bare_challenge() {
    let (gw, _idp, up) = setup("").await;
    let resp = gw.get("/orders/1", None).await;
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert_eq!(challenge, REALM, "RFC 6750 §3.1: no error code without credentials");
    assert_eq!(resp.headers()["content-type"].to_str().unwrap(), "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "missing_token");
    assert_eq!(body["status"], 401);

    // Another scheme carries no bearer token (RFC 6750 §3.1): the same bare challenge.
    let resp = gw
        .client
        .get(format!("{}/orders/1", gw.base))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.headers()["www-authenticate"], REALM);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "missing_token");
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn malformed_authorization_is_401() {
    let (gw, idp, up) = setup("").await;
    let token = idp.token(json!(["DE"]));
    for value in [
        "Bearer a b".to_string(),
        "Bearer".to_string(),
        format!("Bearer {token} extra"),
        format!("Bearer \"{token}\""),
    ] {
        let resp = gw
            .client
            .get(format!("{}/orders/1", gw.base))
            .header("authorization", &value)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 401, "{value}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["reason"], "malformed_token", "{value}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with(REALM), "{challenge}");
        assert!(challenge.contains("error=\"invalid_request\""), "{challenge}");
        assert_not_echoed(&headers, &text, &token);
    }
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn expired_token_is_401_expired_token() {
    let (gw, idp, up) = setup("").await;
    let now = now_secs();
    let mut claims = idp.claims(json!(["DE"]));
    claims["iat"] = json!(now - 720);
    claims["exp"] = json!(now - 120);
    assert_invalid(&gw, &up, &idp.rs256(&claims), "expired_token").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn token_not_yet_valid_beyond_the_leeway_is_401() {
    let (gw, idp, up) = setup("").await;
    let now = now_secs();
    let mut claims = idp.claims(json!(["DE"]));
    claims["nbf"] = json!(now + 120);
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;

    // Within the 30 s leeway the clock skew is forgiven.
    let mut claims = idp.claims(json!(["DE"]));
    claims["nbf"] = json!(now + 10);
    let (status, reason) = gw.status("/orders/1", Some(&idp.rs256(&claims))).await;
    assert_eq!((status, reason.as_str()), (200, ""));
    gw.shutdown().await;
}

#[tokio::test]
async fn wrong_issuer_signed_by_the_right_key_is_401() {
    let (gw, idp, up) = setup("").await;
    let mut claims = idp.claims(json!(["DE"]));
    claims["iss"] = json!("https://evil.example/");
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;
    let mut claims = idp.claims(json!(["DE"]));
    claims.as_object_mut().unwrap().remove("iss");
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn wrong_audience_is_401_and_an_audience_array_with_ours_is_200() {
    let (gw, idp, up) = setup("").await;
    let mut claims = idp.claims(json!(["DE"]));
    claims["aud"] = json!("other-api");
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;
    claims["aud"] = json!(["other-api", "billing"]);
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;
    claims.as_object_mut().unwrap().remove("aud");
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;

    let mut claims = idp.claims(json!(["DE"]));
    claims["aud"] = json!(["other-api", "api"]);
    let (status, reason) = gw.status("/orders/1", Some(&idp.rs256(&claims))).await;
    assert_eq!((status, reason.as_str()), (200, ""));
    assert_eq!(up.hits(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn alg_none_is_401() {
    let (gw, idp, up) = setup("").await;
    let claims = idp.claims(json!(["DE"]));
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
        json!({"alg": "None", "typ": "JWT"}),
        json!({"alg": "NONE", "kid": "ec-1"}),
    ] {
        let token = unsigned_token(&header, &claims);
        assert_invalid(&gw, &up, &token, "invalid_token").await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_401() {
    let (gw, idp, up) = setup("").await;
    let jwk = idp.state.rsa.jwk.clone();
    let pem = rsa_public_pem(&jwk);
    // The PEM is the real public key, exactly what a PEM-keyed verifier would hold.
    jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).expect("a valid RSA public key PEM");
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let claims = idp.claims(json!(["DE"]));
    let secrets: Vec<Vec<u8>> =
        vec![pem.clone().into_bytes(), pem.trim_end().as_bytes().to_vec(), n, jwk.to_string().into_bytes()];
    for secret in &secrets {
        let token = hs256(secret, "rsa-1", &claims);
        assert_invalid(&gw, &up, &token, "invalid_token").await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_kid_is_401() {
    let (gw, idp, up) = setup("").await;
    let rogue = rsa_signer("rogue-kid");
    let claims = idp.claims(json!(["DE"]));
    assert_invalid(&gw, &up, &rogue.mint(&claims), "invalid_token").await;
    // A rogue key that reuses a published kid fails the signature check.
    let impostor = rsa_signer("rsa-1");
    let claims = idp.claims(json!(["DE"]));
    assert_invalid(&gw, &up, &impostor.mint(&claims), "invalid_token").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn lifetime_over_the_issuer_maximum_is_401() {
    let (gw, idp, up) = setup("max_token_lifetime_seconds = 600").await;
    let now = now_secs();
    let mut claims = idp.claims(json!(["DE"]));
    claims["iat"] = json!(now);
    claims["exp"] = json!(now + 3600);
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;

    // Exactly the maximum is still fine.
    claims["exp"] = json!(now + 600);
    let (status, reason) = gw.status("/orders/1", Some(&idp.rs256(&claims))).await;
    assert_eq!((status, reason.as_str()), (200, ""));
    gw.shutdown().await;
}

#[tokio::test]
async fn missing_exp_is_401() {
    let (gw, idp, up) = setup("").await;
    let mut claims = idp.claims(json!(["DE"]));
    claims.as_object_mut().unwrap().remove("exp");
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;
    // A non-numeric exp is no better.
    claims["exp"] = json!("tomorrow");
    assert_invalid(&gw, &up, &idp.rs256(&claims), "invalid_token").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn tampered_payload_is_401() {
    let (gw, idp, up) = setup("").await;
    let token = idp.token(json!(["US"]));
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["allowed_regions"] = json!(["DE"]);
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2]);
    assert_invalid(&gw, &up, &forged, "invalid_token").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn rs256_and_es256_tokens_are_forwarded() {
    let (gw, idp, up) = setup("").await;
    let claims = idp.claims(json!(["DE"]));
    let ok = (200, String::new());
    assert_eq!(gw.status("/orders/1", Some(&idp.es256(&claims))).await, ok);
    assert_eq!(gw.status("/orders/2", Some(&idp.rs256(&claims))).await, ok);
    // Back to the first header (the verifier remembers only the last one it parsed).
    let mut other = claims.clone();
    other["jti"] = json!("second-es256");
    assert_eq!(gw.status("/orders/3", Some(&idp.es256(&other))).await, ok);
    assert_eq!(up.hits(), 3);
    gw.shutdown().await;
}

/// The verifier remembers the last header it parsed; a token with the same header bytes but the wrong
/// number of segments is still malformed. A refusal that needed no signature check is never cached.
#[tokio::test]
async fn a_remembered_header_does_not_excuse_a_malformed_token_and_junk_is_not_cached() {
    let (gw, idp, up) = setup("").await;
    let token = idp.token(json!(["DE"]));
    assert_eq!(gw.status("/orders/1", Some(&token)).await.0, 200);
    let parts: Vec<&str> = token.split('.').collect();
    let two = format!("{}.{}", parts[0], parts[1]);
    let four = format!("{token}.{}", parts[2]);
    // Three uses each: a cached refusal would be a hit on the third.
    for bad in [&two, &four, &two, &four, &two, &four] {
        assert_invalid(&gw, &up, bad, "invalid_token").await;
    }
    assert_eq!(gw.metric(&cache("hit")).await, 0.0, "no refusal was served from the cache");
    assert_eq!(gw.metric(&cache("miss")).await, 7.0);
    assert_eq!(up.hits(), 1);
    gw.shutdown().await;
}

/// A JWT verdict is cached from the second use of its token: a token seen once is verified and not
/// stored, the second use stores it, the third is served from the cache.
#[tokio::test]
async fn a_jwt_is_cached_from_its_second_use() {
    let (gw, idp, up) = setup("").await;
    let valid = &validations("corp", "jwt", "valid");
    let once = idp.token(json!(["DE"]));
    let reused = idp.token(json!(["DE"]));
    assert_ne!(once, reused);
    assert_eq!(gw.status("/orders/1", Some(&once)).await.0, 200);
    for expected in [1.0, 2.0, 2.0, 2.0] {
        assert_eq!(gw.status("/orders/1", Some(&reused)).await.0, 200);
        assert_eq!(gw.metric(valid).await, 1.0 + expected, "validations after a use of the reused token");
    }
    assert_eq!(gw.metric(&cache("miss")).await, 3.0);
    assert_eq!(gw.metric(&cache("hit")).await, 2.0);
    // The token used once was not stored: its next use is verified again (and now stored).
    assert_eq!(gw.status("/orders/1", Some(&once)).await.0, 200);
    assert_eq!(gw.metric(valid).await, 4.0);
    assert_eq!(up.hits(), 6);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_iss_claim_selects_the_issuer_on_a_route_with_two() {
    let (a, b, c) = (Idp::start().await, Idp::start().await, Idp::start().await);
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let body = format!(
        "{}{}{}{}{}",
        issuer_block("a", &a, ""),
        issuer_block("b", &b, ""),
        issuer_block("c", &c, ""),
        route_block("multi", "/orders", &up, &["a", "b"]),
        route_block("only-c", "/other", &other, &["c"]),
    );
    let gw = Gw::start(&body).await;

    let ta = a.token(json!(["DE"]));
    let tb = b.es256(&b.claims(json!(["DE"])));
    for (token, issuer) in [(&ta, "a"), (&tb, "b")] {
        let (status, reason) = gw.status("/orders/1", Some(token)).await;
        assert_eq!((status, reason.as_str()), (200, ""), "issuer {issuer}");
        let fp = fingerprint(token);
        let line = audit_lines()
            .into_iter()
            .find(|l| l["token_fingerprint"] == fp.as_str())
            .expect("an audit line for the request");
        assert_eq!(line["issuer"], issuer, "{line}");
        assert_eq!(line["decision"], "forward", "{line}");
    }
    assert_eq!(up.hits(), 2);

    // An issuer the gateway knows, but not on this route.
    let tc = c.token(json!(["DE"]));
    assert_invalid(&gw, &up, &tc, "invalid_token").await;
    let (status, _) = gw.status("/other/1", Some(&tc)).await;
    assert_eq!(status, 200, "c's token is good on c's route");

    // b's iss with a's key: the kid `rsa-1` exists at both issuers, but only b's key may verify it.
    let mut forged = a.claims(json!(["DE"]));
    forged["iss"] = json!(b.issuer());
    assert_invalid(&gw, &up, &a.rs256(&forged), "invalid_token").await;
    gw.shutdown().await;
}

/// A fresh ES256 key: the encoding key and its public JWK (with `kid`).
fn ec_key(kid: &str) -> (EncodingKey, Value) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem = pair.serialize_pem();
    let signer =
        Signer::from_key(kid, Algorithm::ES256, EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap();
    (EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(), signer.jwk)
}

#[tokio::test]
async fn a_kid_naming_a_key_of_another_type_is_401() {
    let (gw, idp, up) = setup("").await;
    // ES256 signature, but the kid names the issuer's RSA key (and the other way round).
    let claims = idp.claims(json!(["DE"]));
    let ec_as_rsa = Signer::es256("rsa-1").unwrap().mint(&claims);
    assert_invalid(&gw, &up, &ec_as_rsa, "invalid_token").await;
    let rsa_as_ec = rsa_signer("ec-1").mint(&idp.claims(json!(["DE"])));
    assert_invalid(&gw, &up, &rsa_as_ec, "invalid_token").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn embedded_jwk_and_jku_headers_are_not_trusted() {
    let (gw, idp, up) = setup("").await;
    // The attacker's own key, published at the attacker's own JWKS endpoint.
    let evil = Idp::start().await;
    let (key, jwk) = ec_key("evil-1");
    evil.state.extra_keys.lock().unwrap().push(jwk.clone());
    let claims = idp.claims(json!(["DE"]));

    // CVE-2018-0114 style: the header carries the verification key itself.
    let mut header = Header::new(Algorithm::ES256);
    header.jwk = Some(serde_json::from_value(jwk.clone()).unwrap());
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_invalid(&gw, &up, &token, "invalid_token").await;
    header.kid = Some("evil-1".into());
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_invalid(&gw, &up, &token, "invalid_token").await;

    // jku pointing at the attacker's key set.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("evil-1".into());
    header.jku = Some(evil.jwks_uri());
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_invalid(&gw, &up, &token, "invalid_token").await;
    assert_eq!(evil.jwks_hits(), 0, "the gateway never fetched a key set named by a token");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_critical_header_parameter_the_gateway_does_not_understand_is_401() {
    // RFC 7515 §4.1.11: a JWS whose `crit` lists an extension the recipient does not understand is
    // invalid.
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let (key, jwk) = ec_key("crit-1");
    idp.state.extra_keys.lock().unwrap().push(jwk);
    let body =
        format!("{}\n{}", issuer_block("corp", &idp, ""), route_block("orders", "/orders", &up, &["corp"]));
    let gw = Gw::start(&body).await;
    let claims = idp.claims(json!(["DE"]));
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("crit-1".into());

    // Control: the same key without `crit` is accepted.
    let plain = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let (status, _) = gw.status("/orders/1", Some(&plain)).await;
    assert_eq!(status, 200, "the extra key verifies");

    header.crit = Some(vec!["urn:example:must-understand".into()]);
    header.extras.insert("urn:example:must-understand", "bind-to-channel");
    let token = jsonwebtoken::encode(&header, &idp.claims(json!(["DE"])), &key).unwrap();
    assert_invalid(&gw, &up, &token, "invalid_token").await;

    // `crit: ["b64"]` with `b64: true` (RFC 7797) passes jsonwebtoken's own check; the gateway
    // understands no extension and refuses it too.
    let mut b64 = Header::new(Algorithm::ES256);
    b64.kid = Some("crit-1".into());
    b64.crit = Some(vec!["b64".into()]);
    b64.extras.insert("b64", true);
    let token = jsonwebtoken::encode(&b64, &idp.claims(json!(["DE"])), &key).unwrap();
    assert_invalid(&gw, &up, &token, "invalid_token").await;
    gw.shutdown().await;
}
