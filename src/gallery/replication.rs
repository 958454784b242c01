//! The change-log follower of one PostgreSQL replica: keeps the local index
//! equal to the tables by applying the change log in sequence order.
//!
//! `LISTEN` is only the wake-up. The follower always reads the log from its
//! last applied sequence, so a missed notification, a dropped connection or a
//! replica that was down catches up from the log instead of diverging; a
//! periodic pass bounds staleness even if notifications stop altogether. A
//! replica that finds rows it needs already pruned reloads the whole gallery.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::{AsyncMessage, Client};
use utoipa::ToSchema;
use uuid::Uuid;

use super::index::{FaceBatch, Index, BATCH_ROWS};
use super::mirror::Mirror;
use super::postgres::{pg_err, snapshot, Pg, CHANNEL};
use super::sqlite::decode_into;
use super::store::Change;
use super::{GalleryError, LoadReport, Result};
use crate::config::GalleryConfig;
use crate::metrics::Metrics;

/// Rows fetched per round trip while catching up.
const BATCH: i64 = 5000;
/// Longest a single pass may take before the connection is considered dead
/// (a server gone silent; TCP keepalives alone take minutes to notice). Generous,
/// since a pass may reload a large gallery.
const PASS_TIMEOUT: Duration = Duration::from_secs(60);

/// This replica's replication state, as `/readyz` reports it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Status {
    /// Whether the change-log listener is connected to PostgreSQL.
    pub connected: bool,
    /// Last change-log sequence applied to this replica's index.
    pub applied_seq: i64,
    /// Change-log rows committed but not yet applied (as of the last pass).
    pub lag: i64,
}

pub struct Follower {
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    id: Uuid,
    applied: watch::Sender<i64>,
    head: AtomicI64,
    connected: AtomicBool,
    poke: Notify,
    stop: watch::Sender<bool>,
    catchup_interval: Duration,
    change_log_max_age: Duration,
}

/// A dedicated connection whose driver runs in its own task; notifications
/// arrive on the returned channel, which closes when the connection does.
pub async fn connect_listening(
    pg: &Pg,
) -> std::result::Result<(Client, mpsc::UnboundedReceiver<()>), tokio_postgres::Error> {
    let (client, mut conn) = pg.config.connect(pg.tls.clone()).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "change-log listener connection lost");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// A dedicated connection, outside the pool (start-up: migrations and the first load).
pub async fn connect(pg: &Pg) -> std::result::Result<Client, tokio_postgres::Error> {
    Ok(connect_listening(pg).await?.0)
}

impl Follower {
    pub fn new(mirror: Arc<Mirror>, metrics: Arc<Metrics>, config: &GalleryConfig) -> Follower {
        Follower {
            mirror,
            metrics,
            id: Uuid::new_v4(),
            applied: watch::channel(0).0,
            head: AtomicI64::new(0),
            connected: AtomicBool::new(true),
            poke: Notify::new(),
            stop: watch::channel(false).0,
            catchup_interval: Duration::from_millis(config.catchup_interval_ms.max(10)),
            change_log_max_age: Duration::from_secs(config.change_log_max_age_s),
        }
    }

    pub fn model(&self) -> &str {
        &self.mirror.model
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Status {
        let applied = *self.applied.borrow();
        Status {
            connected: self.connected(),
            applied_seq: applied,
            lag: (self.head.load(Ordering::Relaxed) - applied).max(0),
        }
    }

    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Wakes the follower and waits (up to `timeout`) until `seq` is applied.
    pub async fn wait_applied(&self, seq: i64, timeout: Duration) -> bool {
        self.poke.notify_one();
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.metrics.replication_connected.set(i64::from(up));
    }

    fn set_applied(&self, seq: i64, head: i64) {
        self.applied.send_replace(seq);
        self.head.store(head.max(seq), Ordering::Relaxed);
        self.metrics.replication_applied_seq.set(seq);
        self.metrics.replication_lag.set((head - seq).max(0));
    }

    /// Follows the log until `stop()`, reconnecting with backoff whenever the
    /// connection fails (replicas answer 503 on writes meanwhile).
    pub async fn run(self: Arc<Self>, pg: Pg) {
        let mut stop = self.stop.subscribe();
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow() {
            let started = Instant::now();
            let result = self.session(&pg, &mut stop).await;
            self.set_connected(false);
            match result {
                Ok(()) => break,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64,
                        "PostgreSQL unreachable: change-log follower reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        let _ = self.forget_self(&pg).await;
    }

    /// One connection's life: LISTEN, catch up, then apply on every
    /// notification, poke or tick. Returns Ok only when stopped.
    async fn session(&self, pg: &Pg, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let (mut client, mut notes) = connect_listening(pg).await?;
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // After LISTEN, so nothing committed in between goes unseen.
        self.pass(&mut client).await?;
        self.set_connected(true);
        tracing::info!(
            applied_seq = *self.applied.borrow(),
            "following the change log"
        );
        let mut tick = tokio::time::interval(self.catchup_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let housekeeping_every = (self.catchup_interval * 5).max(Duration::from_secs(5));
        let mut last_housekeeping = Instant::now() - housekeeping_every;
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                note = notes.recv() => {
                    if note.is_none() {
                        anyhow::bail!("change-log listener connection closed");
                    }
                    while notes.try_recv().is_ok() {}
                    self.pass(&mut client).await?;
                }
                _ = self.poke.notified() => self.pass(&mut client).await?,
                _ = tick.tick() => {
                    self.pass(&mut client).await?;
                    if last_housekeeping.elapsed() >= housekeeping_every {
                        last_housekeeping = Instant::now();
                        self.housekeeping(&mut client).await?;
                    }
                }
            }
        }
    }

    /// Applies every change after the applied sequence, in one snapshot;
    /// reloads instead when rows it needs were pruned.
    async fn pass(&self, client: &mut Client) -> anyhow::Result<()> {
        match tokio::time::timeout(PASS_TIMEOUT, self.apply_log(client)).await {
            Ok(r) => Ok(r?),
            Err(_) => anyhow::bail!("change-log pass took over {PASS_TIMEOUT:?}"),
        }
    }

    async fn apply_log(&self, client: &mut Client) -> Result<()> {
        let mut applied = *self.applied.borrow();
        let tx = snapshot(client).await?;
        let row = tx
            .query_one(
                "SELECT pruned_upto, (SELECT coalesce(max(seq), 0) FROM change_log) FROM change_log_floor",
                &[],
            )
            .await
            .map_err(pg_err)?;
        let (floor, head): (i64, i64) = (row.get(0), row.get(1));
        if applied < floor {
            drop(tx);
            tracing::warn!(
                applied,
                pruned_upto = floor,
                "this replica fell behind the pruned change log: reloading the gallery"
            );
            self.reload(client).await?;
            return Ok(());
        }
        let model = self.mirror.model.clone();
        let mut recount = false;
        let mut caught_up = false;
        let mut changes = Vec::new();
        loop {
            // The face's embedding comes from the table; a row gone by now was
            // deleted by a later change in this same log, so skipping it is
            // what replaying both would do.
            let rows = tx
                .query(
                    "SELECT l.seq, l.op, l.subject_id, l.face_id, l.model = $2, s.name, f.embedding \
                     FROM change_log l \
                     LEFT JOIN subjects s ON l.op = 'subject_added' AND s.id = l.subject_id \
                     LEFT JOIN faces f ON l.op = 'face_added' AND f.id = l.face_id AND f.model = $2 \
                     WHERE l.seq > $1 ORDER BY l.seq LIMIT $3",
                    &[&applied, &model, &BATCH],
                )
                .await
                .map_err(pg_err)?;
            let n = rows.len() as i64;
            for row in &rows {
                applied = row.get(0);
                let op: &str = row.get(1);
                let subject_id: Uuid = row.get(2);
                let face_id: Option<Uuid> = row.get(3);
                let ours: Option<bool> = row.get(4);
                match (op, face_id) {
                    ("subject_added", _) => {
                        if let Some(name) = row.get::<_, Option<String>>(5) {
                            changes.push(Change::SubjectAdded {
                                id: subject_id,
                                name,
                            });
                        }
                    }
                    ("subject_deleted", _) => {
                        recount = true;
                        changes.push(Change::SubjectDeleted {
                            id: subject_id,
                            other_model_faces: None,
                        });
                    }
                    ("face_added", Some(face_id)) if ours == Some(true) => {
                        if let Some(blob) = row.get::<_, Option<&[u8]>>(6) {
                            let mut e = Vec::with_capacity(self.mirror.dim);
                            decode_into(blob, &mut e);
                            if e.len() == self.mirror.dim {
                                changes.push(Change::FaceAdded {
                                    face_id,
                                    subject_id,
                                    embedding: e,
                                });
                            }
                        }
                    }
                    ("face_deleted", Some(face_id)) if ours == Some(true) => {
                        changes.push(Change::FaceDeleted {
                            face_id,
                            of_running_model: true,
                        });
                    }
                    // Another model's face: counted from the table below.
                    _ => recount = true,
                }
            }
            // Applied batch by batch: a replica far behind never holds the
            // whole backlog's embeddings in memory, and waiting writers see progress.
            if !changes.is_empty() {
                caught_up = true;
            }
            self.mirror.apply(&changes);
            changes.clear();
            self.set_applied(applied, head);
            if n < BATCH {
                break;
            }
        }
        let other = if recount {
            let row = tx
                .query_one("SELECT count(*) FROM faces WHERE model <> $1", &[&model])
                .await
                .map_err(pg_err)?;
            Some(row.get::<_, i64>(0).max(0) as u64)
        } else {
            None
        };
        tx.commit().await.map_err(pg_err)?;
        if caught_up {
            self.metrics.replication_catchups.inc();
        }
        if let Some(other) = other {
            self.mirror.set_faces_other_model(other);
        }
        Ok(())
    }

    /// Loads the whole gallery from one snapshot and the log sequence it
    /// corresponds to, then swaps it in.
    pub async fn reload(&self, client: &mut Client) -> Result<LoadReport> {
        let start = Instant::now();
        let model = self.mirror.model.clone();
        let dim = self.mirror.dim;
        let tx = snapshot(client).await?;
        let row = tx
            .query_one(
                "SELECT greatest((SELECT coalesce(max(seq), 0) FROM change_log), \
                                 (SELECT pruned_upto FROM change_log_floor)), \
                        (SELECT count(*) FROM faces WHERE model = $1), \
                        (SELECT count(*) FROM faces WHERE model <> $1), \
                        (SELECT count(*) FROM subjects)",
                &[&model],
            )
            .await
            .map_err(pg_err)?;
        let head: i64 = row.get(0);
        let mut report = LoadReport {
            faces_other_model: row.get::<_, i64>(2).max(0) as u64,
            ..Default::default()
        };
        let mut index = Index::try_with_capacity(
            dim,
            row.get::<_, i64>(1).max(0) as usize,
            row.get::<_, i64>(3).max(0) as usize,
        )
        .map_err(|e| {
            GalleryError::Internal(
                anyhow::Error::from(e).context("cannot create the index's spill file"),
            )
        })?;
        for r in tx
            .query("SELECT id, name FROM subjects ORDER BY seq", &[])
            .await
            .map_err(pg_err)?
        {
            index.add_subject(r.get(0), r.get(1));
        }
        // Streamed: a large gallery is never held twice in memory.
        let rows = tx
            .query_raw(
                "SELECT id, subject_id, embedding FROM faces WHERE model = $1",
                [&model],
            )
            .await
            .map_err(pg_err)?;
        futures::pin_mut!(rows);
        // The start-up path SQLite takes too (without its threads: rows
        // arrive from the network here): whole batches into the index, each
        // one spill write.
        let mut batch = FaceBatch::with_capacity(BATCH_ROWS, dim);
        let add = |index: &mut Index, batch: &mut FaceBatch| -> Result<u64> {
            let refused = index.add_batch_written(batch).map_err(|e| {
                GalleryError::Internal(
                    anyhow::Error::from(e).context("cannot write the index's spill file"),
                )
            })?;
            batch.clear();
            Ok(refused as u64)
        };
        while let Some(r) = rows.next().await {
            let r = r.map_err(pg_err)?;
            let (fid, sid): (Uuid, Uuid) = (r.get(0), r.get(1));
            if !batch.push(fid, sid, r.get(2)) {
                report.faces_malformed += 1;
            }
            if batch.len() == BATCH_ROWS {
                report.faces_malformed += add(&mut index, &mut batch)?;
            }
        }
        report.faces_malformed += add(&mut index, &mut batch)?;
        tx.commit().await.map_err(pg_err)?;
        report.subjects = index.subjects();
        report.faces = index.faces();
        report.elapsed = start.elapsed();
        self.mirror.replace(index, report.faces_other_model);
        self.set_applied(head, head);
        self.metrics.replication_reloads.inc();
        Ok(report)
    }

    /// Records this replica's progress, forgets replicas long gone, and
    /// prunes log rows every live replica has applied, or older than the
    /// maximum age.
    async fn housekeeping(&self, client: &mut Client) -> Result<()> {
        let applied = *self.applied.borrow();
        // A replica that missed several heartbeats no longer holds rows back.
        let live_s = (self.catchup_interval.as_secs_f64() * 30.0).max(60.0);
        let max_age_s = self.change_log_max_age.as_secs_f64();
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO replicas (id, applied_seq, seen_at) VALUES ($1, $2, now()) \
             ON CONFLICT (id) DO UPDATE SET applied_seq = EXCLUDED.applied_seq, seen_at = now()",
            &[&self.id, &applied],
        )
        .await
        .map_err(pg_err)?;
        tx.execute(
            "DELETE FROM replicas WHERE seen_at < now() - make_interval(secs => $1)",
            &[&(live_s * 10.0)],
        )
        .await
        .map_err(pg_err)?;
        let upto: i64 = tx
            .query_one(
                "SELECT greatest( \
                   coalesce((SELECT min(applied_seq) FROM replicas \
                             WHERE seen_at > now() - make_interval(secs => $1)), 0), \
                   coalesce((SELECT max(seq) FROM change_log \
                             WHERE at < now() - make_interval(secs => $2)), 0))",
                &[&live_s, &max_age_s],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        let pruned = tx
            .execute("DELETE FROM change_log WHERE seq <= $1", &[&upto])
            .await
            .map_err(pg_err)?;
        if pruned > 0 {
            tx.execute(
                "UPDATE change_log_floor SET pruned_upto = greatest(pruned_upto, $1)",
                &[&upto],
            )
            .await
            .map_err(pg_err)?;
            tracing::debug!(pruned, upto, "pruned the change log");
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(())
    }

    /// On a clean stop, this replica stops holding log rows back at once.
    async fn forget_self(&self, pg: &Pg) -> anyhow::Result<()> {
        let client = tokio::time::timeout(Duration::from_secs(2), connect(pg)).await??;
        client
            .execute("DELETE FROM replicas WHERE id = $1", &[&self.id])
            .await?;
        Ok(())
    }
}
