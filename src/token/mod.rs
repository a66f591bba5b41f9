//! Bearer tokens: extraction, JWT verification against JWKS, RFC 7662 introspection, and the one
//! validation cache both paths share.

pub mod crypto;
pub mod dpop;
pub mod extract;
pub mod introspect;
pub mod jwt;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use moka::Expiry;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{CacheConfig, Config, IssuerConfig, RegionRules, RouteConfig};
use crate::metrics::Metrics;
use crate::policy::{AllowedRegions, regions_from_claim};
use prometheus::IntCounter;

/// Why a token was not accepted. Every variant is a 401; the description never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted on this route")]
    UnknownIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token's signing algorithm is not accepted")]
    Algorithm,
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token's lifetime exceeds what the issuer is allowed")]
    LifetimeTooLong,
    #[error("the token is missing the required claim {0}")]
    MissingClaim(&'static str),
    #[error("the token is malformed")]
    Malformed,
    #[error("the token is not active")]
    Inactive,
    #[error("the token has been revoked")]
    Revoked,
}

impl TokenError {
    pub fn reason(&self) -> crate::deny::Reason {
        use crate::deny::Reason;
        match self {
            TokenError::Expired => Reason::ExpiredToken,
            TokenError::Revoked => Reason::TokenRevoked,
            TokenError::NotYetValid
            | TokenError::UnknownIssuer
            | TokenError::WrongAudience
            | TokenError::Algorithm
            | TokenError::UnknownKey
            | TokenError::BadSignature
            | TokenError::LifetimeTooLong
            | TokenError::MissingClaim(_)
            | TokenError::Malformed
            | TokenError::Inactive => Reason::InvalidToken,
        }
    }

    /// The `error_description` text: static words, safe in a quoted header value.
    pub fn description(&self) -> &'static str {
        match self {
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::UnknownIssuer => "the token's issuer is not accepted on this route",
            TokenError::WrongAudience => "the token's audience is not accepted",
            TokenError::Algorithm => "the token's signing algorithm is not accepted",
            TokenError::UnknownKey => "the token was signed with an unknown key",
            TokenError::BadSignature => "the token's signature is invalid",
            TokenError::LifetimeTooLong => "the token's lifetime exceeds the maximum",
            TokenError::MissingClaim(_) => "the token is missing a required claim",
            TokenError::Malformed => "the token is malformed",
            TokenError::Inactive => "the token is not active",
            TokenError::Revoked => "the token has been revoked",
        }
    }
}

/// The token service (JWKS or introspection endpoint) could not give an answer. Never cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("token service unavailable")]
pub struct Unavailable;

/// The outcome of checking one token: a verdict (cached), or no verdict at all.
pub type Checked = Result<Result<Arc<Principal>, TokenError>, Unavailable>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Jwt = 0,
    Introspection = 1,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Jwt => "jwt",
            Method::Introspection => "introspection",
        }
    }
}

/// Who is calling, as established by a validated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The config name of the issuer that validated the token.
    pub issuer: Arc<str>,
    pub method: Method,
    pub sub: Option<String>,
    pub client_id: Option<String>,
    pub jti: Option<String>,
    pub scopes: Vec<String>,
    pub allowed_regions: AllowedRegions,
    pub exp: Option<u64>,
    pub cnf: Option<Value>,
}

impl Principal {
    /// Builds a principal from validated claims (a JWT's payload or an introspection response).
    pub fn from_claims(
        issuer: &Arc<str>,
        method: Method,
        claims: &Map<String, Value>,
        rules: &RegionRules,
    ) -> Self {
        let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
        let scopes: Vec<String> = claims
            .get("scope")
            .and_then(Value::as_str)
            .map(|sc| sc.split_ascii_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut allowed_regions = regions_from_claim(rules.claim.lookup(claims));
        for (scope, region) in &rules.scopes {
            if scopes.iter().any(|s| s == scope) {
                allowed_regions.get_or_insert_with(Vec::new).push(region.clone());
            }
        }
        Principal {
            issuer: issuer.clone(),
            method,
            sub: s("sub"),
            client_id: s("client_id").or_else(|| s("azp")),
            jti: s("jti"),
            scopes,
            allowed_regions,
            exp: claims.get("exp").and_then(Value::as_u64),
            cnf: claims.get("cnf").cloned(),
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A token as presented, hashed once: the audit fingerprint and the cache key both come from its SHA-256.
pub struct Presented<'a> {
    pub raw: &'a str,
    sha256: [u8; 32],
}

impl<'a> Presented<'a> {
    pub fn new(raw: &'a str) -> Self {
        Presented { raw, sha256: sha256(&[raw.as_bytes()]) }
    }

    /// Hex of the first 8 bytes of SHA-256(token): lets an audit line be matched to a token without
    /// holding it.
    pub fn fingerprint(&self) -> Fingerprint {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 16];
        for (i, b) in self.sha256[..8].iter().enumerate() {
            hex[2 * i] = HEX[usize::from(b >> 4)];
            hex[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        Fingerprint(hex)
    }

    /// The method is part of the key: a route that introspects JWTs must not be served a local verdict.
    fn cache_key(&self, issuer: &str, method: Method) -> [u8; 32] {
        sha256(&[issuer.as_bytes(), &[0], method.as_str().as_bytes(), &[0], &self.sha256])
    }
}

/// A compact JWS's header segment, cut exactly as jsonwebtoken cuts it: before the second-to-last dot.
pub(crate) fn jws_header_segment(token: &str) -> Option<&str> {
    let (message, _) = token.rsplit_once('.')?;
    Some(message.rsplit_once('.')?.0)
}

/// SHA-256 of `parts`, one after the other.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A token fingerprint: 16 lowercase hex digits, held inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        // Only hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("????????????????")
    }
}

/// The audit fingerprint of `token` (see [`Presented::fingerprint`]).
pub fn fingerprint(token: &str) -> String {
    Presented::new(token).fingerprint().as_str().to_string()
}

/// One configured issuer, with the checkers it has.
pub struct Issuer {
    pub config: IssuerConfig,
    pub name: Arc<str>,
    pub jwt: Option<jwt::JwtVerifier>,
    pub introspection: Option<introspect::Introspector>,
    /// `token_validations_total` for this issuer, resolved at load: by method (JWT, introspection),
    /// then by result (valid, invalid, unavailable).
    validations: [[IntCounter; 3]; 2],
}

#[derive(Clone)]
struct CacheEntry {
    result: Result<Arc<Principal>, TokenError>,
    ttl: Duration,
}

struct EntryTtl;

impl Expiry<[u8; 32], CacheEntry> for EntryTtl {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        value: &CacheEntry,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    /// Two requests that both store a verdict: the later one's lifetime applies, not the earlier one's.
    fn expire_after_update(
        &self,
        _: &[u8; 32],
        value: &CacheEntry,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Every issuer plus the validation cache.
pub struct Verifier {
    issuers: HashMap<String, Arc<Issuer>>,
    cache: moka::future::Cache<[u8; 32], CacheEntry>,
    cache_cfg: CacheConfig,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    doorkeeper: Doorkeeper,
}

#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
}

impl Verifier {
    pub async fn new(config: &Config, metrics: &Metrics) -> Result<Verifier, String> {
        crypto::install();
        let mut issuers = HashMap::new();
        for ic in &config.issuers {
            let issuer = build_issuer(ic, config, metrics).await?;
            issuers.insert(ic.name.clone(), Arc::new(issuer));
        }
        let cache = moka::future::Cache::builder()
            .max_capacity(config.cache.max_entries)
            .expire_after(EntryTtl)
            .build();
        let cache_counter = |result| metrics.token_cache.with_label_values(&["validation", result]);
        Ok(Verifier {
            issuers,
            cache,
            cache_cfg: config.cache.clone(),
            cache_hits: cache_counter("hit"),
            cache_misses: cache_counter("miss"),
            doorkeeper: Doorkeeper::new(config.cache.max_entries),
        })
    }

    pub fn issuer(&self, name: &str) -> Option<&Arc<Issuer>> {
        self.issuers.get(name)
    }

    pub fn issuers(&self) -> impl Iterator<Item = &Arc<Issuer>> {
        self.issuers.values()
    }

    /// True once every JWT issuer has a key set.
    pub fn ready(&self) -> bool {
        self.issuers.values().all(|i| i.jwt.as_ref().is_none_or(|j| j.has_keys()))
    }

    /// Chooses the issuer and method for `token` on `route`: a JWT whose `iss` names one of the route's JWT
    /// issuers is verified locally (unless the route introspects JWTs); anything else goes to the route's
    /// introspection issuer.
    fn select(&self, route: &RouteConfig, token: &str) -> Result<(&Arc<Issuer>, Method), TokenError> {
        let route_issuers = || route.issuers.iter().filter_map(|n| self.issuers.get(n));
        // One JWT issuer and nothing to introspect with: no choice to make, so the claims are not decoded
        // twice (verification checks `iss` anyway). This is the common route and the hot path.
        if !route.introspect_jwts && route_issuers().all(|i| i.introspection.is_none()) {
            let mut jwt = route_issuers().filter(|i| i.jwt.is_some());
            if let (Some(only), None) = (jwt.next(), jwt.next()) {
                return Ok((only, Method::Jwt));
            }
        }
        let iss = jsonwebtoken::dangerous::insecure_decode::<Peek>(token).ok().and_then(|d| d.claims.iss);
        if let Some(iss) = &iss {
            if !route.introspect_jwts
                && let Some(i) = route_issuers().find(|i| i.jwt.is_some() && i.config.issuer == *iss)
            {
                return Ok((i, Method::Jwt));
            }
            if let Some(i) = route_issuers().find(|i| i.introspection.is_some() && i.config.issuer == *iss) {
                return Ok((i, Method::Introspection));
            }
        }
        match route_issuers().find(|i| i.introspection.is_some()) {
            Some(i) => Ok((i, Method::Introspection)),
            None if iss.is_some() => Err(TokenError::UnknownIssuer),
            None => Err(TokenError::Malformed),
        }
    }

    /// Validates `token` for `route`, through the cache. Residency is not decided here: the caller decides
    /// it on every request, cached or not.
    ///
    /// Introspection verdicts are cached at once, and concurrent requests with the same new token share
    /// one call. A JWT verdict costs only local CPU, so it is cached the second time its token is seen
    /// (see [`Doorkeeper`]): a token used once never enters the cache nor pushes another out.
    pub async fn check(&self, route: &RouteConfig, presented: &Presented<'_>) -> Checked {
        let token = presented.raw;
        let (issuer, method) = match self.select(route, token) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let key = presented.cache_key(&issuer.name, method);
        let entry = match method {
            Method::Jwt => match self.cache.get(&key).await {
                Some(entry) => {
                    self.cache_hits.inc();
                    entry
                }
                None => {
                    let entry = self.validate(issuer, method, token).await?;
                    self.cache_misses.inc();
                    // A refusal that came before any signature work is as cheap to repeat as to look up;
                    // keeping it out of the filter too means junk cannot wear the filter out.
                    let cheap = matches!(
                        entry.result,
                        Err(TokenError::Malformed | TokenError::Algorithm | TokenError::UnknownKey)
                    );
                    if !cheap && self.doorkeeper.seen_before(&key) {
                        self.cache.insert(key, entry.clone()).await;
                    }
                    entry
                }
            },
            Method::Introspection => {
                let entry =
                    self.cache.entry(key).or_try_insert_with(self.validate(issuer, method, token)).await;
                let entry = entry.map_err(|_| Unavailable)?;
                if entry.is_fresh() { &self.cache_misses } else { &self.cache_hits }.inc();
                entry.into_value()
            }
        };
        let result = entry.result;
        // A cached verdict is only as good as the token's own expiry.
        if let Ok(p) = &result
            && p.exp.is_some_and(|e| e + issuer.config.leeway <= now_secs())
        {
            return Ok(Err(TokenError::Expired));
        }
        Ok(result)
    }

    /// One check by the issuer's own method, counted; the verdict with how long it may be cached.
    async fn validate(
        &self,
        issuer: &Issuer,
        method: Method,
        token: &str,
    ) -> Result<CacheEntry, Unavailable> {
        let result = match (method, &issuer.jwt, &issuer.introspection) {
            (Method::Jwt, Some(j), _) => j.verify(token).await,
            (Method::Introspection, _, Some(i)) => i.introspect(token).await,
            _ => Ok(Err(TokenError::UnknownIssuer)),
        };
        let by_result = match &result {
            Ok(Ok(_)) => 0,
            Ok(Err(_)) => 1,
            Err(_) => 2,
        };
        issuer.validations[method as usize][by_result].inc();
        let result = result?;
        let ttl = match &result {
            Ok(p) => {
                let until_exp = p.exp.map_or(self.cache_cfg.max_ttl, |e| {
                    Duration::from_secs((e + issuer.config.leeway).saturating_sub(now_secs()))
                });
                until_exp.min(self.cache_cfg.max_ttl)
            }
            Err(_) => self.cache_cfg.negative_ttl,
        };
        Ok(CacheEntry { result, ttl })
    }
}

/// Cache admission for JWT verdicts: a one-hash Bloom filter over cache keys that answers "seen
/// before?". A token used twice is cached from its second request; a stream of tokens each used once
/// neither fills nor churns the cache (and junk that fails before any signature check is neither cached
/// nor marked). Sized from `max_entries` (8 bits per entry, 8 KiB to 2 MiB) and cleared once a sixteenth
/// of its bits are set, so a false "seen" (which only caches a token early) stays under about 6 %, and a
/// token is admitted when its second use comes within roughly the last `max_entries / 2` new tokens.
struct Doorkeeper {
    words: Box<[AtomicU64]>,
    marked: AtomicUsize,
}

impl Doorkeeper {
    fn new(max_entries: u64) -> Doorkeeper {
        let bits = usize::try_from(max_entries.saturating_mul(8)).unwrap_or(usize::MAX);
        let bits = bits.clamp(1 << 16, 1 << 24).next_power_of_two();
        Doorkeeper { words: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(), marked: AtomicUsize::new(0) }
    }

    /// Marks `key` (a SHA-256 digest, so any 8 of its bytes are uniform) and says whether it was marked.
    fn seen_before(&self, key: &[u8; 32]) -> bool {
        let [.., a, b, c, d, e, f, g, h] = *key;
        let bit = u64::from_le_bytes([a, b, c, d, e, f, g, h]) as usize & (self.words.len() * 64 - 1);
        let mask = 1u64 << (bit % 64);
        if self.words[bit / 64].fetch_or(mask, Ordering::Relaxed) & mask != 0 {
            return true;
        }
        if self.marked.fetch_add(1, Ordering::Relaxed) + 1 >= self.words.len() * 4 {
            for w in self.words.iter() {
                w.store(0, Ordering::Relaxed);
            }
            self.marked.store(0, Ordering::Relaxed);
        }
        false
    }
}

async fn build_issuer(ic: &IssuerConfig, config: &Config, metrics: &Metrics) -> Result<Issuer, String> {
    let name: Arc<str> = Arc::from(ic.name.as_str());
    let http = http_client(ic, config)?;
    let mut ic = ic.clone();
    if let Some(url) = ic.discovery_url.clone() {
        discover(&mut ic, &url, &http).await?;
    }
    let mut regions = config.regions.clone();
    if let Some(claim) = &ic.regions_claim {
        regions.claim = claim.clone();
    }
    let jwt = match &ic.jwt {
        Some(j) => {
            Some(jwt::JwtVerifier::new(&ic, j, name.clone(), regions.clone(), http.clone(), metrics.clone())?)
        }
        None => None,
    };
    let introspection = ic.introspection.as_ref().map(|s| {
        introspect::Introspector::new(&ic, s, name.clone(), regions.clone(), http.clone(), metrics.clone())
    });
    let validations = [Method::Jwt, Method::Introspection].map(|m| {
        ["valid", "invalid", "unavailable"]
            .map(|result| metrics.token_validations.with_label_values(&[&name, m.as_str(), result]))
    });
    Ok(Issuer { config: ic, name, jwt, introspection, validations })
}

/// The client for one issuer's token service: bounded timeouts, the gateway's TLS allowlist, no redirects
/// (a redirect could point a key fetch anywhere).
fn http_client(ic: &IssuerConfig, config: &Config) -> Result<reqwest::Client, String> {
    let roots = crate::tls::roots(ic.ca_file.as_deref())?;
    let tls = config.server.tls.policy.client_config(roots, &[b"h2", b"http/1.1"])?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(ic.timeout)
        .connect_timeout(ic.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("residency-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("issuer {}: cannot build HTTP client: {e}", ic.name))
}

/// OpenID Connect / RFC 8414 metadata fills what the issuer did not set itself.
async fn discover(ic: &mut IssuerConfig, url: &str, http: &reqwest::Client) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Metadata {
        issuer: String,
        jwks_uri: Option<String>,
        introspection_endpoint: Option<String>,
    }
    let fail = |e: String| format!("issuer {}: discovery at {url} failed: {e}", ic.name);
    let resp = http.get(url).send().await.map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let meta: Metadata = resp.json().await.map_err(|e| fail(e.to_string()))?;
    if meta.issuer != ic.issuer {
        return Err(fail(format!("metadata names issuer `{}`, config says `{}`", meta.issuer, ic.issuer)));
    }
    for u in meta.jwks_uri.iter().chain(meta.introspection_endpoint.iter()) {
        crate::config::check_fetch_url(u).map_err(fail)?;
    }
    if let Some(j) = &mut ic.jwt
        && j.keys.is_none()
    {
        j.keys = meta.jwks_uri.map(crate::config::KeySource::Uri);
        if j.keys.is_none() {
            return Err(fail("metadata has no jwks_uri".into()));
        }
    }
    if let Some(i) = &mut ic.introspection
        && i.uri.is_none()
    {
        i.uri = meta.introspection_endpoint;
        if i.uri.is_none() {
            return Err(fail("metadata has no introspection_endpoint".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> [u8; 32] {
        sha256(&[&i.to_le_bytes()])
    }

    #[test]
    fn doorkeeper_admits_the_second_sight_and_forgets_after_a_sixteenth_fills() {
        let d = Doorkeeper::new(0);
        assert_eq!(d.words.len() * 64, 1 << 16, "the smallest filter");
        assert!(!d.seen_before(&key(0)));
        assert!(d.seen_before(&key(0)));
        // Distinct keys mostly read as new; a false "seen" only admits a token early.
        let early = (1..2000).filter(|&i| d.seen_before(&key(i))).count();
        assert!(early < 100, "{early} of 1999 new keys read as seen");
        // Marking a sixteenth of the bits clears the filter: what was marked is new again.
        let mut i = 2000;
        while d.marked.load(Ordering::Relaxed) != 0 {
            d.seen_before(&key(i));
            i += 1;
        }
        assert!((4096..4400).contains(&i), "cleared after {i} keys");
        assert!(!d.seen_before(&key(0)), "forgotten");
        assert_eq!(Doorkeeper::new(221_000).words.len() * 64, 1 << 21, "8 bits an entry, a power of two");
        assert_eq!(Doorkeeper::new(u64::MAX).words.len() * 64, 1 << 24, "at most 2 MiB");
    }
}
