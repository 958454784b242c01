//! SQLite persistence, the embedded default: one process, one file, one
//! writer. Opening with the right pragmas, migrations, the statements the
//! gallery needs, and [`SqliteStore`], which runs them on blocking threads and
//! updates the index while still holding the connection, so the two can never
//! disagree about the order of writes.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::index::{FaceBatch, Index, BATCH_ROWS};
use super::mirror::Mirror;
use super::store::{Change, Store};
use super::{FaceInfo, GalleryError, LoadReport, Result, Subject, SubjectDetail};

/// Schema migrations, embedded at compile time and applied in this order.
/// Append only: an applied migration is never edited, a change is a new file.
const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_gallery",
    include_str!("../../migrations/sqlite/0001_gallery.sql"),
)];

/// WAL pages after which a commit checkpoints (SQLite's auto-checkpoint).
pub const WAL_AUTOCHECKPOINT_PAGES: i64 = 256;
/// Size the WAL file is truncated to when a checkpoint restarts it.
pub const WAL_SIZE_LIMIT_BYTES: i64 = 4 * 1024 * 1024;

/// Opens (creating if needed) the database file, sets the connection up and
/// applies pending migrations.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating database folder {}", dir.display()))?;
    }
    let conn =
        Connection::open(path).with_context(|| format!("opening database {}", path.display()))?;
    configure(&conn).with_context(|| format!("configuring database {}", path.display()))?;
    migrate(&conn).with_context(|| format!("migrating database {}", path.display()))?;
    Ok(conn)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Another process (an admin's sqlite3 shell, a backup) may hold a lock
    // briefly; wait for it rather than failing a request at once.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // A face row is ~2.1 KB (512 f32 + ids), so 4 KiB pages hold one row each
    // and waste half the file; 16 KiB pages hold seven (90% full), which halves
    // the file and the start-up read. Only takes effect on a new, empty
    // database, so it must come before WAL mode and the first table.
    conn.pragma_update(None, "page_size", 16384)?;
    // WAL: readers never block the writer and a commit is one sequential append.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "SQLite refused WAL mode (filesystem without shared memory?)"
        );
    }
    // FULL, not NORMAL: in WAL mode NORMAL already survives `kill -9` of this
    // process (committed frames sit in the OS page cache), but it fsyncs only at
    // checkpoints, so an OS crash or power cut could drop commits we already
    // answered 201/204 for. FULL fsyncs the WAL on every commit, which is the
    // promise "acknowledged writes are durable" makes; it costs one fsync per
    // enrolment, small next to embedding the face.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Checkpoint every 256 pages (4 MiB at 16 KiB pages, not SQLite's 1000 =
    // 16 MiB), and cut the file back to 4 MiB when a checkpoint resets it: a WAL
    // only ever grows its file otherwise, and every read scans its index.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
    // Needed for ON DELETE CASCADE from subjects to faces (off by default in SQLite).
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

/// Applies each migration not yet recorded in `schema_migrations`, each in its
/// own transaction together with its record, so a crash mid-way leaves either
/// the whole migration or none of it. Running it again changes nothing.
pub fn migrate(conn: &Connection) -> anyhow::Result<usize> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    TEXT PRIMARY KEY NOT NULL,
             applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         )",
    )?;
    let mut applied = 0;
    for (version, sql) in MIGRATIONS {
        let done: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
            [version],
            |r| r.get(0),
        )?;
        if done {
            continue;
        }
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("applying migration {version}"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES (?1)",
            [version],
        )?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
        applied += 1;
    }
    Ok(applied)
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

pub fn encode(embedding: &[f32]) -> Vec<u8> {
    embedding.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode_into(blob: &[u8], out: &mut Vec<f32>) {
    out.extend(
        blob.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
}

/// Batches in flight between the stages of a start-up load.
const LOAD_BATCHES: usize = 8;

/// What the reading stage hands the building one, in table order.
enum Load {
    Subjects(Vec<(Uuid, String)>),
    Faces(FaceBatch),
}

/// Builds the index in one streaming pass over `subjects` and `faces`: rows
/// of `model` go to the index as stored (the blob is already the spill file's
/// layout); other models' rows are only counted (their blobs are not even
/// read, thanks to the CASE).
pub fn load_index(
    conn: &Connection,
    model: &str,
    dim: usize,
) -> anyhow::Result<(Index, LoadReport)> {
    let start = Instant::now();
    let n_faces: i64 = conn.query_row(
        "SELECT count(*) FROM faces WHERE model = ?1",
        [model],
        |r| r.get(0),
    )?;
    let n_subjects: i64 = conn.query_row("SELECT count(*) FROM subjects", [], |r| r.get(0))?;
    let index = Index::try_with_capacity(dim, n_faces.max(0) as usize, n_subjects.max(0) as usize)
        .context("cannot create the index's spill file in the temporary folder")?;
    let mut report = LoadReport::default();

    // Three stages on their own threads, so they share the cores: this one
    // steps SQLite, a second builds the index, a third writes the vectors to
    // the spill file (the largest single cost: 2 GiB copied into the page
    // cache at 1M faces). Batches travel round the ring and are reused.
    let (full_tx, full_rx) = mpsc::sync_channel::<Load>(LOAD_BATCHES);
    let (built_tx, built_rx) = mpsc::sync_channel::<(u32, FaceBatch)>(LOAD_BATCHES);
    let (empty_tx, empty_rx) = mpsc::channel::<FaceBatch>();
    for _ in 0..LOAD_BATCHES {
        let _ = empty_tx.send(FaceBatch::with_capacity(BATCH_ROWS, dim));
    }
    let spill = index.spill_writer();
    let (written, built, read) = std::thread::scope(|s| {
        let writer = s.spawn(move || -> std::io::Result<()> {
            for (at, mut batch) in built_rx {
                spill.write(at, &batch)?;
                batch.clear();
                // The reader may have finished and gone: nothing to refill.
                let _ = empty_tx.send(batch);
            }
            Ok(())
        });
        let builder = s.spawn(move || {
            let mut index = index;
            let mut refused = 0;
            for load in full_rx {
                match load {
                    Load::Subjects(subjects) => {
                        for (id, name) in subjects {
                            index.add_subject(id, name);
                        }
                    }
                    Load::Faces(mut batch) => {
                        let (at, r) = index.add_batch(&mut batch);
                        refused += r;
                        if built_tx.send((at, batch)).is_err() {
                            break; // the writer failed; its error is reported
                        }
                    }
                }
            }
            (index, refused)
        });
        // Runs until done or until the builder stops taking batches.
        let read = read_rows(conn, model, &full_tx, &empty_rx, &mut report);
        drop(full_tx);
        let panicked = |_| anyhow::anyhow!("an index load thread panicked");
        let built = builder.join().map_err(panicked);
        (writer.join().map_err(panicked), built, read)
    });
    written?.context("cannot write the index's spill file")?;
    let (index, refused) = built?;
    read?;
    report.faces_malformed += refused as u64;
    report.subjects = index.subjects();
    report.faces = index.faces();
    report.elapsed = start.elapsed();
    Ok((index, report))
}

/// The reading stage of `load_index`. `Ok` also when a later stage hung up
/// early; the caller then reports that stage's error.
fn read_rows(
    conn: &Connection,
    model: &str,
    to_builder: &mpsc::SyncSender<Load>,
    empty: &mpsc::Receiver<FaceBatch>,
    report: &mut LoadReport,
) -> anyhow::Result<()> {
    let mut stmt = conn.prepare("SELECT id, name FROM subjects ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let mut subjects = Vec::with_capacity(BATCH_ROWS);
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let id =
            Uuid::parse_str(&id).with_context(|| format!("subject id {id:?} is not a UUID"))?;
        subjects.push((id, row.get(1)?));
        if subjects.len() == BATCH_ROWS {
            let full = std::mem::replace(&mut subjects, Vec::with_capacity(BATCH_ROWS));
            if to_builder.send(Load::Subjects(full)).is_err() {
                return Ok(());
            }
        }
    }
    if to_builder.send(Load::Subjects(subjects)).is_err() {
        return Ok(());
    }

    let mut stmt = conn.prepare(
        "SELECT id, subject_id, model = ?1, CASE WHEN model = ?1 THEN embedding END FROM faces",
    )?;
    let mut rows = stmt.query([model])?;
    let Ok(mut batch) = empty.recv() else {
        return Ok(());
    };
    while let Some(row) = rows.next()? {
        let ours: bool = row.get(2)?;
        if !ours {
            report.faces_other_model += 1;
            continue;
        }
        let blob = row.get_ref(3)?.as_blob()?;
        let fid = Uuid::parse_str(row.get_ref(0)?.as_str()?);
        let sid = Uuid::parse_str(row.get_ref(1)?.as_str()?);
        match (fid, sid) {
            // `push` refuses a blob that is not `dim` floats.
            (Ok(fid), Ok(sid)) if batch.push(fid, sid, blob) => {}
            _ => report.faces_malformed += 1,
        }
        if batch.len() == BATCH_ROWS {
            let Ok(next) = empty.recv() else {
                return Ok(());
            };
            if to_builder
                .send(Load::Faces(std::mem::replace(&mut batch, next)))
                .is_err()
            {
                return Ok(());
            }
        }
    }
    let _ = to_builder.send(Load::Faces(batch));
    Ok(())
}

fn subject_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Subject)> {
    let metadata: String = row.get(3)?;
    Ok((
        row.get(0)?,
        Subject {
            id: row.get(1)?,
            name: row.get(2)?,
            // The column only ever receives serialised JSON objects; a hand-edited
            // bad value shows as null rather than failing the whole listing.
            metadata: serde_json::from_str(&metadata).unwrap_or(serde_json::Value::Null),
            created_at: row.get(4)?,
            face_count: row.get(5)?,
        },
    ))
}

const SUBJECT_COLUMNS: &str = "s.seq, s.id, s.name, s.metadata, s.created_at, \
     (SELECT count(*) FROM faces f WHERE f.subject_id = s.id)";

pub fn insert_subject(
    conn: &Connection,
    id: &Uuid,
    name: &str,
    metadata: &str,
) -> anyhow::Result<Subject> {
    let created_at: String = returning(
        conn,
        &format!("INSERT INTO subjects (id, name, metadata, created_at) VALUES (?1, ?2, ?3, {NOW}) RETURNING created_at"),
        params![id.to_string(), name, metadata],
    )?
    .context("INSERT ... RETURNING gave no row")?;
    Ok(Subject {
        id: id.to_string(),
        name: name.to_string(),
        metadata: serde_json::from_str(metadata)?,
        created_at,
        face_count: 0,
    })
}

/// Subjects in creation order after cursor `after` (a `seq`), plus the next cursor.
pub fn list_subjects(
    conn: &Connection,
    limit: usize,
    after: i64,
) -> anyhow::Result<(Vec<Subject>, Option<i64>)> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SUBJECT_COLUMNS} FROM subjects s WHERE s.seq > ?1 ORDER BY s.seq LIMIT ?2"
    ))?;
    // One extra row tells whether another page exists without a count query.
    let rows = stmt
        .query_map(params![after, (limit + 1) as i64], subject_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let more = rows.len() > limit;
    let mut subjects = Vec::with_capacity(limit);
    let mut last = None;
    for (seq, s) in rows.into_iter().take(limit) {
        last = Some(seq);
        subjects.push(s);
    }
    Ok((subjects, if more { last } else { None }))
}

pub fn get_subject(conn: &Connection, id: &Uuid) -> anyhow::Result<Option<SubjectDetail>> {
    let id = id.to_string();
    let subject = conn
        .query_row(
            &format!("SELECT {SUBJECT_COLUMNS} FROM subjects s WHERE s.id = ?1"),
            [&id],
            subject_from_row,
        )
        .optional()?;
    let Some((_, subject)) = subject else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT id, created_at, model FROM faces WHERE subject_id = ?1 ORDER BY created_at, rowid",
    )?;
    let faces = stmt
        .query_map([&id], |r| {
            Ok(FaceInfo {
                id: r.get(0)?,
                created_at: r.get(1)?,
                model: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(SubjectDetail { subject, faces }))
}

/// Deletes a subject (its faces go by cascade). Returns `None` if it did not
/// exist, else how many of its faces were of another model (to keep that
/// count in step without rescanning the table).
pub fn delete_subject(conn: &Connection, id: &Uuid, model: &str) -> anyhow::Result<Option<u64>> {
    let id = id.to_string();
    let tx = conn.unchecked_transaction()?;
    let other: i64 = tx.query_row(
        "SELECT count(*) FROM faces WHERE subject_id = ?1 AND model != ?2",
        [&id, model],
        |r| r.get(0),
    )?;
    let deleted = tx.execute("DELETE FROM subjects WHERE id = ?1", [&id])? > 0;
    tx.commit()?;
    Ok(deleted.then_some(other.max(0) as u64))
}

/// Inserts a face if its subject exists; returns the face's `created_at`, or
/// `None` when the subject does not exist.
pub fn insert_face(
    conn: &Connection,
    face_id: &Uuid,
    subject_id: &Uuid,
    embedding: &[f32],
    model: &str,
) -> anyhow::Result<Option<String>> {
    returning(
        conn,
        &format!(
            "INSERT INTO faces (id, subject_id, embedding, dim, model, created_at) \
             SELECT ?1, ?2, ?3, ?4, ?5, {NOW} WHERE EXISTS (SELECT 1 FROM subjects WHERE id = ?2) \
             RETURNING created_at"
        ),
        params![
            face_id.to_string(),
            subject_id.to_string(),
            encode(embedding),
            embedding.len() as i64,
            model
        ],
    )
}

/// Deletes a face of a subject; returns the model it was made by, or `None`
/// when there is no such face under that subject.
pub fn delete_face(
    conn: &Connection,
    subject_id: &Uuid,
    face_id: &Uuid,
) -> anyhow::Result<Option<String>> {
    returning(
        conn,
        "DELETE FROM faces WHERE id = ?1 AND subject_id = ?2 RETURNING model",
        [face_id.to_string(), subject_id.to_string()],
    )
}

/// Runs a one-row `... RETURNING` write and steps it until SQLite says DONE.
/// `query_row` stops at the first row and resets the statement: the write
/// still commits, but SQLite runs its WAL hook (the auto-checkpoint) only when
/// a step returns DONE, so the WAL was never checkpointed and grew ~72 KB per
/// enrolment without bound.
fn returning<T: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> anyhow::Result<Option<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut first = None;
    while let Some(row) = rows.next()? {
        if first.is_none() {
            first = Some(row.get(0)?);
        }
    }
    Ok(first)
}

/// Copies everything in the WAL into the main file and truncates the WAL, so a
/// cleanly stopped service leaves one self-contained file.
pub fn checkpoint(conn: &Connection) -> anyhow::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

impl From<rusqlite::Error> for GalleryError {
    fn from(e: rusqlite::Error) -> Self {
        GalleryError::Internal(e.into())
    }
}

struct Inner {
    /// `None` after `close()`.
    conn: Mutex<Option<Connection>>,
    mirror: Arc<Mirror>,
    path: PathBuf,
}

/// The SQLite backend: one connection (the one writer) behind a mutex.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

// A poisoned lock means a panic happened mid-operation elsewhere. The SQLite
// connection rolls back an unfinished transaction by itself, so carrying on
// beats failing every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SqliteStore {
    /// Opens the file (creating file and folder if missing), applies
    /// migrations and loads `mirror`'s index. Blocking: call it at start-up.
    pub fn open(path: &Path, mirror: Arc<Mirror>) -> anyhow::Result<(SqliteStore, LoadReport)> {
        let conn = open(path)?;
        let (index, report) = load_index(&conn, &mirror.model, mirror.dim)?;
        mirror.replace(index, report.faces_other_model);
        let store = SqliteStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(Some(conn)),
                mirror,
                path: path.to_path_buf(),
            }),
        };
        Ok((store, report))
    }

    /// Runs `f` with the connection on a blocking thread, failing if closed.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &Mirror) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let guard = lock(&inner.conn);
            let conn = guard.as_ref().ok_or(GalleryError::Closed)?;
            f(conn, &inner.mirror)
        })
        .await
        .map_err(|e| GalleryError::Internal(anyhow::anyhow!("gallery task failed: {e}")))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        self.inner.path.display().to_string()
    }

    async fn create_subject(&self, id: Uuid, name: String, metadata: String) -> Result<Subject> {
        self.with_conn(move |conn, mirror| {
            let subject = insert_subject(conn, &id, &name, &metadata)?;
            mirror.apply(&[Change::SubjectAdded { id, name }]);
            Ok(subject)
        })
        .await
    }

    async fn list_subjects(&self, limit: usize, after: i64) -> Result<(Vec<Subject>, Option<i64>)> {
        self.with_conn(move |conn, _| Ok(list_subjects(conn, limit, after)?))
            .await
    }

    async fn get_subject(&self, id: Uuid) -> Result<Option<SubjectDetail>> {
        self.with_conn(move |conn, _| Ok(get_subject(conn, &id)?))
            .await
    }

    async fn delete_subject(&self, id: Uuid) -> Result<bool> {
        self.with_conn(move |conn, mirror| {
            let Some(other) = delete_subject(conn, &id, &mirror.model)? else {
                return Ok(false);
            };
            mirror.apply(&[Change::SubjectDeleted {
                id,
                other_model_faces: Some(other),
            }]);
            Ok(true)
        })
        .await
    }

    async fn add_face(&self, face_id: Uuid, subject_id: Uuid, embedding: Vec<f32>) -> Result<bool> {
        self.with_conn(move |conn, mirror| {
            if insert_face(conn, &face_id, &subject_id, &embedding, &mirror.model)?.is_none() {
                return Ok(false);
            }
            mirror.apply(&[Change::FaceAdded {
                face_id,
                subject_id,
                embedding,
            }]);
            Ok(true)
        })
        .await
    }

    async fn delete_face(&self, subject_id: Uuid, face_id: Uuid) -> Result<bool> {
        self.with_conn(move |conn, mirror| {
            let Some(model) = delete_face(conn, &subject_id, &face_id)? else {
                return Ok(false);
            };
            mirror.apply(&[Change::FaceDeleted {
                face_id,
                of_running_model: model == mirror.model,
            }]);
            Ok(true)
        })
        .await
    }

    /// Checkpoints the WAL into the main file and closes the connection.
    async fn close(&self) -> Result<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&inner.conn);
            if let Some(conn) = guard.take() {
                checkpoint(&conn)?;
                conn.close().map_err(|(_, e)| GalleryError::from(e))?;
                tracing::info!(path = %inner.path.display(), "gallery closed");
            }
            Ok(())
        })
        .await
        .map_err(|e| GalleryError::Internal(anyhow::anyhow!("gallery task failed: {e}")))?
    }
}
