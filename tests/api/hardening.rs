//! Issue #23's hostile-client findings, one test each: decode memory under concurrency,
//! JSON bodies that multiply in memory, stalled and idle connections, bodies declared too
//! large, shutdown draining, key guessing, and the minor ones (media type, 405, a JPEG cut
//! short). `tests/ops/hostile_probe.py` gives the same cases as before/after figures.

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::helpers::{
    b64, eval_crops, json_of, metric, read, scrape, spawn_app, spawn_app_with, unpooled_client,
    Server, TestApp,
};

/// Peak and current resident memory of a process, in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"))
            / 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A black RGB PNG of `side` x `side`: ~65 KB on the wire for side 4729, 67 MB decoded (just under the 64 MiB per-image limit).
fn black_png(side: u32) -> Vec<u8> {
    let pixels = vec![0u8; (side * side * 3) as usize];
    let mut out = Cursor::new(Vec::new());
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::NoFilter)
        .write_image(&pixels, side, side, ExtendedColorType::Rgb8)
        .unwrap();
    out.into_inner()
}

/// A JSON body of about `size` bytes: `prefix`, `item` repeated, `last`.
fn padded_body(prefix: &str, item: &str, last: &str, size: usize) -> String {
    let n = (size - prefix.len() - last.len()) / item.len();
    format!("{prefix}{}{last}", item.repeat(n))
}

async fn post_raw(server: &Server, body: String) -> (u16, Value) {
    let resp = server
        .client
        .post(format!("{}/embed", server.address))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Findings 1 and 2. Peak RSS of the real binary, with its defaults (decode budget 256 MiB,
/// 16 MiB bodies). Before: 64 of these PNGs at once peaked at 3.3 GB; eight 16 MB bodies of
/// `[0,0,...]` at 745 MB; one of `[[],[],...]` landmarks added 357 MB.
#[tokio::test]
async fn memory_stays_bounded_under_hostile_concurrency() {
    let server = Server::start_ready(&[], &[]).await;
    let pid = server.pid();
    let (_, start) = memory_mib(pid);

    let zeros = padded_body(r#"{"images":["#, "0,", "0]}", 16_000_000);
    let answers = futures::future::join_all((0..8).map(|_| post_raw(&server, zeros.clone()))).await;
    for (status, body) in &answers {
        assert_eq!(*status, 422, "{body}");
    }
    drop(zeros);
    let landmarks = padded_body(
        r#"{"images":[{"data":"aGk=","landmarks":["#,
        "[],",
        "[]]}]}",
        16_000_000,
    );
    let (status, body) = post_raw(&server, landmarks).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_landmarks", "{body}");
    let (json_peak, _) = memory_mib(pid);
    // Eight bodies of 16 MB are 128 MB however they are parsed; the rest is overhead.
    assert!(
        json_peak - start < 300,
        "JSON bodies raised peak RSS by {} MiB (from {start} MiB)",
        json_peak - start
    );

    let png = b64(&black_png(4729));
    // Landmarks make the crop a 112x112 warp: in a debug build, shrinking the whole
    // picture (the crop without them) takes longer than the request timeout.
    let landmarks = [
        [1500, 1800],
        [3200, 1800],
        [2350, 2600],
        [1700, 3400],
        [3000, 3400],
    ];
    let body = json!({ "images": [{ "data": png, "landmarks": landmarks }] }).to_string();
    let answers = futures::future::join_all((0..64).map(|_| post_raw(&server, body.clone()))).await;
    let mut decoded = 0;
    for (status, body) in &answers {
        match (*status, body["error"]["code"].as_str()) {
            (200, _) => decoded += 1,
            // A face check may refuse a black square; it was decoded all the same.
            (422, Some("no_face")) => decoded += 1,
            (503, Some("decode_busy")) => {}
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert!(decoded >= 1, "no image was decoded");
    let (peak, _) = memory_mib(pid);
    assert!(
        peak < 600,
        "64 concurrent 67 MB decodes peaked at {peak} MiB (started at {start} MiB)"
    );
}

/// What the server sends next (empty: it closed the connection), or `None` if it sent
/// nothing within `limit`. (`tokio`'s io-util is not among this crate's features.)
async fn read_with_timeout(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(limit, async {
        loop {
            if stream.readable().await.is_err() {
                return Vec::new();
            }
            match stream.try_read(&mut buf) {
                Ok(n) => return buf[..n].to_vec(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // A reset is the server closing too.
                Err(_) => return Vec::new(),
            }
        }
    })
    .await
    .ok()
}

async fn write_all(stream: &mut TcpStream, mut data: &[u8]) {
    while !data.is_empty() {
        stream.writable().await.unwrap();
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("write failed: {e}"),
        }
    }
}

/// Finding 3: stalled clients are cut off by the header-read timeout, the connection cap
/// keeps them from taking every descriptor, and an idle keep-alive connection is closed.
#[tokio::test]
async fn stalled_and_idle_connections_are_closed_and_capped() {
    let mut app = spawn_app_with(|c| {
        c.header_read_timeout_ms = 500;
        c.max_connections = 8;
    })
    .await;
    // A fresh connection per request: the server closes idle keep-alive connections after
    // the 500 ms timeout, and a pooled one could be reused at the moment it is closed.
    app.client = unpooled_client();
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
        write_all(&mut s, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-").await;
        stalled.push(s);
    }
    // Another client still gets in once the stalled ones time out.
    let resp = tokio::time::timeout(Duration::from_secs(20), app.get("/healthz"))
        .await
        .expect("/healthz not answered while stalled connections were open");
    assert_eq!(resp.status(), 200);
    for (i, s) in stalled.iter_mut().enumerate() {
        let got = read_with_timeout(s, Duration::from_secs(20)).await;
        assert!(
            got.is_some(),
            "stalled connection {i} was never closed by the server"
        );
    }
    let text = scrape(&app).await;
    assert!(
        metric(&text, "mobiface_connection_limit_hits_total", &[]).unwrap() >= 1.0,
        "20 connections against a cap of 8 never hit the cap"
    );

    // Keep-alive: one request answered, then silence; the server closes the connection.
    let mut s = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    write_all(&mut s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let first = read_with_timeout(&mut s, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"), "{first:?}");
    let next = read_with_timeout(&mut s, Duration::from_secs(20)).await;
    assert_eq!(
        next,
        Some(Vec::new()),
        "idle keep-alive connection not closed"
    );
}

/// Finding 3: a body declared larger than the limit is answered 413 before it is sent
/// (the request timeout, 30 s by default, was the only thing that ended it).
#[tokio::test]
async fn body_declared_too_large_is_refused_at_once() {
    let app = spawn_app().await;
    let mut s = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    write_all(
        &mut s,
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 999999999\r\n\r\n",
    )
    .await;
    let got = read_with_timeout(&mut s, Duration::from_secs(10))
        .await
        .expect("no answer to a body declared too large");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
}

/// Finding 6: after the stop signal, /readyz answers 503 while connections are still
/// accepted; then the listener closes, and a request still running at the deadline is
/// answered 503 instead of being dropped.
#[tokio::test]
async fn shutdown_drains_then_answers_the_unfinished_503() {
    let app = spawn_app_with(|c| {
        c.shutdown_drain_s = 2;
        c.shutdown_timeout_s = 1;
    })
    .await;
    // A request whose body never completes: still in flight at the deadline.
    let mut slow = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    write_all(
        &mut slow,
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"images\"",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&scrape(&app).await, "mobiface_http_requests_in_flight", &[]) < Some(2.0) {
        assert!(Instant::now() < deadline, "slow request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop.notify_one();
    // Draining: a new connection is accepted and told not to send traffic.
    let fresh = unpooled_client();
    let mut ready = None;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let (status, body) = json_of(fresh.get(app.url("/readyz")).send().await.unwrap()).await;
        if status == 503 {
            ready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = ready.expect("/readyz never answered 503 during the drain period");
    assert_eq!(body["status"], "draining", "{body}");
    // Then the listener closes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", app.port)).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still open after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = read_with_timeout(&mut slow, Duration::from_secs(20))
        .await
        .expect("in-flight request got no answer");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"unavailable\""), "{text}");
    tokio::time::timeout(Duration::from_secs(20), app.server)
        .await
        .expect("server did not stop")
        .unwrap()
        .unwrap();
}

/// Finding 7: wrong keys from one address get 429 with Retry-After once its allowance
/// of failures is spent (before: 300 wrong keys, 300 x 401), and the metric counts them.
#[tokio::test]
async fn key_guessing_is_throttled_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "admin right-key-0123456789abcdef\n").unwrap();
    let app = spawn_app_with(|c| {
        c.api_keys_file = Some(keys);
        c.auth_failures_per_minute = 5.0;
    })
    .await;
    let try_key = |key: &'static str| {
        app.client
            .get(app.url("/subjects"))
            .header("x-api-key", key)
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(try_key("wrong-key-0123456789abcdef").await.unwrap());
    }
    let codes: Vec<u16> = statuses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(&codes[..5], &[401; 5], "{codes:?}");
    assert_eq!(&codes[5..], &[429; 15], "{codes:?}");
    let retry: u64 = statuses[19].headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // While throttled even the right key is refused: guessing learns nothing.
    let (status, body) = json_of(try_key("right-key-0123456789abcdef").await.unwrap()).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(app.get("/healthz").await.status(), 200);
    let text = scrape(&app).await;
    assert_eq!(
        metric(&text, "mobiface_auth_failures_total", &[]),
        Some(5.0)
    );
    assert_eq!(
        metric(&text, "mobiface_auth_throttled_total", &[]),
        Some(16.0)
    );
}

async fn send(app: &TestApp, method: &str, path: &str, ctype: &str, body: String) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let resp = app
        .client
        .request(m, app.url(path))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, value) = json_of(resp).await;
    (status.as_u16(), value)
}

/// The minor findings and the shapes of finding 2, answered with the right code.
#[tokio::test]
async fn hostile_bodies_get_the_right_error() {
    let app = spawn_app().await;
    let jpeg = read(&eval_crops(1)[0]);
    let mut cut = jpeg[..jpeg.len() / 2].to_vec();
    cut.extend_from_slice(&[0xFF, 0xD9]);
    let image = |bytes: &[u8]| json!({ "images": [b64(bytes)] }).to_string();
    let many = |n: usize| format!(r#"{{"images":[{}"x"]}}"#, r#""x","#.repeat(n - 1));
    let json = "application/json";
    for (method, path, ctype, body, status, code, says) in [
        (
            "POST",
            "/embed",
            json,
            image(&cut),
            400,
            "bad_image",
            "JPEG",
        ),
        (
            "POST",
            "/embed",
            "application/jsonfoo",
            image(&jpeg),
            415,
            "unsupported_media_type",
            "",
        ),
        (
            "POST",
            "/embed",
            "application/json; charset=utf-8",
            image(&jpeg),
            200,
            "",
            "",
        ),
        (
            "DELETE",
            "/embed",
            json,
            String::new(),
            405,
            "method_not_allowed",
            "DELETE",
        ),
        (
            "PUT",
            "/subjects",
            json,
            String::new(),
            405,
            "method_not_allowed",
            "",
        ),
        (
            "POST",
            "/embed",
            json,
            many(200_000),
            422,
            "too_many_images",
            "200000 images",
        ),
        (
            "POST",
            "/embed",
            json,
            "{\"images\": [0, 0, 0]}".into(),
            422,
            "invalid_request",
            "",
        ),
        (
            "POST",
            "/embed",
            json,
            "{\"images\": [\"a\",".into(),
            400,
            "malformed_body",
            "",
        ),
        (
            "POST",
            "/subjects",
            json,
            padded_body(r#"{"name":"x","metadata":{"a":["#, "0,", "0]}}", 1_000_000),
            422,
            "invalid_argument",
            "metadata",
        ),
    ] {
        let (got, value) = send(&app, method, path, ctype, body).await;
        assert_eq!(got, status, "{method} {path} {ctype}: {value}");
        if status != 200 {
            assert_eq!(value["error"]["code"], code, "{method} {path}: {value}");
            let message = value["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{method} {path}: {message}");
        }
    }
}

/// Finding 5: the bounds schemathesis found missing are in the served document, security
/// is as configured, and the face-deleting operation is reachable through a link. (The
/// full contract check is tests/ops/schemathesis_check.py, run by `make test`.)
#[tokio::test]
async fn served_openapi_states_the_bounds_the_server_enforces() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let schemas = &doc["components"]["schemas"];
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    let param = |path: &str, name: &str| {
        op(path, "get")["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["schema"]
            .clone()
    };
    assert_eq!(param("/subjects", "limit")["minimum"], 1);
    assert_eq!(
        schemas["IdentifyRequest"]["properties"]["top_k"]["minimum"],
        1
    );
    assert_eq!(
        schemas["CreateSubject"]["properties"]["name"]["minLength"],
        1
    );
    assert_eq!(
        schemas["EmbedRequest"]["properties"]["images"]["minItems"],
        1
    );
    assert_eq!(
        schemas["EmbedRequest"]["properties"]["images"]["maxItems"],
        32
    );
    assert_eq!(schemas["ImageInput"]["oneOf"][0]["minLength"], 1);
    // Every shape of /verify names a probe and a reference: a body of nulls matches none.
    for shape in schemas["VerifyRequest"]["oneOf"].as_array().unwrap() {
        assert_eq!(shape["required"].as_array().unwrap().len(), 2, "{shape}");
    }
    for (path, method) in [
        ("/embed", "post"),
        ("/subjects", "post"),
        ("/verify", "post"),
    ] {
        let responses = &op(path, method)["responses"];
        for code in ["400", "413", "415", "422"] {
            assert!(
                responses.get(code).is_some(),
                "{method} {path} lacks {code}"
            );
        }
        assert!(
            op(path, method)["requestBody"]["content"]["application/json"]["example"].is_object(),
            "{method} {path} has no example"
        );
    }
    // An open server claims no security; /metrics is open by default.
    assert!(op("/metrics", "get").get("security").is_none());
    assert!(op("/embed", "post").get("security").is_none());
    let links = &op("/subjects/{id}/faces", "post")["responses"]["201"]["links"];
    assert_eq!(links["DeleteFace"]["operationId"], "delete_face");
    // The example image is a real one: the server embeds it.
    let example =
        op("/embed", "post")["requestBody"]["content"]["application/json"]["example"].clone();
    let resp = app.post_json("/embed", &example).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}
