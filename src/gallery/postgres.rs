//! PostgreSQL persistence: one database shared by several replicas.
//!
//! Every write commits its rows and one change-log row in the same
//! transaction (see migrations/postgres/0001_gallery.sql for why sequence
//! order is commit order), then waits until this replica's follower has
//! applied that sequence to the local index, so the writer reads its own
//! write at once. Other replicas apply it from the log ([`super::replication`]).
//!
//! Concurrency rules, relied on by the tests:
//! - A face insert and a delete of its subject are ordered by the subject
//!   row's lock: either the face commits first (its log row precedes the
//!   delete's, and replaying the delete removes it) or the delete commits
//!   first (the insert fails its foreign key or existence check: 404). No
//!   index ever keeps a face of a deleted subject.
//! - Subject ids are random v4 UUIDs made by the replica, listing cursors come
//!   from one database sequence: replicas creating subjects at once never
//!   collide, and a collision would be refused by the UNIQUE constraint.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

use super::mirror::Mirror;
use super::replication::{self, Follower};
use super::sqlite::encode;
use super::store::Store;
use super::{FaceInfo, GalleryError, LoadReport, Result, Subject, SubjectDetail};
use crate::config::{redact_url, GalleryConfig};
use crate::metrics::Metrics;

/// Schema migrations for PostgreSQL; same schema and semantics as SQLite's.
/// Append only: an applied migration is never edited, a change is a new file.
const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_gallery",
    include_str!("../../migrations/postgres/0001_gallery.sql"),
)];

/// Advisory lock keys (arbitrary constants, unique to this service).
const MIGRATION_LOCK: i64 = 0x6d6f_6269_0001;
/// Held from taking a change-log sequence until commit: see the migration.
pub(crate) const CHANGE_LOG_LOCK: i64 = 0x6d6f_6269_0002;
/// The `LISTEN` channel replicas are woken on.
pub(crate) const CHANNEL: &str = "mobiface_changes";

/// `created_at` as SQLite writes it: RFC 3339, UTC, milliseconds.
const CREATED_AT: &str =
    r#"to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#;

/// A database error is "unavailable" (503, retry later) when the server or
/// the connection is gone; anything else is a fault of ours (500).
pub(crate) fn pg_err(e: tokio_postgres::Error) -> GalleryError {
    let connection_class = e.code().is_some_and(|c| {
        let c = c.code();
        // 08: connection exception, 57: operator intervention (shutdown), 53: resources.
        c.starts_with("08") || c.starts_with("57") || c.starts_with("53")
    });
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if connection_class || e.is_closed() || io {
        GalleryError::Unavailable(e.to_string())
    } else {
        GalleryError::Internal(anyhow::Error::new(e).context("PostgreSQL"))
    }
}

/// A read-only transaction on one snapshot: every query in it sees the same
/// committed state (the log, its floor and the tables agree).
pub(crate) async fn snapshot(
    client: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'_>> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_err)
}

fn pool_err(e: PoolError) -> GalleryError {
    match e {
        PoolError::Backend(e) => pg_err(e),
        PoolError::Closed => GalleryError::Closed,
        PoolError::Timeout(_) => GalleryError::Unavailable(format!("connection pool: {e}")),
        other => GalleryError::Unavailable(format!("connection pool: {other}")),
    }
}

/// How this replica reaches PostgreSQL: the parsed URL and the TLS connector
/// that every connection (start-up, pool, change-log listener) uses.
#[derive(Clone)]
pub struct Pg {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

impl Pg {
    /// Parses the URL and sets what every connection of ours needs.
    ///
    /// TLS follows libpq's URL parameters: `sslmode=require` (or `verify-ca`,
    /// `verify-full`) encrypts every connection and verifies the server's
    /// certificate and host name against the system's roots and the
    /// `sslrootcert=FILE` CA bundle; `prefer` (libpq's default, which would
    /// accept any certificate) and `disable` connect in plain text.
    pub fn parse(url: &str) -> anyhow::Result<Pg> {
        let bad = || format!("bad PostgreSQL URL {}", redact_url(url));
        let (url, root_cert) = split_root_cert(url).with_context(bad)?;
        let mut config = tokio_postgres::Config::from_str(&url).with_context(bad)?;
        config
            .application_name("mobiface")
            .connect_timeout(Duration::from_secs(5))
            // A server that vanished without closing (network cut) is noticed.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
        let roots = if config.get_ssl_mode() == SslMode::Require {
            trusted_roots(root_cert.as_deref())
                .with_context(|| format!("TLS set-up for {}", redact_url(&url)))?
        } else {
            if root_cert.is_some() {
                anyhow::bail!("{}: sslrootcert needs sslmode=require", bad());
            }
            config.ssl_mode(SslMode::Disable);
            // Never consulted: these connections are plain, so the system's
            // roots are not read for them.
            rustls::RootCertStore::empty()
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Pg {
            config,
            tls: MakeRustlsConnect::new(tls),
        })
    }
}

/// A certificate we refuse, or a server without TLS when the URL requires it:
/// retrying will not change either. tokio-postgres exposes no error kind, so
/// this reads the message of its TLS kind ("error performing TLS handshake").
fn refused_by_tls(e: &tokio_postgres::Error) -> bool {
    e.to_string().contains("TLS handshake")
}

/// The URL without `sslrootcert` (which tokio-postgres does not take) and the
/// path it named; libpq's `verify-ca` and `verify-full` become `require`, which
/// here always verifies the certificate and host name.
fn split_root_cert(url: &str) -> anyhow::Result<(String, Option<PathBuf>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let (mut kept, mut root_cert) = (Vec::new(), None);
    for param in query.split('&') {
        match param.split_once('=') {
            Some(("sslrootcert", path)) => root_cert = Some(PathBuf::from(percent_decode(path)?)),
            Some(("sslmode", "verify-ca" | "verify-full")) => kept.push("sslmode=require"),
            _ => kept.push(param),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, root_cert))
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let (mut out, bytes) = (Vec::with_capacity(s.len()), s.as_bytes());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).context("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).context("bad %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("URL parameter is not UTF-8")
}

/// The system's roots plus `root_cert`'s (a PEM bundle, e.g. a managed
/// database's CA). The connector uses ring, not a process-wide default
/// provider, so nothing global is set.
fn trusted_roots(root_cert: Option<&Path>) -> anyhow::Result<rustls::RootCertStore> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: the CA file may be all a
    // deployment needs.
    let (_added, _ignored) =
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = root_cert {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .with_context(|| format!("reading sslrootcert {}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("sslrootcert {} holds no certificate", path.display());
        }
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("sslrootcert {}", path.display()))?;
        }
    }
    Ok(roots)
}

/// The PostgreSQL backend of one replica.
pub struct PgStore {
    pool: Pool,
    follower: Arc<Follower>,
    metrics: Arc<Metrics>,
    url: String,
    closed: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PgStore {
    /// Connects (retrying for up to 30 s, so replicas may start before the
    /// server), migrates, loads the index and starts the follower.
    pub async fn connect(
        url: &str,
        config: &GalleryConfig,
        mirror: Arc<Mirror>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(PgStore, LoadReport)> {
        let pg = Pg::parse(url)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = loop {
            match replication::connect(&pg).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline && !refused_by_tls(&e) => {
                    tracing::warn!(error = %e, url = %redact_url(url), "PostgreSQL not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", redact_url(url)))
                }
            }
        };
        migrate(&mut client).await.context("migrating PostgreSQL")?;
        let follower = Arc::new(Follower::new(mirror, metrics.clone(), config));
        let report = follower
            .reload(&mut client)
            .await
            .map_err(|e| anyhow::anyhow!("loading the gallery: {e}"))?;
        drop(client);

        let manager = Manager::from_config(
            pg.config.clone(),
            pg.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let wait = Duration::from_millis(config.db_pool_timeout_ms);
        let pool = Pool::builder(manager)
            .max_size(config.db_pool_size.max(1))
            .wait_timeout(Some(wait))
            .create_timeout(Some(wait))
            .runtime(Runtime::Tokio1)
            .build()
            .context("building the PostgreSQL pool")?;
        let task = tokio::spawn(follower.clone().run(pg));
        let store = PgStore {
            pool,
            follower,
            metrics,
            url: redact_url(url),
            closed: AtomicBool::new(false),
            task: Mutex::new(Some(task)),
        };
        store.pool_gauges();
        Ok((store, report))
    }

    fn pool_gauges(&self) {
        let s = self.pool.status();
        self.metrics.db_pool_size.set(s.size as i64);
        self.metrics.db_pool_available.set(s.available as i64);
        self.metrics.db_pool_waiting.set(s.waiting as i64);
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(GalleryError::Closed);
        }
        let start = Instant::now();
        self.pool_gauges();
        let got = self.pool.get().await;
        self.metrics
            .db_pool_wait
            .observe(start.elapsed().as_secs_f64());
        self.pool_gauges();
        got.map_err(pool_err)
    }

    /// Reads are safe to retry: one more try on a fresh connection when the
    /// first found the server gone (a pooled connection from before a restart).
    async fn read<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(deadpool_postgres::Object) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match f(self.client().await?).await {
            Err(GalleryError::Unavailable(_)) => f(self.client().await?).await,
            other => other,
        }
    }

    /// Waits until the local index holds change `seq`. The write is already
    /// committed, so a slow follower (server gone right after the commit)
    /// does not fail the request: the index catches up on reconnect.
    async fn visible(&self, seq: i64) {
        if !self
            .follower
            .wait_applied(seq, Duration::from_secs(5))
            .await
        {
            tracing::warn!(
                seq,
                "committed write not yet applied to the local index; it will be on catch-up"
            );
        }
    }
}

/// Appends the change-log row of a write inside its transaction; returns its
/// sequence. The advisory lock is held until the transaction ends, which is
/// what makes sequence order commit order.
async fn log_change(
    tx: &deadpool_postgres::Transaction<'_>,
    op: &str,
    subject_id: &Uuid,
    face: Option<(&Uuid, &str)>,
) -> Result<i64> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK])
        .await
        .map_err(pg_err)?;
    let (face_id, model) = face.unzip();
    let seq: i64 = tx
        .query_one(
            "INSERT INTO change_log (seq, op, subject_id, face_id, model) \
             VALUES (nextval('change_log_seq'), $1, $2, $3, $4) RETURNING seq",
            &[&op, subject_id, &face_id, &model],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    // Delivered at commit, and only then: a woken replica always finds the row.
    tx.batch_execute(&format!("NOTIFY {CHANNEL}"))
        .await
        .map_err(pg_err)?;
    Ok(seq)
}

fn subject_from_row(row: &tokio_postgres::Row) -> (i64, Subject) {
    let id: Uuid = row.get(1);
    let metadata: String = row.get(3);
    (
        row.get(0),
        Subject {
            id: id.to_string(),
            name: row.get(2),
            // Only serialised JSON objects are written; a hand-edited bad value
            // shows as null rather than failing the whole listing.
            metadata: serde_json::from_str(&metadata).unwrap_or(serde_json::Value::Null),
            created_at: row.get(4),
            face_count: row.get::<_, i64>(5).max(0) as u64,
        },
    )
}

fn subject_columns() -> String {
    format!(
        "s.seq, s.id, s.name, s.metadata, {}, \
         (SELECT count(*) FROM faces f WHERE f.subject_id = s.id)",
        CREATED_AT.replace("created_at", "s.created_at")
    )
}

#[async_trait]
impl Store for PgStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn available(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && self.follower.connected()
    }

    fn replication(&self) -> Option<replication::Status> {
        Some(self.follower.status())
    }

    async fn create_subject(&self, id: Uuid, name: String, metadata: String) -> Result<Subject> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let created_at: String = tx
            .query_one(
                &format!(
                    "INSERT INTO subjects (id, name, metadata) VALUES ($1, $2, $3) RETURNING {CREATED_AT}"
                ),
                &[&id, &name, &metadata],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        let seq = log_change(&tx, "subject_added", &id, None).await?;
        tx.commit().await.map_err(pg_err)?;
        drop(client);
        self.visible(seq).await;
        Ok(Subject {
            id: id.to_string(),
            name,
            metadata: serde_json::from_str(&metadata).map_err(anyhow::Error::from)?,
            created_at,
            face_count: 0,
        })
    }

    async fn list_subjects(&self, limit: usize, after: i64) -> Result<(Vec<Subject>, Option<i64>)> {
        let sql = format!(
            "SELECT {} FROM subjects s WHERE s.seq > $1 ORDER BY s.seq LIMIT $2",
            subject_columns()
        );
        let rows = self
            .read(|c| {
                let sql = sql.clone();
                async move {
                    // One extra row tells whether another page exists.
                    c.query(&sql, &[&after, &((limit + 1) as i64)])
                        .await
                        .map_err(pg_err)
                }
            })
            .await?;
        let more = rows.len() > limit;
        let mut subjects = Vec::with_capacity(limit);
        let mut last = None;
        for row in rows.iter().take(limit) {
            let (seq, s) = subject_from_row(row);
            last = Some(seq);
            subjects.push(s);
        }
        Ok((subjects, if more { last } else { None }))
    }

    async fn get_subject(&self, id: Uuid) -> Result<Option<SubjectDetail>> {
        let subject_sql = format!(
            "SELECT {} FROM subjects s WHERE s.id = $1",
            subject_columns()
        );
        let faces_sql =
            format!("SELECT id, {CREATED_AT}, model FROM faces WHERE subject_id = $1 ORDER BY seq");
        self.read(|mut c| {
            let (subject_sql, faces_sql) = (subject_sql.clone(), faces_sql.clone());
            async move {
                // One snapshot, so the face count and the face list agree.
                let tx = snapshot(&mut c).await?;
                let Some(row) = tx.query_opt(&subject_sql, &[&id]).await.map_err(pg_err)? else {
                    return Ok(None);
                };
                let (_, subject) = subject_from_row(&row);
                let faces = tx
                    .query(&faces_sql, &[&id])
                    .await
                    .map_err(pg_err)?
                    .iter()
                    .map(|r| FaceInfo {
                        id: r.get::<_, Uuid>(0).to_string(),
                        created_at: r.get(1),
                        model: r.get(2),
                    })
                    .collect();
                tx.commit().await.map_err(pg_err)?;
                Ok(Some(SubjectDetail { subject, faces }))
            }
        })
        .await
    }

    async fn delete_subject(&self, id: Uuid) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let n = tx
            .execute("DELETE FROM subjects WHERE id = $1", &[&id])
            .await
            .map_err(pg_err)?;
        if n == 0 {
            return Ok(false);
        }
        let seq = log_change(&tx, "subject_deleted", &id, None).await?;
        tx.commit().await.map_err(pg_err)?;
        drop(client);
        self.visible(seq).await;
        Ok(true)
    }

    async fn add_face(&self, face_id: Uuid, subject_id: Uuid, embedding: Vec<f32>) -> Result<bool> {
        let model = self.follower.model().to_string();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let inserted = tx
            .execute(
                "INSERT INTO faces (id, subject_id, embedding, dim, model) \
                 SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM subjects WHERE id = $2)",
                &[
                    &face_id,
                    &subject_id,
                    &encode(&embedding),
                    &(embedding.len() as i32),
                    &model,
                ],
            )
            .await;
        match inserted {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            // The subject was deleted by another replica between our existence
            // check and the foreign-key check: the same answer as "no subject".
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) => {
                return Ok(false)
            }
            Err(e) => return Err(pg_err(e)),
        }
        let seq = log_change(&tx, "face_added", &subject_id, Some((&face_id, &model))).await?;
        tx.commit().await.map_err(pg_err)?;
        drop(client);
        self.visible(seq).await;
        Ok(true)
    }

    async fn delete_face(&self, subject_id: Uuid, face_id: Uuid) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let Some(row) = tx
            .query_opt(
                "DELETE FROM faces WHERE id = $1 AND subject_id = $2 RETURNING model",
                &[&face_id, &subject_id],
            )
            .await
            .map_err(pg_err)?
        else {
            return Ok(false);
        };
        let model: String = row.get(0);
        let seq = log_change(&tx, "face_deleted", &subject_id, Some((&face_id, &model))).await?;
        tx.commit().await.map_err(pg_err)?;
        drop(client);
        self.visible(seq).await;
        Ok(true)
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        self.follower.stop();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.pool.close();
        tracing::info!(database = %self.url, "gallery closed");
        Ok(())
    }
}

/// Applies each migration not yet recorded, each in its own transaction with
/// its record, under an advisory lock so replicas starting together take
/// turns. Running it again changes nothing.
pub async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<usize> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    TEXT PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
        let mut applied = 0;
        for (version, sql) in MIGRATIONS {
            let tx = client.transaction().await?;
            let done = tx
                .query_opt(
                    "SELECT 1 FROM schema_migrations WHERE version = $1",
                    &[version],
                )
                .await?
                .is_some();
            if done {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("applying migration {version}"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(version, "applied database migration");
            applied += 1;
        }
        anyhow::Ok(applied)
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}
