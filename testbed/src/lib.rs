//! # testbed — Harbor stand-in + real registry for harbor-router's integration tests
//!
//! A [`StandIn`] reproduces the parts of Harbor's HTTP surface harbor-router talks to (projects and
//! registries API, token service, `/v2/` with Harbor's proxy-cache quirks) in front of a real CNCF
//! distribution registry ([`Registry`], Debian's `docker-registry`) that verifies the stand-in's
//! tokens. [`Testbed`] wires both and seeds images built in Rust and pushed with skopeo.
//!
//! # Layout
//! - `keys.rs`     ES256 signing key, self-signed cert for the registry, libtrust `kid`
//! - `registry.rs` the docker-registry child process: config, readiness, kill on drop
//! - `standin.rs`  the server: runtime thread, HTTP/1.1 only, dispatch, counters, faults, switches
//! - `auth.rs`     who a request is, as Harbor's core decides it: token checks, challenges, rights
//! - `harbor.rs`   `/api/v2.0/projects`, `/registries/{id}`, `/systeminfo`, `/service/token`
//! - `proxy.rs`    `/v2/` forwarding and Harbor's quirks (301, blob HEAD 404, empty digests,
//!   faults), and what a proxy project answers with its upstream up, refused or hanging
//! - `store.rs`    what Harbor holds locally (its proxy cache) and the trimmed multi-arch index
//! - `tags.rs`     tag lists: Harbor's merge of local and upstream tags, its `n`/`last` paging
//! - `blobs.rs`    uncached blobs as Harbor streams them (chunked or framed), with their breaks
//! - `images.rs`   OCI layouts built in Rust, pushed with skopeo
//! - `client.rs`   a tiny blocking HTTP/1.0 client for readiness polls and read-backs

mod auth;
mod blobs;
pub mod client;
pub mod containerd;
mod harbor;
pub mod images;
pub mod keys;
mod proxy;
pub mod redis;
pub mod registry;
mod standin;
mod store;
mod tags;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;

pub use images::{SeedImage, SeedKind, Seeded};
pub use keys::TokenKeys;
pub use registry::Registry;
pub use standin::{Held, StandIn};

/// Admin credentials: the token service grants them pull and push (used by seeding).
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "Harbor12345";
/// Default robot credentials (also the demo binary's defaults).
pub const DEFAULT_ROBOT_USER: &str = "robot$router";
pub const DEFAULT_ROBOT_PASSWORD: &str = "router-secret";

/// One project as the stand-in reports it.
#[derive(Debug, Clone)]
pub struct ProjectSpec {
    pub name: String,
    pub public: bool,
    /// Some => a proxy-cache project (`registry_id` > 0).
    pub registry: Option<RegistrySpec>,
}

/// The upstream registry of a proxy-cache project (`/api/v2.0/registries/{id}`).
#[derive(Debug, Clone)]
pub struct RegistrySpec {
    pub id: i64,
    pub name: String,
    /// "docker-hub", "github-ghcr", "quay", "docker-registry"
    pub kind: String,
    pub url: String,
}

/// What the stand-in serves.
#[derive(Debug, Clone)]
pub struct HarborConfig {
    /// project_id = index + 1
    pub projects: Vec<ProjectSpec>,
    /// Basic credentials the API and token service accept as the robot.
    pub robot: Option<(String, String)>,
    /// `expires_in` of issued tokens.
    pub token_ttl: Duration,
    /// `harbor_version` in `/api/v2.0/systeminfo` (shown to authenticated callers only).
    pub version: String,
}

/// Harbor's version the stand-in reports by default.
pub const DEFAULT_VERSION: &str = "v2.14.0-8f7ab1c2";

impl Default for HarborConfig {
    fn default() -> Self {
        HarborConfig {
            projects: default_projects(),
            robot: Some((
                DEFAULT_ROBOT_USER.to_string(),
                DEFAULT_ROBOT_PASSWORD.to_string(),
            )),
            token_ttl: Duration::from_secs(30 * 60),
            version: DEFAULT_VERSION.to_string(),
        }
    }
}

/// A fault injected into `/v2/<project>/…` requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Hold every answer (but a 401 challenge, so a client can fetch its token) until the gate is
    /// released: tests order events with it instead of delays. See [`StandIn::hold`].
    Hold(Gate),
    /// Like `Hold`, for the answers to HEAD requests only.
    HoldHeads(Gate),
    /// Answer this status with a registry-style JSON error (429 adds `Retry-After: 7`).
    Status(u16),
    /// Never answer (until the connection closes).
    Hang,
    /// Blob GETs: send the headers and half the body, then close the connection.
    ResetMidBody,
    /// Blob requests: answer `307 Temporary Redirect` to this URL, as Harbor does with object
    /// storage (a presigned URL on another host). Other requests are served normally.
    RedirectBlobs(String),
    /// The inner fault, for manifests by tag only (Harbor's tag lookups need the upstream; what it
    /// holds by digest it serves from its own store).
    TagLookups(Box<Fault>),
    /// Manifest GETs are refused by the project's vulnerability policy: `412
    /// PROJECTPOLICYVIOLATION` (`src/server/middleware/vulnerable/vulnerable.go`); HEADs and blobs
    /// pass.
    Policy,
    /// The upstream breaks while Harbor streams a blob it has not cached: half the blob is sent,
    /// then, as [`UncachedBlobs::Chunked`] (Harbor ≤ 2.15), Harbor's error JSON
    /// `{"errors":[{"code":"UNKNOWN","message":"internal server error"}]}` is appended and the body
    /// ends cleanly; as [`UncachedBlobs::Framed`] (Harbor main) the connection is closed short of
    /// the announced length. The blob stays uncached. Cached blobs and other requests pass.
    BreakUncached,
}

/// A proxy project's upstream registry as Harbor meets it (`repoproxy/proxy.go`, `canProxy`,
/// `handleManifest`, `handleBlob`; `repoproxy/tag.go`). What Harbor holds locally is what was
/// fetched through the stand-in (see [`Cached`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Upstream {
    /// Answers. A manifest it does not have is Harbor's `404 NOT_FOUND "repo <project>/<repo>,
    /// tag <tag> not found"` (tag part empty for a digest); with
    /// [`StandIn::set_docker_hub_401s`], a `docker-hub` project's repository the upstream does not
    /// know at all is answered from the local store, as with `Refused` (Docker Hub answers 401 for
    /// it). Tag lists merge local and upstream tags.
    #[default]
    Up,
    /// Cannot be asked and says so at once (Harbor marked it unhealthy, or its connections are
    /// refused): everything is answered from the local store, with Harbor's 404s for what it
    /// lacks (`artifact <repo>:<tag> not found`, `artifact <repo>@<digest> not found`,
    /// `repository <repo> not found`, `BLOB_UNKNOWN`); a tag list holds the local tags only.
    Refused,
    /// Hangs, and Harbor waits: whatever needs the upstream (a manifest by tag, which Harbor
    /// always checks upstream first; a manifest by digest or a blob not cached; every tag list)
    /// never answers. Manifests cached by digest and cached blobs are served.
    Hanging,
}

/// How Harbor streams a blob it has not cached yet (`repoproxy/proxy.go`, `handleBlob`,
/// `serveBlob`): always `200` with the whole blob (a `Range` is not passed on), `Content-Type`
/// sniffed by Go's `net/http` from the first bytes (`application/x-gzip` for a gzip'd layer,
/// `text/plain; charset=utf-8` for a JSON config).
///
/// The default is `Chunked`, as [`DEFAULT_VERSION`] is a v2.14.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UncachedBlobs {
    /// Harbor ≤ 2.15: the blob is written before the headers are set, so the answer is chunked,
    /// with no `Content-Length`, `Docker-Content-Digest` or `Etag` (Go's server still frames an
    /// answer of at most 2048 bytes with a `Content-Length`, as it buffers that much).
    #[default]
    Chunked,
    /// Harbor main: `Content-Length`, `Docker-Content-Digest` and `Etag` (the digest) are set
    /// before streaming; a break leaves the body short and the connection closed.
    Framed,
}

/// What Harbor holds locally (its proxy cache), as fetched through the stand-in (snapshot of
/// [`StandIn::cached`]). Repository names are inside the project (`library/nginx`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cached {
    /// `(project, repository, tag)` fetched with a successful GET → the digest it resolved to.
    pub tags: BTreeMap<(String, String, String), String>,
    /// `(project, repository, digest)` held by digest: manifests fetched by tag or digest (an
    /// index's own digest aside) and the trimmed indexes served.
    pub manifests: BTreeSet<(String, String, String)>,
    /// `(project, digest)` of blobs fetched with a GET.
    pub blobs: BTreeSet<(String, String)>,
}

/// When Harbor answers a manifest GET by tag with `Docker-Content-Digest: ""` and `Etag: ""`: it
/// does whenever it fetches the manifest from the upstream (`repoproxy/proxy.go`,
/// `proxyManifestGet`, which sets the headers from the request's digest, empty for a tag); a tag
/// it holds locally at the upstream's digest comes from its registry with the real one. A HEAD
/// always carries the real digest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EmptyDigests {
    /// The first GET of each (project, repository, tag): fetched upstream, then held (Harbor's way).
    #[default]
    FirstFetch,
    /// Every GET by tag (the tag moves upstream between pulls).
    Always,
    /// Never (a Harbor that already holds everything).
    Never,
}

/// A change to the project list while a reader pages through it (Harbor counts and lists in
/// separate queries, sorted by name: a project created before a page shifts later ones down, one
/// deleted shifts them up).
#[derive(Debug, Clone)]
pub enum Shift {
    /// A project is created (it gets the next id).
    Create(ProjectSpec),
    /// The project of this name is deleted.
    Delete(String),
}

/// A gate for [`Fault::Hold`]: closed until released, then open for good.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(tokio::sync::watch::channel(false).0))
    }

    /// Lets every held answer (and every later one) through.
    pub fn release(&self) {
        self.0.send_replace(true);
    }

    pub(crate) async fn pass(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Gate) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Gate {}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate(released: {})", *self.0.borrow())
    }
}

/// What the stand-in has seen (snapshot).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub token_requests: u64,
    /// `/api/v2.0/*`
    pub api_requests: u64,
    /// By project name (first path segment after `/v2/`); requests answered 401 (challenges) are not
    /// counted, so a client's count does not depend on its token state.
    pub v2_requests: BTreeMap<String, u64>,
    pub manifest_requests: BTreeMap<String, u64>,
    /// By project: answers sent to `/v2/` requests, 401 challenges aside (a held answer counts once
    /// it is released).
    pub answered: BTreeMap<String, u64>,
    pub connections_accepted: u64,
    /// Every distinct `Authorization` value seen on `/v2/` requests (tests check what leaked).
    pub authorizations: std::collections::BTreeSet<String>,
    /// Every distinct `X-Request-Id` seen on `/v2/` requests (challenged ones included).
    pub request_ids: std::collections::BTreeSet<String>,
    /// Every distinct query string seen on `/v2/` requests.
    pub queries: std::collections::BTreeSet<String>,
    /// `/v2/` requests refused although they carried `Authorization` (a token Harbor no longer
    /// accepts, or one without the project): answered `401 Basic realm="harbor"`.
    pub refused: u64,
    /// `/api/v2.0/systeminfo` requests.
    pub systeminfo_requests: u64,
    /// Project list pages served.
    pub project_pages: u64,
    /// By project: `tags/list` requests (401 challenges aside).
    pub tag_list_requests: BTreeMap<String, u64>,
}

fn proxy(name: &str, id: i64, kind: &str, url: &str) -> ProjectSpec {
    ProjectSpec {
        name: name.to_string(),
        public: true,
        registry: Some(RegistrySpec {
            id,
            name: format!("{name}-upstream"),
            kind: kind.to_string(),
            url: url.to_string(),
        }),
    }
}

/// dockerhub, ghcr, quay, k8s proxy-cache projects and the non-proxy public `library-local`. ghcr
/// and quay are private, as proxy caches pulled by a robot account often are: only the robot's
/// token may pull from them, so a token Harbor stops accepting shows.
pub fn default_projects() -> Vec<ProjectSpec> {
    let private = |p: ProjectSpec| ProjectSpec { public: false, ..p };
    vec![
        proxy("dockerhub", 1, "docker-hub", "https://hub.docker.com"),
        private(proxy("ghcr", 2, "github-ghcr", "https://ghcr.io")),
        private(proxy("quay", 3, "quay", "https://quay.io")),
        proxy("k8s", 4, "docker-registry", "https://registry.k8s.io"),
        ProjectSpec {
            name: "library-local".to_string(),
            public: true,
            registry: None,
        },
    ]
}

/// One image of each kind across the default proxy projects.
pub fn default_images() -> Vec<SeedImage> {
    let img = |repository: &str, tag: &str, kind| SeedImage {
        repository: repository.to_string(),
        tag: tag.to_string(),
        kind,
        layer_bytes: 64 * 1024,
    };
    vec![
        img("dockerhub/library/nginx", "latest", SeedKind::OciIndex),
        img(
            "dockerhub/library/alpine",
            "3.19",
            SeedKind::DockerManifestList,
        ),
        img("ghcr/org/app", "v1", SeedKind::OciManifest),
        img("quay/coreos/etcd", "v3.5.0", SeedKind::DockerSchema2),
        img("k8s/pause", "3.9", SeedKind::DockerSchema2),
    ]
}

/// Basic `Authorization` value for `user:password`.
pub fn basic_auth(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Keys, registry (realm = the stand-in's `/service/token`) and the stand-in forwarding `/v2/` to it.
pub struct Testbed {
    pub harbor: StandIn,
    pub registry: Registry,
    /// Keys and certificate; removed after the stand-in and the registry are gone.
    _dir: tempfile::TempDir,
}

impl Testbed {
    /// Binds the stand-in first (so the registry learns its realm), starts the registry, serves.
    pub fn start(config: HarborConfig) -> anyhow::Result<Testbed> {
        let dir = tempfile::Builder::new().prefix("testbed-").tempdir()?;
        let keys = TokenKeys::generate(dir.path())?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        // The registry's own realm: Harbor's registry trusts Harbor's core, not the tokens clients
        // get (those are checked by the stand-in, whose signing key a test may rotate).
        let realm = format!(
            "http://{}{}",
            listener.local_addr()?,
            harbor::REGISTRY_REALM_PATH
        );
        let registry = Registry::start(&keys, &realm)?;
        let harbor = StandIn::start_on(listener, config, keys, Some(registry.addr()))?;
        Ok(Testbed {
            harbor,
            registry,
            _dir: dir,
        })
    }

    /// A token the registry behind the stand-in accepts, for `scopes` (e.g.
    /// `repository:ghcr/org/app:pull`), as `creds` (None = anonymous): from the registry's own realm.
    pub fn token(&self, creds: Option<(&str, &str)>, scopes: &[&str]) -> anyhow::Result<String> {
        let mut path = format!(
            "{}?service={}",
            harbor::REGISTRY_REALM_PATH,
            registry::SERVICE
        );
        for s in scopes {
            path.push_str(&format!("&scope={s}"));
        }
        let auth = creds.map(|(u, p)| basic_auth(u, p));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let resp = client::get(self.harbor.addr(), &path, &headers)?;
        anyhow::ensure!(resp.status == 200, "token request: {}", resp.status);
        let v: serde_json::Value = serde_json::from_slice(&resp.body)?;
        Ok(v["token"].as_str().context("no token")?.to_string())
    }

    /// Builds each image and pushes it (in parallel) with the admin credentials; reads back the digest.
    pub fn seed(&self, images: &[SeedImage]) -> anyhow::Result<Vec<Seeded>> {
        let work = tempfile::Builder::new().prefix("testbed-seed-").tempdir()?;
        let creds = format!("{ADMIN_USER}:{ADMIN_PASSWORD}");
        let built: Vec<anyhow::Result<images::Built>> = std::thread::scope(|s| {
            let handles: Vec<_> = images
                .iter()
                .enumerate()
                .map(|(i, image)| {
                    let dir = work.path().join(format!("layout-{i}"));
                    let creds = &creds;
                    s.spawn(move || {
                        let built = images::build_layout(&dir, image)?;
                        images::push(&built, image, self.registry.addr(), creds)?;
                        Ok(built)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("seed thread panicked"))
                .collect()
        });
        images
            .iter()
            .zip(built)
            .map(|(image, built)| {
                let built = built?;
                let scope = format!("repository:{}:pull", image.repository);
                let token = self.token(Some((ADMIN_USER, ADMIN_PASSWORD)), &[&scope])?;
                let bearer = format!("Bearer {token}");
                let mut headers = vec![("Authorization", bearer.as_str())];
                headers.extend(images::ALL_MANIFEST_TYPES.iter().map(|t| ("Accept", *t)));
                let path = format!("/v2/{}/manifests/{}", image.repository, image.tag);
                let resp = client::get(self.registry.addr(), &path, &headers)?;
                anyhow::ensure!(
                    resp.status == 200,
                    "read back {path}: {} {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                );
                let digest = resp
                    .header("docker-content-digest")
                    .context("no Docker-Content-Digest")?;
                anyhow::ensure!(
                    digest == built.digest,
                    "{path}: registry reports {digest}, built {}",
                    built.digest
                );
                Ok(Seeded {
                    repository: image.repository.clone(),
                    tag: image.tag.clone(),
                    digest: digest.to_string(),
                    media_type: resp.header("content-type").unwrap_or_default().to_string(),
                    blobs: built.blobs,
                })
            })
            .collect()
    }
}
