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
    pub build_info: IntGaugeVec,
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
            registry.register(Box::new(h.clone())).expect("metric names are unique");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static gauge options are valid");
            registry.register(Box::new(g.clone())).expect("metric names are unique");
            g
        };

        let http_requests = IntCounterVec::new(
            Opts::new("mobiface_http_requests_total", "HTTP requests by route template, method and status."),
            &["route", "method", "status"],
        )
        .expect("valid");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("mobiface_http_request_duration_seconds", "HTTP request duration.")
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
        let faces_embedded =
            IntCounter::new("mobiface_faces_embedded_total", "Faces embedded (mirror copies not counted).")
                .expect("valid");
        let build_info = IntGaugeVec::new(
            Opts::new("mobiface_build_info", "Always 1; labels describe the running build and model."),
            &["version", "model_name", "model_version", "provider"],
        )
        .expect("valid");
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(rejected.clone()),
            Box::new(faces_embedded.clone()),
            Box::new(build_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }

        Self {
            queue_depth: gauge("mobiface_queue_depth", "Requests waiting for an inference worker."),
            queue_capacity: gauge(
                "mobiface_queue_capacity",
                "Requests the inference queue holds before answering 503 (--queue-capacity).",
            ),
            queue_wait: hist("mobiface_queue_wait_seconds", "Time a request waited before its batch ran.", QUEUE_BUCKETS),
            batch_size: hist("mobiface_batch_size", "Images per model run, mirror copies included.", BATCH_BUCKETS),
            inference_duration: hist("mobiface_inference_duration_seconds", "Duration of one model run.", INFERENCE_BUCKETS),
            gallery_subjects: gauge("mobiface_gallery_subjects", "Subjects in the gallery."),
            gallery_faces: gauge("mobiface_gallery_faces", "Searchable faces (made by the running model)."),
            gallery_faces_other_model: gauge(
                "mobiface_gallery_faces_other_model",
                "Stored faces made by another model; never compared.",
            ),
            identify_duration: hist("mobiface_identify_duration_seconds", "POST /identify duration, embedding included.", LATENCY_BUCKETS),
            verify_duration: hist("mobiface_verify_duration_seconds", "POST /verify duration, embedding included.", LATENCY_BUCKETS),
            similarity: hist("mobiface_similarity", "Similarities returned by verify and identify.", &similarity_buckets()),
            registry,
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
