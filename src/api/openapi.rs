//! `GET /openapi.json`: the OpenAPI 3 document, generated from the handlers'
//! `#[utoipa::path]` annotations. Responses every protected operation can give
//! (401/403/429 from the auth layer, 504 from the timeout layer) and the security
//! schemes are added here, from the same `auth::required_scope` the layer uses,
//! so the document cannot disagree with what the server enforces.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::AppState;
use crate::auth::{required_scope, Scope};
use crate::error::{ErrorBody, ErrorDetail};
use crate::gallery;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mobiface",
        description = "Self-hosted face verification: MobiFace embeddings on ONNX Runtime, \
            1:1 verification and 1:N identification against a SQLite gallery. Every error is \
            `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        super::health::healthz,
        super::health::readyz,
        super::embed::embed,
        super::detect::detect,
        super::subjects::create_subject,
        super::subjects::list_subjects,
        super::subjects::get_subject,
        super::subjects::delete_subject,
        super::subjects::add_face,
        super::subjects::delete_face,
        super::verify::verify,
        super::identify::identify,
        super::ops::metrics,
        openapi_json,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&OpsResponses),
    tags(
        (name = "probes", description = "Liveness and readiness; never need a key"),
        (name = "embeddings", description = "Face crops in, embeddings out"),
        (name = "gallery", description = "Subjects and their enrolled faces"),
        (name = "matching", description = "1:1 verification and 1:N identification"),
        (name = "operations", description = "Metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "This OpenAPI 3 document, for this server's configuration", content_type = "application/json")),
    tag = "operations"
)]
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        served(&DocOptions::from(state.config.as_ref())).to_string(),
    )
        .into_response()
}

/// What the served document depends on: it states what this server enforces.
#[derive(Debug, Clone, Copy)]
pub struct DocOptions {
    /// A keys file is configured: keyed routes declare security, 401, 403 and 429.
    pub keys: bool,
    pub metrics_require_key: bool,
    pub max_images: usize,
}

impl From<&crate::config::Config> for DocOptions {
    fn from(c: &crate::config::Config) -> Self {
        DocOptions {
            keys: c.api_keys_file.is_some(),
            metrics_require_key: c.metrics_require_key,
            max_images: c.max_images_per_request,
        }
    }
}

/// The document as served: `document()` made exact for one configuration. Bounds the
/// derive cannot say (enforced by handlers or the gallery), the statuses the layers add,
/// request examples with a real image, and links from created resources to the operations
/// that take their ids, so a client (or schemathesis) can reach every operation.
pub fn served(opts: &DocOptions) -> Value {
    let mut doc = serde_json::to_value(document()).unwrap_or(Value::Null);
    let image = json!(example_image());
    // With landmarks, so the examples are embedded whether or not the detector would find
    // a face in a drawn picture.
    let face = json!({"data": image, "landmarks": EXAMPLE_LANDMARKS});
    let examples = json!({
        "/embed": {"images": [face], "flip": true},
        "/verify": {"image1": face, "image2": face},
        "/identify": {"image": face, "top_k": 5},
        "/detect": {"image": image},
        "/subjects": {"name": "Ada Lovelace", "metadata": {"team": "analytical engines"}},
        "/subjects/{id}/faces": {"image": face},
    });
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                let Ok(m) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
                    continue;
                };
                exact_operation(op, &m, path, opts, &examples[path.as_str()]);
            }
        }
    }
    let schemas = &mut doc["components"]["schemas"];
    exact_schemas(schemas, opts);
    doc
}

/// Left eye, right eye, nose, mouth corners on the 64x64 example picture.
const EXAMPLE_LANDMARKS: [[f64; 2]; 5] = [
    [22.0, 26.0],
    [42.0, 26.0],
    [32.0, 37.0],
    [24.0, 47.0],
    [40.0, 47.0],
];

/// A real picture (a 64x64 PNG drawn here: a pale oval "face" on a dark ground), base64.
/// Synthetic on purpose: no third-party photo ships in the document.
pub fn example_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let (dx, dy) = (x as f32 - 32.0, (y as f32 - 34.0) * 0.8);
            if dx * dx + dy * dy < 22.0 * 22.0 {
                image::Rgb([224, 180, 150])
            } else {
                image::Rgb([40, 40, (y * 3) as u8])
            }
        });
        let mut png = Vec::new();
        let _ = image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut png),
            img.as_raw(),
            64,
            64,
            image::ExtendedColorType::Rgb8,
        );
        base64::engine::general_purpose::STANDARD.encode(png)
    })
}

fn error_ref(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

fn exact_operation(
    op: &mut Value,
    method: &Method,
    path: &str,
    opts: &DocOptions,
    example: &Value,
) {
    let scope = required_scope(method, path, opts.metrics_require_key);
    let responses = &mut op["responses"];
    if !opts.keys || scope.is_none() {
        // Without a keys file nothing is checked: claiming security would be false.
        if let Some(o) = op.as_object_mut() {
            o.remove("security");
        }
        if let Some(r) = op["responses"].as_object_mut() {
            for code in ["401", "403", "429"] {
                r.remove(code);
            }
        }
    } else if let Some(r) = responses.as_object_mut() {
        r.insert(
            "429".into(),
            error_ref("Per-key rate limit, or too many failed authentications from this address (see Retry-After)"),
        );
    }
    let Some(r) = op["responses"].as_object_mut() else {
        return;
    };
    r.entry("504")
        .or_insert_with(|| error_ref("The request took longer than --request-timeout-ms"));
    if path != "/readyz" {
        r.entry("503").or_insert_with(|| {
            error_ref("Shutting down (a request still running at the shutdown deadline), or busy: inference queue full or decode budget exhausted (see Retry-After)")
        });
    }
    if op.get("requestBody").is_some() {
        let r = op["responses"]
            .as_object_mut()
            .expect("responses is an object");
        r.entry("400")
            .or_insert_with(|| error_ref("Body is not valid JSON (`malformed_body`)"));
        r.entry("413").or_insert_with(|| {
            error_ref("Body larger than --max-body-bytes (answered before it is read when Content-Length says so)")
        });
        r.entry("415").or_insert_with(|| {
            error_ref("Content type other than application/json or multipart/form-data")
        });
        r.entry("422").or_insert_with(|| {
            error_ref("Well-formed JSON of the wrong shape (`invalid_request`)")
        });
        if !example.is_null() {
            op["requestBody"]["content"]["application/json"]["example"] = example.clone();
        }
    }
    // Ids in paths are UUIDs; anything else names nothing (404).
    // (`get_mut`: indexing a missing key would insert a null.)
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params {
            match (p["in"].as_str(), p["name"].as_str()) {
                (Some("path"), _) => p["schema"] = json!({"type": "string", "format": "uuid"}),
                (Some("query"), Some("limit")) => {
                    p["schema"] = json!({"type": ["integer", "null"], "minimum": 1, "maximum": gallery::MAX_LIST_LIMIT, "default": gallery::DEFAULT_LIST_LIMIT})
                }
                // The cursor is a non-negative i64 (the `next` of the previous page); empty
                // means the first page.
                (Some("query"), Some("after")) => {
                    p["schema"] = json!({"type": ["string", "null"], "pattern": "^(\\+?0*([0-9]{1,18}|[1-8][0-9]{18}))?$"})
                }
                _ => {}
            }
        }
    }
    // Created resources lead to the operations that take their ids.
    let links = match (method.as_str(), path) {
        ("POST", "/subjects") => json!({
            "GetSubject": {"operationId": "get_subject", "parameters": {"id": "$response.body#/id"}},
            "AddFace": {"operationId": "add_face", "parameters": {"id": "$response.body#/id"}},
            "DeleteSubject": {"operationId": "delete_subject", "parameters": {"id": "$response.body#/id"}},
        }),
        ("POST", "/subjects/{id}/faces") => json!({
            "DeleteFace": {"operationId": "delete_face", "parameters": {
                "id": "$response.body#/subject_id", "face_id": "$response.body#/face_id"}},
            "GetSubject": {"operationId": "get_subject", "parameters": {"id": "$response.body#/subject_id"}},
        }),
        _ => Value::Null,
    };
    if !links.is_null() {
        op["responses"]["201"]["links"] = links;
    }
}

/// A character Rust's `trim` keeps (not Unicode White_Space), spelled out: `\\s` differs
/// between regex engines (ECMA's includes U+FEFF, Python's U+001C-U+001F; neither is
/// Rust's).
const NOT_ONLY_WHITESPACE: &str = "[^\\t\\n\\u000B\\f\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]";

fn exact_schemas(schemas: &mut Value, opts: &DocOptions) {
    let image = json!({"$ref": "#/components/schemas/ImageInput"});
    let threshold = json!({"type": ["number", "null"], "minimum": -1, "maximum": 1,
        "description": "Match threshold on cosine similarity; default: the service's"});
    let e = &mut schemas["EmbedRequest"];
    e["properties"]["images"]["minItems"] = json!(1);
    e["properties"]["images"]["maxItems"] = json!(opts.max_images);
    e["additionalProperties"] = json!(false);
    let i = &mut schemas["IdentifyRequest"];
    i["properties"]["top_k"] =
        json!({"type": "integer", "minimum": 1, "maximum": gallery::MAX_TOP_K, "default": 5});
    i["properties"]["threshold"] = threshold.clone();
    i["additionalProperties"] = json!(false);
    let c = &mut schemas["CreateSubject"];
    c["properties"]["name"] = json!({"type": "string", "minLength": 1, "maxLength": gallery::MAX_NAME_CHARS,
        "pattern": NOT_ONLY_WHITESPACE, "description": "Display name: at least one non-space character, at most 256 after trimming"});
    c["properties"]["metadata"] = json!({"type": ["object", "null"],
        "description": "Free-form JSON object, at most 16 KiB serialised"});
    c["additionalProperties"] = json!(false);
    schemas["AddFace"]["additionalProperties"] = json!(false);
    // /detect finds the landmarks itself: an image with landmarks is refused (422).
    if schemas.get("DetectRequest").is_some() {
        schemas["DetectRequest"]["properties"]["image"] = json!({"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "object", "required": ["data"], "properties": {
                "data": {"type": "string", "minLength": 1}, "landmarks": {"type": "null"}}},
        ]});
        schemas["DetectRequest"]["additionalProperties"] = json!(false);
    }
    // Exactly one probe (`image1` or its alias `image`) and exactly one reference (`image2`
    // or `subject_id`); a null counts as absent.
    let absent = json!({"type": "null"});
    let variant = |probe: &str, other: &str, other_schema: Value| {
        let mut props = serde_json::Map::new();
        for name in ["image1", "image", "image2", "subject_id"] {
            props.insert(name.into(), absent.clone());
        }
        props.insert(probe.into(), image.clone());
        props.insert(other.into(), other_schema);
        props.insert("threshold".into(), threshold.clone());
        props.insert(
            "detect".into(),
            json!({"type": ["boolean", "null"],
            "description": "Run the detector even on a 112x112 image"}),
        );
        props.insert(
            "single_face".into(),
            json!({"type": "boolean",
            "description": "Refuse (422 `multiple_faces`) an image with more than one face"}),
        );
        json!({"type": "object", "properties": props, "required": [probe, other], "additionalProperties": false})
    };
    let subject = json!({"type": "string", "format": "uuid", "description": "Enrolled subject to compare the image with"});
    schemas["VerifyRequest"] = json!({
        "description": "`image1` and `image2` compare two images; `image` (or `image1`) and `subject_id` compare an image with a subject's enrolled faces (its best one counts). `image` and `image1` are the same field.",
        "oneOf": [
            variant("image1", "image2", image.clone()),
            variant("image", "image2", image.clone()),
            variant("image1", "subject_id", subject.clone()),
            variant("image", "subject_id", subject),
        ]
    });
}

struct OpsResponses;

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

fn add_response(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| error_response(description));
}

impl Modify for OpsResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops = [
                (Method::GET, &mut item.get),
                (Method::POST, &mut item.post),
                (Method::PUT, &mut item.put),
                (Method::DELETE, &mut item.delete),
                (Method::PATCH, &mut item.patch),
                (Method::HEAD, &mut item.head),
            ];
            for (method, op) in ops {
                let Some(op) = op.as_mut() else { continue };
                // `/metrics` may require a key (`--metrics-require-key`); document the stricter case.
                let Some(scope) = required_scope(&method, path, true) else {
                    continue;
                };
                let needs = match scope {
                    Scope::Read => "read",
                    Scope::Admin => "admin",
                };
                op.security = Some(vec![
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                    SecurityRequirement::new("api_key", Vec::<String>::new()),
                ]);
                add_response(
                    op,
                    "401",
                    "Missing or unknown API key (only when the server has a keys file)",
                );
                add_response(op, "403", &format!("The API key lacks the `{needs}` scope"));
                add_response(op, "429", "Per-key rate limit exceeded (see Retry-After)");
                add_response(
                    op,
                    "504",
                    "The request took longer than --request-timeout-ms",
                );
            }
        }
    }
}
