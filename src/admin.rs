//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the admin API (`/admin/revocations`,
//! `/admin/halts`, `/admin/reload`) behind a bearer admin token. Plain HTTP/1.1, meant for a loopback or
//! cluster-internal address only.

// Admin handlers return a ready response as their error: the path is cold, and it keeps each handler a
// plain `?` flow.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;

use aws_lc_rs::{constant_time, digest};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit;
use crate::policy::Jurisdiction;
use crate::runtime::Runtime;
use crate::state::{Halt, HaltBy, Revocation, RevokeBy, StoreError, new_id};
use crate::token::now_secs;
use crate::{Body, full_body};

const MAX_ADMIN_BODY: usize = 64 * 1024;

pub async fn serve(rt: Arc<Runtime>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(rt.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full_body(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn json_reply(status: StatusCode, v: Value) -> Response<Body> {
    text(status, "application/json", v.to_string())
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_reply(status, json!({ "error": message }))
}

async fn handle(rt: Arc<Runtime>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => text(StatusCode::OK, "text/plain; version=0.0.4", rt.metrics.render()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") if rt.ready() => text(StatusCode::OK, "text/plain", "ready\n"),
        (&Method::GET, "/readyz") => {
            let why = if rt.state.healthy() { "token keys not loaded" } else { "state store unreachable" };
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n"))
        }
        _ if path == "/admin" || path.starts_with("/admin/") => admin(&rt, req).await,
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(resp)
}

/// Compares the presented bearer token with the configured one in constant time (over digests, so the
/// length does not leak either).
fn authorized(rt: &Runtime, req: &Request<Incoming>) -> Result<(), Response<Body>> {
    let Some(expected) = rt.current().config.admin.token.clone() else {
        return Err(error(StatusCode::NOT_FOUND, "the admin API is off: no admin token is configured"));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let unauthorized = || {
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid admin token is required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"admin\""));
        r
    };
    let presented = presented.ok_or_else(unauthorized)?;
    let a = digest::digest(&digest::SHA256, presented.as_bytes());
    let b = digest::digest(&digest::SHA256, expected.as_bytes());
    constant_time::verify_slices_are_equal(a.as_ref(), b.as_ref()).map_err(|_| unauthorized())
}

async fn admin(rt: &Runtime, req: Request<Incoming>) -> Response<Body> {
    if let Err(resp) = authorized(rt, &req) {
        return resp;
    }
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(2).collect();
    let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large"),
    };
    match (&method, segments.as_slice()) {
        (&Method::GET, ["revocations"]) => {
            json_reply(StatusCode::OK, json!({"revocations": rt.state.entries().revocations}))
        }
        (&Method::GET, ["halts"]) => json_reply(StatusCode::OK, json!({"halts": rt.state.entries().halts})),
        (&Method::POST, ["revocations"]) => add_revocation(rt, &body).await,
        (&Method::POST, ["halts"]) => add_halt(rt, &body).await,
        (&Method::DELETE, ["revocations", id]) => remove(rt, "revocation", id).await,
        (&Method::DELETE, ["halts", id]) => remove(rt, "halt", id).await,
        (&Method::POST, ["reload"]) => match rt.reload().await {
            Ok(()) => json_reply(StatusCode::OK, json!({"result": "reloaded"})),
            Err(e) => json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"result": "rejected", "errors": e.lines().collect::<Vec<_>>()}),
            ),
        },
        _ => error(StatusCode::NOT_FOUND, "unknown admin endpoint"),
    }
}

/// Records the action in the audit log and the metrics, then builds the reply.
fn outcome(
    rt: &Runtime,
    action: &str,
    entry: &str,
    result: Result<Response<Body>, Response<Body>>,
) -> Response<Body> {
    let (label, resp) = match result {
        Ok(r) => ("success", r),
        Err(r) => ("error", r),
    };
    rt.metrics.admin_actions.with_label_values(&[action, label]).inc();
    audit::admin(action, entry, label, resp.status().as_str());
    resp
}

fn store_error(e: StoreError) -> Response<Body> {
    match e {
        StoreError::Unavailable => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        StoreError::Io(_) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Exactly one of the named fields, as a non-empty string.
fn one_of<'a>(v: &'a Value, fields: &[&'a str]) -> Result<(&'a str, String), String> {
    let present: Vec<(&str, &Value)> = fields.iter().filter_map(|f| v.get(*f).map(|x| (*f, x))).collect();
    match present.as_slice() {
        [(f, Value::String(s))] if !s.trim().is_empty() => Ok((f, s.trim().to_string())),
        [(f, _)] => Err(format!("`{f}` must be a non-empty string")),
        _ => Err(format!("give exactly one of {}", fields.join(", "))),
    }
}

/// The JSON object of an admin request, refusing fields the endpoint does not know.
fn parse_request(body: &[u8], allowed: &[&str]) -> Result<Value, Response<Body>> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| error(StatusCode::BAD_REQUEST, "expected a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            &format!("unknown field `{k}`; known: {}", allowed.join(", ")),
        ));
    }
    Ok(v)
}

/// An issuer named by its config name or its `iss` URL, as its config name.
fn issuer_name(rt: &Runtime, given: &str) -> Result<String, Response<Body>> {
    let gw = rt.current();
    let found = gw.config.issuers.iter().find(|c| c.name == given || c.issuer == given);
    found
        .map(|c| c.name.clone())
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, &format!("unknown issuer `{given}`")))
}

async fn add_revocation(rt: &Runtime, body: &[u8]) -> Response<Body> {
    let result = async {
        let v = parse_request(body, &["jti", "sub", "client_id", "issuer", "expires_at", "reason"])?;
        let (field, value) =
            one_of(&v, &["jti", "sub", "client_id"]).map_err(|e| error(StatusCode::BAD_REQUEST, &e))?;
        let by = match field {
            "jti" => RevokeBy::Jti,
            "sub" => RevokeBy::Sub,
            _ => RevokeBy::ClientId,
        };
        let issuer = match v.get("issuer") {
            None => None,
            Some(Value::String(i)) => Some(issuer_name(rt, i)?),
            Some(_) => return Err(error(StatusCode::BAD_REQUEST, "`issuer` must be a string")),
        };
        let expires_at = match v.get("expires_at") {
            None => None,
            Some(e) => Some(
                e.as_u64().ok_or_else(|| error(StatusCode::BAD_REQUEST, "`expires_at` is unix seconds"))?,
            ),
        };
        let reason = v.get("reason").and_then(Value::as_str).map(str::to_string);
        let entry =
            Revocation { id: new_id(), by, value, issuer, expires_at, created_at: now_secs(), reason };
        let id = entry.id.clone();
        store(rt, id, |e| e.revocations.push(entry)).await
    }
    .await;
    created(rt, "revoke", result)
}

async fn add_halt(rt: &Runtime, body: &[u8]) -> Response<Body> {
    let result = async {
        let v = parse_request(body, &["jurisdiction", "route", "issuer", "reason"])?;
        let (field, value) = one_of(&v, &["jurisdiction", "route", "issuer"])
            .map_err(|e| error(StatusCode::BAD_REQUEST, &e))?;
        let reason = match v.get("reason").and_then(Value::as_str).map(str::trim) {
            Some(r) if !r.is_empty() => r.to_string(),
            _ => return Err(error(StatusCode::BAD_REQUEST, "a halt needs a `reason`")),
        };
        let gw = rt.current();
        let (by, value) = match field {
            "jurisdiction" => {
                let j = gw
                    .config
                    .policy
                    .resolve(&value)
                    .or_else(|| Jurisdiction::parse(&value).filter(Jurisdiction::is_assigned))
                    .ok_or_else(|| {
                        error(StatusCode::BAD_REQUEST, &format!("`{value}` is not a jurisdiction"))
                    })?;
                (HaltBy::Jurisdiction, j.to_string())
            }
            "route" => {
                if gw.router.get(&value).is_none() {
                    return Err(error(StatusCode::BAD_REQUEST, &format!("unknown route `{value}`")));
                }
                (HaltBy::Route, value)
            }
            _ => (HaltBy::Issuer, issuer_name(rt, &value)?),
        };
        let entry = Halt { id: new_id(), by, value, reason, created_at: now_secs() };
        let id = entry.id.clone();
        store(rt, id, |e| e.halts.push(entry)).await
    }
    .await;
    created(rt, "halt", result)
}

/// Adds a new entry through the state store; the id is what the caller hands back.
async fn store(
    rt: &Runtime,
    id: String,
    add: impl FnOnce(&mut crate::state::Entries),
) -> Result<String, Response<Body>> {
    rt.state
        .change(|e| {
            add(e);
            true
        })
        .await
        .map_err(store_error)?;
    Ok(id)
}

/// The reply to a create: 201 with the new id, or the error; audited and counted either way.
fn created(rt: &Runtime, action: &str, result: Result<String, Response<Body>>) -> Response<Body> {
    match result {
        Ok(id) => {
            let resp = json_reply(StatusCode::CREATED, json!({ "id": id }));
            outcome(rt, action, &id, Ok(resp))
        }
        Err(resp) => outcome(rt, action, "", Err(resp)),
    }
}

async fn remove(rt: &Runtime, kind: &str, id: &str) -> Response<Body> {
    let id = id.to_string();
    let changed = rt
        .state
        .change(|e| {
            let before = e.revocations.len() + e.halts.len();
            match kind {
                "revocation" => e.revocations.retain(|r| r.id != id),
                _ => e.halts.retain(|h| h.id != id),
            }
            before != e.revocations.len() + e.halts.len()
        })
        .await;
    let action = if kind == "revocation" { "lift_revocation" } else { "lift_halt" };
    let result = match changed {
        Ok(true) => Ok(json_reply(StatusCode::OK, json!({ "id": id, "result": "lifted" }))),
        Ok(false) => Err(error(StatusCode::NOT_FOUND, &format!("no {kind} with id `{id}`"))),
        Err(e) => Err(store_error(e)),
    };
    outcome(rt, action, &id, result)
}
