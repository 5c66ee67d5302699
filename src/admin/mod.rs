//! The admin listener: health and readiness, Prometheus metrics, the dashboard, and the JSON
//! API to see and change the live capacity policy.

mod auth;
mod changes;
mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::autoscale::EventQuery;
use crate::control::{ChangeError, Control};
pub use auth::Access;

/// The dashboard: one self-contained page (no CDN, no build step).
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the admin handlers share.
#[derive(Clone)]
pub struct Admin {
    control: Arc<Control>,
    access: Access,
    shutting_down: Arc<AtomicBool>,
}

impl Admin {
    /// Admin over `control`, with `access`; `shutting_down` turns `/readyz` to 503.
    pub fn new(control: Arc<Control>, access: Access, shutting_down: Arc<AtomicBool>) -> Self {
        Self {
            control,
            access,
            shutting_down,
        }
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(dashboard))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/admin/capacity", get(capacity))
            .route("/admin/policy", get(policy))
            .route("/admin/autoscale/events", get(events))
            .route("/admin/reload", post(reload))
            .route("/admin/services/{service}", patch(changes::patch_service))
            .route(
                "/admin/services/{service}/endpoints",
                post(changes::add_endpoint).delete(changes::remove_endpoint),
            )
            .route(
                "/admin/services/{service}/resources/{name}",
                put(changes::put_resource).delete(changes::delete_resource),
            )
            .fallback(not_found)
            .with_state(self)
    }
}

/// Serve the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = admin
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// An error answer: `{"error": "...", "detail": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
        }
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <SLUICE_ADMIN_TOKEN>`",
        )
    }

    fn forbidden(detail: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let (status, error) = match &e {
            ChangeError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ChangeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ChangeError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ChangeError::Load(_) => (StatusCode::BAD_REQUEST, "invalid_config"),
            ChangeError::NoFile => (StatusCode::CONFLICT, "no_config_file"),
            ChangeError::Endpoint(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ChangeError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ChangeError::Unconfirmed(_) => (StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown"),
        };
        Self::new(status, error, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "detail": self.detail});
        (self.status, Json(body)).into_response()
    }
}

/// Parse a JSON request body, answering 400 with serde's message (which names the field).
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

type Peer = ConnectInfo<SocketAddr>;

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 once listeners are bound and the config is loaded (this listener only serves then);
/// 503 while shutting down, while a replica has not yet joined its fleet, or while the store
/// is unreachable with `on_error = "deny"`. An unreachable store with `local` or `allow`, and
/// a service with no endpoint that can take traffic, are still 200, marked `degraded`: sluice
/// answers those requests itself (queues them, then `503 no_endpoints`), and taking it out of
/// a load balancer for its backend's state would turn those answers into refused connections
/// and hide the queue a scale controller wakes a scaled-to-zero backend on (Envoy's `/ready`
/// does not follow its clusters' health either).
async fn readyz(State(admin): State<Admin>) -> Response {
    let not_ready = |reason: String| {
        let body = json!({"status": "not_ready", "reason": reason});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    if admin.shutting_down.load(Ordering::Acquire) {
        return not_ready("shutting down".into());
    }
    let proxy = admin.control.live();
    let mut degraded = Vec::new();
    if let Some(fleet) = proxy.fleet() {
        let view = fleet.view();
        if !view.up {
            if view.on_error == crate::config::OnError::Deny {
                return not_ready("store unreachable (on_error = \"deny\")".into());
            }
            degraded.push(format!(
                "store unreachable: on_error = \"{}\" applies",
                view.on_error.as_str()
            ));
        } else if !view.joined {
            return not_ready("joining the fleet (takes no slots for 2 heartbeats)".into());
        }
    }
    let policy = proxy.policy();
    for service in &policy.services {
        let shape = service.pool.shape();
        let can_take = |i: usize| shape.serving_cap(i) > 0 && shape.endpoints[i].0.is_healthy();
        if !(0..shape.endpoints.len()).any(can_take) {
            let why = match shape.endpoints.is_empty() {
                true => {
                    "has no endpoints (requests wait for one in its queue, if it has one, \
                         then get 503 no_endpoints)"
                }
                false => "has no endpoint that can take traffic",
            };
            degraded.push(format!("service {:?} {why}", service.name));
        }
    }
    match degraded.is_empty() {
        true => Json(json!({"status": "ready"})).into_response(),
        false => {
            let reason = degraded.join("; ");
            Json(json!({"status": "degraded", "reason": reason})).into_response()
        }
    }
}

/// The format follows `Accept` (OpenMetrics when asked for, the text format 0.0.4 otherwise),
/// so the answer varies with it.
async fn metrics(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::negotiate(accept);
    let text = crate::metrics::render(&admin.control, format);
    (
        [
            (http::header::CONTENT_TYPE, format.content_type()),
            (http::header::VARY, "Accept"),
        ],
        text,
    )
        .into_response()
}

async fn capacity(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, false)?;
    let proxy = admin.control.live();
    let fleet = proxy.fleet().map(|f| &**f);
    Ok(Json(views::capacity(&proxy.policy(), proxy.events(), fleet)).into_response())
}

async fn policy(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, false)?;
    Ok(Json(views::policy(&admin.control.live().policy())).into_response())
}

async fn events(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, false)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let events = admin.control.live().events().query(&query);
    Ok(Json(json!({ "events": events })).into_response())
}

#[derive(Serialize)]
struct ReloadAnswer {
    reloaded: bool,
    summary: String,
    changed: Vec<&'static str>,
    needs_restart: Vec<&'static str>,
    events: Vec<crate::autoscale::Event>,
}

async fn reload(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, true)?;
    let done = admin.control.reload_and_log().await?;
    Ok(Json(ReloadAnswer {
        reloaded: true,
        summary: done.summary,
        changed: done.changed,
        needs_restart: done.needs_restart,
        events: done.events,
    })
    .into_response())
}
