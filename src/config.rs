//! The one configuration struct. Every flag has a `MOBIFACE_*` environment
//! variable, so containers configure the service without a config file.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
    Coreml,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Coreml => "coreml",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How the model is loaded and run; shared by `serve` and `eval`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct EngineConfig {
    /// ONNX model file.
    #[arg(long, env = "MOBIFACE_MODEL", default_value = "models/mobiface.onnx")]
    pub model: PathBuf,
    /// ONNX Runtime shared library (libonnxruntime.so); `make ort` fetches it.
    #[arg(
        long,
        env = "ORT_DYLIB_PATH",
        default_value = "third_party/onnxruntime/libonnxruntime.so.1.31.1"
    )]
    pub ort_dylib: PathBuf,
    /// Execution provider. A provider that cannot be registered is a start-up error.
    #[arg(long, env = "MOBIFACE_PROVIDER", value_enum, default_value_t = Provider::Cpu)]
    pub provider: Provider,
    /// GPU ordinal for the CUDA provider.
    #[arg(long, env = "MOBIFACE_DEVICE_ID", default_value_t = 0)]
    pub device_id: i32,
    /// Inference threads, each owning one ONNX Runtime session. Default 2 with 1
    /// intra-op thread each: measured with other processes using the CPU, two
    /// requests in parallel beat one request on two threads from 8 callers up.
    #[arg(long, env = "MOBIFACE_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// ONNX Runtime intra-op threads per session (0 = ONNX Runtime decides).
    #[arg(long, env = "MOBIFACE_INTRA_THREADS", default_value_t = 1)]
    pub intra_threads: usize,
    /// Let ONNX Runtime's intra-op threads spin-wait for work between operators
    /// instead of sleeping.
    #[arg(long, env = "MOBIFACE_ORT_SPINNING", default_value_t = false, action = clap::ArgAction::Set)]
    pub ort_spinning: bool,
    /// Most images per model run, mirror copies included. Default: 2 on the CPU (one face
    /// and its mirror: measured here, larger CPU batches lower throughput and raise
    /// latency), 64 on GPU providers, where batching pays.
    #[arg(long, env = "MOBIFACE_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// How long a worker waits for more work to fill a batch (0 = run what is waiting now).
    #[arg(long, env = "MOBIFACE_MAX_BATCH_DELAY_US", default_value_t = 0)]
    pub max_batch_delay_us: u64,
    /// Requests that may wait for inference before new ones get 503.
    #[arg(long, env = "MOBIFACE_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
}

impl EngineConfig {
    /// The batch cap in force: the flag, else the provider's default.
    pub fn max_batch(&self) -> usize {
        let default = match self.provider {
            Provider::Cpu => 2,
            Provider::Cuda | Provider::Coreml => 64,
        };
        self.max_batch.unwrap_or(default).max(1)
    }
}

/// Where the gallery lives: a SQLite file (one replica), or a PostgreSQL
/// server shared by several replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` connection URL.
    Postgres(String),
}

impl std::str::FromStr for Database {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Ok(
            if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
                Database::Postgres(s.to_string())
            } else {
                Database::Sqlite(PathBuf::from(s))
            },
        )
    }
}

impl std::fmt::Display for Database {
    /// The URL's password, if any, is shown as `***`: this goes to logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl Serialize for Database {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// The gallery's storage and, with PostgreSQL, its replication.
#[derive(Debug, Clone, Args, Serialize)]
pub struct GalleryConfig {
    /// SQLite gallery file (its folder is created if missing), or a `postgres://` URL for a
    /// gallery shared by several replicas (TLS: `?sslmode=verify-full&sslrootcert=CA.pem`).
    #[arg(long, env = "MOBIFACE_DATABASE", default_value = "data/gallery.db")]
    pub database: Database,
    /// PostgreSQL connections this replica may hold (besides its one change-log listener).
    #[arg(long, env = "MOBIFACE_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,
    /// How long a request waits for a pooled PostgreSQL connection before 503, in ms.
    #[arg(long, env = "MOBIFACE_DB_POOL_TIMEOUT_MS", default_value_t = 2000)]
    pub db_pool_timeout_ms: u64,
    /// PostgreSQL: a replica re-reads the change log at least this often even when no
    /// notification arrives, bounding how stale its index can get, in ms.
    #[arg(long, env = "MOBIFACE_CATCHUP_INTERVAL_MS", default_value_t = 1000)]
    pub catchup_interval_ms: u64,
    /// PostgreSQL: change-log rows older than this are pruned even if a replica has not
    /// applied them (that replica then reloads the whole gallery), in seconds.
    #[arg(long, env = "MOBIFACE_CHANGE_LOG_MAX_AGE_S", default_value_t = 86_400)]
    pub change_log_max_age_s: u64,
}

/// The face detector used on photos sent without landmarks; shared by `serve`, `eval` and `align`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DetectorConfig {
    /// Face detector (YuNet ONNX file); `make detector` fetches it.
    #[arg(
        long,
        env = "MOBIFACE_DETECTOR",
        default_value = "third_party/yunet/face_detection_yunet_2023mar.onnx"
    )]
    pub detector: PathBuf,
    /// Least detector score in [0, 1] for a face to count.
    #[arg(long, env = "MOBIFACE_DETECTOR_SCORE", default_value_t = 0.5)]
    pub detector_score: f32,
    /// Detector sessions (photos detected at once).
    #[arg(long, env = "MOBIFACE_DETECTOR_SESSIONS", default_value_t = 2)]
    pub detector_sessions: usize,
    /// ONNX Runtime intra-op threads per detector session.
    #[arg(long, env = "MOBIFACE_DETECTOR_INTRA_THREADS", default_value_t = 1)]
    pub detector_intra_threads: usize,
    /// Smallest distance between the eyes, in photo pixels, of a face that is recognised
    /// (smaller faces get 422 `face_too_small`).
    #[arg(long, env = "MOBIFACE_MIN_EYE_DISTANCE", default_value_t = 10.0)]
    pub min_eye_distance: f32,
}

/// Everything `mobiface serve` takes.
#[derive(Debug, Clone, Args, Serialize)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "MOBIFACE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub engine: EngineConfig,
    #[command(flatten)]
    pub detection: DetectorConfig,
    #[command(flatten)]
    pub gallery: GalleryConfig,
    /// Match threshold on cosine similarity; default: the model's calibrated `mobiface.threshold`.
    #[arg(long, env = "MOBIFACE_THRESHOLD", allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Most images in one request.
    #[arg(long, env = "MOBIFACE_MAX_IMAGES_PER_REQUEST", default_value_t = 32)]
    pub max_images_per_request: usize,
    /// Largest request body in bytes.
    #[arg(long, env = "MOBIFACE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest image width or height in pixels, checked before decoding.
    #[arg(long, env = "MOBIFACE_MAX_IMAGE_SIDE", default_value_t = 8192)]
    pub max_image_side: u32,
    /// Most decoded bytes one image may allocate (decompression-bomb guard).
    #[arg(long, env = "MOBIFACE_MAX_DECODED_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_decoded_bytes: u64,
    /// Decoded pixel bytes all requests together may hold at once; an image waits for room
    /// (see --decode-wait-ms) instead of decoding beyond it. Each image reserves twice its
    /// decoded size (decoder buffer plus its RGB copy or crop).
    #[arg(long, env = "MOBIFACE_DECODE_BUDGET_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub decode_budget_bytes: u64,
    /// How long an image waits for decode budget before the request gets 503 with Retry-After.
    #[arg(long, env = "MOBIFACE_DECODE_WAIT_MS", default_value_t = 2_000)]
    pub decode_wait_ms: u64,
    /// Time a client has to send a complete request head, in milliseconds. The clock also runs
    /// while a keep-alive connection waits for its next request, so this is the idle timeout too.
    #[arg(
        long,
        env = "MOBIFACE_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_read_timeout_ms: u64,
    /// Most connections served at once; further ones wait in the listen backlog.
    #[arg(long, env = "MOBIFACE_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Failed authentications allowed per client address per minute (bursts of as many);
    /// beyond that the address gets 429 until it has waited. 0 = no limit.
    #[arg(
        long,
        env = "MOBIFACE_AUTH_FAILURES_PER_MINUTE",
        default_value_t = 30.0
    )]
    pub auth_failures_per_minute: f64,
    /// Per-request time limit in milliseconds (504 when exceeded).
    #[arg(long, env = "MOBIFACE_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// After SIGTERM, seconds during which /readyz answers 503 while requests are still
    /// accepted, so load balancers stop sending traffic before the listener closes.
    #[arg(long, env = "MOBIFACE_SHUTDOWN_DRAIN_S", default_value_t = 5)]
    pub shutdown_drain_s: u64,
    /// After the drain period, seconds in-flight requests get to finish; those still running
    /// then are answered 503.
    #[arg(long, env = "MOBIFACE_SHUTDOWN_TIMEOUT_S", default_value_t = 20)]
    pub shutdown_timeout_s: u64,
    /// File of `<scope> <key>` lines (scope `read` or `admin`); without it the API is open.
    #[arg(long, env = "MOBIFACE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Require a key (any scope) for GET /metrics too.
    #[arg(long, env = "MOBIFACE_METRICS_REQUIRE_KEY", default_value_t = false)]
    pub metrics_require_key: bool,
    /// Requests per second allowed per API key (0 = unlimited).
    #[arg(long, env = "MOBIFACE_RATE_LIMIT_PER_KEY", default_value_t = 0.0)]
    pub rate_limit_per_key: f64,
    /// Log output format.
    #[arg(long, env = "MOBIFACE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_a_path_or_a_postgres_url_and_logs_without_password() {
        let parse = |s: &str| s.parse::<Database>().expect("infallible");
        assert_eq!(
            parse("data/gallery.db"),
            Database::Sqlite(PathBuf::from("data/gallery.db"))
        );
        assert_eq!(
            parse("postgres.db"),
            Database::Sqlite(PathBuf::from("postgres.db"))
        );
        for url in [
            "postgres://u:secret@h:5432/db",
            "postgresql://u:secret@h/db",
            "POSTGRES://u:secret@h/db",
        ] {
            let db = parse(url);
            assert_eq!(db, Database::Postgres(url.to_string()));
            let shown = db.to_string();
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains("u:***@h"), "{shown}");
            let json = serde_json::to_string(&db).expect("serialises");
            assert!(!json.contains("secret"), "{json}");
        }
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        // A password containing '@' is still hidden whole.
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
