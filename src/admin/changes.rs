//! Live changes: a service's concurrency settings, its endpoints, and a resource's limits.
//! Each one edits a copy of the live config and goes through [`Control::change`], so it is
//! validated exactly like the file and applied whole or not at all.

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::{parse_body, Admin, ApiError, Peer};
use crate::autoscale::ScaleTarget;
use crate::config::{
    Cap, Config, EndpointConfig, EndpointTable, Resolve, ResourceConfig, ServiceConfig,
};
use crate::control::ChangeError;

/// `PATCH /admin/services/{service}` body: the fields to change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicePatch {
    max_concurrent: Option<Cap>,
    cluster_max_concurrent: Option<u32>,
    queue_size: Option<u32>,
    /// A duration like "500ms"; parsed here so an error can name the field.
    queue_timeout: Option<String>,
}

impl ServicePatch {
    fn describe(&self) -> String {
        let mut set = Vec::new();
        if let Some(v) = self.max_concurrent {
            set.push(format!("max_concurrent = {v}"));
        }
        if let Some(v) = self.cluster_max_concurrent {
            set.push(format!("cluster_max_concurrent = {v}"));
        }
        if let Some(v) = self.queue_size {
            set.push(format!("queue_size = {v}"));
        }
        if let Some(v) = &self.queue_timeout {
            set.push(format!("queue_timeout = {v:?}"));
        }
        set.join(", ")
    }
}

/// `PUT /admin/services/{service}/resources/{name}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcePut {
    tps: Option<u32>,
    burst: Option<u32>,
    autoscale: Option<bool>,
    key_sha256: Option<String>,
}

impl ResourcePut {
    fn describe(&self) -> String {
        let mut set = Vec::new();
        if let Some(v) = self.tps {
            set.push(format!("tps = {v}"));
        }
        if let Some(v) = self.burst {
            set.push(format!("burst = {v}"));
        }
        if let Some(v) = self.autoscale {
            set.push(format!("autoscale = {v}"));
        }
        if self.key_sha256.is_some() {
            set.push("a new key".to_owned());
        }
        set.join(", ")
    }
}

/// `POST /admin/services/{service}/endpoints` body: the endpoint to add.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointPost {
    url: String,
    /// Its own cap (a number or "auto"); without it, the service's `max_concurrent`.
    max_concurrent: Option<Cap>,
    /// Look the host up in DNS, as the file's `resolve`.
    #[serde(default)]
    resolve: Resolve,
}

/// `DELETE /admin/services/{service}/endpoints?url=...`: the endpoint to remove.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EndpointUrl {
    url: String,
}

/// The event target of a change to a service's endpoint list.
fn endpoints_target() -> ScaleTarget {
    ScaleTarget::Setting {
        key: "endpoints".into(),
    }
}

fn service_mut<'c>(
    config: &'c mut Config,
    name: &str,
) -> Result<&'c mut ServiceConfig, ChangeError> {
    config
        .services
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| ChangeError::NotFound(format!("no service named {name:?}")))
}

fn resource_target(name: &str) -> ScaleTarget {
    ScaleTarget::Resource {
        resource: name.to_owned(),
    }
}

fn applied(events: Vec<crate::autoscale::Event>) -> Response {
    Json(json!({ "applied": true, "events": events })).into_response()
}

pub(super) async fn patch_service(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, true)?;
    let patch: ServicePatch = parse_body(&body)?;
    let queue_timeout = patch
        .queue_timeout
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .map_err(|e| {
            ApiError::bad_request(format!(
                "queue_timeout: {e}; expected a duration like \"500ms\""
            ))
        })?;
    let reason = format!("operator changed service {service:?}: {}", patch.describe());
    let target = match patch.max_concurrent {
        Some(_) => ScaleTarget::EndpointConcurrency,
        None => ScaleTarget::Setting {
            key: "service".into(),
        },
    };
    let events = admin
        .control
        .change(&service, target, reason, |config| {
            let s = service_mut(config, &service)?;
            if let Some(v) = patch.max_concurrent {
                s.max_concurrent = v;
            }
            if let Some(v) = patch.cluster_max_concurrent {
                s.cluster_max_concurrent = Some(v);
            }
            if let Some(v) = patch.queue_size {
                s.queue_size = v;
            }
            if let Some(v) = queue_timeout {
                s.queue_timeout = v;
            }
            Ok(())
        })
        .await?;
    Ok(applied(events))
}

pub(super) async fn put_resource(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    Path((service, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, true)?;
    let put: ResourcePut = parse_body(&body)?;
    let reason = format!("operator set resource {name:?}: {}", put.describe());
    let events = admin
        .control
        .change(&service, resource_target(&name), reason, |config| {
            let s = service_mut(config, &service)?;
            let resource = match s.resources.iter_mut().find(|r| r.name == name) {
                Some(resource) => resource,
                None => {
                    let Some(key_sha256) = put.key_sha256.clone() else {
                        return Err(ChangeError::NotFound(format!(
                            "no resource named {name:?} in service {service:?}; give key_sha256 to create it"
                        )));
                    };
                    s.resources.push(ResourceConfig {
                        name: name.clone(),
                        key_sha256: Some(key_sha256),
                        key: None,
                        tps: None,
                        burst: None,
                        autoscale: false,
                    });
                    s.resources.last_mut().expect("just pushed")
                }
            };
            if let Some(key_sha256) = put.key_sha256 {
                resource.key = None;
                resource.key_sha256 = Some(key_sha256);
            }
            if let Some(tps) = put.tps {
                resource.tps = Some(tps);
            }
            if let Some(burst) = put.burst {
                resource.burst = Some(burst);
            }
            if let Some(autoscale) = put.autoscale {
                resource.autoscale = autoscale;
            }
            Ok(())
        })
        .await?;
    Ok(applied(events))
}

pub(super) async fn delete_resource(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    Path((service, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, true)?;
    let reason = format!("operator removed resource {name:?}");
    let events = admin
        .control
        .change(&service, resource_target(&name), reason, |config| {
            let s = service_mut(config, &service)?;
            let before = s.resources.len();
            s.resources.retain(|r| r.name != name);
            if s.resources.len() == before {
                return Err(ChangeError::NotFound(format!(
                    "no resource named {name:?} in service {service:?}"
                )));
            }
            Ok(())
        })
        .await?;
    Ok(applied(events))
}

pub(super) async fn add_endpoint(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, true)?;
    let post: EndpointPost = parse_body(&body)?;
    let cap = post
        .max_concurrent
        .map_or_else(String::new, |c| format!(" (max_concurrent = {c})"));
    let reason = format!("operator added endpoint {}{cap}", post.url);
    let events = admin
        .control
        .change(&service, endpoints_target(), reason, |config| {
            let s = service_mut(config, &service)?;
            if s.endpoints.iter().any(|e| e.url() == post.url) {
                return Err(ChangeError::Conflict(format!(
                    "endpoint {:?} is already in service {service:?}; nothing changed",
                    post.url
                )));
            }
            s.endpoints.push(EndpointConfig::Table(EndpointTable {
                url: post.url,
                max_concurrent: post.max_concurrent,
                resolve: post.resolve,
                admin: true,
            }));
            Ok(())
        })
        .await?;
    Ok(applied(events))
}

pub(super) async fn remove_endpoint(
    State(admin): State<Admin>,
    ConnectInfo(peer): Peer,
    Path(service): Path<String>,
    query: Result<Query<EndpointUrl>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin.access.check(peer, &headers, true)?;
    let Query(EndpointUrl { url }) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let reason = format!("operator removed endpoint {url}");
    let events = admin
        .control
        .change(&service, endpoints_target(), reason, |config| {
            let s = service_mut(config, &service)?;
            let before = s.endpoints.len();
            s.endpoints.retain(|e| e.url() != url);
            if s.endpoints.len() == before {
                return Err(ChangeError::NotFound(format!(
                    "no endpoint {url:?} in service {service:?}"
                )));
            }
            Ok(())
        })
        .await?;
    Ok(applied(events))
}
