//! The pull path end to end: the router binary in front of the stand-in Harbor and the real registry,
//! driven by skopeo and by raw HTTP: each Harbor fact of docs/architecture.md's pull path has a test
//! here (its answers to refused tokens, robots and policies are in tests/harbor.rs).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use testbed::{Fault, Gate, HarborConfig, Held, SeedImage, SeedKind, Seeded, Testbed};

use common::{request, rss, wait_until, Response, Router, DEADLINE};

struct Env {
    bed: Testbed,
    router: Router,
    seeded: Vec<Seeded>,
}

fn image(repository: &str, tag: &str, kind: SeedKind, layer_bytes: usize) -> SeedImage {
    SeedImage {
        repository: repository.into(),
        tag: tag.into(),
        kind,
        layer_bytes,
    }
}

/// A test bed seeded with `images` and a router (one worker unless `env` says otherwise) that has
/// discovered its projects.
fn start(images: &[SeedImage], env: &[(&str, &str)]) -> Env {
    start_with(HarborConfig::default(), images, env, |_| {})
}

fn start_with(
    config: HarborConfig,
    images: &[SeedImage],
    env: &[(&str, &str)],
    before_router: impl FnOnce(&Testbed),
) -> Env {
    let bed = Testbed::start(config).unwrap();
    let seeded = bed.seed(images).unwrap();
    before_router(&bed);
    let url = bed.harbor.url();
    let mut all = common::bed_env(&url);
    all.extend_from_slice(env);
    let router = Router::start(&all);
    wait_until("the router is ready", || {
        common::get(router.addr, "/readyz").status == 200
    });
    Env {
        bed,
        router,
        seeded,
    }
}

impl Env {
    fn get_manifest(&self, name: &str, reference: &str) -> Response {
        self.manifest("GET", name, reference)
    }

    fn manifest(&self, method: &str, name: &str, reference: &str) -> Response {
        common::manifest(self.router.addr, method, name, reference)
    }

    fn manifest_requests(&self, project: &str) -> u64 {
        *self
            .bed
            .harbor
            .counters()
            .manifest_requests
            .get(project)
            .unwrap_or(&0)
    }

    fn v2_requests(&self, project: &str) -> u64 {
        *self
            .bed
            .harbor
            .counters()
            .v2_requests
            .get(project)
            .unwrap_or(&0)
    }

    fn answered(&self, project: &str) -> u64 {
        *self
            .bed
            .harbor
            .counters()
            .answered
            .get(project)
            .unwrap_or(&0)
    }

    /// Runs `requests` (on another thread) and releases `held` once each of `others` has answered
    /// one more request: the held project answers last.
    fn after<T: Send>(
        &self,
        held: &Held,
        others: &[&str],
        requests: impl FnOnce() -> T + Send,
    ) -> T {
        self.after_when(held, others, || true, requests)
    }

    /// Like [`Env::after`], waiting for `ready` too before the release.
    fn after_when<T: Send>(
        &self,
        held: &Held,
        others: &[&str],
        ready: impl Fn() -> bool,
        requests: impl FnOnce() -> T + Send,
    ) -> T {
        let before: Vec<u64> = others.iter().map(|p| self.answered(p)).collect();
        std::thread::scope(|s| {
            let running = s.spawn(requests);
            wait_until("the other projects answered", || {
                others
                    .iter()
                    .zip(&before)
                    .all(|(p, n)| self.answered(p) > *n)
                    && ready()
            });
            held.release();
            running.join().unwrap()
        })
    }

    fn seeded(&self, repository: &str) -> &Seeded {
        self.seeded
            .iter()
            .find(|s| s.repository == repository)
            .unwrap()
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn skopeo(args: &[&str]) -> std::process::Output {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn skopeo_pulls_every_kind_with_the_registry_digests() {
    let env = start(&testbed::default_images(), &[("WORKERS", "2")]);
    let host = env.router.addr.to_string();
    let cases = [
        ("proxy/library/nginx:latest", "dockerhub/library/nginx"), // OCI index
        ("proxy/nginx:latest", "dockerhub/library/nginx"),         // short Docker Hub name
        ("proxy/library/alpine:3.19", "dockerhub/library/alpine"), // Docker manifest list
        ("proxy/org/app:v1", "ghcr/org/app"),                      // OCI manifest
        ("proxy/coreos/etcd:v3.5.0", "quay/coreos/etcd"),          // Docker schema2, two segments
        ("proxy/pause:3.9", "k8s/pause"),                          // schema2 outside Docker Hub
    ];
    let dir = std::env::temp_dir().join(format!("hr-pull-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (reference, repository)) in cases.iter().enumerate() {
        let seeded = env.seeded(repository);
        let src = format!("docker://{host}/{reference}");
        let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &src]).stdout;
        assert_eq!(sha256(&raw), seeded.digest, "{reference}");
        let dest = dir.join(i.to_string());
        let dest = format!("dir:{}", dest.display());
        skopeo(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            &src,
            &dest,
        ]);
        let copied = std::fs::read(dir.join(i.to_string()).join("manifest.json")).unwrap();
        assert_eq!(sha256(&copied), seeded.digest, "{reference} copied");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let tags = skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{host}/proxy/coreos/etcd"),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&tags.stdout).unwrap();
    assert_eq!(v["Tags"], serde_json::json!(["v3.5.0"]));
}

#[test]
fn fan_out_finds_the_only_project_and_then_goes_straight_there() {
    let (env, ghcr) = ghcr_app_held(&[]);
    let res = env.after(&ghcr, &NOT_GHCR, || env.get_manifest("org/app", "v1"));
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("Docker-Content-Digest"),
        Some(env.seeded[0].digest.as_str())
    );
    assert_eq!(sha256(&res.body), env.seeded[0].digest);
    for p in ["dockerhub", "quay", "k8s", "ghcr"] {
        assert_eq!(env.manifest_requests(p), 1, "{p} asked once by the fan-out");
    }
    for _ in 0..3 {
        assert_eq!(env.get_manifest("org/app", "v1").status, 200);
    }
    // A client's own credentials are never sent to Harbor: a bogus token changes nothing.
    let res = request(
        env.router.addr,
        "GET",
        "/v2/proxy/org/app/manifests/v1",
        &[
            "Authorization: Bearer not-a-harbor-token",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ],
    );
    assert_eq!(res.status, 200);
    assert_eq!(env.manifest_requests("ghcr"), 5);
    let seen = env.bed.harbor.counters().authorizations;
    assert!(
        !seen.is_empty(),
        "the router authenticates with its own tokens"
    );
    assert!(
        seen.iter().all(|a| !a.contains("not-a-harbor-token")),
        "the client's Authorization reached Harbor: {seen:?}"
    );
    for p in ["dockerhub", "quay", "k8s"] {
        assert_eq!(
            env.manifest_requests(p),
            1,
            "{p} not asked again: the mapping is used"
        );
    }
}

/// `dockerhub/library/nginx:latest`, an OCI index.
fn nginx_index() -> SeedImage {
    image(
        "dockerhub/library/nginx",
        "latest",
        SeedKind::OciIndex,
        1024,
    )
}

/// The projects other than ghcr.
const NOT_GHCR: [&str; 3] = ["dockerhub", "quay", "k8s"];

/// ghcr holds `org/app:v1`, with its answers held: run a race with [`Env::after`] so that every
/// other project's answer is in before the race ends, and the request counts a test reads are exact.
fn ghcr_app_held(vars: &[(&str, &str)]) -> (Env, Held) {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1024)],
        vars,
    );
    let held = env.bed.harbor.hold("ghcr");
    (env, held)
}

/// One repository name, `shared/img:1`, with different content in quay and in k8s; quay's answers
/// are held (until the returned gate is dropped), so k8s wins a race.
fn same_name_k8s_answering_first() -> (Env, Held) {
    let env = start(
        &[
            image("quay/shared/img", "1", SeedKind::OciManifest, 1024),
            image("k8s/shared/img", "1", SeedKind::OciManifest, 1024),
        ],
        &[],
    );
    let held = env.bed.harbor.hold("quay");
    (env, held)
}

#[test]
fn the_first_project_to_answer_wins() {
    let (env, _quay) = same_name_k8s_answering_first();
    let res = env.get_manifest("shared/img", "1");
    assert_eq!(res.status, 200);
    assert_eq!(
        sha256(&res.body),
        env.seeded("k8s/shared/img").digest,
        "k8s answered first"
    );
    assert_ne!(
        env.seeded("quay/shared/img").digest,
        env.seeded("k8s/shared/img").digest
    );
}

#[test]
fn a_hanging_project_does_not_delay_the_answer() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1024)],
        &[("RESOLVER_TIMEOUT", "30s")],
    );
    env.bed.harbor.set_fault("dockerhub", Fault::Hang);
    let started = Instant::now();
    let res = env.get_manifest("org/app", "v1");
    assert_eq!(res.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// The losers of a race finish after the winner is served: their answers are read and their
/// connections go back to the pool, so the next cold pull opens no connection to Harbor.
#[test]
fn a_race_lets_its_losers_finish_and_their_connections_are_reused() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1024)],
        &[],
    );
    let metric = |name: &str| env.router.scrape().get(name).copied().unwrap_or(0.0);
    let idle = r#"harbor_router_upstream_connections{state="idle"}"#;
    let opened = "harbor_router_upstream_connections_opened_total";
    // Every other project's answer is held: ghcr wins while their requests are in flight.
    let held: Vec<Held> = NOT_GHCR.iter().map(|p| env.bed.harbor.hold(p)).collect();
    let res = env.get_manifest("org/app", "v1");
    assert_eq!(res.status, 200);
    wait_until("every project asked", || {
        NOT_GHCR.iter().all(|p| env.manifest_requests(p) == 1)
    });
    drop(held);
    wait_until("the losers' connections back in the pool", || {
        metric(idle) >= 4.0
    });
    let before = metric(opened);
    let res = env.get_manifest("org/nowhere", "v1");
    assert_eq!(res.status, 404);
    assert_eq!(
        metric(opened),
        before,
        "the second race reused the first one's connections"
    );
}

/// A project that hangs while another wins still has its attempt judged: the circuit opens.
#[test]
fn a_project_that_hangs_while_another_wins_opens_its_circuit() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1024)],
        &[
            ("CIRCUIT_BREAKER_THRESHOLD", "1"),
            ("CIRCUIT_BREAKER_TIMEOUT", "1h"),
            ("RESOLVER_TIMEOUT", "1s"),
        ],
    );
    env.bed.harbor.set_fault("quay", Fault::Hang);
    let res = env.get_manifest("org/app", "v1");
    assert_eq!(res.status, 200, "ghcr won without waiting for quay");
    env.router
        .wait_log(|l| l.contains("circuit opened") && l.contains(r#""project":"quay""#));
}

#[test]
fn circuits_open_on_failures_and_keep_the_project_out() {
    let env = start(
        &[
            image("ghcr/org/app", "v1", SeedKind::OciManifest, 1024),
            image("ghcr/org/other", "v1", SeedKind::OciManifest, 1024),
        ],
        &[
            ("CIRCUIT_BREAKER_THRESHOLD", "1"),
            ("CIRCUIT_BREAKER_TIMEOUT", "1h"),
            // Harbor's errors, not last-known-good tags (tests/stale.rs), are what this shows.
            ("STALE_IF_ERROR", "0s"),
        ],
    );
    env.bed.harbor.set_fault("quay", Fault::Status(503));
    // ghcr answers last, once the router has judged quay's failure (its circuit opened).
    let ghcr = env.bed.harbor.hold("ghcr");
    let quay_open = || {
        env.router
            .logs()
            .iter()
            .any(|l| l.contains("circuit opened") && l.contains(r#""project":"quay""#))
    };
    let res = env.after_when(&ghcr, &NOT_GHCR, quay_open, || {
        env.get_manifest("org/app", "v1")
    });
    assert_eq!(res.status, 200);
    let quay = env.v2_requests("quay");
    assert_eq!(quay, 1);
    // quay's circuit is open: the next fan-out does not ask it.
    let ghcr = env.bed.harbor.hold("ghcr");
    let res = env.after(&ghcr, &["dockerhub", "k8s"], || {
        env.get_manifest("org/other", "v1")
    });
    assert_eq!(res.status, 200);
    assert_eq!(
        env.v2_requests("quay"),
        quay,
        "an open circuit is not asked"
    );
    assert_eq!(env.manifest_requests("dockerhub"), 2);
    // With quay left out, "every project said 404" is not true: 503, and nothing remembered.
    let res = env.get_manifest("no/such", "1");
    assert_eq!(res.status, 503, "a skipped project cannot make a 404");
    assert_eq!(res.error_code(), "UNAVAILABLE");

    // A mapped project that fails opens its circuit; requests then fail fast without asking it.
    env.bed.harbor.set_fault("ghcr", Fault::Status(503));
    let res = env.get_manifest("org/app", "v1");
    assert_eq!(res.status, 503, "Harbor's error is passed on");
    let ghcr = env.v2_requests("ghcr");
    let res = env.get_manifest("org/app", "v1");
    assert_eq!(res.status, 503);
    assert_eq!(res.error_code(), "UNAVAILABLE");
    assert_eq!(env.v2_requests("ghcr"), ghcr, "fail fast: ghcr not asked");
}

#[test]
fn unknown_manifests_are_404_and_remembered_for_a_while() {
    let env = start(&[], &[("NEGATIVE_CACHE_TTL", "5s")]);
    let res = env.get_manifest("no/such", "1");
    assert_eq!(res.status, 404);
    assert_eq!(res.error_code(), "MANIFEST_UNKNOWN");
    let asked = env
        .bed
        .harbor
        .counters()
        .manifest_requests
        .values()
        .sum::<u64>();
    assert_eq!(asked, 4, "every project asked once");
    assert_eq!(env.get_manifest("no/such", "1").status, 404);
    assert_eq!(
        env.bed
            .harbor
            .counters()
            .manifest_requests
            .values()
            .sum::<u64>(),
        asked,
        "the miss is remembered: Harbor not asked again"
    );
    // Another tag of the same name is its own question.
    assert_eq!(env.get_manifest("no/such", "2").status, 404);
    assert_eq!(
        env.bed
            .harbor
            .counters()
            .manifest_requests
            .values()
            .sum::<u64>(),
        asked + 4
    );
    // After NEGATIVE_CACHE_TTL, Harbor is asked again.
    wait_until("Harbor asked again after NEGATIVE_CACHE_TTL", || {
        env.get_manifest("no/such", "1");
        env.bed
            .harbor
            .counters()
            .manifest_requests
            .values()
            .sum::<u64>()
            > asked + 4
    });
}

#[test]
fn one_hundred_concurrent_first_requests_cause_one_fan_out() {
    let (env, ghcr) = ghcr_app_held(&[]);
    let digest = env.seeded[0].digest.clone();
    // ghcr answers once every request has been sent and the other projects have answered.
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let all_sent = || sent.load(std::sync::atomic::Ordering::SeqCst) == 100;
    env.after_when(&ghcr, &NOT_GHCR, all_sent, || {
        std::thread::scope(|s| {
            for _ in 0..100 {
                s.spawn(|| {
                    let mut sock = TcpStream::connect(env.router.addr).unwrap();
                    sock.set_read_timeout(Some(DEADLINE)).unwrap();
                    let mut req = "GET /v2/proxy/org/app/manifests/v1 HTTP/1.1\r\nHost: t\r\n\
                                   Connection: close\r\n"
                        .to_string();
                    for line in common::accept_lines() {
                        req.push_str(&line);
                        req.push_str("\r\n");
                    }
                    req.push_str("\r\n");
                    sock.write_all(req.as_bytes()).unwrap();
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut bytes = Vec::new();
                    sock.read_to_end(&mut bytes).unwrap();
                    let (res, _) = common::parse_response(&bytes);
                    assert_eq!(res.status, 200);
                    assert_eq!(sha256(&res.body), digest);
                });
            }
        })
    });
    for p in ["dockerhub", "quay", "k8s"] {
        assert_eq!(
            env.manifest_requests(p),
            1,
            "{p}: one fan-out for 100 requests"
        );
    }
    assert_eq!(
        env.manifest_requests("ghcr"),
        2,
        "the race's request, then one the 99 waiting requests share"
    );
}

#[test]
fn docker_hub_redirects_are_followed_inside_the_router() {
    // Without registry permissions the router does not know dockerhub is Docker Hub, so it asks
    // for `nginx` and Harbor answers 301 to `library/nginx`.
    let env = start_with(HarborConfig::default(), &[nginx_index()], &[], |bed| {
        bed.harbor.set_registries_forbidden(true)
    });
    let res = env.get_manifest("nginx", "latest");
    assert_eq!(res.status, 200);
    assert_eq!(sha256(&res.body), env.seeded[0].digest);
}

#[test]
fn stale_mappings_are_served_and_refreshed_in_the_background() {
    // RESOLVER_TIMEOUT=1h: a request that waited for the refresh would never be answered.
    let (env, ghcr) = ghcr_app_held(&[
        ("CACHE_TTL", "1s"),
        ("STALE_WHILE_REVALIDATE", "1h"),
        ("RESOLVER_TIMEOUT", "1h"),
    ]);
    let res = env.after(&ghcr, &NOT_GHCR, || env.get_manifest("org/app", "v1"));
    assert_eq!(res.status, 200);
    assert_eq!(env.manifest_requests("dockerhub"), 1);
    // From now on ghcr holds its answers to HEAD requests: the refresh's probe of a manifest. Once
    // the mapping is stale (CACHE_TTL=1s), a request starts a refresh, and is answered from the
    // stale mapping while the refresh waits for ghcr's held answer.
    let _heads = env.bed.harbor.hold_heads("ghcr");
    let mut gets = 0;
    wait_until("a refresh probed ghcr", || {
        let res = env.get_manifest("org/app", "v1");
        assert_eq!(res.status, 200, "a stale mapping is served at once");
        gets += 1;
        env.manifest_requests("ghcr") > 1 + gets
    });
    // The refresh asked every project.
    for p in NOT_GHCR {
        wait_until("the refresh asked every project", || {
            env.manifest_requests(p) == 2
        });
    }
    assert_eq!(env.get_manifest("org/app", "v1").status, 200);
}

#[test]
fn a_mapping_that_turns_404_falls_back_to_one_fan_out() {
    let (env, _quay) = same_name_k8s_answering_first();
    let res = env.get_manifest("shared/img", "1");
    assert_eq!(sha256(&res.body), env.seeded("k8s/shared/img").digest);
    env.bed.harbor.clear_faults();
    env.bed.harbor.set_fault("k8s", Fault::Status(404));
    let res = env.get_manifest("shared/img", "1");
    assert_eq!(res.status, 200);
    assert_eq!(
        sha256(&res.body),
        env.seeded("quay/shared/img").digest,
        "re-learned quay"
    );
}

#[test]
fn rate_limits_pass_through_and_are_not_remembered() {
    let env = start(&[], &[]);
    for p in ["dockerhub", "ghcr", "quay", "k8s"] {
        env.bed.harbor.set_fault(p, Fault::Status(429));
    }
    let res = env.get_manifest("org/app", "v1");
    assert_eq!(res.status, 429);
    assert_eq!(res.error_code(), "TOOMANYREQUESTS");
    // Harbor's 429 carries no Retry-After (src/lib/http/error.go): the router adds its own.
    assert_eq!(res.header("Retry-After"), Some("10"));
    let asked = env.v2_requests("ghcr");
    assert_eq!(env.get_manifest("org/app", "v1").status, 429);
    assert_eq!(env.v2_requests("ghcr"), asked + 1, "not negative-cached");
}

#[test]
fn a_mapped_rate_limit_passes_harbors_error_with_a_retry_after() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1024)],
        // Harbor's error, not a last-known-good tag (tests/stale.rs), is what this shows.
        &[("STALE_IF_ERROR", "0s")],
    );
    assert_eq!(env.get_manifest("org/app", "v1").status, 200);
    env.bed.harbor.set_fault("ghcr", Fault::Status(429));
    let res = env.get_manifest("org/app", "v1");
    assert_eq!(res.status, 429);
    assert_eq!(res.error_code(), "TOO_MANY_REQUEST", "Harbor's own error");
    assert_eq!(res.header("Retry-After"), Some("10"));
}

#[test]
fn manifests_by_digest_are_served_from_memory_with_the_same_headers() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1024)],
        &[],
    );
    let digest = env.seeded[0].digest.clone();
    let first = env.get_manifest("org/app", &digest);
    assert_eq!(first.status, 200);
    let asked = env.manifest_requests("ghcr");
    let second = env.get_manifest("org/app", &digest);
    assert_eq!(
        env.manifest_requests("ghcr"),
        asked,
        "served without asking Harbor"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(sha256(&second.body), digest);
    assert_eq!(first.header("Docker-Content-Digest"), Some(digest.as_str()));
    assert!(first.header("ETag").is_some() && first.header("Content-Type").is_some());
    // A client revalidating what it has gets 304, without a body.
    let etag = format!("If-None-Match: {}", first.header("ETag").unwrap());
    let lines = common::accept_lines();
    let mut extra: Vec<&str> = lines.iter().map(String::as_str).collect();
    extra.push(&etag);
    let revalidated = request(
        env.router.addr,
        "GET",
        &format!("/v2/proxy/org/app/manifests/{digest}"),
        &extra,
    );
    assert_eq!(revalidated.status, 304);
    assert!(revalidated.body.is_empty());
    for h in [
        "Content-Type",
        "Content-Length",
        "Docker-Content-Digest",
        "ETag",
    ] {
        assert_eq!(second.header(h), first.header(h), "{h}");
    }
    // HEAD by tag goes to Harbor: the same headers as GET, the upstream's length, no body.
    let by_tag = env.manifest("HEAD", "org/app", "v1");
    assert_eq!(by_tag.status, 200);
    assert_eq!(
        by_tag.header("Content-Length"),
        first.header("Content-Length")
    );
    assert_eq!(
        by_tag.header("Docker-Content-Digest"),
        Some(digest.as_str())
    );
    assert_eq!(by_tag.header("Content-Type"), first.header("Content-Type"));
    assert!(by_tag.body.is_empty());
    let asked = env.manifest_requests("ghcr");
    // HEAD from memory: headers, no body.
    let head = env.manifest("HEAD", "org/app", &digest);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Content-Length"),
        first.header("Content-Length")
    );
    assert!(head.body.is_empty());
    assert_eq!(env.manifest_requests("ghcr"), asked);
}

#[test]
fn tag_lists_come_from_the_mapped_project_with_the_router_path() {
    let images = [
        image("quay/coreos/etcd", "v1", SeedKind::DockerSchema2, 1024),
        image("quay/coreos/etcd", "v2", SeedKind::DockerSchema2, 1024),
    ];
    let env = start(&images, &[]);
    let res = common::get(env.router.addr, "/v2/proxy/coreos/etcd/tags/list");
    assert_eq!(res.status, 200);
    let v = res.json();
    assert_eq!(v["name"], "proxy/coreos/etcd", "the name is the router's");
    assert_eq!(v["tags"], serde_json::json!(["v1", "v2"]));
    assert_eq!(
        res.header("Content-Length"),
        Some(res.body.len().to_string().as_str())
    );
    // Served from the mapping learned by the fan-out, then from the brief tag-list cache.
    let asked = env.v2_requests("quay");
    assert_eq!(
        common::get(env.router.addr, "/v2/proxy/coreos/etcd/tags/list").json(),
        v
    );
    assert_eq!(env.v2_requests("quay"), asked);
    // A repository no project has: Harbor's 200-empty lists prove nothing, so 404.
    let res = common::get(env.router.addr, "/v2/proxy/no/such/tags/list");
    assert_eq!(res.status, 404);
    assert_eq!(res.error_code(), "NAME_UNKNOWN");
}

/// The digest and size of the largest blob of an image (its layer): its manifest pulled by digest
/// first, so the blob HEADs are answered from its descriptors (Harbor answers HEAD with 404 for a
/// blob it has not cached, and up to v2.15 a ranged GET of one with the whole blob and no length).
fn layer_of(env: &Env, seeded: &Seeded, name: &str) -> (String, u64) {
    assert_eq!(env.get_manifest(name, &seeded.digest).status, 200);
    seeded
        .blobs
        .iter()
        .map(|d| {
            let res = request(
                env.router.addr,
                "HEAD",
                &format!("/v2/proxy/{name}/blobs/{d}"),
                &[],
            );
            assert_eq!(res.status, 200, "HEAD blob {d}");
            let len: u64 = res.header("Content-Length").unwrap().parse().unwrap();
            (d.clone(), len)
        })
        .max_by_key(|(_, len)| *len)
        .unwrap()
}

#[test]
fn blobs_range_head_redirect_and_an_upstream_dying_mid_body() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1 << 20)],
        &[],
    );
    let seeded = env.seeded[0].clone();
    // HEAD before anything was pulled: Harbor would say 404 (#22609); the router answers from a
    // one-byte ranged GET, with the blob's size and digest.
    let (layer, size) = layer_of(&env, &seeded, "org/app");
    assert!(size > 1 << 20);
    let head = request(
        env.router.addr,
        "HEAD",
        &format!("/v2/proxy/org/app/blobs/{layer}"),
        &[],
    );
    assert_eq!(head.header("Docker-Content-Digest"), Some(layer.as_str()));
    assert!(head.body.is_empty());

    let path = format!("/v2/proxy/org/app/blobs/{layer}");
    let full = common::get(env.router.addr, &path);
    assert_eq!(full.status, 200);
    assert_eq!(full.body.len() as u64, size);
    assert_eq!(sha256(&full.body), layer);

    let part = request(env.router.addr, "GET", &path, &["Range: bytes=100-199"]);
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("Content-Range"),
        Some(format!("bytes 100-199/{size}").as_str())
    );
    assert_eq!(part.body, full.body[100..200]);

    // Object storage: Harbor redirects to a presigned URL on another host; passed on untouched.
    let location = "http://storage.example.invalid/blobs/abc?X-Amz-Signature=1";
    env.bed
        .harbor
        .set_fault("ghcr", Fault::RedirectBlobs(location.into()));
    let res = common::get(env.router.addr, &path);
    assert_eq!(res.status, 307);
    assert_eq!(res.header("Location"), Some(location));

    // Harbor dies mid-body: the client's response ends abruptly, never as a complete short body.
    env.bed.harbor.set_fault("ghcr", Fault::ResetMidBody);
    let mut s = TcpStream::connect(env.router.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers were sent")
        + 4;
    let head_text = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    assert!(head_text.starts_with("http/1.1 200"), "{head_text}");
    let body = got.len() - head_end;
    assert!(
        (body as u64) < size,
        "a short body must not look complete ({body} of {size})"
    );
    env.bed.harbor.clear_faults();
    assert_eq!(
        common::get(env.router.addr, &path).status,
        200,
        "the router recovers"
    );
}

/// A keep-alive connection to the router that worker `worker` serves (its `/healthz` says).
fn connection_on(addr: std::net::SocketAddr, worker: u64) -> TcpStream {
    common::wait_for("a connection on the worker", || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(s, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let res = read_response(&mut s);
        (res.json()["worker"] == worker).then_some(s)
    })
}

/// Reads one whole response from a keep-alive connection.
fn read_response(s: &mut TcpStream) -> Response {
    read_answer(s, false)
}

/// Reads one whole response (to a HEAD when `head`: no body follows its head).
fn read_answer(s: &mut TcpStream, head: bool) -> Response {
    let mut buf = Vec::new();
    loop {
        if let Some((res, _)) = common::parse_response_to(&buf, head) {
            return res;
        }
        let mut chunk = [0u8; 65536];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The digest and size of org/app's layer, from its manifest `digest` pulled on `s`.
fn layer_on(s: &mut TcpStream, digest: &str) -> (String, u64) {
    let accept = common::accept_lines().join("\r\n");
    write!(
        s,
        "GET /v2/proxy/org/app/manifests/{digest} HTTP/1.1\r\nHost: t\r\n{accept}\r\n\r\n"
    )
    .unwrap();
    let manifest = read_response(s).json();
    let layer = &manifest["layers"][0];
    (
        layer["digest"].as_str().unwrap().to_string(),
        layer["size"].as_u64().unwrap(),
    )
}

/// GETs `path` on `on_0` (worker 0) and, once that request is at Harbor (held there), on `on_1`
/// (worker 1), which joins worker 0's transfer; then lets Harbor answer.
fn worker_0_leads_and_worker_1_joins(
    env: &Env,
    on_0: &mut TcpStream,
    on_1: &mut TcpStream,
    path: &str,
) {
    let before = env.v2_requests("ghcr");
    let held = env.bed.harbor.hold("ghcr");
    write!(on_0, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    wait_until("worker 0's request reached Harbor", || {
        env.v2_requests("ghcr") == before + 1
    });
    write!(on_1, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    wait_until("worker 1's pull joined worker 0's transfer", || {
        let m = env.router.scrape();
        m["harbor_router_shared_transfers"] == 1.0
            && m["harbor_router_shared_transfer_readers"] == 2.0
    });
    held.release();
}

#[test]
fn identical_blob_pulls_on_two_cores_share_one_request_to_harbor() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1 << 20)],
        &[("WORKERS", "2")],
    );
    let seeded = env.seeded[0].clone();
    let mut on_0 = connection_on(env.router.addr, 0);
    let mut on_1 = connection_on(env.router.addr, 1);
    // The layer, from the manifest (which also tells both cores where org/app is).
    let (layer, size) = layer_on(&mut on_0, &seeded.digest);
    let path = format!("/v2/proxy/org/app/blobs/{layer}");
    let before = env.v2_requests("ghcr");
    worker_0_leads_and_worker_1_joins(&env, &mut on_0, &mut on_1, &path);
    for s in [&mut on_0, &mut on_1] {
        let res = read_response(s);
        assert_eq!(res.status, 200);
        assert_eq!(res.body.len() as u64, size);
        assert_eq!(sha256(&res.body), layer, "every byte, on both cores");
    }
    assert_eq!(
        env.v2_requests("ghcr"),
        before + 1,
        "one request to Harbor for two pulls on two cores"
    );
    let scrape = env.router.scrape();
    assert_eq!(
        scrape[r#"harbor_router_shared_requests_total{kind="blob"}"#],
        1.0
    );
    assert_eq!(scrape["harbor_router_shared_bytes_total"], size as f64);
    assert_eq!(scrape["harbor_router_shared_fallouts_total"], 0.0);
}

/// Sends `method path` on a keep-alive connection and reads the answer.
fn on(s: &mut TcpStream, method: &str, path: &str) -> Response {
    let accept = common::accept_lines().join("\r\n");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: t\r\n{accept}\r\n\r\n").unwrap();
    read_answer(s, method == "HEAD")
}

#[test]
fn pulls_within_the_linger_are_answered_from_the_last_identical_one() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1 << 20)],
        &[("WORKERS", "2"), ("COALESCE_LINGER", "1s")],
    );
    let seeded = env.seeded[0].clone();
    let mut on_0 = connection_on(env.router.addr, 0);
    let mut on_1 = connection_on(env.router.addr, 1);
    let (layer, size) = layer_on(&mut on_0, &seeded.digest);
    layer_on(&mut on_1, &seeded.digest);

    // A tag: one request per core while it lingers; a HEAD takes a GET's answer.
    let tag = "/v2/proxy/org/app/manifests/v1";
    let before = env.v2_requests("ghcr");
    let first = on(&mut on_0, "GET", tag);
    assert_eq!(first.status, 200);
    let again = on(&mut on_0, "GET", tag);
    let head = on(&mut on_0, "HEAD", tag);
    assert_eq!(again.body, first.body);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Docker-Content-Digest"),
        first.header("Docker-Content-Digest")
    );
    assert_eq!(
        env.v2_requests("ghcr"),
        before + 1,
        "one request on worker 0"
    );
    assert_eq!(on(&mut on_1, "GET", tag).body, first.body);
    assert_eq!(env.v2_requests("ghcr"), before + 2, "and one on worker 1");

    // A blob of at most two windows: one transfer for the pod, one after the other.
    let path = format!("/v2/proxy/org/app/blobs/{layer}");
    let before = env.v2_requests("ghcr");
    let shared_before = env.router.scrape()["harbor_router_shared_bytes_total"];
    for worker in [0, 1, 0] {
        let s = if worker == 0 { &mut on_0 } else { &mut on_1 };
        let res = on(s, "GET", &path);
        assert_eq!(res.status, 200);
        assert_eq!(res.body.len() as u64, size);
        assert_eq!(sha256(&res.body), layer);
    }
    assert_eq!(
        env.v2_requests("ghcr"),
        before + 1,
        "one request to Harbor for three pulls, one after the other, on two cores"
    );
    let m = env.router.scrape();
    assert_eq!(m["harbor_router_shared_transfers"], 1.0, "it lingers");
    assert_eq!(
        m["harbor_router_shared_transfer_reserved_bytes"],
        size as f64
    );
    assert_eq!(
        m["harbor_router_shared_bytes_total"] - shared_before,
        2.0 * size as f64
    );
    // Its time up, it goes by itself, and the next pull asks Harbor.
    wait_until("the lingering blob went", || {
        let m = env.router.scrape();
        m["harbor_router_shared_transfers"] == 0.0
            && m["harbor_router_shared_transfer_reserved_bytes"] == 0.0
    });
    assert_eq!(sha256(&on(&mut on_1, "GET", &path).body), layer);
    assert_eq!(env.v2_requests("ghcr"), before + 2);
}

#[test]
fn a_pull_that_learns_the_mapping_during_its_cores_fan_out_takes_the_fan_outs_answer() {
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1 << 10)],
        &[("WORKERS", "2"), ("COALESCE_LINGER", "2s")],
    );
    let tag = "/v2/proxy/org/app/manifests/v1";
    let mut a = connection_on(env.router.addr, 0);
    let mut b = connection_on(env.router.addr, 0);
    let mut c = connection_on(env.router.addr, 1);
    // A's HEAD leads worker 0's fan-out, held at ghcr.
    let gate = Gate::new();
    env.bed
        .harbor
        .set_fault("ghcr", Fault::HoldHeads(gate.clone()));
    let before = env.manifest_requests("ghcr");
    let accept = common::accept_lines().join("\r\n");
    write!(a, "HEAD {tag} HTTP/1.1\r\nHost: t\r\n{accept}\r\n\r\n").unwrap();
    wait_until("A's fan-out reached ghcr", || {
        env.manifest_requests("ghcr") > before
    });
    // Worker 1 finds org/app with a GET (not held): the pod now knows where it is.
    assert_eq!(on(&mut c, "GET", tag).status, 200);
    let known = env.manifest_requests("ghcr");
    // B's HEAD on worker 0 goes by the mapping, and waits for A's fan-out rather than ask.
    let waited = env.router.scrape()["harbor_router_fanout_coalesced_total"];
    write!(b, "HEAD {tag} HTTP/1.1\r\nHost: t\r\n{accept}\r\n\r\n").unwrap();
    wait_until("B waits for A's fan-out", || {
        env.router.scrape()["harbor_router_fanout_coalesced_total"] > waited
    });
    gate.release();
    env.bed.harbor.clear_faults();
    for s in [&mut a, &mut b] {
        let res = read_answer(s, true);
        assert_eq!(res.status, 200);
        assert!(res.header("Docker-Content-Digest").is_some());
    }
    assert_eq!(
        env.manifest_requests("ghcr"),
        known,
        "B is answered by A's fan-out, not by a request of its own"
    );
}

#[test]
fn a_slow_reader_of_a_shared_blob_falls_out_and_completes_on_its_own() {
    // A 64 KiB window and a 32 MiB layer: the reader that does not read is left behind.
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 32 << 20)],
        &[("SHARED_BLOB_WINDOW", "64KiB")],
    );
    let seeded = env.seeded[0].clone();
    let mut fast = connection_on(env.router.addr, 0);
    let mut slow = connection_on(env.router.addr, 0);
    let (layer, _) = layer_on(&mut fast, &seeded.digest);
    let path = format!("/v2/proxy/org/app/blobs/{layer}");
    let held = env.bed.harbor.hold("ghcr");
    write!(fast, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    write!(slow, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    wait_until("both pulls read one transfer", || {
        env.router.scrape()["harbor_router_shared_transfer_readers"] == 2.0
    });
    held.release();
    let res = read_response(&mut fast);
    assert_eq!(sha256(&res.body), layer);
    // The slow reader was left a window behind: it goes on with a request of its own.
    let res = read_response(&mut slow);
    assert_eq!(res.status, 200);
    assert_eq!(sha256(&res.body), layer, "every byte, once, in order");
    assert_eq!(
        env.router.scrape()["harbor_router_shared_fallouts_total"],
        1.0
    );
}

#[test]
fn a_follower_completes_when_the_leaders_core_drains_first() {
    // Worker 0 leads, worker 1 follows; neither client reads, so the pump waits on them. The
    // leader's client goes away, so worker 0 has nothing left to drain at SIGTERM and stops first,
    // with its pump. The follower must still get every byte: what was buffered, then the rest on
    // a request of its own.
    let mut env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 32 << 20)],
        &[("WORKERS", "2")],
    );
    let seeded = env.seeded[0].clone();
    let mut on_0 = connection_on(env.router.addr, 0);
    let mut on_1 = connection_on(env.router.addr, 1);
    // Small receive buffers, so neither client takes much of the layer before it reads.
    small_receive_buffer(&on_0);
    small_receive_buffer(&on_1);
    let (layer, size) = layer_on(&mut on_0, &seeded.digest);
    let path = format!("/v2/proxy/org/app/blobs/{layer}");
    let before = env.v2_requests("ghcr");
    worker_0_leads_and_worker_1_joins(&env, &mut on_0, &mut on_1, &path);
    // The leader's client reads the head, then goes away (a reset: its bytes are unread).
    let mut head = [0u8; 64];
    on_0.read_exact(&mut head).unwrap();
    drop(on_0);
    wait_until("the leader's client is gone", || {
        env.router.scrape()["harbor_router_shared_transfer_readers"] == 1.0
    });
    let m = env.router.scrape();
    assert_eq!(
        m["harbor_router_shared_fallouts_total"], 0.0,
        "the follower is still in the transfer"
    );
    env.router.signal(libc::SIGTERM);
    env.router
        .wait_log(|l| l.contains(r#""worker":0"#) && l.contains(r#""message":"drained""#));
    let res = read_response(&mut on_1);
    assert_eq!(res.status, 200);
    assert_eq!(res.body.len() as u64, size);
    assert_eq!(sha256(&res.body), layer, "every byte, once, in order");
    assert_eq!(
        env.v2_requests("ghcr"),
        before + 2,
        "the transfer, then the follower's own request for the rest"
    );
    drop(on_1);
    assert!(env.router.wait_exit(DEADLINE).success());
}

#[test]
fn the_shared_blob_budget_bounds_what_transfers_reserve() {
    // A budget of two 64 KiB windows: room for one transfer. The second blob in the air goes
    // alone, as without sharing, and both arrive whole.
    let env = start(
        &[image("ghcr/org/app", "v1", SeedKind::OciManifest, 1 << 20)],
        &[
            ("SHARED_BLOB_WINDOW", "64KiB"),
            ("SHARED_BLOB_BUDGET", "128KiB"),
        ],
    );
    let seeded = env.seeded[0].clone();
    let mut a = connection_on(env.router.addr, 0);
    let mut b = connection_on(env.router.addr, 0);
    let accept = common::accept_lines().join("\r\n");
    write!(
        a,
        "GET /v2/proxy/org/app/manifests/{} HTTP/1.1\r\nHost: t\r\n{accept}\r\n\r\n",
        seeded.digest
    )
    .unwrap();
    let manifest = read_response(&mut a).json();
    let blob = |v: &serde_json::Value| v["digest"].as_str().unwrap().to_string();
    let (layer, config) = (blob(&manifest["layers"][0]), blob(&manifest["config"]));
    let before = env.v2_requests("ghcr");
    let held = env.bed.harbor.hold("ghcr");
    write!(
        a,
        "GET /v2/proxy/org/app/blobs/{layer} HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    .unwrap();
    write!(
        b,
        "GET /v2/proxy/org/app/blobs/{config} HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    .unwrap();
    wait_until("both pulls reached Harbor", || {
        env.v2_requests("ghcr") == before + 2
    });
    let m = env.router.scrape();
    assert_eq!(
        m["harbor_router_shared_transfers"], 1.0,
        "one transfer fits"
    );
    assert_eq!(
        m["harbor_router_shared_transfer_reserved_bytes"],
        (128 << 10) as f64,
        "two windows reserved"
    );
    held.release();
    for (s, digest) in [(&mut a, &layer), (&mut b, &config)] {
        let res = read_response(s);
        assert_eq!(res.status, 200);
        assert_eq!(&sha256(&res.body), digest);
    }
    wait_until("the reservation is given back", || {
        env.router.scrape()["harbor_router_shared_transfer_reserved_bytes"] == 0.0
    });
}

/// Caps `s`'s receive buffer at 64 KiB (loopback's autotuning would grow it to tens of MiB).
fn small_receive_buffer(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 64 << 10;
    // SAFETY: a valid socket and an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
}

/// Resident memory of a process, in bytes.
#[test]
fn a_256_mib_blob_streams_to_a_slow_reader_in_flat_memory() {
    let env = start(
        &[image(
            "ghcr/big/blob",
            "1",
            SeedKind::OciManifest,
            256 << 20,
        )],
        &[],
    );
    let seeded = env.seeded[0].clone();
    let (layer, size) = layer_of(&env, &seeded, "big/blob");
    assert!(size >= 256 << 20);
    // Framed, as Harbor main (and any version, for a blob it holds) sends it, so the reader below
    // counts body bytes without unchunking; the hashed, chunked path is tests/outage.rs's.
    env.bed
        .harbor
        .set_uncached_blobs(testbed::UncachedBlobs::Framed);
    let pid = env.router.pid();
    let before = rss(pid);
    let done = std::sync::atomic::AtomicBool::new(false);
    let peak = std::thread::scope(|s| {
        let _done = common::SetOnDrop(&done);
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let mut sock = TcpStream::connect(env.router.addr).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            sock,
            "GET /v2/proxy/big/blob/blobs/{layer} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        let mut body = 0u64;
        let mut reads = 0u64;
        loop {
            let n = sock.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            let mut chunk = &buf[..n];
            if head.len() < 4 || !head.ends_with(b"\r\n\r\n") {
                // Still in the head: split it off byte by byte (it is small).
                let mut i = 0;
                while i < chunk.len() && !head.ends_with(b"\r\n\r\n") {
                    head.push(chunk[i]);
                    i += 1;
                }
                chunk = &chunk[i..];
            }
            hasher.update(chunk);
            body += chunk.len() as u64;
            reads += 1;
            // A slow reader: the router must hold back, not buffer.
            if reads % 8 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
        assert_eq!(body, size);
        assert_eq!(format!("sha256:{:x}", hasher.finalize()), layer);
        sampler.join().unwrap()
    });
    let growth = peak.saturating_sub(before);
    eprintln!(
        "router RSS {} MiB before, {} MiB peak while streaming {} MiB",
        before >> 20,
        peak >> 20,
        size >> 20
    );
    assert!(
        growth < 32 << 20,
        "RSS grew by {} MiB streaming {} MiB",
        growth >> 20,
        size >> 20
    );
}

#[test]
fn a_miss_is_remembered_per_accept_set() {
    let env = start(&[nginx_index()], &[("NEGATIVE_CACHE_TTL", "1h")]);
    // Harbor answers from its own store what it holds (its upstream not asked), through its
    // registry with the client's Accept lines: pulled once, then the upstream is refused.
    assert_eq!(env.get_manifest("nginx", "latest").status, 200);
    env.bed
        .harbor
        .set_upstream("dockerhub", testbed::Upstream::Refused);
    // Without an OCI Accept the registry refuses an OCI index: 404 for this client ...
    let docker_only = "Accept: application/vnd.docker.distribution.manifest.v2+json";
    let res = request(
        env.router.addr,
        "GET",
        "/v2/proxy/nginx/manifests/latest",
        &[docker_only],
    );
    assert_eq!(res.status, 404);
    assert!(
        res.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("OCI index found"),
        "the registry's own words: {:?}",
        res.json()
    );
    // ... which must not become the answer for clients that do accept it.
    let res = env.get_manifest("nginx", "latest");
    assert_eq!(res.status, 200);
    assert_eq!(sha256(&res.body), env.seeded[0].digest);
}

#[test]
fn a_missing_tag_does_not_unmap_the_image() {
    let (env, ghcr) = ghcr_app_held(&[]);
    let res = env.after(&ghcr, &NOT_GHCR, || env.get_manifest("org/app", "v1"));
    assert_eq!(res.status, 200);
    let res = env.get_manifest("org/app", "no-such-tag");
    assert_eq!(res.status, 404);
    assert_eq!(res.error_code(), "MANIFEST_UNKNOWN");
    let others: u64 = ["dockerhub", "quay", "k8s"]
        .iter()
        .map(|p| env.manifest_requests(p))
        .sum();
    assert_eq!(env.get_manifest("org/app", "v1").status, 200);
    let after: u64 = ["dockerhub", "quay", "k8s"]
        .iter()
        .map(|p| env.manifest_requests(p))
        .sum();
    assert_eq!(after, others, "the mapping survived: only ghcr was asked");
}

#[test]
fn a_client_choosing_long_names_cannot_open_a_circuit() {
    let env = start(&[nginx_index()], &[("CIRCUIT_BREAKER_THRESHOLD", "3")]);
    // `dockerhub/library/<name>` longer than the registry's 255 characters: the registry would
    // answer 500. Such a project is not asked; where the name fits, no answer a name provokes
    // counts against the project.
    for len in [238, 240, 245, 250, 251, 252, 253] {
        let res = env.get_manifest(&"x".repeat(len), "1");
        assert!(
            res.status < 500 || res.status == 502,
            "{len}: {}",
            res.status
        );
    }
    assert_eq!(
        env.v2_requests("dockerhub"),
        0,
        "names too long for dockerhub"
    );
    let res = env.get_manifest("nginx", "latest");
    assert_eq!(res.status, 200, "Docker Hub pulls still work");
    assert_eq!(sha256(&res.body), env.seeded[0].digest);
    let res = env.get_manifest(&"x".repeat(254), "1");
    assert_eq!(res.status, 400, "too long for every project");
    assert_eq!(res.error_code(), "NAME_INVALID");
}

#[test]
fn a_fan_out_asks_the_token_service_once_for_every_project() {
    let env = start(&[], &[]);
    // The first fan-out meets Harbor's challenge and learns where its token service is.
    assert_eq!(env.get_manifest("warm/up", "1").status, 404);
    let tokens = || env.bed.harbor.counters().token_requests;
    let before = tokens();
    for i in 0..10 {
        let res = env.get_manifest(&format!("random/n{i}"), "1");
        assert_eq!(res.status, 404);
    }
    assert_eq!(
        tokens() - before,
        10,
        "one token request per fan-out, for the four projects' scopes at once"
    );
    // Each project was asked once per fan-out, with a token that worked.
    for p in ["dockerhub", "ghcr", "quay", "k8s"] {
        assert_eq!(env.manifest_requests(p), 11, "{p}");
    }
}
