//! One JSON audit line per decision and per admin action (tracing, target `audit`, on stdout through a
//! non-blocking writer). Never a raw token, never a query string.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::token::Principal;

/// What one request led to, filled in as the pipeline learns it.
#[derive(Default)]
pub struct Record {
    pub request_id: String,
    pub route: Option<String>,
    pub method: String,
    /// The path only: a query string can carry personal data or a token.
    pub path: String,
    pub jurisdiction: Option<String>,
    pub data_class: Option<String>,
    pub mode: Option<&'static str>,
    pub fingerprint: Option<String>,
    pub principal: Option<std::sync::Arc<Principal>>,
    /// Set on monitor-mode routes when the request was forwarded but would have been blocked.
    pub would_block: Option<&'static str>,
}

impl Record {
    /// Writes the line. `decision` is `forward` or `block`; `reason` a stable reason code.
    pub fn emit(&self, decision: &str, reason: &str, status: u16) {
        let p = self.principal.as_deref();
        let regions = p.and_then(|p| p.allowed_regions.as_ref()).map(|r| r.join(" "));
        tracing::info!(
            target: "audit",
            request_id = %self.request_id,
            route = self.route.as_deref(),
            method = %self.method,
            path = %self.path,
            jurisdiction = self.jurisdiction.as_deref(),
            data_class = self.data_class.as_deref(),
            mode = self.mode,
            decision,
            reason,
            would_block = self.would_block,
            status,
            issuer = p.map(|p| &*p.issuer),
            subject = p.and_then(|p| p.sub.as_deref()),
            client_id = p.and_then(|p| p.client_id.as_deref()),
            token_fingerprint = self.fingerprint.as_deref(),
            allowed_regions = regions.as_deref(),
        );
    }
}

/// An admin action: what was done, to which entry, and how it went.
pub fn admin(action: &str, entry: &str, result: &str, detail: &str) {
    tracing::info!(target: "audit", decision = "admin", action, entry, result, detail);
}

/// Audit lines as JSON on stdout, operational logs as text on stderr (`RUST_LOG` filters them).
/// The returned guard flushes the audit writer when dropped.
pub fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let (stdout, guard) = tracing_appender::non_blocking(std::io::stdout());
    let audit = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(stdout)
        .with_filter(Targets::new().with_target("audit", LevelFilter::INFO));
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() != "audit"))
        .with_filter(env);
    let _ = tracing_subscriber::registry().with(audit).with(logs).try_init();
    guard
}
