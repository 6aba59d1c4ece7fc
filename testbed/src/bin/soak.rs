//! `soak`: hours of production in minutes. Two router pods sharing Redis Sentinel, in front of the
//! stand-in Harbor (answering as Harbor does, with an upstream's latency) and the real registry; a
//! steady mixed workload from many client addresses through a small balancer that sends each new
//! connection to a ready pod (as a Service does) and connects from the client's own address (as
//! kube-proxy keeps it); faults on a schedule, each several times. Written for bench/soak.sh, which
//! documents the options; the fault table and the criteria are in docs/reliability.md.
//!
//! Its last line is always `soak: <requests> requests, <unexpected> unexpected failures, rss slope
//! <x> KiB/min, fd slope <y>/min, <faults> faults`; it exits 1 when an unexpected failure happened
//! or (not with --smoke) a slope exceeds its bound.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use testbed::redis::RedisSet;
use testbed::{HarborConfig, ProjectSpec, RegistrySpec, SeedImage, SeedKind, Testbed, Upstream};

/// Bounds the run is judged by (docs/reliability.md): growth after warm-up, per minute.
const RSS_SLOPE_MAX_KIB: f64 = 512.0;
const FD_SLOPE_MAX: f64 = 1.0;
/// The project whose upstream goes away, and the one the images of the added projects are in.
const FLAKY_PROJECT: &str = "quay";
/// How long after a fault ends a failure it explains is still its own (retries, caches).
const GRACE: Duration = Duration::from_secs(15);
/// The router's discovery interval in the soak (a project added is seen within it).
const DISCOVERY: Duration = Duration::from_secs(10);
/// Attempts per request and the wait before each retry (kubelet backs off the same way, slower).
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

struct Args {
    router: PathBuf,
    minutes: f64,
    smoke: bool,
    out: Option<PathBuf>,
    clients: usize,
    rate: f64,
    latency: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        router: PathBuf::new(),
        minutes: 30.0,
        smoke: false,
        out: None,
        clients: 40,
        rate: 4.0,
        latency: Duration::from_millis(20),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--router" => a.router = v()?.into(),
            "--minutes" => a.minutes = v()?.parse()?,
            "--smoke" => a.smoke = true,
            "--out" => a.out = Some(v()?.into()),
            "--clients" => a.clients = v()?.parse()?,
            "--rate" => a.rate = v()?.parse()?,
            "--latency-ms" => a.latency = Duration::from_millis(v()?.parse()?),
            other => bail!("unknown option {other}"),
        }
    }
    if a.router.as_os_str().is_empty() {
        bail!("--router PATH is required");
    }
    if a.smoke && a.minutes == 30.0 {
        a.minutes = 1.5;
    }
    Ok(a)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

// ------------------------------------------------------------------------------- what is asked

/// What a client request asks for; each kind has the answer it expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    TagHead,
    TagGet,
    Digest,
    Blob,
    SlowBlob,
    Cold,
    Random,
    Mirror,
    TagList,
    Added,
    Removed,
    Storm,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::TagHead => "tag-head",
            Kind::TagGet => "tag-get",
            Kind::Digest => "digest",
            Kind::Blob => "blob",
            Kind::SlowBlob => "slow-blob",
            Kind::Cold => "cold",
            Kind::Random => "random",
            Kind::Mirror => "mirror",
            Kind::TagList => "tag-list",
            Kind::Added => "added-project",
            Kind::Removed => "removed-project",
            Kind::Storm => "storm",
        }
    }
}

/// One request: what, where, and what a right answer is.
#[derive(Clone, Debug)]
struct Ask {
    kind: Kind,
    method: &'static str,
    path: String,
    /// Statuses that are right for it.
    want: &'static [u16],
    /// The body must hash to this digest.
    digest: Option<String>,
    /// The project the answer depends on, when one does.
    project: Option<String>,
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The images the workload pulls.
struct Catalog {
    known: Vec<testbed::Seeded>,
    big: testbed::Seeded,
    /// Names no client asked for yet, by project; drawn once each (then they are warm).
    cold: Mutex<Vec<(String, String)>>,
    /// Added projects' images (project, repository), asked once the project exists.
    added: Mutex<Vec<(String, String)>>,
    /// Images of removed projects, asked now and then: 404 (or 200 until discovery sees it).
    removed: Mutex<Vec<(String, String)>>,
}

fn repo_in(repository: &str) -> &str {
    repository.split_once('/').map_or(repository, |(_, r)| r)
}

fn project_of(repository: &str) -> String {
    repository.split('/').next().unwrap_or("").to_string()
}

/// A HEAD of tag `v1` of a seeded `repository` (`project/name`), as its kind expects it answered.
fn seeded_v1(kind: Kind, want: &'static [u16], project: &str, repository: &str) -> Ask {
    Ask {
        kind,
        method: "HEAD",
        path: format!("/v2/proxy/{}/manifests/v1", repo_in(repository)),
        want,
        digest: None,
        project: Some(project.to_string()),
    }
}

impl Catalog {
    fn pick(&self, rng: &mut impl Rng) -> Ask {
        let img = &self.known[rng.gen_range(0..self.known.len())];
        let name = repo_in(&img.repository).to_string();
        let project = Some(project_of(&img.repository));
        let roll = rng.gen_range(0..100);
        let ask = |kind, method, path: String, want, digest| Ask {
            kind,
            method,
            path,
            want,
            digest,
            project: project.clone(),
        };
        let tag_head = || {
            ask(
                Kind::TagHead,
                "HEAD",
                format!("/v2/proxy/{name}/manifests/{}", img.tag),
                &[200],
                None,
            )
        };
        match roll {
            0..=29 => tag_head(),
            30..=39 => ask(
                Kind::TagGet,
                "GET",
                format!("/v2/proxy/{name}/manifests/{}", img.tag),
                &[200],
                None,
            ),
            40..=56 => ask(
                Kind::Digest,
                "GET",
                format!("/v2/proxy/{name}/manifests/{}", img.digest),
                &[200],
                Some(img.digest.clone()),
            ),
            57..=71 => {
                let blob = &img.blobs[rng.gen_range(0..img.blobs.len())];
                ask(
                    Kind::Blob,
                    "GET",
                    format!("/v2/proxy/{name}/blobs/{blob}"),
                    &[200],
                    Some(blob.clone()),
                )
            }
            72..=80 => {
                // containerd as a mirror client: the upstream registry in ?ns=, the name as the
                // upstream knows it (Docker Hub's `library/` kept).
                let hub: Vec<_> = self
                    .known
                    .iter()
                    .filter(|i| i.repository.starts_with("dockerhub/"))
                    .collect();
                let img = hub[rng.gen_range(0..hub.len())];
                Ask {
                    kind: Kind::Mirror,
                    method: "HEAD",
                    path: format!(
                        "/v2/{}/manifests/{}?ns=docker.io",
                        repo_in(&img.repository),
                        img.tag
                    ),
                    want: &[200],
                    digest: None,
                    project: Some("dockerhub".into()),
                }
            }
            81..=85 => ask(
                Kind::TagList,
                "GET",
                format!("/v2/proxy/{name}/tags/list"),
                &[200],
                None,
            ),
            86..=91 => {
                let drawn = self.cold.lock().unwrap().pop();
                match drawn {
                    Some((project, repository)) => {
                        seeded_v1(Kind::Cold, &[200], &project, &repository)
                    }
                    None => tag_head(),
                }
            }
            92..=96 => Ask {
                kind: Kind::Random,
                method: "HEAD",
                path: format!("/v2/proxy/nobody/x{:016x}/manifests/v1", rng.gen::<u64>()),
                want: &[404],
                digest: None,
                project: None,
            },
            _ => {
                let added = self.added.lock().unwrap().clone();
                let removed = self.removed.lock().unwrap().clone();
                if !removed.is_empty() && rng.gen_bool(0.3) {
                    let (project, repository) = &removed[rng.gen_range(0..removed.len())];
                    return seeded_v1(Kind::Removed, &[404], project, repository);
                }
                match added.get(rng.gen_range(0..added.len().max(1))) {
                    Some((project, repository)) => {
                        seeded_v1(Kind::Added, &[200], project, repository)
                    }
                    None => tag_head(),
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------- outcomes

/// How one attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    Ok,
    /// A status not wanted.
    Status(u16),
    /// The body does not hash to its digest.
    Digest,
    Connect,
    Timeout,
}

impl Attempt {
    fn cause(&self) -> String {
        match self {
            Attempt::Ok => "ok".into(),
            Attempt::Status(s) => format!("status {s}"),
            Attempt::Digest => "digest mismatch".into(),
            Attempt::Connect => "connection".into(),
            Attempt::Timeout => "timeout".into(),
        }
    }

    /// Worth another try (kubelet retries anything; a wrong 404 or a bad body it retries too, but
    /// those are what the soak looks for).
    fn retried(&self) -> bool {
        matches!(
            self,
            Attempt::Connect | Attempt::Timeout | Attempt::Status(429 | 500..=599)
        )
    }
}

/// A fault, while it is on and for [`GRACE`] after, explains some failures.
#[derive(Clone, Debug)]
struct Window {
    fault: &'static str,
    start: f64,
    end: Option<f64>,
    /// Recovery time, seconds after the fault ended, when measured.
    recovery: Option<f64>,
    detail: String,
}

/// Whether the fault `w` explains `cause` for `ask` (docs/reliability.md, the fault table).
fn explains(w: &Window, ask: &Ask, cause: &Attempt) -> bool {
    let server_side = matches!(
        cause,
        Attempt::Connect | Attempt::Timeout | Attempt::Status(500..=599)
    );
    match w.fault {
        // Every connection reset, new ones refused for a while: anything Harbor must answer.
        "harbor-restart" => server_side,
        // Harbor serves only what it cached: a name it never fetched is its 404, or the
        // router's 503 when its answer could be an outage.
        "upstream-unreachable" => {
            ask.project.as_deref() == Some(FLAKY_PROJECT)
                && matches!(
                    ask.kind,
                    Kind::Cold | Kind::TagList | Kind::Blob | Kind::Digest
                )
                && (matches!(cause, Attempt::Status(404)) || server_side)
        }
        // A project added is found by the next discovery; one removed by the one after.
        "projects" => matches!(ask.kind, Kind::Added) && matches!(cause, Attempt::Status(404)),
        _ => false,
    }
}

#[derive(Default)]
struct Minute {
    requests: u64,
    retried: u64,
    latencies_ms: Vec<f64>,
    explained: BTreeMap<String, u64>,
    unexpected: BTreeMap<String, u64>,
    storm: BTreeMap<u16, u64>,
    rss_kib: BTreeMap<String, u64>,
    fds: BTreeMap<String, u64>,
    upstream_requests: u64,
    redis: BTreeMap<String, String>,
}

struct Stats {
    started: Instant,
    minutes: Mutex<Vec<Minute>>,
    windows: Mutex<Vec<Window>>,
    unexpected_samples: Mutex<Vec<serde_json::Value>>,
    requests: AtomicU64,
    unexpected: AtomicU64,
    /// Removed projects: when each went (a 200 for its images is right until discovery runs).
    removed_at: Mutex<BTreeMap<String, f64>>,
}

impl Stats {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn minute(&self, t: f64) -> std::sync::MutexGuard<'_, Vec<Minute>> {
        let mut m = self.minutes.lock().unwrap();
        let i = (t / 60.0) as usize;
        while m.len() <= i {
            m.push(Minute::default());
        }
        m
    }

    fn record(&self, ask: &Ask, t0: f64, took_ms: f64, retries: u64, last: &Attempt, path: &str) {
        let t1 = self.now();
        let i = (t0 / 60.0) as usize;
        if ask.kind == Kind::Storm {
            if let Attempt::Status(s) = last {
                *self.minute(t0)[i].storm.entry(*s).or_default() += 1;
            } else {
                *self.minute(t0)[i].storm.entry(0).or_default() += 1;
            }
            return;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let verdict = match last {
            Attempt::Ok => None,
            cause => {
                // A removed project's image may still answer 200 until discovery has run.
                let early = ask.kind == Kind::Removed
                    && *cause == Attempt::Status(200)
                    && ask.project.as_ref().is_some_and(|p| {
                        self.removed_at.lock().unwrap().get(p).is_some_and(|at| {
                            t0 < at + DISCOVERY.as_secs_f64() + GRACE.as_secs_f64()
                        })
                    });
                let windows = self.windows.lock().unwrap();
                let explained = early
                    || windows.iter().any(|w| {
                        let end = w.end.unwrap_or(f64::MAX) + GRACE.as_secs_f64();
                        t1 >= w.start && t0 <= end && explains(w, ask, cause)
                    });
                Some((explained, format!("{} {}", ask.kind.name(), cause.cause())))
            }
        };
        let mut m = self.minute(t0);
        let m = &mut m[i];
        m.requests += 1;
        m.retried += retries;
        m.latencies_ms.push(took_ms);
        match verdict {
            None => {}
            Some((true, cause)) => *m.explained.entry(cause).or_default() += 1,
            Some((false, cause)) => {
                *m.unexpected.entry(cause.clone()).or_default() += 1;
                self.unexpected.fetch_add(1, Ordering::Relaxed);
                let mut s = self.unexpected_samples.lock().unwrap();
                if s.len() < 50 {
                    s.push(serde_json::json!({"t": t0, "cause": cause, "path": path}));
                }
            }
        }
    }

    fn open(&self, fault: &'static str, detail: String) -> usize {
        let mut w = self.windows.lock().unwrap();
        log(format!("fault {fault} ({detail}) at {:.0}s", self.now()));
        w.push(Window {
            fault,
            start: self.now(),
            end: None,
            recovery: None,
            detail,
        });
        w.len() - 1
    }

    fn close(&self, i: usize) {
        self.windows.lock().unwrap()[i].end = Some(self.now());
    }

    fn recovered(&self, i: usize, after: f64) {
        let mut w = self.windows.lock().unwrap();
        log(format!("  {} recovered in {after:.2}s", w[i].fault));
        w[i].recovery = Some(after);
    }
}

// ------------------------------------------------------------------------------- pods

struct Pod {
    name: String,
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    /// Incarnation (a restart makes a new one).
    generation: u32,
}

struct Pods {
    router: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    pods: Mutex<Vec<Option<Pod>>>,
    /// Where the balancer may send new connections: each pod's address while it is ready.
    ready: Mutex<Vec<Option<SocketAddr>>>,
}

impl Pods {
    fn start(&self, i: usize, generation: u32) -> anyhow::Result<()> {
        let name = format!("pod-{}", (b'a' + i as u8) as char);
        let log_path = self.dir.join(format!("{name}-{generation}.log"));
        let mut cmd = Command::new(&self.router);
        cmd.env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(
                self.dir.join(format!("{name}-{generation}.stderr")),
            )?);
        let mut child = cmd.spawn().context("start the router")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let file = std::fs::File::create(&log_path)?;
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::io::BufWriter::new(file);
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains(r#""message":"listening""#) {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                let _ = writeln!(file, "{line}");
                let _ = file.flush();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).with_context(|| {
            format!("{name} did not say listening (see {})", log_path.display())
        })?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let addr: SocketAddr = v["addr"].as_str().context("addr")?.parse()?;
        let metrics: SocketAddr = v["metrics_addr"]
            .as_str()
            .context("metrics_addr")?
            .parse()?;
        self.pods.lock().unwrap()[i] = Some(Pod {
            name,
            child,
            addr,
            metrics,
            generation,
        });
        Ok(())
    }

    fn each(&self) -> Vec<(usize, String, SocketAddr, SocketAddr, u32)> {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                p.as_ref()
                    .map(|p| (i, p.name.clone(), p.addr, p.metrics, p.child.id()))
            })
            .collect()
    }

    fn wait_ready(&self, i: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let metrics = self.pods.lock().unwrap()[i].as_ref().map(|p| p.metrics);
            if let Some(m) = metrics {
                if get(m, "/readyz").is_ok_and(|(s, _)| s == 200) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("pod {i} not ready within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for the exit (the drain).
    fn stop(&self, i: usize) -> anyhow::Result<u32> {
        let pod = self.pods.lock().unwrap()[i].take();
        let Some(mut pod) = pod else {
            bail!("pod {i} is not running")
        };
        unsafe_kill(pod.child.id(), "TERM");
        let status = pod.child.wait()?;
        if !status.success() {
            bail!("{} exited with {status} after SIGTERM", pod.name);
        }
        Ok(pod.generation)
    }

    fn stop_all(&self) {
        for p in self.pods.lock().unwrap().iter_mut().flatten() {
            unsafe_kill(p.child.id(), "TERM");
            let _ = p.child.wait();
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A blocking GET on loopback: status and body.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

fn scrape(metrics: SocketAddr) -> BTreeMap<String, f64> {
    let Ok((200, text)) = get(metrics, "/metrics") else {
        return BTreeMap::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

// ------------------------------------------------------------------------------- the balancer

/// Accepts client connections and pipes each to a ready pod (round robin), connecting from the
/// client's own address so the router sees it (as kube-proxy's DNAT keeps it).
async fn balance(listener: tokio::net::TcpListener, pods: Arc<Pods>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut inbound, peer)) = listener.accept().await else {
            continue;
        };
        let (pods, next) = (pods.clone(), next.clone());
        tokio::spawn(async move {
            let ready: Vec<SocketAddr> = pods
                .ready
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .copied()
                .collect();
            if ready.is_empty() {
                return; // no endpoint: the connection closes, as with a Service without one
            }
            let to = ready[next.fetch_add(1, Ordering::Relaxed) % ready.len()];
            let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                return;
            };
            if socket.bind(SocketAddr::new(peer.ip(), 0)).is_err() {
                return;
            }
            let Ok(mut outbound) = socket.connect(to).await else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

/// Keeps `pods.ready` to the pods whose `/readyz` (on the metrics port) answers 200.
fn watch_readiness(pods: Arc<Pods>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let each = pods.each();
        let mut ready = vec![None; pods.ready.lock().unwrap().len()];
        for (i, _, addr, metrics, _) in each {
            if get(metrics, "/readyz").is_ok_and(|(s, _)| s == 200) {
                ready[i] = Some(addr);
            }
        }
        *pods.ready.lock().unwrap() = ready;
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ------------------------------------------------------------------------------- clients

type Http = Client<HttpConnector, Empty<Bytes>>;

fn client_from(ip: Ipv4Addr) -> Http {
    let mut c = HttpConnector::new();
    c.set_local_address(Some(IpAddr::V4(ip)));
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(c)
}

/// One attempt; a slow reader takes `slow` between frames.
async fn attempt(http: &Http, lb: SocketAddr, ask: &Ask, slow: Option<Duration>) -> Attempt {
    let req = http::Request::builder()
        .method(ask.method)
        .uri(format!("http://{lb}{}", ask.path))
        .header("accept", ACCEPT)
        .body(Empty::new())
        .expect("request");
    let limit = if slow.is_some() { 120 } else { 30 };
    let run = async {
        let res = match http.request(req).await {
            Ok(r) => r,
            Err(_) => return Attempt::Connect,
        };
        let status = res.status().as_u16();
        let mut body = res.into_body();
        let mut hash = Sha256::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        hash.update(d);
                    }
                }
                Err(_) => return Attempt::Connect,
            }
            if let Some(d) = slow {
                tokio::time::sleep(d).await;
            }
        }
        if !ask.want.contains(&status) {
            return Attempt::Status(status);
        }
        if let (Some(digest), 200) = (&ask.digest, status) {
            if ask.method == "GET" && format!("sha256:{:x}", hash.finalize()) != *digest {
                return Attempt::Digest;
            }
        }
        Attempt::Ok
    };
    match tokio::time::timeout(Duration::from_secs(limit), run).await {
        Ok(a) => a,
        Err(_) => Attempt::Timeout,
    }
}

/// Asks, retrying as kubelet does; records the outcome.
async fn ask_and_record(
    http: &Http,
    lb: SocketAddr,
    ask: &Ask,
    stats: &Stats,
    slow: Option<Duration>,
) {
    let t0 = stats.now();
    let started = Instant::now();
    let mut last = attempt(http, lb, ask, slow).await;
    let mut retries = 0;
    for wait in BACKOFF {
        if !last.retried() || ask.kind == Kind::Storm {
            break;
        }
        tokio::time::sleep(wait).await;
        retries += 1;
        last = attempt(http, lb, ask, slow).await;
    }
    let took = started.elapsed().as_secs_f64() * 1000.0;
    stats.record(ask, t0, took, retries, &last, &ask.path);
}

async fn node(
    ip: Ipv4Addr,
    lb: SocketAddr,
    catalog: Arc<Catalog>,
    stats: Arc<Stats>,
    rate: f64,
    stop: Arc<AtomicBool>,
    burst: Arc<tokio::sync::Notify>,
) {
    let http = client_from(ip);
    let mut rng = rand::rngs::StdRng::from_entropy();
    while !stop.load(Ordering::Relaxed) {
        let ask = catalog.pick(&mut rng);
        ask_and_record(&http, lb, &ask, &stats, None).await;
        // Poisson arrivals at `rate` per second, or at once when a burst is called.
        let wait = -rng.gen_range(f64::EPSILON..1.0f64).ln() / rate;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(wait.min(5.0))) => {}
            _ = burst.notified() => {}
        }
    }
}

/// A node that reads a big layer at 256 KiB/s, again and again.
async fn slow_reader(
    ip: Ipv4Addr,
    lb: SocketAddr,
    catalog: Arc<Catalog>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let http = client_from(ip);
    let img = &catalog.big;
    let layer = biggest(img).unwrap_or_default();
    let ask = Ask {
        kind: Kind::SlowBlob,
        method: "GET",
        path: format!("/v2/proxy/{}/blobs/{layer}", repo_in(&img.repository)),
        want: &[200],
        digest: Some(layer),
        project: Some(project_of(&img.repository)),
    };
    while !stop.load(Ordering::Relaxed) {
        // hyper hands frames of up to 16 KiB here: 16 KiB per 62 ms is 256 KiB/s.
        ask_and_record(&http, lb, &ask, &stats, Some(Duration::from_millis(62))).await;
    }
}

/// The big image's layer (the last blob of a single-manifest image is its layer).
fn biggest(img: &testbed::Seeded) -> Option<String> {
    img.blobs.last().cloned()
}

/// Random names as fast as one address can send them, until `until`.
async fn storm(lb: SocketAddr, stats: Arc<Stats>, until: Instant) {
    let ip = Ipv4Addr::new(127, 0, 99, 99);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let stats = stats.clone();
        tasks.push(tokio::spawn(async move {
            let http = client_from(ip);
            let mut rng = rand::rngs::StdRng::from_entropy();
            while Instant::now() < until {
                let ask = Ask {
                    kind: Kind::Storm,
                    method: "HEAD",
                    path: format!("/v2/proxy/storm/x{:016x}/manifests/v1", rng.gen::<u64>()),
                    want: &[404],
                    digest: None,
                    project: None,
                };
                ask_and_record(&http, lb, &ask, &stats, None).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

// ------------------------------------------------------------------------------- faults

struct World {
    bed: Testbed,
    redis: Mutex<RedisSet>,
    pods: Arc<Pods>,
    stats: Arc<Stats>,
    catalog: Arc<Catalog>,
    lb: SocketAddr,
    rt: tokio::runtime::Handle,
    /// Projects made by the `projects` fault so far.
    made: AtomicUsize,
    smoke: bool,
}

/// Polls `f` every 100 ms until it holds (or `limit`); seconds it took.
fn until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

impl World {
    fn hold(&self, d: Duration) {
        std::thread::sleep(if self.smoke {
            d.min(Duration::from_secs(5))
        } else {
            d
        });
    }

    fn redis_up_everywhere(&self) -> bool {
        self.pods.each().iter().all(|(_, _, _, m, _)| {
            get(*m, "/healthz").is_ok_and(|(_, b)| b.contains(r#""redis":"up""#))
        })
    }

    /// Each pod answers `path` with `status`, asked directly (not through the balancer).
    fn every_pod_answers(&self, method: &str, path: &str, status: u16) -> bool {
        self.pods
            .each()
            .iter()
            .all(|(_, _, addr, _, _)| raw_status(*addr, method, path) == Some(status))
    }

    fn run(&self, fault: &'static str) -> anyhow::Result<()> {
        let s = &self.stats;
        match fault {
            "redis-kill" => {
                let port = self.redis.lock().unwrap().kill_master()?;
                let w = s.open(fault, format!("kill -9 of the master on {port}"));
                let new = self.redis.lock().unwrap().wait_failover(port)?;
                s.close(w);
                let r = until(Duration::from_secs(60), || self.redis_up_everywhere());
                s.recovered(w, r.unwrap_or(f64::NAN));
                // The killed server comes back empty; Sentinel makes it the new master's replica.
                let mut redis = self.redis.lock().unwrap();
                redis.restart(port)?;
                redis.wait("the old master replicates the new one", |set| {
                    set.cli(port, &["INFO", "replication"])
                        .is_ok_and(|o| o.contains("master_link_status:up"))
                        && set.master_port().is_ok_and(|p| p == new)
                })?;
            }
            "redis-freeze" => {
                let port = self.redis.lock().unwrap().freeze_master()?;
                let w = s.open(fault, format!("SIGSTOP of the master on {port} for 5 s"));
                std::thread::sleep(Duration::from_secs(5));
                self.redis.lock().unwrap().thaw(port);
                s.close(w);
                let r = until(Duration::from_secs(60), || self.redis_up_everywhere());
                s.recovered(w, r.unwrap_or(f64::NAN));
                let redis = self.redis.lock().unwrap();
                redis.wait(
                    "the thawed master is a replica in sync, or the master",
                    |set| {
                        set.cli(port, &["INFO", "replication"]).is_ok_and(|o| {
                            o.contains("master_link_status:up") || o.contains("role:master")
                        })
                    },
                )?;
            }
            "api-down" => {
                let w = s.open(fault, "Harbor's API answers 502 for 2 minutes".into());
                self.bed.harbor.set_api_down(true);
                self.hold(Duration::from_secs(120));
                self.bed.harbor.set_api_down(false);
                s.close(w);
                let back = unix_now();
                let r = until(Duration::from_secs(60), || {
                    self.pods.each().iter().all(|(_, _, _, m, _)| {
                        scrape(*m)
                            .get("harbor_router_discovery_last_success_timestamp_seconds")
                            .is_some_and(|t| *t >= back)
                    })
                });
                s.recovered(w, r.unwrap_or(f64::NAN));
            }
            "upstream-unreachable" => {
                let w = s.open(
                    fault,
                    format!("{FLAKY_PROJECT}'s upstream refused for 90 s"),
                );
                self.bed
                    .harbor
                    .set_upstream(FLAKY_PROJECT, Upstream::Refused);
                self.hold(Duration::from_secs(90));
                self.bed.harbor.set_upstream(FLAKY_PROJECT, Upstream::Up);
                s.close(w);
                let probe = self
                    .catalog
                    .cold
                    .lock()
                    .unwrap()
                    .iter()
                    .position(|(p, _)| p == FLAKY_PROJECT);
                let probe = probe.map(|i| self.catalog.cold.lock().unwrap().remove(i));
                let r = match probe {
                    Some((_, repo)) => until(Duration::from_secs(120), || {
                        self.every_pod_answers(
                            "HEAD",
                            &format!("/v2/proxy/{}/manifests/v1", repo_in(&repo)),
                            200,
                        )
                    }),
                    None => Some(0.0),
                };
                s.recovered(w, r.unwrap_or(f64::NAN));
            }
            "harbor-restart" => {
                let w = s.open(fault, "every connection reset, refused for 5 s".into());
                self.bed.harbor.restart(Duration::from_secs(5));
                std::thread::sleep(Duration::from_secs(5));
                s.close(w);
                let path = {
                    let img = &self.catalog.known[0];
                    format!(
                        "/v2/proxy/{}/blobs/{}",
                        repo_in(&img.repository),
                        img.blobs[0]
                    )
                };
                let r = until(Duration::from_secs(60), || {
                    self.every_pod_answers("GET", &path, 200)
                });
                s.recovered(w, r.unwrap_or(f64::NAN));
            }
            "token-key" => {
                let w = s.open(fault, "Harbor's token signing key rotated".into());
                self.bed.harbor.rotate_signing_key();
                s.close(w);
                let img = self
                    .catalog
                    .known
                    .iter()
                    .find(|i| i.repository.starts_with("ghcr/"))
                    .expect("a ghcr image");
                let path = format!(
                    "/v2/proxy/{}/manifests/{}",
                    repo_in(&img.repository),
                    img.tag
                );
                let r = until(Duration::from_secs(60), || {
                    self.every_pod_answers("GET", &path, 200)
                });
                s.recovered(w, r.unwrap_or(f64::NAN));
            }
            "projects" => {
                let n = self.made.fetch_add(1, Ordering::Relaxed);
                let name = format!("extra{n}");
                let what = match n.checked_sub(1) {
                    Some(old) => format!("project {name} added, extra{old} removed"),
                    None => format!("project {name} added"),
                };
                let w = s.open(fault, what);
                self.bed.harbor.add_project(ProjectSpec {
                    name: name.clone(),
                    public: true,
                    registry: Some(RegistrySpec {
                        id: 100 + n as i64,
                        name: format!("{name}-upstream"),
                        kind: "docker-registry".into(),
                        url: "https://registry.example".into(),
                    }),
                });
                let repository = format!("{name}/team{n}/tool");
                self.catalog
                    .added
                    .lock()
                    .unwrap()
                    .push((name.clone(), repository.clone()));
                if n > 0 {
                    let old = format!("extra{}", n - 1);
                    self.bed.harbor.delete_project(&old);
                    s.removed_at.lock().unwrap().insert(old.clone(), s.now());
                    let mut added = self.catalog.added.lock().unwrap();
                    let gone: Vec<_> = added.iter().filter(|(p, _)| *p == old).cloned().collect();
                    added.retain(|(p, _)| *p != old);
                    self.catalog.removed.lock().unwrap().extend(gone);
                }
                s.close(w);
                let path = format!("/v2/proxy/{}/manifests/v1", repo_in(&repository));
                let r = until(Duration::from_secs(120), || {
                    self.every_pod_answers("HEAD", &path, 200)
                });
                s.recovered(w, r.unwrap_or(f64::NAN));
            }
            "storm" => {
                let w = s.open(fault, "random names from 127.0.99.99 for 20 s".into());
                let end = Instant::now()
                    + if self.smoke {
                        Duration::from_secs(5)
                    } else {
                        Duration::from_secs(20)
                    };
                self.rt.block_on(storm(self.lb, s.clone(), end));
                s.close(w);
                s.recovered(w, 0.0);
            }
            "pod-restart" => {
                let w = s.open(fault, "pod-b: SIGTERM, drained, started again".into());
                let generation = self.pods.stop(1)?;
                self.pods.start(1, generation + 1)?;
                s.close(w);
                let r = until(Duration::from_secs(60), || {
                    self.pods.wait_ready(1, Duration::from_millis(100)).is_ok()
                });
                s.recovered(w, r.unwrap_or(f64::NAN));
            }
            other => bail!("unknown fault {other}"),
        }
        Ok(())
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The status of one request sent straight to `addr` (a fresh connection), if it answered.
fn raw_status(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {ACCEPT}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split(' ').nth(1)?.parse().ok()
}

/// Least-squares slope of `(t, y)`, per minute of `t` in seconds.
fn slope(points: &[(f64, f64)]) -> f64 {
    if points.len() < 3 {
        return 0.0;
    }
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let result = soak();
    if let Err(e) = &result {
        eprintln!("soak: {e:#}");
        println!("soak: 0 requests, 1 unexpected failures, rss slope 0 KiB/min, fd slope 0/min, 0 faults");
    }
    std::process::exit(match result {
        Ok(true) => 0,
        _ => 1,
    });
}

/// Runs the soak; whether it met its criteria.
fn soak() -> anyhow::Result<bool> {
    let a = args()?;
    // Kept when the run fails, for its pods' logs.
    let dir = tempfile::Builder::new().prefix("soak-").tempdir()?;
    log(format!("logs and state in {}", dir.path().display()));
    let mut config = HarborConfig::default();
    config.projects.retain(|p| p.registry.is_some());
    let bed = Testbed::start(config)?;
    bed.harbor.set_latency(a.latency);
    // What is seeded: the default images, a big one for the slow readers, cold names in every
    // proxy project, and the images of the projects the `projects` fault adds.
    let mut images = testbed::default_images();
    let big = SeedImage {
        repository: "dockerhub/big/layer".into(),
        tag: "v1".into(),
        kind: SeedKind::OciManifest,
        layer_bytes: 2 << 20,
    };
    images.push(big.clone());
    let projects = ["dockerhub", "ghcr", "quay", "k8s"];
    let cold_count = if a.smoke { 20 } else { 160 };
    let mut cold = Vec::new();
    for i in 0..cold_count {
        let p = projects[i % projects.len()];
        let repository = format!("{p}/cold/img{i}");
        cold.push((p.to_string(), repository.clone()));
        images.push(SeedImage {
            repository,
            tag: "v1".into(),
            kind: SeedKind::OciManifest,
            layer_bytes: 1024,
        });
    }
    for n in 0..12 {
        images.push(SeedImage {
            repository: format!("extra{n}/team{n}/tool"),
            tag: "v1".into(),
            kind: SeedKind::OciManifest,
            layer_bytes: 1024,
        });
    }
    log(format!("seeding {} images", images.len()));
    let seeded = bed.seed(&images)?;
    let known: Vec<testbed::Seeded> = seeded
        .iter()
        .filter(|s| {
            testbed::default_images()
                .iter()
                .any(|d| d.repository == s.repository)
        })
        .cloned()
        .collect();
    let big = seeded
        .iter()
        .find(|s| s.repository == big.repository)
        .cloned()
        .context("the big image")?;
    use rand::seq::SliceRandom;
    cold.shuffle(&mut rand::thread_rng());
    let catalog = Arc::new(Catalog {
        known,
        big,
        cold: Mutex::new(cold),
        added: Mutex::new(Vec::new()),
        removed: Mutex::new(Vec::new()),
    });

    log("starting Redis (a master, a replica, three Sentinels)");
    let redis = RedisSet::start(None)?;
    let harbor = bed.harbor.url();
    let env: Vec<(String, String)> = [
        ("HARBOR_URL", harbor.as_str()),
        ("HARBOR_USERNAME", testbed::DEFAULT_ROBOT_USER),
        ("HARBOR_PASSWORD", testbed::DEFAULT_ROBOT_PASSWORD),
        ("LISTEN_ADDR", "127.0.0.1:0"),
        ("METRICS_ADDR", "127.0.0.1:0"),
        ("LOG_FORMAT", "json"),
        ("WORKERS", "1"),
        ("DISCOVERY_INTERVAL", "10s"),
        ("SHUTDOWN_TIMEOUT", "10s"),
        ("REDIS_SENTINELS", redis.sentinels_env().as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let pods = Arc::new(Pods {
        router: a.router.clone(),
        env,
        dir: dir.path().to_path_buf(),
        pods: Mutex::new(vec![None, None]),
        ready: Mutex::new(vec![None, None]),
    });
    for i in 0..2 {
        pods.start(i, 0)?;
        pods.wait_ready(i, Duration::from_secs(60))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (pods, stop) = (pods.clone(), stop.clone());
        std::thread::spawn(move || watch_readiness(pods, stop));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let lb = listener.local_addr()?;
    rt.spawn(balance(listener, pods.clone()));
    until(Duration::from_secs(10), || {
        pods.ready.lock().unwrap().iter().all(Option::is_some)
    });

    let stats = Arc::new(Stats {
        started: Instant::now(),
        minutes: Mutex::new(Vec::new()),
        windows: Mutex::new(Vec::new()),
        unexpected_samples: Mutex::new(Vec::new()),
        requests: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        removed_at: Mutex::new(BTreeMap::new()),
    });
    let burst = Arc::new(tokio::sync::Notify::new());
    log(format!(
        "{} clients at {}/s each, 3 slow readers, through {lb}; {} minutes",
        a.clients, a.rate, a.minutes
    ));
    for i in 0..a.clients {
        let ip = Ipv4Addr::new(127, 0, 10 + (i / 200) as u8, 1 + (i % 200) as u8);
        rt.spawn(node(
            ip,
            lb,
            catalog.clone(),
            stats.clone(),
            a.rate,
            stop.clone(),
            burst.clone(),
        ));
    }
    for i in 0..3 {
        let ip = Ipv4Addr::new(127, 0, 50, 1 + i as u8);
        rt.spawn(slow_reader(
            ip,
            lb,
            catalog.clone(),
            stats.clone(),
            stop.clone(),
        ));
    }

    // The sampler: every 5 s, each pod's RSS and descriptors, Harbor's request count, Redis state.
    type Series = BTreeMap<(String, u32), Vec<(f64, f64, f64)>>;
    let series: Arc<Mutex<Series>> = Arc::default();
    {
        let (pods, stats, stop, series) =
            (pods.clone(), stats.clone(), stop.clone(), series.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = stats.now();
                for (i, name, _, metrics, pid) in pods.each() {
                    let generation = pods.pods.lock().unwrap()[i]
                        .as_ref()
                        .map_or(0, |p| p.generation);
                    let (rss, fds) = (proc_rss_kib(pid), proc_fds(pid));
                    series
                        .lock()
                        .unwrap()
                        .entry((name.clone(), generation))
                        .or_default()
                        .push((t, rss as f64, fds as f64));
                    let redis = get(metrics, "/healthz")
                        .ok()
                        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                        .and_then(|v| v["redis"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "?".into());
                    let mut m = stats.minute(t);
                    let i = (t / 60.0) as usize;
                    m[i].rss_kib.insert(name.clone(), rss);
                    m[i].fds.insert(name.clone(), fds);
                    m[i].redis.insert(name, redis);
                }
                std::thread::sleep(Duration::from_secs(5));
            }
        });
    }

    let world = World {
        bed,
        redis: Mutex::new(redis),
        pods: pods.clone(),
        stats: stats.clone(),
        catalog: catalog.clone(),
        lb,
        rt: rt.handle().clone(),
        made: AtomicUsize::new(0),
        smoke: a.smoke,
    };
    let schedule: &[&'static str] = &[
        "redis-kill",
        "projects",
        "storm",
        "token-key",
        "api-down",
        "pod-restart",
        "redis-freeze",
        "harbor-restart",
        "upstream-unreachable",
        "projects",
    ];
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    // Warm-up before the first fault, then one fault every `every` (its own duration included).
    let warm = if a.smoke {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(120)
    };
    let every = if a.smoke {
        Duration::from_secs(4)
    } else {
        Duration::from_secs(50)
    };
    std::thread::sleep(warm);
    let mut faults = 0;
    let mut harbor_before = harbor_requests(&world.bed);
    let mut k = 0;
    while stats.started.elapsed() + every < total {
        let fault = schedule[k % schedule.len()];
        k += 1;
        let began = Instant::now();
        world.run(fault)?;
        faults += 1;
        if k % 3 == 0 {
            burst.notify_waiters();
        }
        let left = every.saturating_sub(began.elapsed());
        std::thread::sleep(left);
        // What Harbor was asked since the last fault, counted in the minute it ends.
        let (t, h) = (stats.now(), harbor_requests(&world.bed));
        stats.minute(t)[(t / 60.0) as usize].upstream_requests += h - harbor_before;
        harbor_before = h;
    }
    while stats.started.elapsed() < total {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let final_harbor = harbor_requests(&world.bed);
    std::thread::sleep(Duration::from_secs(2));
    pods.stop_all();

    // Judgement.
    let requests = stats.requests.load(Ordering::Relaxed);
    let unexpected = stats.unexpected.load(Ordering::Relaxed);
    let warm_up = if a.smoke {
        0.0
    } else {
        (a.minutes * 60.0 / 3.0).max(300.0)
    };
    let mut slopes = Vec::new();
    for ((name, generation), points) in series.lock().unwrap().iter() {
        // Each incarnation warms up from its own start: a pod started again fills its caches as
        // the first one did, which is growth, not a leak.
        let born = points.first().map_or(0.0, |p| p.0);
        let after: Vec<_> = points.iter().filter(|p| p.0 >= born + warm_up).collect();
        let span = after.last().map_or(0.0, |l| l.0) - after.first().map_or(0.0, |f| f.0);
        if span < if a.smoke { 10.0 } else { 600.0 } {
            continue;
        }
        let rss = slope(&after.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
        let fds = slope(&after.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>());
        slopes.push(serde_json::json!({"pod": name, "generation": generation, "from_s": after[0].0, "span_s": span, "rss_kib_per_min": rss, "fds_per_min": fds}));
    }
    let max_of = |k: &str| {
        slopes
            .iter()
            .filter_map(|s| s[k].as_f64())
            .fold(0.0f64, f64::max)
    };
    let (rss_slope, fd_slope) = (max_of("rss_kib_per_min"), max_of("fds_per_min"));
    let minutes: Vec<serde_json::Value> = stats
        .minutes
        .lock()
        .unwrap()
        .iter_mut()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({
                "minute": i,
                "requests": m.requests,
                "retried": m.retried,
                "p50_ms": percentile(&mut m.latencies_ms, 0.5),
                "p99_ms": percentile(&mut m.latencies_ms, 0.99),
                "explained": m.explained,
                "unexpected": m.unexpected,
                "storm": m.storm.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
                "rss_kib": m.rss_kib,
                "fds": m.fds,
                "harbor_requests": m.upstream_requests,
                "redis": m.redis,
            })
        })
        .collect();
    let windows: Vec<serde_json::Value> = stats
        .windows
        .lock()
        .unwrap()
        .iter()
        .map(|w| serde_json::json!({"fault": w.fault, "detail": w.detail, "start_s": w.start, "end_s": w.end, "recovery_s": w.recovery}))
        .collect();
    let unrecovered = stats
        .windows
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.recovery.is_none_or(f64::is_nan))
        .count();
    let met = unexpected == 0
        && unrecovered == 0
        && (a.smoke || (rss_slope <= RSS_SLOPE_MAX_KIB && fd_slope <= FD_SLOPE_MAX));
    let report = serde_json::json!({
        "soak": {
            "minutes": a.minutes,
            "smoke": a.smoke,
            "clients": a.clients,
            "rate_per_client": a.rate,
            "latency_ms": a.latency.as_millis() as u64,
            "requests": requests,
            "unexpected": unexpected,
            "unrecovered_faults": unrecovered,
            "harbor_requests": final_harbor,
            "rss_slope_kib_per_min": rss_slope,
            "fd_slope_per_min": fd_slope,
            "rss_slope_bound": RSS_SLOPE_MAX_KIB,
            "fd_slope_bound": FD_SLOPE_MAX,
            "warm_up_s": warm_up,
            "faults": faults,
            "met": met,
        },
        "slopes": slopes,
        "faults": windows,
        "minutes": minutes,
        "unexpected_samples": *stats.unexpected_samples.lock().unwrap(),
    });
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
        log(format!("report in {}", out.display()));
    }
    for s in stats.unexpected_samples.lock().unwrap().iter().take(10) {
        log(format!("unexpected: {s}"));
    }
    if unrecovered > 0 {
        log(format!(
            "{unrecovered} faults did not recover within their limit"
        ));
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(world);
    if !met {
        let kept = dir.keep();
        log(format!("the pods' logs are kept in {}", kept.display()));
    }
    println!(
        "soak: {requests} requests, {unexpected} unexpected failures, rss slope {rss_slope:.1} KiB/min, fd slope {fd_slope:.2}/min, {faults} faults"
    );
    Ok(met)
}

/// Every `/v2/` request Harbor answered so far (401 challenges aside).
fn harbor_requests(bed: &Testbed) -> u64 {
    bed.harbor.counters().v2_requests.values().sum()
}
