//! The TOML configuration: raw serde structs, then `validate()` into a typed [`Config`], collecting every
//! problem at once, each naming the file, the line and the key.
//!
//! Unknown keys are found with `serde_ignored` rather than `deny_unknown_fields`: the latter stops at the
//! first unknown key, and ops should see every mistake in one pass.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

use crate::policy::{Jurisdiction, Policy};
use crate::tls;

// ---------------------------------------------------------------------------------------------------------
// Errors that point into a file.

/// One problem in a config or policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// A problem with a file as a whole (unreadable, missing directory).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError { file: file.to_path_buf(), line: None, key: String::new(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one load.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A path to a key inside a TOML document: `routes[2].issuers[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Key(Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Field(String),
    Index(usize),
}

impl Key {
    pub fn root() -> Key {
        Key(Vec::new())
    }
    pub fn field(&self, name: &str) -> Key {
        let mut k = self.clone();
        k.0.push(Seg::Field(name.to_string()));
        k
    }
    pub fn index(&self, i: usize) -> Key {
        let mut k = self.clone();
        k.0.push(Seg::Index(i));
        k
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Field(n) if i == 0 => write!(f, "{n}")?,
                Seg::Field(n) => write!(f, ".{n}")?,
                Seg::Index(x) => write!(f, "[{x}]")?,
            }
        }
        Ok(())
    }
}

/// A TOML file's text, kept so errors found after deserialising can still be given a line.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
}

impl Source {
    pub fn read(file: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::file(file, format!("cannot read: {e}")))?;
        Source::from_text(file, text)
    }

    /// Checks the TOML syntax; the error names the line where parsing stopped.
    pub fn from_text(file: impl AsRef<Path>, text: String) -> Result<Source, ConfigError> {
        let src = Source { file: file.as_ref().to_path_buf(), text };
        if let Err(e) = DeTable::parse(&src.text) {
            let line = e.span().map(|s| src.line_at(s.start));
            return Err(ConfigError {
                file: src.file.clone(),
                line,
                key: String::new(),
                message: format!("invalid TOML: {}", e.message().trim()),
            });
        }
        Ok(src)
    }

    fn line_at(&self, offset: usize) -> usize {
        self.text.as_bytes()[..offset.min(self.text.len())].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// Deserialises the whole file. Unknown keys and type errors become errors with lines; `None` when
    /// the structure could not be read at all.
    pub fn deserialize<T: DeserializeOwned>(&self, errors: &mut Vec<ConfigError>) -> Option<T> {
        let de = match toml::de::Deserializer::parse(&self.text) {
            Ok(de) => de,
            Err(e) => {
                errors.push(self.toml_error(&e));
                return None;
            }
        };
        let mut unknown = Vec::new();
        let result: Result<T, _> = serde_ignored::deserialize(de, |path| unknown.push(ignored_key(&path)));
        for key in unknown {
            errors.push(self.error(&key, "unknown key"));
        }
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(self.toml_error(&e));
                None
            }
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let (line, key) = match e.span() {
            Some(span) => (Some(self.line_at(span.start)), self.key_at(span.start)),
            None => (None, String::new()),
        };
        ConfigError { file: self.file.clone(), line, key, message: e.message().trim().to_string() }
    }

    /// An error about `key`, with the line where that key (or the nearest enclosing one) is written.
    pub fn error(&self, key: &Key, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.span_of(key).map(|s| self.line_at(s)),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn span_of(&self, key: &Key) -> Option<usize> {
        let doc = DeTable::parse(&self.text).ok()?;
        let mut best = None;
        let mut table: Option<&DeTable> = Some(doc.get_ref());
        let mut value: Option<&DeValue> = None;
        for seg in &key.0 {
            match seg {
                Seg::Field(name) => {
                    let t = table.or(match value {
                        Some(DeValue::Table(t)) => Some(t),
                        _ => None,
                    })?;
                    let (k, v) = t.iter().find(|(k, _)| k.get_ref().as_ref() == name.as_str())?;
                    best = Some(k.span().start);
                    table = None;
                    value = Some(v.get_ref());
                }
                Seg::Index(i) => {
                    let DeValue::Array(items) = value? else {
                        return best;
                    };
                    let item = items.get(*i)?;
                    best = Some(item.span().start);
                    table = None;
                    value = Some(item.get_ref());
                }
            }
        }
        best
    }

    /// The dotted key whose value contains `offset`, for errors serde reports by position.
    fn key_at(&self, offset: usize) -> String {
        fn walk(v: &DeValue, offset: usize, key: Key, out: &mut Key) {
            match v {
                DeValue::Table(t) => {
                    for (k, v) in t.iter() {
                        let span = v.span();
                        if k.span().contains(&offset) || span.contains(&offset) {
                            let key = key.field(k.get_ref());
                            *out = key.clone();
                            walk(v.get_ref(), offset, key, out);
                        }
                    }
                }
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if item.span().contains(&offset) {
                            let key = key.index(i);
                            *out = key.clone();
                            walk(item.get_ref(), offset, key, out);
                        }
                    }
                }
                _ => {}
            }
        }
        let Ok(doc) = DeTable::parse(&self.text) else {
            return String::new();
        };
        let mut out = Key::root();
        walk(&DeValue::Table(doc.into_inner()), offset, Key::root(), &mut out);
        out.to_string()
    }
}

fn ignored_key(path: &serde_ignored::Path) -> Key {
    fn build(path: &serde_ignored::Path, out: &mut Key) {
        use serde_ignored::Path as P;
        match path {
            P::Root => {}
            P::Seq { parent, index } => {
                build(parent, out);
                out.0.push(Seg::Index(*index));
            }
            P::Map { parent, key } => {
                build(parent, out);
                out.0.push(Seg::Field(key.clone()));
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                build(parent, out)
            }
        }
    }
    let mut k = Key::root();
    build(path, &mut k);
    k
}

// ---------------------------------------------------------------------------------------------------------
// Raw structs, as written in the file.

#[derive(Deserialize)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    policy: RawPolicySection,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    dpop: RawDpop,
    #[serde(default)]
    issuers: Vec<RawIssuer>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
struct RawServer {
    listen: String,
    admin_listen: Option<String>,
    tls: RawTls,
    #[serde(default = "defaults::handshake_timeout")]
    handshake_timeout_seconds: f64,
    #[serde(default = "defaults::header_read_timeout")]
    header_read_timeout_seconds: f64,
    #[serde(default = "defaults::shutdown_grace")]
    shutdown_grace_seconds: f64,
    realm: Option<String>,
    #[serde(default = "defaults::max_connections")]
    max_connections: usize,
    #[serde(default = "defaults::http2_max_concurrent_streams")]
    http2_max_concurrent_streams: u32,
    #[serde(default = "defaults::max_header_bytes")]
    max_header_bytes: usize,
    #[serde(default = "defaults::max_headers")]
    max_headers: usize,
    #[serde(default = "defaults::max_uri_bytes")]
    max_uri_bytes: usize,
    #[serde(default = "defaults::max_body_bytes")]
    max_body_bytes: u64,
    #[serde(default = "defaults::body_idle_timeout")]
    body_idle_timeout_seconds: f64,
    #[serde(default = "defaults::keep_alive_timeout")]
    keep_alive_timeout_seconds: f64,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    /// Where the gateway itself runs; an upstream elsewhere must be reached over TLS.
    jurisdiction: Option<String>,
}

#[derive(Deserialize)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "defaults::min_version")]
    min_version: String,
    cipher_suites: Option<Vec<String>>,
    key_exchange_groups: Option<Vec<String>>,
    client_ca: Option<PathBuf>,
    client_auth: Option<String>,
}

#[derive(Deserialize)]
struct RawUpstream {
    #[serde(default = "defaults::connect_timeout")]
    connect_timeout_seconds: f64,
    #[serde(default = "defaults::response_timeout")]
    response_timeout_seconds: f64,
    #[serde(default = "defaults::pool_idle_timeout")]
    pool_idle_timeout_seconds: f64,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            connect_timeout_seconds: defaults::connect_timeout(),
            response_timeout_seconds: defaults::response_timeout(),
            pool_idle_timeout_seconds: defaults::pool_idle_timeout(),
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }
}

#[derive(Deserialize)]
struct RawPolicySection {
    #[serde(default = "defaults::policy_dir")]
    dir: PathBuf,
    #[serde(default = "defaults::regions_claim")]
    regions_claim: String,
    /// Scope -> region group or jurisdiction, for IdPs that cannot add a custom claim.
    #[serde(default)]
    scope_regions: BTreeMap<String, String>,
}

impl Default for RawPolicySection {
    fn default() -> Self {
        RawPolicySection {
            dir: defaults::policy_dir(),
            regions_claim: defaults::regions_claim(),
            scope_regions: BTreeMap::new(),
        }
    }
}

#[derive(Deserialize)]
struct RawDpop {
    #[serde(default = "defaults::dpop_window")]
    window_seconds: f64,
    #[serde(default = "defaults::dpop_algorithms")]
    algorithms: Vec<String>,
    #[serde(default = "defaults::dpop_replay_entries")]
    replay_cache_entries: u64,
}

impl Default for RawDpop {
    fn default() -> Self {
        RawDpop {
            window_seconds: defaults::dpop_window(),
            algorithms: defaults::dpop_algorithms(),
            replay_cache_entries: defaults::dpop_replay_entries(),
        }
    }
}

#[derive(Deserialize)]
struct RawCache {
    #[serde(default = "defaults::cache_max_entries")]
    max_entries: u64,
    #[serde(default = "defaults::cache_max_ttl")]
    max_ttl_seconds: f64,
    #[serde(default = "defaults::cache_negative_ttl")]
    negative_ttl_seconds: f64,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            max_entries: defaults::cache_max_entries(),
            max_ttl_seconds: defaults::cache_max_ttl(),
            negative_ttl_seconds: defaults::cache_negative_ttl(),
        }
    }
}

#[derive(Deserialize)]
struct RawIssuer {
    name: String,
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    jwks_uri: Option<String>,
    jwks_file: Option<PathBuf>,
    #[serde(default = "defaults::algorithms")]
    algorithms: Vec<String>,
    #[serde(default = "defaults::leeway")]
    leeway_seconds: u64,
    max_token_lifetime_seconds: Option<u64>,
    #[serde(default = "defaults::jwks_refresh")]
    jwks_refresh_seconds: f64,
    #[serde(default = "defaults::jwks_min_refresh")]
    jwks_min_refresh_seconds: f64,
    #[serde(default = "defaults::jwks_max_stale")]
    jwks_max_stale_seconds: f64,
    introspection_uri: Option<String>,
    client_id: Option<String>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    #[serde(default = "defaults::client_auth")]
    client_auth: String,
    discovery_url: Option<String>,
    regions_claim: Option<String>,
    #[serde(default = "defaults::http_timeout")]
    timeout_seconds: f64,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    require_bound_tokens: bool,
}

#[derive(Deserialize, Default)]
struct RawAdmin {
    token_env: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawState {
    #[serde(default = "defaults::state_backend")]
    backend: String,
    #[serde(default = "defaults::state_path")]
    path: PathBuf,
    url: Option<String>,
    #[serde(default = "defaults::state_prefix")]
    key_prefix: String,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            backend: defaults::state_backend(),
            path: defaults::state_path(),
            url: None,
            key_prefix: defaults::state_prefix(),
        }
    }
}

#[derive(Deserialize)]
struct RawRoute {
    name: String,
    host: Option<String>,
    path_prefix: String,
    upstream: String,
    jurisdiction: String,
    issuers: Vec<String>,
    #[serde(default = "defaults::mode")]
    mode: String,
    #[serde(default = "defaults::data_class")]
    data_class: String,
    #[serde(default)]
    introspect_jwts: bool,
    max_body_bytes: Option<u64>,
    #[serde(default)]
    allow_plaintext_cross_border: bool,
    #[serde(default)]
    require_bound_tokens: bool,
}

mod defaults {
    use std::path::PathBuf;
    pub fn handshake_timeout() -> f64 {
        10.0
    }
    pub fn header_read_timeout() -> f64 {
        10.0
    }
    pub fn shutdown_grace() -> f64 {
        30.0
    }
    pub fn min_version() -> String {
        "1.2".into()
    }
    pub fn connect_timeout() -> f64 {
        5.0
    }
    pub fn response_timeout() -> f64 {
        30.0
    }
    pub fn pool_idle_timeout() -> f64 {
        90.0
    }
    pub fn policy_dir() -> PathBuf {
        "policies".into()
    }
    pub fn regions_claim() -> String {
        "allowed_regions".into()
    }
    pub fn cache_max_entries() -> u64 {
        100_000
    }
    pub fn cache_max_ttl() -> f64 {
        300.0
    }
    pub fn cache_negative_ttl() -> f64 {
        5.0
    }
    pub fn algorithms() -> Vec<String> {
        vec!["RS256".into(), "ES256".into()]
    }
    pub fn leeway() -> u64 {
        30
    }
    pub fn jwks_refresh() -> f64 {
        300.0
    }
    pub fn jwks_min_refresh() -> f64 {
        10.0
    }
    pub fn jwks_max_stale() -> f64 {
        86_400.0
    }
    pub fn client_auth() -> String {
        "client_secret_basic".into()
    }
    pub fn http_timeout() -> f64 {
        5.0
    }
    pub fn state_backend() -> String {
        "file".into()
    }
    pub fn state_path() -> PathBuf {
        "state/gateway-state.json".into()
    }
    pub fn state_prefix() -> String {
        "residency-gateway".into()
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn http2_max_concurrent_streams() -> u32 {
        100
    }
    pub fn max_header_bytes() -> usize {
        16 * 1024
    }
    pub fn max_headers() -> usize {
        100
    }
    pub fn max_uri_bytes() -> usize {
        8 * 1024
    }
    pub fn max_body_bytes() -> u64 {
        10 * 1024 * 1024
    }
    pub fn body_idle_timeout() -> f64 {
        30.0
    }
    pub fn keep_alive_timeout() -> f64 {
        60.0
    }
    pub fn dpop_window() -> f64 {
        60.0
    }
    pub fn dpop_algorithms() -> Vec<String> {
        vec!["ES256".into(), "RS256".into(), "PS256".into(), "EdDSA".into()]
    }
    pub fn dpop_replay_entries() -> u64 {
        100_000
    }
    pub fn mode() -> String {
        "enforce".into()
    }
    pub fn data_class() -> String {
        "personal".into()
    }
}

// ---------------------------------------------------------------------------------------------------------
// The typed config.

/// The validated configuration. Paths are resolved against the config file's directory.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub regions: RegionRules,
    pub policy_dir: PathBuf,
    pub policy: Arc<Policy>,
    pub cache: CacheConfig,
    pub dpop: DpopConfig,
    pub issuers: Vec<IssuerConfig>,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub routes: Vec<RouteConfig>,
    /// Problems that do not stop the gateway but deserve a look (`check` prints them).
    pub warnings: Vec<ConfigError>,
}

#[derive(Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub tls: tls::ServerTls,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub realm: String,
    pub limits: Limits,
    /// Peers whose `X-Forwarded-For` is kept (and appended to); from anyone else it is replaced.
    pub trusted_proxies: Vec<IpNet>,
}

/// Bounds on what one client may hold or send.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub http2_max_concurrent_streams: u32,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    /// The default for routes that set none.
    pub max_body_bytes: u64,
    pub body_idle_timeout: Duration,
    pub keep_alive_timeout: Duration,
}

/// An address range in CIDR form (`10.0.0.0/8`, `::1/128`); a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse().ok().filter(|&p| p <= max)?,
            None => max,
        };
        Some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map(V4).unwrap_or(V6(v6)),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and key presented to upstreams that ask for one.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

/// DPoP proof checks (RFC 9449).
#[derive(Debug, Clone)]
pub struct DpopConfig {
    /// How far a proof's `iat` may be from now, either way; also how long its `jti` is remembered.
    pub window: Duration,
    pub algorithms: Vec<Algorithm>,
    pub replay_cache_entries: u64,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_entries: u64,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
}

/// How a token's allowed regions are read: the claim, plus regions granted by scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionRules {
    pub claim: ClaimPath,
    /// (scope, region) pairs; the region is upper-cased.
    pub scopes: Vec<(String, String)>,
}

/// Where the allowed regions sit in the claims: a plain claim name, or a dotted path into nested objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath {
    pub name: String,
    segments: Vec<String>,
}

impl ClaimPath {
    pub fn new(name: &str) -> ClaimPath {
        ClaimPath { name: name.to_string(), segments: name.split('.').map(str::to_string).collect() }
    }

    /// Looks the claim up: a literal top-level key wins (claim names may be URLs with dots), otherwise
    /// the dotted path is followed through nested objects.
    pub fn lookup<'a>(
        &self,
        claims: &'a serde_json::Map<String, serde_json::Value>,
    ) -> Option<&'a serde_json::Value> {
        if let Some(v) = claims.get(&self.name) {
            return Some(v);
        }
        if self.segments.len() < 2 {
            return None;
        }
        let mut cur = claims.get(&self.segments[0])?;
        for seg in &self.segments[1..] {
            cur = cur.as_object()?.get(seg)?;
        }
        Some(cur)
    }
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwt: Option<JwtSettings>,
    pub introspection: Option<IntrospectionSettings>,
    pub discovery_url: Option<String>,
    pub leeway: u64,
    pub max_token_lifetime: Option<u64>,
    /// Overrides `policy.regions_claim` for this issuer's tokens.
    pub regions_claim: Option<ClaimPath>,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Refuse this issuer's tokens unless they are sender-constrained.
    pub require_bound_tokens: bool,
}

#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// `None` only when `discovery_url` is to supply it.
    pub keys: Option<KeySource>,
    pub algorithms: Vec<Algorithm>,
    pub refresh: Duration,
    pub min_refresh: Duration,
    pub max_stale: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Uri(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct IntrospectionSettings {
    /// `None` only when `discovery_url` is to supply it.
    pub uri: Option<String>,
    pub client_id: String,
    pub client_secret: String,
    pub client_auth: ClientAuth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Basic,
    Post,
}

#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// `None`: the admin API is off.
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateConfig {
    File(PathBuf),
    Redis { url: String, prefix: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Monitor,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: String,
    pub upstream: http::Uri,
    /// As written: a code or an alias. `jurisdiction` is what it resolves to.
    pub declared: String,
    pub jurisdiction: Jurisdiction,
    pub issuers: Vec<String>,
    pub mode: Mode,
    pub data_class: String,
    pub introspect_jwts: bool,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: u64,
    /// Refuse tokens that are not sender-constrained (mTLS-bound or DPoP).
    pub require_bound_tokens: bool,
}

impl Config {
    /// Reads, parses and validates `file` and the policies it names.
    pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
        let src = Source::read(file).map_err(|e| ConfigErrors(vec![e]))?;
        Config::from_source(&src)
    }

    pub fn from_source(src: &Source) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let raw: Option<RawConfig> = src.deserialize(&mut errors);
        let Some(raw) = raw else {
            return Err(ConfigErrors(errors));
        };
        let cfg = validate(src, raw, &mut errors);
        match cfg {
            Some(cfg) if errors.is_empty() => Ok(cfg),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// The whole validation pass. Returns `None` only when a part could not be built at all; the caller
/// still rejects the config when `errors` is not empty.
fn validate(src: &Source, raw: RawConfig, errors: &mut Vec<ConfigError>) -> Option<Config> {
    let base = src.file.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &Path| {
        if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
    };
    let k = Key::root();
    let mut err = |key: &Key, msg: String| errors.push(src.error(key, msg));

    // [server]
    let sk = k.field("server");
    let listen = parse_addr(&raw.server.listen, &sk.field("listen"), &mut err);
    let admin_listen =
        raw.server.admin_listen.as_deref().and_then(|a| parse_addr(a, &sk.field("admin_listen"), &mut err));
    let durations = [
        (&sk.field("handshake_timeout_seconds"), raw.server.handshake_timeout_seconds),
        (&sk.field("header_read_timeout_seconds"), raw.server.header_read_timeout_seconds),
        (&sk.field("shutdown_grace_seconds"), raw.server.shutdown_grace_seconds),
        (&k.field("upstream").field("connect_timeout_seconds"), raw.upstream.connect_timeout_seconds),
        (&k.field("upstream").field("response_timeout_seconds"), raw.upstream.response_timeout_seconds),
        (&k.field("upstream").field("pool_idle_timeout_seconds"), raw.upstream.pool_idle_timeout_seconds),
        (&k.field("cache").field("max_ttl_seconds"), raw.cache.max_ttl_seconds),
        (&k.field("cache").field("negative_ttl_seconds"), raw.cache.negative_ttl_seconds),
    ];
    for (key, secs) in durations {
        check_seconds(secs, key, &mut err);
    }

    for (key, secs) in [
        ("body_idle_timeout_seconds", raw.server.body_idle_timeout_seconds),
        ("keep_alive_timeout_seconds", raw.server.keep_alive_timeout_seconds),
    ] {
        check_seconds(secs, &sk.field(key), &mut err);
    }
    for (key, value, min) in [
        ("max_connections", raw.server.max_connections, 1),
        ("http2_max_concurrent_streams", raw.server.http2_max_concurrent_streams as usize, 1),
        ("max_header_bytes", raw.server.max_header_bytes, 8192),
        ("max_headers", raw.server.max_headers, 8),
        ("max_uri_bytes", raw.server.max_uri_bytes, 64),
    ] {
        if value < min {
            err(&sk.field(key), format!("must be at least {min}"));
        }
    }
    let mut trusted_proxies = Vec::new();
    for (i, p) in raw.server.trusted_proxies.iter().enumerate() {
        match IpNet::parse(p) {
            Some(net) => trusted_proxies.push(net),
            None => {
                err(&sk.field("trusted_proxies").index(i), format!("`{p}` is not an address or CIDR range"))
            }
        }
    }

    let tk = sk.field("tls");
    let tls_settings = tls::TlsSettings {
        cert: resolve(&raw.server.tls.cert),
        key: resolve(&raw.server.tls.key),
        min_version: raw.server.tls.min_version.clone(),
        cipher_suites: raw.server.tls.cipher_suites.clone().unwrap_or_else(tls::default_cipher_suites),
        key_exchange_groups: raw.server.tls.key_exchange_groups.clone().unwrap_or_else(tls::default_groups),
        client_ca: raw.server.tls.client_ca.as_deref().map(resolve),
        client_cert_required: match raw.server.tls.client_auth.as_deref() {
            None | Some("optional") => false,
            Some("required") => true,
            Some(other) => {
                err(
                    &tk.field("client_auth"),
                    format!("unknown client_auth `{other}`; valid: optional, required"),
                );
                false
            }
        },
    };
    if raw.server.tls.client_auth.is_some() && raw.server.tls.client_ca.is_none() {
        err(
            &tk.field("client_auth"),
            "client_auth needs client_ca, the bundle client certificates are checked against".into(),
        );
    }
    let server_tls = match tls::ServerTls::build(&tls_settings) {
        Ok(t) => Some(t),
        Err(problems) => {
            for p in problems {
                err(&tk.field(p.key), p.message);
            }
            None
        }
    };
    let upstream_ca = raw.upstream.ca_file.as_deref().map(resolve);
    if let Some(ca) = &upstream_ca
        && let Err(e) = tls::load_roots(ca)
    {
        err(&k.field("upstream").field("ca_file"), e);
    }
    let client_identity = match (&raw.upstream.client_cert, &raw.upstream.client_key) {
        (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
        (None, None) => None,
        _ => {
            err(&k.field("upstream"), "client_cert and client_key go together".into());
            None
        }
    };

    // [policy]
    let pk = k.field("policy");
    let mut policy_errors = Vec::new();
    let policy_dir = resolve(&raw.policy.dir);
    let policy = match Policy::load_dir(&policy_dir) {
        Ok(p) => Some(Arc::new(p)),
        Err(mut perrs) => {
            for e in &mut perrs {
                if e.key.is_empty() && e.line.is_none() {
                    *e = src.error(&pk.field("dir"), format!("{}: {}", e.file.display(), e.message));
                }
            }
            policy_errors = perrs;
            None
        }
    };
    if raw.policy.regions_claim.trim().is_empty() {
        err(&pk.field("regions_claim"), "must not be empty".into());
    }
    if let Some(p) = &policy {
        for (scope, target) in &raw.policy.scope_regions {
            if !p.has_group(target) && !Jurisdiction::parse(target).is_some_and(|j| j.is_assigned()) {
                err(
                    &pk.field("scope_regions").field(scope),
                    format!("`{target}` is neither a region group nor an ISO 3166 jurisdiction code"),
                );
            }
        }
    }

    // [[issuers]]
    let mut issuers = Vec::new();
    let mut issuer_names = HashSet::new();
    for (i, ri) in raw.issuers.iter().enumerate() {
        let ik = k.field("issuers").index(i);
        if !valid_name(&ri.name) {
            err(&ik.field("name"), format!("`{}` is not a valid name (letters, digits, '-', '_')", ri.name));
        }
        if !issuer_names.insert(ri.name.clone()) {
            err(&ik.field("name"), format!("issuer `{}` is defined twice", ri.name));
        }
        if ri.issuer.is_empty() {
            err(&ik.field("issuer"), "must not be empty".into());
        }
        for (key, secs) in [
            ("jwks_refresh_seconds", ri.jwks_refresh_seconds),
            ("jwks_min_refresh_seconds", ri.jwks_min_refresh_seconds),
            ("jwks_max_stale_seconds", ri.jwks_max_stale_seconds),
            ("timeout_seconds", ri.timeout_seconds),
        ] {
            check_seconds(secs, &ik.field(key), &mut err);
        }
        let wants_jwt = ri.jwks_uri.is_some() || ri.jwks_file.is_some();
        let wants_introspection = ri.introspection_uri.is_some() || ri.client_id.is_some();
        if !wants_jwt && !wants_introspection && ri.discovery_url.is_none() {
            err(&ik, "an issuer needs jwks_uri, jwks_file, introspection_uri or discovery_url".into());
        }
        if ri.jwks_uri.is_some() && ri.jwks_file.is_some() {
            err(&ik.field("jwks_file"), "set jwks_uri or jwks_file, not both".into());
        }
        for (key, url) in [
            ("jwks_uri", &ri.jwks_uri),
            ("introspection_uri", &ri.introspection_uri),
            ("discovery_url", &ri.discovery_url),
        ] {
            if let Some(url) = url
                && let Err(e) = check_fetch_url(url)
            {
                err(&ik.field(key), e);
            }
        }
        let mut algorithms = Vec::new();
        for (ai, name) in ri.algorithms.iter().enumerate() {
            match name.parse::<Algorithm>() {
                Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => err(
                    &ik.field("algorithms").index(ai),
                    format!("`{name}` is a shared-secret algorithm; only public-key algorithms are accepted"),
                ),
                Ok(a) => algorithms.push(a),
                Err(_) => err(
                    &ik.field("algorithms").index(ai),
                    format!(
                        "unknown algorithm `{name}`; valid: RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA"
                    ),
                ),
            }
        }
        if algorithms.is_empty() && (wants_jwt || ri.discovery_url.is_some()) {
            err(&ik.field("algorithms"), "at least one algorithm is needed".into());
        }
        if (wants_jwt || ri.discovery_url.is_some()) && ri.audiences.is_empty() && !wants_introspection {
            err(&ik.field("audiences"), "at least one audience is needed: `aud` is always checked".into());
        }
        let jwt = (wants_jwt || (ri.discovery_url.is_some() && !wants_introspection)).then(|| JwtSettings {
            keys: match (&ri.jwks_uri, &ri.jwks_file) {
                (Some(u), _) => Some(KeySource::Uri(u.clone())),
                (None, Some(f)) => Some(KeySource::File(resolve(f))),
                (None, None) => None,
            },
            algorithms: algorithms.clone(),
            refresh: secs(ri.jwks_refresh_seconds),
            min_refresh: secs(ri.jwks_min_refresh_seconds),
            max_stale: secs(ri.jwks_max_stale_seconds),
        });
        let introspection = if wants_introspection {
            let client_auth = match ri.client_auth.as_str() {
                "client_secret_basic" => ClientAuth::Basic,
                "client_secret_post" => ClientAuth::Post,
                other => {
                    err(
                        &ik.field("client_auth"),
                        format!(
                            "unknown client_auth `{other}`; valid: client_secret_basic, client_secret_post"
                        ),
                    );
                    ClientAuth::Basic
                }
            };
            if ri.client_id.is_none() {
                err(&ik.field("client_id"), "introspection needs client_id".into());
            }
            let secret = read_secret(
                ri.client_secret_env.as_deref(),
                ri.client_secret_file.as_deref().map(resolve).as_deref(),
                &ik,
                "client_secret",
                &mut err,
            );
            if secret.is_none() && ri.client_secret_env.is_none() && ri.client_secret_file.is_none() {
                err(&ik, "introspection needs client_secret_env or client_secret_file".into());
            }
            Some(IntrospectionSettings {
                uri: ri.introspection_uri.clone(),
                client_id: ri.client_id.clone().unwrap_or_default(),
                client_secret: secret.unwrap_or_default(),
                client_auth,
            })
        } else {
            None
        };
        if let Some(ca) = &ri.ca_file
            && let Err(e) = tls::load_roots(&resolve(ca))
        {
            err(&ik.field("ca_file"), e);
        }
        issuers.push(IssuerConfig {
            name: ri.name.clone(),
            issuer: ri.issuer.clone(),
            audiences: ri.audiences.clone(),
            jwt,
            introspection,
            discovery_url: ri.discovery_url.clone(),
            leeway: ri.leeway_seconds,
            max_token_lifetime: ri.max_token_lifetime_seconds,
            regions_claim: ri.regions_claim.as_deref().map(ClaimPath::new),
            timeout: secs(ri.timeout_seconds),
            ca_file: ri.ca_file.as_deref().map(resolve),
            require_bound_tokens: ri.require_bound_tokens,
        });
    }

    // [admin]
    let ak = k.field("admin");
    let admin_token = read_secret(
        raw.admin.token_env.as_deref(),
        raw.admin.token_file.as_deref().map(resolve).as_deref(),
        &ak,
        "token",
        &mut err,
    );
    if let Some(t) = &admin_token
        && t.len() < 16
    {
        err(&ak, "the admin token must be at least 16 characters".into());
    }

    // [state]
    let stk = k.field("state");
    let state = match raw.state.backend.as_str() {
        "file" => StateConfig::File(resolve(&raw.state.path)),
        "redis" => {
            let url = raw.state.url.clone().unwrap_or_default();
            if raw.state.url.is_none() {
                err(&stk.field("url"), "the redis backend needs url".into());
            } else if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                err(&stk.field("url"), format!("`{url}` is not a redis:// or rediss:// URL"));
            }
            StateConfig::Redis { url, prefix: raw.state.key_prefix.clone() }
        }
        other => {
            err(&stk.field("backend"), format!("unknown backend `{other}`; valid: file, redis"));
            StateConfig::File(resolve(&raw.state.path))
        }
    };

    // [[routes]]
    // [dpop]
    check_seconds(raw.dpop.window_seconds, &k.field("dpop").field("window_seconds"), &mut err);
    let mut dpop_algorithms = Vec::new();
    for (i, name) in raw.dpop.algorithms.iter().enumerate() {
        match name.parse::<Algorithm>() {
            Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => err(
                &k.field("dpop").field("algorithms").index(i),
                format!("`{name}` is not a public-key JWS algorithm"),
            ),
            Ok(a) => dpop_algorithms.push(a),
        }
    }

    let server_jurisdiction = match &raw.server.jurisdiction {
        None => None,
        Some(j) => match policy.as_ref().and_then(|p| p.resolve(j)) {
            Some(j) => Some(j),
            None => {
                if policy.is_some() {
                    err(
                        &sk.field("jurisdiction"),
                        format!("`{j}` is neither an ISO 3166 jurisdiction code nor an alias"),
                    );
                }
                None
            }
        },
    };
    let mut routes = Vec::new();
    let mut warnings = Vec::new();
    let mut route_names = HashSet::new();
    let mut matchers: BTreeMap<(Option<String>, String), String> = BTreeMap::new();
    for (i, rr) in raw.routes.iter().enumerate() {
        let rk = k.field("routes").index(i);
        if !valid_name(&rr.name) {
            err(&rk.field("name"), format!("`{}` is not a valid name (letters, digits, '-', '_')", rr.name));
        }
        if !route_names.insert(rr.name.clone()) {
            err(&rk.field("name"), format!("route `{}` is defined twice", rr.name));
        }
        if !rr.path_prefix.starts_with('/') {
            err(&rk.field("path_prefix"), "must start with '/'".into());
        }
        let host = rr.host.as_ref().map(|h| h.to_ascii_lowercase());
        if let Some(other) = matchers.insert((host.clone(), rr.path_prefix.clone()), rr.name.clone()) {
            err(
                &rk.field("path_prefix"),
                format!("route `{other}` already matches this host and path prefix"),
            );
        }
        let upstream = match parse_upstream(&rr.upstream) {
            Ok(u) => Some(u),
            Err(e) => {
                err(&rk.field("upstream"), e);
                None
            }
        };
        let jurisdiction = match &policy {
            Some(p) => match p.resolve(&rr.jurisdiction) {
                Some(j) => {
                    if !p.any_group_contains(&j) {
                        warnings.push(src.error(
                            &rk.field("jurisdiction"),
                            format!("no region group contains {j}: only tokens naming {j} itself can reach this route"),
                        ));
                    }
                    Some(j)
                }
                None => {
                    err(
                        &rk.field("jurisdiction"),
                        format!(
                            "`{}` is neither an ISO 3166 jurisdiction code nor an alias from the policies",
                            rr.jurisdiction
                        ),
                    );
                    None
                }
            },
            None => None,
        };
        if rr.issuers.is_empty() {
            err(&rk.field("issuers"), "a route needs at least one issuer".into());
        }
        for (ii, name) in rr.issuers.iter().enumerate() {
            if !issuer_names.contains(name) {
                let known: Vec<&str> = raw.issuers.iter().map(|x| x.name.as_str()).collect();
                err(
                    &rk.field("issuers").index(ii),
                    format!("unknown issuer `{name}`; defined: {}", known.join(", ")),
                );
            }
        }
        let mode = match rr.mode.as_str() {
            "enforce" => Mode::Enforce,
            "monitor" => Mode::Monitor,
            other => {
                err(&rk.field("mode"), format!("unknown mode `{other}`; valid: enforce, monitor"));
                Mode::Enforce
            }
        };
        if !valid_name(&rr.data_class) {
            err(&rk.field("data_class"), "letters, digits, '-', '_' only".into());
        }
        // TLS is not optional when data leaves the gateway's own jurisdiction.
        if let (Some(here), Some(there), Some(up)) = (&server_jurisdiction, &jurisdiction, &upstream)
            && here != there
            && up.scheme_str() != Some("https")
        {
            if rr.allow_plaintext_cross_border {
                warnings.push(src.error(
                    &rk.field("allow_plaintext_cross_border"),
                    format!("route `{}` sends data from {here} to {there} without TLS", rr.name),
                ));
            } else {
                err(
                    &rk.field("upstream"),
                    format!(
                        "the upstream is in {there}, outside the gateway's {here}: it must be https \
                         (or set allow_plaintext_cross_border = true)"
                    ),
                );
            }
        }
        if let (Some(upstream), Some(jurisdiction)) = (upstream, jurisdiction) {
            routes.push(RouteConfig {
                name: rr.name.clone(),
                host,
                path_prefix: rr.path_prefix.clone(),
                upstream,
                declared: rr.jurisdiction.clone(),
                jurisdiction,
                issuers: rr.issuers.clone(),
                mode,
                data_class: rr.data_class.clone(),
                introspect_jwts: rr.introspect_jwts,
                max_body_bytes: rr.max_body_bytes.unwrap_or(raw.server.max_body_bytes),
                require_bound_tokens: rr.require_bound_tokens,
            });
        }
    }

    errors.extend(policy_errors);
    Some(Config {
        file: src.file.clone(),
        server: ServerConfig {
            listen: listen?,
            admin_listen,
            tls: server_tls?,
            handshake_timeout: secs(raw.server.handshake_timeout_seconds),
            header_read_timeout: secs(raw.server.header_read_timeout_seconds),
            shutdown_grace: secs(raw.server.shutdown_grace_seconds),
            realm: raw.server.realm.unwrap_or_else(|| "residency-gateway".into()),
            limits: Limits {
                max_connections: raw.server.max_connections,
                http2_max_concurrent_streams: raw.server.http2_max_concurrent_streams,
                max_header_bytes: raw.server.max_header_bytes,
                max_headers: raw.server.max_headers,
                max_uri_bytes: raw.server.max_uri_bytes,
                max_body_bytes: raw.server.max_body_bytes,
                body_idle_timeout: secs(raw.server.body_idle_timeout_seconds),
                keep_alive_timeout: secs(raw.server.keep_alive_timeout_seconds),
            },
            trusted_proxies,
        },
        upstream: UpstreamConfig {
            connect_timeout: secs(raw.upstream.connect_timeout_seconds),
            response_timeout: secs(raw.upstream.response_timeout_seconds),
            pool_idle_timeout: secs(raw.upstream.pool_idle_timeout_seconds),
            ca_file: upstream_ca,
            client_identity,
        },
        regions: RegionRules {
            claim: ClaimPath::new(&raw.policy.regions_claim),
            scopes: raw
                .policy
                .scope_regions
                .iter()
                .map(|(k, v)| (k.clone(), v.to_ascii_uppercase()))
                .collect(),
        },
        policy_dir,
        policy: policy?,
        cache: CacheConfig {
            max_entries: raw.cache.max_entries,
            max_ttl: secs(raw.cache.max_ttl_seconds),
            negative_ttl: secs(raw.cache.negative_ttl_seconds),
        },
        dpop: DpopConfig {
            window: secs(raw.dpop.window_seconds),
            algorithms: dpop_algorithms,
            replay_cache_entries: raw.dpop.replay_cache_entries,
        },
        issuers,
        admin: AdminConfig { token: admin_token },
        state,
        routes,
        warnings,
    })
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

fn check_seconds(s: f64, key: &Key, err: &mut impl FnMut(&Key, String)) {
    if !(s.is_finite() && s > 0.0 && s < 1e9) {
        err(key, format!("must be a positive number of seconds, not {s}"));
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn parse_addr(s: &str, key: &Key, err: &mut impl FnMut(&Key, String)) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            err(key, format!("`{s}` is not an address:port such as 0.0.0.0:8443"));
            None
        }
    }
}

/// https, or plain http only to a loopback address: a token service reached in clear text over a network
/// could hand out any key.
pub fn check_fetch_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    let host = uri.host().ok_or_else(|| format!("`{url}` has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback(host) => Ok(()),
        Some("http") => Err(format!("`{url}`: plain http is allowed only to a loopback address; use https")),
        _ => Err(format!("`{url}` must be an https URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn parse_upstream(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|_| format!("`{s}` is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!("`{s}`: the upstream must be an http:// or https:// URL"));
        }
    }
    if uri.authority().is_none() {
        return Err(format!("`{s}` has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{s}`: an upstream URL takes no query string"));
    }
    Ok(uri)
}

/// Reads a secret from an environment variable or a file (trailing newline trimmed). Never from the
/// config itself.
fn read_secret(
    env: Option<&str>,
    file: Option<&Path>,
    key: &Key,
    what: &str,
    err: &mut impl FnMut(&Key, String),
) -> Option<String> {
    match (env, file) {
        (Some(_), Some(_)) => {
            err(&key.field(&format!("{what}_file")), format!("set {what}_env or {what}_file, not both"));
            None
        }
        (Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                err(&key.field(&format!("{what}_env")), format!("environment variable `{var}` is not set"));
                None
            }
        },
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(v) if !v.trim().is_empty() => Some(v.trim_end_matches(['\r', '\n']).to_string()),
            Ok(_) => {
                err(&key.field(&format!("{what}_file")), format!("{} is empty", path.display()));
                None
            }
            Err(e) => {
                err(&key.field(&format!("{what}_file")), format!("cannot read {}: {e}", path.display()));
                None
            }
        },
        (None, None) => None,
    }
}
