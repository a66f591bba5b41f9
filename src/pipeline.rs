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
use crate::deny::{Block, Denial, Outcome};
use crate::forward::request_host;
use crate::limits::{GuardedBody, Trip, Tripped};
use crate::route::{Route, path_is_normal};
use crate::runtime::{Gateway, Runtime};
use crate::token::{TokenError, Unavailable, extract, fingerprint};

pub async fn handle(
    rt: Arc<Runtime>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let gw = rt.current();
    let mut rec = Record {
        request_id: rt.next_request_id(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        ..Record::default()
    };
    let mut route: Option<Arc<Route>> = None;
    let result = handle_inner(&rt, &gw, peer, req, &mut rec, &mut route).await;

    let (mut resp, outcome, reason) = match result {
        Ok(resp) => (resp, Outcome::Forwarded, rec.would_block.unwrap_or("allowed")),
        Err(denial) => {
            let jurisdiction = route.as_ref().map(|r| r.config.jurisdiction);
            let resp = denial.respond(&gw.config.server.realm, rec.route.as_deref(), jurisdiction.as_ref());
            if let (Denial::Residency { .. }, Some(r)) = (&denial, &route) {
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
    match &route {
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
    peer: SocketAddr,
    req: Request<Incoming>,
    rec: &mut Record,
    route_out: &mut Option<Arc<Route>>,
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
    rec.route = Some(rc.name.clone());
    rec.jurisdiction = Some(rc.jurisdiction.to_string());
    rec.data_class = Some(rc.data_class.clone());
    rec.mode = Some(match rc.mode {
        Mode::Enforce => "enforce",
        Mode::Monitor => "monitor",
    });
    *route_out = Some(route.clone());

    let token = extract::bearer(req.headers())?;
    rec.fingerprint = Some(fingerprint(token));
    let principal = match gw.verifier.check(rc, token).await {
        Err(Unavailable) => return Err(Denial::TokenService),
        Ok(Err(e)) => return Err(Denial::Token(e)),
        Ok(Ok(p)) => p,
    };
    rec.principal = Some(principal.clone());

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
    let result = gw.forwarder.forward(&route, req, peer, &rec.request_id).await;
    // A body cut off by a limit makes the upstream request fail: answer for the limit, not the upstream.
    match (result, tripped.get()) {
        (Err(_), Some(Trip::TooLarge)) => Err(Denial::BodyTooLarge),
        (Err(_), Some(Trip::Idle)) => Err(Denial::BodyTimeout),
        (result, _) => result,
    }
}
