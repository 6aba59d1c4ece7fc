//! Discovery: reads Harbor's proxy-cache projects through the API and publishes them as a
//! [`Snapshot`]. It runs on its own thread with its own monoio runtime and its own [`Upstream`], at
//! start and every `DISCOVERY_INTERVAL`, so the data-plane cores never wait for it.
//!
//! Rules:
//! - `GET /api/v2.0/projects?page=N&page_size=100` with the robot's Basic credentials, following
//!   `Link: <…>; rel="next"` to the end (never guessing the end from a short page) and checking the
//!   count against `X-Total-Count`; a project is a proxy cache when `registry_id > 0`; its upstream
//!   type comes from `GET /api/v2.0/registries/{id}`.
//! - A failed or partial discovery publishes nothing: the last good snapshot stays. An empty list is
//!   published only when there was nothing before (a robot that suddenly sees no project is more
//!   likely a permissions accident than a Harbor without proxies).
//! - Projects are sorted by name; when there are more than `MAX_FANOUT_PROJECTS`, the first ones by
//!   name are kept and the others are named in a warning, so the cut is predictable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{ACCEPT, LINK};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::share::Shared;
use crate::snapshot::{Project, SharedSnapshot, Snapshot, UpstreamKind};
use crate::upstream::{self, AuthMode, Upstream, UpstreamError};

/// Harbor's largest page.
const PAGE_SIZE: usize = 100;
/// A Link chain longer than this is a loop (or a lie), not a project list.
const MAX_PAGES: usize = 1000;
/// Largest API answer read (100 projects are ~60 KiB).
const MAX_API_BODY: usize = 8 * 1024 * 1024;
/// Retry pace until a snapshot with projects exists.
const FIRST_RETRY: Duration = Duration::from_secs(2);
/// Longest one round may take (each request is bounded too; this bounds the sum).
const ROUND_LIMIT: Duration = Duration::from_secs(300);

/// Why one discovery round published nothing.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("Harbor refused the credentials of user {user:?} ({status}): check HARBOR_USERNAME and HARBOR_PASSWORD")]
    Credentials { status: StatusCode, user: String },
    #[error("{what} answered {status}")]
    Status { what: String, status: StatusCode },
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("unreadable answer from {what}: {detail}")]
    Body { what: String, detail: String },
    #[error("partial project list: {got} projects read, X-Total-Count says {total}")]
    Partial { got: usize, total: usize },
    #[error("bad pagination link {0:?}")]
    Link(String),
    #[error("the project list has more than {0} pages; stopping")]
    TooManyPages(usize),
}

#[derive(serde::Deserialize)]
struct ApiProject {
    project_id: i64,
    name: String,
    #[serde(default)]
    registry_id: Option<i64>,
}

#[derive(serde::Deserialize)]
struct ApiRegistry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    url: Option<String>,
}

/// Starts the discovery thread. It stops when `shutdown` flips.
pub fn spawn(
    config: Arc<Config>,
    upstream: Arc<upstream::Harbor>,
    snapshot: SharedSnapshot,
    redis: Option<Shared>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // The runtime is built on the thread (it is not `Send`); the start waits for it, so a router
    // that says "listening" has every thread it will run, and one that cannot build it does not start.
    let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("hr-discovery".into())
        .spawn(move || {
            let built = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build();
            let mut rt = match built {
                Ok(rt) => {
                    let _ = built_tx.send(Ok(()));
                    rt
                }
                Err(e) => {
                    let _ = built_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(run(config, upstream, snapshot, redis, metrics, shutdown));
        })?;
    match built_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot start the discovery runtime: {e}"),
        )),
        Err(_) => Err(std::io::Error::other(
            "the discovery thread exited before its runtime was up",
        )),
    }
}

async fn run(
    config: Arc<Config>,
    shared: Arc<upstream::Harbor>,
    snapshot: SharedSnapshot,
    redis: Option<Shared>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = Upstream::new(shared.clone());
    let user = config
        .harbor_credentials
        .as_ref()
        .map(|c| c.username.clone())
        .unwrap_or_else(|| "(anonymous)".into());
    let mut generation = 0;
    let mut failing = Failing::default();
    loop {
        shared.refresh_addresses();
        let started = Instant::now();
        let round = monoio::time::timeout(ROUND_LIMIT, discover(&client, &user));
        let failed = monoio::select! {
            result = round => match result {
                Ok(Ok(projects)) => {
                    publish(&config, &snapshot, projects, &mut generation);
                    if let (Some(redis), Some(s)) = (&redis, snapshot.load().as_ref()) {
                        redis.publish_projects(s);
                    }
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("the round took longer than {ROUND_LIMIT:?}")),
            },
            _ = shutdown.changed() => return,
        };
        metrics.discovery.round(failed.is_none(), started.elapsed());
        failing.after(&snapshot, failed);
        let wait = match snapshot.load().as_ref() {
            Some(s) if !s.projects.is_empty() => config.discovery_interval,
            _ => config.discovery_interval.min(FIRST_RETRY),
        };
        monoio::select! {
            _ = monoio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Discovery's health, logged once per change: the first failed round (and each new reason) at warn,
/// the first good round after failures at info; the rounds in between only count.
#[derive(Default)]
struct Failing {
    since: Option<Instant>,
    rounds: u64,
    reason: Option<String>,
}

impl Failing {
    fn after(&mut self, snapshot: &SharedSnapshot, failed: Option<String>) {
        match failed {
            Some(error) => {
                self.rounds += 1;
                let since = *self.since.get_or_insert_with(Instant::now);
                if self.reason.as_deref() != Some(error.as_str()) {
                    let kept = snapshot.load().as_ref().map_or(0, |s| s.projects.len());
                    tracing::warn!(error = %error, kept_projects = kept, failing_for_seconds = since.elapsed().as_secs(),
                        "discovery failed; keeping the last good project list (logged again when the reason changes or discovery recovers)");
                    self.reason = Some(error);
                }
            }
            None => {
                if let Some(since) = self.since.take() {
                    tracing::info!(
                        failed_rounds = self.rounds,
                        failing_for_seconds = since.elapsed().as_secs(),
                        "discovery recovered: Harbor's API answers again"
                    );
                }
                self.rounds = 0;
                self.reason = None;
            }
        }
    }
}

fn publish(
    config: &Config,
    snapshot: &SharedSnapshot,
    mut projects: Vec<Project>,
    generation: &mut u64,
) {
    let previous = snapshot.load_full();
    if projects.is_empty() {
        if let Some(prev) = previous.as_ref().filter(|p| !p.projects.is_empty()) {
            tracing::warn!(
                kept_projects = prev.projects.len(),
                "Harbor listed no proxy-cache project; keeping the last list (check the robot's permissions)"
            );
            // Harbor did answer: the kept list is as current as Harbor lets us know.
            projects = prev.projects.clone();
        } else {
            tracing::warn!("Harbor has no proxy-cache project the robot can see");
        }
    }
    if projects.len() > config.max_fanout_projects {
        let left_out: Vec<&str> = projects[config.max_fanout_projects..]
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        tracing::warn!(
            max = config.max_fanout_projects,
            left_out = ?left_out,
            "more proxy-cache projects than MAX_FANOUT_PROJECTS; the first by name are used"
        );
        projects.truncate(config.max_fanout_projects);
    }
    let changed = previous.as_ref().is_none_or(|p| p.projects != projects);
    if changed {
        let names: Vec<&str> = projects.iter().map(|p| p.name.as_str()).collect();
        tracing::info!(projects = ?names, "proxy-cache projects discovered");
    }
    *generation += 1;
    snapshot.store(Some(Arc::new(Snapshot {
        projects,
        built_at: Instant::now(),
        generation: *generation,
    })));
}

/// One discovery round: every proxy-cache project with its upstream kind, sorted by name.
pub async fn discover(client: &Upstream, user: &str) -> Result<Vec<Project>, DiscoveryError> {
    let listed = list_projects(client, user).await?;
    let proxies: Vec<ApiProject> = listed
        .into_iter()
        .filter(|p| p.registry_id.unwrap_or(0) > 0)
        .collect();
    let registry_ids: BTreeSet<i64> = proxies.iter().filter_map(|p| p.registry_id).collect();
    let mut kinds = BTreeMap::new();
    for id in registry_ids {
        kinds.insert(id, registry_kind(client, id).await?);
    }
    let mut projects: Vec<Project> = proxies
        .into_iter()
        .map(|p| {
            let registry_id = p.registry_id.unwrap_or(0);
            let (kind, upstream_url) = kinds
                .get(&registry_id)
                .cloned()
                .unwrap_or((UpstreamKind::Unknown, None));
            Project::new(p.name, p.project_id, registry_id, kind, upstream_url)
        })
        .collect();
    projects.sort_by(|a, b| a.name.cmp(&b.name));
    projects.dedup_by(|a, b| a.name == b.name);
    Ok(projects)
}

async fn list_projects(client: &Upstream, user: &str) -> Result<Vec<ApiProject>, DiscoveryError> {
    let mut path = format!("/api/v2.0/projects?page=1&page_size={PAGE_SIZE}");
    let mut all = Vec::new();
    let mut total = None;
    for _ in 0..MAX_PAGES {
        let (headers, body) = api_get(client, &path, "the project list", user).await?;
        if total.is_none() {
            total = headers
                .get("x-total-count")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<usize>().ok());
        }
        let page: Vec<ApiProject> =
            serde_json::from_slice(&body).map_err(|e| DiscoveryError::Body {
                what: "the project list".into(),
                detail: e.to_string(),
            })?;
        all.extend(page);
        match next_link(&headers)? {
            Some(next) => path = next,
            None => {
                return match total {
                    Some(t) if t != all.len() => Err(DiscoveryError::Partial {
                        got: all.len(),
                        total: t,
                    }),
                    _ => Ok(all),
                }
            }
        }
    }
    Err(DiscoveryError::TooManyPages(MAX_PAGES))
}

/// The upstream kind of registry `id`; a refusal (the robot may lack the permission) or an unknown
/// id gives [`UpstreamKind::Unknown`] rather than failing the round.
async fn registry_kind(
    client: &Upstream,
    id: i64,
) -> Result<(UpstreamKind, Option<String>), DiscoveryError> {
    let path = format!("/api/v2.0/registries/{id}");
    let res = client
        .send(Method::GET, &path, &json_accept(), AuthMode::Basic)
        .await?;
    let status = res.status();
    let body = read_body(res.into_body(), "a registry").await?;
    match status {
        s if s.is_success() => {
            let r: ApiRegistry =
                serde_json::from_slice(&body).map_err(|e| DiscoveryError::Body {
                    what: format!("registry {id}"),
                    detail: e.to_string(),
                })?;
            let kind = match r.kind.as_str() {
                "docker-hub" => UpstreamKind::DockerHub,
                other => UpstreamKind::Other(other.to_string()),
            };
            Ok((kind, r.url))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
            tracing::warn!(registry_id = id, %status,
                "cannot read a proxy project's registry; its type is unknown, so Docker Hub's library/ prefix is not added for it");
            Ok((UpstreamKind::Unknown, None))
        }
        s => Err(DiscoveryError::Status {
            what: format!("registry {id}"),
            status: s,
        }),
    }
}

async fn api_get(
    client: &Upstream,
    path: &str,
    what: &str,
    user: &str,
) -> Result<(HeaderMap, bytes::Bytes), DiscoveryError> {
    let res = client
        .send(Method::GET, path, &json_accept(), AuthMode::Basic)
        .await?;
    let status = res.status();
    let (parts, body) = res.into_parts();
    let body = read_body(body, what).await?;
    match status {
        s if s.is_success() => Ok((parts.headers, body)),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(DiscoveryError::Credentials {
            status,
            user: user.to_string(),
        }),
        s => Err(DiscoveryError::Status {
            what: what.to_string(),
            status: s,
        }),
    }
}

async fn read_body(
    body: upstream::pool::UpstreamBody,
    what: &str,
) -> Result<bytes::Bytes, DiscoveryError> {
    Limited::new(body, MAX_API_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| DiscoveryError::Body {
            what: what.to_string(),
            detail: e.to_string(),
        })
}

fn json_accept() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT, HeaderValue::from_static("application/json"));
    h
}

/// The `rel="next"` target of the Link headers, as a path on Harbor's API.
pub fn next_link(headers: &HeaderMap) -> Result<Option<String>, DiscoveryError> {
    for value in headers.get_all(LINK) {
        let Ok(value) = value.to_str() else { continue };
        for link in value.split(',') {
            let mut parts = link.split(';');
            let target = parts.next().unwrap_or("").trim();
            let is_next = parts.any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            if !is_next {
                continue;
            }
            let url = target
                .strip_prefix('<')
                .and_then(|t| t.strip_suffix('>'))
                .ok_or_else(|| DiscoveryError::Link(target.to_string()))?;
            // Absolute links are reduced to their path: the API is always asked on HARBOR_URL.
            let uri: http::Uri = url
                .parse()
                .map_err(|_| DiscoveryError::Link(url.to_string()))?;
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or_default();
            if !path.starts_with("/api/v2.0/projects?") {
                return Err(DiscoveryError::Link(url.to_string()));
            }
            return Ok(Some(path.to_string()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn project(name: &str) -> Project {
        Project::new(name.into(), 1, 1, UpstreamKind::Other("quay".into()), None)
    }

    fn names(s: &SharedSnapshot) -> Vec<String> {
        s.load()
            .as_ref()
            .unwrap()
            .projects
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    #[test]
    fn publishing_cuts_and_keeps() {
        let map: HashMap<String, String> =
            [("MAX_FANOUT_PROJECTS".to_string(), "2".to_string())].into();
        let config = Config::from_map(&map).unwrap();
        let snap = crate::snapshot::shared();
        let mut generation = 0;
        // The first empty list is published (there is nothing better to keep).
        publish(&config, &snap, vec![], &mut generation);
        assert!(snap.load().as_ref().unwrap().projects.is_empty());
        // Sorted input is cut at MAX_FANOUT_PROJECTS, keeping the first names.
        let list = vec![project("a"), project("b"), project("c")];
        publish(&config, &snap, list, &mut generation);
        assert_eq!(names(&snap), ["a", "b"]);
        assert_eq!(snap.load().as_ref().unwrap().generation, 2);
        // An empty list after a good one keeps the good one (re-stamped: Harbor did answer).
        // Age the published list by an hour, so a re-stamp is visible.
        let hour = Duration::from_secs(3600);
        let mut aged = Snapshot::clone(snap.load().as_ref().unwrap());
        aged.built_at -= hour;
        let before = aged.built_at;
        snap.store(Some(Arc::new(aged)));
        publish(&config, &snap, vec![], &mut generation);
        assert_eq!(names(&snap), ["a", "b"]);
        assert_eq!(snap.load().as_ref().unwrap().generation, 3);
        assert!(
            snap.load().as_ref().unwrap().built_at >= before + hour,
            "re-stamped when Harbor answered"
        );
        // A new good list replaces it.
        publish(&config, &snap, vec![project("z")], &mut generation);
        assert_eq!(names(&snap), ["z"]);
    }

    fn links(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(LINK, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn next_links() {
        assert_eq!(next_link(&links(&[])).unwrap(), None);
        assert_eq!(
            next_link(&links(&[
                r#"</api/v2.0/projects?page=2&page_size=100>; rel="next""#
            ]))
            .unwrap()
            .as_deref(),
            Some("/api/v2.0/projects?page=2&page_size=100")
        );
        // Harbor puts prev and next in one header on middle pages.
        assert_eq!(
            next_link(&links(&[
                r#"</api/v2.0/projects?page=1&page_size=100>; rel="prev" , </api/v2.0/projects?page=3&page_size=100>; rel="next""#
            ]))
            .unwrap()
            .as_deref(),
            Some("/api/v2.0/projects?page=3&page_size=100")
        );
        // Only prev: the last page.
        assert_eq!(
            next_link(&links(&[
                r#"</api/v2.0/projects?page=2&page_size=100>; rel="prev""#
            ]))
            .unwrap(),
            None
        );
        // Absolute links are reduced to the path on HARBOR_URL.
        assert_eq!(
            next_link(&links(&[
                r#"<https://elsewhere.example/api/v2.0/projects?page=2>; rel="next""#
            ]))
            .unwrap()
            .as_deref(),
            Some("/api/v2.0/projects?page=2")
        );
        // A link away from the project list is refused.
        assert!(next_link(&links(&[r#"</api/v2.0/users?page=2>; rel="next""#])).is_err());
        assert!(next_link(&links(&[r#"/api/v2.0/projects?page=2; rel="next""#])).is_err());
    }
}
