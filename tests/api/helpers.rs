//! One way to start the real application for a test: real model, real ONNX
//! Runtime, a fresh SQLite file, HTTP over loopback on a free port.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use mobiface::api::AppState;
use mobiface::config::{Config, Database};
use mobiface::gallery::testing::TestCluster;
use mobiface::startup::Application;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[derive(Parser)]
struct ConfigArgs {
    #[command(flatten)]
    config: Config,
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn lfw_dir() -> PathBuf {
    manifest_dir().join("../shared/lfw")
}

/// `ORT_DYLIB_PATH`, else the library `make ort` puts in this checkout.
fn ort_dylib() -> PathBuf {
    std::env::var("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest_dir().join("third_party/onnxruntime/libonnxruntime.so.1.31.1"))
}

/// A config as the binary would parse it, pointed at this checkout's model and
/// ONNX Runtime library, listening on a free loopback port, with its own database.
pub fn test_config(db_path: &Path) -> Config {
    let root = manifest_dir();
    let args = [
        "test".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--model={}", root.join("models/mobiface.onnx").display()),
        format!("--ort-dylib={}", ort_dylib().display()),
        format!("--database={}", db_path.display()),
        format!(
            "--detector={}",
            root.join("third_party/yunet/face_detection_yunet_2023mar.onnx")
                .display()
        ),
    ];
    ConfigArgs::try_parse_from(args)
        .expect("test configuration parses")
        .config
}

pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    /// The running app's state, for reading engine statistics in-process.
    pub state: AppState,
    pub dir: tempfile::TempDir,
    /// Starts the app's shutdown, as SIGTERM would (`notify_one`).
    pub stop: std::sync::Arc<tokio::sync::Notify>,
    /// The serving task: ends when shutdown has finished.
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customise: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("gallery.db");
    let mut config = test_config(&db_path);
    customise(&mut config);
    let app = Application::build(config)
        .await
        .expect("application builds");
    let port = app.port();
    let state = app.state().clone();
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let notified = stop.clone();
    let server = tokio::spawn(app.run_until(async move { notified.notified().await }));
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::new(),
        state,
        dir,
        stop,
        server,
    }
}

/// The same application twice: on a fresh SQLite file, and on a fresh
/// database of the shared throwaway PostgreSQL cluster.
pub async fn spawn_app_both() -> [TestApp; 2] {
    let url = TestCluster::shared()
        .create_database("api")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let sqlite = spawn_app().await;
    let postgres = spawn_app_with(|c| c.gallery.database = Database::Postgres(url)).await;
    [sqlite, postgres]
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        send(self.client.get(self.url(path))).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        send(self.client.post(self.url(path)).json(body)).await
    }

    pub async fn post_multipart(
        &self,
        path: &str,
        form: reqwest::multipart::Form,
    ) -> reqwest::Response {
        send(self.client.post(self.url(path)).multipart(form)).await
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        send(self.client.delete(self.url(path))).await
    }

    /// POST /embed with base64 images; returns the embeddings, panicking on a non-200.
    pub async fn embed(&self, images: &[Vec<u8>], flip: bool) -> Vec<Vec<f32>> {
        let body =
            json!({"images": images.iter().map(|b| b64(b)).collect::<Vec<_>>(), "flip": flip});
        let resp = self.post_json("/embed", &body).await;
        let status = resp.status();
        let value: Value = resp.json().await.expect("JSON body");
        assert_eq!(status, 200, "embed failed: {value}");
        embeddings_of(&value)
    }
}

pub fn embeddings_of(value: &Value) -> Vec<Vec<f32>> {
    value["embeddings"]
        .as_array()
        .expect("embeddings array")
        .iter()
        .map(|e| {
            e["embedding"]
                .as_array()
                .expect("embedding array")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .collect()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Aligned 112x112 crops from the evaluation identities, one per person,
/// in a stable order. `n` must not exceed the identities available.
pub fn eval_crops(n: usize) -> Vec<PathBuf> {
    let root = lfw_dir().join("eval-aligned");
    let mut people: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{} must exist (shared LFW data): {e}", root.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    people.sort();
    let crops: Vec<PathBuf> = people
        .into_iter()
        .filter_map(|dir| {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .ok()?
                .map(|e| e.expect("dir entry").path())
                .collect();
            files.sort();
            files.into_iter().next()
        })
        .take(n)
        .collect();
    assert_eq!(
        crops.len(),
        n,
        "not enough identities in {}",
        root.display()
    );
    crops
}

pub fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encodes");
    out.into_inner()
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A client that opens a fresh connection per request, for tests where the
/// server may be closing a kept-alive one (short timeouts, shutdown).
pub fn unpooled_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("HTTP client builds")
}

async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    request.send().await.expect("request sent")
}

/// Status and JSON body of a response (Null for an empty body).
pub async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body ({e}): {text}"))
    };
    (status, value)
}

/// Status and JSON body of a GET through `client` (for servers outside a `TestApp`).
pub async fn get_json(client: &reqwest::Client, url: String) -> (StatusCode, Value) {
    json_of(client.get(url).send().await.expect("sent")).await
}

/// The project's Python environment (onnx, onnxruntime), for independent reference checks.
pub fn venv_python() -> PathBuf {
    let python = manifest_dir().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make venv` (make test does)",
        python.display()
    );
    python
}

/// The real binary (`mobiface serve`) as a child process, on a port the OS picks, its
/// JSON log (stdout and stderr) kept for the test to read.
pub struct Server {
    child: Child,
    pub address: String,
    /// No connection reuse: a request either was accepted before shutdown or never was.
    pub client: reqwest::Client,
    log: Arc<Mutex<String>>,
    /// A folder of its own: `start_ready` keeps its SQLite file (`gallery.db`) there.
    pub dir: tempfile::TempDir,
}

impl Server {
    /// On a SQLite file.
    pub fn start(db: &Path) -> Server {
        Server::start_on(&db.display().to_string(), &[])
    }

    /// On any `--database` value (a SQLite path or a PostgreSQL URL), with extra flags.
    pub fn start_on(database: &str, extra: &[&str]) -> Server {
        Server::spawn(database, extra, &[], tempfile::tempdir().expect("temp dir"))
    }

    /// On its own SQLite file, with extra flags and environment, ready (`/readyz` 200)
    /// once it returns.
    pub async fn start_ready(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("gallery.db").display().to_string();
        let mut server = Server::spawn(&db, args, envs, dir);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = server
                .client
                .get(format!("{}/readyz", server.address))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return server;
            }
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "server died at start:\n{}",
                server.log()
            );
            assert!(Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn spawn(
        database: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        dir: tempfile::TempDir,
    ) -> Server {
        let root = manifest_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mobiface"))
            .arg("serve")
            .arg("--listen=127.0.0.1:0")
            .arg(format!(
                "--model={}",
                root.join("models/mobiface.onnx").display()
            ))
            .arg(format!("--ort-dylib={}", ort_dylib().display()))
            .arg(format!("--database={database}"))
            .args(extra)
            .arg("--log-format=json")
            .env("RUST_LOG", "info")
            .env_remove("MOBIFACE_API_KEYS_FILE")
            .envs(envs.iter().copied())
            .current_dir(&root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        keep_lines(child.stderr.take().expect("stderr"), &log, |_| {});
        keep_lines(child.stdout.take().expect("stdout"), &log, move |line| {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                if v["message"] == "listening" {
                    if let Some(a) = v["address"].as_str() {
                        let _ = tx.send(a.to_string());
                    }
                }
            }
        });
        let address = rx.recv_timeout(Duration::from_secs(120));
        // built before the address is known, so that a failed start still kills the child (Drop)
        let mut server = Server {
            child,
            address: String::new(),
            client: unpooled_client(),
            log,
            dir,
        };
        match address {
            Ok(a) => server.address = format!("http://{a}"),
            Err(e) => panic!(
                "the server did not log `listening` with its address ({e}):\n{}",
                server.log()
            ),
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL (what `Child::kill` sends on Unix): no shutdown path, no
    /// checkpoint, no flush.
    pub fn kill9(self) {
        drop(self);
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server still running after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Appends each line of a child's pipe to `log`, for the child's whole life, so it never
/// blocks on a full pipe; `each` sees the line first.
fn keep_lines(
    pipe: impl std::io::Read + Send + 'static,
    log: &Arc<Mutex<String>>,
    mut each: impl FnMut(&str) + Send + 'static,
) {
    let log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            each(&line);
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

impl Drop for Server {
    // Also on a failed assertion, so no server outlives its test.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of every series of `name` whose labels include all of `labels`, from the
/// Prometheus text exposition; `None` if no such series exists.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: BTreeMap<&str, &str> = label_text
            .split("\",")
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            *total.get_or_insert(0.0) += value.parse::<f64>().expect("metric value");
        }
    }
    total
}

pub async fn scrape(app: &TestApp) -> String {
    let resp = app.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    resp.text().await.unwrap()
}
