//! Discovery: reads Harbor's proxy-cache projects through the API and publishes them as a
//! [`Snapshot`]. It runs on its own thread with its own monoio runtime and its own [`Upstream`], at
//! start and every `DISCOVERY_INTERVAL`, so the data-plane cores never wait for it.
//!
//! Rules:
//! - `GET /api/v2.0/projects?page=N&page_size=100` with the robot's Basic credentials, following
//!   `Link: <…>; rel="next"` to the end (never guessing the end from a short page) and checking the
//!   count against `X-Total-Count`; a project is a proxy cache when `registry_id > 0`; its upstream
//!   type comes from `GET /api/v2.0/registries/{id}`.
//! - A failed round publishes nothing: the last good snapshot stays. An empty list is
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
use monoio::{FusionDriver, LegacyDriver, RuntimeBuilder};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::{Config, IoDriver};
use crate::metrics::Metrics;
use crate::share::Shared;
use crate::snapshot::{HarborInfo, Project, SharedSnapshot, Snapshot, UpstreamKind};
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
/// Reads of the project list in one round when pages shift under it; then the reads are merged.
pub const READS: usize = 3;

/// Why one discovery round published nothing.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("Harbor does not accept the credentials of user {user:?} ({evidence}): check that the robot account is enabled and not expired, and HARBOR_USERNAME and HARBOR_PASSWORD")]
    Credentials { user: String, evidence: String },
    #[error("{what} answered {status}")]
    Status { what: String, status: StatusCode },
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("unreadable answer from {what}: {detail}")]
    Body { what: String, detail: String },
    #[error("the project list kept changing while it was read: {got} projects in every read together, fewer than the {total} Harbor counted")]
    Unsettled { got: usize, total: usize },
    #[error("bad pagination link {0:?}")]
    Link(String),
    #[error("the project list has more than {0} pages; stopping")]
    TooManyPages(usize),
}

#[derive(serde::Deserialize, Clone, Debug)]
struct ApiProject {
    project_id: i64,
    name: String,
    #[serde(default)]
    registry_id: Option<i64>,
}

#[derive(serde::Deserialize)]
struct ApiSystemInfo {
    #[serde(default)]
    harbor_version: Option<String>,
}

/// What one round read.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    /// Every proxy-cache project with its upstream kind, sorted by name.
    pub projects: Vec<Project>,
    /// Harbor's version, when systeminfo named it.
    pub version: Option<String>,
}

#[derive(serde::Deserialize)]
struct ApiRegistry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    url: Option<String>,
}

/// The runtime `built`, once its start is reported on `tx` (with the error when there is none).
fn started<R>(
    built: std::io::Result<R>,
    tx: &std::sync::mpsc::SyncSender<std::io::Result<()>>,
) -> Option<R> {
    match built {
        Ok(rt) => {
            let _ = tx.send(Ok(()));
            Some(rt)
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            None
        }
    }
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
            // The workers' driver choice holds for this thread too: `IO_DRIVER=epoll` means no
            // io_uring anywhere in the process (a seccomp profile may forbid it, and a tool such as
            // valgrind, which does not know that `io_uring_enter` blocks, stalls on it).
            let driver = config.io_driver;
            let work = run(config, upstream, snapshot, redis, metrics, shutdown);
            match driver {
                IoDriver::Epoll => {
                    let built = RuntimeBuilder::<LegacyDriver>::new().enable_timer().build();
                    if let Some(mut rt) = started(built, &built_tx) {
                        rt.block_on(work);
                    }
                }
                IoDriver::IoUring | IoDriver::Auto => {
                    let built = RuntimeBuilder::<FusionDriver>::new().enable_timer().build();
                    if let Some(mut rt) = started(built, &built_tx) {
                        rt.block_on(work);
                    }
                }
            }
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
    let client = Upstream::new(shared.clone(), Clock::system());
    let user = config
        .harbor_credentials
        .as_ref()
        .map(|c| c.username.clone())
        .unwrap_or_else(|| "(anonymous)".into());
    let credentials = config.harbor_credentials.is_some();
    let mut generation = 0;
    let mut failing = Failing::default();
    loop {
        shared.refresh_addresses();
        let started = Instant::now();
        let robot = Robot {
            user: &user,
            credentials,
        };
        let round = monoio::time::timeout(ROUND_LIMIT, discover(&client, &robot));
        let failed = monoio::select! {
            result = round => match result {
                Ok(Ok(found)) => {
                    publish(&config, &snapshot, found, &mut generation);
                    if let (Some(redis), Some(s)) = (&redis, snapshot.load().as_ref()) {
                        redis.publish_projects(s);
                    }
                    None
                }
                Ok(Err(e @ DiscoveryError::Credentials { .. })) => {
                    keep_refused(&snapshot, &user, &mut generation);
                    Some(Failure { error: e.to_string(), credentials: true })
                }
                Ok(Err(e)) => Some(Failure { error: e.to_string(), credentials: false }),
                Err(_) => Some(Failure {
                    error: format!("the round took longer than {ROUND_LIMIT:?}"),
                    credentials: false,
                }),
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

/// Why a round published no new list.
struct Failure {
    error: String,
    /// Harbor does not accept the robot: logged as an error, the list kept and marked.
    credentials: bool,
}

/// Who discovery reads as (besides Harbor's answers, what a round needs to know).
pub struct Robot<'a> {
    /// The robot's name, for messages (never its secret).
    pub user: &'a str,
    /// Credentials are configured: Harbor treating the router as anonymous is a refusal.
    pub credentials: bool,
}

/// Discovery's health, logged once per change: the first failed round (and each new reason) at warn
/// (at error when Harbor does not accept the robot), the first good round after failures at info;
/// the rounds in between only count.
#[derive(Default)]
struct Failing {
    since: Option<Instant>,
    rounds: u64,
    reason: Option<String>,
}

impl Failing {
    fn after(&mut self, snapshot: &SharedSnapshot, failed: Option<Failure>) {
        match failed {
            Some(Failure { error, credentials }) => {
                self.rounds += 1;
                let since = *self.since.get_or_insert_with(Instant::now);
                if self.reason.as_deref() != Some(error.as_str()) {
                    let kept = snapshot.load().as_ref().map_or(0, |s| s.projects.len());
                    let failing_for_seconds = since.elapsed().as_secs();
                    if credentials {
                        tracing::error!(error = %error, kept_projects = kept, failing_for_seconds,
                            "Harbor does not accept the router's credentials; keeping the last project list read with them (logged again when the reason changes or discovery recovers)");
                    } else {
                        tracing::warn!(error = %error, kept_projects = kept, failing_for_seconds,
                            "discovery failed; keeping the last good project list (logged again when the reason changes or discovery recovers)");
                    }
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

/// After a round that found the robot refused: the last list stays, re-stamped (Harbor answered, so
/// readiness does not age) and marked with the refusal; a provisional list from Redis stays as it
/// was, marked; with no list yet, an empty one says why.
fn keep_refused(snapshot: &SharedSnapshot, user: &str, generation: &mut u64) {
    let previous = snapshot.load_full();
    // A list loaded from Redis stays what it was (provisional, with its age): no round confirmed it.
    let (projects, version, built_at, provisional) = match previous.as_deref() {
        Some(p) if p.provisional => (p.projects.clone(), None, p.built_at, true),
        Some(p) => (
            p.projects.clone(),
            p.harbor.version.clone(),
            Instant::now(),
            false,
        ),
        None => (Vec::new(), None, Instant::now(), false),
    };
    *generation += 1;
    snapshot.store(Some(Arc::new(Snapshot {
        projects,
        built_at,
        generation: *generation,
        harbor: HarborInfo {
            version,
            refused_user: Some(user.to_string()),
        },
        provisional,
    })));
}

fn publish(config: &Config, snapshot: &SharedSnapshot, found: Discovered, generation: &mut u64) {
    let Discovered {
        mut projects,
        version,
        ..
    } = found;
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
    let version = version.or_else(|| previous.as_ref().and_then(|p| p.harbor.version.clone()));
    snapshot.store(Some(Arc::new(Snapshot {
        projects,
        built_at: Instant::now(),
        generation: *generation,
        harbor: HarborInfo {
            version,
            refused_user: None,
        },
        provisional: false,
    })));
}

/// One discovery round: Harbor's version, every proxy-cache project with its upstream kind, sorted
/// by name; a [`DiscoveryError::Credentials`] when Harbor treats the configured robot as anonymous.
pub async fn discover(client: &Upstream, robot: &Robot<'_>) -> Result<Discovered, DiscoveryError> {
    let refused = |evidence: &str| DiscoveryError::Credentials {
        user: robot.user.to_string(),
        evidence: evidence.to_string(),
    };
    let info = systeminfo(client).await?;
    if robot.credentials && matches!(info, SystemInfo::Anonymous) {
        return Err(refused(
            "systeminfo answers as to an anonymous caller: no harbor_version",
        ));
    }
    let listed = list_projects(client, robot.user).await?;
    let proxies: Vec<ApiProject> = listed
        .into_iter()
        .filter(|p| p.registry_id.unwrap_or(0) > 0)
        .collect();
    let registry_ids: BTreeSet<i64> = proxies.iter().filter_map(|p| p.registry_id).collect();
    let mut kinds = BTreeMap::new();
    for id in registry_ids {
        match registry_kind(client, id).await? {
            Registry::Anonymous if robot.credentials => {
                return Err(refused(&format!(
                    "registries/{id} answered 401, as to an anonymous caller"
                )))
            }
            Registry::Anonymous => {
                kinds.insert(id, (UpstreamKind::Unknown, None));
            }
            Registry::Read(kind, url) => {
                kinds.insert(id, (kind, url));
            }
        }
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
    Ok(Discovered {
        projects,
        version: match info {
            SystemInfo::Version(v) => Some(v),
            _ => None,
        },
    })
}

/// What `GET /api/v2.0/systeminfo` says.
enum SystemInfo {
    /// Harbor's version: the caller is authenticated (only they are shown it).
    Version(String),
    /// Answered without a version, as to an anonymous caller.
    Anonymous,
    /// Nothing (an error status, an unreadable body: a proxy in front of Harbor, or an old Harbor).
    Unknown,
}

async fn systeminfo(client: &Upstream) -> Result<SystemInfo, DiscoveryError> {
    let res = client
        .send(
            Method::GET,
            "/api/v2.0/systeminfo",
            &json_accept(),
            AuthMode::Basic,
        )
        .await?;
    let status = res.status();
    let body = read_body(res.into_body(), "systeminfo").await?;
    if !status.is_success() {
        tracing::debug!(%status, "systeminfo answered no version");
        return Ok(SystemInfo::Unknown);
    }
    // Absent means an anonymous caller; a version that is empty or absurdly long is Harbor's
    // (only authenticated callers get the field) and is shown shortened.
    Ok(match serde_json::from_slice::<ApiSystemInfo>(&body) {
        Ok(ApiSystemInfo {
            harbor_version: Some(v),
        }) => SystemInfo::Version(shown_version(&v)),
        Ok(_) => SystemInfo::Anonymous,
        Err(_) => SystemInfo::Unknown,
    })
}

/// A version as shown in `/healthz` and the metrics: printable ASCII, at most 64 characters,
/// `unknown` when nothing is left.
fn shown_version(v: &str) -> String {
    let shown: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    if shown.is_empty() {
        "unknown".into()
    } else {
        shown
    }
}

/// Reads the project list, again when it changed while it was read (see the module's rules).
async fn list_projects(client: &Upstream, user: &str) -> Result<Vec<ApiProject>, DiscoveryError> {
    let mut reads = Vec::with_capacity(READS);
    for _ in 0..READS {
        let read = read_list(client, user).await?;
        let settled = read.inconsistency().is_none();
        reads.push(read);
        if settled {
            break;
        }
    }
    settle(reads)
}

/// The list the reads of one round give: the last read if it is consistent (logged when earlier
/// ones were not), else every project any read listed, unless together they hold fewer than Harbor
/// counted at its lowest (a project was on no page of any read: the round fails, and the last list
/// stays).
fn settle(mut reads: Vec<Read>) -> Result<Vec<ApiProject>, DiscoveryError> {
    let why: Vec<String> = reads.iter().filter_map(Read::inconsistency).collect();
    let last = reads.pop().ok_or(DiscoveryError::TooManyPages(0))?;
    if last.inconsistency().is_none() {
        if let Some(why) = why.first() {
            tracing::info!(
                why,
                "the project list changed while it was read; read it again"
            );
        }
        return Ok(last.projects);
    }
    reads.push(last);
    let fewest = reads
        .iter()
        .flat_map(|r| r.totals.iter().flatten())
        .min()
        .copied();
    let mut merged: BTreeMap<i64, ApiProject> = BTreeMap::new();
    for p in reads.into_iter().flat_map(|r| r.projects) {
        merged.insert(p.project_id, p);
    }
    if let Some(total) = fewest.filter(|t| merged.len() < *t) {
        return Err(DiscoveryError::Unsettled {
            got: merged.len(),
            total,
        });
    }
    tracing::warn!(
        why = why.last().map(String::as_str).unwrap_or(""),
        reads = why.len(),
        "the project list kept changing while it was read; using every project any read listed"
    );
    Ok(merged.into_values().collect())
}

/// One read of the project list, page by page.
#[derive(Clone)]
struct Read {
    projects: Vec<ApiProject>,
    /// `X-Total-Count` of each page.
    totals: Vec<Option<usize>>,
}

impl Read {
    /// Why this read cannot be the list as it is, if it cannot.
    fn inconsistency(&self) -> Option<String> {
        let ids: BTreeSet<i64> = self.projects.iter().map(|p| p.project_id).collect();
        if ids.len() != self.projects.len() {
            return Some("a project was listed twice (pages shifted)".into());
        }
        let totals: BTreeSet<usize> = self.totals.iter().flatten().copied().collect();
        if totals.len() > 1 {
            return Some(format!("X-Total-Count changed between pages: {totals:?}"));
        }
        match totals.first() {
            Some(t) if *t != self.projects.len() => Some(format!(
                "{} projects read, X-Total-Count says {t}",
                self.projects.len()
            )),
            _ => None,
        }
    }
}

async fn read_list(client: &Upstream, user: &str) -> Result<Read, DiscoveryError> {
    let mut path = format!("/api/v2.0/projects?page=1&page_size={PAGE_SIZE}");
    let mut read = Read {
        projects: Vec::new(),
        totals: Vec::new(),
    };
    for _ in 0..MAX_PAGES {
        let (headers, body) = api_get(client, &path, "the project list", user).await?;
        read.totals.push(
            headers
                .get("x-total-count")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<usize>().ok()),
        );
        let page: Vec<ApiProject> =
            serde_json::from_slice(&body).map_err(|e| DiscoveryError::Body {
                what: "the project list".into(),
                detail: e.to_string(),
            })?;
        read.projects.extend(page);
        match next_link(&headers)? {
            Some(next) => path = next,
            None => return Ok(read),
        }
    }
    Err(DiscoveryError::TooManyPages(MAX_PAGES))
}

/// What `registries/{id}` said.
enum Registry {
    Read(UpstreamKind, Option<String>),
    /// 401: Harbor treats the caller as anonymous.
    Anonymous,
}

/// The upstream kind of registry `id`; a refusal (the robot may lack the permission) or an unknown
/// id gives [`UpstreamKind::Unknown`] rather than failing the round.
async fn registry_kind(client: &Upstream, id: i64) -> Result<Registry, DiscoveryError> {
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
            Ok(Registry::Read(kind, r.url))
        }
        StatusCode::UNAUTHORIZED => Ok(Registry::Anonymous),
        StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
            tracing::warn!(registry_id = id, %status,
                "cannot read a proxy project's registry; its type is unknown, so Docker Hub's library/ prefix is not added for it");
            Ok(Registry::Read(UpstreamKind::Unknown, None))
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
            user: user.to_string(),
            evidence: format!("{what} answered {status}"),
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

    fn found(projects: Vec<Project>) -> Discovered {
        Discovered {
            projects,
            ..Default::default()
        }
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
        publish(&config, &snap, found(vec![]), &mut generation);
        assert!(snap.load().as_ref().unwrap().projects.is_empty());
        // Sorted input is cut at MAX_FANOUT_PROJECTS, keeping the first names.
        let list = vec![project("a"), project("b"), project("c")];
        publish(&config, &snap, found(list), &mut generation);
        assert_eq!(names(&snap), ["a", "b"]);
        assert_eq!(snap.load().as_ref().unwrap().generation, 2);
        // An empty list after a good one keeps the good one (re-stamped: Harbor did answer).
        // Age the published list by an hour, so a re-stamp is visible.
        let hour = Duration::from_secs(3600);
        let mut aged = Snapshot::clone(snap.load().as_ref().unwrap());
        aged.built_at -= hour;
        let before = aged.built_at;
        snap.store(Some(Arc::new(aged)));
        publish(&config, &snap, found(vec![]), &mut generation);
        assert_eq!(names(&snap), ["a", "b"]);
        assert_eq!(snap.load().as_ref().unwrap().generation, 3);
        assert!(
            snap.load().as_ref().unwrap().built_at >= before + hour,
            "re-stamped when Harbor answered"
        );
        // A new good list replaces it.
        publish(&config, &snap, found(vec![project("z")]), &mut generation);
        assert_eq!(names(&snap), ["z"]);
    }

    fn links(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(LINK, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn read(ids: &[i64], totals: &[usize]) -> Read {
        Read {
            projects: ids
                .iter()
                .map(|id| ApiProject {
                    project_id: *id,
                    name: format!("p{id}"),
                    registry_id: Some(1),
                })
                .collect(),
            totals: totals.iter().map(|t| Some(*t)).collect(),
        }
    }

    #[test]
    fn reads_that_disagree_are_merged_unless_one_project_is_on_no_page_of_any() {
        let ids = |r: Result<Vec<ApiProject>, DiscoveryError>| -> Vec<i64> {
            r.unwrap().iter().map(|p| p.project_id).collect()
        };
        // A consistent read is the list, whatever came before it.
        assert_eq!(
            ids(settle(vec![
                read(&[1, 2, 2], &[3, 3]),
                read(&[1, 2, 3], &[3, 3])
            ])),
            [1, 2, 3]
        );
        // Three inconsistent reads: merged by id, each project once.
        let shifting = vec![
            read(&[1, 2, 2, 3], &[3, 4]),
            read(&[1, 2, 3, 3, 4], &[4, 5]),
            read(&[1, 2, 3, 4, 4], &[5, 5]),
        ];
        assert_eq!(ids(settle(shifting)), [1, 2, 3, 4]);
        // Together fewer than Harbor counted at its lowest: one project was on no page of any read.
        let losing = vec![
            read(&[1, 3], &[3, 3]),
            read(&[1, 3], &[3, 3]),
            read(&[3, 4], &[3, 3]),
        ];
        assert_eq!(ids(settle(losing)), [1, 3, 4], "three between them: enough");
        let lost = vec![read(&[1, 3], &[3, 3]); 3];
        assert!(matches!(
            settle(lost),
            Err(DiscoveryError::Unsettled { got: 2, total: 3 })
        ));
    }

    #[test]
    fn versions_are_shown_printable_and_short() {
        assert_eq!(shown_version("v2.14.0-8f7ab1c2"), "v2.14.0-8f7ab1c2");
        assert_eq!(shown_version(""), "unknown");
        assert_eq!(shown_version("v2 \"x\"\n"), "v2\"x\"");
        assert_eq!(shown_version(&"9".repeat(200)).len(), 64);
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
