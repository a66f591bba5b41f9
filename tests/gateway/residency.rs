//! Residency decisions through real requests: the token's allowed regions against the route's
//! jurisdiction (groups, subdivisions, aliases), the 403 body, monitor mode, metrics and audit lines.

use std::collections::HashMap;

use residency_gateway::token::fingerprint;
use serde_json::{Value, json};

use crate::support::{self, Gw, Idp, Upstream, audit_lines, audit_text};

/// Route name -> (path prefix, declared jurisdiction, mode).
const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("de", "/de", "DE", "enforce"),
    ("no", "/no", "NO", "enforce"),
    ("us-ca", "/usca", "US-CA", "enforce"),
    ("us", "/us", "US", "enforce"),
    ("frankfurt", "/alias", "aws:eu-central-1", "enforce"),
    ("mon", "/mon", "DE", "monitor"),
];

struct Env {
    gw: Gw,
    idp: Idp,
    ups: HashMap<&'static str, Upstream>,
}

impl Env {
    async fn start() -> Env {
        support::ensure_default_crypto_provider();
        let idp = Idp::start().await;
        let mut ups = HashMap::new();
        let mut body = format!(
            "[[issuers]]\nname = \"corp\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n\n",
            idp.issuer(),
            idp.jwks_uri()
        );
        for (name, prefix, jurisdiction, mode) in ROUTES {
            let up = Upstream::start().await;
            body.push_str(&format!(
                "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{}\"\n\
                 jurisdiction = \"{jurisdiction}\"\nissuers = [\"corp\"]\nmode = \"{mode}\"\n\n",
                up.url()
            ));
            ups.insert(*name, up);
        }
        Env { gw: Gw::start(&body).await, idp, ups }
    }

    fn hits(&self, route: &str) -> usize {
        self.ups[route].hits()
    }

    /// GET `path` with `token`: status, headers and parsed body (Null when not JSON).
    async fn call(&self, path: &str, token: &str) -> (u16, http::HeaderMap, Value) {
        let resp = self.gw.get(path, Some(token)).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// Asserts the decision for `regions` on `path`: 200 forwarded, or 403 with `reason`.
    async fn expect(&self, path: &str, regions: Value, want: u16, reason: &str) -> String {
        let token = self.idp.token(regions.clone());
        let (status, _, body) = self.call(path, &token).await;
        assert_eq!(
            (status, body["reason"].as_str().unwrap_or("")),
            (want, reason),
            "{regions} on {path}: {body}"
        );
        token
    }

    async fn metric(&self, sample: &str) -> f64 {
        self.gw.metric(sample).await
    }
}

fn blocked(route: &str, jurisdiction: &str, reason: &str) -> String {
    format!(
        "residency_gateway_transfers_blocked_total{{data_class=\"personal\",jurisdiction=\"{jurisdiction}\",reason=\"{reason}\",route=\"{route}\"}}"
    )
}

fn would_block(route: &str, jurisdiction: &str, reason: &str) -> String {
    format!(
        "residency_gateway_transfers_would_block_total{{data_class=\"personal\",jurisdiction=\"{jurisdiction}\",reason=\"{reason}\",route=\"{route}\"}}"
    )
}

fn requests(route: &str, outcome: &str) -> String {
    format!("residency_gateway_requests_total{{outcome=\"{outcome}\",route=\"{route}\"}}")
}

/// The audit line of the request made with `token`; exactly one.
fn audit_for(token: &str) -> Value {
    let fp = fingerprint(token);
    assert_eq!(fp.len(), 16);
    let lines: Vec<Value> =
        audit_lines().into_iter().filter(|l| l["token_fingerprint"] == fp.as_str()).collect();
    assert_eq!(lines.len(), 1, "one audit line per decision: {lines:?}");
    lines.into_iter().next().unwrap()
}

fn assert_no_token_in_audit(tokens: &[String]) {
    let text = audit_text();
    for t in tokens {
        assert!(!text.contains(t.as_str()), "an audit line holds a raw token");
        let signature = t.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "an audit line holds a token's signature");
    }
}

#[tokio::test]
async fn metric_labels_are_rendered_as_expected() {
    let env = Env::start().await;
    env.expect("/de/1", json!(["US"]), 403, "region_not_allowed").await;
    let text = env.gw.metrics().await;
    let line = text
        .lines()
        .find(|l| l.starts_with("residency_gateway_transfers_blocked_total{"))
        .unwrap_or_else(|| panic!("no blocked-transfer sample in:\n{text}"));
    assert_eq!(line, format!("{} 1", blocked("de", "DE", "region_not_allowed")));
    env.gw.shutdown().await;
}

#[tokio::test]
async fn token_allowed_only_us_is_403_on_a_de_route() {
    let env = Env::start().await;
    let sample = blocked("de", "DE", "region_not_allowed");
    let before = env.metric(&sample).await;
    let before_req = env.metric(&requests("de", "blocked")).await;
    let token = env.idp.token(json!(["US"]));
    let (status, headers, body) = env.call("/de/orders?id=7", &token).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let challenge = headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer realm=\"residency-gateway\""), "{challenge}");
    assert!(challenge.contains("error=\"insufficient_scope\""), "{challenge}");
    assert_eq!(body["reason"], "region_not_allowed");
    assert_eq!(body["route"], "de");
    assert_eq!(body["jurisdiction"], "DE");
    assert_eq!(body["status"], 403);
    assert!(body["detail"].as_str().unwrap().contains("DE"), "{body}");
    assert!(!body.to_string().contains(&token));
    assert_eq!(env.hits("de"), 0, "a blocked transfer never reaches the upstream");
    assert_eq!(env.metric(&sample).await, before + 1.0);
    assert_eq!(env.metric(&requests("de", "blocked")).await, before_req + 1.0);

    let line = audit_for(&token);
    assert_eq!(line["decision"], "block", "{line}");
    assert_eq!(line["reason"], "region_not_allowed", "{line}");
    assert_eq!(line["route"], "de", "{line}");
    assert_eq!(line["jurisdiction"], "DE", "{line}");
    assert_eq!(line["path"], "/de/orders", "no query string in the audit path: {line}");
    assert_eq!(line["subject"], "alice", "{line}");
    assert!(!audit_text().contains("id=7"));
    assert_no_token_in_audit(&[token]);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn groups_expand_to_their_members() {
    let env = Env::start().await;
    let mut tokens = vec![
        env.expect("/de/1", json!(["EEA"]), 200, "").await,
        env.expect("/de/1", json!(["EU"]), 200, "").await,
        env.expect("/no/1", json!(["EU"]), 403, "region_not_allowed").await,
        env.expect("/no/1", json!(["EEA"]), 200, "").await,
        env.expect("/de/1", json!(["eea"]), 200, "").await,
        env.expect("/de/1", json!(["US", "EEA"]), 200, "").await,
    ];
    assert_eq!(env.hits("de"), 4);
    assert_eq!(env.hits("no"), 1);

    // The same (now cached) token is decided again for every route.
    let token = env.idp.token(json!(["EEA"]));
    for (path, want) in [("/de/1", 200), ("/usca/1", 403), ("/de/2", 200), ("/us/1", 403)] {
        let (status, _, body) = env.call(path, &token).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    tokens.push(token);
    assert_no_token_in_audit(&tokens);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn a_country_allows_its_subdivisions_but_not_the_reverse() {
    let env = Env::start().await;
    let tokens = vec![
        env.expect("/usca/1", json!(["US"]), 200, "").await,
        env.expect("/usca/1", json!(["US-CA"]), 200, "").await,
        env.expect("/usca/1", json!(["us-ca"]), 200, "").await,
        env.expect("/usca/1", json!(["US-NY"]), 403, "region_not_allowed").await,
        env.expect("/us/1", json!(["US-CA"]), 403, "region_not_allowed").await,
        env.expect("/us/1", json!(["US"]), 200, "").await,
        env.expect("/us/1", json!(["US-STATES"]), 403, "region_not_allowed").await,
        env.expect("/usca/1", json!(["US-STATES"]), 200, "").await,
    ];
    assert_eq!(env.hits("us-ca"), 4);
    assert_eq!(env.hits("us"), 1);
    assert_no_token_in_audit(&tokens);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn a_space_delimited_string_claim_is_a_list() {
    let env = Env::start().await;
    let tokens = vec![
        env.expect("/de/1", json!("FR DE"), 200, "").await,
        env.expect("/de/1", json!("fr  de"), 200, "").await,
        env.expect("/de/1", json!("FR IT"), 403, "region_not_allowed").await,
        env.expect("/no/1", json!("US EEA"), 200, "").await,
    ];
    assert_eq!(env.hits("de"), 2);
    assert_no_token_in_audit(&tokens);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn no_empty_or_mistyped_claim_is_no_residency_claim() {
    let env = Env::start().await;
    let sample = blocked("de", "DE", "no_residency_claim");
    let before = env.metric(&sample).await;
    let cases = [
        Value::Null,
        json!([]),
        json!(42),
        json!(""),
        json!("   "),
        json!([7]),
        json!(["DE", 7]),
        json!({"DE": true}),
        json!(true),
    ];
    let mut tokens = Vec::new();
    for regions in &cases {
        tokens.push(env.expect("/de/1", regions.clone(), 403, "no_residency_claim").await);
    }
    assert_eq!(env.hits("de"), 0);
    assert_eq!(env.metric(&sample).await, before + cases.len() as f64);
    for t in &tokens {
        let line = audit_for(t);
        assert_eq!(line["decision"], "block", "{line}");
        assert_eq!(line["reason"], "no_residency_claim", "{line}");
        assert_eq!(line["route"], "de", "{line}");
    }
    assert_no_token_in_audit(&tokens);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn a_route_declared_by_alias_resolves_to_its_country() {
    let env = Env::start().await;
    let tokens = vec![
        env.expect("/alias/1", json!(["DE"]), 200, "").await,
        env.expect("/alias/1", json!(["EU"]), 200, "").await,
    ];
    let sample = blocked("frankfurt", "DE", "region_not_allowed");
    let before = env.metric(&sample).await;
    let token = env.idp.token(json!(["FR"]));
    let (status, _, body) = env.call("/alias/1", &token).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "region_not_allowed");
    assert_eq!(body["route"], "frankfurt");
    assert_eq!(body["jurisdiction"], "DE", "the alias resolves to DE: {body}");
    assert_eq!(env.metric(&sample).await, before + 1.0);
    assert_eq!(env.hits("frankfurt"), 2);
    let line = audit_for(&token);
    assert_eq!(line["jurisdiction"], "DE", "{line}");
    let mut all = tokens;
    all.push(token);
    assert_no_token_in_audit(&all);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn monitor_mode_forwards_and_counts_what_it_would_block() {
    let env = Env::start().await;
    let would = would_block("mon", "DE", "region_not_allowed");
    let blocked_sample = blocked("mon", "DE", "region_not_allowed");
    let (w0, b0) = (env.metric(&would).await, env.metric(&blocked_sample).await);
    let f0 = env.metric(&requests("mon", "forwarded")).await;

    let token = env.idp.token(json!(["US"]));
    let (status, _, body) = env.call("/mon/orders?x=1", &token).await;
    assert_eq!(status, 200, "monitor mode forwards: {body}");
    assert_eq!(env.hits("mon"), 1, "the upstream is reached");
    assert_eq!(env.metric(&would).await, w0 + 1.0);
    assert_eq!(env.metric(&blocked_sample).await, b0, "nothing was blocked");
    assert_eq!(env.metric(&requests("mon", "forwarded")).await, f0 + 1.0);
    let line = audit_for(&token);
    assert_eq!(line["decision"], "forward", "{line}");
    assert_eq!(line["would_block"], "region_not_allowed", "{line}");
    assert_eq!(line["route"], "mon", "{line}");
    assert_eq!(line["path"], "/mon/orders", "{line}");

    // An allowed token is not counted as a would-be block.
    let ok = env.idp.token(json!(["DE"]));
    let (status, _, _) = env.call("/mon/1", &ok).await;
    assert_eq!(status, 200);
    assert_eq!(env.metric(&would).await, w0 + 1.0);
    let line = audit_for(&ok);
    assert_eq!(line["decision"], "forward", "{line}");
    assert_eq!(line["reason"], "allowed", "{line}");
    assert!(line.get("would_block").is_none_or(Value::is_null), "{line}");

    // No claim at all is counted under its own reason.
    let none = env.idp.token(Value::Null);
    let w_none = would_block("mon", "DE", "no_residency_claim");
    let before = env.metric(&w_none).await;
    let (status, _, _) = env.call("/mon/1", &none).await;
    assert_eq!(status, 200);
    assert_eq!(env.metric(&w_none).await, before + 1.0);
    assert_eq!(env.hits("mon"), 3);

    // Monitor mode relaxes residency only, never authentication.
    let (status, reason) = env.gw.status("/mon/1", None).await;
    assert_eq!((status, reason.as_str()), (401, "missing_token"));
    let mut expired = env.idp.claims(json!(["DE"]));
    expired["exp"] = json!(residency_gateway::token::now_secs() - 120);
    let (status, reason) = env.gw.status("/mon/1", Some(&env.idp.rs256(&expired))).await;
    assert_eq!((status, reason.as_str()), (401, "expired_token"));
    assert_eq!(env.hits("mon"), 3, "an unauthenticated request never reaches a monitor-mode upstream");
    assert_no_token_in_audit(&[token, ok, none]);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn enforce_mode_never_reaches_the_upstream_and_counts_exactly() {
    let env = Env::start().await;
    let sample = blocked("us-ca", "US-CA", "region_not_allowed");
    let before = env.metric(&sample).await;
    let forwarded = requests("us-ca", "forwarded");
    let f0 = env.metric(&forwarded).await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(env.expect("/usca/1", json!(["DE"]), 403, "region_not_allowed").await);
    }
    tokens.push(env.expect("/usca/2", json!(["US"]), 200, "").await);
    assert_eq!(env.hits("us-ca"), 1);
    assert_eq!(env.metric(&sample).await, before + 3.0);
    assert_eq!(env.metric(&forwarded).await, f0 + 1.0);
    // Other routes' counters did not move.
    assert_eq!(env.metric(&blocked("de", "DE", "region_not_allowed")).await, 0.0);
    for t in &tokens[..3] {
        let line = audit_for(t);
        assert_eq!(line["decision"], "block", "{line}");
        assert_eq!(line["route"], "us-ca", "{line}");
        assert_eq!(line["path"], "/usca/1", "{line}");
    }
    assert_eq!(audit_for(&tokens[3])["decision"], "forward");
    assert_no_token_in_audit(&tokens);
    env.gw.shutdown().await;
}

#[tokio::test]
async fn the_regions_claim_name_is_configurable_and_may_be_a_nested_path() {
    support::ensure_default_crypto_provider();
    let (a, b) = (Idp::start().await, Idp::start().await);
    let up = Upstream::start().await;
    let body = format!(
        "[policy]\nregions_claim = \"ext.regions\"\n\n\
         [[issuers]]\nname = \"a\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n\n\
         [[issuers]]\nname = \"b\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n\
         regions_claim = \"https://claims.example.com/regions\"\n\n\
         [[routes]]\nname = \"de\"\npath_prefix = \"/de\"\nupstream = \"{}\"\njurisdiction = \"DE\"\n\
         issuers = [\"a\", \"b\"]\n",
        a.issuer(),
        a.jwks_uri(),
        b.issuer(),
        b.jwks_uri(),
        up.url()
    );
    let gw = Gw::start(&body).await;
    let with = |idp: &Idp, extra: Value| {
        let mut c = idp.claims(Value::Null);
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        idp.rs256(&c)
    };
    let cases = [
        (with(&a, json!({"ext": {"regions": ["DE"]}})), 200, ""),
        (with(&a, json!({"ext": {"regions": "EEA"}})), 200, ""),
        (with(&a, json!({"ext": {"regions": ["US"]}})), 403, "region_not_allowed"),
        // The default claim name no longer counts once another is configured.
        (with(&a, json!({"allowed_regions": ["DE"]})), 403, "no_residency_claim"),
        (with(&a, json!({"ext": ["DE"]})), 403, "no_residency_claim"),
        // Issuer b's own claim name, a URL with dots, read as one literal key.
        (with(&b, json!({"https://claims.example.com/regions": ["DE"]})), 200, ""),
        (with(&b, json!({"ext": {"regions": ["DE"]}})), 403, "no_residency_claim"),
    ];
    let mut tokens = Vec::new();
    for (i, (token, want, reason)) in cases.into_iter().enumerate() {
        let (status, got) = gw.status("/de/1", Some(&token)).await;
        assert_eq!((status, got.as_str()), (want, reason), "case {i}");
        tokens.push(token);
    }
    assert_eq!(up.hits(), 3);
    assert_no_token_in_audit(&tokens);
    gw.shutdown().await;
}
