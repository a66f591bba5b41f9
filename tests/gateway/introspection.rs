//! Opaque tokens through RFC 7662 introspection, and the one validation cache: client authentication,
//! inactive and malformed answers, fail-closed on errors and timeouts, coalescing, expiry, negative
//! caching, JWTs sent to introspection, discovery, and the validation metrics.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use residency_gateway::token::now_secs;
use serde_json::{Value, json};

use crate::support::{self, Gw, Idp, Upstream, cache, validations};

const SECRET: &str = "s3cr3t";
const CLIENT_ID: &str = "gw-client";
/// base64("gw-client:s3cr3t"), computed outside the code under test.
const BASIC: &str = "Basic Z3ctY2xpZW50OnMzY3IzdA==";

/// An introspection issuer `partner` (plus `extra` lines in its table), a `[cache]` section, and two
/// routes on it: `/de` (DE) and `/us` (US-CA).
fn config(idp: &Idp, up: &Upstream, issuer_extra: &str, cache: &str) -> String {
    let route = |name, prefix, jurisdiction| {
        support::route_toml(name, prefix, &up.url(), jurisdiction, &["partner"], "")
    };
    format!(
        "{cache}\n\n{}{}{}",
        introspection_issuer("partner", idp, issuer_extra),
        route("de", "/de", "DE"),
        route("us", "/us", "US-CA")
    )
}

/// The lines that make an issuer introspect at `idp` with this file's client credentials.
fn introspection_lines(idp: &Idp) -> String {
    format!(
        "introspection_uri = \"http://{}/introspect\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret_file = \"secret.txt\"\n",
        idp.addr
    )
}

/// A `[[issuers]]` table for an introspection issuer at `idp`; `extra` lines go in the table.
fn introspection_issuer(name: &str, idp: &Idp, extra: &str) -> String {
    format!(
        "[[issuers]]\nname = \"{name}\"\nissuer = \"{}\"\n{}{extra}\n\n",
        idp.issuer(),
        introspection_lines(idp)
    )
}

async fn setup_with(issuer_extra: &str, cache: &str) -> (Gw, Idp, Upstream) {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw =
        Gw::start_with_files(&config(&idp, &up, issuer_extra, cache), &[("secret.txt", "s3cr3t\n")]).await;
    (gw, idp, up)
}

async fn setup() -> (Gw, Idp, Upstream) {
    setup_with("", "").await
}

/// An active introspection response allowed in `regions`, expiring in `ttl` seconds.
fn active(idp: &Idp, regions: Value, ttl: u64) -> Value {
    json!({"active": true, "iss": idp.issuer(), "sub": "bob", "client_id": "app-7", "scope": "orders",
        "exp": now_secs() + ttl, "allowed_regions": regions})
}

fn form_pairs(form: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> =
        form_urlencoded::parse(form.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    pairs.sort();
    pairs
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    v.sort();
    v
}

fn last_auth(idp: &Idp) -> Option<String> {
    idp.state.introspect_auth.lock().unwrap().clone()
}

fn last_form(idp: &Idp) -> String {
    idp.state.introspect_form.lock().unwrap().clone().expect("the introspection endpoint was called")
}

/// GET with a bound on the whole exchange, so a hanging gateway fails the test instead of stalling it.
async fn status_within(gw: &Gw, path: &str, token: &str, limit: Duration) -> (u16, String) {
    tokio::time::timeout(limit, gw.status(path, Some(token)))
        .await
        .unwrap_or_else(|_| panic!("no answer for {path} within {limit:?}"))
}

async fn status(gw: &Gw, path: &str, token: &str) -> (u16, String) {
    status_within(gw, path, token, Duration::from_secs(10)).await
}

// ---------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn opaque_token_passes_with_basic_client_auth() {
    let (gw, idp, up) = setup().await;
    idp.opaque("opaque-1", active(&idp, json!(["EU"]), 600));

    assert_eq!(status(&gw, "/de/orders", "opaque-1").await, (200, String::new()));
    assert_eq!(up.hits(), 1);
    assert_eq!(idp.introspect_hits(), 1);
    assert_eq!(last_auth(&idp).as_deref(), Some(BASIC), "HTTP Basic with the client id and secret");
    assert_eq!(last_form(&idp), "token=opaque-1&token_type_hint=access_token");
    assert_eq!(
        form_pairs(&last_form(&idp)),
        pairs(&[("token", "opaque-1"), ("token_type_hint", "access_token")]),
        "with Basic auth the secret is not repeated in the form"
    );
    assert_eq!(gw.metric(&validations("partner", "introspection", "valid")).await, 1.0);
    assert_eq!(gw.metric(&cache("miss")).await, 1.0);
    assert_eq!(gw.metric(&cache("hit")).await, 0.0);
    assert_eq!(up.seen().path_and_query, "/de/orders");
    gw.shutdown().await;
}

#[tokio::test]
async fn client_secret_post_puts_the_credentials_in_the_form() {
    let (gw, idp, up) = setup_with(r#"client_auth = "client_secret_post""#, "").await;
    idp.opaque("opaque-1", active(&idp, json!(["EU"]), 600));

    assert_eq!(status(&gw, "/de/x", "opaque-1").await, (200, String::new()));
    assert_eq!(up.hits(), 1);
    assert_eq!(idp.introspect_hits(), 1);
    assert_eq!(last_auth(&idp), None, "no Authorization header with client_secret_post");
    assert_eq!(
        form_pairs(&last_form(&idp)),
        pairs(&[
            ("token", "opaque-1"),
            ("token_type_hint", "access_token"),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
        ])
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn inactive_string_active_and_unknown_tokens_are_401() {
    let (gw, idp, up) = setup().await;
    idp.opaque("inactive-1", json!({"active": false}));
    let mut stringy = active(&idp, json!(["EU"]), 600);
    stringy["active"] = json!("true");
    idp.opaque("stringy-1", stringy);

    for token in ["inactive-1", "stringy-1", "never-issued-1"] {
        let resp = gw.get("/de/x", Some(token)).await;
        assert_eq!(resp.status().as_u16(), 401, "{token}");
        let challenge =
            resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        assert!(challenge.contains(r#"error="invalid_token""#), "{token}: {challenge}");
        assert!(!challenge.contains(token), "the challenge never echoes the token");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["reason"], "invalid_token", "{token}");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(idp.introspect_hits(), 3);
    assert_eq!(gw.metric(&validations("partner", "introspection", "invalid")).await, 3.0);
    assert_eq!(gw.metric(&validations("partner", "introspection", "valid")).await, 0.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn malformed_or_failing_introspection_fails_closed_and_is_not_cached() {
    let (gw, idp, up) = setup().await;
    idp.opaque("opaque-1", active(&idp, json!(["EU"]), 600));

    *idp.state.introspect_raw.lock().unwrap() = Some("not json".into());
    let resp = gw.get("/de/x", Some("opaque-1")).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some(), "503 carries Retry-After");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "token_service_unavailable");

    *idp.state.introspect_raw.lock().unwrap() = None;
    idp.state.introspect_status.store(500, Ordering::SeqCst);
    let resp = gw.get("/de/x", Some("opaque-1")).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "token_service_unavailable");
    assert_eq!(up.hits(), 0, "never forwarded without a verdict");

    // No verdict was cached: the same token works as soon as the endpoint answers again.
    idp.state.introspect_status.store(0, Ordering::SeqCst);
    assert_eq!(status(&gw, "/de/x", "opaque-1").await, (200, String::new()));
    assert_eq!(idp.introspect_hits(), 3);
    assert_eq!(up.hits(), 1);
    assert_eq!(gw.metric(&validations("partner", "introspection", "unavailable")).await, 2.0);
    assert_eq!(gw.metric(&validations("partner", "introspection", "valid")).await, 1.0);
    assert_eq!(gw.metric(r#"residency_gateway_requests_total{outcome="unavailable",route="de"}"#).await, 2.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_hanging_introspection_endpoint_times_out_into_503() {
    let (gw, idp, up) = setup_with("timeout_seconds = 0.5", "").await;
    idp.opaque("opaque-1", active(&idp, json!(["EU"]), 600));
    idp.state.introspect_delay_ms.store(5000, Ordering::SeqCst);

    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(4), gw.get("/de/x", Some("opaque-1")))
        .await
        .expect("the gateway answers while the endpoint hangs");
    let took = start.elapsed();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "token_service_unavailable");
    assert!(took < Duration::from_secs(3), "answered in {took:?}, not well under 3 s");
    assert!(took >= Duration::from_millis(400), "answered in {took:?}: before the timeout could have passed");
    assert_eq!(up.hits(), 0);
    assert_eq!(gw.metric(&validations("partner", "introspection", "unavailable")).await, 1.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_with_one_new_token_make_one_introspection_call() {
    let (gw, idp, up) = setup().await;
    idp.opaque("opaque-burst", active(&idp, json!(["DE"]), 600));
    // Slow enough that every request arrives while the first lookup is still running.
    idp.state.introspect_delay_ms.store(300, Ordering::SeqCst);

    let client = gw.client.clone();
    let url = format!("{}/de/burst", gw.base);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                client.get(url).bearer_auth("opaque-burst").send().await.map(|r| r.status().as_u16())
            })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(15), futures_util::future::join_all(tasks))
        .await
        .expect("200 requests finish");
    let statuses: Vec<u16> = all.into_iter().map(|r| r.unwrap().unwrap()).collect();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(ok, 200, "statuses: {statuses:?}");
    assert_eq!(idp.introspect_hits(), 1, "concurrent lookups of one token are coalesced");
    assert_eq!(up.hits(), 200);
    assert_eq!(gw.metric(&validations("partner", "introspection", "valid")).await, 1.0);
    assert_eq!(gw.metric(&cache("miss")).await, 1.0);
    assert_eq!(gw.metric(&cache("hit")).await, 199.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cached_token_stops_working_at_its_exp() {
    // No leeway, so the token's exp is the moment it stops working.
    let (gw, idp, up) = setup_with("leeway_seconds = 0", "").await;
    let exp = now_secs() + 2;
    let mut resp = active(&idp, json!(["DE"]), 0);
    resp["exp"] = json!(exp);
    idp.opaque("short-1", resp);

    assert_eq!(status(&gw, "/de/x", "short-1").await, (200, String::new()));
    let deadline = Instant::now() + Duration::from_secs(4);
    let last = loop {
        let (s, reason) = status(&gw, "/de/x", "short-1").await;
        if s != 200 {
            assert!(now_secs() >= exp, "refused at {} before its exp {exp}", now_secs());
            break (s, reason);
        }
        assert!(Instant::now() < deadline, "still 200 four seconds after the token's exp");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(last, (401, "expired_token".to_string()));
    assert!(up.hits() >= 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cache_hit_is_still_checked_against_each_routes_jurisdiction() {
    let (gw, idp, up) = setup().await;
    idp.opaque("de-only", active(&idp, json!(["DE"]), 600));

    assert_eq!(status(&gw, "/de/x", "de-only").await, (200, String::new()));
    let hits_before = gw.metric(&cache("hit")).await;
    let resp = gw.get("/us/x", Some("de-only")).await;
    assert_eq!(resp.status().as_u16(), 403);
    let challenge =
        resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(challenge.contains(r#"error="insufficient_scope""#), "{challenge}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "region_not_allowed");
    assert_eq!(body["route"], "us");
    assert_eq!(body["jurisdiction"], "US-CA");

    assert_eq!(idp.introspect_hits(), 1, "the second route was served from the cache");
    assert_eq!(gw.metric(&cache("hit")).await - hits_before, 1.0);
    assert_eq!(gw.metric(&cache("miss")).await, 1.0);
    assert_eq!(gw.metric(&validations("partner", "introspection", "valid")).await, 1.0);
    assert_eq!(up.hits(), 1);
    assert_eq!(
        gw.metric(
            r#"residency_gateway_transfers_blocked_total{data_class="personal",jurisdiction="US-CA",reason="region_not_allowed",route="us"}"#
        )
        .await,
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn negative_results_are_cached_only_for_the_negative_ttl() {
    let (gw, idp, up) = setup_with("", "[cache]\nnegative_ttl_seconds = 0.5").await;
    idp.opaque("flip-1", json!({"active": false}));

    assert_eq!(status(&gw, "/de/x", "flip-1").await, (401, "invalid_token".to_string()));
    assert_eq!(status(&gw, "/de/x", "flip-1").await, (401, "invalid_token".to_string()));
    assert_eq!(idp.introspect_hits(), 1, "the second refusal came from the cache");

    idp.opaque("flip-1", active(&idp, json!(["DE"]), 600));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(status(&gw, "/de/x", "flip-1").await, (200, String::new()));
    assert_eq!(idp.introspect_hits(), 2);
    assert_eq!(up.hits(), 1);
    assert_eq!(gw.metric(&validations("partner", "introspection", "invalid")).await, 1.0);
    assert_eq!(gw.metric(&validations("partner", "introspection", "valid")).await, 1.0);
    gw.shutdown().await;
}

/// Two issuer entries for the same `iss`: `corp` verifies JWTs locally, `corp-as` introspects.
async fn jwt_and_introspection_setup() -> (Gw, Idp, Upstream) {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let body = support::jwt_issuer_toml("corp", &idp, "")
        + &introspection_issuer("corp-as", &idp, "")
        + &support::route_toml("local", "/local", &up.url(), "DE", &["corp"], "")
        + &support::route_toml(
            "live",
            "/live",
            &up.url(),
            "DE",
            &["corp", "corp-as"],
            "introspect_jwts = true",
        );
    let gw = Gw::start_with_files(&body, &[("secret.txt", SECRET)]).await;
    (gw, idp, up)
}

#[tokio::test]
async fn a_jwt_on_an_introspect_jwts_route_goes_to_introspection() {
    let (gw, idp, up) = jwt_and_introspection_setup().await;
    let jwt = idp.token(json!(["DE"]));
    idp.opaque(&jwt, active(&idp, json!(["DE"]), 600));

    assert_eq!(status(&gw, "/live/x", &jwt).await, (200, String::new()));
    assert_eq!(idp.introspect_hits(), 1, "the JWT was introspected");
    assert_eq!(form_pairs(&last_form(&idp)), pairs(&[("token", &jwt), ("token_type_hint", "access_token")]));
    assert_eq!(gw.metric(&validations("corp-as", "introspection", "valid")).await, 1.0);
    assert_eq!(gw.metric(&validations("corp", "jwt", "valid")).await, 0.0);

    // A JWT the JWKS would accept, but the authorization server calls inactive (revoked): refused on the
    // introspecting route, accepted on the local one.
    let revoked = idp.token(json!(["DE"]));
    assert_eq!(status(&gw, "/live/x", &revoked).await, (401, "invalid_token".to_string()));
    assert_eq!(idp.introspect_hits(), 2);
    assert_eq!(status(&gw, "/local/x", &revoked).await, (200, String::new()));
    assert_eq!(idp.introspect_hits(), 2, "the local route does not introspect");
    assert_eq!(gw.metric(&validations("corp", "jwt", "valid")).await, 1.0);
    assert_eq!(gw.metric(&validations("corp-as", "introspection", "invalid")).await, 1.0);
    assert_eq!(up.hits(), 2);
    gw.shutdown().await;
}

/// One issuer entry that can do both: a verdict reached by local JWT verification on one route must not
/// be served from the cache to a route that asks for introspection (the authorization server may have
/// revoked the token, which is the point of `introspect_jwts`).
#[tokio::test]
async fn an_introspect_jwts_route_is_not_served_a_cached_local_jwt_verdict() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let body = support::jwt_issuer_toml("corp", &idp, &introspection_lines(&idp))
        + &support::route_toml("local", "/local", &up.url(), "DE", &["corp"], "")
        + &support::route_toml("live", "/live", &up.url(), "DE", &["corp"], "introspect_jwts = true");
    let gw = Gw::start_with_files(&body, &[("secret.txt", SECRET)]).await;
    // Valid by signature, but unknown to (revoked at) the authorization server.
    let jwt = idp.token(json!(["DE"]));

    assert_eq!(status(&gw, "/local/x", &jwt).await, (200, String::new()));
    assert_eq!(idp.introspect_hits(), 0);
    let live = status(&gw, "/live/x", &jwt).await;
    assert_eq!(idp.introspect_hits(), 1, "the introspect_jwts route asked the authorization server");
    assert_eq!(live, (401, "invalid_token".to_string()));
    assert_eq!(up.hits(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn discovery_supplies_the_introspection_endpoint_and_the_jwks_uri() {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let discovery = format!("discovery_url = \"http://{}/.well-known/openid-configuration\"", idp.addr);
    let body = format!(
        "[[issuers]]\nname = \"as\"\nissuer = \"{iss}\"\n{discovery}\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret_file = \"secret.txt\"\n\n\
         [[issuers]]\nname = \"corp\"\nissuer = \"{iss}\"\naudiences = [\"api\"]\n{discovery}\n\n{}{}",
        support::route_toml("opaque", "/opaque", &up.url(), "DE", &["as"], ""),
        support::route_toml("jwt", "/jwt", &up.url(), "DE", &["corp"], ""),
        iss = idp.issuer(),
    );
    let gw = Gw::start_with_files(&body, &[("secret.txt", SECRET)]).await;
    assert_eq!(idp.state.discovery_hits.load(Ordering::SeqCst), 2, "one metadata fetch per issuer");
    assert!(idp.jwks_hits() >= 1, "the JWT issuer fetched the discovered jwks_uri");

    idp.opaque("opaque-d", active(&idp, json!(["EU"]), 600));
    assert_eq!(status(&gw, "/opaque/x", "opaque-d").await, (200, String::new()));
    assert_eq!(idp.introspect_hits(), 1);
    assert_eq!(last_auth(&idp).as_deref(), Some(BASIC));

    let jwt = idp.es256(&idp.claims(json!(["DE"])));
    assert_eq!(status(&gw, "/jwt/x", &jwt).await, (200, String::new()));
    assert_eq!(idp.introspect_hits(), 1);
    assert_eq!(gw.metric(&validations("as", "introspection", "valid")).await, 1.0);
    assert_eq!(gw.metric(&validations("corp", "jwt", "valid")).await, 1.0);
    assert_eq!(up.hits(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn validation_metrics_count_each_lookup_once_by_result() {
    let (gw, idp, up) = setup().await;
    idp.opaque("good-1", active(&idp, json!(["DE"]), 600));
    idp.opaque("good-2", active(&idp, json!(["EU"]), 600));
    idp.opaque("bad-1", json!({"active": false}));
    idp.opaque("down-1", active(&idp, json!(["DE"]), 600));
    let v = |r: &str| validations("partner", "introspection", r);

    assert_eq!(status(&gw, "/de/x", "good-1").await.0, 200);
    assert_eq!(status(&gw, "/de/x", "good-1").await.0, 200); // cache hit: no validation
    assert_eq!(status(&gw, "/us/x", "good-1").await.0, 403); // cache hit, residency refused
    assert_eq!(status(&gw, "/de/x", "good-2").await.0, 200);
    assert_eq!(status(&gw, "/de/x", "bad-1").await.0, 401);
    assert_eq!(status(&gw, "/de/x", "bad-1").await.0, 401); // negative cache hit
    idp.state.introspect_status.store(503, Ordering::SeqCst);
    assert_eq!(status(&gw, "/de/x", "down-1").await.0, 503);
    assert_eq!(status(&gw, "/de/x", "down-1").await.0, 503); // not cached: asked again
    idp.state.introspect_status.store(0, Ordering::SeqCst);

    assert_eq!(gw.metric(&v("valid")).await, 2.0);
    assert_eq!(gw.metric(&v("invalid")).await, 1.0);
    assert_eq!(gw.metric(&v("unavailable")).await, 2.0);
    assert_eq!(gw.metric(&validations("partner", "jwt", "valid")).await, 0.0);
    assert_eq!(idp.introspect_hits(), 5);
    assert_eq!(gw.metric(&cache("hit")).await, 3.0);
    assert_eq!(up.hits(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_claims_of_an_active_response_are_checked() {
    let (gw, idp, up) = setup_with(r#"audiences = ["api"]"#, "").await;
    let now = now_secs();
    let base = active(&idp, json!(["DE"]), 600);
    let with = |k: &str, v: Value| {
        let mut r = base.clone();
        r[k] = v;
        r
    };
    idp.opaque("aud-ok", with("aud", json!(["other", "api"])));
    idp.opaque("aud-wrong", with("aud", json!("other")));
    idp.opaque("iss-wrong", with("iss", json!("https://elsewhere.example/")));
    idp.opaque("exp-past", with("exp", json!(now - 3600)));
    idp.opaque("exp-string", with("exp", json!((now + 600).to_string())));
    idp.opaque("nbf-future", with("nbf", json!(now + 3600)));

    assert_eq!(status(&gw, "/de/x", "aud-ok").await, (200, String::new()));
    assert_eq!(status(&gw, "/de/x", "aud-wrong").await, (401, "invalid_token".to_string()));
    assert_eq!(status(&gw, "/de/x", "iss-wrong").await, (401, "invalid_token".to_string()));
    assert_eq!(status(&gw, "/de/x", "exp-past").await, (401, "expired_token".to_string()));
    assert_eq!(status(&gw, "/de/x", "exp-string").await, (401, "invalid_token".to_string()));
    assert_eq!(status(&gw, "/de/x", "nbf-future").await, (401, "invalid_token".to_string()));
    assert_eq!(up.hits(), 1);
    assert_eq!(gw.metric(&validations("partner", "introspection", "invalid")).await, 5.0);
    gw.shutdown().await;
}
