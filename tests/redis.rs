//! Sharing through Redis Sentinel, with real Redis: a master, a replica and three Sentinels started
//! by the test bed, router binaries in front of the stand-in Harbor and the real registry. Pods
//! share mappings and misses, a new pod starts warm (also while Harbor's API is slow), a moved
//! mapping reaches the other pods, a failover loses no request, and Redis that is down, refuses the
//! password or holds garbage changes nothing a client sees. The same again over TLS (a private CA,
//! the certificate checked), through Sentinel and through one endpoint (`REDIS_URL`), where a
//! certificate that is untrusted or names another host is one more way for Redis to be down.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use testbed::redis::RedisSet;
use testbed::{Fault, HarborConfig, SeedImage, SeedKind, Testbed};

use common::{grown, wait_until, Response, Router};

/// Projects of the default test bed.
const PROJECTS: [&str; 4] = ["dockerhub", "ghcr", "k8s", "quay"];

fn bed() -> Testbed {
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let mut images = testbed::default_images();
    // The names the miss tests ask for (tag `v1`) exist on Docker Hub with another tag: for a
    // repository Docker Hub does not know, it refuses Harbor and Harbor answers from its local
    // store, a 404 nothing tells from an outage, which is never shared. A missing tag of a known
    // repository gets the upstream's sure "not found".
    for name in [
        "nowhere/image",
        "never/there",
        "late/image",
        "wrong/type",
        "load/image",
    ] {
        images.push(testbed::SeedImage {
            repository: format!("dockerhub/{name}"),
            tag: "other".into(),
            kind: testbed::SeedKind::OciManifest,
            layer_bytes: 64,
        });
    }
    bed.seed(&images).unwrap();
    bed
}

/// A router (one worker unless `extra` says otherwise) sharing through `redis`, ready.
fn pod(bed: &Testbed, redis: &RedisSet, extra: &[(&str, &str)]) -> Router {
    let router = pod_unready(bed, redis, extra);
    wait_until("the router is ready", || {
        common::get(router.addr, "/readyz").status == 200
    });
    router
}

fn pod_unready(bed: &Testbed, redis: &RedisSet, extra: &[(&str, &str)]) -> Router {
    let sentinels = redis.sentinels_env();
    start_pod(
        bed,
        &sentinels,
        redis.password.as_deref(),
        redis.ca_file(),
        extra,
    )
}

/// How the tests that run both ways reach Redis.
#[derive(Clone, Copy, Debug)]
enum Wire {
    Plain,
    Tls,
}

/// A master, a replica and three Sentinels, speaking `wire`.
fn sentinel_set(password: Option<&str>, wire: Wire) -> RedisSet {
    match wire {
        Wire::Plain => RedisSet::start(password),
        Wire::Tls => RedisSet::start_tls(password),
    }
    .unwrap()
}

/// One server, speaking `wire`.
fn endpoint(password: Option<&str>, wire: Wire) -> RedisSet {
    match wire {
        Wire::Plain => RedisSet::standalone(password),
        Wire::Tls => RedisSet::standalone_tls(password),
    }
    .unwrap()
}

/// A router with these Sentinels and Redis password, TLS to them when `ca` (the CA that signed
/// their certificate) is given; does not wait for readiness.
fn start_pod(
    bed: &Testbed,
    sentinels: &str,
    password: Option<&str>,
    ca: Option<&Path>,
    extra: &[(&str, &str)],
) -> Router {
    let url = bed.harbor.url();
    let mut env = common::bed_env(&url);
    env.extend([
        ("REDIS_SENTINELS", sentinels),
        // A loaded test machine answers a loopback Redis read in well under this; the default (5ms)
        // is for production, where a late answer only costs a fan-out.
        ("REDIS_READ_TIMEOUT", "2s"),
        ("FANOUT_BUDGET_PER_IP", "100000"),
    ]);
    if let Some(pw) = password {
        env.push(("REDIS_PASSWORD", pw));
    }
    let ca = ca.map(|p| p.display().to_string());
    if let Some(ca) = &ca {
        env.extend([("REDIS_TLS", "true"), ("REDIS_CA_FILE", ca.as_str())]);
    }
    env.extend_from_slice(extra);
    Router::start(&env)
}

fn health(router: &Router) -> serde_json::Value {
    common::get(router.addr, "/healthz").json()
}

fn wait_redis_up(router: &Router) {
    wait_until("the router's Redis link is up", || {
        health(router)["redis"] == "up"
    });
}

fn manifest(router: &Router, method: &str, name: &str, reference: &str) -> Response {
    common::manifest(router.addr, method, name, reference)
}

/// `/v2/` requests each project has seen (401 challenges aside).
fn v2_counts(bed: &Testbed) -> Vec<u64> {
    let c = bed.harbor.counters();
    PROJECTS
        .iter()
        .map(|p| *c.v2_requests.get(*p).unwrap_or(&0))
        .collect()
}

/// The stored mapping of `name` on the current master, if any.
fn stored(redis: &RedisSet, name: &str) -> Option<serde_json::Value> {
    let out = redis
        .master_cli(&["GET", &format!("hr:v1:map:{name}")])
        .ok()?;
    serde_json::from_str(out.trim()).ok()
}

/// Commands that read or write data on `port` (PING and the Sentinels' own traffic aside). PUBLISH
/// is not counted: each Sentinel publishes its hello to the master every 2 s, and the router's
/// own PUBLISH of a moved mapping goes with the SET that stores it.
fn data_commands(redis: &RedisSet, port: u16) -> u64 {
    ["get", "set", "mget", "zadd", "zrevrange", "pexpire", "del"]
        .iter()
        .map(|c| redis.calls(port, c).unwrap())
        .sum()
}

#[test]
fn pods_share_mappings_and_misses_and_a_hit_makes_no_redis_call() {
    pods_share(Wire::Plain);
}

#[test]
fn over_tls_pods_share_mappings_and_misses_and_a_hit_makes_no_redis_call() {
    pods_share(Wire::Tls);
}

fn pods_share(wire: Wire) {
    let redis = sentinel_set(Some("redis-test-password"), wire);
    let bed = bed();
    // One discovery each, at start: a later round publishes the project list, a Redis write that
    // a slow machine can land among the hits counted below.
    let once = [("DISCOVERY_INTERVAL", "1h")];
    let a = pod(&bed, &redis, &once);
    let b = pod(&bed, &redis, &once);
    wait_redis_up(&a);
    wait_redis_up(&b);
    let line = a.wait_log(|l| l.contains("Redis connected"));
    assert!(line.contains("Sentinel"), "{line}");

    assert_eq!(manifest(&a, "GET", "org/app", "v1").status, 200);
    wait_until("a's mapping reaches Redis", || {
        stored(&redis, "org/app").is_some_and(|v| v["project"] == "ghcr" && v["project_id"] == 2)
    });
    let before = v2_counts(&bed);
    let res = manifest(&b, "GET", "org/app", "v1");
    assert_eq!(res.status, 200);
    let after = v2_counts(&bed);
    assert_eq!(
        grown(&after, &before),
        [0, 1, 0, 0],
        "b asked ghcr alone: no fan-out"
    );

    // A miss found by a fan-out on a is shared too.
    let missing = manifest(&a, "GET", "nowhere/image", "v1");
    assert_eq!(missing.status, 404);
    wait_until("a's miss reaches Redis", || {
        redis
            .master_cli(&["KEYS", "hr:v1:miss:*"])
            .is_ok_and(|o| !o.trim().is_empty())
    });
    let before = v2_counts(&bed);
    let res = manifest(&b, "GET", "nowhere/image", "v1");
    assert_eq!(res.status, 404);
    assert_eq!(
        res.body, missing.body,
        "the same answer as the pod that found it"
    );
    assert_eq!(v2_counts(&bed), before, "b answered the shared miss itself");

    // Hits (b's shard has both now) make no Redis call, once b's own writes (the tag it learned
    // with its first answer, and that answer's manifest) are done.
    wait_until("b's tag and manifest writes are done", || {
        b.scrape()[r#"harbor_router_redis_operations_total{op="write"}"#] >= 2.0
    });
    let master = redis.master_port().unwrap();
    let commands = data_commands(&redis, master);
    for _ in 0..50 {
        assert_eq!(manifest(&b, "HEAD", "org/app", "v1").status, 200);
        assert_eq!(manifest(&b, "GET", "nowhere/image", "v1").status, 404);
    }
    assert_eq!(
        data_commands(&redis, master),
        commands,
        "no Redis command on a hit"
    );
    // The metrics show the link and what went through it.
    let m = b.scrape();
    assert_eq!(m[r#"harbor_router_redis_state{state="up"}"#], 1.0);
    assert!(m[r#"harbor_router_redis_operations_total{op="read"}"#] >= 2.0);
    assert_eq!(
        m[r#"harbor_router_cache_lookups_total{layer="redis",result="hit"}"#],
        1.0
    );
    assert_eq!(
        m[r#"harbor_router_cache_lookups_total{layer="redis",result="negative"}"#],
        1.0
    );
    assert!(a.scrape()[r#"harbor_router_redis_operations_total{op="write"}"#] >= 2.0);
}

#[test]
fn a_new_pod_starts_warm_while_harbor_api_is_slow() {
    let redis = RedisSet::start(None).unwrap();
    let bed = bed();
    let a = pod(&bed, &redis, &[]);
    wait_redis_up(&a);
    assert_eq!(manifest(&a, "GET", "coreos/etcd", "v3.5.0").status, 200);
    wait_until("a's mapping and project list reach Redis", || {
        stored(&redis, "coreos/etcd").is_some()
            && redis
                .master_cli(&["EXISTS", "hr:v1:projects"])
                .is_ok_and(|o| o.trim() == "1")
    });

    // Harbor's API holds every answer: the new pod's discovery cannot finish.
    let held = bed.harbor.hold_api();
    let api_before = bed.harbor.counters().api_requests;
    let c = pod_unready(&bed, &redis, &[]);
    wait_until("the new pod is ready with the list from Redis", || {
        common::get(c.addr, "/readyz").status == 200
    });
    let h = health(&c);
    assert_eq!(h["provisional"], true, "{h}");
    assert_eq!(h["projects"], 4, "{h}");
    wait_until("the new pod's discovery is waiting on Harbor", || {
        bed.harbor.counters().api_requests > api_before
    });
    assert_eq!(health(&c)["provisional"], true, "discovery is still held");
    let before = v2_counts(&bed);
    assert_eq!(manifest(&c, "GET", "coreos/etcd", "v3.5.0").status, 200);
    let after = v2_counts(&bed);
    assert_eq!(
        grown(&after, &before),
        [0, 0, 0, 1],
        "the first request went to quay alone"
    );

    // Discovery completes: its own list replaces the provisional one.
    held.release();
    wait_until("the new pod's discovery replaces the list", || {
        health(&c).get("provisional").is_none()
    });
}

#[test]
fn a_moved_mapping_reaches_the_other_pods() {
    let redis = RedisSet::start(None).unwrap();
    let bed = bed();
    let image = |repo: &str| SeedImage {
        repository: repo.into(),
        tag: "v1".into(),
        kind: SeedKind::OciManifest,
        layer_bytes: 1024,
    };
    bed.seed(&[image("dockerhub/shared/tool")]).unwrap();
    let a = pod(&bed, &redis, &[]);
    let b = pod(&bed, &redis, &[("LOG_LEVEL", "debug")]);
    wait_redis_up(&a);
    wait_redis_up(&b);
    assert_eq!(manifest(&a, "GET", "shared/tool", "v1").status, 200);
    wait_until("the mapping reaches Redis", || {
        stored(&redis, "shared/tool").is_some_and(|v| v["project"] == "dockerhub")
    });
    assert_eq!(manifest(&b, "GET", "shared/tool", "v1").status, 200);

    // The image moves: dockerhub no longer has it, quay does.
    bed.seed(&[image("quay/shared/tool")]).unwrap();
    bed.harbor.set_fault("dockerhub", Fault::Status(404));
    assert_eq!(manifest(&a, "GET", "shared/tool", "v1").status, 200);
    wait_until("the move reaches Redis", || {
        stored(&redis, "shared/tool").is_some_and(|v| v["project"] == "quay")
    });
    b.wait_log(|l| l.contains("this core follows a mapping another pod moved"));
    let before = v2_counts(&bed);
    assert_eq!(manifest(&b, "GET", "shared/tool", "v1").status, 200);
    let after = v2_counts(&bed);
    assert_eq!(
        grown(&after, &before),
        [0, 0, 0, 1],
        "b went to quay at once, not to dockerhub first"
    );
}

/// Requests through `router` until `stop`, mixing hits (a known image) and misses (names nobody
/// has, so Redis reads and writes are on the path). Counts requests, failures and the slowest one.
struct Load {
    stop: AtomicBool,
    sent: AtomicU64,
    failed: AtomicU64,
    slowest_ms: AtomicU64,
    misses: AtomicU64,
}

impl Load {
    fn new() -> Load {
        Load {
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            slowest_ms: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn run(&self, router: &Router, thread: usize) {
        let mut i = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            i += 1;
            let started = Instant::now();
            let (res, want) = if i % 2 == 0 {
                (manifest(router, "HEAD", "org/app", "v1"), 200)
            } else {
                self.misses.fetch_add(1, Ordering::Relaxed);
                let tag = format!("missing-{thread}-{i}");
                (manifest(router, "GET", "load/image", &tag), 404)
            };
            let took = started.elapsed().as_millis() as u64;
            self.slowest_ms.fetch_max(took, Ordering::Relaxed);
            self.sent.fetch_add(1, Ordering::Relaxed);
            if res.status != want {
                self.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "request {i} of thread {thread}: {} (wanted {want})",
                    res.status
                );
            }
        }
    }

    fn wait_more(&self, n: u64) {
        let target = self.sent.load(Ordering::Relaxed) + n;
        wait_until("the load goes on", || {
            self.sent.load(Ordering::Relaxed) >= target
        });
    }
}

/// Keys on the server on `port`.
fn dbsize(redis: &RedisSet, port: u16) -> u64 {
    redis
        .cli(port, &["DBSIZE"])
        .ok()
        .and_then(|o| o.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_killed_master_fails_over_and_no_request_fails() {
    killed_master(Wire::Plain);
}

#[test]
fn over_tls_a_killed_master_fails_over_and_no_request_fails() {
    killed_master(Wire::Tls);
}

fn killed_master(wire: Wire) {
    let mut redis = sentinel_set(None, wire);
    let bed = bed();
    let router = pod(
        &bed,
        &redis,
        &[("WORKERS", "2"), ("REDIS_READ_TIMEOUT", "50ms")],
    );
    wait_redis_up(&router);
    assert_eq!(manifest(&router, "GET", "org/app", "v1").status, 200);
    let load = Load::new();
    std::thread::scope(|s| {
        let _stop = common::SetOnDrop(&load.stop);
        for t in 0..2 {
            let (load, router) = (&load, &router);
            s.spawn(move || load.run(router, t));
        }
        let old = redis.master_port().unwrap();
        wait_until("misses are written to Redis", || dbsize(&redis, old) > 20);
        redis.kill_master().unwrap();
        let new = redis.wait_failover(old).unwrap();
        let promoted = Instant::now();
        let keys = dbsize(&redis, new);
        wait_until("writes resume on the new master", || {
            dbsize(&redis, new) > keys + 10
        });
        let resumed = promoted.elapsed();
        load.wait_more(50);
        load.stop.store(true, Ordering::Relaxed);
        assert!(
            resumed < Duration::from_secs(10),
            "writes resumed {resumed:?} after the promotion"
        );
        eprintln!("writes resumed {resumed:?} after the promotion");
    });
    assert_eq!(load.failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(load.misses.load(Ordering::Relaxed) > 20);
    wait_redis_up(&router);
}

#[test]
fn a_frozen_master_holds_no_request_beyond_the_budget() {
    frozen_master(Wire::Plain);
}

#[test]
fn over_tls_a_frozen_master_holds_no_request_beyond_the_budget() {
    frozen_master(Wire::Tls);
}

fn frozen_master(wire: Wire) {
    let mut redis = sentinel_set(None, wire);
    let bed = bed();
    let router = pod(&bed, &redis, &[("REDIS_READ_TIMEOUT", "50ms")]);
    frozen(&mut redis, &router, |r| r.freeze_master().unwrap());
}

#[test]
fn a_frozen_endpoint_holds_no_request_beyond_the_budget() {
    for wire in [Wire::Plain, Wire::Tls] {
        let mut redis = endpoint(None, wire);
        let bed = bed();
        let router = url_pod(
            &bed,
            &redis,
            &redis.url(),
            &[("REDIS_READ_TIMEOUT", "50ms")],
        );
        let port = redis.servers[0].port;
        frozen(&mut redis, &router, |r| {
            r.freeze(port);
            port
        });
    }
}

/// Freezes the master `router` shares through (`freeze` returns its port) under load: no request
/// waits on it, none fails.
fn frozen(redis: &mut RedisSet, router: &Router, freeze: impl FnOnce(&mut RedisSet) -> u16) {
    wait_redis_up(router);
    assert_eq!(manifest(router, "GET", "org/app", "v1").status, 200);
    let load = Load::new();
    std::thread::scope(|s| {
        let _stop = common::SetOnDrop(&load.stop);
        let (l, r) = (&load, router);
        s.spawn(move || l.run(r, 0));
        load.wait_more(20);
        let frozen = freeze(redis);
        load.slowest_ms.store(0, Ordering::Relaxed);
        // Frozen for longer than the link's command limit (1 s) and the Sentinels' down-after
        // (1 s): a request that waited on the master would take that long.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            load.wait_more(1);
        }
        let slowest = load.slowest_ms.load(Ordering::Relaxed);
        load.stop.store(true, Ordering::Relaxed);
        redis.thaw(frozen);
        // A request that waited on the frozen master would take the link's command limit (1 s).
        assert!(
            slowest < 500,
            "the slowest request while the master was frozen took {slowest} ms"
        );
        eprintln!("slowest request while the master was frozen: {slowest} ms");
    });
    assert_eq!(load.failed.load(Ordering::Relaxed), 0);
}

#[test]
fn redis_down_or_refusing_the_password_changes_nothing_a_client_sees() {
    // Sentinel addresses where nothing answers: the ports stay bound (never accepting) for the whole
    // test, so no other test's Redis can take them.
    let silent: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let closed: Vec<String> = silent
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let bed = bed();
    let url = bed.harbor.url();
    let sentinels = closed.join(",");
    let mut env = common::bed_env(&url);
    env.push(("REDIS_SENTINELS", sentinels.as_str()));
    let down = Router::start(&env);
    wait_until("ready without Redis", || {
        common::get(down.addr, "/readyz").status == 200
    });
    wait_until("health shows Redis down", || {
        health(&down)["redis"] == "down"
    });
    for _ in 0..3 {
        assert_eq!(manifest(&down, "GET", "org/app", "v1").status, 200);
        assert_eq!(manifest(&down, "GET", "nowhere/x", "v1").status, 404);
    }
    // Retries go on in the background; the problem is logged once, not per attempt or request.
    down.wait_log(|l| l.contains("Redis unavailable"));
    let logged = down
        .logs()
        .iter()
        .filter(|l| l.contains("Redis unavailable"))
        .count();
    assert_eq!(logged, 1, "{:#?}", down.logs());
    let m = down.scrape();
    assert_eq!(m[r#"harbor_router_redis_state{state="down"}"#], 1.0);
    assert_eq!(m[r#"harbor_router_redis_state{state="up"}"#], 0.0);
    assert!(m["harbor_router_redis_errors_total"] >= 1.0);

    let redis = RedisSet::start(Some("the-right-one")).unwrap();
    let sentinels = redis.sentinels_env();
    let refused = start_pod(&bed, &sentinels, Some("wrong-secret-7f3a"), None, &[]);
    wait_until("ready while Redis refuses", || {
        common::get(refused.addr, "/readyz").status == 200
    });
    let line = refused.wait_log(|l| l.contains("Redis unavailable"));
    assert!(line.contains("REDIS_PASSWORD"), "{line}");
    assert_eq!(health(&refused)["redis"], "down");
    assert_eq!(manifest(&refused, "GET", "org/app", "v1").status, 200);
    assert!(
        !refused
            .logs()
            .iter()
            .any(|l| l.contains("wrong-secret-7f3a")),
        "the password never appears in a log"
    );
}

#[test]
fn garbage_and_future_values_are_ignored_and_overwritten() {
    let redis = RedisSet::start(None).unwrap();
    let bed = bed();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let in_an_hour = now + 3_600_000;
    let set = |key: &str, value: &str| {
        redis.master_cli(&["SET", key, value]).unwrap();
        let name = key.trim_start_matches("hr:v1:map:");
        redis
            .master_cli(&["ZADD", "hr:v1:recent", &now.to_string(), name])
            .unwrap();
    };
    set("hr:v1:map:org/app", "garbage");
    set(
        "hr:v1:map:coreos/etcd",
        r#"{"v":2,"project":"quay","project_id":3,"at":1}"#,
    );
    set(
        "hr:v1:map:library/nginx",
        &format!(r#"{{"v":1,"project":"evil","project_id":99,"at":{now}}}"#),
    );
    // The right project's name with another project's id (dockerhub is 1): not the same project.
    set(
        "hr:v1:map:pause",
        &format!(r#"{{"v":1,"project":"dockerhub","project_id":4,"at":{now}}}"#),
    );
    // Learned an hour from now: a wrong clock or garbage, not a mapping.
    set(
        "hr:v1:map:library/alpine",
        &format!(r#"{{"v":1,"project":"ghcr","project_id":2,"at":{in_an_hour}}}"#),
    );
    redis
        .master_cli(&["LPUSH", "hr:v1:map:wrong/type", "x"])
        .unwrap();
    redis
        .master_cli(&["ZADD", "hr:v1:recent", &now.to_string(), "wrong/type"])
        .unwrap();
    redis
        .master_cli(&["SET", "hr:v1:projects", "{not json"])
        .unwrap();
    redis
        .master_cli(&["SET", "hr:v2:map:org/app", "from the future"])
        .unwrap();

    // Harbor's API is held: only a list from Redis could make a pod ready, and these are garbage.
    let held = bed.harbor.hold_api();
    let router = pod_unready(&bed, &redis, &[("LOG_LEVEL", "debug")]);
    wait_redis_up(&router);
    router.wait_log(|l| l.contains("no usable project list in Redis"));
    assert_eq!(common::get(router.addr, "/readyz").status, 503);
    // A list read an hour from now is refused too.
    let future = format!(
        r#"{{"v":1,"at":{in_an_hour},"projects":[{{"name":"evil","id":99,"registry_id":9}}]}}"#
    );
    redis
        .master_cli(&["SET", "hr:v1:projects", &future])
        .unwrap();
    let later = pod_unready(&bed, &redis, &[]);
    wait_redis_up(&later);
    later.wait_log(|l| l.contains("no usable project list in Redis"));
    assert_eq!(common::get(later.addr, "/readyz").status, 503);
    drop(later);
    held.release();
    wait_until("ready once discovery completes", || {
        common::get(router.addr, "/readyz").status == 200
    });
    // Garbage on the changes channel is ignored, and so is a move to a project this pod does not know.
    let evil_move =
        format!(r#"{{"v":1,"name":"org/app","project":"evil","project_id":99,"at":{now}}}"#);
    for junk in ["", "null", "{", evil_move.as_str()] {
        redis
            .master_cli(&["PUBLISH", "hr:v1:changes:0", junk])
            .unwrap();
    }
    for (name, tag, project) in [
        ("org/app", "v1", "ghcr"),
        ("coreos/etcd", "v3.5.0", "quay"),
        ("library/nginx", "latest", "dockerhub"),
        ("pause", "3.9", "k8s"),
        ("library/alpine", "3.19", "dockerhub"),
    ] {
        let before = v2_counts(&bed);
        assert_eq!(manifest(&router, "GET", name, tag).status, 200, "{name}");
        let after = v2_counts(&bed);
        let winner = PROJECTS.iter().position(|p| *p == project).unwrap();
        assert_eq!(
            after[winner] - before[winner],
            1,
            "{name}: found by one fan-out"
        );
        wait_until("the bad value is overwritten", || {
            stored(&redis, name).is_some_and(|v| v["project"] == project && v["v"] == 1)
        });
    }
    assert!(
        !router
            .logs()
            .iter()
            .any(|l| l.contains("mapped project answered 404")),
        "no request went to a project named by a value the pod cannot trust"
    );
    // A key of the wrong type fails that read alone: the pull is served, the link stays up.
    assert_eq!(manifest(&router, "GET", "wrong/type", "v1").status, 404);
    assert_eq!(health(&router)["redis"], "up");
    assert_eq!(
        redis
            .master_cli(&["GET", "hr:v2:map:org/app"])
            .unwrap()
            .trim(),
        "from the future",
        "another schema's keys are left alone"
    );
}

#[test]
fn a_shared_miss_is_bounded_by_the_readers_own_ttl_and_its_detail_must_be_a_registry_error() {
    let redis = RedisSet::start(None).unwrap();
    let bed = bed();
    let a = pod(&bed, &redis, &[]);
    let b = pod(&bed, &redis, &[("NEGATIVE_CACHE_TTL", "10s")]);
    wait_redis_up(&a);
    wait_redis_up(&b);
    let miss_keys = || -> Vec<String> {
        redis
            .master_cli(&["KEYS", "hr:v1:miss:*"])
            .unwrap()
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    };
    let edit = |key: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let raw = redis.master_cli(&["GET", key]).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(raw.trim()).unwrap();
        f(&mut v);
        redis
            .master_cli(&["SET", key, &v.to_string(), "PX", "600000"])
            .unwrap();
    };
    // A miss whose detail is not a registry error: the reader answers its own 404 instead.
    assert_eq!(manifest(&a, "GET", "never/there", "v1").status, 404);
    wait_until("the miss reaches Redis", || miss_keys().len() == 1);
    let first = miss_keys().remove(0);
    edit(&first, &|v| v["detail"] = "<html>buy now</html>".into());
    let before = v2_counts(&bed);
    let res = manifest(&b, "GET", "never/there", "v1");
    assert_eq!(res.status, 404);
    assert_eq!(res.error_code(), "MANIFEST_UNKNOWN", "the router's own 404");
    assert_eq!(v2_counts(&bed), before, "the shared miss itself is used");

    // A miss that claims to last longer than the reader's NEGATIVE_CACHE_TTL is not believed.
    assert_eq!(manifest(&a, "GET", "late/image", "v1").status, 404);
    wait_until("the second miss reaches Redis", || miss_keys().len() == 2);
    let second = miss_keys().into_iter().find(|k| *k != first).unwrap();
    edit(&second, &|v| {
        v["until"] = (v["until"].as_u64().unwrap() + 3_600_000).into();
    });
    bed.seed(&[SeedImage {
        repository: "dockerhub/late/image".into(),
        tag: "v1".into(),
        kind: SeedKind::OciManifest,
        layer_bytes: 1024,
    }])
    .unwrap();
    assert_eq!(
        manifest(&b, "GET", "late/image", "v1").status,
        200,
        "an hour-long miss is not one this pod would have written"
    );
}

#[test]
fn an_old_project_list_is_not_passed_off_as_fresh() {
    let redis = RedisSet::start(None).unwrap();
    let bed = bed();
    let a = pod(&bed, &redis, &[("DISCOVERY_INTERVAL", "1s")]);
    wait_redis_up(&a);
    wait_until("a's list reaches Redis", || {
        redis
            .master_cli(&["EXISTS", "hr:v1:projects"])
            .is_ok_and(|o| o.trim() == "1")
    });
    // Harbor's API stops answering: a's list ages past 3 discovery intervals, and a stays ready.
    let held = bed.harbor.hold_api();
    wait_until("a's list is older than 3 discovery intervals", || {
        let h = health(&a);
        h["snapshot_age_seconds"].as_u64().is_some_and(|s| s >= 4)
    });
    assert_eq!(
        common::get(a.addr, "/readyz").status,
        200,
        "ready with an old list"
    );
    // a's link reconnects (and republishes what it has): the list keeps the time it was read.
    redis
        .master_cli(&["CLIENT", "KILL", "TYPE", "normal"])
        .unwrap();
    a.wait_log(|l| l.contains("Redis unavailable"));
    wait_until("a's link is back", || health(&a)["redis"] == "up");
    // A pod started during the outage serves with that list, and says how old it is.
    let c = pod_unready(&bed, &redis, &[("DISCOVERY_INTERVAL", "1s")]);
    wait_redis_up(&c);
    c.wait_log(|l| l.contains("serving with the project list from Redis"));
    let ready = common::get(c.addr, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let v = ready.json();
    assert_eq!(v["provisional"], true, "{v}");
    assert!(
        v["snapshot_age_seconds"].as_u64().unwrap() >= 4,
        "not fresh: {v}"
    );
    assert!(
        c.scrape()["harbor_router_project_list_age_seconds"] >= 4.0,
        "the age is a metric"
    );
    drop(held);
}

#[test]
fn a_pod_that_never_saw_a_tag_answers_it_from_what_another_pod_shared() {
    let redis = RedisSet::start(None).unwrap();
    let bed = bed();
    // No discovery round (and its SET of the project list) while SET calls are counted.
    let quiet = [("DISCOVERY_INTERVAL", "1h")];
    let a = pod(&bed, &redis, &quiet);
    let b = pod(&bed, &redis, &quiet);
    wait_redis_up(&a);
    wait_redis_up(&b);
    let fresh = manifest(&a, "GET", "org/app", "v1");
    assert_eq!(fresh.status, 200);
    let digest = fresh.header("docker-content-digest").unwrap().to_string();
    let tag_keys = || {
        redis
            .master_cli(&["KEYS", "hr:v1:tag:*"])
            .map(|o| o.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    };
    let manifest_key = format!("hr:v1:manifest:{digest}");
    let manifest_kept = || {
        redis
            .master_cli(&["EXISTS", &manifest_key])
            .is_ok_and(|o| o.trim() == "1")
    };
    wait_until("a's tag and its manifest reach Redis", || {
        tag_keys() == 1 && manifest_kept()
    });
    let master = redis.master_port().unwrap();
    let sets = redis.calls(master, "set").unwrap();
    for _ in 0..20 {
        assert_eq!(manifest(&a, "GET", "org/app", "v1").status, 200);
    }
    assert_eq!(
        redis.calls(master, "set").unwrap(),
        sets,
        "a tag confirmed again is not written again"
    );

    // Harbor's database fails, so it serves nothing, not even by digest: b never saw the tag, Redis
    // tells it what a saw, and the manifest a kept under its digest.
    bed.harbor.set_database_down(true);
    let head = manifest(&b, "HEAD", "org/app", "v1");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        head.header("warning"),
        Some("110 harbor-router \"Response is Stale\"")
    );
    let get = manifest(&b, "GET", "org/app", "v1");
    assert_eq!(get.status, 200);
    assert_eq!(get.header("docker-content-digest"), Some(digest.as_str()));
    assert!(get.header("warning").is_some());
    use sha2::Digest as _;
    assert_eq!(
        format!("sha256:{:x}", sha2::Sha256::digest(&get.body)),
        digest,
        "the manifest, from Redis"
    );
    assert_eq!(get.body, fresh.body, "byte for byte");
    // The by-digest GET a client sends next is answered from b's memory.
    let pinned = manifest(&b, "GET", "org/app", &digest);
    assert_eq!(pinned.status, 200);
    assert_eq!(pinned.body, fresh.body);
    bed.harbor.set_database_down(false);

    // Harbor's tag lookups fail (by digest it serves from its store).
    for p in PROJECTS {
        bed.harbor
            .set_fault(p, Fault::TagLookups(Box::new(Fault::Status(503))));
    }
    // A tag nobody resolved has nothing to stand in.
    let res = manifest(&b, "GET", "library/alpine", "3.19");
    assert!(res.status >= 502, "{}", res.status);
    assert_eq!(res.header("warning"), None);

    // The tag's project says it is gone: a forgets it, in Redis too, so a pod that never saw the tag
    // does not stand in for it with the shared copy.
    // (The other projects still fail: the pull fails, and ghcr's 404 is not masked either.)
    bed.harbor
        .set_fault("ghcr", Fault::TagLookups(Box::new(Fault::Status(404))));
    let res = manifest(&a, "GET", "org/app", "v1");
    assert_eq!(res.status, 502);
    assert_eq!(res.header("warning"), None);
    wait_until("the shared tag is deleted", || tag_keys() == 0);
    let c = pod(&bed, &redis, &quiet);
    wait_redis_up(&c);
    for p in PROJECTS {
        bed.harbor
            .set_fault(p, Fault::TagLookups(Box::new(Fault::Status(503))));
    }
    let res = manifest(&c, "HEAD", "org/app", "v1");
    assert_eq!(res.header("warning"), None, "{}", res.status);
}

/// A router sharing through the one Redis endpoint `url` (`REDIS_URL`) of `redis` (whose CA it
/// trusts when `redis` speaks TLS), ready.
fn url_pod(bed: &Testbed, redis: &RedisSet, url: &str, extra: &[(&str, &str)]) -> Router {
    url_pod_trusting(bed, redis.ca_file(), url, extra)
}

fn url_pod_trusting(bed: &Testbed, ca: Option<&Path>, url: &str, extra: &[(&str, &str)]) -> Router {
    let harbor = bed.harbor.url();
    let mut env = common::bed_env(&harbor);
    env.extend([
        ("REDIS_URL", url),
        ("REDIS_READ_TIMEOUT", "2s"),
        ("FANOUT_BUDGET_PER_IP", "100000"),
    ]);
    let ca = ca.map(|p| p.display().to_string());
    if let Some(ca) = &ca {
        env.push(("REDIS_CA_FILE", ca.as_str()));
    }
    env.extend_from_slice(extra);
    let router = Router::start(&env);
    wait_until("the router is ready", || {
        common::get(router.addr, "/readyz").status == 200
    });
    router
}

#[test]
fn one_endpoint_shares_mappings_is_reconnected_after_a_restart_and_never_logs_its_password() {
    one_endpoint(Wire::Plain);
}

#[test]
fn over_tls_one_endpoint_shares_mappings_is_reconnected_after_a_restart_and_never_logs_its_password(
) {
    one_endpoint(Wire::Tls);
}

fn one_endpoint(wire: Wire) {
    let mut redis = endpoint(Some("url-secret-91c2"), wire);
    let port = redis.servers[0].port;
    let bed = bed();
    let bare = redis.url();
    let with = |password: &str| bare.replace("://", &format!("://:{password}@"));
    let url = with("url-secret-91c2");
    let a = url_pod(&bed, &redis, &url, &[]);
    let b = url_pod(&bed, &redis, &url, &[]);
    wait_redis_up(&a);
    wait_redis_up(&b);
    let line = a.wait_log(|l| l.contains("Redis connected"));
    assert!(line.contains("REDIS_URL"), "{line}");

    // A mapping a learns, b uses: no fan-out.
    assert_eq!(manifest(&a, "GET", "org/app", "v1").status, 200);
    wait_until("a's mapping reaches Redis", || {
        redis
            .cli(port, &["GET", "hr:v1:map:org/app"])
            .is_ok_and(|o| o.contains("ghcr"))
    });
    let before = v2_counts(&bed);
    assert_eq!(manifest(&b, "GET", "org/app", "v1").status, 200);
    assert_eq!(grown(&v2_counts(&bed), &before), [0, 1, 0, 0]);

    // The endpoint restarts empty (a managed Redis's failover, as its clients see it): both pods
    // reconnect to it, and sharing goes on.
    let errors = |r: &Router| r.scrape()["harbor_router_redis_errors_total"];
    let (errors_a, errors_b) = (errors(&a), errors(&b));
    redis.restart(port).unwrap();
    for (r, before) in [(&a, errors_a), (&b, errors_b)] {
        wait_until(
            "the pod lost the endpoint and connected to it again",
            || errors(r) > before && health(r)["redis"] == "up",
        );
    }
    let missing = manifest(&a, "GET", "nowhere/image", "v1");
    assert_eq!(missing.status, 404);
    wait_until("a wrote its miss to the restarted server", || {
        redis
            .cli(port, &["KEYS", "hr:v1:miss:*"])
            .is_ok_and(|o| !o.trim().is_empty())
    });
    let before = v2_counts(&bed);
    wait_until("b answers the shared miss without Harbor", || {
        manifest(&b, "GET", "nowhere/image", "v1").status == 404 && v2_counts(&bed) == before
    });

    // A wrong password: the link is down, clients see nothing of it, the password is not logged.
    let wrong = url_pod(&bed, &redis, &with("wrong-91c2"), &[]);
    let line = wrong.wait_log(|l| l.contains("Redis unavailable"));
    assert!(line.contains("REDIS_URL"), "{line}");
    assert_eq!(health(&wrong)["redis"], "down");
    assert_eq!(manifest(&wrong, "GET", "org/app", "v1").status, 200);

    // An ACL user of its own (a managed service's usual way): user and password in the URL.
    redis
        .cli(
            port,
            &[
                "ACL",
                "SETUSER",
                "router",
                "on",
                ">user-secret-4a2f",
                "~hr:*",
                "&*",
                "+@all",
            ],
        )
        .unwrap();
    let user = url_pod(
        &bed,
        &redis,
        &bare.replace("://", "://router:user-secret-4a2f@"),
        &[],
    );
    wait_redis_up(&user);
    let before = v2_counts(&bed);
    assert_eq!(manifest(&user, "GET", "nowhere/image", "v1").status, 404);
    assert_eq!(
        v2_counts(&bed),
        before,
        "the shared miss, read as that user"
    );
    for r in [&a, &b, &wrong, &user] {
        assert!(
            !r.logs().iter().any(|l| l.contains("url-secret-91c2")
                || l.contains("wrong-91c2")
                || l.contains("user-secret-4a2f")),
            "a password never appears in a log"
        );
    }
}

#[test]
fn a_redis_cluster_node_is_named_for_what_it_is_and_changes_nothing_a_client_sees() {
    let redis = RedisSet::cluster_node().unwrap();
    let bed = bed();
    let pod = url_pod(&bed, &redis, &redis.url(), &[]);
    let line = pod.wait_log(|l| l.contains("Redis unavailable"));
    assert!(line.contains("Redis Cluster"), "{line}");
    wait_until("the metric says so", || {
        pod.scrape()["harbor_router_redis_cluster_mode"] == 1.0
    });
    assert_eq!(health(&pod)["redis"], "down");
    assert_eq!(manifest(&pod, "GET", "org/app", "v1").status, 200);
    // Said once, not on every retry.
    assert_eq!(
        pod.logs()
            .iter()
            .filter(|l| l.contains("Redis Cluster"))
            .count(),
        1
    );
    // A single Redis reads 0.
    let single = RedisSet::standalone(None).unwrap();
    let other = url_pod(&bed, &single, &single.url(), &[]);
    wait_redis_up(&other);
    assert_eq!(other.scrape()["harbor_router_redis_cluster_mode"], 0.0);
}

#[test]
fn over_tls_an_untrusted_or_misnamed_certificate_or_a_wrong_password_changes_nothing_a_client_sees()
{
    let redis = endpoint(None, Wire::Tls);
    let port = redis.servers[0].port;
    let stranger = endpoint(None, Wire::Tls);
    let bed = bed();
    // A CA that did not sign the server's certificate; the one that did, for a host name the
    // certificate does not carry (it names 127.0.0.1 only); no TLS at all to a TLS port.
    let untrusted = url_pod_trusting(&bed, stranger.ca_file(), &redis.url(), &[]);
    let misnamed = url_pod(&bed, &redis, &format!("rediss://localhost:{port}"), &[]);
    let plain = url_pod_trusting(&bed, None, &format!("redis://127.0.0.1:{port}"), &[]);
    let sentinels = sentinel_set(Some("tls-right-5e1d"), Wire::Tls);
    let refused = start_pod(
        &bed,
        &sentinels.sentinels_env(),
        Some("tls-wrong-5e1d"),
        sentinels.ca_file(),
        &[],
    );
    // Through Sentinel, with a CA that signed neither the Sentinels' certificates nor the master's.
    let untrusted_sentinels = start_pod(
        &bed,
        &sentinels.sentinels_env(),
        Some("tls-right-5e1d"),
        stranger.ca_file(),
        &[],
    );
    for pod in [&refused, &untrusted_sentinels] {
        wait_until("the pod is ready", || {
            common::get(pod.addr, "/readyz").status == 200
        });
    }
    let cases: [(&Router, &[&str]); 5] = [
        (&untrusted, &["certificate", "REDIS_CA_FILE"]),
        (&misnamed, &["certificate", "localhost"]),
        (&plain, &["rediss://"]),
        (&refused, &["REDIS_PASSWORD"]),
        (
            &untrusted_sentinels,
            &["certificate", "REDIS_CA_FILE", "Sentinel"],
        ),
    ];
    for (pod, says) in cases {
        let line = pod.wait_log(|l| l.contains("Redis unavailable"));
        eprintln!("{line}");
        for word in says {
            assert!(line.contains(word), "{word:?} in {line}");
        }
        assert_eq!(health(pod)["redis"], "down");
        assert_eq!(manifest(pod, "GET", "org/app", "v1").status, 200);
        assert_eq!(manifest(pod, "GET", "nowhere/image", "v1").status, 404);
        assert!(
            !pod.logs().iter().any(|l| l.contains("tls-wrong-5e1d")),
            "the password never appears in a log"
        );
    }
    // Nothing reached the server: every one of them was refused before its first command.
    assert_eq!(data_commands(&redis, port), 0);

    // A plain Redis that is simply not there is not blamed on TLS.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let nobody = url_pod_trusting(&bed, None, &format!("redis://127.0.0.1:{closed_port}"), &[]);
    let line = nobody.wait_log(|l| l.contains("Redis unavailable"));
    assert!(!line.contains("rediss://"), "{line}");
}

#[test]
fn a_redis_ca_file_without_a_certificate_is_refused_at_start_naming_the_variable() {
    let dir = std::env::temp_dir().join(format!("hr-redis-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "not-a-certificate-3b7e\n").unwrap();
    let ca = ca.display().to_string();
    let mut r = Router::spawn({
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_harbor-router"));
        c.env_clear()
            .env("HARBOR_URL", "http://127.0.0.1:9")
            .env("REDIS_URL", "rediss://127.0.0.1:9")
            .env("REDIS_CA_FILE", &ca);
        c
    });
    let status = r.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(64), "a configuration error");
    // stderr is read by a thread of its own: it may lag the exit.
    wait_until("the refusal names the variable", || {
        r.stderr().contains("REDIS_CA_FILE")
    });
    let said = r.stderr();
    assert!(!said.contains("3b7e"), "never the file's content: {said}");
    let _ = std::fs::remove_dir_all(&dir);
}
