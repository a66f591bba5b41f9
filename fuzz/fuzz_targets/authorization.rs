//! `Authorization` headers and request URIs as a client sends them: `token::extract::bearer` on a header
//! map holding arbitrary `Authorization` values, and `token_in_query` on an arbitrary URI.
//!
//! Input: lines separated by `\n`. The first line is the URI; every further line is one `Authorization`
//! value (lines `HeaderValue` refuses are skipped, as hyper would have refused them on the wire).
#![no_main]

use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use residency_gateway::deny::Denial;
use residency_gateway::token::extract::{bearer, token_in_query};

fn b64token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let uri_bytes = lines.next().unwrap_or_default();
    if let Ok(uri) = http::Uri::try_from(uri_bytes) {
        let found = token_in_query(&uri);
        // A plain `access_token=` parameter must always be seen, whatever surrounds it.
        if let Some(q) = uri.query()
            && q.split('&')
                .any(|kv| kv.split('=').next().is_some_and(|k| k.eq_ignore_ascii_case("access_token")))
        {
            assert!(found, "token_in_query missed a literal access_token parameter in {uri}");
        }
    }

    let mut headers = HeaderMap::new();
    let mut values = Vec::new();
    for line in lines {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            values.push(line.to_vec());
            headers.append(AUTHORIZATION, v);
        }
    }
    match bearer(&headers) {
        Ok(token) => {
            assert_eq!(values.len(), 1, "a token accepted from {} Authorization headers", values.len());
            assert!(!token.is_empty() && token.bytes().all(b64token_char), "not a b64token: {token:?}");
            assert!(!token.starts_with('='), "a b64token has at least one character before '=': {token:?}");
            let value = String::from_utf8_lossy(&values[0]);
            assert!(value.ends_with(token), "the token is not the end of its header value");
            let scheme = value.split(' ').next().unwrap_or("");
            assert!(scheme.eq_ignore_ascii_case("bearer"), "accepted under scheme {scheme:?}");
        }
        Err(Denial::MissingToken) => {}
        Err(Denial::DuplicateToken) => assert!(values.len() > 1),
        Err(Denial::MalformedToken) => assert_eq!(values.len(), 1),
        Err(other) => panic!("bearer() returned an unexpected denial: {other:?}"),
    }
});
