//! One config generation (`Gateway`: routes, policy, token checkers, upstream client) and the `Runtime`
//! that holds the current one behind an atomic swap, so a reload never blocks the hot path.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::state::State;
use crate::token::Verifier;
use crate::token::dpop::DpopVerifier;

pub struct Gateway {
    pub config: Config,
    pub router: Router,
    pub verifier: Arc<Verifier>,
    pub dpop: DpopVerifier,
    pub forwarder: Forwarder,
    refreshers: Vec<JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.refreshers {
            t.abort();
        }
    }
}

impl Gateway {
    /// Builds everything a config needs, fetches the first key sets, and starts the JWKS refresh loops.
    /// `previous` is the generation being replaced, whose key sets carry over where the source is the same.
    pub async fn build(
        config: Config,
        metrics: &Metrics,
        previous: Option<&Gateway>,
    ) -> Result<Gateway, String> {
        let verifier = Arc::new(Verifier::new(&config, metrics).await?);
        if let Some(prev) = previous {
            for issuer in verifier.issuers() {
                let old = prev.verifier.issuers().find(|o| o.name == issuer.name);
                if let (Some(new), Some(old)) = (&issuer.jwt, old.and_then(|o| o.jwt.as_ref())) {
                    new.adopt_keys(old);
                }
            }
        }
        let forwarder = Forwarder::new(&config)?;
        let d = &config.dpop;
        let mut dpop = DpopVerifier::new(d.window, d.algorithms.clone(), d.replay_cache_entries);
        if let Some(prev) = previous {
            dpop.adopt(&prev.dpop);
        }
        let router = Router::new(&config.routes, metrics);
        let mut first = tokio::task::JoinSet::new();
        for issuer in verifier.issuers().filter(|i| i.jwt.is_some()).cloned() {
            first.spawn(async move {
                if let Some(j) = &issuer.jwt && j.refresh().await.is_err() {
                    tracing::warn!(issuer = %issuer.name, "no keys yet: its tokens get 503 until a fetch works");
                }
            });
        }
        while first.join_next().await.is_some() {}
        let mut refreshers = Vec::new();
        for issuer in verifier.issuers().filter(|i| i.jwt.is_some()).cloned() {
            refreshers.push(tokio::spawn(async move {
                let Some(j) = issuer.jwt.as_ref() else { return };
                loop {
                    tokio::time::sleep(j.next_refresh()).await;
                    let _ = j.refresh().await;
                }
            }));
        }
        Ok(Gateway { config, router, verifier, dpop, forwarder, refreshers })
    }
}

pub struct Runtime {
    gateway: ArcSwap<Gateway>,
    pub metrics: Metrics,
    /// Revocations and halts; outlives config generations.
    pub state: Arc<State>,
    pub config_path: Option<PathBuf>,
    request_ids: AtomicU64,
    /// Eight random hex digits and a dash: the start of every request id of this process.
    id_prefix: String,
}

impl Runtime {
    pub fn new(
        gateway: Gateway,
        metrics: Metrics,
        state: Arc<State>,
        config_path: Option<PathBuf>,
    ) -> Runtime {
        let mut seed = [0u8; 4];
        // Only used to tell replicas' request ids apart; a failure just means a zero prefix.
        let _ = aws_lc_rs::rand::fill(&mut seed);
        Runtime {
            gateway: ArcSwap::from_pointee(gateway),
            metrics,
            state,
            config_path,
            request_ids: AtomicU64::new(1),
            id_prefix: format!("{:08x}-", u32::from_be_bytes(seed)),
        }
    }

    pub fn current(&self) -> Arc<Gateway> {
        self.gateway.load_full()
    }

    pub fn swap(&self, gateway: Gateway) {
        self.gateway.store(Arc::new(gateway));
    }

    /// `<process prefix>-<sequence number, at least 10 digits>`.
    pub fn next_request_id(&self) -> String {
        request_id(&self.id_prefix, self.request_ids.fetch_add(1, Ordering::Relaxed))
    }

    /// Ready when every issuer has keys and the shared state store is reachable.
    pub fn ready(&self) -> bool {
        self.gateway.load().verifier.ready() && self.state.healthy()
    }

    /// Re-reads the config, the policies and the certificate. A config that fails validation is
    /// rejected with its errors and the running one keeps serving; in-flight requests keep the
    /// generation they started with.
    pub async fn reload(&self) -> Result<(), String> {
        let result = self.try_reload().await;
        let label = if result.is_ok() { "success" } else { "error" };
        self.metrics.config_reloads.with_label_values(&[label]).inc();
        match &result {
            Ok(()) => tracing::info!("config reloaded"),
            Err(e) => {
                tracing::error!(errors = %e, "config reload rejected; the running config keeps serving")
            }
        }
        crate::audit::admin("reload", "config", label, result.as_ref().err().map_or("", String::as_str));
        result
    }

    async fn try_reload(&self) -> Result<(), String> {
        let path = self.config_path.clone().ok_or("this gateway was not started from a config file")?;
        // Reading and checking the files is blocking work: off the thread that serves requests (on one
        // CPU there is only one).
        let config = tokio::task::spawn_blocking(move || Config::load(&path).map_err(|e| e.to_string()))
            .await
            .map_err(|e| format!("config reload: {e}"))??;
        let old = self.current();
        let fixed = [
            (config.server.listen != old.config.server.listen, "server.listen"),
            (config.server.admin_listen != old.config.server.admin_listen, "server.admin_listen"),
            (config.state != old.config.state, "state"),
        ];
        for (changed, key) in fixed {
            if changed {
                tracing::warn!(key, "changed in the config; takes effect only after a restart");
            }
        }
        let gateway = Gateway::build(config, &self.metrics, Some(&old)).await?;
        self.swap(gateway);
        Ok(())
    }
}

/// `prefix` then `n` in decimal, zero-padded to 10 digits.
fn request_id(prefix: &str, n: u64) -> String {
    let n = crate::audit::Decimal::new(n, 10);
    let mut id = String::with_capacity(prefix.len() + n.as_str().len());
    id.push_str(prefix);
    id.push_str(n.as_str());
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_the_prefix_and_a_zero_padded_sequence_number() {
        for n in [0, 1, 42, 9_999_999_999, 10_000_000_000, u64::MAX] {
            assert_eq!(super::request_id("0badf00d-", n), format!("0badf00d-{n:010}"));
        }
    }
}
