//! The running binary's front door: start-up, per-core serving, the registry base and health
//! endpoints, refusals of bad configuration and hostile requests.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{closed_harbor_url, get, parse_response_to, raw, request, Router, DEADLINE};

#[test]
fn base_endpoint_answers_get_and_head() {
    let r = Router::start(&[("WORKERS", "2")]);
    let res = get(r.addr, "/v2/");
    assert_eq!(res.status, 200);
    assert_eq!(res.body, b"{}");
    assert_eq!(
        res.header("Docker-Distribution-API-Version"),
        Some("registry/2.0")
    );
    assert_eq!(
        res.header("Content-Type"),
        Some("application/json; charset=utf-8")
    );

    // HEAD: same headers, Content-Length of the GET body, no body bytes.
    let bytes = raw(
        r.addr,
        b"HEAD /v2/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let (res, used) = parse_response_to(&bytes, true).unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.header("Content-Length"), Some("2"));
    assert_eq!(used, bytes.len(), "a HEAD answer has no body");

    // A query string does not change the route.
    assert_eq!(get(r.addr, "/v2/?probe=1").status, 200);
    assert_eq!(get(r.addr, "/v2").status, 200);
}

#[test]
fn every_worker_serves_and_logs_its_driver() {
    let workers = 4;
    let r = Router::start(&[("WORKERS", "4")]);
    for w in 0..workers {
        let line = r.wait_log(|l| {
            l.contains(r#""message":"worker started""#) && l.contains(&format!(r#""worker":{w},"#))
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let driver = v["driver"].as_str().unwrap();
        assert!(driver == "io_uring" || driver == "epoll", "{line}");
    }
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        // One new connection per request: SO_REUSEPORT spreads connections, not requests.
        let res = get(r.addr, "/readyz");
        assert_eq!(res.status, 503);
        seen.insert(res.json()["worker"].as_u64().unwrap());
        if seen.len() == workers {
            break;
        }
    }
    assert_eq!(
        seen,
        (0..workers as u64).collect::<BTreeSet<_>>(),
        "every worker answers"
    );
}

#[test]
fn health_reports_why_it_is_not_ready() {
    let r = Router::start(&[("WORKERS", "1")]);
    // On both ports: the registry port's answer names the worker, the metrics port's does not.
    for addr in [r.addr, r.metrics_addr()] {
        let res = get(addr, "/readyz");
        assert_eq!(res.status, 503);
        let v = res.json();
        assert_eq!(v["status"], "unavailable");
        assert!(v["reason"].as_str().unwrap().contains("discovered"), "{v}");
        // Alive all the same: restarting the pod would not make Harbor answer.
        let res = get(addr, "/healthz");
        assert_eq!(res.status, 200, "{}", res.text());
        let v = res.json();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["ready"], false);
        assert!(
            v["not_ready"].as_str().unwrap().contains("discovered"),
            "{v}"
        );
        assert_eq!(v.get("worker").is_some(), addr == r.addr, "{v}");
    }
    // Until a project is known, pulls are answered with a retryable registry error.
    let res = get(r.addr, "/v2/proxy/library/nginx/manifests/latest");
    assert_eq!(res.status, 503);
    assert_eq!(res.error_code(), "UNAVAILABLE");
}

#[test]
fn starts_with_only_harbor_url() {
    // The defaults: LISTEN_ADDR=:8080, pretty logs, one worker per core, io driver auto. Checked in a
    // network namespace of this test's own (as root), so whatever listens on 8080 on the machine
    // does not matter. Without the privilege, it runs beside the machine's listeners if 8080 is free.
    std::thread::spawn(|| {
        if !own_network_namespace() && std::net::TcpListener::bind("0.0.0.0:8080").is_err() {
            eprintln!("skipped: no network namespace of our own (not root) and 8080 is taken");
            return;
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_harbor-router"));
        cmd.env_clear().env("HARBOR_URL", closed_harbor_url());
        let r = Router::spawn(cmd);
        let line = r.wait_log(|l| l.contains("listening"));
        assert!(line.contains("addr=0.0.0.0:8080"), "{line}");
        let cores = std::thread::available_parallelism().unwrap().get();
        for w in 0..cores {
            r.wait_log(|l| l.contains("worker started") && l.contains(&format!("worker={w} ")));
        }
        let res = get("127.0.0.1:8080".parse().unwrap(), "/v2/");
        assert_eq!(res.status, 200);
        assert_eq!(res.body, b"{}");
    })
    .join()
    .unwrap();
}

/// Moves this thread (and the processes it starts) into a new network namespace with its loopback
/// up. `false` when the process may not (not root).
fn own_network_namespace() -> bool {
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return false;
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip (iproute2)");
    assert!(up.success(), "cannot bring the namespace's loopback up");
    true
}

#[test]
fn forced_drivers() {
    for driver in ["epoll", "io_uring"] {
        let r = Router::start(&[("WORKERS", "2"), ("IO_DRIVER", driver)]);
        for w in 0..2 {
            r.wait_log(|l| {
                l.contains("worker started")
                    && l.contains(&format!(r#""worker":{w},"#))
                    && l.contains(&format!(r#""driver":"{driver}""#))
            });
        }
        assert_eq!(get(r.addr, "/v2/").status, 200, "{driver}");
        // `epoll` means no io_uring anywhere in the process, the control plane's threads
        // included (a seccomp profile may forbid it; valgrind stalls on it); `io_uring` means one
        // ring per worker and one for discovery.
        let rings = io_urings(r.pid());
        match driver {
            "epoll" => assert_eq!(rings, 0, "IO_DRIVER=epoll opened io_uring instances"),
            _ => assert_eq!(rings, 3, "two workers and discovery, each its own ring"),
        }
    }
}

/// How many io_uring instances process `pid` holds open (each an `anon_inode:[io_uring]` fd).
fn io_urings(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the router's fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[io_uring]")
        .count()
}

#[test]
fn bad_configuration_exits_64_naming_every_bad_variable() {
    // LISTEN_ADDR names a port this test holds: a router that bound before validating would fail
    // differently (exit 69), not with 64.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harbor-router"));
    cmd.env_clear()
        .env("HARBOR_URL", "ftp://harbor")
        .env("WORKERS", "0")
        .env("LOG_LEVEL", "loud")
        .env("MAX_FANOUT_PROJECTS", "0")
        .env("DISCOVERY_INTERVAL", "-5s")
        .env("HARBOR_PASSWORD", "topsecret-value")
        .env("LISTEN_ADDR", held.local_addr().unwrap().to_string());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for var in [
        "HARBOR_URL=\"ftp://harbor\"",
        "WORKERS=\"0\"",
        "LOG_LEVEL=\"loud\"",
        "MAX_FANOUT_PROJECTS=\"0\"",
        "DISCOVERY_INTERVAL=\"-5s\"",
        "HARBOR_USERNAME:",
    ] {
        assert!(stderr.contains(var), "missing {var} in:\n{stderr}");
    }
    assert!(!stderr.contains("topsecret"), "a secret leaked:\n{stderr}");
    assert!(out.stdout.is_empty(), "nothing was started, nothing logged");
}

#[test]
fn unusable_listen_address_is_a_start_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harbor-router"));
    cmd.env_clear()
        .env("HARBOR_URL", closed_harbor_url())
        .env("LOG_FORMAT", "json")
        .env("LISTEN_ADDR", held.local_addr().unwrap().to_string());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cannot listen on"), "{stdout}");
}

#[test]
fn refusals_use_registry_errors() {
    let r = Router::start(&[("WORKERS", "1")]);
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/v2/_catalog", 404, "NAME_UNKNOWN"),
        (
            "GET",
            "/v2/dockerhub/library/nginx/manifests/latest",
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            "/v2/proxy/%2e%2e/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/proxy/../../etc/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        ("GET", "/v2/proxy//x/manifests/latest", 400, "NAME_INVALID"),
        (
            "GET",
            "/v2/proxy/x/manifests/sha256:beef",
            400,
            "DIGEST_INVALID",
        ),
        ("GET", "/v2/proxy/x/manifests/-bad", 400, "TAG_INVALID"),
        ("POST", "/v2/proxy/x/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PUT", "/v2/proxy/x/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/proxy/x/manifests/latest", 405, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in cases {
        let res = request(r.addr, method, path, &[]);
        assert_eq!(res.status, *status, "{method} {path}");
        assert_eq!(res.error_code(), *code, "{method} {path}");
        assert_eq!(
            res.header("Content-Type"),
            Some("application/json; charset=utf-8")
        );
        if *status == 405 {
            assert_eq!(res.header("Allow"), Some("GET, HEAD"));
        }
    }
    // A long name is refused by the grammar, not by a crash.
    let long = format!("/v2/proxy/{}/manifests/latest", "a".repeat(300));
    assert_eq!(get(r.addr, &long).error_code(), "NAME_INVALID");
    assert_eq!(get(r.addr, "/v2/").status, 200, "still serving");
}

#[test]
fn hostile_bytes_get_a_clear_answer_and_harm_nothing() {
    let r = Router::start(&[("WORKERS", "1")]);
    assert_eq!(get(r.addr, "/v2/").status, 200);
    let base_fds = common::fds(r.pid());
    let status = |bytes: &[u8]| -> u16 {
        let out = raw(r.addr, bytes);
        let head = String::from_utf8_lossy(&out);
        head.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    // Raw non-UTF-8 bytes in the request target.
    assert_eq!(
        status(b"GET /v2/proxy/\xff\xfe/manifests/x HTTP/1.1\r\nHost: t\r\n\r\n"),
        400
    );
    // Garbage instead of HTTP.
    assert_eq!(
        status(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n"),
        400
    );
    // A 100 KiB header.
    let big = format!(
        "GET /v2/ HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    assert_eq!(status(big.as_bytes()), 431);
    // Too many header lines.
    let mut many = String::from("GET /v2/ HTTP/1.1\r\nHost: t\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(status(many.as_bytes()), 431);
    // A request target of 70 000 bytes.
    let long = format!("GET /v2/{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(70_000));
    let s = status(long.as_bytes());
    assert!(s == 414 || s == 431 || s == 400, "long target got {s}");
    // Half a request, then the client goes away; a pipelined burst closed mid-way.
    drop(raw_unfinished(r.addr, b"GET /v2/ HTTP/1.1\r\nHo"));
    drop(raw_unfinished(
        r.addr,
        "GET /v2/ HTTP/1.1\r\nHost: t\r\n\r\n"
            .repeat(500)
            .as_bytes(),
    ));
    // None of it hurt the server, and nothing stays open.
    assert_eq!(get(r.addr, "/v2/").status, 200);
    common::wait_until("descriptors back to the baseline", || {
        common::fds(r.pid()) <= base_fds
    });
}

/// Connects, writes `bytes`, and hands back the connection without reading.
fn raw_unfinished(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

#[test]
fn slow_request_heads_are_cut_off() {
    let r = Router::start(&[("WORKERS", "1"), ("HEADER_READ_TIMEOUT", "1s")]);
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = Instant::now();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: t\r\n").unwrap();
    // The client never finishes its head; the server must close the connection by itself.
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "not closed by the header timeout: {waited:?}"
    );
    assert!(
        !String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "no answer to half a request"
    );
    assert_eq!(get(r.addr, "/v2/").status, 200);
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let r = Router::start(&[("WORKERS", "1")]);
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = Vec::new();
    for i in 0..50 {
        let path = if i % 2 == 0 { "/v2/" } else { "/readyz" };
        write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let res = loop {
            if let Some((res, used)) = parse_response_to(&buf, false) {
                buf.drain(..used);
                break res;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed after {i} requests");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert_eq!(res.status, if i % 2 == 0 { 200 } else { 503 });
    }
}

/// A keep-alive connection that sends pipelined requests and reads their answers.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: std::net::SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Conn { s, buf: Vec::new() }
    }

    /// Sends `n` GETs of `path` in one write, then reads the `n` answers.
    fn pipeline(&mut self, path: &str, n: usize) -> Vec<common::Response> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").repeat(n);
        self.s.write_all(req.as_bytes()).unwrap();
        (0..n).map(|_| self.read_one()).collect()
    }

    fn read_one(&mut self) -> common::Response {
        loop {
            if let Some((res, used)) = parse_response_to(&self.buf, false) {
                self.buf.drain(..used);
                return res;
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).unwrap();
            assert!(n > 0, "the connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The worker serving this connection (health answers name it; probes are never limited).
    fn worker(&mut self) -> u64 {
        self.pipeline("/healthz", 1)[0].json()["worker"]
            .as_u64()
            .unwrap()
    }
}

#[test]
fn one_client_has_one_request_budget_across_cores() {
    let r = Router::start(&[("WORKERS", "2"), ("RATE_LIMIT_PER_IP", "4")]);
    // Two connections from 127.0.0.1 that landed on different workers.
    let mut a = Conn::open(r.addr);
    let first = a.worker();
    let mut b = common::wait_for("a connection on the other worker", || {
        let mut c = Conn::open(r.addr);
        (c.worker() != first).then_some(c)
    });
    // A burst of 4 (one second's worth) on one core ...
    let on_a = a.pipeline("/v2/", 4);
    assert_eq!(on_a.iter().filter(|r| r.status == 200).count(), 4);
    // ... leaves the other core nothing to give the same client (one more every 250 ms: at most
    // two in the time this takes even on a slow machine; a budget per core would serve all four).
    let on_b = b.pipeline("/v2/", 4);
    let served = on_b.iter().filter(|r| r.status == 200).count();
    assert!(
        served <= 2,
        "{served} served: each core gave its own budget"
    );
    let refused = on_b.iter().find(|r| r.status == 429).expect("a 429");
    assert_eq!(refused.error_code(), "TOOMANYREQUESTS");
    assert!(refused.header("retry-after").is_some());
    // Probes are never limited.
    assert_eq!(b.pipeline("/healthz", 5).len(), 5);
}

#[test]
fn connections_past_max_connections_are_closed_at_once() {
    let r = Router::start(&[("WORKERS", "1"), ("MAX_CONNECTIONS", "2")]);
    let mut held: Vec<Conn> = (0..2).map(|_| Conn::open(r.addr)).collect();
    for c in &mut held {
        assert_eq!(c.pipeline("/v2/", 1)[0].status, 200);
    }
    // A third is accepted and closed: no answer, and the router keeps serving the others.
    let mut third = TcpStream::connect(r.addr).unwrap();
    third.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = third.write_all(b"GET /v2/ HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut out = Vec::new();
    let _ = third.read_to_end(&mut out);
    assert!(
        out.is_empty(),
        "answered past the limit: {:?}",
        String::from_utf8_lossy(&out)
    );
    r.wait_log(|l| l.contains("MAX_CONNECTIONS reached"));
    assert_eq!(held[0].pipeline("/v2/", 1)[0].status, 200);
    // One closes: a new connection is served again.
    held.pop();
    common::wait_until("a new connection is served", || {
        let mut s = TcpStream::connect(r.addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let _ = s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.starts_with(b"HTTP/1.1 200")
    });
}

#[test]
fn idle_connections_park_in_a_few_kib_and_their_memory_returns() {
    raise_open_files_limit(8192); // this test and the router each hold 2 000 sockets
                                  // Every connection comes from 127.0.0.1: the per-client cap (256) is off for this one.
    let r = Router::start(&[("WORKERS", "1"), ("MAX_CONNECTIONS_PER_CLIENT", "0")]);
    let pid = r.pid();
    // Warm the allocator and the worker with one burst, so the baseline holds what any run holds.
    for c in &mut (0..50).map(|_| Conn::open(r.addr)).collect::<Vec<_>>() {
        assert_eq!(c.pipeline("/v2/", 1)[0].status, 200);
    }
    let (base_rss, base_fds) = (common::rss(pid), common::fds(pid));
    let n = 2000;
    let mut idle: Vec<Conn> = (0..n).map(|_| Conn::open(r.addr)).collect();
    for c in &mut idle {
        assert_eq!(c.pipeline("/v2/", 1)[0].status, 200);
    }
    // Parked within two seconds, their memory given back within five more.
    let per_conn = common::wait_for("idle connections parked", || {
        let per = common::rss(pid).saturating_sub(base_rss) / n as u64;
        (per < 8 * 1024).then_some(per)
    });
    eprintln!("{per_conn} bytes per idle connection");
    // Parked connections still serve, on the same socket.
    for c in idle.iter_mut().step_by(100) {
        assert_eq!(c.pipeline("/v2/", 2)[1].status, 200);
    }
    let held = common::rss(pid);
    drop(idle);
    common::wait_until("descriptors back to the baseline", || {
        common::fds(pid) <= base_fds
    });
    // At least three quarters of what the parked connections held goes back to the system (all of
    // it but the tables a burst grows, when the allocator commits on demand; half stayed resident
    // when it committed its arenas eagerly), or all but 2 MiB (a huge page's worth of slack).
    let kept = (held.saturating_sub(base_rss) / 4).max(2 << 20);
    let after = common::wait_for("memory given back after the burst", || {
        let now = common::rss(pid);
        (now <= base_rss + kept).then_some(now)
    });
    eprintln!("rss: base {base_rss}, {n} parked {held}, after close {after}");
}

#[test]
fn an_error_answer_is_closed_gently_not_reset() {
    let r = Router::start(&[("WORKERS", "1")]);
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let big = format!(
        "GET /v2/ HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    s.write_all(big.as_bytes()).unwrap();
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    assert!(read.is_ok(), "the connection was reset: {read:?}");
    assert!(
        out.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn blank_lines_do_not_keep_a_connection_open() {
    let r = Router::start(&[("WORKERS", "1"), ("HEADER_READ_TIMEOUT", "1s")]);
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let started = Instant::now();
    // A blank line every 300 ms (a request may start with blank lines), never a request.
    let closed = loop {
        if started.elapsed() > Duration::from_secs(8) {
            break false;
        }
        if s.write_all(b"\r\n").is_err() {
            break true;
        }
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break true,
        }
    };
    assert!(closed, "still open after {:?}", started.elapsed());
}

/// Raises this process's soft limit on open files to `want` (or the hard limit); the router started
/// afterwards inherits it.
fn raise_open_files_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
