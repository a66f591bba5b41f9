//! Forwarding: allowed requests reach the upstream, streamed, with hop-by-hop headers stripped and
//! X-Forwarded-* set by the gateway.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use residency_gateway::BoxError;
use serde_json::{Value, json};

use crate::support::{self, Gw, Idp, Upstream};

async fn setup() -> (Gw, Idp, Upstream) {
    let idp = Idp::start().await;
    let up = Upstream::start().await;
    let gw = Gw::start(&format!(
        r#"
[[issuers]]
name = "corp"
issuer = "{iss}"
audiences = ["api"]
jwks_uri = "{jwks}"

[[routes]]
name = "orders-de"
path_prefix = "/orders"
upstream = "{up}"
jurisdiction = "DE"
issuers = ["corp"]
"#,
        iss = idp.issuer(),
        jwks = idp.jwks_uri(),
        up = up.url()
    ))
    .await;
    (gw, idp, up)
}

#[tokio::test]
async fn forwards_when_allowed() {
    let (gw, idp, up) = setup().await;
    let token = idp.token(json!(["DE"]));
    let (status, reason) = gw.status("/orders/7?x=1", Some(&token)).await;
    assert_eq!((status, reason.as_str()), (200, ""));
    assert_eq!(up.hits(), 1);
    let seen = up.seen();
    assert_eq!(seen.path_and_query, "/orders/7?x=1");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(seen.header("x-forwarded-host").is_some_and(|h| h.starts_with("localhost")));
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// The gateway core's request handling: refusals before any upstream contact, routing, header hygiene,
// streaming both ways, upstream failures, HTTP/2.

struct Env {
    gw: Gw,
    idp: Idp,
    orders: Upstream,
    api: Upstream,
    api_v2: Upstream,
}

/// Routes: `/orders` (and `/hop`, `/big`, `/slow`) to `orders`, `/api` and `/api/v2` to two more
/// upstreams, `/down` to a closed port. `extra` is appended to the config.
async fn env(extra: &str) -> Env {
    support::ensure_default_crypto_provider();
    let idp = Idp::start().await;
    let (orders, api, api_v2) = (Upstream::start().await, Upstream::start().await, Upstream::start().await);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let route = |name: &str, prefix: &str, up: &str| {
        support::route_toml(name, prefix, up, "DE", &["corp"], "max_body_bytes = 67108864")
    };
    let mut body = support::jwt_issuer_toml("corp", &idp, extra);
    for (name, prefix) in [("orders", "/orders"), ("hop", "/hop"), ("big", "/big"), ("slow", "/slow")] {
        body.push_str(&route(name, prefix, &orders.url()));
    }
    body.push_str(&route("api", "/api", &api.url()));
    body.push_str(&route("api-v2", "/api/v2", &api_v2.url()));
    body.push_str(&route("down", "/down", &format!("http://{closed}")));
    Env { gw: Gw::start(&body).await, idp, orders, api, api_v2 }
}

impl Env {
    fn token(&self) -> String {
        self.idp.token(json!(["DE"]))
    }
}

/// Status, headers and body text of a response.
async fn parts(resp: reqwest::Response) -> (u16, HeaderMap, String) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

fn reason(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default()
}

/// A request body of `chunks` × 64 KiB, streamed frame by frame.
fn streamed_body(chunks: usize) -> residency_gateway::Body {
    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    let frames = (0..chunks).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone())));
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

fn empty_body() -> residency_gateway::Body {
    residency_gateway::full_body(Bytes::new())
}

#[tokio::test]
async fn a_token_in_the_url_is_400_and_never_forwarded() {
    let e = env("").await;
    let token = e.token();
    let secret = "c2VjcmV0LXRva2Vu";
    for (path, header) in [
        (format!("/orders/1?access_token={secret}"), None),
        (format!("/orders/1?a=1&access_token={secret}"), Some(token.as_str())),
        (format!("/orders/1?access%5Ftoken={secret}"), None),
        (format!("/orders/1?ACCESS_TOKEN={secret}"), Some(token.as_str())),
        (format!("/nowhere?access_token={secret}"), None),
    ] {
        let (status, headers, body) = parts(e.gw.get(&path, header).await).await;
        assert_eq!((status, reason(&body).as_str()), (400, "token_in_url"), "{path}: {body}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("error=\"invalid_request\""), "{challenge}");
        assert!(!body.contains(secret) && !challenge.contains(secret), "the token is echoed");
        assert!(!body.contains(&token));
    }
    assert_eq!(e.orders.hits(), 0, "a token in the URL never reaches the upstream");
    assert!(!support::audit_text().contains(secret), "the query string reached the audit log");
    e.gw.shutdown().await;
}

#[tokio::test]
async fn two_authorization_headers_are_400_duplicate_token() {
    let e = env("").await;
    let token = e.token();
    for second in [token.clone(), e.token()] {
        let mut headers = HeaderMap::new();
        headers.append(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        headers.append(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {second}")).unwrap());
        let resp = e.gw.client.get(format!("{}/orders/1", e.gw.base)).headers(headers).send().await.unwrap();
        let (status, headers, body) = parts(resp).await;
        assert_eq!((status, reason(&body).as_str()), (400, "duplicate_token"), "{body}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("error=\"invalid_request\""), "{challenge}");
        assert!(!body.contains(&token) && !challenge.contains(&token));
    }
    assert_eq!(e.orders.hits(), 0);
    e.gw.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_and_forged_forwarding_headers_do_not_reach_the_upstream() {
    let e = env("").await;
    let hostile = |req: reqwest::RequestBuilder| {
        req.header("connection", "x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic dXNlcjpwYXNz")
            .header("proxy-connection", "keep-alive")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-proto", "http")
            .header("forwarded", "for=6.6.6.6;host=evil.example")
            .header("x-end-to-end", "kept")
    };
    // Control: sent straight to the upstream, every one of these headers arrives.
    let direct = hostile(reqwest::Client::new().get(format!("{}/orders/direct", e.orders.url())));
    assert_eq!(direct.send().await.unwrap().status().as_u16(), 200);
    let seen = e.orders.seen();
    for h in ["connection", "x-secret", "keep-alive", "te", "proxy-authorization", "forwarded"] {
        assert!(seen.header(h).is_some(), "the client did not send `{h}`: {:?}", seen.headers);
    }

    let resp = hostile(e.gw.client.get(format!("{}/orders/1", e.gw.base)).bearer_auth(e.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = e.orders.seen();
    for h in
        ["connection", "x-secret", "keep-alive", "te", "proxy-authorization", "proxy-connection", "forwarded"]
    {
        assert_eq!(seen.header(h), None, "the upstream saw `{h}`: {:?}", seen.headers);
    }
    let xff: Vec<&str> =
        seen.headers.iter().filter(|(k, _)| k == "x-forwarded-for").map(|(_, v)| v.as_str()).collect();
    assert_eq!(xff, ["127.0.0.1"], "only the gateway's X-Forwarded-For");
    let port = e.gw.addr().port();
    let xfh = seen.header("x-forwarded-host");
    assert!(xfh == Some("localhost") || xfh == Some(&format!("localhost:{port}")), "{xfh:?}");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    e.gw.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let e = env("").await;
    // Control: straight from the upstream, the hop-by-hop headers are there.
    let direct = reqwest::Client::new().get(format!("{}/hop", e.orders.url())).send().await.unwrap();
    assert!(
        direct.headers().contains_key("x-upstream-secret") && direct.headers().contains_key("keep-alive")
    );
    let resp = e.gw.get("/hop", Some(&e.token())).await;
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers();
    assert_eq!(h.get("x-upstream-kept").map(|v| v.to_str().unwrap()), Some("1"));
    for name in ["x-upstream-secret", "keep-alive"] {
        assert!(h.get(name).is_none(), "the client saw `{name}`: {h:?}");
    }
    let conn: Vec<_> = h.get_all("connection").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert!(conn.iter().all(|v| !v.contains("x-upstream-secret")), "the upstream's Connection: {conn:?}");
    assert_eq!(e.orders.hits(), 2);
    e.gw.shutdown().await;
}

#[tokio::test]
async fn a_64_mib_response_is_streamed_through() {
    let e = env("").await;
    const TOTAL: usize = 64 * 1024 * 1024;
    let mut resp = e.gw.get(&format!("/big?bytes={TOTAL}"), Some(&e.token())).await;
    assert_eq!(resp.status().as_u16(), 200);
    let (mut n, mut chunks) = (0usize, 0usize);
    let read = async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            assert!(chunk.iter().all(|&b| b == b'x'));
            n += chunk.len();
            chunks += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("the body arrived within 30 s");
    assert_eq!(n, TOTAL);
    assert!(chunks > 1, "the body arrived in pieces, not as one buffer");
    e.gw.shutdown().await;
}

#[tokio::test]
async fn a_32_mib_request_body_is_streamed_to_the_upstream() {
    let e = env("").await;
    const CHUNKS: usize = 512;
    let req = Request::post("/orders/upload")
        .header("authorization", format!("Bearer {}", e.token()))
        .header("content-type", "application/octet-stream")
        .body(streamed_body(CHUNKS))
        .unwrap();
    let resp = e.gw.raw_request(req).await;
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["body_len"], CHUNKS * 64 * 1024, "{v}");
    let seen = e.orders.seen();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body_len, CHUNKS * 64 * 1024);
    e.gw.shutdown().await;
}

#[tokio::test]
async fn no_route_is_404_no_route() {
    let e = env("").await;
    for token in [None, Some(e.token())] {
        let (status, headers, body) = parts(e.gw.get("/nothing/here", token.as_deref()).await).await;
        assert_eq!((status, reason(&body).as_str()), (404, "no_route"), "{body}");
        assert_eq!(headers["content-type"], "application/problem+json");
        // A segment boundary: `/ordersX` is not under `/orders`.
        let (status, _, body) = parts(e.gw.get("/ordersX/1", token.as_deref()).await).await;
        assert_eq!((status, reason(&body).as_str()), (404, "no_route"), "{body}");
    }
    assert_eq!(e.orders.hits() + e.api.hits() + e.api_v2.hits(), 0);
    e.gw.shutdown().await;
}

#[tokio::test]
async fn the_longest_prefix_wins() {
    let e = env("").await;
    let token = e.token();
    for (path, want_v2) in [
        ("/api/v2/items", true),
        ("/api/v2", true),
        ("/api/v1/items", false),
        ("/api/v2x", false),
        ("/api", false),
    ] {
        let (v2, api) = (e.api_v2.hits(), e.api.hits());
        let (status, _) = e.gw.status(path, Some(&token)).await;
        assert_eq!(status, 200, "{path}");
        let (dv2, dapi) = (e.api_v2.hits() - v2, e.api.hits() - api);
        assert_eq!((dv2, dapi), if want_v2 { (1, 0) } else { (0, 1) }, "{path}");
    }
    assert_eq!(e.api_v2.seen().path_and_query, "/api/v2");
    e.gw.shutdown().await;
}

#[tokio::test]
async fn dot_segments_and_encoded_slashes_are_400_invalid_path() {
    let e = env("").await;
    let token = e.token();
    for path in
        ["/orders/../admin", "/orders/%2e%2e/admin", "/orders/.%2E/admin", "/orders/./1", "/orders/a%2fb"]
    {
        let req =
            Request::get(path).header("authorization", format!("Bearer {token}")).body(empty_body()).unwrap();
        let resp = e.gw.raw_request(req).await;
        let status = resp.status().as_u16();
        let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert_eq!((status, reason(&body).as_str()), (400, "invalid_path"), "{path}: {body}");
    }
    assert_eq!(e.orders.hits(), 0);
    e.gw.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    let e = env("").await;
    let (status, reason) = e.gw.status("/down/1", Some(&e.token())).await;
    assert_eq!((status, reason.as_str()), (502, "upstream_unreachable"));
    let outcome = "residency_gateway_requests_total{outcome=\"upstream_error\",route=\"down\"}";
    assert_eq!(e.gw.metric(outcome).await, 1.0);
    e.gw.shutdown().await;
}

#[tokio::test]
async fn a_slow_upstream_is_504() {
    let e = env("[upstream]\nresponse_timeout_seconds = 0.5").await;
    let start = Instant::now();
    let (status, reason) = e.gw.status("/slow?ms=3000", Some(&e.token())).await;
    assert_eq!((status, reason.as_str()), (504, "upstream_timeout"));
    assert!(start.elapsed() < Duration::from_millis(2500), "took {:?}", start.elapsed());
    assert_eq!(e.orders.hits(), 1);
    // A fast answer on the same gateway is unaffected.
    let (status, _) = e.gw.status("/slow?ms=0", Some(&e.token())).await;
    assert_eq!(status, 200);
    e.gw.shutdown().await;
}

#[tokio::test]
async fn http2_from_the_client_works() {
    let e = env("").await;
    let client = support::client_h2(&e.gw.pki);
    let token = e.token();
    let resp = client.get(format!("{}/orders/h2?x=1", e.gw.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 200);
    let seen = e.orders.seen();
    assert_eq!(seen.path_and_query, "/orders/h2?x=1");
    assert!(seen.header("x-forwarded-host").is_some_and(|h| h.starts_with("localhost")));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));

    // Refusals speak HTTP/2 too.
    let resp = client.get(format!("{}/orders/1?access_token=x", e.gw.base)).send().await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (status, _, body) = parts(resp).await;
    assert_eq!((status, reason(&body).as_str()), (400, "token_in_url"));
    let resp = client.get(format!("{}/orders/1", e.gw.base)).send().await.unwrap();
    let (status, headers, body) = parts(resp).await;
    assert_eq!((status, reason(&body).as_str()), (401, "missing_token"));
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"residency-gateway\"");
    assert_eq!(e.orders.hits(), 1);

    // A streamed body over HTTP/2 (flow control windows are far smaller than the body).
    const TOTAL: usize = 8 * 1024 * 1024;
    let mut resp =
        client.get(format!("{}/big?bytes={TOTAL}", e.gw.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut n = 0;
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await.unwrap().unwrap()
    {
        n += chunk.len();
    }
    assert_eq!(n, TOTAL);
    e.gw.shutdown().await;
}
