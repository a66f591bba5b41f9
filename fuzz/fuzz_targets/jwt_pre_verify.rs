//! What the gateway does with a token before its signature is checked: `jsonwebtoken::decode_header`
//! (alg, kid, crit), `insecure_decode` of the claims (the `iss` that picks the issuer), and
//! `Principal::from_claims`, which reads the allowed regions, scopes and identifiers from the claims.
//!
//! Input: the token text itself (the seed corpus holds real tokens). The same bytes are also tried as a
//! claims payload, base64url-encoded into a token with a fixed header, so the JSON side is reached
//! without the fuzzer having to find valid base64 first.
#![no_main]

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use residency_gateway::config::{ClaimPath, RegionRules};
use residency_gateway::token::{Method, Principal};
use serde_json::{Map, Value};

fn rules() -> [RegionRules; 3] {
    [
        RegionRules { claim: ClaimPath::new("allowed_regions"), scopes: vec![] },
        RegionRules {
            claim: ClaimPath::new("ext.residency.allowed"),
            scopes: vec![("region:eu".into(), "EEA".into()), ("region:us".into(), "US".into())],
        },
        RegionRules { claim: ClaimPath::new("https://example.com/claims.regions"), scopes: vec![] },
    ]
}

fn check(token: &[u8]) {
    let _ = jsonwebtoken::decode_header(token);
    let Ok(data) = jsonwebtoken::dangerous::insecure_decode::<Map<String, Value>>(token) else {
        return;
    };
    principal(&data.claims);
}

fn principal(claims: &Map<String, Value>) {
    let issuer: Arc<str> = Arc::from("fuzz");
    for rules in rules() {
        let p = Principal::from_claims(&issuer, Method::Jwt, claims, &rules);
        if let Some(regions) = &p.allowed_regions {
            assert!(!regions.is_empty(), "Some(empty) allowed regions must be None");
            for r in regions {
                assert!(!r.is_empty(), "an empty region entry");
                assert!(!r.bytes().any(|b| b.is_ascii_whitespace()), "whitespace in entry {r:?}");
                assert_eq!(*r, r.to_ascii_uppercase(), "entries are upper-cased");
            }
        }
        // Regions granted by scopes only when the scope is there.
        if claims.get("scope").and_then(Value::as_str).is_none() && rules.claim.lookup(claims).is_none() {
            assert!(p.allowed_regions.is_none(), "regions without a claim or a scope");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(data) {
        principal(&claims);
    }
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT","kid":"k1"}"#);
    let token = format!("{header}.{}.c2ln", URL_SAFE_NO_PAD.encode(data));
    check(token.as_bytes());
});
