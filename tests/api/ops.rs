//! Operations: metrics move with traffic, API keys, limits (413, 503 queue full,
//! 504 timeout), request ids, the OpenAPI document, and SIGTERM during a burst.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{
    b64, eval_crops, manifest_dir, metric, read, scrape, spawn_app, spawn_app_with, Server, TestApp,
};

// ------------------------------------------------------------------ helpers

fn crops_b64(n: usize) -> Vec<String> {
    eval_crops(n).iter().map(|p| b64(&read(p))).collect()
}

/// A request for every (method, path) of the OpenAPI document, ids filled with a
/// well-formed but unknown UUID.
fn documented_operations() -> Vec<(String, String)> {
    let doc = serde_json::to_value(mobiface::api::openapi::document()).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                ops.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("00000000-0000-4000-8000-000000000000");
            }
            '}' => in_param = false,
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

// ------------------------------------------------------------------ metrics

#[tokio::test]
async fn metrics_move_with_traffic() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    let batches_before = metric(&before, "mobiface_batch_size_count", &[]).unwrap();
    let faces_before = metric(&before, "mobiface_faces_embedded_total", &[]).unwrap();
    assert_eq!(metric(&before, "mobiface_queue_capacity", &[]), Some(256.0));
    // Only the scrape itself is in flight.
    assert_eq!(
        metric(&before, "mobiface_http_requests_in_flight", &[]),
        Some(1.0)
    );

    let images = crops_b64(12);
    let bodies = images
        .iter()
        .map(|img| json!({"images": [img]}))
        .collect::<Vec<_>>();
    let reqs = bodies.iter().map(|b| app.post_json("/embed", b));
    for resp in futures::future::join_all(reqs).await {
        assert_eq!(resp.status(), 200);
    }
    let bad = app
        .post_json("/embed", &json!({"images": [b64(b"not an image")]}))
        .await;
    assert_eq!(bad.status(), 400);

    let after = scrape(&app).await;
    let batches = metric(&after, "mobiface_batch_size_count", &[]).unwrap() - batches_before;
    let faces = metric(&after, "mobiface_faces_embedded_total", &[]).unwrap() - faces_before;
    assert!(batches >= 1.0, "batch histogram count did not rise");
    // A face and its mirror may run apart when workers are idle (Queue::spread).
    assert!(batches <= 24.0, "more model runs ({batches}) than images");
    assert_eq!(faces, 12.0, "faces embedded");
    // Each face runs with its mirror: the batch sizes sum to twice the faces.
    let sum = |t: &str| metric(t, "mobiface_batch_size_sum", &[]).unwrap();
    assert_eq!(sum(&after) - sum(&before), 24.0);
    // One inference timing per model run.
    let runs = |t: &str| metric(t, "mobiface_inference_duration_seconds_count", &[]).unwrap();
    assert_eq!(runs(&after) - runs(&before), batches);
    let waits = |t: &str| metric(t, "mobiface_queue_wait_seconds_count", &[]).unwrap();
    // One wait per queued job: each request is one job, or two when cut across idle workers,
    // and every run takes at least one job.
    let jobs = waits(&after) - waits(&before);
    assert!(
        (12.0..=24.0).contains(&jobs),
        "{jobs} queued jobs for 12 requests"
    );
    assert!(batches <= jobs, "{batches} runs for {jobs} jobs");
    assert_eq!(
        metric(&after, "mobiface_queue_depth", &[]),
        Some(0.0),
        "queue gauge back to 0"
    );
    let ok = [("route", "/embed"), ("method", "POST"), ("status", "200")];
    assert_eq!(
        metric(&after, "mobiface_http_requests_total", &ok),
        Some(12.0)
    );
    assert_eq!(
        metric(&after, "mobiface_http_request_duration_seconds_count", &ok),
        Some(12.0)
    );
    let bad_labels = [("route", "/embed"), ("status", "400")];
    assert_eq!(
        metric(&after, "mobiface_http_requests_total", &bad_labels),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &after,
            "mobiface_requests_rejected_total",
            &[("reason", "bad_image")]
        ),
        Some(1.0)
    );
    let info = metric(&after, "mobiface_build_info", &[("provider", "cpu")]);
    assert_eq!(info, Some(1.0), "build info gauge");
}

#[tokio::test]
async fn metrics_label_routes_by_template_not_raw_path() {
    let app = spawn_app().await;
    for id in [
        "00000000-0000-4000-8000-00000000000a",
        "00000000-0000-4000-8000-00000000000b",
    ] {
        assert_eq!(app.get(&format!("/subjects/{id}")).await.status(), 404);
    }
    assert_eq!(app.get("/no/such/thing/123").await.status(), 404);
    let text = scrape(&app).await;
    assert!(
        !text.contains("00000000-0000-4000"),
        "raw ids leaked into labels"
    );
    assert!(
        !text.contains("/no/such/thing"),
        "unmatched raw path leaked into labels"
    );
    let unmatched = [("route", "unmatched"), ("status", "404")];
    assert_eq!(
        metric(&text, "mobiface_http_requests_total", &unmatched),
        Some(1.0)
    );
}

// ------------------------------------------------------------------ API keys

const ADMIN_KEY: &str = "admin-test-key-5f1c2b7e9a";
const READ_KEY: &str = "read-test-key-8d3e4a6b1c";

fn write_keys(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("api-keys");
    std::fs::write(
        &path,
        format!("# test keys\nadmin {ADMIN_KEY}\nread {READ_KEY}\n"),
    )
    .unwrap();
    path
}

async fn spawn_with_keys(metrics_require_key: bool) -> (TestApp, tempfile::TempDir) {
    let keys_dir = tempfile::tempdir().unwrap();
    let path = write_keys(keys_dir.path());
    let app = spawn_app_with(|c| {
        c.api_keys_file = Some(path);
        c.metrics_require_key = metrics_require_key;
        // These tests send many wrong keys from one address on purpose; the throttle
        // for that has its own test (hardening.rs).
        c.auth_failures_per_minute = 0.0;
    })
    .await;
    (app, keys_dir)
}

fn request(
    app: &TestApp,
    method: &str,
    path: &str,
    header: Option<(&str, String)>,
) -> reqwest::RequestBuilder {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut rb = app.client.request(m, app.url(path));
    if method == "POST" {
        rb = rb.json(&json!({}));
    }
    if let Some((k, v)) = header {
        rb = rb.header(k, v);
    }
    rb
}

#[tokio::test]
async fn every_protected_route_refuses_wrong_credentials() {
    let (app, _keys) = spawn_with_keys(false).await;
    let ops = documented_operations();
    let open: BTreeSet<&str> = ["/healthz", "/readyz", "/metrics", "/openapi.json"].into();
    let protected: Vec<_> = ops
        .iter()
        .filter(|(_, p)| !open.contains(p.as_str()))
        .collect();
    assert!(
        protected.len() >= 3,
        "too few protected operations documented: {protected:?}"
    );

    let wrong: Vec<(&str, Option<(&str, String)>)> = vec![
        ("no credentials", None),
        (
            "unknown bearer key",
            Some(("authorization", "Bearer not-a-key-000000000000".into())),
        ),
        (
            "unknown X-API-Key",
            Some(("x-api-key", "not-a-key-000000000000".into())),
        ),
        (
            "key without Bearer prefix",
            Some(("authorization", ADMIN_KEY.into())),
        ),
        ("empty bearer", Some(("authorization", "Bearer ".into()))),
        (
            "basic auth",
            Some(("authorization", "Basic YWRtaW46YWRtaW4=".into())),
        ),
        (
            "truncated admin key",
            Some(("x-api-key", ADMIN_KEY[..ADMIN_KEY.len() - 1].into())),
        ),
        (
            "admin key with extra char",
            Some(("x-api-key", format!("{ADMIN_KEY}x"))),
        ),
    ];
    let mut rejections = 0.0;
    for (method, path) in &protected {
        let url = concrete(path);
        for (case, header) in &wrong {
            let resp = request(&app, method, &url, header.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401, "{method} {path} with {case}");
            assert_eq!(
                resp.headers()["www-authenticate"],
                "Bearer",
                "{method} {path} {case}"
            );
            let body: Value = resp.json().await.unwrap();
            assert_eq!(
                body["error"]["code"], "unauthorized",
                "{method} {path} {case}: {body}"
            );
            rejections += 1.0;
        }
        // A read key is enough for reads and matching, never for gallery writes.
        let needs_admin = *method != "GET"
            && !["/embed", "/detect", "/verify", "/identify"].contains(&path.as_str());
        let read = request(&app, method, &url, Some(("x-api-key", READ_KEY.into())))
            .send()
            .await
            .unwrap();
        if needs_admin {
            assert_eq!(read.status(), 403, "{method} {path} with a read key");
            let body: Value = read.json().await.unwrap();
            assert_eq!(body["error"]["code"], "forbidden", "{body}");
            assert!(
                body["error"]["message"].as_str().unwrap().contains("admin"),
                "{body}"
            );
            rejections += 1.0;
        } else {
            assert!(
                ![401, 403].contains(&read.status().as_u16()),
                "{method} {path} refused a read key"
            );
        }
        // The admin key passes auth everywhere (the handler may still say 404/422).
        for header in [
            ("authorization", format!("Bearer {ADMIN_KEY}")),
            ("x-api-key", ADMIN_KEY.into()),
        ] {
            let resp = request(&app, method, &url, Some(header))
                .send()
                .await
                .unwrap();
            assert!(
                ![401, 403].contains(&resp.status().as_u16()),
                "{method} {path} refused the admin key"
            );
        }
    }
    // Probes and the scrape stay open.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            app.get(path).await.status(),
            200,
            "{path} must not need a key"
        );
    }
    let text = scrape(&app).await;
    let counted = metric(
        &text,
        "mobiface_requests_rejected_total",
        &[("reason", "unauthorized")],
    );
    assert_eq!(counted, Some(rejections), "every 401/403 counted");
    assert!(!text.contains(ADMIN_KEY) && !text.contains(READ_KEY));
}

#[tokio::test]
async fn metrics_can_require_a_key() {
    let (app, _keys) = spawn_with_keys(true).await;
    assert_eq!(app.get("/metrics").await.status(), 401);
    assert_eq!(app.get("/healthz").await.status(), 200);
    let resp = request(
        &app,
        "GET",
        "/metrics",
        Some(("authorization", format!("Bearer {READ_KEY}"))),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn per_key_rate_limit_answers_429_with_retry_after() {
    let keys_dir = tempfile::tempdir().unwrap();
    let path = write_keys(keys_dir.path());
    let app = spawn_app_with(|c| {
        c.api_keys_file = Some(path);
        c.rate_limit_per_key = 0.5; // burst of 1, then one request every 2 s
    })
    .await;
    // Any protected route will do; the limit applies before the handler.
    let get = |key: &str| {
        request(
            &app,
            "GET",
            "/subjects",
            Some(("x-api-key", key.to_string())),
        )
        .send()
    };
    assert_ne!(get(READ_KEY).await.unwrap().status(), 429);
    let limited = get(READ_KEY).await.unwrap();
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Buckets are per key: the admin key still has its token.
    assert_ne!(get(ADMIN_KEY).await.unwrap().status(), 429);
}

// ------------------------------------------------------------------ limits

#[tokio::test]
async fn oversized_body_is_413_json() {
    let app = spawn_app_with(|c| c.max_body_bytes = 64 * 1024).await;
    let big = b64(&vec![0u8; 100 * 1024]);
    let resp = app.post_json("/embed", &json!({"images": [big]})).await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(vec![0u8; 100 * 1024]).file_name("a.jpg"),
    );
    let resp = app.post_multipart("/embed", form).await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    let text = scrape(&app).await;
    assert_eq!(
        metric(
            &text,
            "mobiface_requests_rejected_total",
            &[("reason", "too_large")]
        ),
        Some(2.0)
    );
    // Under the limit still works.
    let ok = app
        .post_json("/embed", &json!({"images": crops_b64(1)}))
        .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn full_queue_is_503_with_retry_after() {
    let app = spawn_app_with(|c| {
        c.engine.queue_capacity = 1;
        c.engine.workers = 1;
        c.engine.max_batch = Some(2);
    })
    .await;
    let images = crops_b64(8);
    let body = json!({"images": images});
    let burst = (0..24).map(|_| app.post_json("/embed", &body));
    let (mut ok, mut full) = (0, 0);
    for resp in futures::future::join_all(burst).await {
        match resp.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"]["code"], "queue_full", "{body}");
                full += 1;
            }
            other => panic!("unexpected status {other}: {}", resp.text().await.unwrap()),
        }
    }
    assert!(ok >= 1, "nothing got through");
    assert!(
        full >= 1,
        "a burst of 24 against capacity 1 was never refused"
    );
    let text = scrape(&app).await;
    assert_eq!(
        metric(
            &text,
            "mobiface_requests_rejected_total",
            &[("reason", "queue_full")]
        ),
        Some(full as f64)
    );
    assert_eq!(metric(&text, "mobiface_queue_depth", &[]), Some(0.0));
    assert_eq!(metric(&text, "mobiface_queue_capacity", &[]), Some(1.0));
}

#[tokio::test]
async fn slow_request_is_504_json() {
    // 1 ms cannot cover decoding and running 32 faces; the handler is cancelled.
    let app = spawn_app_with(|c| c.request_timeout_ms = 1).await;
    let images = crops_b64(32);
    let resp = app.post_json("/embed", &json!({"images": images})).await;
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    let text = scrape(&app).await;
    assert_eq!(
        metric(
            &text,
            "mobiface_requests_rejected_total",
            &[("reason", "timeout")]
        ),
        Some(1.0)
    );
    // Cancelled work leaves nothing queued behind.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let depth = metric(&scrape(&app).await, "mobiface_queue_depth", &[]);
        if depth == Some(0.0) || Instant::now() > deadline {
            assert_eq!(depth, Some(0.0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ request ids

#[tokio::test]
async fn request_id_is_kept_or_generated_and_echoed() {
    let app = spawn_app().await;
    let sent = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "trace-abc.123")
        .send();
    assert_eq!(
        sent.await.unwrap().headers()["x-request-id"],
        "trace-abc.123"
    );

    let a = app.get("/healthz").await.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let b = app.get("/healthz").await.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&a).is_ok() && a != b, "{a} {b}");

    // Errors carry it too, and an absurd client id is replaced rather than echoed.
    let long = "x".repeat(1000);
    let resp = app
        .client
        .post(app.url("/embed"))
        .header("x-request-id", &long)
        .body("{")
        .send();
    let resp = resp.await.unwrap();
    assert!(resp.status().is_client_error());
    let echoed = resp.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{echoed}");
}

// ------------------------------------------------------------------ OpenAPI

/// Routes declared in the router sources: `.route("/path", get(..).post(..))`.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for file in std::fs::read_dir(manifest_dir().join("src/api")).unwrap() {
        let path = file.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        let mut rest = src.as_str();
        while let Some(i) = rest.find(".route(") {
            rest = rest[i + 7..].trim_start();
            let Some(quoted) = rest.strip_prefix('"') else {
                continue;
            };
            rest = quoted;
            let end = rest.find('"').unwrap();
            let route = rest[..end].to_string();
            // Methods up to the closing parenthesis of `.route(`.
            let mut depth = 1;
            let mut j = end;
            for (k, c) in rest[end..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    j = end + k;
                    break;
                }
            }
            let body = &rest[end..j];
            for m in ["get", "post", "put", "delete", "patch"] {
                if body.contains(&format!("{m}(")) {
                    routes.insert((m.to_uppercase(), route.clone()));
                }
            }
        }
    }
    routes
}

#[tokio::test]
async fn openapi_covers_every_route_and_validates() {
    // Security is documented as configured: none on an open server.
    let open = spawn_app().await;
    let doc: Value = open.get("/openapi.json").await.json().await.unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op.get("security").is_none(),
                "open: {method} {path} claims security"
            );
            assert!(
                op["responses"].get("401").is_none(),
                "open: {method} {path} lists 401"
            );
        }
    }
    let (app, _keys) = spawn_with_keys(false).await;
    let resp = app.get("/openapi.json").await;
    assert_eq!(resp.status(), 200);
    let doc: Value = resp.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );

    let documented: BTreeSet<(String, String)> = documented_operations().into_iter().collect();
    let served = routes_in_source();
    assert!(
        served.len() >= 5,
        "router parse found too little: {served:?}"
    );
    let missing: Vec<_> = served.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes served but not in /openapi.json: {missing:?}"
    );
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        extra.is_empty(),
        "documented routes the router does not declare: {extra:?}"
    );

    // And every documented operation is really routed: not the fallback 404, not 405.
    for (method, path) in &documented {
        let resp = request(&app, method, &concrete(path), None)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !body.contains("no such route"),
            "{method} {path} hit the fallback"
        );
    }

    // Every operation documents its error shape; every $ref resolves.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path} has no responses");
            if !["/healthz", "/readyz", "/metrics", "/openapi.json"].contains(&path.as_str()) {
                for code in ["401", "403"] {
                    assert!(responses.contains_key(code), "{method} {path} lacks {code}");
                }
                assert!(op["security"].is_array(), "{method} {path} lacks security");
            }
        }
    }
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &piece[..piece.find('"').unwrap()];
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
    assert!(schemas.contains_key("ErrorBody"));

    // The reference validator (PyPI openapi-spec-validator, installed in .venv by the Makefile).
    let file = app.dir.path().join("openapi.json");
    std::fs::write(&file, text).unwrap();
    let python = manifest_dir().join(".venv/bin/python");
    let out = Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{} (make venv): {e}", python.display()));
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------ SIGTERM

#[tokio::test]
async fn sigterm_during_a_burst_finishes_cleanly_and_exits_0() {
    // No drain period: this test is about the listener closing at once and in-flight
    // requests finishing (hardening.rs tests the drain).
    let mut server = Server::start_ready(
        &[],
        &[
            ("MOBIFACE_SHUTDOWN_TIMEOUT_S", "60"),
            ("MOBIFACE_SHUTDOWN_DRAIN_S", "0"),
        ],
    )
    .await;
    let (base, client) = (server.address.clone(), server.client.clone());
    let images = crops_b64(8);
    let send = |client: reqwest::Client| {
        let (url, body) = (format!("{base}/embed"), json!({"images": images}));
        tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await?;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await?;
            Ok::<_, reqwest::Error>((status, body))
        })
    };
    let in_flight: Vec<_> = (0..12).map(|_| send(client.clone())).collect();
    // Signal only once all 12 are inside the server (being handled, or answered),
    // so "in flight" is a fact, not a guess about scheduling.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let in_flight = metric(&text, "mobiface_http_requests_in_flight", &[]).unwrap() - 1.0;
        let answered = metric(
            &text,
            "mobiface_http_requests_total",
            &[("route", "/embed")],
        )
        .unwrap_or(0.0);
        if in_flight + answered >= 12.0 {
            assert!(
                answered < 12.0,
                "the burst finished before the signal; make it heavier"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the burst never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.sigterm();
    // Requests sent from here on find the listener closed (or a 503). Waiting for the log
    // line, not a fixed pause: on a loaded machine the signal may take a while to be handled.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log().contains("listener closed") {
        assert!(
            Instant::now() < deadline,
            "listener never closed:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late: Vec<_> = (0..12).map(|_| send(client.clone())).collect();

    let (mut completed, mut refused) = (0, 0);
    for task in in_flight {
        match task.await.unwrap() {
            Ok((200, body)) => {
                assert_eq!(body["embeddings"].as_array().unwrap().len(), 8, "{body}");
                completed += 1;
            }
            // Refused cleanly: a JSON error saying the service is going away.
            Ok((503, body)) => {
                assert!(body["error"]["code"].is_string(), "{body}");
                refused += 1;
            }
            Ok((status, body)) => panic!("in-flight request: unclean answer {status}: {body}"),
            Err(e) => panic!("in-flight request broken by shutdown: {e:?}"),
        }
    }
    for task in late {
        match task.await.unwrap() {
            Ok((503, body)) => assert!(body["error"]["code"].is_string(), "{body}"),
            Err(e) if e.is_connect() => {}
            Ok((status, body)) => panic!("request after SIGTERM answered {status}: {body}"),
            Err(e) => panic!("request after SIGTERM failed uncleanly: {e:?}"),
        }
    }
    assert!(completed >= 1, "no request completed ({refused} refused)");
    let status = server.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; log:\n{}",
        server.log()
    );
    // The gallery was closed: SQLite folds and removes the WAL on the last clean close.
    let wal = server.dir.path().join("gallery.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "WAL left behind"
    );
}

#[tokio::test]
async fn json_logs_carry_the_request_id_into_inference_and_never_the_keys() {
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = write_keys(keys_dir.path());
    let mut server = Server::start_ready(
        // JSON logs: Server always passes --log-format=json
        &["--api-keys-file", keys.to_str().unwrap()],
        &[("RUST_LOG", "info,mobiface::engine=debug")],
    )
    .await;
    let resp = server
        .client
        .post(format!("{}/embed", server.address))
        .header("x-request-id", "ops-log-test-7")
        .header("authorization", format!("Bearer {READ_KEY}"))
        .json(&json!({"images": crops_b64(1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let refused = server
        .client
        .post(format!("{}/subjects", server.address))
        .header("x-api-key", READ_KEY)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    server.sigterm();
    assert_eq!(server.wait_exit().await.code(), Some(0));

    let log = server.log();
    assert!(
        !log.contains(READ_KEY) && !log.contains(ADMIN_KEY),
        "a key was logged"
    );
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let in_request = |msg: &str| {
        lines.iter().any(|l| {
            l["message"] == msg
                && l["span"]["request_id"] == "ops-log-test-7"
                && l["span"]["route"] == "/embed"
        })
    };
    assert!(in_request("request"), "no request line with its id:\n{log}");
    assert!(
        in_request("inference done"),
        "inference events lack the request id:\n{log}"
    );
    let config = lines
        .iter()
        .find(|l| l["message"] == "effective configuration")
        .expect("effective configuration logged");
    let config: Value = serde_json::from_str(config["config"].as_str().unwrap()).unwrap();
    assert_eq!(config["api_keys_file"], keys.to_str().unwrap());
    assert_eq!(config["log_format"], "json");
}
