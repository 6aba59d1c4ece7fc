//! What a cluster asks of the running binary beyond pulls: probes on the metrics port that no
//! client can crowd out, liveness that sees a stuck core, a per-client-address connection cap that
//! spares trusted proxies, and CPU pinning only where the process owns its CPUs. (Readiness through
//! a Harbor API outage is in tests/discovery.rs and tests/redis.rs.)

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bed_env, bed_router, get, wait_for, wait_until, Router};
use testbed::{HarborConfig, StandIn};

fn harbor() -> StandIn {
    StandIn::start(HarborConfig::default(), None).unwrap()
}

/// A connection to `to` from the loopback address `from`.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddrV4::new(from, 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket.connect(&to.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Sends `GET /v2/` (keep-alive) on `stream`: whether a 200 came back (false: the router closed
/// the connection without an answer).
fn served(stream: &mut TcpStream) -> bool {
    if stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: router\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    };
    // The body ("{}") is read too, so the next request on the connection starts clean.
    while got.len() < end + 2 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"HTTP/1.1 200")
}

fn refused(router: &Router, reason: &str) -> f64 {
    router.scrape()
        [&format!(r#"harbor_router_client_connections_refused_total{{reason="{reason}"}}"#)]
}

#[test]
fn probes_on_the_metrics_port_answer_while_every_client_connection_is_taken() {
    let harbor = harbor();
    let url = harbor.url();
    let r = bed_router(&url, &[("MAX_CONNECTIONS", "2")]);
    let metrics = r.metrics_addr();
    // Two clients hold every connection of the registry port.
    // (The readiness checks' connections may take a moment to be counted closed.)
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            wait_for("a free connection slot", || {
                let mut s = connect_from(Ipv4Addr::LOCALHOST, r.addr);
                served(&mut s).then_some(s)
            })
        })
        .collect();
    let mut third = connect_from(Ipv4Addr::LOCALHOST, r.addr);
    assert!(!served(&mut third), "past MAX_CONNECTIONS: closed at once");
    // The kubelet's probes on the metrics port are answered all the same, every time.
    for _ in 0..20 {
        let live = get(metrics, "/healthz");
        assert_eq!(live.status, 200, "{}", live.text());
        assert_eq!(live.header("content-type"), Some("application/json"));
        let ready = get(metrics, "/readyz");
        assert_eq!(ready.status, 200, "{}", ready.text());
        assert_eq!(ready.json()["projects"], 4);
    }
    let head = common::request(metrics, "HEAD", "/readyz", &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert!(refused(&r, "max_connections") >= 1.0);
    assert_eq!(refused(&r, "per_client"), 0.0);
    // The held connections still work.
    for s in &mut held {
        assert!(served(s));
    }
}

#[test]
fn one_client_address_cannot_hold_every_connection_but_a_trusted_proxy_can_hold_more() {
    let harbor = harbor();
    let url = harbor.url();
    let r = bed_router(
        &url,
        &[
            ("MAX_CONNECTIONS_PER_CLIENT", "2"),
            ("TRUSTED_PROXIES", "127.0.0.4/32"),
        ],
    );
    let greedy = Ipv4Addr::new(127, 0, 0, 2);
    let mut first = connect_from(greedy, r.addr);
    let mut second = connect_from(greedy, r.addr);
    // (Both stay open to the end: idle, they count against the address.)
    assert!(served(&mut first) && served(&mut second));
    let mut over = connect_from(greedy, r.addr);
    assert!(
        !served(&mut over),
        "a third connection from the same address is closed"
    );
    r.wait_log(|l| l.contains("MAX_CONNECTIONS_PER_CLIENT reached") && l.contains("127.0.0.2"));

    // Another client is not affected.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 3), r.addr);
    assert!(served(&mut other), "another address is served");
    // An ingress in TRUSTED_PROXIES carries many clients: no cap.
    let mut proxy: Vec<TcpStream> = (0..6)
        .map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 4), r.addr))
        .collect();
    for s in &mut proxy {
        assert!(served(s), "a trusted proxy is exempt");
    }
    assert!(refused(&r, "per_client") >= 1.0);
    assert_eq!(refused(&r, "max_connections"), 0.0);

    // Once the greedy client closes one, it may open one again.
    drop(first);
    wait_until("a closed connection frees the address's slot", || {
        served(&mut connect_from(greedy, r.addr))
    });
}

#[test]
fn a_stuck_core_fails_liveness_on_the_metrics_port_and_recovers() {
    let harbor = harbor();
    let url = harbor.url();
    // Every request is logged, and the test stops reading the logs: the worker's next log write
    // blocks once the pipe is full, as a core blocked in a system call would.
    let r = bed_router(&url, &[("ACCESS_LOG", "all")]);
    let metrics = r.metrics_addr();
    assert_eq!(get(metrics, "/healthz").status, 200);
    r.pause_logs();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), r.addr);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut s = connect_from(Ipv4Addr::LOCALHOST, addr);
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                while !stop.load(Ordering::Relaxed) && served(&mut s) {}
            }
        })
    };
    let stuck = wait_for("liveness sees the stuck worker", || {
        let res = get(metrics, "/healthz");
        (res.status == 503).then(|| res.json())
    });
    stop.store(true, Ordering::Relaxed);
    assert_eq!(stuck["stuck_workers"], serde_json::json!([0]), "{stuck}");
    assert!(
        stuck["reason"].as_str().unwrap().contains("stuck"),
        "{stuck}"
    );
    assert_eq!(get(metrics, "/readyz").status, 503, "not ready either");
    let age = r.scrape()[r#"harbor_router_worker_heartbeat_age_seconds{worker="0"}"#];
    assert!(age >= 10.0, "the heartbeat's age is a metric: {age}");

    r.resume_logs();
    wait_until("the worker beats again", || {
        get(metrics, "/healthz").status == 200
    });
    load.join().unwrap();
    assert_eq!(get(r.addr, "/readyz").status, 200);
}

/// Each worker thread's allowed CPUs (`Cpus_allowed_list`), by worker.
fn worker_cpus(pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some(worker) = comm.trim().strip_prefix("hr-worker-") {
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            found.push((worker.parse::<usize>().unwrap(), allowed_list(&status)));
        }
    }
    found.sort();
    found.into_iter().map(|(_, cpus)| cpus).collect()
}

fn allowed_list(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// How many CPUs a list such as `0-3,6` names.
fn count(list: &str) -> usize {
    list.split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn start(prefix: &[&str], vars: &[(&str, &str)]) -> Router {
    let bin = env!("CARGO_BIN_EXE_harbor-router");
    let mut cmd = match prefix {
        [] => Command::new(bin),
        [first, rest @ ..] => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
    };
    cmd.env_clear()
        .env("HARBOR_URL", common::closed_harbor_url())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("WORKERS", "2");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let r = Router::spawn(cmd);
    r.wait_log(|l| l.contains(r#""message":"listening""#));
    r
}

fn pinning_line(r: &Router) -> serde_json::Value {
    let line = r.wait_log(|l| l.contains(r#""cpu_pinning""#));
    serde_json::from_str(&line).unwrap()
}

#[test]
fn workers_pin_themselves_only_when_the_process_owns_its_cpus_or_is_told_to() {
    let mine = allowed_list(&std::fs::read_to_string("/proc/self/status").unwrap());
    let online = count(
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .unwrap()
            .trim(),
    );
    let owns = count(&mine) < online;

    // auto, with the machine's CPUs: unpinned (unless this test itself runs in a cpuset).
    let r = start(&[], &[]);
    let line = pinning_line(&r);
    assert_eq!(line["pinned"], owns, "{line}");
    assert_eq!(line["online_cpus"], online);
    let cpus = worker_cpus(r.pid());
    assert_eq!(cpus.len(), 2);
    if owns {
        assert!(cpus.iter().all(|c| count(c) == 1), "{cpus:?}");
    } else {
        assert!(
            cpus.iter().all(|c| *c == mine),
            "unpinned: {cpus:?} vs {mine}"
        );
    }
    drop(r);

    // off: never.
    let r = start(&[], &[("CPU_PINNING", "off")]);
    assert_eq!(pinning_line(&r)["pinned"], false);
    assert!(worker_cpus(r.pid()).iter().all(|c| *c == mine));
    drop(r);

    // on: always, one CPU each.
    let r = start(&[], &[("CPU_PINNING", "on")]);
    assert_eq!(pinning_line(&r)["pinned"], true);
    let cpus = worker_cpus(r.pid());
    assert!(cpus.iter().all(|c| count(c) == 1), "{cpus:?}");
    if count(&mine) >= 2 {
        assert_ne!(cpus[0], cpus[1], "two workers, two CPUs");
    }
    drop(r);

    // auto in a cpuset of its own (what the static CPU manager gives): pinned.
    if online >= 2 {
        let cpu = mine.split([',', '-']).next().unwrap().to_string();
        let r = start(&["taskset", "-c", &cpu], &[]);
        let line = pinning_line(&r);
        assert_eq!(line["pinned"], true, "{line}");
        assert_eq!(line["allowed_cpus"], 1);
        assert!(worker_cpus(r.pid()).iter().all(|c| *c == cpu));
    }
}

#[test]
fn a_bad_cpu_pinning_or_per_client_cap_is_refused_at_start() {
    for (var, value) in [
        ("CPU_PINNING", "sometimes"),
        ("MAX_CONNECTIONS_PER_CLIENT", "-1"),
        ("MAX_CONNECTIONS_PER_CLIENT", "lots"),
    ] {
        let mut env = bed_env("http://127.0.0.1:9");
        env.push((var, value));
        let mut r = Router::spawn({
            let mut c = Command::new(env!("CARGO_BIN_EXE_harbor-router"));
            c.env_clear().envs(env.iter().copied());
            c
        });
        let status = r.wait_exit(Duration::from_secs(20));
        assert_eq!(status.code(), Some(64), "{var}={value}");
        // (stderr is read by a thread of its own: it may land just after the exit.)
        wait_until("the refusal names the variable", || {
            r.stderr().contains(var)
        });
    }
}
