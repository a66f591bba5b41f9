//! Forwarding: allowed requests reach the upstream, streamed, with hop-by-hop headers stripped and
//! X-Forwarded-* set by the gateway.

mod support;

use serde_json::json;
use support::{Gw, Idp, Upstream};

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
