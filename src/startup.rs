//! Builds the application: engine, gallery (migrations run here), router,
//! listener. Binding port 0 gives tests a free port, exposed by `port()`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;

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
    pub async fn build(config: Config) -> anyhow::Result<Application> {
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
        let state = AppState {
            engine,
            detector: Arc::new(detector),
            gallery,
            metrics,
            config: Arc::new(config),
            threshold,
            accepting: Arc::new(AtomicBool::new(true)),
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

    /// Serves until SIGTERM or SIGINT, then stops accepting, lets in-flight
    /// requests finish (bounded by the shutdown timeout) and closes the gallery.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Application {
            listener,
            router,
            state,
        } = self;
        tracing::info!(address = %listener.local_addr()?, "listening");
        let accepting = state.accepting.clone();
        let grace = Duration::from_secs(state.config.shutdown_timeout_s);
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, router).with_graceful_shutdown(async move {
            shutdown_signal().await;
            accepting.store(false, Ordering::Relaxed);
            tracing::info!(
                grace_s = grace.as_secs(),
                "shutdown requested: finishing in-flight requests"
            );
            let _ = drained_tx.send(());
        });
        let server = async move { server.await.context("server error") };
        tokio::pin!(server);
        // Once shutdown starts, in-flight requests get `grace` to finish.
        tokio::select! {
            res = &mut server => res?,
            _ = async {
                let _ = drained_rx.await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!("in-flight requests did not finish within the shutdown timeout");
            }
        }
        state.gallery.close().await.context("closing the gallery")?;
        tracing::info!("stopped");
        Ok(())
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
