//! Prometheus metrics, one registry per running application (tests run several
//! apps in one process, so nothing here is global). Buckets are chosen for this
//! workload: a CPU model run takes ~10-200 ms, a queue wait 0-1 s, batches 1-64
//! images, and similarities live in [-1, 1].

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Requests inside the router (counted by `track_http`), scrapes included.
    pub http_in_flight: IntGauge,
    pub queue_depth: IntGauge,
    /// Configured `--queue-capacity`, so saturation is `queue_depth / queue_capacity` in PromQL.
    pub queue_capacity: IntGauge,
    pub queue_wait: Histogram,
    pub batch_size: Histogram,
    pub inference_duration: Histogram,
    pub faces_embedded: IntCounter,
    pub rejected: IntCounterVec,
    pub gallery_subjects: IntGauge,
    pub gallery_faces: IntGauge,
    pub gallery_faces_other_model: IntGauge,
    pub identify_duration: Histogram,
    pub verify_duration: Histogram,
    pub similarity: Histogram,
    /// One detector run on one photo, letterboxing and decoding included.
    pub detection_duration: Histogram,
    pub faces_per_image: Histogram,
    /// Photos in which the detector found no face.
    pub no_face: IntCounter,
    pub build_info: IntGaugeVec,
    /// Open HTTP connections (capped by --max-connections).
    pub connections_open: IntGauge,
    /// Times the accept loop found every connection permit taken.
    pub connection_limit_hits: IntCounter,
    /// Decoded-image bytes reserved by requests now (capped by --decode-budget-bytes).
    pub decode_reserved_bytes: IntGauge,
    /// Failed authentications (missing or unknown key), and requests refused 429 for them.
    pub auth_failures: IntCounter,
    pub auth_throttled: IntCounter,
    /// PostgreSQL replication: change-log rows committed but not yet in this
    /// replica's index (head sequence minus applied sequence).
    pub replication_lag: IntGauge,
    pub replication_applied_seq: IntGauge,
    /// 1 while the change-log listener is connected.
    pub replication_connected: IntGauge,
    /// Passes that applied changes this replica had not yet seen.
    pub replication_catchups: IntCounter,
    /// Whole-gallery reloads (start-up, or fallen behind the pruned log).
    pub replication_reloads: IntCounter,
    pub db_pool_size: IntGauge,
    pub db_pool_available: IntGauge,
    pub db_pool_waiting: IntGauge,
    /// Time to get a pooled connection (waits show as the upper buckets).
    pub db_pool_wait: Histogram,
}

/// Request latency: from a cache-hot 404 (~100 µs) to a large batch on a slow CPU (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Model run: ~20 ms for one image on one core, a few hundred ms for 64 on a CPU.
const INFERENCE_BUCKETS: &[f64] = &[
    0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
];
/// Queue wait: zero when idle, up to the request timeout when saturated.
const QUEUE_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Images per model run, mirror copies counted.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Faces the detector found in one photo.
const FACES_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0];
/// Search over an in-memory matrix: microseconds for small galleries, ~100 ms at 1M faces.
/// Identify/verify durations include embedding the probe, so they reuse LATENCY_BUCKETS.
fn similarity_buckets() -> Vec<f64> {
    (-4..=19).map(|i| f64::from(i) * 0.05).collect()
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("static histogram options are valid");
            registry
                .register(Box::new(h.clone()))
                .expect("metric names are unique");
            h
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static counter options are valid");
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static gauge options are valid");
            registry
                .register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        };

        let http_requests = IntCounterVec::new(
            Opts::new(
                "mobiface_http_requests_total",
                "HTTP requests by route template, method and status.",
            ),
            &["route", "method", "status"],
        )
        .expect("valid");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "mobiface_http_request_duration_seconds",
                "HTTP request duration.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )
        .expect("valid");
        let rejected = IntCounterVec::new(
            Opts::new(
                "mobiface_requests_rejected_total",
                "Requests rejected, by reason (queue_full, too_large, bad_image, unauthorized, ...).",
            ),
            &["reason"],
        )
        .expect("valid");
        let faces_embedded = IntCounter::new(
            "mobiface_faces_embedded_total",
            "Faces embedded (mirror copies not counted).",
        )
        .expect("valid");
        let no_face = IntCounter::new(
            "mobiface_detection_no_face_total",
            "Photos sent without landmarks in which no face was found.",
        )
        .expect("valid");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "mobiface_build_info",
                "Always 1; labels describe the running build and model.",
            ),
            &["version", "model_name", "model_version", "provider"],
        )
        .expect("valid");
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(rejected.clone()),
            Box::new(faces_embedded.clone()),
            Box::new(no_face.clone()),
            Box::new(build_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }

        Self {
            queue_depth: gauge(
                "mobiface_queue_depth",
                "Requests waiting for an inference worker.",
            ),
            http_in_flight: gauge(
                "mobiface_http_requests_in_flight",
                "Requests being handled now (this scrape included).",
            ),
            queue_capacity: gauge(
                "mobiface_queue_capacity",
                "Requests the inference queue holds before answering 503 (--queue-capacity).",
            ),
            queue_wait: hist(
                "mobiface_queue_wait_seconds",
                "Time a request waited before its batch ran.",
                QUEUE_BUCKETS,
            ),
            batch_size: hist(
                "mobiface_batch_size",
                "Images per model run, mirror copies included.",
                BATCH_BUCKETS,
            ),
            inference_duration: hist(
                "mobiface_inference_duration_seconds",
                "Duration of one model run.",
                INFERENCE_BUCKETS,
            ),
            gallery_subjects: gauge("mobiface_gallery_subjects", "Subjects in the gallery."),
            gallery_faces: gauge(
                "mobiface_gallery_faces",
                "Searchable faces (made by the running model).",
            ),
            gallery_faces_other_model: gauge(
                "mobiface_gallery_faces_other_model",
                "Stored faces made by another model; never compared.",
            ),
            identify_duration: hist(
                "mobiface_identify_duration_seconds",
                "POST /identify duration, embedding included.",
                LATENCY_BUCKETS,
            ),
            verify_duration: hist(
                "mobiface_verify_duration_seconds",
                "POST /verify duration, embedding included.",
                LATENCY_BUCKETS,
            ),
            similarity: hist(
                "mobiface_similarity",
                "Similarities returned by verify and identify.",
                &similarity_buckets(),
            ),
            connections_open: gauge(
                "mobiface_http_connections_open",
                "Open HTTP connections (at most --max-connections).",
            ),
            decode_reserved_bytes: gauge(
                "mobiface_decode_reserved_bytes",
                "Decoded-image bytes reserved by requests now (at most --decode-budget-bytes).",
            ),
            connection_limit_hits: counter(
                "mobiface_connection_limit_hits_total",
                "Times the server stopped accepting because --max-connections were open.",
            ),
            auth_failures: counter(
                "mobiface_auth_failures_total",
                "Requests with a missing or unknown API key.",
            ),
            auth_throttled: counter(
                "mobiface_auth_throttled_total",
                "Requests answered 429 because their client address failed authentication too often.",
            ),
            replication_lag: gauge(
                "mobiface_replication_lag_changes",
                "Change-log rows committed in PostgreSQL but not yet applied to this replica's index.",
            ),
            replication_applied_seq: gauge(
                "mobiface_replication_applied_seq",
                "Last change-log sequence applied to this replica's index.",
            ),
            replication_connected: gauge(
                "mobiface_replication_connected",
                "1 while this replica's change-log listener is connected to PostgreSQL.",
            ),
            replication_catchups: counter(
                "mobiface_replication_catchups_total",
                "Change-log passes that applied changes (after a notification or a periodic catch-up).",
            ),
            replication_reloads: counter(
                "mobiface_replication_reloads_total",
                "Whole-gallery reloads (start-up, or fallen behind the pruned change log).",
            ),
            db_pool_size: gauge(
                "mobiface_db_pool_connections",
                "PostgreSQL connections the pool holds now.",
            ),
            db_pool_available: gauge(
                "mobiface_db_pool_available",
                "Idle PostgreSQL connections in the pool.",
            ),
            db_pool_waiting: gauge(
                "mobiface_db_pool_waiting",
                "Requests waiting for a PostgreSQL connection.",
            ),
            db_pool_wait: hist(
                "mobiface_db_pool_wait_seconds",
                "Time to get a pooled PostgreSQL connection.",
                QUEUE_BUCKETS,
            ),
            detection_duration: hist(
                "mobiface_detection_duration_seconds",
                "Face detection on one photo (canvas, detector run, decoding).",
                INFERENCE_BUCKETS,
            ),
            faces_per_image: hist(
                "mobiface_detection_faces",
                "Faces found per photo sent without landmarks.",
                FACES_BUCKETS,
            ),
            registry,
            no_face,
            http_requests,
            http_duration,
            faces_embedded,
            rejected,
            build_info,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `reason` label of `mobiface_requests_rejected_total` for an error kind, if
/// that kind is a rejection worth counting.
pub fn rejection_reason(kind: crate::error::ErrorKind) -> Option<&'static str> {
    use crate::error::ErrorKind::*;
    match kind {
        QueueFull => Some("queue_full"),
        DecodeBusy => Some("decode_busy"),
        PayloadTooLarge | ImageTooLarge => Some("too_large"),
        TooManyImages => Some("too_many_images"),
        BadImage | BadLandmarks => Some("bad_image"),
        UnsupportedMediaType => Some("unsupported_media_type"),
        Unauthorized | Forbidden => Some("unauthorized"),
        RateLimited => Some("rate_limited"),
        Timeout => Some("timeout"),
        Unavailable => Some("unavailable"),
        DatabaseUnavailable => Some("database_unavailable"),
        // Ordinary client mistakes and internal faults are not rejections; a wildcard
        // keeps new kinds from breaking the build of this module.
        _ => None,
    }
}

/// Axum middleware counting every request by route template, method and status:
/// `axum::middleware::from_fn_with_state(metrics, metrics::track_http)`, added with
/// `Router::layer` outside the auth layer so auth rejections are counted too.
/// The route is axum's `MatchedPath` (`/subjects/{id}`), never the raw path, so ids
/// cannot blow up the label set; requests no route matched are `unmatched`.
pub async fn track_http(
    axum::extract::State(metrics): axum::extract::State<std::sync::Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method());
    let start = std::time::Instant::now();
    // Decremented on drop, so a request cancelled mid-way (client gone) is not counted forever.
    let _in_flight = InFlight::enter(&metrics.http_in_flight);
    let resp = next.run(req).await;
    let status = resp.status();
    let labels = [route.as_str(), method, status.as_str()];
    metrics.http_requests.with_label_values(&labels).inc();
    metrics
        .http_duration
        .with_label_values(&labels)
        .observe(start.elapsed().as_secs_f64());
    let reason = match resp.extensions().get::<crate::error::ErrorKind>() {
        Some(kind) => rejection_reason(*kind),
        // Rejections made by axum or tower before our handlers ran carry no kind.
        None if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE => Some("too_large"),
        None => None,
    };
    if let Some(reason) = reason {
        metrics.rejected.with_label_values(&[reason]).inc();
    }
    resp
}

struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Methods outside the standard set share one label value, so a client sending
/// made-up methods cannot create new series.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ApiError, ErrorKind};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::{get, post};
    use axum::Router;
    use std::sync::Arc;
    use tower::ServiceExt;

    fn app(metrics: Arc<Metrics>) -> Router {
        Router::new()
            .route("/subjects/{id}", get(|| async { "ok" }))
            .route(
                "/embed",
                post(|| async { Err::<(), _>(ApiError::new(ErrorKind::QueueFull, "full")) }),
            )
            .route(
                "/bad",
                post(|| async { Err::<(), _>(ApiError::new(ErrorKind::BadLandmarks, "6 points")) }),
            )
            .layer(axum::middleware::from_fn_with_state(metrics, track_http))
    }

    async fn call(app: &Router, method: &str, uri: &str) -> StatusCode {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        app.clone().oneshot(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn http_metrics_use_route_templates_and_count_rejections() {
        let metrics = Arc::new(Metrics::new());
        let app = app(metrics.clone());
        assert_eq!(
            call(&app, "GET", "/subjects/0b6f6c1e-aaaa").await,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, "GET", "/subjects/another-id").await,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, "POST", "/embed").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(call(&app, "POST", "/bad").await, StatusCode::BAD_REQUEST);
        assert_eq!(
            call(&app, "GET", "/no/such/path").await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(&app, "BREW", "/subjects/x").await,
            StatusCode::METHOD_NOT_ALLOWED
        );

        let count = |l: [&str; 3]| metrics.http_requests.with_label_values(&l).get();
        assert_eq!(count(["/subjects/{id}", "GET", "200"]), 2);
        assert_eq!(count(["/embed", "POST", "503"]), 1);
        assert_eq!(count(["unmatched", "GET", "404"]), 1);
        assert_eq!(count(["/subjects/{id}", "OTHER", "405"]), 1);
        assert_eq!(
            metrics
                .http_duration
                .with_label_values(&["/subjects/{id}", "GET", "200"])
                .get_sample_count(),
            2
        );
        assert_eq!(metrics.rejected.with_label_values(&["queue_full"]).get(), 1);
        assert_eq!(metrics.rejected.with_label_values(&["bad_image"]).get(), 1);
        assert_eq!(
            metrics.http_in_flight.get(),
            0,
            "every request left the in-flight gauge"
        );

        let text = metrics.render();
        assert!(!text.contains("0b6f6c1e"), "raw path leaked into labels");
        assert!(text.contains(
            r#"mobiface_http_requests_total{method="GET",route="/subjects/{id}",status="200"} 2"#
        ));
    }

    #[test]
    fn every_rejection_kind_has_a_reason_matching_the_dashboard() {
        for (kind, reason) in [
            (ErrorKind::QueueFull, Some("queue_full")),
            (ErrorKind::PayloadTooLarge, Some("too_large")),
            (ErrorKind::ImageTooLarge, Some("too_large")),
            (ErrorKind::BadImage, Some("bad_image")),
            (ErrorKind::BadLandmarks, Some("bad_image")),
            (ErrorKind::Unauthorized, Some("unauthorized")),
            (ErrorKind::Forbidden, Some("unauthorized")),
            (ErrorKind::RateLimited, Some("rate_limited")),
            (ErrorKind::NotFound, None),
            (ErrorKind::Internal, None),
        ] {
            assert_eq!(rejection_reason(kind), reason, "{kind:?}");
        }
    }
}
