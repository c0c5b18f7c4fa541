//! The OpenAPI document, generated from the handlers' annotations and the
//! wire types. `tests/server.rs` checks it against the router and validates
//! real answers against its schemas.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, api, classify, health, tasks};

/// The document served at `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "softprompt", description = "Many soft-prompt classification tasks served from one frozen transformer."),
    paths(
        classify::classify,
        tasks::list_tasks,
        tasks::get_task,
        admin::put_task,
        admin::delete_task,
        admin::list_tasks,
        health::health,
        health::ready,
        health::metrics,
        health::openapi,
    ),
    components(schemas(
        api::ClassifyRequest,
        api::Inputs,
        api::Input,
        api::TextPair,
        api::Parameters,
        api::FunctionToApply,
        api::LabelScore,
        api::ClassifyResponse,
        api::TaskInfo,
        api::TaskEntry,
        api::TaskDetails,
        api::UploadResponse,
        api::ErrorResponse,
        api::HealthResponse,
        api::ReadyResponse,
        api::StoreStatus,
        admin::AdapterUpload,
    )),
    modifiers(&AdminToken),
    tags(
        (name = "classify", description = "Score inputs with a task"),
        (name = "tasks", description = "Served tasks"),
        (name = "admin", description = "Upload, replace and delete tasks (bearer token)"),
        (name = "ops", description = "Probes, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// Declares the bearer scheme the admin operations require.
struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}
