//! The stand-in Harbor server: one tokio runtime on its own thread, one listener on 127.0.0.1,
//! HTTP/1.1 only (Harbor's nginx templates have no `http2`, and harbor-core speaks no h2c), request
//! dispatch to `harbor.rs` (API and token service) and `proxy.rs` (`/v2/`), counters, the fault
//! table, the switches and connection dropping.
//!
//! Owns the shared [`State`] and the response helpers; the Harbor rules live in the other modules.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{oneshot, watch};

use crate::auth::Auth;
use crate::keys::TokenKeys;
use crate::{
    Cached, Counters, EmptyDigests, Fault, HarborConfig, ProjectSpec, Registry, Shift,
    UncachedBlobs, Upstream,
};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body type of every handler: upstream bodies stream through boxed.
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// Everything the handlers share.
pub(crate) struct State {
    pub config: HarborConfig,
    /// The projects with their ids, sorted by name as Harbor lists them; a [`Shift`] changes them.
    pub projects: Mutex<Vec<(i64, ProjectSpec)>>,
    /// Tokens: the signing key of client tokens, the internal ones for the registry.
    pub auth: Auth,
    /// `http://127.0.0.1:PORT`: the token service's realm.
    pub url: String,
    /// Where `/v2/` goes; None answers 502.
    pub registry: Option<SocketAddr>,
    pub client: Client<HttpConnector, Incoming>,
    /// For the stand-in's own requests to the registry (bodiless GETs and HEADs).
    pub plain: Client<HttpConnector, http_body_util::Empty<Bytes>>,
    pub counters: Mutex<Counters>,
    pub faults: Mutex<HashMap<String, Fault>>,
    /// What Harbor holds locally (its proxy cache): manifests and blobs fetched through it.
    pub store: Mutex<crate::store::Store>,
    pub registries_forbidden: AtomicBool,
    /// Harbor behaviours a test turns on or off (see [`Switches`]).
    pub switches: Mutex<Switches>,
    /// Holds every `/api/v2.0/` answer while set (a slow Harbor API).
    pub api_hold: Mutex<Option<crate::Gate>>,
    /// Bumped by `drop_connections`; every connection task watches it.
    pub drop_generation: watch::Sender<u64>,
    /// RFC 3339 time used as creation/update time of every object.
    pub started: String,
}

/// The behaviours a test switches, beyond the per-project faults.
pub(crate) struct Switches {
    /// Harbor no longer accepts the robot (expired, disabled, its secret rotated): anonymous.
    pub robot_refused: bool,
    /// Projects the robot may not pull from.
    pub robot_denied: std::collections::HashSet<String>,
    pub digests: EmptyDigests,
    /// Each proxy project's upstream (absent: [`Upstream::Up`]).
    pub upstreams: HashMap<String, Upstream>,
    /// Tags the upstream has beyond what the registry holds, by (project, repository).
    pub upstream_tags: HashMap<(String, String), Vec<String>>,
    /// Harbor's database (or Redis) fails: `/v2/<project>/…` answers 500.
    pub database_down: bool,
    /// How a blob Harbor has not cached is streamed.
    pub uncached_blobs: UncachedBlobs,
    /// A `docker-hub` project's upstream answers 401 for a repository it does not know.
    pub docker_hub_401s: bool,
    /// Applied one by one, each right after a listing's first page was served.
    pub shifts: std::collections::VecDeque<Shift>,
    /// `/api/v2.0/systeminfo` answers 404 (a proxy in front of Harbor that does not pass it).
    pub systeminfo_hidden: bool,
    /// harbor-core's API is down: `/api/v2.0/` answers 502 from the nginx in front of it.
    pub api_down: bool,
    /// Every `/v2/` answer waits this long first (an upstream's round trips, Harbor's own work).
    pub latency: std::time::Duration,
    /// Until then, connections are closed as soon as they are accepted (Harbor restarting).
    pub down_until: Option<std::time::Instant>,
}

impl Default for Switches {
    /// Harbor as it runs: Docker Hub's 401s on, the other switches off.
    fn default() -> Self {
        Self {
            robot_refused: false,
            robot_denied: Default::default(),
            digests: Default::default(),
            upstreams: Default::default(),
            upstream_tags: Default::default(),
            database_down: false,
            uncached_blobs: Default::default(),
            docker_hub_401s: true,
            shifts: Default::default(),
            systeminfo_hidden: false,
            api_down: false,
            latency: std::time::Duration::ZERO,
            down_until: None,
        }
    }
}

impl State {
    pub fn switches(&self) -> std::sync::MutexGuard<'_, Switches> {
        self.switches.lock().unwrap()
    }

    pub fn store(&self) -> std::sync::MutexGuard<'_, crate::store::Store> {
        self.store.lock().unwrap()
    }

    /// The upstream of `project` (a project without one is never asked: `Up`).
    pub fn upstream(&self, project: &str) -> Upstream {
        self.switches()
            .upstreams
            .get(project)
            .copied()
            .unwrap_or_default()
    }

    /// The project called `name`, if any.
    pub fn project(&self, name: &str) -> Option<ProjectSpec> {
        let projects = self.projects.lock().unwrap();
        projects
            .iter()
            .find(|(_, p)| p.name == name)
            .map(|(_, p)| p.clone())
    }
}

/// The stand-in Harbor API, on its own thread, bound to 127.0.0.1.
pub struct StandIn {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StandIn {
    /// Binds 127.0.0.1:0 and serves. `/v2/` is forwarded to `registry` and tokens are signed with its
    /// keys; without a registry, keys are generated and `/v2/` answers 502.
    pub fn start(config: HarborConfig, registry: Option<&Registry>) -> anyhow::Result<StandIn> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let keys = match registry {
            Some(r) => r.keys().clone(),
            None => {
                let dir = tempfile::tempdir()?;
                TokenKeys::generate(dir.path())?
            }
        };
        Self::start_on(listener, config, keys, registry.map(Registry::addr))
    }

    /// Serves on an already-bound listener (so the registry can be told the realm before we serve).
    pub fn start_on(
        listener: std::net::TcpListener,
        config: HarborConfig,
        keys: TokenKeys,
        registry: Option<SocketAddr>,
    ) -> anyhow::Result<StandIn> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("standin")
            .enable_all()
            .build()?;
        let (client, plain) = {
            let _guard = rt.enter();
            (
                Client::builder(TokioExecutor::new()).build_http(),
                Client::builder(TokioExecutor::new()).build_http(),
            )
        };
        let mut projects: Vec<(i64, ProjectSpec)> = config
            .projects
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, p)| (i as i64 + 1, p))
            .collect();
        projects.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let state = Arc::new(State {
            projects: Mutex::new(projects),
            config,
            auth: Auth::new(keys),
            url: format!("http://{addr}"),
            registry,
            client,
            plain,
            counters: Mutex::new(Counters::default()),
            faults: Mutex::new(HashMap::new()),
            store: Mutex::default(),
            registries_forbidden: AtomicBool::new(false),
            switches: Mutex::default(),
            api_hold: Mutex::new(None),
            drop_generation: watch::channel(0).0,
            started: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)?,
        });
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (tx, rx) = oneshot::channel();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("standin-main".into())
            .spawn(move || {
                rt.block_on(serve(listener, st, rx));
                rt.shutdown_background();
            })?;
        Ok(StandIn {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.state.counters.lock().unwrap().clone()
    }

    /// Injects `fault` into every `/v2/<project>/…` request until cleared.
    pub fn set_fault(&self, project: &str, fault: Fault) {
        self.state
            .faults
            .lock()
            .unwrap()
            .insert(project.to_string(), fault);
    }

    /// Holds every answer of `project` until the returned gate is released (or dropped): see
    /// [`Fault::Hold`].
    pub fn hold(&self, project: &str) -> Held {
        let gate = crate::Gate::new();
        self.set_fault(project, Fault::Hold(gate.clone()));
        Held(gate)
    }

    /// Holds the answers to `project`'s HEAD requests only.
    pub fn hold_heads(&self, project: &str) -> Held {
        let gate = crate::Gate::new();
        self.set_fault(project, Fault::HoldHeads(gate.clone()));
        Held(gate)
    }

    /// Holds every answer of Harbor's API (projects, registries) until the gate is released (or
    /// dropped): a Harbor whose API is slow.
    pub fn hold_api(&self) -> Held {
        let gate = crate::Gate::new();
        *self.state.api_hold.lock().unwrap() = Some(gate.clone());
        Held(gate)
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// Closes every open client connection now (idle keep-alive ones included).
    pub fn drop_connections(&self) {
        self.state.drop_generation.send_modify(|g| *g += 1);
    }

    /// Makes `/api/v2.0/registries/{id}` answer 403, as for a robot lacking that permission.
    pub fn set_registries_forbidden(&self, yes: bool) {
        self.state
            .registries_forbidden
            .store(yes, Ordering::Relaxed);
    }

    /// A redeploy with a new signing key: every token issued so far is refused (Harbor treats the
    /// request as anonymous), new ones are signed with the new key.
    pub fn rotate_signing_key(&self) {
        self.state.auth.rotate().expect("a new signing key");
    }

    /// Every token issued so far is refused from now on (a project deleted and recreated, a core
    /// pod whose clock disagrees), while the key stays.
    pub fn revoke_tokens(&self) {
        self.state.auth.revoke();
    }

    /// Harbor stops accepting the robot's credentials (expired, disabled, secret regenerated): the
    /// robot is anonymous everywhere, as Harbor treats it.
    pub fn set_robot_refused(&self, yes: bool) {
        self.state.switches().robot_refused = yes;
    }

    /// Takes the robot's pull permission on `project` away (or gives it back); tokens already
    /// issued keep what they named.
    pub fn set_robot_denied(&self, project: &str, yes: bool) {
        let mut s = self.state.switches();
        if yes {
            s.robot_denied.insert(project.to_string());
        } else {
            s.robot_denied.remove(project);
        }
    }

    /// When a manifest GET by tag answers with `Docker-Content-Digest: ""` (see [`EmptyDigests`]).
    pub fn set_empty_digests(&self, mode: EmptyDigests) {
        self.state.switches().digests = mode;
    }

    /// Deletes the project called `name` now (its repositories stay in the registry, unreachable
    /// through Harbor, as after a deletion).
    pub fn delete_project(&self, name: &str) {
        self.state
            .projects
            .lock()
            .unwrap()
            .retain(|(_, p)| p.name != name);
    }

    /// Creates a project now, with the next id (a Harbor admin adding a proxy cache).
    pub fn add_project(&self, spec: ProjectSpec) {
        crate::harbor::apply(&self.state, Shift::Create(spec));
    }

    /// harbor-core's API goes down (or comes back): `/api/v2.0/` answers nginx's `502 Bad Gateway`
    /// page while `/v2/` is served, so discovery fails and pulls do not.
    pub fn set_api_down(&self, yes: bool) {
        self.state.switches().api_down = yes;
    }

    /// Every `/v2/` answer waits `latency` first: the round trips to an upstream registry, as a
    /// proxy cache adds them.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.state.switches().latency = latency;
    }

    /// Harbor restarts: every open connection is dropped now, and for `pause` each new one is
    /// closed as soon as it is accepted.
    pub fn restart(&self, pause: std::time::Duration) {
        self.state.switches().down_until = Some(std::time::Instant::now() + pause);
        self.drop_connections();
    }

    /// `/api/v2.0/systeminfo` answers 404 (a front that does not pass it): a reader learns neither
    /// the version nor, from it, whether its credentials are accepted.
    pub fn hide_systeminfo(&self, yes: bool) {
        self.state.switches().systeminfo_hidden = yes;
    }

    /// Sets `project`'s upstream registry (see [`Upstream`]; default `Up`). No effect on a project
    /// that is no proxy cache.
    pub fn set_upstream(&self, project: &str, upstream: Upstream) {
        self.state
            .switches()
            .upstreams
            .insert(project.to_string(), upstream);
    }

    /// Tags the upstream of `project` has for `repo` beyond what the registry holds (`repo` inside
    /// the project, e.g. `library/nginx`; with the project in front it is taken off): a tag list
    /// in `Up` mode merges them in. Replaces the tags set before for that repository.
    pub fn set_upstream_tags(&self, project: &str, repo: &str, tags: Vec<String>) {
        let repo = repo
            .strip_prefix(&format!("{project}/"))
            .unwrap_or(repo)
            .to_string();
        self.state
            .switches()
            .upstream_tags
            .insert((project.to_string(), repo), tags);
    }

    /// Docker Hub's way with a repository it does not know, in `docker-hub` projects: it answers
    /// 401, which Harbor takes for a failure and answers from its local store ("repository R not
    /// found" while it holds nothing of the repository). On by default; off: the upstream's
    /// "not found", `404 "repo R, tag T not found"`, as for every other upstream.
    pub fn set_docker_hub_401s(&self, yes: bool) {
        self.state.switches().docker_hub_401s = yes;
    }

    /// Harbor's database (or Redis) fails: every `/v2/<project>/…` request that passes
    /// authentication answers `500 {"errors":[{"code":"UNKNOWN","message":"internal server
    /// error"}]}`. The token service and `/api/v2.0/` keep answering.
    pub fn set_database_down(&self, yes: bool) {
        self.state.switches().database_down = yes;
    }

    /// How a blob Harbor has not cached yet is streamed (see [`UncachedBlobs`]; default `Chunked`,
    /// Harbor ≤ 2.15; `Framed` is Harbor main).
    pub fn set_uncached_blobs(&self, mode: UncachedBlobs) {
        self.state.switches().uncached_blobs = mode;
    }

    /// What Harbor holds locally now (see [`Cached`]).
    pub fn cached(&self) -> Cached {
        self.state.store().snapshot()
    }

    /// Empties Harbor's local store (its garbage collection or a retention policy removed every
    /// cached manifest and blob): what it served before must come from the upstream again.
    pub fn clear_cache(&self) {
        self.state.store().clear();
    }

    /// Changes the project list once, right after the next listing's first page: pages shift
    /// under a reader that pages through it. Several calls queue several changes, one per
    /// listing.
    pub fn shift_pages(&self, shift: Shift) {
        self.state.switches().shifts.push_back(shift);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        state.counters.lock().unwrap().connections_accepted += 1;
        let restarting = state
            .switches()
            .down_until
            .is_some_and(|t| std::time::Instant::now() < t);
        if restarting {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);

        let mut dropped = state.drop_generation.subscribe();
        let st = state.clone();
        tokio::spawn(async move {
            if opens_with_h2_preface(&stream).await {
                // As nginx without `http2` and Go's net/http (harbor-core) do: an HTTP/1.1 refusal.
                use tokio::io::AsyncWriteExt;
                let mut stream = stream;
                let refusal =
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = stream.write_all(refusal).await;
                let _ = stream.shutdown().await;
                return;
            }
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(dispatch(st, req).await) }
            });
            // HTTP/1.1 only: a client that opens with HTTP/2's preface gets hyper's refusal, as from
            // Harbor's nginx.
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = dropped.changed() => {}
            }
        });
    }
}

/// Whether the client's first bytes are HTTP/2's connection preface (`PRI * HTTP/2.0`). Waits for
/// them without taking them (hyper reads them otherwise).
async fn opens_with_h2_preface(stream: &tokio::net::TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut buf = [0u8; 14];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => return false,
        };
        if buf[..n] != PREFACE[..n] {
            return false;
        }
        if n == PREFACE.len() {
            return true;
        }
        // A prefix of the preface so far: wait for more.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

async fn dispatch(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/v2" || path.starts_with("/v2/") {
        let latency = state.switches().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        return crate::proxy::handle(state, req).await;
    }
    if path == "/service/token" {
        state.counters.lock().unwrap().token_requests += 1;
        return crate::harbor::token(&state, req.uri().query(), req.headers());
    }
    if path == crate::harbor::REGISTRY_REALM_PATH {
        return crate::harbor::registry_token(&state, req.uri().query(), req.headers());
    }
    if path.starts_with("/api/v2.0/") {
        state.counters.lock().unwrap().api_requests += 1;
        let held = state.api_hold.lock().unwrap().clone();
        if let Some(gate) = held {
            gate.pass().await;
        }
        if state.switches().api_down {
            return bad_gateway();
        }
        return crate::harbor::api(&state, &path, req.uri().query(), req.headers());
    }
    harbor_error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found")
}

/// What Harbor's nginx answers while harbor-core is down (its default error page).
fn bad_gateway() -> Response<Body> {
    let page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .header(header::CONTENT_TYPE, "text/html")
        .header(header::CONTENT_LENGTH, page.len())
        .body(full(page))
        .expect("response")
}

/// A complete body.
pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("json");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .body(full(body))
        .expect("response")
}

/// Harbor's (and the registry's) error form: `{"errors":[{"code":…,"message":…}]}`.
pub(crate) fn harbor_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &serde_json::json!({"errors": [{"code": code, "message": message}]}),
    )
}

/// A project's held answers; released when this is released or dropped, so no answer stays held
/// past the test that held it.
pub struct Held(crate::Gate);

impl Held {
    pub fn release(&self) {
        self.0.release();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.release();
    }
}
