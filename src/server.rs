//! Listeners: the TLS data plane (accept, handshake with a deadline, HTTP/1.1 and HTTP/2 through
//! hyper-util with a header-read timeout) and the plain admin listener, plus graceful drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
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
    let gateway = Gateway::build(config, &metrics, None).await?;
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
    // Connection slots: bounded at start (a reload does not resize them), and the way drain knows when
    // every connection is gone.
    let max = rt.current().config.server.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let (kill, killed) = watch::channel(false);
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: the new connection is closed at once; the established ones are not disturbed.
            rt.metrics.connections_refused.inc();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection { rt: rt.clone(), stop: stop.clone(), killed: killed.clone() };
        tokio::spawn(async move {
            conn.serve(tcp, peer).await;
            drop(slot);
        });
    }
    drop(listener);
    let grace = rt.current().config.server.shutdown_grace;
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    match tokio::time::timeout(grace, slots.acquire_many(all)).await {
        Ok(_) => tracing::info!("all connections drained"),
        Err(_) => {
            tracing::warn!("grace period over; closing remaining connections");
            let _ = kill.send(true);
        }
    }
}

struct Connection {
    rt: Arc<Runtime>,
    stop: watch::Receiver<bool>,
    killed: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(mut self, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let rt = self.rt.clone();
        let gw = rt.current();
        let server = &gw.config.server;
        let limits = server.limits.clone();
        let header_timeout = server.header_read_timeout;
        let acceptor = TlsAcceptor::from(server.tls.config.clone());
        let handshake = tokio::select! {
            r = tokio::time::timeout(server.handshake_timeout, acceptor.accept(tcp)) => r,
            _ = self.stop.changed() => return,
        };
        drop(gw);
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
        // The protocol comes from ALPN, so hyper's HTTP/1 header timer runs from the first byte we wait for
        // (the auto-detecting builder would first wait, without a deadline, for enough bytes to guess).
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(limits.max_header_bytes)
            .max_headers(limits.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(limits.keep_alive_timeout / 2))
            .keep_alive_timeout(limits.keep_alive_timeout / 2);
        let builder = if h2 { builder.http2_only() } else { builder.http1_only() };
        let active =
            Arc::new(ActiveRequests { opened: tokio::time::Instant::now(), inner: Default::default() });
        let svc_active = active.clone();
        let svc_rt = rt.clone();
        let client_cert_sha256 =
            tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| crate::token::sha256(&[c]));
        let info = Arc::new(crate::pipeline::ConnInfo::new(peer, client_cert_sha256));
        let service = service_fn(move |req| {
            let guard = svc_active.enter();
            let rt = svc_rt.clone();
            let info = info.clone();
            async move {
                let resp = crate::pipeline::handle(rt, info, req).await;
                // The request counts as in flight until its response body has been sent.
                resp.map(|r| {
                    r.map(|body| {
                        body.map_frame(move |f| {
                            let _ = &guard;
                            f
                        })
                        .boxed_unsync()
                    })
                })
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
        tokio::pin!(conn);
        // A connection must bring its first request within the header timeout, and is closed after the
        // keep-alive timeout with nothing in flight: covers clients that complete TLS and send nothing,
        // HTTP/2 clients that never open a stream, and idle keep-alive connections.
        let limits = (header_timeout, limits.keep_alive_timeout);
        let mut draining = false;
        loop {
            // Re-checked at least this often, so the end of a request moves the deadline forward in time.
            let idle = active.deadline(limits).min(tokio::time::Instant::now() + limits.0.min(limits.1));
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.stop.changed(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = self.killed.changed() => return,
                _ = tokio::time::sleep_until(idle) => {
                    if !active.busy() && active.deadline(limits) <= tokio::time::Instant::now() {
                        return;
                    }
                }
            }
        }
    }
}

/// Requests in flight on one connection and when the last one ended.
struct ActiveRequests {
    opened: tokio::time::Instant,
    inner: std::sync::Mutex<(usize, Option<tokio::time::Instant>)>,
}

impl ActiveRequests {
    fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        ActiveGuard(self.clone())
    }

    /// When the connection should be closed if nothing happens: `first` after it opened while no request
    /// came, `idle` after the last request ended; while one is in flight, re-checked after `idle`.
    fn deadline(&self, (first, idle): (Duration, Duration)) -> tokio::time::Instant {
        let (n, since) = *self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match (n, since) {
            (0, Some(t)) => t + idle,
            (0, None) => self.opened + first,
            _ => tokio::time::Instant::now() + idle,
        }
    }

    fn busy(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0 > 0
    }
}

struct ActiveGuard(Arc<ActiveRequests>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut g = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        g.1 = Some(tokio::time::Instant::now());
    }
}
