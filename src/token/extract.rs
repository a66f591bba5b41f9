//! Finds the bearer token: only in one `Authorization: Bearer …` header, never in the URL.

use http::header::AUTHORIZATION;
use http::{HeaderMap, Uri};

use crate::deny::Denial;

/// True when the query string carries an `access_token` parameter (RFC 6750 §2.3), however encoded.
pub fn token_in_query(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k.trim().eq_ignore_ascii_case("access_token"))
    })
}

/// How the token was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Bearer,
    /// RFC 9449: the request also carries a `DPoP` proof header.
    Dpop,
}

/// The token from the request's single `Authorization` header (scheme case-insensitive, RFC 7235).
pub fn bearer(headers: &HeaderMap) -> Result<&str, Denial> {
    credentials(headers).map(|(_, token)| token)
}

/// The scheme and token from the request's single `Authorization` header: `Bearer` or `DPoP`.
pub fn credentials(headers: &HeaderMap) -> Result<(Scheme, &str), Denial> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(Denial::MissingToken)?;
    if values.next().is_some() {
        return Err(Denial::DuplicateToken);
    }
    // On bytes, in one pass over the token: a b64token is visible ASCII, so it is a valid str too.
    let bytes = value.as_bytes();
    let (scheme, mut token) = match bytes.iter().position(|&b| b == b' ') {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[][..]),
    };
    let scheme = if scheme.eq_ignore_ascii_case(b"bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case(b"dpop") {
        Scheme::Dpop
    } else if value.to_str().is_err() {
        return Err(Denial::MalformedToken);
    } else {
        // Another scheme (Basic, …) carries no bearer credentials: RFC 6750 §3.1 treats it as missing.
        return Err(Denial::MissingToken);
    };
    while let [b' ', rest @ ..] = token {
        token = rest;
    }
    match is_b64token(token).then(|| std::str::from_utf8(token)) {
        Some(Ok(t)) => Ok((scheme, t)),
        _ => Err(Denial::MalformedToken),
    }
}

/// The single `DPoP` proof header.
pub fn dpop_proof(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all("dpop").iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

/// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(t: &[u8]) -> bool {
    let mut body = t;
    while let [rest @ .., b'='] = body {
        body = rest;
    }
    // A fold of branch-free range checks rather than `all` over a table: the compiler checks many bytes
    // at a time, and every request's token goes through here.
    !body.is_empty() && body.iter().fold(true, |ok, &b| ok & b64token_char(b))
}

const fn b64token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        | (b == b'-')
        | (b == b'.')
        | (b == b'_')
        | (b == b'~')
        | (b == b'+')
        | (b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_forms() {
        assert_eq!(bearer(&headers(&["Bearer abc.def-ghi"])).unwrap(), "abc.def-ghi");
        assert_eq!(bearer(&headers(&["bearer abc=="])).unwrap(), "abc==");
        assert_eq!(bearer(&headers(&["BEARER   abc"])).unwrap(), "abc");
        assert!(matches!(bearer(&headers(&[])), Err(Denial::MissingToken)));
        assert!(matches!(bearer(&headers(&["Basic dXNlcjpwYXNz"])), Err(Denial::MissingToken)));
        assert!(matches!(bearer(&headers(&["Bearer"])), Err(Denial::MalformedToken)));
        assert!(matches!(bearer(&headers(&["Bearer "])), Err(Denial::MalformedToken)));
        assert!(matches!(bearer(&headers(&["Bearer a b"])), Err(Denial::MalformedToken)));
        assert!(matches!(bearer(&headers(&["Bearer =abc"])), Err(Denial::MalformedToken)));
        assert!(matches!(bearer(&headers(&["Bearer a\"b"])), Err(Denial::MalformedToken)));
        assert!(matches!(bearer(&headers(&["Bearer a", "Bearer b"])), Err(Denial::DuplicateToken)));
        assert!(matches!(bearer(&headers(&["Bearer \tabc"])), Err(Denial::MalformedToken)));
        assert!(matches!(bearer(&headers(&["Bearer abc=x"])), Err(Denial::MalformedToken)));
        assert_eq!(bearer(&headers(&["DPoP a/b+c~d_e-f.g=="])).unwrap(), "a/b+c~d_e-f.g==");
        let obs_text = HeaderValue::from_bytes(b"Bearer abc\xe9").unwrap();
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, obs_text);
        assert!(matches!(bearer(&h), Err(Denial::MalformedToken)));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_bytes(b"B\xe9arer abc").unwrap());
        assert!(matches!(bearer(&h), Err(Denial::MalformedToken)));
    }

    #[test]
    fn every_byte_is_classified_as_rfc_6750_says() {
        for b in 0..=255u8 {
            let allowed = b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
            assert_eq!(is_b64token(&[b]), allowed, "byte {b:#04x}");
            assert_eq!(is_b64token(&[b'a', b, b'a']), allowed, "byte {b:#04x} inside");
        }
        assert!(is_b64token(b"a=="));
        assert!(!is_b64token(b"=="));
    }

    #[test]
    fn query_tokens() {
        let t = |s: &str| token_in_query(&s.parse().unwrap());
        assert!(t("/x?access_token=abc"));
        assert!(t("/x?a=1&access_token="));
        assert!(t("/x?access%5Ftoken=abc"));
        assert!(t("/x?ACCESS_TOKEN=abc"));
        assert!(!t("/x?token=abc"));
        assert!(!t("/x"));
        assert!(!t("/x?my_access_token=abc"));
    }
}
