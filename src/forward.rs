//! The upstream client (pooled, HTTP/1.1 and HTTP/2, rustls with the gateway's allowlist) and the
//! header rewriting around it: hop-by-hop stripping both ways and X-Forwarded-* set by the gateway only.

use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::Body;
use crate::config::{Config, IpNet, UpstreamConfig};
use crate::deny::Denial;
use crate::pipeline::ConnInfo;
use crate::route::Route;

pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    settings: UpstreamConfig,
    trusted_proxies: Vec<IpNet>,
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

impl Forwarder {
    pub fn new(config: &Config) -> Result<Forwarder, String> {
        let settings = config.upstream.clone();
        let roots = crate::tls::roots(settings.ca_file.as_deref())?;
        let identity = settings.client_identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let tls = config.server.tls.policy.client_config_with_cert(roots, &[], identity)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Forwarder { client, settings, trusted_proxies: config.server.trusted_proxies.clone() })
    }

    /// Sends `req` to the route's upstream and streams the response back.
    pub async fn forward(
        &self,
        route: &Route,
        mut req: Request<Body>,
        conn: &ConnInfo,
        request_id: &str,
    ) -> Result<Response<Body>, Denial> {
        let upstream = &route.config.upstream;
        let original_host = request_host(&req).map(str::to_string);
        *req.uri_mut() = upstream_uri(upstream, req.uri()).map_err(|_| Denial::UpstreamInvalid)?;
        *req.version_mut() = http::Version::HTTP_11;
        let upgrade = upgrade_protocol(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let trusted = self.trusted_proxies.iter().any(|n| n.contains(conn.peer.ip()));
        let headers = req.headers_mut();
        // Only the chain a trusted proxy vouches for is kept; from anyone else it is replaced.
        let vouched = || headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok());
        let vouched = || vouched().map(str::trim).filter(|v| !v.is_empty());
        let chain = if trusted && vouched().next().is_some() {
            let chain = vouched().chain(conn.peer_ip.to_str().ok()).collect::<Vec<_>>().join(", ");
            HeaderValue::from_str(&chain).ok()
        } else {
            Some(conn.peer_ip.clone())
        };
        strip_hop_by_hop(headers);
        // `Expect` was answered at this hop (hyper sends `100 Continue` once the body is read).
        headers.remove(header::EXPECT);
        // The client's copies go first, so it can neither forge nor strip what the gateway sets.
        for h in [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST, &FORWARDED, &X_REQUEST_ID] {
            headers.remove(h);
        }
        if let Some(v) = chain {
            headers.insert(&X_FORWARDED_FOR, v);
        }
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        if let Some(h) = original_host.and_then(|h| HeaderValue::from_str(&h).ok()) {
            headers.insert(&X_FORWARDED_HOST, h);
        }
        if let Some(proto) = &upgrade {
            headers.insert(header::UPGRADE, proto.clone());
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(&X_REQUEST_ID, id);
        }
        if let Some(auth) = upstream.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            headers.insert(header::HOST, auth);
        }

        let start = Instant::now();
        let result = tokio::time::timeout(self.settings.response_timeout, self.client.request(req)).await;
        route.metrics.upstream.observe(start.elapsed().as_secs_f64());
        let resp = match result {
            Err(_) => return Err(Denial::UpstreamTimeout),
            // A TLS 1.3 server refuses a client certificate after the client's handshake is done, so
            // that refusal arrives with the request, not the connect: it is still an unreachable upstream.
            Ok(Err(e)) if e.is_connect() || caused_by_tls(&e) => {
                tracing::warn!(route = %route.config.name, error = %e, "upstream connect failed");
                return Err(Denial::UpstreamUnreachable);
            }
            Ok(Err(e)) => {
                tracing::warn!(route = %route.config.name, error = %e, "upstream request failed");
                return Err(Denial::UpstreamInvalid);
            }
            Ok(Ok(resp)) => resp,
        };
        let mut resp = resp;
        if let (Some(proto), Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
            (&upgrade, client_upgrade, resp.status())
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade, route.config.name.clone()));
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.insert(header::UPGRADE, proto.clone());
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            return Ok(Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()))
    }
}

fn caused_by_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let io_tls = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|i| i.is::<rustls::Error>());
        if err.is::<rustls::Error>() || io_tls {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The protocol an HTTP/1.1 upgrade asks for (`Connection: upgrade` plus `Upgrade: websocket`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks { headers.get(header::UPGRADE).cloned() } else { None }
}

/// Copies bytes both ways once client and upstream have both switched protocols. The request was
/// authorised before the upstream saw it; what flows after `101` is opaque to the gateway.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, route: String) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(%route, error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%route, error = %e, "tunnel closed with an error");
    }
}

/// The request's host without port: the URI authority (HTTP/2, absolute form) or the Host header.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    request_authority(req).map(|(host, _)| host)
}

/// The host and port the client addressed; 443 when it named no port (the data plane is https).
pub fn request_authority<B>(req: &Request<B>) -> Option<(&str, u16)> {
    let authority = match req.uri().authority() {
        Some(a) => a,
        None => {
            let raw = req.headers().get(header::HOST)?.as_bytes();
            // Parsed only to validate; the borrow below needs the header's own bytes.
            let _ = http::uri::Authority::try_from(raw).ok()?;
            return split_authority(std::str::from_utf8(raw).ok()?);
        }
    };
    split_authority(authority.as_str())
}

/// `host[:port]` or `[v6]:port` -> (host without brackets, port or 443).
fn split_authority(raw: &str) -> Option<(&str, u16)> {
    let raw = raw.rsplit('@').next()?;
    let (host, port) = match raw.strip_prefix('[') {
        Some(rest) => {
            let (h, tail) = rest.split_once(']')?;
            (h, tail.strip_prefix(':'))
        }
        None => match raw.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 443,
    };
    Some((host, port))
}

/// `https://up:8443/base` + `/orders/1?x=y` -> `https://up:8443/base/orders/1?x=y`.
fn upstream_uri(base: &Uri, incoming: &Uri) -> Result<Uri, http::Error> {
    let base_path = base.path().trim_end_matches('/');
    let pq = incoming.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut builder = Uri::builder();
    if let Some(s) = base.scheme() {
        builder = builder.scheme(s.clone());
    }
    if let Some(a) = base.authority() {
        builder = builder.authority(a.clone());
    }
    builder.path_and_query(format!("{base_path}{pq}")).build()
}

/// Removes RFC 9110 §7.6.1 connection-specific headers and every header the `Connection` header names.
/// `Content-Length` goes too when `Transfer-Encoding` is present, so the next hop cannot read the
/// framing differently.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_upstream_paths() {
        let j =
            |b: &str, i: &str| upstream_uri(&b.parse().unwrap(), &i.parse().unwrap()).unwrap().to_string();
        assert_eq!(j("https://up:8443", "/orders/1?x=y"), "https://up:8443/orders/1?x=y");
        assert_eq!(j("https://up:8443/", "/orders"), "https://up:8443/orders");
        assert_eq!(j("http://up/base/", "/orders"), "http://up/base/orders");
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn hosts() {
        assert_eq!(split_authority("api.example.com:8443"), Some(("api.example.com", 8443)));
        assert_eq!(split_authority("[::1]:8443"), Some(("::1", 8443)));
        assert_eq!(split_authority("api"), Some(("api", 443)));
        assert_eq!(split_authority("api:x"), None);
    }
}
