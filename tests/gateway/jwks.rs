//! JWKS handling: key rotation (new kid works at once, removed key stops after a refetch), outages
//! (last good keys kept, fail closed without keys, readiness), the unknown-kid refetch limit, keys that
//! cannot sign, Cache-Control driven refresh, the refresh metrics, and key sets read from a file.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use residency_gateway::dev::Signer;
use serde_json::{Value, json};

use crate::support::{self, Gw, Idp, Upstream, rsa_signer, validations};

/// Issuer `corp` on the Idp's JWKS with `extra` lines in its table, and route `/de` (DE) on it.
fn config(idp: &Idp, up: &Upstream, extra: &str) -> String {
    support::jwt_issuer_toml("corp", idp, extra)
        + &support::route_toml("de", "/de", &up.url(), "DE", &["corp"], "")
}

async fn start(idp: &Idp, up: &Upstream, extra: &str) -> Gw {
    support::ensure_default_crypto_provider();
    Gw::start(&config(idp, up, extra)).await
}

const REFRESH_OK: &str = r#"residency_gateway_jwks_refreshes_total{issuer="corp",result="success"}"#;
const REFRESH_ERR: &str = r#"residency_gateway_jwks_refreshes_total{issuer="corp",result="error"}"#;

fn skipped(reason: &str) -> String {
    format!(r#"residency_gateway_jwks_keys_skipped_total{{issuer="corp",reason="{reason}"}}"#)
}

async fn status(gw: &Gw, token: &str) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(10), gw.status("/de/x", Some(token)))
        .await
        .expect("the gateway answers within 10 s")
}

fn ok() -> (u16, String) {
    (200, String::new())
}

fn refused(reason: &str) -> (u16, String) {
    (401, reason.to_string())
}

/// A token naming a kid the issuer has never published.
fn unknown_kid_token(idp: &Idp, kid: &str) -> String {
    Signer::es256(kid).unwrap().mint(&idp.claims(json!(["DE"])))
}

/// Waits (in small steps, at most `limit`) until `cond` holds; false when it never did.
async fn eventually(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_new_key_works_at_once_and_a_removed_key_stops_after_a_refetch() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(&idp, &up, "jwks_refresh_seconds = 3600\njwks_min_refresh_seconds = 0.2").await;
    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, ok());
    assert_eq!(idp.jwks_hits(), 1);

    // Rotation: the issuer publishes a new key and signs with it. Past the refetch limit, the first
    // token with the new kid makes the gateway refetch; no waiting for the hourly refresh.
    let rotated = rsa_signer("rsa-2");
    idp.state.extra_keys.lock().unwrap().push(rotated.jwk.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&gw, &rotated.mint(&idp.claims(json!(["DE"])))).await, ok());
    assert_eq!(idp.jwks_hits(), 2, "one refetch for the new kid");
    assert_eq!(gw.metric(REFRESH_OK).await, 2.0);

    // Removal: the old key leaves the set. It stops working once the set has been refetched.
    idp.state.serve_rsa.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&gw, &unknown_kid_token(&idp, "nobody")).await, refused("invalid_token"));
    assert_eq!(idp.jwks_hits(), 3, "the unknown kid triggered a refetch");
    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, refused("invalid_token"), "rsa-1 was withdrawn");
    assert_eq!(status(&gw, &rotated.mint(&idp.claims(json!(["DE"])))).await, ok(), "rsa-2 is still there");
    assert_eq!(status(&gw, &idp.es256(&idp.claims(json!(["DE"])))).await, ok(), "ec-1 is still there");
    assert_eq!(gw.metric(REFRESH_OK).await, 3.0);
    assert_eq!(gw.metric(REFRESH_ERR).await, 0.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_jwks_outage_after_start_keeps_the_last_good_keys() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(&idp, &up, "jwks_min_refresh_seconds = 0.2").await;
    assert_eq!(gw.metric(REFRESH_OK).await, 1.0);

    idp.state.jwks_status.store(500, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Force a refetch while the endpoint fails.
    let (s, _) = status(&gw, &unknown_kid_token(&idp, "forces-refetch")).await;
    assert_ne!(s, 200);
    assert_eq!(idp.jwks_hits(), 2);
    assert_eq!(gw.metric(REFRESH_ERR).await, 1.0);
    assert_eq!(gw.metric(REFRESH_OK).await, 1.0);

    // Fresh tokens (not cached) signed with the known keys still pass.
    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, ok());
    assert_eq!(status(&gw, &idp.es256(&idp.claims(json!(["DE"])))).await, ok());
    assert_eq!(gw.readyz().await, 200, "still ready on the last good keys");
    assert_eq!(up.hits(), 2);

    idp.state.jwks_status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = status(&gw, &unknown_kid_token(&idp, "forces-another")).await;
    assert_eq!(gw.metric(REFRESH_OK).await, 2.0);
    assert_eq!(gw.metric(REFRESH_ERR).await, 1.0);
    gw.shutdown().await;
}

/// A token with a kid the gateway does not know, while the JWKS endpoint is failing: the key may well be
/// a freshly rotated one, so there is no verdict. The design's table says a token service that cannot be
/// reached is a 503 (fail closed, Retry-After), not a 401 that tells the client its token is bad; and the
/// refusal must not be cached past the outage.
#[tokio::test]
async fn an_unknown_kid_during_a_jwks_outage_is_unavailable_not_invalid() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(&idp, &up, "jwks_min_refresh_seconds = 0.2").await;
    let rotated = rsa_signer("rsa-2");
    let token = rotated.mint(&idp.claims(json!(["DE"])));

    idp.state.jwks_status.store(500, Ordering::SeqCst);
    idp.state.extra_keys.lock().unwrap().push(rotated.jwk.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = gw.get("/de/x", Some(&token)).await;
    let code = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").is_some();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(idp.jwks_hits(), 2, "the gateway tried to refetch");
    assert_eq!(
        (code, body["reason"].as_str().unwrap_or("")),
        (503, "token_service_unavailable"),
        "no key and no way to fetch one is an outage, not a bad token"
    );
    assert!(retry_after);

    // Once the endpoint is back, the same token works without waiting out a negative cache entry.
    idp.state.jwks_status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&gw, &token).await, ok());
    assert_eq!(up.hits(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_gateway_started_during_a_jwks_outage_fails_closed_until_it_recovers() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    idp.state.jwks_status.store(500, Ordering::SeqCst);
    let gw = start(&idp, &up, "jwks_min_refresh_seconds = 0.2").await;
    assert_eq!(gw.readyz().await, 503, "not ready without keys");
    assert!(gw.metric(REFRESH_ERR).await >= 1.0);
    assert_eq!(gw.metric(REFRESH_OK).await, 0.0);

    let token = idp.token(json!(["DE"]));
    let resp = gw.get("/de/x", Some(&token)).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "token_service_unavailable");
    assert_eq!(up.hits(), 0, "never forwarded without keys");
    assert_eq!(gw.metric(r#"residency_gateway_requests_total{outcome="unavailable",route="de"}"#).await, 1.0);

    idp.state.jwks_status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut last = (0, String::new());
    let recovered = eventually(Duration::from_secs(3), async || {
        last = status(&gw, &token).await;
        last == ok()
    })
    .await;
    assert!(recovered, "still {last:?} after the JWKS recovered");
    assert_eq!(gw.readyz().await, 200);
    assert!(gw.metric(REFRESH_OK).await >= 1.0);
    assert_eq!(up.hits(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_unknown_kids_does_not_hammer_the_jwks() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(&idp, &up, "jwks_min_refresh_seconds = 10").await;
    let tokens: Vec<String> = (0..50).map(|i| unknown_kid_token(&idp, &format!("made-up-{i}"))).collect();
    let before = idp.jwks_hits();

    let requests = tokens.iter().map(|t| gw.status("/de/x", Some(t)));
    let results = tokio::time::timeout(Duration::from_secs(10), futures_util::future::join_all(requests))
        .await
        .expect("50 requests finish");
    for r in &results {
        assert_eq!(r, &refused("invalid_token"));
    }
    let grew = idp.jwks_hits() - before;
    assert!(grew <= 2, "the JWKS was fetched {grew} times for 50 unknown kids");
    assert_eq!(up.hits(), 0);
    // The real keys are unaffected.
    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, ok());
    gw.shutdown().await;
}

#[tokio::test]
async fn encryption_keys_and_unknown_key_types_are_skipped() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let enc = Signer::es256("enc-1").unwrap();
    let mut enc_jwk = enc.jwk.clone();
    enc_jwk["use"] = json!("enc");
    idp.state.extra_keys.lock().unwrap().extend([enc_jwk, json!({"kty": "XYZ", "kid": "weird"})]);
    let gw = start(&idp, &up, "jwks_min_refresh_seconds = 0.2").await;
    assert_eq!(gw.readyz().await, 200, "the set loaded");
    assert_eq!(gw.metric(REFRESH_OK).await, 1.0);
    assert_eq!(gw.metric(&skipped("not_for_signing")).await, 1.0);
    assert_eq!(gw.metric(&skipped("unsupported")).await, 1.0);

    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, ok());
    assert_eq!(status(&gw, &idp.es256(&idp.claims(json!(["DE"])))).await, ok());

    // Signed by the enc key itself: its signature would verify, but an enc key never verifies a JWT.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = idp.jwks_hits();
    assert_eq!(status(&gw, &enc.mint(&idp.claims(json!(["DE"])))).await, refused("invalid_token"));
    assert_eq!(idp.jwks_hits(), hits, "a kid known to be unusable does not trigger a refetch");
    let weird = Signer::es256("weird").unwrap();
    assert_eq!(status(&gw, &weird.mint(&idp.claims(json!(["DE"])))).await, refused("invalid_token"));
    assert_eq!(up.hits(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn cache_control_max_age_schedules_the_next_refresh() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    *idp.state.jwks_cache_control.lock().unwrap() = Some("public, max-age=1".into());
    let gw = start(&idp, &up, "jwks_refresh_seconds = 3600\njwks_min_refresh_seconds = 0.5").await;
    let started = Instant::now();
    let before = idp.jwks_hits();
    assert_eq!(before, 1);

    let refetched = eventually(Duration::from_millis(2500), async || idp.jwks_hits() > before).await;
    assert!(refetched, "no refetch within 2.5 s of a max-age=1 answer");
    assert!(started.elapsed() >= Duration::from_millis(800), "refetched after {:?}", started.elapsed());
    assert!(eventually(Duration::from_secs(1), async || gw.metric(REFRESH_OK).await >= 2.0).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_zero_max_age_is_held_to_the_minimum_refresh_interval() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    *idp.state.jwks_cache_control.lock().unwrap() = Some("max-age=0".into());
    let gw = start(&idp, &up, "jwks_refresh_seconds = 3600\njwks_min_refresh_seconds = 0.5").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let hits = idp.jwks_hits();
    // At 0 s, then about 0.5 s and 1.0 s.
    assert!((2..=4).contains(&hits), "{hits} fetches in 1.3 s with a 0.5 s minimum");
    gw.shutdown().await;
}

#[tokio::test]
async fn refresh_metrics_count_successes_and_errors() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(&idp, &up, "jwks_min_refresh_seconds = 0.2").await;
    assert_eq!((gw.metric(REFRESH_OK).await, gw.metric(REFRESH_ERR).await), (1.0, 0.0));

    for (status_code, ok_after, err_after) in [(500, 1.0, 1.0), (503, 1.0, 2.0), (200, 2.0, 2.0)] {
        idp.state.jwks_status.store(status_code, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hits = idp.jwks_hits();
        let _ = status(&gw, &unknown_kid_token(&idp, &format!("kid-{status_code}"))).await;
        assert_eq!(idp.jwks_hits(), hits + 1, "one refetch with the endpoint at {status_code}");
        assert_eq!(
            (gw.metric(REFRESH_OK).await, gw.metric(REFRESH_ERR).await),
            (ok_after, err_after),
            "after a fetch answered {status_code}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_jwks_file_issuer_works() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let set = json!({"keys": [idp.state.rsa.jwk.clone(), idp.state.ec.jwk.clone()]}).to_string();
    let body = format!(
        r#"
[[issuers]]
name = "corp"
issuer = "{iss}"
audiences = ["api"]
jwks_file = "keys/jwks.json"

[[routes]]
name = "de"
path_prefix = "/de"
upstream = "{up}"
jurisdiction = "DE"
issuers = ["corp"]
"#,
        iss = idp.issuer(),
        up = up.url()
    );
    let gw = Gw::start_with_files(&body, &[("keys/jwks.json", &set)]).await;
    assert_eq!(gw.readyz().await, 200);
    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, ok());
    assert_eq!(status(&gw, &idp.es256(&idp.claims(json!(["DE"])))).await, ok());
    assert_eq!(status(&gw, &unknown_kid_token(&idp, "nobody")).await, refused("invalid_token"));
    assert_eq!(status(&gw, &idp.token(json!(["US"]))).await, (403, "region_not_allowed".into()));
    assert_eq!(idp.jwks_hits(), 0, "nothing fetched over HTTP");
    assert_eq!(gw.metric(REFRESH_OK).await, 1.0);
    assert_eq!(gw.metric(&validations("corp", "jwt", "valid")).await, 3.0);
    assert_eq!(up.hits(), 2);
    gw.shutdown().await;
}

/// During an outage the scheduled refresh keeps failing. The next attempt must still wait (at least
/// `jwks_min_refresh_seconds`); an immediate retry after every failure turns the refresh loop into a
/// busy loop against the issuer for as long as the outage lasts.
#[tokio::test]
async fn a_failing_scheduled_refresh_does_not_spin() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(&idp, &up, "jwks_refresh_seconds = 0.3\njwks_min_refresh_seconds = 0.2").await;
    idp.state.jwks_status.store(500, Ordering::SeqCst);
    // Past the first scheduled refresh (0.3 s), then watch one second of outage.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = idp.jwks_hits();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during = idp.jwks_hits() - before;
    idp.state.jwks_status.store(200, Ordering::SeqCst);
    assert!(during <= 8, "{during} JWKS fetches in one second of outage with a 0.2 s minimum interval");
    gw.shutdown().await;
}

/// Keys older than the refresh interval plus `jwks_max_stale_seconds` are no longer trusted: tokens get
/// 503 (fail closed) until a fetch works again.
#[tokio::test]
async fn keys_past_max_stale_fail_closed_until_a_fetch_works() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(
        &idp,
        &up,
        "jwks_refresh_seconds = 0.3\njwks_min_refresh_seconds = 0.2\njwks_max_stale_seconds = 0.5",
    )
    .await;
    let started = Instant::now();
    idp.state.jwks_status.store(500, Ordering::SeqCst);
    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, ok(), "fresh keys");

    let mut last = (0, String::new());
    let failed_closed = eventually(Duration::from_secs(3), async || {
        last = status(&gw, &idp.token(json!(["DE"]))).await;
        last.0 != 200
    })
    .await;
    assert!(failed_closed, "stale keys still accepted after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_millis(700), "refused after only {:?}", started.elapsed());
    assert_eq!(last, (503, "token_service_unavailable".to_string()));

    idp.state.jwks_status.store(200, Ordering::SeqCst);
    let recovered = eventually(Duration::from_secs(3), async || {
        last = status(&gw, &idp.token(json!(["DE"]))).await;
        last == ok()
    })
    .await;
    assert!(recovered, "still {last:?} after the JWKS recovered");
    gw.shutdown().await;
}

/// A config reload (`POST /admin/reload`, SIGHUP) while the JWKS endpoint is down: the new generation
/// must not throw away the keys the running one holds, or every JWT gets 503 until the endpoint is back.
#[tokio::test]
async fn a_reload_during_a_jwks_outage_keeps_the_last_good_keys() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = start(&idp, &up, "jwks_min_refresh_seconds = 0.2").await;
    assert_eq!(status(&gw, &idp.token(json!(["DE"]))).await, ok());

    idp.state.jwks_status.store(500, Ordering::SeqCst);
    let runtime = gw.handle.as_ref().unwrap().runtime.clone();
    tokio::time::timeout(Duration::from_secs(10), runtime.reload())
        .await
        .expect("the reload finishes")
        .expect("the config itself is valid");
    assert_eq!(gw.metric(r#"residency_gateway_config_reloads_total{result="success"}"#).await, 1.0);

    let after = status(&gw, &idp.token(json!(["DE"]))).await;
    assert_eq!(after, ok(), "a fresh token signed with the known key after the reload");
    assert_eq!(gw.readyz().await, 200);
    gw.shutdown().await;
}
