//! Test support: start the built `harbor-router` binary on port 0 and read its JSON logs, and speak
//! raw HTTP/1.1 to it (so tests can send what no well-behaved client would).

#![allow(dead_code)]

pub mod fake_harbor;
pub mod nginx;
pub mod relay;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A configuration as the router would read it from an environment holding `HARBOR_URL` and `vars`.
pub fn config(harbor_url: &str, vars: &[(&str, &str)]) -> harbor_router::config::Config {
    let mut map = std::collections::HashMap::new();
    map.insert("HARBOR_URL".to_string(), harbor_url.to_string());
    for (k, v) in vars {
        map.insert(k.to_string(), v.to_string());
    }
    harbor_router::config::Config::from_map(&map).expect("a valid configuration")
}

/// Runs `f` on a monoio runtime on this thread, as a core does.
pub fn run<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("a monoio runtime")
        .block_on(f)
}

/// A Harbor URL where nothing answers: a loopback port this process keeps bound without listening,
/// so connections are refused and no other program can take the port while the tests run.
pub fn closed_harbor_url() -> String {
    static CLOSED: std::sync::OnceLock<(socket2::Socket, SocketAddr)> = std::sync::OnceLock::new();
    let (_, addr) = CLOSED.get_or_init(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        (s, addr)
    });
    format!("http://{addr}")
}

/// The resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// The open file descriptors of process `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits (up to [`DEADLINE`]) until `f` gives a value, checking every 20 ms.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "not within {DEADLINE:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sets its flag when dropped: a thread scope's background loops that run until a flag is set
/// hold one, so a failed wait or assertion in the scope ends the test instead of leaving the
/// loops (and the scope) running forever.
pub struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits (up to [`DEADLINE`]) until `f` holds.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    wait_for(what, || f().then_some(()))
}

/// A running router process; killed on drop.
pub struct Router {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// While true, nobody reads the router's stdout: its pipe fills and a log write blocks.
    logs_paused: Arc<(Mutex<bool>, Condvar)>,
    stderr: Arc<Mutex<String>>,
}

impl Router {
    /// Starts the binary with a clean environment: `env` plus JSON logs on 127.0.0.1:0 (each may be
    /// overridden), and waits for its "listening" line.
    pub fn start(env: &[(&str, &str)]) -> Router {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_harbor-router"));
        cmd.env_clear()
            .env("HARBOR_URL", closed_harbor_url())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut router = Router::spawn(cmd);
        let line = router.wait_log(|l| l.contains(r#""message":"listening""#));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        router.addr = v["addr"].as_str().unwrap().parse().unwrap();
        router
    }

    /// Spawns `cmd` with stdout (logs) and stderr captured; does not wait for anything.
    pub fn spawn(mut cmd: Command) -> Router {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start harbor-router");
        let logs = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let logs_paused = Arc::new((Mutex::new(false), Condvar::new()));
        let stdout = child.stdout.take().unwrap();
        let (sink, paused) = (logs.clone(), logs_paused.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (lines, cv) = &*sink;
                lines.lock().unwrap().push(line);
                cv.notify_all();
                let (p, pcv) = &*paused;
                let mut p = p.lock().unwrap();
                while *p {
                    p = pcv.wait(p).unwrap();
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let err_sink = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            err_sink.lock().unwrap().push_str(&s);
        });
        Router {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
            logs_paused,
            stderr,
        }
    }

    /// Stops reading the router's logs (after the line being read): once the pipe is full, the
    /// router's next log write blocks the thread that writes it.
    pub fn pause_logs(&self) {
        *self.logs_paused.0.lock().unwrap() = true;
    }

    /// Reads the router's logs again.
    pub fn resume_logs(&self) {
        *self.logs_paused.0.lock().unwrap() = false;
        self.logs_paused.1.notify_all();
    }

    /// Waits (up to [`DEADLINE`]) for a log line matching `pred` and returns it.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool) -> String {
        let (lines, cv) = &*self.logs;
        let end = Instant::now() + DEADLINE;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no matching log line; logs:\n{}",
                guard.join("\n")
            );
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Where the router serves `/metrics` (from its `listening` line).
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_log(|l| l.contains(r#""message":"listening""#));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["metrics_addr"].as_str().unwrap().parse().unwrap()
    }

    /// One scrape of `/metrics`: `name{labels}` → value.
    pub fn scrape(&self) -> std::collections::BTreeMap<String, f64> {
        let res = get(self.metrics_addr(), "/metrics");
        assert_eq!(res.status, 200);
        samples(&String::from_utf8(res.body).unwrap())
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.0.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "the router did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text, for assertion messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The registry error code of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Sends raw bytes on a new connection and reads the whole answer (the server closes after it,
/// since every caller sends `Connection: close` or garbage).
pub fn raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// `METHOD path` with `Connection: close` and any extra header lines.
pub fn request(addr: SocketAddr, method: &str, path: &str, extra: &[&str]) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let bytes = raw(addr, req.as_bytes());
    parse_response_to(&bytes, method == "HEAD")
        .unwrap_or_else(|| {
            panic!(
                "incomplete answer to {method} {path}: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        })
        .0
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[])
}

/// The environment of a router (one worker) in front of the test bed's Harbor at `harbor_url`, as
/// its robot.
///
/// `COALESCE_LINGER` is off: these tests follow Harbor's answers one request after another, and a
/// finished answer kept for its linger would stand in for the next one. The linger's own tests
/// (tests/pull.rs) turn it on.
pub fn bed_env(harbor_url: &str) -> Vec<(&str, &str)> {
    vec![
        ("WORKERS", "1"),
        ("COALESCE_LINGER", "0"),
        ("HARBOR_URL", harbor_url),
        ("HARBOR_USERNAME", testbed::DEFAULT_ROBOT_USER),
        ("HARBOR_PASSWORD", testbed::DEFAULT_ROBOT_PASSWORD),
    ]
}

/// A router (one worker) in front of the test bed's Harbor at `url`, as its robot, with `vars`
/// on top; ready.
pub fn bed_router(url: &str, vars: &[(&str, &str)]) -> Router {
    let mut env = bed_env(url);
    env.extend_from_slice(vars);
    let router = Router::start(&env);
    wait_until("the router is ready", || {
        get(router.addr, "/readyz").status == 200
    });
    router
}

/// An `Accept` line for every manifest type.
pub fn accept_lines() -> Vec<String> {
    testbed::images::ALL_MANIFEST_TYPES
        .iter()
        .map(|t| format!("Accept: {t}"))
        .collect()
}

/// `METHOD path`, accepting every manifest type.
pub fn pull(addr: SocketAddr, method: &str, path: &str) -> Response {
    let lines = accept_lines();
    let extra: Vec<&str> = lines.iter().map(String::as_str).collect();
    request(addr, method, path, &extra)
}

/// `METHOD /v2/proxy/<name>/manifests/<reference>`, accepting every manifest type.
pub fn manifest(addr: SocketAddr, method: &str, name: &str, reference: &str) -> Response {
    pull(
        addr,
        method,
        &format!("/v2/proxy/{name}/manifests/{reference}"),
    )
}

/// A test bed with one image, `ghcr/org/app:v1` (an OCI manifest, a 4 KiB layer).
pub fn bed_with_app() -> (testbed::Testbed, testbed::Seeded) {
    let bed = testbed::Testbed::start(testbed::HarborConfig::default()).unwrap();
    let seeded = bed
        .seed(&[testbed::SeedImage {
            repository: "ghcr/org/app".into(),
            tag: "v1".into(),
            kind: testbed::SeedKind::OciManifest,
            layer_bytes: 4096,
        }])
        .unwrap()
        .remove(0);
    (bed, seeded)
}

/// Samples of a text-format scrape: `name{labels}` → value.
pub fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// What each of `after`'s counts grew by since `before`.
pub fn grown(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Parses one response from the front of `bytes`; returns it and the bytes it used. The body is read
/// by Content-Length (or to the end without one). HEAD answers must be parsed with `head = true`.
pub fn parse_response(bytes: &[u8]) -> (Response, usize) {
    parse_response_to(bytes, false).expect("a complete response")
}

pub fn parse_response_to(bytes: &[u8], head: bool) -> Option<(Response, usize)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&bytes[..end]).expect("ASCII head");
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let body_start = end + 4;
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().unwrap());
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked && !head {
        // The data of the chunks; `None` until the last chunk came.
        let (body, used) = dechunk(&bytes[body_start..])?;
        return Some((
            Response {
                status,
                headers,
                body,
            },
            body_start + used,
        ));
    }
    let body_len = match (head, len) {
        (true, _) => 0,
        (false, Some(n)) => n,
        (false, None) => bytes.len() - body_start,
    };
    if bytes.len() < body_start + body_len {
        return None;
    }
    let body = bytes[body_start..body_start + body_len].to_vec();
    Some((
        Response {
            status,
            headers,
            body,
        },
        body_start + body_len,
    ))
}

/// The data of a chunked body and the bytes it took, if it ends with its last chunk.
pub fn dechunk(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        // (A chunk's closing CRLF may not have arrived yet: incomplete, not a panic.)
        let line = bytes.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&bytes[at..at + line]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            // No trailers are sent: the blank line ends it.
            return (bytes.get(at..at + 2)? == b"\r\n").then_some((out, at + 2));
        }
        out.extend_from_slice(bytes.get(at..at + size)?);
        at += size + 2;
    }
}
