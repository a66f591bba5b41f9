//! JWT verification with jsonwebtoken against an issuer's JWKS, which is fetched (or read from a file),
//! kept in memory, refreshed on an interval, and refetched once when a token names an unknown `kid`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::sync::Mutex;

use super::{Checked, Method, Principal, TokenError, Unavailable, now_secs};
use crate::config::{IssuerConfig, JwtSettings, KeySource, RegionRules};
use crate::metrics::Metrics;

pub(crate) struct Key {
    decoding: DecodingKey,
    /// The algorithms this key may verify: its own `alg`, or what its type and curve allow.
    algorithms: Vec<Algorithm>,
}

impl Key {
    pub(crate) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }
}

/// One fetched key set.
struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    without_kid: Vec<Arc<Key>>,
    /// Kids present in the set but not usable for signatures (`use: enc`, unknown `kty` or `alg`).
    skipped: HashSet<String>,
    fetched: Instant,
    /// When the next scheduled refresh is due (from `Cache-Control: max-age` within bounds).
    refresh_after: Duration,
}

pub struct JwtVerifier {
    name: Arc<str>,
    source: KeySource,
    settings: JwtSettings,
    /// One validation per allowed algorithm: jsonwebtoken refuses a validation whose algorithms span
    /// several key families, which also keeps an RSA key from ever checking an ES256 header.
    validations: Vec<(Algorithm, Validation)>,
    max_lifetime: Option<u64>,
    leeway: u64,
    regions: RegionRules,
    http: reqwest::Client,
    metrics: Metrics,
    keys: ArcSwapOption<KeySet>,
    /// Held while a fetch runs, so concurrent requests for an unknown kid share one fetch.
    fetch_lock: Mutex<Option<Instant>>,
    /// Failed fetches in a row: the scheduled refresh backs off instead of retrying at once.
    failures: AtomicU32,
    last_header: ArcSwapOption<SeenHeader>,
}

/// A JWS header that parsed and has no `crit`, with its encoding.
struct SeenHeader {
    encoded: Box<str>,
    alg: Algorithm,
    kid: Option<String>,
}

impl JwtVerifier {
    pub fn new(
        ic: &IssuerConfig,
        s: &JwtSettings,
        name: Arc<str>,
        regions: RegionRules,
        http: reqwest::Client,
        metrics: Metrics,
    ) -> Result<JwtVerifier, String> {
        let source = s.keys.clone().ok_or_else(|| format!("issuer {}: no JWKS source", ic.name))?;
        let validations = s
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.set_issuer(&[&ic.issuer]);
                v.set_audience(&ic.audiences);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                v.validate_nbf = true;
                v.leeway = ic.leeway;
                (alg, v)
            })
            .collect();
        Ok(JwtVerifier {
            name,
            source,
            settings: s.clone(),
            validations,
            max_lifetime: ic.max_token_lifetime,
            leeway: ic.leeway,
            regions,
            http,
            metrics,
            keys: ArcSwapOption::empty(),
            fetch_lock: Mutex::new(None),
            failures: AtomicU32::new(0),
            last_header: ArcSwapOption::empty(),
        })
    }

    /// True while the key set is fresh enough to verify with.
    pub fn has_keys(&self) -> bool {
        self.current_keys().is_some()
    }

    /// Takes over `previous`'s key set when both read the same source, so a reload during an outage
    /// keeps the last good keys.
    pub fn adopt_keys(&self, previous: &JwtVerifier) {
        if self.source == previous.source {
            self.keys.store(previous.keys.load_full());
        }
    }

    /// Fetches the key set. On failure the last good set stays in place; an error is never stored.
    pub async fn refresh(&self) -> Result<(), Unavailable> {
        let mut last = self.fetch_lock.lock().await;
        *last = Some(Instant::now());
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> Result<(), Unavailable> {
        let start = Instant::now();
        let fetched = self.fetch().await;
        self.metrics
            .token_service_duration
            .with_label_values(&[&self.name, "jwks"])
            .observe(start.elapsed().as_secs_f64());
        let label = if fetched.is_ok() { "success" } else { "error" };
        self.metrics.jwks_refreshes.with_label_values(&[&self.name, label]).inc();
        match fetched {
            Ok(set) => {
                self.keys.store(Some(Arc::new(set)));
                self.failures.store(0, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(issuer = %self.name, error = %e, "JWKS refresh failed; keeping the last good keys");
                Err(Unavailable)
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let (body, max_age) = match &self.source {
            KeySource::File(path) => {
                let text =
                    tokio::fs::read_to_string(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
                (text, None)
            }
            KeySource::Uri(uri) => {
                let resp = self.http.get(uri).send().await.map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("HTTP {}", resp.status()));
                }
                let max_age = resp
                    .headers()
                    .get(http::header::CACHE_CONTROL)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_max_age);
                (resp.text().await.map_err(|e| e.to_string())?, max_age)
            }
        };
        let refresh_after = max_age
            .map(|a| Duration::from_secs(a).clamp(self.settings.min_refresh, self.settings.refresh))
            .unwrap_or(self.settings.refresh);
        self.parse_set(&body, refresh_after)
    }

    fn parse_set(&self, body: &str, refresh_after: Duration) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let raw: RawSet = serde_json::from_str(body).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut set = KeySet {
            by_kid: HashMap::new(),
            without_kid: Vec::new(),
            skipped: HashSet::new(),
            fetched: Instant::now(),
            refresh_after,
        };
        for value in raw.keys {
            let kid = value.get("kid").and_then(Value::as_str).map(str::to_string);
            let usable = usable_key(&value, &self.settings.algorithms);
            if let Ok(key) = &usable {
                super::crypto::keep(&key.decoding, &key.algorithms);
            }
            match usable {
                Ok(key) => match kid {
                    Some(k) => {
                        set.by_kid.insert(k, Arc::new(key));
                    }
                    None => set.without_kid.push(Arc::new(key)),
                },
                Err(reason) => {
                    self.metrics.jwks_keys_skipped.with_label_values(&[&self.name, reason]).inc();
                    if let Some(k) = kid {
                        set.skipped.insert(k);
                    }
                }
            }
        }
        Ok(set)
    }

    /// When the scheduled refresh is next due.
    /// After failures: `jwks_min_refresh_seconds`, doubling per failure up to the refresh interval.
    pub fn next_refresh(&self) -> Duration {
        let failures = self.failures.load(Ordering::Relaxed);
        if failures > 0 {
            return (self.settings.min_refresh * 2u32.pow(failures.min(16) - 1)).min(self.settings.refresh);
        }
        match self.keys.load().as_ref() {
            Some(set) => set.refresh_after.saturating_sub(set.fetched.elapsed()),
            None => self.settings.min_refresh,
        }
    }

    /// Refetches for an unknown kid, at most once per `jwks_min_refresh_seconds`; requests that arrive
    /// while a fetch runs wait for it instead of starting their own.
    /// A fetch that was due and failed is `Unavailable`: the key may exist, so the token is not
    /// judged invalid (and nothing is cached).
    async fn refetch_for_unknown_kid(&self) -> Result<(), Unavailable> {
        let mut last = self.fetch_lock.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.settings.min_refresh) {
            return Ok(());
        }
        *last = Some(Instant::now());
        self.fetch_locked().await
    }

    fn find_key(&self, set: &KeySet, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Key>> {
        match kid {
            Some(k) => set.by_kid.get(k).cloned(),
            None => {
                // Without a kid the choice is only safe when exactly one key fits the algorithm.
                let mut fitting =
                    set.by_kid.values().chain(&set.without_kid).filter(|k| k.algorithms.contains(&alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Some(k.clone()),
                    _ => None,
                }
            }
        }
    }

    /// The `alg` and `kid` of `token`'s header. An issuer signs every token with the same few header
    /// bytes, so the last header parsed is remembered by its exact encoding and not parsed again.
    fn header(&self, token: &str) -> Result<Arc<SeenHeader>, TokenError> {
        let encoded = super::jws_header_segment(token);
        if let (Some(encoded), Some(seen)) = (encoded, self.last_header.load_full())
            && *seen.encoded == *encoded
        {
            return Ok(seen);
        }
        let encoded = encoded.unwrap_or("");
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        // RFC 7515 §4.1.11: an extension marked critical must be understood, and none is here.
        if header.crit.is_some() {
            return Err(TokenError::Malformed);
        }
        let seen = Arc::new(SeenHeader { encoded: encoded.into(), alg: header.alg, kid: header.kid });
        self.last_header.store(Some(seen.clone()));
        Ok(seen)
    }

    pub async fn verify(&self, token: &str) -> Checked {
        let header = match self.header(token) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Ok(Err(TokenError::Algorithm));
        };
        let kid = header.kid.as_deref();
        let mut set = match self.current_keys() {
            Some(s) => s,
            None => {
                self.refetch_for_unknown_kid().await?;
                self.current_keys().ok_or(Unavailable)?
            }
        };
        if kid.is_some_and(|k| set.skipped.contains(k)) {
            return Ok(Err(TokenError::UnknownKey));
        }
        let mut key = self.find_key(&set, kid, header.alg);
        if key.is_none() && kid.is_some() {
            self.refetch_for_unknown_kid().await?;
            set = self.current_keys().ok_or(Unavailable)?;
            key = self.find_key(&set, kid, header.alg);
        }
        let Some(key) = key else {
            return Ok(Err(TokenError::UnknownKey));
        };
        if !key.algorithms.contains(&header.alg) {
            return Ok(Err(TokenError::Algorithm));
        }
        let claims = match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, validation) {
            Ok(data) => data.claims,
            Err(e) => return Ok(Err(map_error(e.kind()))),
        };
        if let Some(max) = self.max_lifetime {
            let (Some(exp), Some(iat)) =
                (claims.get("exp").and_then(Value::as_u64), claims.get("iat").and_then(Value::as_u64))
            else {
                return Ok(Err(TokenError::MissingClaim("iat")));
            };
            if iat > now_secs() + self.leeway {
                return Ok(Err(TokenError::NotYetValid));
            }
            if exp.saturating_sub(iat) > max {
                return Ok(Err(TokenError::LifetimeTooLong));
            }
        }
        Ok(Ok(Arc::new(Principal::from_claims(&self.name, Method::Jwt, &claims, &self.regions))))
    }

    /// The key set, unless it is older than the refresh interval plus `jwks_max_stale_seconds`: past that,
    /// failing closed is safer than trusting keys the issuer may have withdrawn.
    fn current_keys(&self) -> Option<Arc<KeySet>> {
        let set = self.keys.load_full()?;
        (set.fetched.elapsed() <= set.refresh_after + self.settings.max_stale).then_some(set)
    }
}

fn map_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::UnknownIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::Algorithm
        }
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(match c.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            _ => "unknown",
        }),
        _ => TokenError::Malformed,
    }
}

/// A JWK fit for verifying signatures with one of `allowed`, or the bounded reason it is skipped.
pub(crate) fn usable_key(value: &Value, allowed: &[Algorithm]) -> Result<Key, &'static str> {
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|_| "unsupported")?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))) {
        return Err("not_for_signing");
    }
    let declared = match &jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(signing_alg(a).ok_or("unsupported_alg")?),
    };
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported_curve"),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        AlgorithmParameters::OctetKeyPair(_) => return Err("unsupported_curve"),
        // A shared secret in a public key set is never used: it would let anyone holding the set sign.
        AlgorithmParameters::OctetKey(_) => return Err("symmetric"),
        // A key type jsonwebtoken does not know (`Other`) or a later one.
        _ => return Err("unsupported"),
    };
    let algorithms: Vec<Algorithm> = match declared {
        Some(a) if by_type.contains(&a) => vec![a],
        Some(_) => return Err("alg_mismatch"),
        None => by_type,
    }
    .into_iter()
    .filter(|a| allowed.contains(a))
    .collect();
    if algorithms.is_empty() {
        return Err("alg_not_allowed");
    }
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|_| "invalid_key")?;
    Ok(Key { decoding, algorithms })
}

fn signing_alg(a: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn parse_max_age(cache_control: &str) -> Option<u64> {
    cache_control.split(',').find_map(|d| {
        let (k, v) = d.trim().split_once('=')?;
        k.eq_ignore_ascii_case("max-age").then(|| v.trim().trim_matches('"').parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn max_age() {
        assert_eq!(parse_max_age("public, max-age=600"), Some(600));
        assert_eq!(parse_max_age("Max-Age=\"30\""), Some(30));
        assert_eq!(parse_max_age("no-cache"), None);
        assert_eq!(parse_max_age("max-age=x"), None);
    }

    #[test]
    fn key_filtering() {
        let all = [Algorithm::RS256, Algorithm::ES256];
        // P-256 point from RFC 7515 A.3.
        let ec = json!({"kty": "EC", "crv": "P-256", "kid": "e",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
        assert_eq!(usable_key(&ec, &all).unwrap().algorithms, vec![Algorithm::ES256], "alg from the curve");
        let mut enc = ec.clone();
        enc["use"] = json!("enc");
        assert_eq!(usable_key(&enc, &all).err(), Some("not_for_signing"));
        let mut wrong = ec.clone();
        wrong["alg"] = json!("RS256");
        assert_eq!(usable_key(&wrong, &all).err(), Some("alg_mismatch"));
        assert_eq!(usable_key(&ec, &[Algorithm::RS256]).err(), Some("alg_not_allowed"));
        assert_eq!(usable_key(&json!({"kty": "oct", "k": "c2VjcmV0"}), &all).err(), Some("symmetric"));
        assert_eq!(usable_key(&json!({"kty": "XYZ", "kid": "q"}), &all).err(), Some("unsupported"));
        let mut odd_alg = ec.clone();
        odd_alg["alg"] = json!("RSA-OAEP");
        assert_eq!(usable_key(&odd_alg, &all).err(), Some("unsupported_alg"));
    }
}
