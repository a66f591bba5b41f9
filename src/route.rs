//! Host and path -> route: the longest path prefix wins (on a segment boundary), a route with a host
//! beats one without for the same prefix.

use std::sync::Arc;

use crate::config::RouteConfig;
use crate::metrics::{Metrics, RouteMetrics};

pub struct Route {
    pub config: RouteConfig,
    pub metrics: RouteMetrics,
}

pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    pub fn new(routes: &[RouteConfig], metrics: &Metrics) -> Router {
        let mut routes: Vec<Arc<Route>> = routes
            .iter()
            .map(|r| Arc::new(Route { config: r.clone(), metrics: metrics.route(&r.name) }))
            .collect();
        routes.sort_by(|a, b| {
            let (a, b) = (&a.config, &b.config);
            b.path_prefix.len().cmp(&a.path_prefix.len()).then(b.host.is_some().cmp(&a.host.is_some()))
        });
        Router { routes }
    }

    /// `host` is the request's host without port, any case.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| {
            let c = &r.config;
            let host_ok = match (&c.host, host) {
                (None, _) => true,
                (Some(want), Some(h)) => want.eq_ignore_ascii_case(h),
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&c.path_prefix, path)
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.config.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

/// `/orders` matches `/orders` and `/orders/7`, not `/ordersX`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// Rejects paths an upstream could resolve to somewhere the route did not mean: dot segments (also
/// percent-encoded), encoded slashes and backslashes, and NUL.
pub fn path_is_normal(path: &str) -> bool {
    if !path.starts_with('/') {
        return path == "*";
    }
    plainly_normal(path) || normal_after_decoding(path)
}

/// The common path, without allocating: no escapes, no `;params`, no backslash, and no segment that
/// starts with a dot.
fn plainly_normal(path: &str) -> bool {
    !path.bytes().any(|b| matches!(b, b'%' | b';' | b'\\')) && !path.contains("/.")
}

fn normal_after_decoding(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") || path.contains('\\') {
        return false;
    }
    // `;params` are dropped before dot segments by servlet containers: `/..;/` is `..` to them.
    lower.split('/').all(|seg| {
        let decoded = seg.split(';').next().unwrap_or(seg).replace("%2e", ".");
        decoded != "." && decoded != ".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(prefix_matches("/orders", "/orders"));
        assert!(prefix_matches("/orders", "/orders/1"));
        assert!(!prefix_matches("/orders", "/ordersX"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
    }

    #[test]
    fn normal_paths() {
        assert!(path_is_normal("/orders/1"));
        assert!(path_is_normal("/a.b/c..d"));
        for bad in ["/orders/../admin", "/orders/./x", "/x/%2e%2e/y", "/x/.%2E/y", "/a%2fb", "/a\\b", "/a%00"]
        {
            assert!(!path_is_normal(bad), "{bad}");
        }
        assert!(path_is_normal("/.well-known/x"));
        assert!(!path_is_normal("/x/..;/admin"));
        assert!(!path_is_normal("/x/.."));
    }

    proptest::proptest! {
        /// The allocation-free check never passes a path the full one refuses.
        #[test]
        fn plain_check_agrees(path in "/[a./;%2eEfF5cC0\\\\]{0,12}") {
            proptest::prop_assert!(!plainly_normal(&path) || normal_after_decoding(&path));
        }
    }
}
