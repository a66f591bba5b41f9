//! The admin API through real requests: authentication, revocations (jti, sub, client_id, issuer
//! scope, cached validations), halts (jurisdiction, country, route, issuer, monitor routes), metrics and
//! audit lines, the file backend across a restart, and the Redis backend shared by two replicas (a
//! real `redis-server`, started and stopped by the tests).

use std::net::TcpListener as StdListener;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, Gw, Idp, Upstream, audit_lines, cache, prepare_dir};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const ADMIN_SECTION: &str = "[admin]\ntoken_file = \"admin.token\"\n\n";

/// A token allowed in every route's jurisdiction except the monitor route's (`BR`).
fn regions() -> Value {
    json!(["DE", "US"])
}

fn admin_actions(action: &str, result: &str) -> String {
    format!("residency_gateway_admin_actions_total{{action=\"{action}\",result=\"{result}\"}}")
}

fn state_entries(kind: &str) -> String {
    format!("residency_gateway_state_entries{{kind=\"{kind}\"}}")
}

/// Two JWT issuers (`corp`, `partner`) and three routes on one echo upstream: `de` (DE), `usca`
/// (US-CA), both for both issuers, and `mon` (BR, monitor mode, corp only).
struct Env {
    gw: Gw,
    corp: Idp,
    partner: Idp,
    up: Upstream,
}

fn config_body(corp: &Idp, partner: &Idp, up: &Upstream, admin: bool, state: &str) -> String {
    let mut body = String::new();
    if admin {
        body.push_str(ADMIN_SECTION);
    }
    body.push_str(state);
    body.push('\n');
    for (name, idp) in [("corp", corp), ("partner", partner)] {
        body.push_str(&support::jwt_issuer_toml(name, idp, ""));
    }
    for (name, prefix, jurisdiction, issuers, mode) in [
        ("de", "/de", "DE", &["corp", "partner"][..], "enforce"),
        ("usca", "/usca", "US-CA", &["corp", "partner"][..], "enforce"),
        ("mon", "/mon", "BR", &["corp"][..], "monitor"),
    ] {
        let mode = format!("mode = \"{mode}\"");
        body.push_str(&support::route_toml(name, prefix, &up.url(), jurisdiction, issuers, &mode));
    }
    body
}

impl Env {
    async fn start() -> Env {
        Env::start_with("").await
    }

    /// With `state` as the `[state]` section (empty: the default file backend).
    async fn start_with(state: &str) -> Env {
        support::install_crypto_provider();
        let (corp, partner, up) = (Idp::start().await, Idp::start().await, Upstream::start().await);
        let body = config_body(&corp, &partner, &up, true, state);
        let gw = Gw::start_with_files(&body, &[("admin.token", ADMIN_TOKEN)]).await;
        Env { gw, corp, partner, up }
    }

    async fn call(&self, path: &str, token: &str) -> (u16, String) {
        self.gw.status(path, Some(token)).await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        admin(&self.gw, method, path, body).await
    }

    /// POSTs `entry` to `/admin/<kind>`, asserts 201 and returns the new id.
    async fn add(&self, kind: &str, entry: Value) -> String {
        add(&self.gw, kind, entry).await
    }

    async fn lift(&self, kind: &str, id: &str) {
        let (status, body) = self.admin("DELETE", &format!("/admin/{kind}/{id}"), None).await;
        assert_eq!(status, 200, "lifting {kind} {id}: {body}");
    }

    async fn metric(&self, sample: &str) -> f64 {
        self.gw.metric(sample).await
    }
}

async fn admin(gw: &Gw, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    gw.admin_call(method, path, Some(ADMIN_TOKEN), body.as_deref()).await
}

async fn add(gw: &Gw, kind: &str, entry: Value) -> String {
    let (status, body) = admin(gw, "POST", &format!("/admin/{kind}"), Some(entry.clone())).await;
    assert_eq!(status, 201, "POST /admin/{kind} {entry}: {body}");
    let id = body["id"].as_str().unwrap_or_else(|| panic!("no id in {body}")).to_string();
    assert!(!id.is_empty());
    id
}

/// The ids listed by `GET /admin/<kind>`.
async fn listed(gw: &Gw, kind: &str) -> Vec<Value> {
    let (status, body) = admin(gw, "GET", &format!("/admin/{kind}"), None).await;
    assert_eq!(status, 200, "GET /admin/{kind}: {body}");
    body[kind].as_array().unwrap_or_else(|| panic!("no `{kind}` array in {body}")).clone()
}

fn find<'a>(entries: &'a [Value], id: &str) -> Option<&'a Value> {
    entries.iter().find(|e| e["id"] == id)
}

/// Polls `check` every 50 ms until it holds or `limit` passes; returns how long it took.
async fn within<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Authentication and where the API lives

/// Every admin endpoint with a method, a path and a body.
fn endpoints() -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", "/admin/revocations".into(), None),
        ("POST", "/admin/revocations".into(), Some(json!({"jti": "some-jti"}))),
        ("DELETE", "/admin/revocations/0011223344556677".into(), None),
        ("GET", "/admin/halts".into(), None),
        ("POST", "/admin/halts".into(), Some(json!({"jurisdiction": "US-CA", "reason": "test"}))),
        ("DELETE", "/admin/halts/0011223344556677".into(), None),
        ("POST", "/admin/reload".into(), None),
    ]
}

#[tokio::test]
async fn every_admin_endpoint_needs_the_admin_token() {
    let e = Env::start().await;
    for (method, path, body) in endpoints() {
        let body = body.map(|b| b.to_string());
        for token in [None, Some("wrong-token-0123456789abcdef"), Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])]
        {
            let (status, reply) = e.gw.admin_call(method, &path, token, body.as_deref()).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {reply}");
        }
        // The right token in another scheme is no bearer token.
        let resp = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("{}{path}", e.gw.admin))
            .header("authorization", format!("Basic {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{method} {path} with Basic");
        let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"admin\""), "{method} {path}");
    }
    // Nothing was stored by the refused POSTs.
    assert!(listed(&e.gw, "revocations").await.is_empty());
    assert!(listed(&e.gw, "halts").await.is_empty());

    // With the right token every endpoint succeeds.
    let rid = e.add("revocations", json!({"jti": "some-jti"})).await;
    let hid = e.add("halts", json!({"jurisdiction": "US-CA", "reason": "test"})).await;
    assert!(find(&listed(&e.gw, "revocations").await, &rid).is_some());
    assert!(find(&listed(&e.gw, "halts").await, &hid).is_some());
    e.lift("revocations", &rid).await;
    e.lift("halts", &hid).await;
    let (status, body) = e.admin("POST", "/admin/reload", None).await;
    assert_eq!((status, body["result"].as_str()), (200, Some("reloaded")), "{body}");

    // The probes and metrics need no token.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, _) = e.gw.admin_call("GET", path, None, None).await;
        assert_eq!(status, 200, "{path}");
    }
}

#[tokio::test]
async fn without_an_admin_token_the_api_is_off() {
    support::install_crypto_provider();
    let (corp, partner, up) = (Idp::start().await, Idp::start().await, Upstream::start().await);
    let gw = Gw::start(&config_body(&corp, &partner, &up, false, "")).await;
    for (method, path, body) in endpoints() {
        let body = body.map(|b| b.to_string());
        for token in [None, Some(ADMIN_TOKEN)] {
            let (status, reply) = gw.admin_call(method, &path, token, body.as_deref()).await;
            assert_eq!(status, 404, "{method} {path}: {reply}");
            let msg = reply["error"].as_str().unwrap_or("");
            assert!(msg.contains("admin API is off"), "{method} {path}: {reply}");
        }
    }
    assert_eq!(gw.admin_call("GET", "/healthz", None, None).await.0, 200);
    assert_eq!(gw.admin_call("GET", "/metrics", None, None).await.0, 200);
    // And nothing was halted by the refused POSTs.
    assert_eq!(gw.status("/usca", Some(&corp.token(regions()))).await, (200, String::new()));
}

#[tokio::test]
async fn the_data_plane_answers_404_for_admin_paths() {
    support::install_crypto_provider();
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    // A catch-all route: even so, /admin/... is never forwarded.
    let body = format!(
        "{ADMIN_SECTION}[[issuers]]\nname = \"corp\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"{}\"\njurisdiction = \"DE\"\nissuers = [\"corp\"]\n",
        idp.issuer(),
        idp.jwks_uri(),
        up.url()
    );
    let gw = Gw::start_with_files(&body, &[("admin.token", ADMIN_TOKEN)]).await;
    let user = idp.token(json!(["DE"]));
    for path in ["/admin/revocations", "/admin/halts", "/admin", "/admin/reload"] {
        for token in [ADMIN_TOKEN, user.as_str()] {
            assert_eq!(gw.get(path, Some(token)).await.status(), 404, "GET {path}");
        }
        let resp = gw
            .client
            .post(format!("{}{path}", gw.base))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(json!({"jurisdiction": "DE", "reason": "x"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "POST {path}");
    }
    assert_eq!(up.hits(), 0, "the upstream never saw an /admin request");
    assert!(listed(&gw, "halts").await.is_empty());
    // The catch-all route itself works.
    assert_eq!(gw.status("/other", Some(&user)).await, (200, String::new()));
    assert_eq!(up.hits(), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Revocations

/// `target` works (used twice, so its verdict is cached), is revoked by `entry`, is refused with
/// `token_revoked` on the cached path; `other` keeps working; listing shows the entry; lifting restores
/// `target`.
async fn revoke_case(e: &Env, entry: Value, target: &str, other: &str) {
    for _ in 0..2 {
        assert_eq!(e.call("/de", target).await, (200, String::new()), "{entry}: before");
    }
    assert_eq!(e.call("/de", other).await, (200, String::new()), "{entry}: other before");
    let id = e.add("revocations", entry.clone()).await;

    let hits = e.metric(&cache("hit")).await;
    let resp = e.gw.get("/de", Some(target)).await;
    assert_eq!(resp.status(), 401, "{entry}");
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "token_revoked", "{entry}: {body}");
    assert_eq!(
        e.metric(&cache("hit")).await,
        hits + 1.0,
        "{entry}: the revoked request was served from the validation cache"
    );
    // Every route, not just the one used before.
    assert_eq!(e.call("/usca", target).await, (401, "token_revoked".into()), "{entry}");
    assert_eq!(e.call("/de", other).await, (200, String::new()), "{entry}: other after");

    let list = listed(&e.gw, "revocations").await;
    let listed_entry = find(&list, &id).unwrap_or_else(|| panic!("{id} not in {list:?}"));
    for (k, v) in entry.as_object().unwrap() {
        if ["jti", "sub", "client_id"].contains(&k.as_str()) {
            assert_eq!(listed_entry["by"], k.as_str(), "{entry}: {listed_entry}");
        }
        if k != "issuer" {
            let field = if ["jti", "sub", "client_id"].contains(&k.as_str()) { "value" } else { k };
            assert_eq!(&listed_entry[field], v, "{entry}: {listed_entry}");
        }
    }

    e.lift("revocations", &id).await;
    assert_eq!(e.call("/de", target).await, (200, String::new()), "{entry}: lifted");
    assert!(find(&listed(&e.gw, "revocations").await, &id).is_none());
    let (status, body) = e.admin("DELETE", &format!("/admin/revocations/{id}"), None).await;
    assert_eq!(status, 404, "lifting twice: {body}");
}

#[tokio::test]
async fn revocation_by_jti_sub_and_client_id() {
    let e = Env::start().await;
    let mk = |sub: &str, client: &str| {
        let mut c = e.corp.claims(regions());
        c["sub"] = sub.into();
        c["client_id"] = client.into();
        (e.corp.rs256(&c), c["jti"].as_str().unwrap().to_string())
    };

    let (target, jti) = mk("alice", "app-1");
    let (other, _) = mk("alice", "app-1");
    revoke_case(&e, json!({"jti": jti, "reason": "leaked"}), &target, &other).await;

    let (target, _) = mk("mallory", "app-1");
    let (other, _) = mk("bob", "app-1");
    revoke_case(&e, json!({"sub": "mallory"}), &target, &other).await;

    let (target, _) = mk("alice", "rogue-app");
    let (other, _) = mk("alice", "app-2");
    revoke_case(&e, json!({"client_id": "rogue-app", "expires_at": 4_000_000_000u64}), &target, &other).await;
}

#[tokio::test]
async fn revocation_scoped_to_an_issuer() {
    let e = Env::start().await;
    let corp = e.corp.token(regions());
    let partner = e.partner.token(regions());
    assert_eq!(e.call("/de", &corp).await, (200, String::new()));
    assert_eq!(e.call("/de", &partner).await, (200, String::new()));

    // By config name: only the partner's "alice".
    let id = e.add("revocations", json!({"sub": "alice", "issuer": "partner"})).await;
    assert_eq!(e.call("/de", &partner).await, (401, "token_revoked".into()));
    assert_eq!(e.call("/de", &corp).await, (200, String::new()));
    e.lift("revocations", &id).await;
    assert_eq!(e.call("/de", &partner).await, (200, String::new()));

    // By `iss` URL: stored as the config name, only the corp's "alice".
    let id = e.add("revocations", json!({"sub": "alice", "issuer": e.corp.issuer()})).await;
    assert_eq!(e.call("/de", &corp).await, (401, "token_revoked".into()));
    assert_eq!(e.call("/de", &partner).await, (200, String::new()));
    let list = listed(&e.gw, "revocations").await;
    assert_eq!(find(&list, &id).unwrap()["issuer"], "corp", "{list:?}");
    e.lift("revocations", &id).await;

    // Unscoped: both.
    let id = e.add("revocations", json!({"sub": "alice"})).await;
    assert_eq!(e.call("/de", &corp).await, (401, "token_revoked".into()));
    assert_eq!(e.call("/de", &partner).await, (401, "token_revoked".into()));
    e.lift("revocations", &id).await;
    assert_eq!(e.call("/de", &corp).await, (200, String::new()));
}

#[tokio::test]
async fn an_expired_revocation_no_longer_applies() {
    let e = Env::start().await;
    let t = e.corp.token(regions());
    let now = residency_gateway::token::now_secs();
    e.add("revocations", json!({"sub": "alice", "expires_at": now - 10})).await;
    assert_eq!(e.call("/de", &t).await, (200, String::new()));
    e.add("revocations", json!({"sub": "alice", "expires_at": now + 600})).await;
    assert_eq!(e.call("/de", &t).await, (401, "token_revoked".into()));
}

#[tokio::test]
async fn bad_admin_requests_are_400_or_404_and_change_nothing() {
    let e = Env::start().await;
    let raw = |method: &'static str, path: &'static str, body: &'static str| {
        let gw = &e.gw;
        async move { gw.admin_call(method, path, Some(ADMIN_TOKEN), Some(body)).await }
    };
    let revocations = [
        r#"{"jti": "a", "sub": "b"}"#,
        r#"{"jti": "a", "sub": "b", "client_id": "c"}"#,
        r#"{"jti": "a", "colour": "red"}"#,
        r#"{not json"#,
        r#""#,
        r#"{}"#,
        r#"[]"#,
        r#""jti""#,
        r#"{"jti": ""}"#,
        r#"{"jti": 5}"#,
        r#"{"jti": "a", "expires_at": "soon"}"#,
        r#"{"jti": "a", "issuer": "nobody"}"#,
        r#"{"jti": "a", "issuer": 7}"#,
    ];
    for body in revocations {
        let (status, reply) = raw("POST", "/admin/revocations", body).await;
        assert_eq!(status, 400, "revocation {body}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|m| !m.is_empty()), "{body}: {reply}");
    }
    let (_, reply) = raw("POST", "/admin/revocations", r#"{"jti": "a", "colour": "red"}"#).await;
    assert!(reply["error"].as_str().unwrap().contains("colour"), "the unknown field is named: {reply}");
    let halts = [
        r#"{"jurisdiction": "US-CA"}"#,
        r#"{"jurisdiction": "US-CA", "reason": "  "}"#,
        r#"{"jurisdiction": "US-CA", "route": "de", "reason": "x"}"#,
        r#"{"jurisdiction": "ZZ", "reason": "x"}"#,
        r#"{"jurisdiction": "not a place", "reason": "x"}"#,
        r#"{"route": "nope", "reason": "x"}"#,
        r#"{"issuer": "nobody", "reason": "x"}"#,
        r#"{"jurisdiction": "DE", "reason": "x", "until": 5}"#,
        r#"{"reason": "x"}"#,
        r#"{not json"#,
    ];
    for body in halts {
        let (status, reply) = raw("POST", "/admin/halts", body).await;
        assert_eq!(status, 400, "halt {body}: {reply}");
    }
    for path in ["/admin/revocations/0011223344556677", "/admin/halts/0011223344556677", "/admin/halts/"] {
        let (status, reply) = e.admin("DELETE", path, None).await;
        assert_eq!(status, 404, "DELETE {path}: {reply}");
    }
    for (method, path) in [("GET", "/admin/nothing"), ("PUT", "/admin/halts"), ("GET", "/admin")] {
        let (status, reply) = e.admin(method, path, None).await;
        assert_eq!(status, 404, "{method} {path}: {reply}");
    }
    assert!(listed(&e.gw, "revocations").await.is_empty());
    assert!(listed(&e.gw, "halts").await.is_empty());
    assert_eq!(e.metric(&admin_actions("revoke", "error")).await, (revocations.len() + 1) as f64);
    assert_eq!(e.metric(&admin_actions("halt", "error")).await, halts.len() as f64);
    assert_eq!(e.metric(&admin_actions("lift_halt", "error")).await, 1.0);
    assert_eq!(e.metric(&admin_actions("lift_revocation", "error")).await, 1.0);
    assert_eq!(e.metric(&admin_actions("revoke", "success")).await, 0.0);
    let t = e.corp.token(regions());
    assert_eq!(e.call("/usca", &t).await, (200, String::new()));
}

// ---------------------------------------------------------------------------------------------------------
// Halts

#[tokio::test]
async fn halting_a_jurisdiction_blocks_that_flow_only() {
    let e = Env::start().await;
    let t = e.corp.token(regions());
    assert_eq!(e.call("/usca", &t).await, (200, String::new()));
    assert_eq!(e.call("/de", &t).await, (200, String::new()));

    let id = e.add("halts", json!({"jurisdiction": "US-CA", "reason": "court order 12/3"})).await;
    let resp = e.gw.get("/usca", Some(&t)).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.contains("error=\"insufficient_scope\""), "{challenge}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (&body["reason"], &body["route"], &body["jurisdiction"]),
        (&json!("flow_halted"), &json!("usca"), &json!("US-CA")),
        "{body}"
    );
    assert_eq!(e.call("/de", &t).await, (200, String::new()), "DE keeps flowing");
    // A fresh token too, not only the cached one.
    assert_eq!(e.call("/usca", &e.partner.token(regions())).await, (403, "flow_halted".into()));
    let blocked = "residency_gateway_transfers_blocked_total{data_class=\"personal\",jurisdiction=\"US-CA\",reason=\"flow_halted\",route=\"usca\"}";
    assert_eq!(e.metric(blocked).await, 2.0);

    let list = listed(&e.gw, "halts").await;
    let h = find(&list, &id).unwrap_or_else(|| panic!("{id} not in {list:?}"));
    assert_eq!(
        (&h["by"], &h["value"], &h["reason"]),
        (&json!("jurisdiction"), &json!("US-CA"), &json!("court order 12/3"))
    );

    e.lift("halts", &id).await;
    assert_eq!(e.call("/usca", &t).await, (200, String::new()));
    let (status, _) = e.admin("DELETE", &format!("/admin/halts/{id}"), None).await;
    assert_eq!(status, 404, "lifting twice");
}

#[tokio::test]
async fn halting_a_country_halts_its_subdivisions_and_aliases_resolve() {
    let e = Env::start().await;
    let t = e.corp.token(regions());
    let id = e.add("halts", json!({"jurisdiction": "US", "reason": "x"})).await;
    assert_eq!(e.call("/usca", &t).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/de", &t).await, (200, String::new()));
    e.lift("halts", &id).await;
    assert_eq!(e.call("/usca", &t).await, (200, String::new()));

    // Written in lower case, stored in the canonical form.
    let id = e.add("halts", json!({"jurisdiction": "us-ca", "reason": "x"})).await;
    assert_eq!(e.call("/usca", &t).await, (403, "flow_halted".into()));
    assert_eq!(find(&listed(&e.gw, "halts").await, &id).unwrap()["value"], "US-CA");
    e.lift("halts", &id).await;

    // A subdivision does not halt its country's other subdivisions, nor other countries.
    let id = e.add("halts", json!({"jurisdiction": "US-NY", "reason": "x"})).await;
    assert_eq!(e.call("/usca", &t).await, (200, String::new()));
    e.lift("halts", &id).await;

    // An alias from the policies is stored as the jurisdiction it stands for.
    let id = e.add("halts", json!({"jurisdiction": "aws:eu-central-1", "reason": "x"})).await;
    assert_eq!(e.call("/de", &t).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/usca", &t).await, (200, String::new()));
    assert_eq!(find(&listed(&e.gw, "halts").await, &id).unwrap()["value"], "DE");
    e.lift("halts", &id).await;
    assert_eq!(e.call("/de", &t).await, (200, String::new()));
}

#[tokio::test]
async fn halting_a_route_or_an_issuer() {
    let e = Env::start().await;
    let corp = e.corp.token(regions());
    let partner = e.partner.token(regions());

    let id = e.add("halts", json!({"route": "usca", "reason": "maintenance"})).await;
    assert_eq!(e.call("/usca", &corp).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/usca", &partner).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/de", &corp).await, (200, String::new()));
    e.lift("halts", &id).await;
    assert_eq!(e.call("/usca", &corp).await, (200, String::new()));

    let id = e.add("halts", json!({"issuer": "partner", "reason": "partner breach"})).await;
    assert_eq!(e.call("/de", &partner).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/usca", &partner).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/de", &corp).await, (200, String::new()));
    e.lift("halts", &id).await;
    assert_eq!(e.call("/de", &partner).await, (200, String::new()));

    // By `iss` URL, stored as the config name.
    let id = e.add("halts", json!({"issuer": e.corp.issuer(), "reason": "x"})).await;
    assert_eq!(e.call("/de", &corp).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/de", &partner).await, (200, String::new()));
    assert_eq!(find(&listed(&e.gw, "halts").await, &id).unwrap()["value"], "corp");
    e.lift("halts", &id).await;
    assert_eq!(e.call("/de", &corp).await, (200, String::new()));
}

#[tokio::test]
async fn a_halt_applies_on_a_monitor_route() {
    let e = Env::start().await;
    let not_allowed = e.corp.token(json!(["DE"]));
    let allowed = e.corp.token(json!(["BR"]));
    // Monitor mode forwards what enforce would block...
    assert_eq!(e.call("/mon", &not_allowed).await, (200, String::new()));
    assert_eq!(e.call("/mon", &allowed).await, (200, String::new()));
    let hits = e.up.hits();

    // ...but a halt is an operator's cut-off, not a policy roll-out: it blocks.
    let id = e.add("halts", json!({"jurisdiction": "BR", "reason": "x"})).await;
    assert_eq!(e.call("/mon", &not_allowed).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/mon", &allowed).await, (403, "flow_halted".into()));
    assert_eq!(e.up.hits(), hits, "nothing reached the upstream");
    e.lift("halts", &id).await;

    let id = e.add("halts", json!({"route": "mon", "reason": "x"})).await;
    assert_eq!(e.call("/mon", &allowed).await, (403, "flow_halted".into()));
    e.lift("halts", &id).await;
    assert_eq!(e.call("/mon", &allowed).await, (200, String::new()));
}

#[tokio::test]
async fn admin_actions_move_metrics_and_write_audit_lines() {
    let e = Env::start().await;
    assert_eq!(e.metric(&state_entries("halts")).await, 0.0);
    assert_eq!(e.metric(&state_entries("revocations")).await, 0.0);
    let h1 = e.add("halts", json!({"jurisdiction": "US-CA", "reason": "x"})).await;
    let h2 = e.add("halts", json!({"route": "de", "reason": "x"})).await;
    let r1 = e.add("revocations", json!({"sub": "mallory"})).await;
    assert_eq!(e.metric(&state_entries("halts")).await, 2.0);
    assert_eq!(e.metric(&state_entries("revocations")).await, 1.0);
    assert_eq!(e.metric(&admin_actions("halt", "success")).await, 2.0);
    assert_eq!(e.metric(&admin_actions("revoke", "success")).await, 1.0);

    e.lift("halts", &h1).await;
    e.lift("revocations", &r1).await;
    assert_eq!(e.metric(&state_entries("halts")).await, 1.0);
    assert_eq!(e.metric(&state_entries("revocations")).await, 0.0);
    assert_eq!(e.metric(&admin_actions("lift_halt", "success")).await, 1.0);
    assert_eq!(e.metric(&admin_actions("lift_revocation", "success")).await, 1.0);
    let (status, _) = e.admin("DELETE", &format!("/admin/halts/{h1}"), None).await;
    assert_eq!(status, 404);
    assert_eq!(e.metric(&admin_actions("lift_halt", "error")).await, 1.0);

    let lines = audit_lines();
    let admin_line = |action: &str, id: &str, result: &str| {
        lines.iter().any(|l| {
            l["decision"] == "admin" && l["action"] == action && l["entry"] == id && l["result"] == result
        })
    };
    for (action, id, result) in [
        ("halt", &h1, "success"),
        ("halt", &h2, "success"),
        ("revoke", &r1, "success"),
        ("lift_halt", &h1, "success"),
        ("lift_revocation", &r1, "success"),
        ("lift_halt", &h1, "error"),
    ] {
        assert!(admin_line(action, id, result), "no audit line for {action} {id} {result}");
    }
    // The admin token never reaches the audit log.
    assert!(!support::audit_text().contains(ADMIN_TOKEN));
}

// ---------------------------------------------------------------------------------------------------------
// File backend

#[tokio::test]
async fn the_file_backend_keeps_state_across_a_restart() {
    let state = "[state]\npath = \"state.json\"\n";
    let e = Env::start_with(state).await;
    let mallory = {
        let mut c = e.corp.claims(regions());
        c["sub"] = "mallory".into();
        e.corp.rs256(&c)
    };
    let alice = e.corp.token(regions());
    let rid = e.add("revocations", json!({"sub": "mallory", "reason": "offboarded"})).await;
    let hid = e.add("halts", json!({"jurisdiction": "US-CA", "reason": "court order"})).await;
    assert_eq!(e.call("/de", &mallory).await, (401, "token_revoked".into()));
    assert_eq!(e.call("/usca", &alice).await, (403, "flow_halted".into()));

    let Env { gw, corp, partner, up } = e;
    let (dir, pki) = gw.stop_keep_dir().await;
    let file = dir.path().join("state.json");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap())
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", file.display()));
    assert_eq!(on_disk["revocations"][0]["id"], rid.as_str(), "{on_disk}");
    assert_eq!(on_disk["revocations"][0]["value"], "mallory", "{on_disk}");
    assert_eq!(on_disk["halts"][0]["id"], hid.as_str(), "{on_disk}");
    assert_eq!(on_disk["halts"][0]["value"], "US-CA", "{on_disk}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.") && n != "state.json")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");

    // A new gateway on the same directory.
    let gw = Gw::start_in(dir, pki, &config_body(&corp, &partner, &up, true, state)).await;
    let e = Env { gw, corp, partner, up };
    assert_eq!(e.metric(&state_entries("revocations")).await, 1.0);
    assert_eq!(e.metric(&state_entries("halts")).await, 1.0);
    assert_eq!(e.call("/de", &mallory).await, (401, "token_revoked".into()));
    assert_eq!(e.call("/usca", &alice).await, (403, "flow_halted".into()));
    assert_eq!(e.call("/de", &alice).await, (200, String::new()));
    assert!(find(&listed(&e.gw, "revocations").await, &rid).is_some());
    assert!(find(&listed(&e.gw, "halts").await, &hid).is_some());

    // Lifting on the new instance rewrites the file.
    e.lift("halts", &hid).await;
    assert_eq!(e.call("/usca", &alice).await, (200, String::new()));
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(on_disk["halts"], json!([]), "{on_disk}");
    assert_eq!(on_disk["revocations"][0]["id"], rid.as_str(), "{on_disk}");
}

#[tokio::test]
async fn a_change_the_file_backend_cannot_write_is_refused_and_not_applied() {
    let e = Env::start_with("[state]\npath = \"sub/state.json\"\n").await;
    let t = e.corp.token(regions());
    // `sub` becomes a file: the state directory cannot be created, so nothing can be written.
    std::fs::write(e.gw.dir.path().join("sub"), "in the way").unwrap();
    let (status, body) = e.admin("POST", "/admin/halts", Some(json!({"route": "de", "reason": "x"}))).await;
    assert_eq!(status, 500, "{body}");
    let (status, body) = e.admin("POST", "/admin/revocations", Some(json!({"sub": "alice"}))).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(e.call("/de", &t).await, (200, String::new()), "a change that was not stored is not enforced");
    assert!(listed(&e.gw, "halts").await.is_empty());
    assert!(listed(&e.gw, "revocations").await.is_empty());
    assert_eq!(e.metric(&admin_actions("halt", "error")).await, 1.0);
    assert_eq!(e.metric(&admin_actions("revoke", "error")).await, 1.0);
    assert_eq!(e.metric(&state_entries("halts")).await, 0.0);
}

#[tokio::test]
async fn a_corrupt_state_file_stops_the_start() {
    support::install_crypto_provider();
    let (corp, partner, up) = (Idp::start().await, Idp::start().await, Upstream::start().await);
    let body = config_body(&corp, &partner, &up, false, "[state]\npath = \"state.json\"\n");

    for corrupt in ["{not json", r#"{"revocations": [], "extra": 1}"#] {
        let pki = std::sync::Arc::new(residency_gateway::dev::Pki::new("test CA").unwrap());
        let dir = prepare_dir(&pki);
        let file = dir.path().join("state.json");
        std::fs::write(&file, corrupt).unwrap();
        match Gw::try_start_in(dir, pki, &body).await {
            Ok(_) => panic!("a gateway started on a corrupt state file ({corrupt})"),
            Err(err) => assert!(err.contains(&file.display().to_string()), "{corrupt}: {err}"),
        }
        // try_start_in dropped the directory: write it again for the binary.
        let pki = residency_gateway::dev::Pki::new("test CA").unwrap();
        let dir = prepare_dir(&pki);
        let file = dir.path().join("state.json");
        std::fs::write(&file, corrupt).unwrap();
        std::fs::write(dir.path().join("gateway.toml"), support::config_text(&body)).unwrap();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_residency-gateway"))
                .args(["run", "-c"])
                .arg(dir.path().join("gateway.toml"))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the binary exits within 10 s")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{corrupt}: {stderr}");
        assert!(stderr.contains(&file.display().to_string()), "{corrupt}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Redis backend

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A throwaway `redis-server` on a loopback port, without persistence. Killed when dropped.
struct Redis {
    child: tokio::process::Child,
    port: u16,
}

impl Redis {
    async fn start() -> Redis {
        Redis::start_on(free_port()).await
    }

    async fn start_on(port: u16) -> Redis {
        if let Err(e) = std::process::Command::new("redis-server").arg("--version").output() {
            panic!(
                "redis-server is needed by the Redis backend tests and could not be run ({e}); \
                 install it (Debian/Ubuntu: apt-get install redis-server)"
            );
        }
        let mut child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ping(port).await {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("redis-server on port {port} exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer PING within 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Redis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt).await.ok().flatten().unwrap_or(false)
}

fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("rgtest-{}-{nanos}", std::process::id())
}

fn redis_state(url: &str, prefix: &str) -> String {
    format!("[state]\nbackend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n")
}

/// Two replicas, A and B, sharing one Redis, with the same issuers and upstream.
struct Pair {
    a: Gw,
    b: Gw,
    idp: Idp,
    prefix: String,
}

impl Pair {
    async fn start(url: &str) -> Pair {
        support::install_crypto_provider();
        let (idp, partner, up) = (Idp::start().await, Idp::start().await, Upstream::start().await);
        let prefix = unique_prefix();
        let body = config_body(&idp, &partner, &up, true, &redis_state(url, &prefix));
        let files = [("admin.token", ADMIN_TOKEN)];
        let (a, b) = (Gw::start_with_files(&body, &files).await, Gw::start_with_files(&body, &files).await);
        Pair { a, b, idp, prefix }
    }
}

/// Polls `gw` until `path` with `token` answers `want`, for at most `limit`.
async fn until_status(
    gw: &Gw,
    path: &str,
    token: &str,
    want: (u16, &str),
    limit: Duration,
) -> Option<Duration> {
    within(limit, || async { gw.status(path, Some(token)).await == (want.0, want.1.to_string()) }).await
}

async fn until_ready(gw: &Gw, want: u16, limit: Duration) -> Option<Duration> {
    within(limit, || async { gw.readyz().await == want }).await
}

// Redis runs with `--save "" --appendonly no`, so a restarted Redis is empty. "State survives a Redis
// outage" therefore means: while Redis is away, each replica keeps enforcing the last set it loaded (and
// refuses changes with 503, and reports not ready); once Redis is back, the replicas reconnect and reload
// what Redis holds, so what matters afterwards is that new entries (through A's API, or written straight
// into Redis) reach B again. Whether B still enforces its pre-outage entries after reloading an empty Redis
// is not asserted: that depends on Redis persistence, which is the operator's choice.
#[tokio::test]
async fn redis_backend_shares_state_between_replicas_and_survives_an_outage() {
    let redis = Redis::start().await;
    let port = redis.port;
    let p = Pair::start(&redis.url()).await;
    assert_eq!(p.a.readyz().await, 200);
    assert_eq!(p.b.readyz().await, 200);
    let t = p.idp.token(regions());
    assert_eq!(p.b.status("/usca", Some(&t)).await, (200, String::new()));

    // A halt through A is enforced by B within a second.
    let id = add(&p.a, "halts", json!({"jurisdiction": "US-CA", "reason": "shared"})).await;
    let took = until_status(&p.b, "/usca", &t, (403, "flow_halted"), Duration::from_secs(1)).await;
    assert!(took.is_some(), "B did not enforce A's halt within 1 s");
    assert!(find(&listed(&p.b, "halts").await, &id).is_some());
    assert_eq!(p.b.status("/de", Some(&t)).await, (200, String::new()));

    // Lifting it on B is seen by A.
    admin(&p.b, "DELETE", &format!("/admin/halts/{id}"), None).await;
    let took = until_status(&p.a, "/usca", &t, (200, ""), Duration::from_secs(1)).await;
    assert!(took.is_some(), "A still enforces the halt B lifted");

    // A revocation through A reaches B as well.
    let mut c = p.idp.claims(regions());
    c["sub"] = "mallory".into();
    let mallory = p.idp.rs256(&c);
    assert_eq!(p.b.status("/de", Some(&mallory)).await, (200, String::new()));
    add(&p.a, "revocations", json!({"sub": "mallory"})).await;
    let took = until_status(&p.b, "/de", &mallory, (401, "token_revoked"), Duration::from_secs(1)).await;
    assert!(took.is_some(), "B did not enforce A's revocation within 1 s");

    // The halt B will have to keep enforcing while Redis is away.
    add(&p.a, "halts", json!({"jurisdiction": "US-CA", "reason": "outage test"})).await;
    assert!(until_status(&p.b, "/usca", &t, (403, "flow_halted"), Duration::from_secs(1)).await.is_some());

    // Redis goes away.
    redis.stop().await;
    let took = until_ready(&p.b, 503, Duration::from_secs(8)).await;
    assert!(took.is_some(), "B's /readyz did not turn 503 within 8 s of Redis stopping");
    eprintln!("B noticed the outage after {took:?}");
    let (status, body) = p.b.admin_call("GET", "/readyz", None, None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(p.b.status("/usca", Some(&t)).await, (403, "flow_halted".into()), "B keeps the halt");
    assert_eq!(p.b.status("/de", Some(&mallory)).await, (401, "token_revoked".into()), "and the revocation");
    assert_eq!(p.b.status("/de", Some(&t)).await, (200, String::new()), "and serves the rest");
    let (status, body) =
        admin(&p.b, "POST", "/admin/halts", Some(json!({"route": "de", "reason": "x"}))).await;
    assert_eq!(status, 503, "a change B cannot store is refused: {body}");
    let (status, body) = admin(&p.b, "POST", "/admin/revocations", Some(json!({"sub": "eve"}))).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(p.b.status("/de", Some(&t)).await, (200, String::new()), "the refused halt was not applied");

    // Redis comes back, empty, on the same port.
    let redis = Redis::start_on(port).await;
    let took = until_ready(&p.b, 200, Duration::from_secs(8)).await;
    assert!(took.is_some(), "B did not reconnect within 8 s");
    eprintln!("B reconnected after {took:?}");
    assert!(until_ready(&p.a, 200, Duration::from_secs(8)).await.is_some(), "A did not reconnect within 8 s");

    // A halt written straight into Redis (as another replica would) and announced reaches B.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let direct = json!({"id": "direct0000000001", "by": "route", "value": "usca", "reason": "direct",
        "created_at": residency_gateway::token::now_secs()});
    redis::cmd("HSET")
        .arg(format!("{}:halts", p.prefix))
        .arg("direct0000000001")
        .arg(direct.to_string())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("PUBLISH")
        .arg(format!("{}:changes", p.prefix))
        .arg("changed")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(
        until_status(&p.b, "/usca", &t, (403, "flow_halted"), Duration::from_secs(1)).await.is_some(),
        "B did not see the halt written into Redis"
    );
    assert!(find(&listed(&p.b, "halts").await, "direct0000000001").is_some());

    // An entry B cannot read (another version's shape) is skipped, not fatal.
    redis::cmd("HSET")
        .arg(format!("{}:halts", p.prefix))
        .arg("garbage")
        .arg("{not json")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("PUBLISH")
        .arg(format!("{}:changes", p.prefix))
        .arg("changed")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.b.readyz().await, 200);
    assert_eq!(p.b.status("/usca", Some(&t)).await, (403, "flow_halted".into()));
    assert_eq!(listed(&p.b, "halts").await.len(), 1);

    // And a halt through A's API after the restart reaches B within a second.
    add(&p.a, "halts", json!({"route": "de", "reason": "after restart"})).await;
    assert!(
        until_status(&p.b, "/de", &t, (403, "flow_halted"), Duration::from_secs(1)).await.is_some(),
        "B did not enforce A's halt after the Redis restart"
    );
    // The entries live under the test's own key prefix.
    let halts: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(format!("{}:halts", p.prefix)).query_async(&mut conn).await.unwrap();
    assert_eq!(halts.len(), 3, "two halts and the unreadable entry: {halts:?}");
    redis.stop().await;
}

#[tokio::test]
async fn a_replica_that_cannot_reach_redis_at_start_fails_closed_until_it_can() {
    support::install_crypto_provider();
    let port = free_port();
    let p = Pair::start(&format!("redis://127.0.0.1:{port}")).await;
    let t = p.idp.token(regions());
    // Nothing is known about revocations or halts: nothing passes.
    assert_eq!(p.b.readyz().await, 503);
    let (status, reason) = p.b.status("/de", Some(&t)).await;
    assert_eq!((status, reason.as_str()), (503, "token_service_unavailable"));
    let (status, body) =
        admin(&p.b, "POST", "/admin/halts", Some(json!({"route": "de", "reason": "x"}))).await;
    assert_eq!(status, 503, "{body}");

    let redis = Redis::start_on(port).await;
    assert!(until_ready(&p.b, 200, Duration::from_secs(8)).await.is_some(), "B did not connect within 8 s");
    assert_eq!(p.b.status("/de", Some(&t)).await, (200, String::new()));
    assert!(until_ready(&p.a, 200, Duration::from_secs(8)).await.is_some());
    add(&p.a, "halts", json!({"route": "de", "reason": "x"})).await;
    assert!(until_status(&p.b, "/de", &t, (403, "flow_halted"), Duration::from_secs(1)).await.is_some());
    redis.stop().await;
}

// ---------------------------------------------------------------------------------------------------------
// State across reloads and under concurrent changes

#[tokio::test]
async fn revocations_and_halts_outlive_a_reload() {
    let e = Env::start().await;
    let t = e.corp.token(regions());
    let mut c = e.corp.claims(regions());
    c["sub"] = "mallory".into();
    let mallory = e.corp.rs256(&c);
    let rid = e.add("revocations", json!({"sub": "mallory"})).await;
    let hid = e.add("halts", json!({"route": "usca", "reason": "x"})).await;
    let (status, body) = e.admin("POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(e.call("/de", &mallory).await, (401, "token_revoked".into()));
    assert_eq!(e.call("/usca", &t).await, (403, "flow_halted".into()));
    assert!(find(&listed(&e.gw, "revocations").await, &rid).is_some());
    assert!(find(&listed(&e.gw, "halts").await, &hid).is_some());
    // The default state file sits next to the config.
    let file = e.gw.dir.path().join("state/gateway-state.json");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(on_disk["halts"][0]["id"], hid.as_str(), "{on_disk}");
}

#[tokio::test]
async fn concurrent_changes_are_all_kept_by_the_file_backend() {
    let e = Env::start().await;
    let posts = (0..20).map(|i| add(&e.gw, "revocations", json!({"sub": format!("user-{i}")})));
    let ids: Vec<String> = futures_util::future::join_all(posts).await;
    let list = listed(&e.gw, "revocations").await;
    for id in &ids {
        assert!(find(&list, id).is_some(), "{id} lost: {list:?}");
    }
    let file = e.gw.dir.path().join("state/gateway-state.json");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(on_disk["revocations"].as_array().unwrap().len(), 20, "{on_disk}");
    assert_eq!(e.metric(&state_entries("revocations")).await, 20.0);
}

#[tokio::test]
async fn concurrent_changes_on_two_redis_replicas_reach_both_within_a_second() {
    let redis = Redis::start().await;
    let p = Pair::start(&redis.url()).await;
    let posts = (0..20).map(|i| {
        let gw = if i % 2 == 0 { &p.a } else { &p.b };
        add(gw, "revocations", json!({"sub": format!("user-{i}")}))
    });
    let ids: Vec<String> = futures_util::future::join_all(posts).await;
    for (name, gw) in [("A", &p.a), ("B", &p.b)] {
        let seen_all = within(Duration::from_secs(1), || async {
            let list = listed(gw, "revocations").await;
            ids.iter().all(|id| find(&list, id).is_some())
        })
        .await;
        let list = listed(gw, "revocations").await;
        let missing: Vec<_> = ids.iter().filter(|id| find(&list, id).is_none()).collect();
        assert!(seen_all.is_some(), "replica {name} misses {missing:?} 1 s after the last change");
    }
    redis.stop().await;
}
