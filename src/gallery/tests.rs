//! Gallery tests on real SQLite files in temporary folders and, for the
//! tests marked "both backends", on a real PostgreSQL server too (a throwaway
//! cluster: `make postgres` installs it; without it those tests fail).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const DIM: usize = 512;
const MODEL: &str = "mobiface@test-1";

fn unit(rng: &mut StdRng) -> Vec<f32> {
    index::tests::unit(rng, DIM)
}

fn open(path: &Path) -> Gallery {
    Gallery::open(path, MODEL, DIM, Arc::new(Metrics::new())).expect("open gallery")
}

/// One gallery database of either backend, reopenable.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Db {
    fn both() -> [Db; 2] {
        let url = testing::TestCluster::shared()
            .create_database("gallery")
            .expect("test database");
        [
            Db::Sqlite(tempfile::tempdir().expect("tempdir")),
            Db::Postgres(url),
        ]
    }

    fn name(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    async fn open(&self) -> Gallery {
        match self {
            Db::Sqlite(dir) => open(&dir.path().join("g.db")),
            Db::Postgres(url) => connect(url).await.expect("connect gallery"),
        }
    }
}

/// A PostgreSQL gallery with the service's default settings.
async fn connect(url: &str) -> anyhow::Result<Gallery> {
    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        gallery: crate::config::GalleryConfig,
    }
    let args =
        <Args as clap::Parser>::try_parse_from(["t", "--database", url]).expect("config parses");
    Gallery::connect(&args.gallery, MODEL, DIM, Arc::new(Metrics::new())).await
}

/// Writes rows straight into the file, bypassing the gallery (as another
/// model's service, or a bulk import, would have).
fn raw_insert(path: &Path, subjects: &[Uuid], faces: &[(Uuid, Uuid, Vec<f32>, &str)]) {
    let conn = sqlite::open(path).expect("open raw");
    let tx = conn.unchecked_transaction().expect("tx");
    for (i, s) in subjects.iter().enumerate() {
        sqlite::insert_subject(&tx, s, &format!("subject {i}"), "{}").expect("subject");
    }
    for (f, s, v, model) in faces {
        assert!(sqlite::insert_face(&tx, f, s, v, model)
            .expect("face")
            .is_some());
    }
    tx.commit().expect("commit");
}

fn assert_same(got: &[Match], want: &[(Uuid, f64, Uuid)]) {
    assert_eq!(got.len(), want.len(), "got {got:?}\nwant {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            (g.subject_id, g.face_id),
            (w.0, w.2),
            "got {got:?}\nwant {want:?}"
        );
        assert!(
            (f64::from(g.similarity) - w.1).abs() < 1e-5,
            "{} vs {}",
            g.similarity,
            w.1
        );
    }
}

#[test]
fn migrations_are_idempotent_and_pragmas_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A missing folder is created.
    let path = dir.path().join("nested/deeper/gallery.db");
    let conn = sqlite::open(&path).expect("first open");
    let versions: Vec<String> = conn
        .prepare("SELECT version FROM schema_migrations ORDER BY version")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    assert_eq!(
        versions,
        MIGRATIONS_FOR_TEST
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        sqlite::migrate(&conn).expect("re-run"),
        0,
        "nothing left to apply"
    );
    drop(conn);
    let conn = sqlite::open(&path).expect("second open applies nothing and does not fail");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n as usize, MIGRATIONS_FOR_TEST.len());
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("mode");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("sync");
    let page: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .expect("page size");
    assert_eq!(page, 16384, "large pages for ~2 KB face rows");
    let fk: i64 = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .expect("fk");
    assert_eq!(
        (mode.as_str(), sync, fk),
        ("wal", 2, 1),
        "WAL, synchronous=FULL, foreign keys on"
    );
}

const MIGRATIONS_FOR_TEST: &[&str] = &["0001_gallery"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_reopen_and_deletes_stick() {
    // Both backends.
    for db in Db::both() {
        survive_reopen_on(&db).await;
        eprintln!("{}: ok", db.name());
    }
}

async fn survive_reopen_on(db: &Db) {
    let mut rng = StdRng::seed_from_u64(3);
    let g = db.open().await;
    let alice = g
        .create_subject(
            "  Alice ".into(),
            Some(serde_json::json!({"team": "red", "n": 1})),
        )
        .await
        .expect("alice");
    assert_eq!(alice.name, "Alice", "name is trimmed");
    let bob = g.create_subject("Bob".into(), None).await.expect("bob");
    let (a, b) = (
        Uuid::parse_str(&alice.id).expect("uuid"),
        Uuid::parse_str(&bob.id).expect("uuid"),
    );
    let va: Vec<Vec<f32>> = (0..3).map(|_| unit(&mut rng)).collect();
    let vb = unit(&mut rng);
    let mut fa = Vec::new();
    for v in &va {
        fa.push(g.add_face(a, v.clone()).await.expect("face"));
    }
    let fb = g.add_face(b, vb.clone()).await.expect("face");
    g.delete_face(a, fa[1]).await.expect("delete face");
    // Dropped without close(): what was acknowledged must already be on disk.
    drop(g);

    let g = db.open().await;
    assert_eq!(
        g.counts(),
        Counts {
            subjects: 2,
            faces: 3,
            faces_other_model: 0
        }
    );
    let detail = g.get_subject(a).await.expect("alice back");
    assert_eq!(
        detail.subject.metadata,
        serde_json::json!({"team": "red", "n": 1})
    );
    assert_eq!(detail.subject.face_count, 2);
    let ids: Vec<String> = detail.faces.iter().map(|f| f.id.clone()).collect();
    assert_eq!(ids, vec![fa[0].to_string(), fa[2].to_string()]);
    assert!(detail.faces.iter().all(|f| f.model == MODEL));
    // Embeddings come back bit-exact: a stored vector matches itself at 1.
    let hit = g.identify(va[2].clone(), 1, 0.5).await.expect("identify");
    assert_eq!(
        (hit.matches[0].subject_id, hit.matches[0].face_id),
        (a, fa[2])
    );
    assert!((hit.matches[0].similarity - 1.0).abs() < 1e-6);
    assert_eq!(hit.gallery_size, 2);
    // The deleted face is gone from the search too.
    let hit = g.identify(va[1].clone(), 5, -1.0).await.expect("identify");
    assert!(hit.matches.iter().all(|m| m.face_id != fa[1]));
    let (s, f) = g.best_for_subject(b, vb.clone()).await.expect("verify");
    assert_eq!(f, fb);
    assert!((s - 1.0).abs() < 1e-6);

    g.delete_subject(a).await.expect("delete alice");
    assert!(matches!(
        g.get_subject(a).await,
        Err(GalleryError::NotFound(_))
    ));
    g.close().await.expect("close");
    g.close().await.expect("second close is harmless");
    assert!(matches!(
        g.create_subject("x".into(), None).await,
        Err(GalleryError::Closed)
    ));
    // A clean close leaves no WAL content behind.
    if let Db::Sqlite(dir) = db {
        let wal = dir.path().join("g.db-wal");
        assert!(
            std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) == 0,
            "WAL checkpointed"
        );
    }
    drop(g);

    let g = db.open().await;
    assert_eq!(
        g.counts(),
        Counts {
            subjects: 1,
            faces: 1,
            faces_other_model: 0
        }
    );
    let hit = g.identify(va[0].clone(), 10, -1.0).await.expect("identify");
    assert!(
        hit.matches.iter().all(|m| m.subject_id != a),
        "deleted subject never returned"
    );
    // Cascade removed Alice's faces from the table, not only from the index.
    let n = match db {
        Db::Sqlite(dir) => sqlite::open(&dir.path().join("g.db"))
            .expect("raw")
            .query_row(
                "SELECT count(*) FROM faces WHERE subject_id = ?1",
                [a.to_string()],
                |r| r.get::<_, i64>(0),
            )
            .expect("count"),
        Db::Postgres(url) => {
            let client = replication::connect(&postgres::Pg::parse(url).expect("url"))
                .await
                .expect("raw connection");
            client
                .query_one("SELECT count(*) FROM faces WHERE subject_id = $1", &[&a])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_equals_naive_scan_of_stored_embeddings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.db");
    let mut rng = StdRng::seed_from_u64(99);
    let subjects: Vec<Uuid> = (0..500).map(|_| Uuid::new_v4()).collect();
    let mut faces: Vec<(Uuid, Uuid, Vec<f32>)> = (0..3000)
        .map(|i| (Uuid::new_v4(), subjects[i % subjects.len()], unit(&mut rng)))
        .collect();
    let rows: Vec<_> = faces
        .iter()
        .map(|(f, s, v)| (*f, *s, v.clone(), MODEL))
        .collect();
    raw_insert(&path, &subjects, &rows);

    // Loaded from the file, then changed live through the gallery.
    let g = open(&path);
    assert_eq!(g.counts().faces, 3000);
    for _ in 0..20 {
        let i = rng.random_range(0..faces.len());
        let (fid, sid, _) = faces.swap_remove(i);
        g.delete_face(sid, fid).await.expect("delete");
    }
    for _ in 0..20 {
        let sid = subjects[rng.random_range(0..subjects.len())];
        let v = unit(&mut rng);
        let fid = g.add_face(sid, v.clone()).await.expect("add");
        faces.push((fid, sid, v));
    }
    let gone = subjects[7];
    g.delete_subject(gone).await.expect("delete subject");
    faces.retain(|f| f.1 != gone);

    for q in 0..30 {
        let query = if q % 3 == 0 {
            // A perturbed stored face: a clear winner.
            let base = &faces[rng.random_range(0..faces.len())].2;
            let noise = unit(&mut rng);
            let mut v: Vec<f32> = base.iter().zip(&noise).map(|(a, b)| a + 0.5 * b).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= n);
            v
        } else {
            unit(&mut rng)
        };
        for (k, thr) in [(1, -1.0), (5, -1.0), (20, 0.0), (100, -1.0), (10, 0.3)] {
            let got = g.identify(query.clone(), k, thr).await.expect("identify");
            assert_same(
                &got.matches,
                &index::tests::naive(&faces, |_| true, &query, k, thr),
            );
        }
    }
    // And again after a restart, from the file alone.
    drop(g);
    let g = open(&path);
    assert_eq!(g.counts().faces, faces.len());
    for _ in 0..10 {
        let query = unit(&mut rng);
        let got = g.identify(query.clone(), 10, -1.0).await.expect("identify");
        assert_same(
            &got.matches,
            &index::tests::naive(&faces, |_| true, &query, 10, -1.0),
        );
    }
}

#[test]
fn start_up_load_counts_malformed_rows_and_loads_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.db");
    let mut rng = StdRng::seed_from_u64(12);
    let s = Uuid::new_v4();
    // More than two load batches, the last one partial.
    let faces: Vec<(Uuid, Uuid, Vec<f32>, &str)> = (0..2 * index::BATCH_ROWS + 5)
        .map(|_| (Uuid::new_v4(), s, unit(&mut rng), MODEL))
        .collect();
    let short = (Uuid::new_v4(), s, unit(&mut rng)[..DIM - 1].to_vec(), MODEL);
    let mut rows = faces.clone();
    rows.insert(700, short);
    raw_insert(&path, &[s], &rows);
    let conn = sqlite::open(&path).expect("open");
    conn.execute(
        "UPDATE faces SET id = 'not-a-uuid' WHERE id = ?1",
        [faces[1500].0.to_string()],
    )
    .expect("corrupt an id");
    let (idx, report) = sqlite::load_index(&conn, MODEL, DIM).expect("load");
    assert_eq!(report.faces_malformed, 2);
    assert_eq!((report.faces, report.subjects), (faces.len() - 1, 1));
    assert!(!idx.has_face(&faces[1500].0));
    let want: Vec<_> = faces
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1500)
        .map(|(_, (f, s, v, _))| (*f, *s, v.clone()))
        .collect();
    for _ in 0..5 {
        let q = unit(&mut rng);
        let got = idx.search(&q, 1, -1.0);
        let best = want
            .iter()
            .max_by(|a, b| index::dot(&a.2, &q).total_cmp(&index::dot(&b.2, &q)))
            .expect("faces");
        assert_eq!(
            (got[0].face_id, got[0].similarity),
            (best.0, index::dot(&best.2, &q))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_model_faces_are_counted_but_never_searched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.db");
    let mut rng = StdRng::seed_from_u64(5);
    let (s1, s2) = (Uuid::new_v4(), Uuid::new_v4());
    let old: Vec<(Uuid, Uuid, Vec<f32>, &str)> = (0..4)
        .map(|i| {
            (
                Uuid::new_v4(),
                if i < 3 { s1 } else { s2 },
                unit(&mut rng),
                "mobiface@old-0",
            )
        })
        .collect();
    let ours = (Uuid::new_v4(), s2, unit(&mut rng), MODEL);
    let mut rows = old.clone();
    rows.push(ours.clone());
    raw_insert(&path, &[s1, s2], &rows);

    let metrics = Arc::new(Metrics::new());
    let g = Gallery::open(&path, MODEL, DIM, metrics.clone()).expect("open");
    assert_eq!(
        g.counts(),
        Counts {
            subjects: 2,
            faces: 1,
            faces_other_model: 4
        }
    );
    assert_eq!(metrics.gallery_faces_other_model.get(), 4);
    assert_eq!(metrics.gallery_faces.get(), 1);
    assert_eq!(metrics.gallery_subjects.get(), 2);
    // Even a query identical to an old-model embedding finds only our face.
    for (fid, _, v, _) in &old {
        let hit = g.identify(v.clone(), 10, -1.0).await.expect("identify");
        assert_eq!(hit.matches.len(), 1);
        assert_eq!(hit.matches[0].face_id, ours.0);
        assert_ne!(hit.matches[0].face_id, *fid);
        assert_eq!(hit.gallery_size, 1);
    }
    // Subject 1 has only old-model faces: verify cannot compare, and says why.
    match g.best_for_subject(s1, old[0].2.clone()).await {
        Err(GalleryError::Invalid(m)) => {
            assert!(m.contains("no face made by the running model"), "{m}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // They are still listed, with their model.
    let d = g.get_subject(s1).await.expect("subject");
    assert_eq!(d.faces.len(), 3);
    assert!(d.faces.iter().all(|f| f.model == "mobiface@old-0"));
    // Deleting old faces keeps the count (and gauge) in step.
    g.delete_face(s1, old[0].0).await.expect("delete old face");
    assert_eq!(g.counts().faces_other_model, 3);
    g.delete_subject(s1).await.expect("delete subject");
    assert_eq!(g.counts().faces_other_model, 1);
    assert_eq!(metrics.gallery_faces_other_model.get(), 1);
    drop(g);
    let g = open(&path);
    assert_eq!(
        g.counts(),
        Counts {
            subjects: 1,
            faces: 1,
            faces_other_model: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_with_reasons() {
    // Both backends.
    for db in Db::both() {
        bad_inputs_on(db.open().await).await;
        eprintln!("{}: ok", db.name());
    }
}

async fn bad_inputs_on(g: Gallery) {
    let mut rng = StdRng::seed_from_u64(1);
    let s = g.create_subject("ok".into(), None).await.expect("subject");
    let sid = Uuid::parse_str(&s.id).expect("uuid");
    let big = serde_json::json!({ "blob": "x".repeat(MAX_METADATA_BYTES) });
    let invalid = |r: Result<Subject>, what: &str, needle: &str| match r {
        Err(GalleryError::Invalid(m)) => assert!(m.contains(needle), "{what}: {m}"),
        other => panic!("{what}: expected Invalid, got {other:?}"),
    };
    invalid(
        g.create_subject("".into(), None).await,
        "empty name",
        "empty",
    );
    invalid(
        g.create_subject("   ".into(), None).await,
        "blank name",
        "empty",
    );
    invalid(
        g.create_subject("n".repeat(MAX_NAME_CHARS + 1), None).await,
        "long name",
        "longer",
    );
    invalid(
        g.create_subject("a".into(), Some(serde_json::json!([1])))
            .await,
        "array metadata",
        "object",
    );
    invalid(
        g.create_subject("a".into(), Some(big)).await,
        "oversized metadata",
        "limit",
    );

    let mut short = unit(&mut rng);
    short.pop();
    assert!(matches!(
        g.add_face(sid, short).await,
        Err(GalleryError::Invalid(_))
    ));
    let mut nan = unit(&mut rng);
    nan[3] = f32::NAN;
    assert!(matches!(
        g.add_face(sid, nan).await,
        Err(GalleryError::Invalid(_))
    ));
    let unknown = Uuid::new_v4();
    assert!(matches!(
        g.add_face(unknown, unit(&mut rng)).await,
        Err(GalleryError::NotFound(_))
    ));
    assert!(matches!(
        g.delete_subject(unknown).await,
        Err(GalleryError::NotFound(_))
    ));
    assert!(matches!(
        g.get_subject(unknown).await,
        Err(GalleryError::NotFound(_))
    ));
    assert!(matches!(
        g.delete_face(sid, unknown).await,
        Err(GalleryError::NotFound(_))
    ));
    assert!(matches!(
        g.best_for_subject(unknown, unit(&mut rng)).await,
        Err(GalleryError::NotFound(_))
    ));
    // A face is only deletable under its own subject.
    let other = g
        .create_subject("other".into(), None)
        .await
        .expect("subject");
    let fid = g.add_face(sid, unit(&mut rng)).await.expect("face");
    let oid = Uuid::parse_str(&other.id).expect("uuid");
    assert!(matches!(
        g.delete_face(oid, fid).await,
        Err(GalleryError::NotFound(_))
    ));
    assert_eq!(g.counts().faces, 1);

    for (k, t) in [
        (0, 0.3),
        (MAX_TOP_K + 1, 0.3),
        (usize::MAX, 0.3),
        (5, 1.01),
        (5, -1.5),
        (5, f32::NAN),
    ] {
        assert!(
            matches!(
                g.identify(unit(&mut rng), k, t).await,
                Err(GalleryError::Invalid(_))
            ),
            "top_k {k} threshold {t}"
        );
    }
    for (limit, after) in [
        (Some(0), None),
        (Some(MAX_LIST_LIMIT + 1), None),
        (None, Some("abc")),
        (None, Some("-4")),
    ] {
        assert!(
            matches!(
                g.list_subjects(limit, after.map(String::from)).await,
                Err(GalleryError::Invalid(_))
            ),
            "limit {limit:?} after {after:?}"
        );
    }
    // Refusals changed nothing.
    assert_eq!(
        g.counts(),
        Counts {
            subjects: 2,
            faces: 1,
            faces_other_model: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_in_creation_order_without_repeats() {
    // Both backends.
    for db in Db::both() {
        listing_on(db.open().await).await;
        eprintln!("{}: ok", db.name());
    }
}

async fn listing_on(g: Gallery) {
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(
            g.create_subject(format!("p{i}"), None)
                .await
                .expect("subject")
                .id,
        );
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = g
            .list_subjects(Some(10), after.clone())
            .await
            .expect("page");
        pages += 1;
        if pages == 2 {
            // A delete between pages neither shifts nor repeats later entries.
            g.delete_subject(Uuid::parse_str(&ids[3]).expect("uuid"))
                .await
                .expect("delete");
            g.delete_subject(Uuid::parse_str(&ids[22]).expect("uuid"))
                .await
                .expect("delete");
        }
        seen.extend(page.subjects.into_iter().map(|s| s.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    // ids[3] was already seen; ids[22] was deleted before its page was read.
    let want: Vec<String> = ids.iter().filter(|i| **i != ids[22]).cloned().collect();
    assert_eq!(seen, want);
    assert_eq!(pages, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enrolment_and_search_end_consistent() {
    // Both backends.
    for db in Db::both() {
        concurrent_on(&db).await;
        eprintln!("{}: ok", db.name());
    }
}

async fn concurrent_on(db: &Db) {
    let g = db.open().await;
    let mut sids = Vec::new();
    for i in 0..8 {
        let s = g
            .create_subject(format!("c{i}"), None)
            .await
            .expect("subject");
        sids.push(Uuid::parse_str(&s.id).expect("uuid"));
    }
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let g = g.clone();
        let sid = sids[w as usize];
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            let mut mine = Vec::new();
            for _ in 0..15 {
                let v = unit(&mut rng);
                let f = g
                    .add_face(sid, v.clone())
                    .await
                    .expect("add during searches");
                mine.push((f, v));
                let hit = g
                    .identify(unit(&mut rng), 3, -1.0)
                    .await
                    .expect("identify during writes");
                assert!(!hit.matches.is_empty());
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    assert_eq!(g.counts().faces, 8 * 15);
    // Every acknowledged face is findable as itself, now and after a restart.
    for (f, v) in all.iter().step_by(7) {
        assert_eq!(
            g.identify(v.clone(), 1, 0.99).await.expect("id").matches[0].face_id,
            *f
        );
    }
    g.close().await.expect("close");
    let g = db.open().await;
    assert_eq!(g.counts().faces, 8 * 15);
    for (f, v) in all.iter().step_by(5) {
        assert_eq!(
            g.identify(v.clone(), 1, 0.99).await.expect("id").matches[0].face_id,
            *f
        );
    }
}

// --- Replicas: several `Gallery`s on one PostgreSQL database, each with its own index ---

/// Sorted ids of every face of the running model in the table, and their digest.
async fn table_faces(url: &str) -> (usize, String) {
    let client = replication::connect(&postgres::Pg::parse(url).expect("url"))
        .await
        .expect("raw connection");
    let rows = client
        .query("SELECT id FROM faces WHERE model = $1", &[&MODEL])
        .await
        .expect("faces");
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    (ids.len(), format!("{:032x}", faces_digest(ids.iter())))
}

/// Waits (bounded) until every replica has applied the whole log and holds
/// exactly the table's faces.
async fn converge(url: &str, replicas: &[&Gallery]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (n, digest) = table_faces(url).await;
        let same = replicas
            .iter()
            .all(|g| g.counts().faces == n && g.faces_digest() == digest);
        if same {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas never converged on the table's {n} faces ({digest}): {:?}",
            replicas
                .iter()
                .map(|g| (g.counts(), g.faces_digest(), g.replication()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_enrolling_into_subjects_others_delete_leave_no_orphans() {
    let [_, db] = Db::both();
    let Db::Postgres(url) = &db else {
        unreachable!()
    };
    let (a, b) = (db.open().await, db.open().await);
    let mut sids = Vec::new();
    for i in 0..24 {
        let s = a
            .create_subject(format!("r{i}"), None)
            .await
            .expect("subject");
        sids.push(Uuid::parse_str(&s.id).expect("uuid"));
    }
    // B deletes every other subject while A enrols five faces into each.
    let mut tasks = Vec::new();
    for (i, sid) in sids.iter().copied().enumerate() {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let enrol = async {
                let mut rng = StdRng::seed_from_u64(i as u64);
                let mut acked = Vec::new();
                for _ in 0..5 {
                    match a.add_face(sid, unit(&mut rng)).await {
                        Ok(f) => acked.push(f),
                        Err(GalleryError::NotFound(_)) => {}
                        Err(e) => panic!("enrol: {e}"),
                    }
                }
                acked
            };
            let delete = async {
                if i % 2 == 0 {
                    // B may not have seen the subject yet: then it is a 404 and we retry.
                    loop {
                        match b.delete_subject(sid).await {
                            Ok(()) => break,
                            Err(GalleryError::NotFound(_)) => {
                                tokio::time::sleep(std::time::Duration::from_millis(1)).await
                            }
                            Err(e) => panic!("delete: {e}"),
                        }
                    }
                }
            };
            let (acked, ()) = tokio::join!(enrol, delete);
            (sid, i % 2 == 0, acked)
        }));
    }
    let mut kept = 0;
    for t in tasks {
        let (sid, deleted, acked) = t.await.expect("task");
        if !deleted {
            assert_eq!(
                acked.len(),
                5,
                "no delete, so every enrolment of {sid} succeeds"
            );
            kept += acked.len();
        }
    }
    converge(url, &[&a, &b]).await;
    for g in [&a, &b] {
        assert_eq!(g.counts().subjects, 12);
        assert_eq!(
            g.counts().faces,
            kept,
            "only the kept subjects' faces remain"
        );
    }
    // A third replica started now loads the same state from the tables.
    let c = db.open().await;
    converge(url, &[&a, &b, &c]).await;
    assert_eq!(c.counts().subjects, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_creating_subjects_at_once_never_collide() {
    let [_, db] = Db::both();
    let (a, b) = (db.open().await, db.open().await);
    let make = |g: Gallery, tag: &'static str| async move {
        let mut ids = Vec::new();
        for i in 0..40 {
            ids.push(
                g.create_subject(format!("{tag}{i}"), None)
                    .await
                    .expect("create")
                    .id,
            );
        }
        ids
    };
    let (ia, ib) = tokio::join!(
        tokio::spawn(make(a.clone(), "a")),
        tokio::spawn(make(b.clone(), "b"))
    );
    let mut all: Vec<String> = ia.expect("a").into_iter().chain(ib.expect("b")).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 80, "80 distinct ids");
    // Listing from either replica pages over all 80 once each.
    for g in [&a, &b] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = g
                .list_subjects(Some(30), after.clone())
                .await
                .expect("page");
            seen.extend(page.subjects.into_iter().map(|s| s.id));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, all);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while a.counts().subjects != 80 || b.counts().subjects != 80 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} {:?}",
            a.counts(),
            b.counts()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_catches_up_from_the_log() {
    let [_, db] = Db::both();
    let Db::Postgres(url) = &db else {
        unreachable!()
    };
    let (a, b) = (db.open().await, db.open().await);
    let s = a.create_subject("x".into(), None).await.expect("subject");
    let sid = Uuid::parse_str(&s.id).expect("uuid");
    converge(url, &[&a, &b]).await;
    // Cut every connection of both replicas (listeners and pools), as a
    // server restart or a network blip would; notifications sent meanwhile are lost.
    let admin = replication::connect(&postgres::Pg::parse(url).expect("url"))
        .await
        .expect("admin");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate");
    let mut rng = StdRng::seed_from_u64(9);
    let mut acked = 0;
    for _ in 0..10 {
        // A pooled connection that was cut answers Unavailable once; retrying is the client's call.
        for attempt in 0.. {
            match a.add_face(sid, unit(&mut rng)).await {
                Ok(_) => break,
                Err(GalleryError::Unavailable(_)) if attempt < 50 => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(e) => panic!("enrol after the cut: {e}"),
            }
        }
        acked += 1;
    }
    converge(url, &[&a, &b]).await;
    assert_eq!(b.counts().faces, acked);
    assert!(b.available() && a.available(), "both reconnected");
    // Every replica has passed the log, so housekeeping prunes it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left: i64 = admin
            .query_one("SELECT count(*) FROM change_log", &[])
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} log rows never pruned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A replica started after pruning still loads everything.
    let c = db.open().await;
    converge(url, &[&a, &b, &c]).await;
}

/// The SQLite WAL is checkpointed in normal use. `INSERT ... RETURNING` read
/// with `query_row` committed but never stepped to DONE, so SQLite never ran
/// its auto-checkpoint and the WAL grew ~72 KB per face (about 140 MB here);
/// only a subject delete (a plain `execute`) checkpointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_over_2000_enrolments() {
    /// The 4 MiB auto-checkpoint and size limit, plus room for a commit.
    const WAL_BOUND: u64 = 8 * 1024 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.db");
    let wal = dir.path().join("g.db-wal");
    let g = open(&path);
    let mut rng = StdRng::seed_from_u64(11);
    let mut sids = Vec::new();
    for i in 0..20 {
        let s = g
            .create_subject(format!("w{i}"), None)
            .await
            .expect("subject");
        sids.push(Uuid::parse_str(&s.id).expect("uuid"));
    }
    let mut wal_max = 0;
    for i in 0..2000 {
        g.add_face(sids[i % 20], unit(&mut rng))
            .await
            .expect("enrol");
        if i % 50 == 0 {
            wal_max = wal_max.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
    }
    wal_max = wal_max.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    eprintln!("WAL peak over 2,000 enrolments: {wal_max} bytes");
    assert!(
        wal_max < WAL_BOUND,
        "WAL reached {wal_max} bytes over 2,000 enrolments (bound {WAL_BOUND})"
    );
    // Nothing acknowledged is only in memory: a fresh open finds every face.
    drop(g);
    assert_eq!(open(&path).counts().faces, 2000);
}

#[test]
fn postgres_urls_choose_tls_as_libpq_does() {
    use tokio_postgres::config::SslMode;
    let mode = |url: &str| {
        postgres::Pg::parse(url)
            .map(|pg| pg.config.get_ssl_mode())
            .map_err(|e| format!("{e:#}"))
    };
    for (url, want) in [
        // libpq's default `prefer` would accept any certificate: plain instead.
        ("postgres://u@h/db", SslMode::Disable),
        ("postgres://u@h/db?sslmode=prefer", SslMode::Disable),
        ("postgres://u@h/db?sslmode=disable", SslMode::Disable),
        ("postgres://u@h/db?sslmode=require", SslMode::Require),
        ("postgres://u@h/db?sslmode=verify-ca", SslMode::Require),
        (
            "postgres://u@h/db?connect_timeout=3&sslmode=verify-full",
            SslMode::Require,
        ),
    ] {
        assert_eq!(mode(url), Ok(want), "{url}");
    }
    for (url, why) in [
        (
            "postgres://u@h/db?sslrootcert=/etc/hosts",
            "needs sslmode=require",
        ),
        (
            "postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem",
            "reading sslrootcert /nonexistent/ca.pem",
        ),
        (
            "postgres://u@h/db?sslmode=require&sslrootcert=/etc/hostname",
            "holds no certificate",
        ),
        (
            "postgres://u@h/db?sslmode=require&sslrootcert=%2",
            "%-escape",
        ),
        ("postgres://u@h/db?sslmode=sometimes", "bad PostgreSQL URL"),
    ] {
        let err = mode(url).expect_err(url);
        assert!(err.contains(why), "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_encrypts_every_connection_and_verifies_the_server() {
    let cluster = testing::TestCluster::shared();
    let url = cluster.create_database("tls").expect("test database");
    let ca = cluster.ca_file().display().to_string().replace('/', "%2F");
    let tls_url = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    // The whole write, reopen and delete round trip, over TLS.
    survive_reopen_on(&Db::Postgres(tls_url.clone())).await;

    let g = Db::Postgres(tls_url).open().await;
    g.create_subject("Carol".into(), None)
        .await
        .expect("a write through the pool");
    let admin = replication::connect(&postgres::Pg::parse(&url).expect("url"))
        .await
        .expect("plain connection");
    let database = url.rsplit('/').next().expect("database name");
    let ssl: Vec<bool> = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = $1 AND a.application_name = 'mobiface' \
             AND a.pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The pool's connection and the change-log listener, at least.
    assert!(ssl.len() >= 2, "{ssl:?}");
    assert!(ssl.iter().all(|&on| on), "a plain connection: {ssl:?}");
    let own: bool = admin
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("own connection")
        .get(0);
    assert!(
        !own,
        "a URL without sslmode connects in plain text, as before"
    );
    g.close().await.expect("close");

    // Without the CA the server's certificate is refused, at once.
    let err = connect(&format!("{url}?sslmode=require"))
        .await
        .err()
        .map(|e| format!("{e:#}"));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("UnknownIssuer")),
        "{err:?}"
    );
}
