//! residency-gateway: a reverse proxy that stops personal data from crossing a border the caller's
//! token does not allow.
//!
//! The flow of one request (`pipeline::handle`):
//! 1. TLS is terminated with a strict allowlist (`tls`, `server`).
//! 2. A token in the URL is refused; the route is chosen by host and longest path prefix (`route`).
//! 3. The bearer token comes from the one `Authorization` header (`token::extract`).
//! 4. It is verified as a JWT against its issuer's JWKS or introspected (RFC 7662), through one cache
//!    (`token`).
//! 5. The upstream's jurisdiction is compared with the token's allowed regions (`policy`), every time.
//! 6. The request is streamed to the upstream (`forward`), or refused by `deny` with a reason code.
//! 7. Every decision moves a metric (`metrics`) and writes one audit line (`audit`).

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod deny;
pub mod dev;
pub mod explain;
pub mod forward;
pub mod iso3166;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod route;
pub mod runtime;
pub mod server;
pub mod state;
pub mod tls;
pub mod token;

/// Errors carried inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway sends and every request it forwards.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// A complete, in-memory body.
pub fn full_body(bytes: bytes::Bytes) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}
