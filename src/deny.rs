//! The one place a denial becomes an HTTP response: status, `WWW-Authenticate` challenge and a
//! `application/problem+json` body, plus the stable reason code shared with audit lines and metrics.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::Body;
use crate::policy::{Jurisdiction, Refusal};
use crate::token::TokenError;
use crate::token::dpop::DpopError;

/// Stable snake_case reason codes: the same word in the response body, the audit line and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Allowed,
    NoRoute,
    InvalidPath,
    MissingToken,
    MalformedToken,
    DuplicateToken,
    TokenInUrl,
    InvalidToken,
    ExpiredToken,
    TokenRevoked,
    RegionNotAllowed,
    NoResidencyClaim,
    FlowHalted,
    TokenServiceUnavailable,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamInvalidResponse,
    UriTooLong,
    BodyTooLarge,
    BodyTimeout,
    InvalidBody,
    TokenBindingMismatch,
    DpopInvalid,
    DpopReplay,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::NoRoute => "no_route",
            Reason::InvalidPath => "invalid_path",
            Reason::MissingToken => "missing_token",
            Reason::MalformedToken => "malformed_token",
            Reason::DuplicateToken => "duplicate_token",
            Reason::TokenInUrl => "token_in_url",
            Reason::InvalidToken => "invalid_token",
            Reason::ExpiredToken => "expired_token",
            Reason::TokenRevoked => "token_revoked",
            Reason::RegionNotAllowed => "region_not_allowed",
            Reason::NoResidencyClaim => "no_residency_claim",
            Reason::FlowHalted => "flow_halted",
            Reason::TokenServiceUnavailable => "token_service_unavailable",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::UpstreamInvalidResponse => "upstream_invalid_response",
            Reason::UriTooLong => "uri_too_long",
            Reason::BodyTooLarge => "body_too_large",
            Reason::BodyTimeout => "body_timeout",
            Reason::InvalidBody => "invalid_body",
            Reason::TokenBindingMismatch => "token_binding_mismatch",
            Reason::DpopInvalid => "dpop_invalid",
            Reason::DpopReplay => "dpop_replay",
        }
    }
}

/// The `outcome` label of `requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded = 0,
    Blocked,
    Unauthorized,
    BadRequest,
    UpstreamError,
    Unavailable,
    NoRoute,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Forwarded,
        Outcome::Blocked,
        Outcome::Unauthorized,
        Outcome::BadRequest,
        Outcome::UpstreamError,
        Outcome::Unavailable,
        Outcome::NoRoute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Blocked => "blocked",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Unavailable => "unavailable",
            Outcome::NoRoute => "no_route",
        }
    }
}

/// Why a residency check blocked the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Policy(Refusal),
    Halted,
}

/// Every way a request can be refused.
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    #[error("no route matches this request")]
    NoRoute,
    #[error("the path contains dot segments or an encoded slash")]
    InvalidPath,
    #[error("no bearer token in the Authorization header")]
    MissingToken,
    #[error("the Authorization header is not a well-formed bearer token")]
    MalformedToken,
    #[error("more than one Authorization header, or a token sent more than one way")]
    DuplicateToken,
    #[error("access tokens are accepted only in the Authorization header, never in the URL")]
    TokenInUrl,
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{}", block_detail(*.block, .jurisdiction, .route))]
    Residency { block: Block, route: String, jurisdiction: Jurisdiction },
    #[error("the token service could not be reached; try again later")]
    TokenService,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the upstream sent an invalid response")]
    UpstreamInvalid,
    #[error("the request URI is longer than this gateway accepts")]
    UriTooLong,
    #[error("the request body is larger than this route accepts")]
    BodyTooLarge,
    #[error("the request body stopped arriving")]
    BodyTimeout,
    #[error("the request body is not validly framed")]
    InvalidBody,
    /// A sender-constrained token used without its binding, or a route that demands one.
    #[error("{0}")]
    Binding(&'static str),
    #[error("{0}")]
    Dpop(#[from] DpopError),
}

fn block_detail(block: Block, jurisdiction: &Jurisdiction, route: &str) -> String {
    match block {
        Block::Policy(Refusal::RegionNotAllowed) => {
            format!(
                "the token's allowed regions do not include {jurisdiction}, where route {route} sends data"
            )
        }
        Block::Policy(Refusal::NoResidencyClaim) => {
            "the token carries no usable allowed-regions claim, so no transfer is allowed".to_string()
        }
        Block::Halted => {
            format!("transfers to {jurisdiction} on route {route} are halted by the operator")
        }
    }
}

impl Denial {
    pub fn reason(&self) -> Reason {
        match self {
            Denial::NoRoute => Reason::NoRoute,
            Denial::InvalidPath => Reason::InvalidPath,
            Denial::MissingToken => Reason::MissingToken,
            Denial::MalformedToken => Reason::MalformedToken,
            Denial::DuplicateToken => Reason::DuplicateToken,
            Denial::TokenInUrl => Reason::TokenInUrl,
            Denial::Token(e) => e.reason(),
            Denial::Residency { block: Block::Policy(Refusal::RegionNotAllowed), .. } => {
                Reason::RegionNotAllowed
            }
            Denial::Residency { block: Block::Policy(Refusal::NoResidencyClaim), .. } => {
                Reason::NoResidencyClaim
            }
            Denial::Residency { block: Block::Halted, .. } => Reason::FlowHalted,
            Denial::TokenService => Reason::TokenServiceUnavailable,
            Denial::UpstreamUnreachable => Reason::UpstreamUnreachable,
            Denial::UpstreamTimeout => Reason::UpstreamTimeout,
            Denial::UpstreamInvalid => Reason::UpstreamInvalidResponse,
            Denial::UriTooLong => Reason::UriTooLong,
            Denial::BodyTooLarge => Reason::BodyTooLarge,
            Denial::BodyTimeout => Reason::BodyTimeout,
            Denial::InvalidBody => Reason::InvalidBody,
            Denial::Binding(_) => Reason::TokenBindingMismatch,
            Denial::Dpop(DpopError::Invalid(_)) => Reason::DpopInvalid,
            Denial::Dpop(DpopError::Replay) => Reason::DpopReplay,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Denial::NoRoute => Outcome::NoRoute,
            Denial::InvalidPath
            | Denial::DuplicateToken
            | Denial::TokenInUrl
            | Denial::UriTooLong
            | Denial::BodyTooLarge
            | Denial::BodyTimeout
            | Denial::InvalidBody => Outcome::BadRequest,
            Denial::MissingToken
            | Denial::MalformedToken
            | Denial::Token(_)
            | Denial::Binding(_)
            | Denial::Dpop(_) => Outcome::Unauthorized,
            Denial::Residency { .. } => Outcome::Blocked,
            Denial::TokenService => Outcome::Unavailable,
            Denial::UpstreamUnreachable | Denial::UpstreamTimeout | Denial::UpstreamInvalid => {
                Outcome::UpstreamError
            }
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Denial::NoRoute => StatusCode::NOT_FOUND,
            Denial::InvalidPath | Denial::DuplicateToken | Denial::TokenInUrl => StatusCode::BAD_REQUEST,
            Denial::MissingToken
            | Denial::MalformedToken
            | Denial::Token(_)
            | Denial::Binding(_)
            | Denial::Dpop(_) => StatusCode::UNAUTHORIZED,
            Denial::Residency { .. } => StatusCode::FORBIDDEN,
            Denial::TokenService => StatusCode::SERVICE_UNAVAILABLE,
            Denial::UpstreamUnreachable | Denial::UpstreamInvalid => StatusCode::BAD_GATEWAY,
            Denial::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Denial::UriTooLong => StatusCode::URI_TOO_LONG,
            Denial::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Denial::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Denial::InvalidBody => StatusCode::BAD_REQUEST,
        }
    }

    /// The RFC 6750 §3 challenge, when this denial has one.
    fn challenge(&self, realm: &str, dpop_algs: &str) -> Option<String> {
        let with_error = |error: &str, description: &str| {
            format!("Bearer realm=\"{realm}\", error=\"{error}\", error_description=\"{description}\"")
        };
        match self {
            // §3.1: a request without credentials gets no error code.
            Denial::MissingToken => Some(format!("Bearer realm=\"{realm}\"")),
            Denial::MalformedToken | Denial::DuplicateToken | Denial::TokenInUrl => {
                Some(with_error("invalid_request", &self.to_string()))
            }
            Denial::Token(e) => Some(with_error("invalid_token", e.description())),
            Denial::Binding(why) => Some(with_error("invalid_token", why)),
            // RFC 9449 §7.1: a DPoP challenge naming the algorithms a proof may use.
            Denial::Dpop(e) => Some(format!(
                "DPoP algs=\"{dpop_algs}\", error=\"invalid_dpop_proof\", error_description=\"{e}\""
            )),
            Denial::Residency { .. } => Some(with_error("insufficient_scope", &self.to_string())),
            Denial::NoRoute
            | Denial::InvalidPath
            | Denial::TokenService
            | Denial::UpstreamUnreachable
            | Denial::UpstreamTimeout
            | Denial::UpstreamInvalid
            | Denial::UriTooLong
            | Denial::BodyTooLarge
            | Denial::BodyTimeout
            | Denial::InvalidBody => None,
        }
    }

    /// The response. Nothing in it comes from the token or the query string.
    pub fn respond(
        &self,
        realm: &str,
        dpop_algs: &str,
        route: Option<&str>,
        jurisdiction: Option<&Jurisdiction>,
    ) -> Response<Body> {
        let status = self.status();
        let mut body = serde_json::json!({
            "type": format!("https://residency-gateway.dev/problems/{}", self.reason().as_str()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
            "reason": self.reason().as_str(),
        });
        if let Some(r) = route {
            body["route"] = r.into();
        }
        if let Some(j) = jurisdiction {
            body["jurisdiction"] = j.as_str().into();
        }
        let mut resp = Response::new(crate::full_body(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(c) = self.challenge(realm, dpop_algs) {
            // Every part is ASCII from this crate or the config's realm, which validation keeps printable.
            if let Ok(v) = HeaderValue::from_str(&c) {
                headers.insert(WWW_AUTHENTICATE, v);
            }
        }
        if matches!(self, Denial::TokenService) {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}
