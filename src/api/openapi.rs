//! `GET /openapi.json`: the OpenAPI 3 document, generated from the handlers'
//! `#[utoipa::path]` annotations. Responses every protected operation can give
//! (401/403/429 from the auth layer, 504 from the timeout layer) and the security
//! schemes are added here, from the same `auth::required_scope` the layer uses,
//! so the document cannot disagree with what the server enforces.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::auth::{required_scope, Scope};
use crate::error::{ErrorBody, ErrorDetail};

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
    responses((status = 200, description = "This OpenAPI 3 document", content_type = "application/json")),
    tag = "operations"
)]
pub async fn openapi_json() -> Response {
    match document().to_json() {
        Ok(json) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response(),
        Err(e) => crate::error::ApiError::internal(e).into_response(),
    }
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
