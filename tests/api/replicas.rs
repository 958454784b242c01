//! Several real `mobiface serve` processes on one real PostgreSQL database
//! (a throwaway cluster of Debian's postgresql-15: `make postgres` installs
//! it; without it these tests fail, naming that target).
//!
//! Visibility is checked against a generous deadline so a loaded machine does
//! not flake; how fast it really is (median, p99) is `make bench`'s job
//! (benches/replicas.sh).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mobiface::gallery::testing::TestCluster;
use mobiface::gallery::{faces_digest, postgres, replication, Gallery};
use mobiface::metrics::Metrics;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{b64, eval_crops, get_json, json_of, read, Server};

const DEADLINE: Duration = Duration::from_secs(10);

async fn post_json(client: &reqwest::Client, url: String, body: &Value) -> reqwest::Response {
    client.post(url).json(body).send().await.expect("sent")
}

async fn new_subject(client: &reqwest::Client, server: &Server, name: &str) -> String {
    let (status, body) = json_of(
        post_json(
            client,
            format!("{}/subjects", server.address),
            &json!({"name": name}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().expect("id").to_string()
}

/// The table's faces of `model`: their ids and the digest replicas report.
async fn table_faces(url: &str, model: &str) -> (HashSet<Uuid>, String) {
    let client = replication::connect(&postgres::Pg::parse(url).expect("url"))
        .await
        .expect("raw connection");
    let rows = client
        .query("SELECT id FROM faces WHERE model = $1", &[&model])
        .await
        .expect("faces");
    let ids: HashSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let digest = format!("{:032x}", faces_digest(ids.iter()));
    (ids, digest)
}

fn model_id(ready: &Value) -> String {
    format!(
        "{}@{}",
        ready["model"]["name"].as_str().expect("name"),
        ready["model"]["version"].as_str().expect("version")
    )
}

/// Waits until every replica is ready and its index holds exactly the table's faces.
async fn converge(client: &reqwest::Client, url: &str, servers: &[&Server]) -> HashSet<Uuid> {
    let start = Instant::now();
    loop {
        let mut readies = Vec::new();
        for s in servers {
            readies.push(get_json(client, format!("{}/readyz", s.address)).await);
        }
        let model = model_id(&readies[0].1);
        let (ids, digest) = table_faces(url, &model).await;
        let same = readies.iter().all(|(status, r)| {
            *status == StatusCode::OK
                && r["gallery"]["faces"] == ids.len()
                && r["replication"]["faces_digest"] == digest.as_str()
        });
        if same {
            return ids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replicas never converged on the table's {} faces ({digest}): {readies:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn identify_face_ids(client: &reqwest::Client, server: &Server, image: &str) -> Vec<String> {
    let (status, v) = json_of(
        post_json(
            client,
            format!("{}/identify", server.address),
            &json!({"image": image, "top_k": 100, "threshold": -1.0}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .map(|m| m["face_id"].as_str().expect("face_id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_one_replica_reach_the_others_and_a_late_replica_loads_everything() {
    let url = TestCluster::shared()
        .create_database("replicas")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let client = reqwest::Client::new();
    let (a, b) = (Server::start_on(&url, &[]), Server::start_on(&url, &[]));
    let image = b64(&read(&eval_crops(1)[0]));

    // Created on B and enrolled on A at once (A's index may not have the
    // subject yet: the enrolment looks it up in the database), then B finds the face.
    let sid = new_subject(&client, &b, "shared").await;
    let (status, body) = json_of(
        post_json(
            &client,
            format!("{}/subjects/{sid}/faces", a.address),
            &json!({"image": image}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let fid = body["face_id"].as_str().expect("face_id").to_string();
    let start = Instant::now();
    while !identify_face_ids(&client, &b, &image).await.contains(&fid) {
        assert!(
            start.elapsed() < DEADLINE,
            "B never found the face enrolled on A"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Delete on B: gone from A.
    let r = client
        .delete(format!("{}/subjects/{sid}", b.address))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let start = Instant::now();
    while identify_face_ids(&client, &a, &image).await.contains(&fid) {
        assert!(
            start.elapsed() < DEADLINE,
            "A still finds the face deleted on B"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 1,000 enrolments by another replica (in-process, so the test does not
    // spend minutes embedding), then a replica started afterwards loads them all.
    let (_, ready) = get_json(&client, format!("{}/readyz", a.address)).await;
    let (model, dim) = (
        model_id(&ready),
        ready["model"]["dim"].as_u64().expect("dim") as usize,
    );
    let gallery = in_process_replica(&url, &model, dim).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut subjects = Vec::new();
    for i in 0..50 {
        let s = gallery
            .create_subject(format!("bulk {i}"), None)
            .await
            .expect("subject");
        subjects.push(Uuid::parse_str(&s.id).expect("uuid"));
    }
    for i in 0..1000 {
        let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let v = v.into_iter().map(|x| x / n).collect();
        gallery.add_face(subjects[i % 50], v).await.expect("enrol");
    }
    let c = Server::start_on(&url, &[]);
    let ids = converge(&client, &url, &[&a, &b, &c]).await;
    assert_eq!(ids.len(), 1000);
    let (_, ready) = get_json(&client, format!("{}/readyz", c.address)).await;
    assert_eq!(ready["gallery"]["subjects"], 50, "{ready}");
    gallery.close().await.expect("close");

    // Replication is visible in the metrics: B applied others' changes, is
    // connected, and (converged) has no lag.
    let text = client
        .get(format!("{}/metrics", b.address))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert!(metric("mobiface_replication_catchups_total") >= 1.0);
    assert_eq!(metric("mobiface_replication_connected"), 1.0);
    assert_eq!(metric("mobiface_replication_lag_changes"), 0.0);
    assert!(metric("mobiface_replication_applied_seq") >= 1000.0);
    assert!(metric("mobiface_db_pool_connections") >= 1.0);
    assert!(metric("mobiface_db_pool_wait_seconds_count") >= 1.0);
}

async fn in_process_replica(url: &str, model: &str, dim: usize) -> Gallery {
    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        gallery: mobiface::config::GalleryConfig,
    }
    let args = <Args as clap::Parser>::try_parse_from(["t", "--database", url]).expect("parses");
    Gallery::connect(&args.gallery, model, dim, Arc::new(Metrics::new()))
        .await
        .expect("in-process replica")
}

/// Enrols `image` into `sid` on `server` until `stop`, recording every face
/// acknowledged with a 201; 503s must carry `database_unavailable` and a
/// Retry-After. Returns (acknowledged, 503 count).
async fn enrol_stream(
    client: reqwest::Client,
    address: String,
    sid: String,
    image: String,
    acked: Arc<Mutex<Vec<Uuid>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut unavailable = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let resp = client
            .post(format!("{address}/subjects/{sid}/faces"))
            .json(&json!({"image": image}))
            .send()
            .await;
        let Ok(resp) = resp else {
            // The replica itself is gone (kill -9): nothing more to send.
            break;
        };
        let retry_after = resp.headers().get("retry-after").cloned();
        let status = resp.status();
        let Ok(body) = resp.text().await else {
            break;
        };
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if status == StatusCode::CREATED {
            let f = v["face_id"].as_str().expect("face_id");
            acked
                .lock()
                .unwrap()
                .push(Uuid::parse_str(f).expect("uuid"));
        } else if status == StatusCode::SERVICE_UNAVAILABLE
            && v["error"]["code"] == "database_unavailable"
        {
            assert!(retry_after.is_some(), "503 without Retry-After: {v}");
            unavailable += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            panic!("unexpected answer while enrolling: {status} {body}");
        }
    }
    unavailable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_replica_mid_stream_loses_no_acknowledged_face() {
    let url = TestCluster::shared()
        .create_database("kill")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let client = reqwest::Client::new();
    let (a, b) = (Server::start_on(&url, &[]), Server::start_on(&url, &[]));
    let image = b64(&read(&eval_crops(1)[0]));
    let sid = new_subject(&client, &a, "stream").await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streams: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(enrol_stream(
                client.clone(),
                a.address.clone(),
                sid.clone(),
                image.clone(),
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let start = Instant::now();
    while acked.lock().unwrap().len() < 40 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "enrolments too slow"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill9();
    for s in streams {
        s.await.expect("stream");
    }
    let acked: Vec<Uuid> = acked.lock().unwrap().clone();
    let ids = converge(&client, &url, &[&b]).await;
    for f in &acked {
        assert!(ids.contains(f), "face {f} got a 201 and was lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_answers_503_then_converges() {
    // Its own cluster: stopping the shared one would break the other tests.
    let cluster = TestCluster::start().unwrap_or_else(|e| panic!("{e:#}"));
    let url = cluster.create_database("restart").expect("database");
    let client = reqwest::Client::new();
    let (a, b) = (Server::start_on(&url, &[]), Server::start_on(&url, &[]));
    let image = b64(&read(&eval_crops(1)[0]));
    let sid = new_subject(&client, &a, "restart").await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streams: Vec<_> = [&a, &b]
        .iter()
        .map(|s| {
            tokio::spawn(enrol_stream(
                client.clone(),
                s.address.clone(),
                sid.clone(),
                image.clone(),
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            let start = Instant::now();
            while acked.lock().unwrap().len() < n {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "enrolments stalled"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_acked(10).await;
    cluster.stop_server().expect("stop PostgreSQL");
    for s in [&a, &b] {
        let start = Instant::now();
        loop {
            let (status, r) = get_json(&client, format!("{}/readyz", s.address)).await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(r["status"], "database_unavailable", "{r}");
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "/readyz stayed {status} with PostgreSQL down"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Reads that need the database answer 503 with Retry-After; search keeps
    // answering from the local index. Writes meanwhile are refused with 503
    // (counted by the streams).
    let r = client
        .get(format!("{}/subjects", a.address))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let (_, v) = json_of(r).await;
    assert_eq!(v["error"]["code"], "database_unavailable", "{v}");
    assert!(!identify_face_ids(&client, &b, &image).await.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_restart = acked.lock().unwrap().len();
    cluster.start_server().expect("restart PostgreSQL");
    wait_acked(before_restart + 10).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for s in streams {
        refused += s.await.expect("stream");
    }
    assert!(
        refused > 0,
        "no write was refused while PostgreSQL was down"
    );
    let acked: Vec<Uuid> = acked.lock().unwrap().clone();
    let unique: HashSet<Uuid> = acked.iter().copied().collect();
    assert_eq!(unique.len(), acked.len(), "no face acknowledged twice");
    let ids = converge(&client, &url, &[&a, &b]).await;
    // A commit whose answer was cut by the stop may be stored without a 201:
    // that is allowed; losing an acknowledged one is not.
    for f in &acked {
        assert!(ids.contains(f), "face {f} got a 201 and was lost");
    }
}
