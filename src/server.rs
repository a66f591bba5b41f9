//! Listeners: the TLS data plane (accept, handshake with a deadline, HTTP/1.1 and HTTP/2 through
//! hyper-util with a header-read timeout) and the plain admin listener, plus graceful drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::runtime::{Gateway, Runtime};

/// A running gateway.
pub struct Handle {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub runtime: Arc<Runtime>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Handle {
    /// Stops accepting, lets in-flight requests finish within the grace period, and returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Resolves when the gateway has stopped by itself (a listener failed).
    pub async fn stopped(&mut self) {
        let _ = self.tasks.join_next().await;
    }
}

/// Binds the listeners and starts serving `config`.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Handle, String> {
    let metrics = Metrics::new();
    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    let state = crate::state::State::open(&config.state, &metrics).await?;
    if config.admin.token.is_none() {
        tracing::warn!("no admin token configured ([admin] token_env or token_file): the admin API is off");
    }
    let gateway = Gateway::build(config, &metrics).await?;
    let runtime = Arc::new(Runtime::new(gateway, metrics, state, config_path));
    let data = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = data.local_addr().map_err(|e| e.to_string())?;
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(serve_data(runtime.clone(), data, stop_rx.clone()));
    let admin_addr = match admin_listen {
        Some(a) => {
            let l = TcpListener::bind(a).await.map_err(|e| format!("cannot listen on {a}: {e}"))?;
            let admin_addr = l.local_addr().map_err(|e| e.to_string())?;
            tasks.spawn(crate::admin::serve(runtime.clone(), l, stop_rx));
            Some(admin_addr)
        }
        None => None,
    };
    tracing::info!(%addr, admin = ?admin_addr, "residency-gateway listening");
    Ok(Handle { addr, admin_addr, runtime, stop, tasks })
}

async fn serve_data(rt: Arc<Runtime>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let rt = rt.clone();
        let watcher = graceful.watcher();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let gw = rt.current();
            let server = &gw.config.server;
            let acceptor = TlsAcceptor::from(server.tls.config.clone());
            let handshake = tokio::select! {
                r = tokio::time::timeout(server.handshake_timeout, acceptor.accept(tcp)) => r,
                _ = stop.changed() => return,
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    rt.metrics.tls_failures.with_label_values(&[crate::tls::failure_reason(&e)]).inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    rt.metrics.tls_failures.with_label_values(&["timeout"]).inc();
                    return;
                }
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(server.header_read_timeout);
            builder.http2().timer(TokioTimer::new());
            drop(gw);
            let svc_rt = rt.clone();
            let service = service_fn(move |req| crate::pipeline::handle(svc_rt.clone(), peer, req));
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = rt.current().config.server.shutdown_grace;
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}
