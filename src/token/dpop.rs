//! DPoP proofs (RFC 9449): a per-request JWT signed by the client's key, which the access token names in
//! `cnf.jkt`. A stolen token is useless without that key.

use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::ThumbprintHash;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::jwt::usable_key;
use super::now_secs;

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("the DPoP proof is invalid: {0}")]
    Invalid(&'static str),
    #[error("the DPoP proof was already used")]
    Replay,
}

/// The URL a request was sent to, as a proof's `htu` must name it.
pub struct RequestUrl<'a> {
    pub host: &'a str,
    /// The port the client connected to (443 when it wrote none).
    pub port: u16,
    pub path: &'a str,
}

pub struct DpopVerifier {
    window: Duration,
    algorithms: Vec<Algorithm>,
    algs: String,
    /// Proofs seen within the window, by key thumbprint and `jti`: bounded, entries expire with the window.
    seen: moka::sync::Cache<String, ()>,
}

const MAX_JTI: usize = 256;

impl DpopVerifier {
    pub fn new(window: Duration, algorithms: Vec<Algorithm>, max_entries: u64) -> DpopVerifier {
        let seen = moka::sync::Cache::builder().max_capacity(max_entries).time_to_live(window * 2).build();
        let algs = algorithms.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(" ");
        DpopVerifier { window, algorithms, algs, seen }
    }

    /// Keeps the replay memory of the generation being replaced, so a reload opens no replay window.
    pub fn adopt(&mut self, previous: &DpopVerifier) {
        self.seen = previous.seen.clone();
    }

    /// The `algs` of a `WWW-Authenticate: DPoP` challenge.
    pub fn algs(&self) -> &str {
        &self.algs
    }

    /// Checks `proof` for a request and returns the thumbprint of the key that signed it.
    pub fn verify(
        &self,
        proof: &str,
        method: &str,
        url: &RequestUrl<'_>,
        access_token: &str,
    ) -> Result<String, DpopError> {
        let header = jsonwebtoken::decode_header(proof).map_err(|_| DpopError::Invalid("not a JWT"))?;
        if header.typ.as_deref().is_none_or(|t| !t.eq_ignore_ascii_case("dpop+jwt")) {
            return Err(DpopError::Invalid("typ must be dpop+jwt"));
        }
        if !self.algorithms.contains(&header.alg) {
            return Err(DpopError::Invalid("algorithm not accepted"));
        }
        if header.crit.is_some() {
            return Err(DpopError::Invalid("unsupported critical header"));
        }
        let jwk = header.jwk.as_ref().ok_or(DpopError::Invalid("no jwk in the header"))?;
        // RFC 9449 §4.3: a proof whose key carries private material is refused. The check reads the
        // `jwk` as sent: jsonwebtoken's typed JWK keeps only public members and would hide `d`.
        let jwk_value = sent_jwk(proof).ok_or(DpopError::Invalid("bad jwk"))?;
        if ["d", "p", "q", "dp", "dq", "qi", "oth", "k"].iter().any(|f| jwk_value.get(f).is_some()) {
            return Err(DpopError::Invalid("the jwk holds private key material"));
        }
        // Only key types and curves that verify signatures pass here, which also keeps the thumbprint
        // computation away from curve combinations it cannot handle.
        let key = usable_key(&jwk_value, &[header.alg]).map_err(|_| DpopError::Invalid("unusable jwk"))?;
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(proof, key.decoding(), &validation)
            .map_err(|_| DpopError::Invalid("bad signature"))?
            .claims;

        let jti = claims.get("jti").and_then(Value::as_str).ok_or(DpopError::Invalid("no jti"))?;
        if jti.is_empty() || jti.len() > MAX_JTI {
            return Err(DpopError::Invalid("bad jti"));
        }
        if claims.get("htm").and_then(Value::as_str) != Some(method) {
            return Err(DpopError::Invalid("htm does not match the request method"));
        }
        let htu = claims.get("htu").and_then(Value::as_str).ok_or(DpopError::Invalid("no htu"))?;
        if !htu_matches(htu, url) {
            return Err(DpopError::Invalid("htu does not match the request URL"));
        }
        let iat = claims.get("iat").and_then(Value::as_u64).ok_or(DpopError::Invalid("no iat"))?;
        let now = now_secs();
        let window = self.window.as_secs();
        if iat + window < now || iat > now + window {
            return Err(DpopError::Invalid("iat is outside the accepted window"));
        }
        let ath = claims.get("ath").and_then(Value::as_str).ok_or(DpopError::Invalid("no ath"))?;
        let hash = digest::digest(&digest::SHA256, access_token.as_bytes());
        if ath != URL_SAFE_NO_PAD.encode(hash.as_ref()) {
            return Err(DpopError::Invalid("ath does not match the access token"));
        }

        let jkt = jwk.thumbprint(ThumbprintHash::SHA256).map_err(|_| DpopError::Invalid("unusable jwk"))?;
        let entry = self.seen.entry(format!("{jkt}.{jti}")).or_insert(());
        if !entry.is_fresh() {
            return Err(DpopError::Replay);
        }
        Ok(jkt)
    }
}

/// RFC 9449 §4.3: compare scheme, host and port (default ports implied) and path; ignore query and
/// fragment.
fn htu_matches(htu: &str, url: &RequestUrl<'_>) -> bool {
    let Ok(uri) = htu.parse::<http::Uri>() else { return false };
    let https = uri.scheme_str().is_some_and(|s| s.eq_ignore_ascii_case("https"));
    let port = uri.port_u16().unwrap_or(443);
    let path = if uri.path().is_empty() { "/" } else { uri.path() };
    https
        && uri.host().is_some_and(|h| h.eq_ignore_ascii_case(url.host))
        && port == url.port
        && path == url.path
}

/// The header's `jwk` member as the client sent it.
fn sent_jwk(proof: &str) -> Option<Value> {
    let header = URL_SAFE_NO_PAD.decode(super::jws_header_segment(proof)?).ok()?;
    let mut header: Value = serde_json::from_slice(&header).ok()?;
    Some(header.get_mut("jwk")?.take())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htu_rules() {
        let url = RequestUrl { host: "api.example.com", port: 443, path: "/orders/1" };
        assert!(htu_matches("https://api.example.com/orders/1", &url));
        assert!(htu_matches("HTTPS://API.example.com:443/orders/1?x=1#f", &url));
        assert!(!htu_matches("http://api.example.com/orders/1", &url));
        assert!(!htu_matches("https://api.example.com:8443/orders/1", &url));
        assert!(!htu_matches("https://api.example.com/orders/2", &url));
        assert!(!htu_matches("https://evil.example.com/orders/1", &url));
        assert!(!htu_matches("not a url", &url));
    }
}
