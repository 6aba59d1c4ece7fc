//! Harbor's own HTTP API as the stand-in reproduces it: `GET /api/v2.0/projects` (pagination with
//! `X-Total-Count` and `Link`), `GET /api/v2.0/registries/{id}`, and the token service
//! `GET /service/token` that signs JWTs the real registry accepts.
//!
//! Credentials Harbor does not accept are anonymous here, as in Harbor (`auth.rs`): the project
//! list shows public projects only, `registries/{id}` answers 401, `systeminfo` leaves out the
//! version, and the token service grants anonymous rights (401 only when no scope is asked). Does
//! not touch `/v2/` (see `proxy.rs`).

use std::sync::atomic::Ordering;

use http::{header, HeaderMap, Response, StatusCode};
use serde_json::json;

use crate::auth::{classify, robot_may_pull, Caller};
use crate::standin::{full, harbor_error, json_response, Body, State};
use crate::{ProjectSpec, Shift, ADMIN_USER};

/// The registry's own token realm (the registry trusts Harbor's core; seeding pushes through it).
pub(crate) const REGISTRY_REALM_PATH: &str = "/service/registry-token";

fn unauthorized() -> Response<Body> {
    harbor_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "UnAuthorized")
}

/// Splits a query string into decoded `(key, value)` pairs, repeated keys kept in order.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/api/v2.0/...`
pub(crate) fn api(
    state: &State,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response<Body> {
    let caller = classify(state, headers);
    if path == "/api/v2.0/projects" {
        return projects(state, &caller, query);
    }
    if path == "/api/v2.0/systeminfo" {
        state.counters.lock().unwrap().systeminfo_requests += 1;
        return systeminfo(state, &caller);
    }
    if let Some(id) = path.strip_prefix("/api/v2.0/registries/") {
        return registry(state, &caller, id);
    }
    harbor_error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found")
}

/// `GET /api/v2.0/systeminfo`: the version only for an authenticated caller
/// (`src/server/v2.0/handler/systeminfo.go`, `WithProtectedInfo`).
fn systeminfo(state: &State, caller: &Caller) -> Response<Body> {
    if state.switches().systeminfo_hidden {
        return harbor_error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found");
    }
    let mut v = json!({
        "auth_mode": "db_auth", "primary_auth_mode": false, "self_registration": false,
        "banner_message": "", "oidc_provider_name": "",
    });
    if *caller != Caller::Anonymous {
        v["harbor_version"] = json!(state.config.version);
        v["external_url"] = json!(state.url);
        v["registry_url"] = json!(state.url.trim_start_matches("http://"));
        v["read_only"] = json!(false);
        v["has_ca_root"] = json!(false);
        v["project_creation_restriction"] = json!("everyone");
        v["notification_enable"] = json!(true);
        v["current_time"] = json!(state.started);
    }
    json_response(StatusCode::OK, &v)
}

fn project_json(state: &State, id: i64, p: &ProjectSpec) -> serde_json::Value {
    let mut v = json!({
        "project_id": id,
        "name": p.name,
        "owner_id": 1,
        "owner_name": "admin",
        "creation_time": state.started,
        "update_time": state.started,
        "repo_count": 0,
        "deleted": false,
        "metadata": {"public": if p.public { "true" } else { "false" }},
    });
    if let Some(r) = &p.registry {
        v["registry_id"] = json!(r.id);
    }
    v
}

fn projects(state: &State, caller: &Caller, query: Option<&str>) -> Response<Body> {
    let (mut page, mut page_size) = (1i64, 10i64);
    for (k, v) in query_pairs(query) {
        let target = match k.as_str() {
            "page" => &mut page,
            "page_size" => &mut page_size,
            _ => continue,
        };
        match v.parse::<i64>() {
            Ok(n) => *target = n,
            Err(_) => return harbor_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "invalid query"),
        }
    }
    if page < 1 || !(1..=100).contains(&page_size) {
        return harbor_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "validation failure: page_size in query should be less than or equal to 100",
        );
    }
    // Harbor counts and lists in two queries, each against the list as it is then.
    let visible: Vec<serde_json::Value> = state
        .projects
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| *caller != Caller::Anonymous || p.public)
        .map(|(id, p)| project_json(state, *id, p))
        .collect();
    state.counters.lock().unwrap().project_pages += 1;
    if page == 1 {
        let shift = state.switches().shifts.pop_front();
        if let Some(shift) = shift {
            apply(state, shift);
        }
    }
    let total = visible.len() as i64;
    let start = ((page - 1) * page_size).min(total) as usize;
    let end = (page * page_size).min(total) as usize;
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::Value::Array(visible[start..end].to_vec()),
    );
    let link = |p: i64| format!("</api/v2.0/projects?page={p}&page_size={page_size}>");
    let mut links = Vec::new();
    if page > 1 {
        links.push(format!("{}; rel=\"prev\"", link(page - 1)));
    }
    if page * page_size < total {
        links.push(format!("{}; rel=\"next\"", link(page + 1)));
    }
    let h = resp.headers_mut();
    h.insert("x-total-count", total.into());
    if !links.is_empty() {
        h.insert(
            header::LINK,
            links.join(" , ").parse().expect("link header"),
        );
    }
    resp
}

/// Creates or deletes a project (the list stays sorted by name, as Harbor lists it).
pub(crate) fn apply(state: &State, shift: Shift) {
    let mut projects = state.projects.lock().unwrap();
    match shift {
        Shift::Create(spec) => {
            let id = projects.iter().map(|(id, _)| *id).max().unwrap_or(0) + 1;
            projects.push((id, spec));
            projects.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        }
        Shift::Delete(name) => projects.retain(|(_, p)| p.name != name),
    }
}

fn registry(state: &State, caller: &Caller, id: &str) -> Response<Body> {
    if *caller == Caller::Anonymous {
        return unauthorized();
    }
    if state.registries_forbidden.load(Ordering::Relaxed) {
        return harbor_error(StatusCode::FORBIDDEN, "FORBIDDEN", "forbidden");
    }
    let found = id.parse::<i64>().ok().and_then(|id| {
        state
            .projects
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, p)| p.registry.clone())
            .find(|r| r.id == id)
    });
    let Some(r) = found else {
        return harbor_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("registry {id} not found"),
        );
    };
    json_response(
        StatusCode::OK,
        &json!({
            "id": r.id, "name": r.name, "type": r.kind, "url": r.url, "insecure": false,
            "status": "healthy", "description": "",
            "credential": {"type": "basic", "access_key": "", "access_secret": "*****"},
            "creation_time": state.started, "update_time": state.started,
        }),
    )
}

/// `GET /service/token?service=…&scope=…[&scope=…]`: Harbor's token service
/// (`src/core/service/token/creator.go`). Credentials it does not accept are anonymous; an anonymous
/// request that asks no scope is refused (401, empty body), one that asks scopes gets a token with
/// anonymous rights (pull on public projects).
pub(crate) fn token(state: &State, query: Option<&str>, headers: &HeaderMap) -> Response<Body> {
    let caller = classify(state, headers);
    let pairs = query_pairs(query);
    let asked = pairs.iter().any(|(k, _)| k == "scope");
    if caller == Caller::Anonymous && !asked {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::CONTENT_LENGTH, 0)
            .body(full(bytes::Bytes::new()))
            .expect("401");
    }
    sign(state, &caller, &pairs, |claims| state.auth.issue(claims))
}

/// The registry's own realm: the same rules, signed with the key the registry trusts (the stand-in
/// rotates only the key of the tokens clients get). Seeding pushes with the admin through it.
pub(crate) fn registry_token(
    state: &State,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response<Body> {
    let caller = classify(state, headers);
    sign(state, &caller, &query_pairs(query), |claims| {
        state.auth.registry_keys.sign_jwt(claims)
    })
}

fn sign(
    state: &State,
    caller: &Caller,
    pairs: &[(String, String)],
    signer: impl Fn(&serde_json::Value) -> anyhow::Result<String>,
) -> Response<Body> {
    let service = pairs
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| crate::registry::SERVICE.to_string());
    let access: Vec<serde_json::Value> = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|scope| grant(state, caller, &scope))
        .collect();
    let now = time::OffsetDateTime::now_utc();
    let iat = now.unix_timestamp();
    let ttl = state.config.token_ttl.as_secs() as i64;
    let sub = match caller {
        Caller::Robot(u) => u.clone(),
        Caller::Admin => ADMIN_USER.to_string(),
        Caller::Anonymous => String::new(),
    };
    let claims = json!({
        "iss": crate::keys::ISSUER, "sub": sub, "aud": service,
        "exp": iat + ttl, "nbf": iat, "iat": iat,
        "jti": format!("{:032x}", rand::random::<u128>()),
        "access": access,
    });
    let token = match signer(&claims) {
        Ok(t) => t,
        Err(e) => {
            return harbor_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &e.to_string())
        }
    };
    json_response(
        StatusCode::OK,
        &json!({"token": token, "access_token": token, "expires_in": ttl,
                "issued_at": now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()}),
    )
}

/// One `access` entry for `scope` (`repository:<name>:<actions>`), or None when nothing is granted.
fn grant(state: &State, caller: &Caller, scope: &str) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind != "repository" {
        return None;
    }
    let project = name.split('/').next()?;
    let spec = state.project(project);
    let allowed: &[&str] = match (caller, spec) {
        (Caller::Admin, _) => &["pull", "push", "delete", "*"],
        (Caller::Robot(_), Some(p)) if robot_may_pull(state, &p) => &["pull"],
        (Caller::Anonymous, Some(p)) if p.public => &["pull"],
        _ => &[],
    };
    let granted: Vec<&str> = actions.split(',').filter(|a| allowed.contains(a)).collect();
    if granted.is_empty() {
        return None;
    }
    Some(json!({"type": "repository", "name": name, "actions": granted}))
}
