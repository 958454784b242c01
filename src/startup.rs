//! Builds the application: engine, gallery (migrations run here), router,
//! listener. Binding port 0 gives tests a free port, exposed by `port()`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::api::admission::DecodeBudget;
use crate::api::bounded::MAX_IMAGES_HARD;
use crate::api::{self, AppState};
use crate::config::Config;
use crate::detection::Detector;
use crate::engine::Engine;
use crate::gallery::Gallery;
use crate::metrics::Metrics;

pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Application {
    pub async fn build(mut config: Config) -> anyhow::Result<Application> {
        config.max_connections = within_descriptor_limit(config.max_connections);
        let metrics = Arc::new(Metrics::new());
        let engine_cfg = config.engine.clone();
        let engine_metrics = metrics.clone();
        // Loading and warming the model blocks for a while; keep it off the runtime's workers.
        let engine =
            tokio::task::spawn_blocking(move || Engine::start(&engine_cfg, engine_metrics))
                .await
                .context("engine start-up panicked")??;
        let (detector_cfg, engine_cfg, detector_metrics) = (
            config.detection.clone(),
            config.engine.clone(),
            metrics.clone(),
        );
        let detector = tokio::task::spawn_blocking(move || {
            Detector::load(&detector_cfg, &engine_cfg, detector_metrics)
        })
        .await
        .context("detector start-up panicked")??;
        let info = engine.info().clone();
        if !info.trained {
            tracing::warn!(
                model = %info.id(),
                "the model carries UNTRAINED seeded random weights: embeddings identify nobody"
            );
        }
        if let Some(licence) = &info.licence {
            tracing::warn!(model = %info.id(), "model licence: {licence}");
        }
        if config.max_images_per_request > MAX_IMAGES_HARD {
            anyhow::bail!(
                "--max-images-per-request may be at most {MAX_IMAGES_HARD}, got {}",
                config.max_images_per_request
            );
        }
        let threshold = match config.threshold {
            Some(t) if !(-1.0..=1.0).contains(&t) => {
                anyhow::bail!("--threshold must be in [-1, 1], got {t}")
            }
            Some(t) => t,
            None => info.threshold,
        };
        let gallery = Gallery::connect(&config.gallery, &info.id(), info.dim, metrics.clone())
            .await
            .context("opening the gallery")?;
        metrics
            .build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &info.name,
                &info.version,
                &config.engine.provider.to_string(),
            ])
            .set(1);

        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let decode_budget = Arc::new(
            DecodeBudget::new(
                config.decode_budget_bytes,
                Duration::from_millis(config.decode_wait_ms),
            )
            .with_gauge(metrics.decode_reserved_bytes.clone()),
        );
        let state = AppState {
            engine,
            detector: Arc::new(detector),
            gallery,
            metrics,
            config: Arc::new(config),
            threshold,
            accepting: Arc::new(AtomicBool::new(true)),
            shutdown_deadline: Arc::new(watch::channel(false).0),
            decode_budget,
        };
        // Ops routes and layers (request id, metrics, timeout, auth): see api::ops.
        let router = api::ops::wrap(api::router(state.clone()), &state)?;
        Ok(Application {
            listener,
            router,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address; 0.0.0.0:0 only if the OS says otherwise.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until SIGTERM or SIGINT; see [`Application::run_until`].
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` completes, then drains: `/readyz` answers 503 for
    /// `--shutdown-drain-s` while connections are still accepted (load balancers see it
    /// and stop sending), then the listener closes, in-flight requests get
    /// `--shutdown-timeout-s` to finish, and those still running are answered 503.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            router,
            state,
        } = self;
        let config = state.config.clone();
        tracing::info!(address = %listener.local_addr()?, "listening");
        // Each connection holds a permit, so taking them all back means every connection ended.
        // At most u32::MAX: shutdown takes every permit back in one `acquire_many`.
        let limit = config.max_connections.clamp(1, u32::MAX as usize);
        let permits = Arc::new(Semaphore::new(limit));
        let (close_tx, close_rx) = watch::channel(false);
        let mut accept = Box::pin(accept_loop(
            listener,
            router,
            permits.clone(),
            close_rx,
            state.clone(),
        ));
        tokio::select! {
            _ = &mut accept => {}
            _ = stop => {}
        }
        let drain = Duration::from_secs(config.shutdown_drain_s);
        let grace = Duration::from_secs(config.shutdown_timeout_s);
        state.accepting.store(false, Ordering::Relaxed);
        tracing::info!(
            drain_s = drain.as_secs(),
            grace_s = grace.as_secs(),
            "shutdown requested: /readyz answers 503, still accepting during the drain period"
        );
        tokio::select! {
            _ = &mut accept => {}
            _ = tokio::time::sleep(drain) => {}
        }
        // Dropping the accept loop closes the listener; open connections finish their
        // current request and close (hyper's graceful shutdown).
        drop(accept);
        let _ = close_tx.send(true);
        tracing::info!("listener closed: finishing in-flight requests");
        let all = u32::try_from(limit).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight requests did not finish within the shutdown timeout: answering them 503"
            );
            state.shutdown_deadline.send_replace(true);
            // The 503s are written by the connections themselves; give them a moment.
            let _ = tokio::time::timeout(Duration::from_secs(2), permits.acquire_many(all)).await;
        }
        state.gallery.close().await.context("closing the gallery")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Descriptors kept for everything but client connections: the gallery's files, the model,
/// logs, ONNX Runtime's own.
const RESERVED_DESCRIPTORS: usize = 64;

/// `--max-connections`, lowered to what the process's open-files limit leaves, so the cap is
/// reached (and logged) before `accept` ever fails for want of a descriptor.
fn within_descriptor_limit(wanted: usize) -> usize {
    // Linux: "Max open files  <soft>  <hard>  files"; elsewhere no clamp.
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|v| v.parse::<usize>().ok());
    match soft {
        Some(limit) if wanted.saturating_add(RESERVED_DESCRIPTORS) > limit => {
            let capped = limit.saturating_sub(RESERVED_DESCRIPTORS).max(1);
            tracing::warn!(
                max_connections = wanted,
                open_files_limit = limit,
                "--max-connections lowered to {capped} to stay within the open-files limit"
            );
            capped
        }
        _ => wanted,
    }
}

/// Accepts while a connection permit is free. At the cap, new connections wait in the
/// kernel's listen backlog (logged once per episode), never in an accept-error loop.
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    permits: Arc<Semaphore>,
    close_rx: watch::Receiver<bool>,
    state: AppState,
) {
    let config = state.config.clone();
    let header_timeout = Duration::from_millis(config.header_read_timeout_ms.max(1));
    let mut last_warning: Option<Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Once per 10 s at most: a saturated server would otherwise log per accept.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        max_connections = config.max_connections,
                        "connection limit reached: new connections wait in the listen backlog"
                    );
                    last_warning = Some(Instant::now());
                }
                state.metrics.connection_limit_hits.inc();
                match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let (stream, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors (EMFILE) and the like: retrying at once would spin and
                // flood the log; a short pause lets connections close first.
                tracing::error!(error = %e, "accept failed; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        let mut close_rx = close_rx.clone();
        let open = state.metrics.connections_open.clone();
        tokio::spawn(async move {
            open.inc();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(remote));
                router.clone().oneshot(req)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, %remote, "connection ended with an error");
                        }
                        break;
                    }
                    changed = close_rx.wait_for(|c| *c), if !closing => {
                        closing = true;
                        if changed.is_ok() {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            open.dec();
            drop(permit);
        });
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
