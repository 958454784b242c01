//! Whole photos: the real detector and model over real HTTP on raw LFW photos.

use image::{GenericImage, RgbImage};
use serde_json::{json, Value};

use crate::helpers::{
    b64, cosine, embeddings_of, json_of, lfw_dir, png, read, spawn_app, spawn_app_with,
};

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode_image(img)
        .unwrap();
    out
}

fn photo(rel: &str) -> RgbImage {
    image::load_from_memory(&read(&lfw_dir().join(rel)))
        .unwrap()
        .to_rgb8()
}

/// Inserts an APP1 EXIF segment carrying only an orientation tag right after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\x00\x2A\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut payload = b"Exif\x00\x00".to_vec();
    payload.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn points(face: &Value) -> Vec<[f64; 2]> {
    face["landmarks"]
        .as_array()
        .expect("landmarks")
        .iter()
        .map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()])
        .collect()
}

fn centre_x(face: &Value) -> f64 {
    face["box"]["x"].as_f64().unwrap() + face["box"]["width"].as_f64().unwrap() / 2.0
}

/// Every 12th raw evaluation photo dlib found a face in (176): the detector must find one in at
/// least 99%; the largest face's five points must lie, in at least 90% of photos, all within
/// 0.3 eye distances (about 12 px here) of `landmarks.csv`'s dlib points, and on the median
/// photo within 0.12 eye distances on average. (On train photos, 95% lie within 0.29; the
/// misses are mostly photos where dlib's reference took a more central, smaller face.)
#[tokio::test]
async fn faces_are_found_in_raw_photos_where_the_reference_landmarks_put_them() {
    let app = spawn_app().await;
    let csv = std::fs::read_to_string(lfw_dir().join("landmarks.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .filter(|f: &Vec<String>| f[0].starts_with("eval/") && f[11] == "1")
        .step_by(12)
        .collect();
    assert!(rows.len() > 150, "{} rows", rows.len());
    let (mut found, mut close, mut mean_errors) = (0, 0, Vec::new());
    for f in &rows {
        let truth: Vec<[f64; 2]> = f[1..11]
            .chunks(2)
            .map(|c| [c[0].parse().unwrap(), c[1].parse().unwrap()])
            .collect();
        let body = json!({"image": b64(&read(&lfw_dir().join(&f[0])))});
        let (status, value) = json_of(app.post_json("/detect", &body).await).await;
        assert_eq!(status, 200, "{value}");
        assert_eq!(
            (value["width"].as_u64(), value["height"].as_u64()),
            (Some(250), Some(250))
        );
        let Some(face) = value["faces"].as_array().and_then(|f| f.first()) else {
            continue;
        };
        found += 1;
        let eyes = (truth[0][0] - truth[1][0]).hypot(truth[0][1] - truth[1][1]);
        let errors: Vec<f64> = points(face)
            .iter()
            .zip(&truth)
            .map(|(p, t)| (p[0] - t[0]).hypot(p[1] - t[1]))
            .collect();
        close += usize::from(errors.iter().all(|&e| e < 0.3 * eyes));
        mean_errors.push(errors.iter().sum::<f64>() / 5.0 / eyes);
    }
    let n = rows.len() as f64;
    assert!(
        found as f64 >= 0.99 * n,
        "faces found in {found} of {n} photos"
    );
    assert!(
        close as f64 >= 0.9 * n,
        "landmarks close in {close} of {n} photos"
    );
    mean_errors.sort_by(f64::total_cmp);
    let median = mean_errors[mean_errors.len() / 2];
    assert!(
        median < 0.12,
        "median mean point error {median} eye distances"
    );
}

#[tokio::test]
async fn two_photos_side_by_side_give_two_faces_one_in_each_half() {
    let app = spawn_app().await;
    let (a, b) = (
        photo("eval/Serena_Williams/Serena_Williams_0001.jpg"),
        photo("eval/Gerhard_Schroeder/Gerhard_Schroeder_0001.jpg"),
    );
    let mut both = RgbImage::new(500, 250);
    both.copy_from(&a, 0, 0).unwrap();
    both.copy_from(&b, 250, 0).unwrap();
    let both = png(&both);
    let (status, value) = json_of(
        app.post_json("/detect", &json!({"image": b64(&both)}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{value}");
    let faces = value["faces"].as_array().unwrap();
    assert_eq!(faces.len(), 2, "{value}");
    let mut xs: Vec<f64> = faces.iter().map(centre_x).collect();
    xs.sort_by(f64::total_cmp);
    assert!(xs[0] < 250.0 && xs[1] > 250.0, "{xs:?}");
    // Largest first.
    let area =
        |f: &Value| f["box"]["width"].as_f64().unwrap() * f["box"]["height"].as_f64().unwrap();
    assert!(area(&faces[0]) >= area(&faces[1]));

    // Enrolment takes the largest and says there were two; `single_face` refuses instead.
    let (_, subject) = json_of(app.post_json("/subjects", &json!({"name": "two"})).await).await;
    let path = format!("/subjects/{}/faces", subject["id"].as_str().unwrap());
    let (status, value) = json_of(app.post_json(&path, &json!({"image": b64(&both)})).await).await;
    assert_eq!(status, 201, "{value}");
    assert_eq!(value["faces_detected"], 2);
    assert_eq!(value["face"]["source"], "detected");
    assert_eq!(value["face"]["box"], faces[0]["box"]);
    let body = json!({"image": b64(&both), "single_face": true});
    let (status, value) = json_of(app.post_json(&path, &body).await).await;
    assert_eq!(status, 422, "{value}");
    assert_eq!(value["error"]["code"], "multiple_faces");
}

#[tokio::test]
async fn images_without_a_usable_face_get_422() {
    let app = spawn_app().await;
    let grey = png(&RgbImage::from_pixel(320, 240, image::Rgb([128; 3])));
    for (what, bytes) in [
        ("blank grey", grey),
        ("1x1", png(&RgbImage::new(1, 1))),
        (
            "2x2",
            png(&RgbImage::from_pixel(2, 2, image::Rgb([200; 3]))),
        ),
    ] {
        for path in ["/embed", "/verify", "/identify"] {
            let body = match path {
                "/embed" => json!({"images": [b64(&bytes)]}),
                "/verify" => json!({"image1": b64(&bytes), "image2": b64(&bytes)}),
                _ => json!({"image": b64(&bytes)}),
            };
            let (status, value) = json_of(app.post_json(path, &body).await).await;
            assert_eq!(status, 422, "{what} {path}: {value}");
            assert_eq!(value["error"]["code"], "no_face", "{what} {path}: {value}");
        }
        let (status, value) = json_of(
            app.post_json("/detect", &json!({"image": b64(&bytes)}))
                .await,
        )
        .await;
        assert_eq!(
            (status.as_u16(), value["faces"].clone()),
            (200, json!([])),
            "{what}"
        );
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("mobiface_detection_no_face_total 12"),
        "{metrics}"
    );
    assert!(metrics.contains("mobiface_detection_duration_seconds_count 12"));

    // /detect finds landmarks itself.
    let body = json!({"image": {"data": b64(&png(&RgbImage::new(8, 8))), "landmarks": [[1, 1], [5, 1], [3, 3], [2, 5], [4, 5]]}});
    let (status, value) = json_of(app.post_json("/detect", &body).await).await;
    assert_eq!(
        (status.as_u16(), value["error"]["code"].as_str()),
        (422, Some("invalid_argument"))
    );

    // A face whose eyes are closer than --min-eye-distance.
    let strict = spawn_app_with(|c| c.detection.min_eye_distance = 200.0).await;
    let raw = read(&lfw_dir().join("eval/Serena_Williams/Serena_Williams_0001.jpg"));
    let (status, value) = json_of(
        strict
            .post_json("/embed", &json!({"images": [b64(&raw)]}))
            .await,
    )
    .await;
    assert_eq!(status, 422, "{value}");
    assert_eq!(value["error"]["code"], "face_too_small");
}

#[tokio::test]
async fn exif_orientation_is_applied_before_detection() {
    let app = spawn_app().await;
    let upright = photo("eval/Aaron_Eckhart/Aaron_Eckhart_0001.jpg");
    // Stored turned a quarter anticlockwise; orientation 6 says "turn clockwise to view".
    let stored = with_exif_orientation(&jpeg(&image::imageops::rotate270(&upright)), 6);
    let detect = |bytes: Vec<u8>| {
        let app = &app;
        async move {
            let (status, value) = json_of(
                app.post_json("/detect", &json!({"image": b64(&bytes)}))
                    .await,
            )
            .await;
            assert_eq!(status, 200, "{value}");
            value
        }
    };
    let a = detect(jpeg(&upright)).await;
    let b = detect(stored).await;
    assert_eq!(
        (b["width"].as_u64(), b["height"].as_u64()),
        (Some(250), Some(250))
    );
    let (pa, pb) = (points(&a["faces"][0]), points(&b["faces"][0]));
    for (p, q) in pa.iter().zip(&pb) {
        assert!((p[0] - q[0]).hypot(p[1] - q[1]) < 3.0, "{pa:?} vs {pb:?}");
    }
}

#[tokio::test]
async fn raw_photos_of_two_people_do_not_match_and_say_which_faces_were_used() {
    let app = spawn_app().await;
    let serena = read(&lfw_dir().join("eval/Serena_Williams/Serena_Williams_0001.jpg"));
    let gerhard = read(&lfw_dir().join("eval/Gerhard_Schroeder/Gerhard_Schroeder_0001.jpg"));
    let body = json!({"image1": b64(&serena), "image2": b64(&gerhard)});
    let (status, value) = json_of(app.post_json("/verify", &body).await).await;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["match"], false, "{value}");
    let faces = value["faces"].as_array().unwrap();
    assert_eq!(faces.len(), 2);
    for f in faces {
        assert_eq!(f["face"]["source"], "detected");
        assert_eq!(f["faces_detected"], 1);
        assert!(f["face"]["score"].as_f64().unwrap() > 0.5);
    }
}

#[tokio::test]
async fn detect_crops_embed_like_the_photo_itself() {
    let app = spawn_app().await;
    let raw = read(&lfw_dir().join("eval/Aishwarya_Rai/Aishwarya_Rai_0001.jpg"));
    let (status, value) = json_of(
        app.post_json("/detect", &json!({"image": b64(&raw), "crops": true}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{value}");
    let crops: Vec<Vec<u8>> = value["faces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(f["crop"].as_str().expect("crop"))
                .unwrap()
        })
        .collect();
    assert!(crops.len() >= 2, "{value}");
    let from_crops = app.embed(&crops, true).await;

    let (status, whole) = json_of(
        app.post_json("/embed", &json!({"images": [b64(&raw)]}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{whole}");
    let item = &whole["embeddings"][0];
    assert_eq!(item["face"]["source"], "detected");
    assert_eq!(item["faces_detected"].as_u64(), Some(crops.len() as u64));
    assert_eq!(item["face"]["landmarks"], value["faces"][0]["landmarks"]);
    let from_photo = &embeddings_of(&whole)[0];
    let same = cosine(&from_crops[0], from_photo);
    assert!(
        same > 0.9999,
        "crop and photo embeddings differ: cosine {same}"
    );
    // The second face is somebody else.
    assert!(
        cosine(&from_crops[1], from_photo) < 0.9,
        "two faces embed alike"
    );

    // A 112x112 crop is taken as it is unless the request asks for detection.
    let (_, plain) = json_of(
        app.post_json("/embed", &json!({"images": [b64(&crops[0])]}))
            .await,
    )
    .await;
    assert_eq!(
        plain["embeddings"][0]["face"],
        json!({"source": "aligned_crop"})
    );
    assert!(plain["embeddings"][0].get("faces_detected").is_none());
}
