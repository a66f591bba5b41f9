//! The decision for one request. `handle()` does the metrics, the audit line and the synthetic response
//! around `handle_inner()`, which is the plain `?` flow of the design's request diagram.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::Body;
use crate::audit::Record;
use crate::config::Mode;
use crate::config::RouteConfig;
use crate::deny::{Block, Denial, Outcome};
use crate::forward::{request_authority, request_host};
use crate::limits::{GuardedBody, Trip, Tripped};
use crate::route::path_is_normal;
use crate::runtime::{Gateway, Runtime};
use crate::token::Principal;
use crate::token::dpop::{DpopError, RequestUrl};
use crate::token::extract::Scheme;
use crate::token::{Presented, TokenError, Unavailable, extract};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub async fn handle(
    rt: Arc<Runtime>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let gw = rt.current();
    let mut rec = Record {
        request_id: rt.next_request_id(),
        method: req.method().clone(),
        uri: req.uri().clone(),
        ..Record::default()
    };
    let result = handle_inner(&rt, &gw, &conn, req, &mut rec).await;
    let route = rec.route.as_ref();

    let (mut resp, outcome, reason) = match result {
        Ok(resp) => (resp, Outcome::Forwarded, rec.would_block.unwrap_or("allowed")),
        Err(denial) => {
            let jurisdiction = route.map(|r| r.config.jurisdiction);
            let resp = denial.respond(
                &gw.config.server.realm,
                gw.dpop.algs(),
                route.map(|r| r.config.name.as_str()),
                jurisdiction.as_ref(),
            );
            if let (Denial::Residency { .. }, Some(r)) = (&denial, route) {
                let c = &r.config;
                rt.metrics.transfer_blocked(
                    &c.name,
                    c.jurisdiction.as_str(),
                    denial.reason(),
                    &c.data_class,
                    false,
                );
            }
            (resp, denial.outcome(), denial.reason().as_str())
        }
    };
    match route {
        Some(r) => {
            r.metrics.outcome(outcome).inc();
            r.metrics.duration.observe(start.elapsed().as_secs_f64());
        }
        None => rt.metrics.requests.with_label_values(&["", outcome.as_str()]).inc(),
    }
    let decision = if outcome == Outcome::Forwarded { "forward" } else { "block" };
    rec.emit(decision, reason, resp.status().as_u16());
    if let Ok(id) = HeaderValue::from_str(&rec.request_id) {
        resp.headers_mut().insert("x-request-id", id);
    }
    Ok(resp)
}

async fn handle_inner(
    rt: &Runtime,
    gw: &Gateway,
    conn: &ConnInfo,
    req: Request<Incoming>,
    rec: &mut Record,
) -> Result<Response<Body>, Denial> {
    let limits = &gw.config.server.limits;
    if req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > limits.max_uri_bytes {
        return Err(Denial::UriTooLong);
    }
    if extract::token_in_query(req.uri()) {
        return Err(Denial::TokenInUrl);
    }
    if !path_is_normal(req.uri().path()) {
        return Err(Denial::InvalidPath);
    }
    let path = req.uri().path();
    // The admin API lives on the admin listener only; the data plane never exposes or forwards it.
    if path == "/admin" || path.starts_with("/admin/") {
        return Err(Denial::NoRoute);
    }
    let route = gw.router.find(request_host(&req), path).ok_or(Denial::NoRoute)?.clone();
    let rc = &route.config;
    rec.route = Some(route.clone());

    let (scheme, token) = extract::credentials(req.headers())?;
    let presented = Presented::new(token);
    rec.fingerprint = Some(presented.fingerprint());
    let principal = match gw.verifier.check(rc, &presented).await {
        Err(Unavailable) => return Err(Denial::TokenService),
        Ok(Err(e)) => return Err(Denial::Token(e)),
        Ok(Ok(p)) => p,
    };
    rec.principal = Some(principal.clone());

    check_binding(gw, rc, conn, &req, scheme, token, &principal)?;

    // Revocations and halts are looked up on every request, cached validation or not.
    if !rt.state.loaded() {
        return Err(Denial::TokenService);
    }
    if rt.state.revoked(&principal).is_some() {
        return Err(Denial::Token(TokenError::Revoked));
    }
    if rt.state.halted(&rc.name, &rc.jurisdiction, &principal.issuer) {
        return Err(Denial::Residency {
            block: Block::Halted,
            route: rc.name.clone(),
            jurisdiction: rc.jurisdiction,
        });
    }

    if let Err(refusal) = gw.config.policy.decide(&principal.allowed_regions, &rc.jurisdiction) {
        let block = Block::Policy(refusal);
        let denial = Denial::Residency { block, route: rc.name.clone(), jurisdiction: rc.jurisdiction };
        match rc.mode {
            Mode::Enforce => return Err(denial),
            Mode::Monitor => {
                let reason = denial.reason();
                rec.would_block = Some(reason.as_str());
                rt.metrics.transfer_blocked(&rc.name, rc.jurisdiction.as_str(), reason, &rc.data_class, true);
            }
        }
    }

    // A declared length over the limit is refused before a byte is read (and before `100 Continue`).
    if http_body::Body::size_hint(req.body()).lower() > rc.max_body_bytes {
        return Err(Denial::BodyTooLarge);
    }
    let tripped = Tripped::default();
    let req = req.map(|b| {
        GuardedBody::new(b, rc.max_body_bytes, limits.body_idle_timeout, tripped.clone()).boxed_unsync()
    });
    let result = gw.forwarder.forward(&route, req, conn, &rec.request_id).await;
    // A body cut off by a limit makes the upstream request fail: answer for the limit, not the upstream.
    match (result, tripped.get()) {
        (Err(_), Some(Trip::TooLarge)) => Err(Denial::BodyTooLarge),
        (Err(_), Some(Trip::Idle)) => Err(Denial::BodyTimeout),
        (Err(_), Some(Trip::Broken)) => Err(Denial::InvalidBody),
        (result, _) => result,
    }
}

/// What the connection tells about the client.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as a header value, made once per connection for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    /// SHA-256 of the client certificate verified during the TLS handshake (mutual TLS).
    pub client_cert_sha256: Option<[u8; 32]>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, client_cert_sha256: Option<[u8; 32]>) -> ConnInfo {
        let peer_ip = HeaderValue::try_from(peer.ip().to_string()).unwrap_or(HeaderValue::from_static(""));
        ConnInfo { peer, peer_ip, client_cert_sha256 }
    }
}

/// Sender-constrained tokens: a `cnf.x5t#S256` must match the connection's client certificate
/// (RFC 8705 §3), a `cnf.jkt` must come with a DPoP proof signed by that key (RFC 9449), and routes or
/// issuers that require it refuse tokens bound to neither.
fn check_binding(
    gw: &Gateway,
    route: &RouteConfig,
    conn: &ConnInfo,
    req: &Request<Incoming>,
    scheme: Scheme,
    token: &str,
    principal: &Principal,
) -> Result<(), Denial> {
    let cnf = principal.cnf.as_ref();
    let jkt = cnf.and_then(|c| c.get("jkt")).and_then(|v| v.as_str());
    let x5t = cnf.and_then(|c| c.get("x5t#S256")).and_then(|v| v.as_str());
    match scheme {
        Scheme::Dpop => {
            let proof = extract::dpop_proof(req.headers())
                .ok_or(DpopError::Invalid("one DPoP header is required"))?;
            let (host, port) =
                request_authority(req).ok_or(DpopError::Invalid("the request names no host"))?;
            let url = RequestUrl { host, port, path: req.uri().path() };
            let key = gw.dpop.verify(proof, req.method().as_str(), &url, token)?;
            if jkt != Some(key.as_str()) {
                return Err(Denial::Binding("the DPoP proof key is not the key the token is bound to"));
            }
        }
        Scheme::Bearer if jkt.is_some() => {
            return Err(Denial::Binding("a DPoP-bound token must be sent with the DPoP scheme and a proof"));
        }
        Scheme::Bearer => {}
    }
    if let Some(x5t) = x5t {
        let presented = conn.client_cert_sha256.map(|d| URL_SAFE_NO_PAD.encode(d));
        if presented.as_deref() != Some(x5t) {
            return Err(Denial::Binding(
                "the token is bound to a client certificate this connection did not present",
            ));
        }
    }
    let issuer_requires =
        gw.verifier.issuer(&principal.issuer).is_some_and(|i| i.config.require_bound_tokens);
    if (route.require_bound_tokens || issuer_requires) && jkt.is_none() && x5t.is_none() {
        return Err(Denial::Binding(
            "this route accepts only sender-constrained (mTLS- or DPoP-bound) tokens",
        ));
    }
    Ok(())
}
