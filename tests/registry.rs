//! The registry logic in process, in milliseconds: a core's [`State`] on a monoio runtime in the test
//! thread, requests handed to the registry handler directly, and an in-process fake of Harbor's
//! `/v2/` answers that can hold a project's answers until the test releases them. Events are ordered
//! by holding answers and by waiting on conditions, never by sleeping; time that must pass (mapping
//! expiry, breaker timeouts) is moved with the state's clock.
//!
//! What the real-registry tests (`tests/pull.rs`) check end to end with skopeo, these check at the
//! level of single decisions: fan-out winner and losers, breakers open and half-open, stale refresh,
//! negative cache, coalescing, and that client requests and background refreshes judge the same
//! answers the same way.

mod common;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;

use harbor_router::registry::handle::handle;
use harbor_router::registry::testing::{self, TestCore};
use harbor_router::registry::State;
use harbor_router::server::Peer;
use harbor_router::snapshot::{self, Project, SharedSnapshot, Snapshot, UpstreamKind};

use common::fake_harbor::{Answer, FakeHarbor};
use common::{run, DEADLINE};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const APP: &str = "/v2/proxy/org/app/manifests/v1";
const BLOB: &str =
    "/v2/proxy/org/app/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A manifest as Harbor answers one it holds: with its digest (so a GET by tag streams it).
fn manifest() -> Answer {
    const BODY: &[u8] = br#"{"schemaVersion":2}"#;
    let digest = format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(BODY));
    Answer::with(
        200,
        &[
            ("content-type", MANIFEST_TYPE),
            ("docker-content-digest", &digest),
        ],
        BODY,
    )
}

/// One core's state in front of `fake`, with `projects` discovered (in that order).
fn state(fake: &FakeHarbor, projects: &[&str], vars: &[(&str, &str)]) -> TestCore {
    // Each request meets Harbor's answer of the moment, not one lingering from the last.
    let mut all = vec![("WORKERS", "1"), ("COALESCE_LINGER", "0")];
    all.extend_from_slice(vars);
    let config = common::config(&fake.url(), &all);
    let snapshot: SharedSnapshot = snapshot::shared();
    snapshot.store(Some(Arc::new(Snapshot {
        projects: projects
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let id = i as i64 + 1;
                let kind = UpstreamKind::Other("quay".into());
                Project::new(name.to_string(), id, id, kind, None)
            })
            .collect(),
        built_at: Instant::now(),
        generation: 1,
        harbor: Default::default(),
        provisional: false,
    })));
    testing::core(&config, snapshot)
}

struct Answered {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn send(state: &Rc<State>, method: &str, path: &str) -> Answered {
    send_from(state, "192.0.2.1", method, path).await
}

/// A request as it comes from a client at `ip`.
async fn send_from(state: &Rc<State>, ip: &str, method: &str, path: &str) -> Answered {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("accept", MANIFEST_TYPE)
        .body(())
        .unwrap();
    let peer = format!("{ip}:40000").parse().unwrap();
    req.extensions_mut().insert(Peer(peer));
    let res = handle(state, req).await;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Answered {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A request whose body is read as far as it goes: `Err` when the transfer was cut.
async fn send_raw(state: &Rc<State>, path: &str) -> (StatusCode, Result<Bytes, std::io::Error>) {
    let req = Request::builder()
        .uri(path)
        .header("accept", MANIFEST_TYPE)
        .body(())
        .unwrap();
    let (parts, body) = handle(state, req).await.into_parts();
    (parts.status, body.collect().await.map(|c| c.to_bytes()))
}

async fn get(state: &Rc<State>, path: &str) -> Answered {
    send(state, "GET", path).await
}

/// The same request, on its own task (so the test can act while it waits).
fn spawn_get(state: &Rc<State>, path: &'static str) -> monoio::task::JoinHandle<Answered> {
    let state = state.clone();
    harbor_router::task::spawn(async move { get(&state, path).await })
}

/// Waits (without blocking the runtime) until `f` holds, up to [`DEADLINE`].
async fn until(what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < end, "never happened: {what}");
        monoio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The mapping of `name` right now: its project and whether it is stale.
async fn mapping(core: &TestCore, name: &str) -> Option<(String, bool)> {
    core.mapping(name).await
}

fn error_code(a: &Answered) -> String {
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    v["errors"][0]["code"].as_str().unwrap_or("").to_string()
}

#[test]
fn the_first_win_ends_the_race_and_the_losers_finish_after_it() {
    let fake = FakeHarbor::start();
    fake.answer("b", manifest());
    fake.hold("b");
    fake.hold("c");
    run(async {
        let s = state(&fake, &["a", "b", "c"], &[]);
        let pending = spawn_get(&s, APP);
        until("every project asked", || {
            ["a", "b", "c"].iter().all(|p| fake.requests(p) == 1)
        })
        .await;
        fake.release("b");
        // b's answer is served while c's request is still in flight.
        let res = pending.await;
        assert_eq!(res.status, StatusCode::OK);
        assert_eq!(&res.body[..], br#"{"schemaVersion":2}"#);
        assert_eq!(res.headers["content-type"], MANIFEST_TYPE);
        assert_eq!(mapping(&s, "org/app").await, Some(("b".into(), false)));
        // c answers later: its request was not cancelled, and its connection is pooled again.
        fake.release("c");
        until("c's connection back in the pool", || {
            s.upstream().idle_count() == 3
        })
        .await;
        assert_eq!(fake.cancelled("c"), 0);
        let opened = s.upstream().pool_stats().connections_opened;
        // Learned: the next request goes to b alone, on a pooled connection.
        assert_eq!(get(&s, APP).await.status, StatusCode::OK);
        assert_eq!(
            (fake.requests("a"), fake.requests("b"), fake.requests("c")),
            (1, 2, 1)
        );
        assert_eq!(s.upstream().pool_stats().connections_opened, opened);
    });
}

#[test]
fn losers_past_the_idle_connection_limit_are_cancelled() {
    let fake = FakeHarbor::start();
    fake.answer("b", manifest());
    fake.hold("a");
    fake.hold("c");
    run(async {
        // Two losers, room for one idle connection: they are dropped with the race.
        let vars = [
            ("MAX_IDLE_CONNS_PER_HOST", "1"),
            ("RESOLVER_TIMEOUT", "60s"),
        ];
        let s = state(&fake, &["a", "b", "c"], &vars);
        let res = get(&s, APP).await;
        assert_eq!(res.status, StatusCode::OK);
        until("the losers' requests cancelled", || {
            fake.cancelled("a") == 1 && fake.cancelled("c") == 1
        })
        .await;
    });
}

#[test]
fn concurrent_misses_on_a_core_share_one_fan_out() {
    let fake = FakeHarbor::start();
    fake.answer("b", manifest());
    fake.hold("b");
    run(async {
        let s = state(&fake, &["a", "b"], &[]);
        let pending: Vec<_> = (0..10).map(|_| spawn_get(&s, APP)).collect();
        until("the leader's race reached both projects", || {
            fake.requests("a") == 1 && fake.requests("b") == 1
        })
        .await;
        fake.release("b");
        for p in pending {
            assert_eq!(p.await.status, StatusCode::OK);
        }
        assert_eq!(fake.requests("a"), 1, "one fan-out for ten requests");
        assert_eq!(
            fake.requests("b"),
            2,
            "the race's request, then one the waiting requests share"
        );
    });
}

/// Returns once every task spawned before it has been polled (the core's run queue is first in,
/// first out): each has gone as far as it can without Harbor's answer.
async fn polled() {
    harbor_router::task::spawn(async {}).await;
}

/// A state whose core knows org/app is in b (one GET answered), with `vars`.
async fn mapped_state(fake: &FakeHarbor, vars: &[(&str, &str)]) -> TestCore {
    let s = state(fake, &["a", "b"], vars);
    fake.answer("b", manifest());
    assert_eq!(get(&s, APP).await.status, StatusCode::OK);
    assert_eq!(fake.requests("b"), 1);
    s
}

fn spawn_send(
    state: &Rc<State>,
    method: &'static str,
    path: &'static str,
) -> monoio::task::JoinHandle<Answered> {
    let state = state.clone();
    harbor_router::task::spawn(async move { send(&state, method, path).await })
}

#[test]
fn identical_mapped_pulls_on_a_core_share_one_request_and_heads_join_a_get() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[]).await;
        fake.hold("b");
        let gets: Vec<_> = (0..10).map(|_| spawn_get(&s, APP)).collect();
        until("the leader's request reached b", || fake.requests("b") == 2).await;
        let heads: Vec<_> = (0..5).map(|_| spawn_send(&s, "HEAD", APP)).collect();
        // The HEADs reach the flight before the answer comes.
        polled().await;
        fake.release("b");
        let want = manifest();
        for g in gets {
            let res = g.await;
            assert_eq!(res.status, StatusCode::OK);
            assert_eq!(
                res.body, want.body,
                "every follower gets the whole manifest"
            );
            assert_eq!(
                res.headers["content-length"],
                want.body.len().to_string().as_str()
            );
            assert!(res.headers.contains_key("docker-content-digest"));
        }
        for h in heads {
            let res = h.await;
            assert_eq!(res.status, StatusCode::OK);
            assert!(res.body.is_empty(), "a HEAD gets no body");
            assert_eq!(
                res.headers["content-length"],
                want.body.len().to_string().as_str()
            );
        }
        assert_eq!(
            fake.requests("b"),
            2,
            "one request for ten GETs and five HEADs"
        );
    });
}

/// Ten cold HEADs of one tag on a core, held at `b` until the fan-out reached it; the requests `b`
/// got for them.
async fn cold_heads(fake: &FakeHarbor, linger: &str) -> u64 {
    let s = state(fake, &["a", "b"], &[("COALESCE_LINGER", linger)]);
    let before = fake.requests("b");
    fake.hold("b");
    let heads: Vec<_> = (0..10).map(|_| spawn_send(&s, "HEAD", APP)).collect();
    until("the fan-out reached b", || fake.requests("b") == before + 1).await;
    polled().await;
    fake.release("b");
    for h in heads {
        let res = h.await;
        assert_eq!(res.status, StatusCode::OK);
        assert!(res.headers.contains_key("docker-content-digest"));
    }
    fake.requests("b") - before
}

#[test]
fn a_cold_fan_outs_waiters_take_its_winners_answer_within_the_linger() {
    let fake = FakeHarbor::start();
    fake.answer("b", manifest());
    run(async {
        assert_eq!(
            cold_heads(&fake, "2s").await,
            1,
            "the fan-out's request answers the pulls that waited for it"
        );
        assert_eq!(
            cold_heads(&fake, "0").await,
            2,
            "without the linger, they ask the project the fan-out found once more"
        );
    });
}

#[test]
fn a_head_never_leads_a_get_and_conditional_pulls_go_alone() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[]).await;
        fake.hold("b");
        let head = spawn_send(&s, "HEAD", APP);
        until("the HEAD reached b", || fake.requests("b") == 2).await;
        let other_head = spawn_send(&s, "HEAD", APP);
        let get = spawn_get(&s, APP);
        until("the GET sent its own request", || fake.requests("b") == 3).await;
        // A conditional GET is its asker's alone.
        let conditional = {
            let s = s.clone();
            harbor_router::task::spawn(async move {
                let req = Request::builder()
                    .uri(APP)
                    .header("accept", MANIFEST_TYPE)
                    .header("if-none-match", "\"sha256:x\"")
                    .body(())
                    .unwrap();
                handle(&s, req).await.status()
            })
        };
        until("the conditional GET sent its own request", || {
            fake.requests("b") == 4
        })
        .await;
        fake.release("b");
        assert_eq!(head.await.status, StatusCode::OK);
        assert_eq!(other_head.await.status, StatusCode::OK);
        let got = get.await;
        assert_eq!(got.body, manifest().body, "the GET has its body");
        assert_eq!(conditional.await, StatusCode::OK);
        assert_eq!(fake.requests("b"), 4, "the second HEAD joined the first");
    });
}

#[test]
fn followers_of_a_failed_tag_answer_from_its_last_known_good_digest() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[]).await;
        fake.answer("b", Answer::status(503));
        fake.answer("a", Answer::status(503));
        fake.hold("b");
        let gets: Vec<_> = (0..5).map(|_| spawn_get(&s, APP)).collect();
        until("the leader's request reached b", || fake.requests("b") == 2).await;
        polled().await;
        fake.release("b");
        for g in gets {
            let res = g.await;
            assert_eq!(res.status, StatusCode::OK, "stale, not Harbor's 503");
            assert_eq!(res.body, manifest().body);
            assert!(res.headers["warning"].to_str().unwrap().contains("110"));
        }
        assert_eq!(fake.requests("b"), 2, "the failure was shared too");
    });
}

#[test]
fn with_coalescing_off_each_pull_sends_its_own_request() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[("COALESCE_PULLS", "false")]).await;
        fake.hold("b");
        let gets: Vec<_> = (0..5).map(|_| spawn_get(&s, APP)).collect();
        until("every pull reached b", || fake.requests("b") == 6).await;
        fake.release("b");
        for g in gets {
            assert_eq!(g.await.status, StatusCode::OK);
        }
    });
}

#[test]
fn a_breaker_opens_after_failures_and_lets_one_probe_through_when_half_open() {
    let fake = FakeHarbor::start();
    fake.answer("a", Answer::status(503));
    run(async {
        let s = state(
            &fake,
            &["a", "b"],
            &[
                ("CIRCUIT_BREAKER_THRESHOLD", "2"),
                ("CIRCUIT_BREAKER_TIMEOUT", "30s"),
            ],
        );
        for name in ["one", "two"] {
            let res = get(&s, &format!("/v2/proxy/{name}/manifests/1")).await;
            assert_eq!(res.status, StatusCode::BAD_GATEWAY, "a failed, b said 404");
        }
        assert_eq!(fake.requests("a"), 2);
        // Open: a is left out, so "not here" cannot be proven.
        let res = get(&s, "/v2/proxy/three/manifests/1").await;
        assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(&res), "UNAVAILABLE");
        assert_eq!(fake.requests("a"), 2, "an open circuit is not asked");
        assert_eq!(fake.requests("b"), 3);

        // Half-open after the timeout: one probe, held; a second request meanwhile skips a.
        s.advance(Duration::from_secs(31));
        fake.answer("a", Answer::status(404));
        fake.hold("a");
        let probe = spawn_get(&s, "/v2/proxy/four/manifests/1");
        until("the probe reached a", || fake.requests("a") == 3).await;
        let res = get(&s, "/v2/proxy/five/manifests/1").await;
        assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(fake.requests("a"), 3, "one probe at a time");
        fake.release("a");
        assert_eq!(
            probe.await.status,
            StatusCode::NOT_FOUND,
            "the probe succeeded"
        );
        // Closed again.
        let res = get(&s, "/v2/proxy/six/manifests/1").await;
        assert_eq!(res.status, StatusCode::NOT_FOUND);
        assert_eq!(fake.requests("a"), 4);
    });
}

#[test]
fn a_probe_cancelled_with_its_request_frees_the_half_open_slot() {
    let fake = FakeHarbor::start();
    fake.answer("a", Answer::status(502));
    run(async {
        let s = state(&fake, &["a"], &[("CIRCUIT_BREAKER_THRESHOLD", "1")]);
        assert_eq!(get(&s, APP).await.status, StatusCode::BAD_GATEWAY);
        s.advance(Duration::from_secs(3600));
        fake.hold("a");
        // The client goes away once its probe reached a: its request (and the probe) are dropped.
        monoio::select! {
            _ = get(&s, "/v2/proxy/x/manifests/1") => panic!("a held project answered"),
            _ = until("the probe reached a", || fake.requests("a") == 2) => {}
        }
        until("the probe's request cancelled", || fake.cancelled("a") == 1).await;
        fake.release("a");
        fake.answer("a", manifest());
        assert_eq!(
            get(&s, "/v2/proxy/y/manifests/1").await.status,
            StatusCode::OK,
            "the next request may probe"
        );
    });
}

#[test]
fn a_stale_mapping_answers_at_once_and_is_refreshed_in_the_background() {
    let fake = FakeHarbor::start();
    fake.answer("b", manifest());
    run(async {
        let s = state(
            &fake,
            &["a", "b"],
            &[("CACHE_TTL", "10s"), ("STALE_WHILE_REVALIDATE", "1h")],
        );
        assert_eq!(get(&s, APP).await.status, StatusCode::OK);
        s.advance(Duration::from_secs(11));
        assert_eq!(mapping(&s, "org/app").await, Some(("b".into(), true)));
        // The refresh's probe (a HEAD) is held at b: the clients do not wait for it.
        fake.hold("b HEAD");
        for _ in 0..2 {
            let res = get(&s, APP).await;
            assert_eq!(res.status, StatusCode::OK, "served from the stale mapping");
        }
        until("the refresh probed b", || {
            fake.seen("HEAD /v2/b/org/app/manifests/v1") == 1
        })
        .await;
        assert_eq!(
            fake.seen("GET /v2/b/org/app/manifests/v1"),
            3,
            "one fan-out, then the two stale requests"
        );
        fake.release("b HEAD");
        until("the refresh re-learned the mapping", || {
            futures_util::FutureExt::now_or_never(mapping(&s, "org/app"))
                == Some(Some(("b".into(), false)))
        })
        .await;
        assert_eq!(
            fake.seen("HEAD /v2/b/"),
            1,
            "one refresh for the two stale requests"
        );
    });
}

#[test]
fn misses_are_remembered_for_negative_cache_ttl_and_failures_are_not() {
    let fake = FakeHarbor::start();
    run(async {
        let s = state(&fake, &["a", "b"], &[("NEGATIVE_CACHE_TTL", "30s")]);
        for _ in 0..2 {
            let res = get(&s, APP).await;
            assert_eq!(res.status, StatusCode::NOT_FOUND);
            assert_eq!(error_code(&res), "MANIFEST_UNKNOWN");
        }
        assert_eq!((fake.requests("a"), fake.requests("b")), (1, 1));
        s.advance(Duration::from_secs(30));
        assert_eq!(get(&s, APP).await.status, StatusCode::NOT_FOUND);
        assert_eq!(
            (fake.requests("a"), fake.requests("b")),
            (2, 2),
            "asked again once the miss expired"
        );
        // A race with a failure proves nothing: not remembered.
        fake.answer("a", Answer::status(503));
        let other = "/v2/proxy/org/other/manifests/1";
        for _ in 0..2 {
            assert_eq!(get(&s, other).await.status, StatusCode::BAD_GATEWAY);
        }
        assert_eq!(fake.requests("b"), 4);
    });
}

/// Whether a fan-out for a client's `method path` learns a mapping when the one project answers
/// `answer`, and whether a background refresh of a stale mapping re-learns it: the two must agree.
fn client_and_refresh_verdicts(method: &str, path: &str, answer: &Answer) -> (bool, bool) {
    (
        client_verdict(method, path, answer),
        refresh_verdict(method, path, answer),
    )
}

/// Whether a fan-out for a client's `method path` learns a mapping when the one project answers
/// `answer`.
fn client_verdict(method: &str, path: &str, answer: &Answer) -> bool {
    let name = "org/app";
    {
        let fake = FakeHarbor::start();
        fake.answer("a", answer.clone());
        run(async {
            let s = state(&fake, &["a"], &[]);
            send(&s, method, path).await;
            // A HEAD refused without a challenge has no body to say whether the project was
            // deleted; the router asks the repository's tag list (n=0) once to tell.
            let told = method == "HEAD" && answer.status == 401;
            assert_eq!(
                fake.requests("a"),
                1 + u64::from(told),
                "the fan-out asked a"
            );
            assert_eq!(
                fake.seen("GET /v2/a/org/app/tags/list?n=0"),
                usize::from(told),
                "a tag list asked only to read a HEAD's bare 401: {:?}",
                fake.log()
            );
            mapping(&s, name).await.is_some()
        })
    }
}

/// Whether a background refresh of a stale mapping re-learns it when the one project answers
/// `answer` to the refresh's probe.
fn refresh_verdict(method: &str, path: &str, answer: &Answer) -> bool {
    let name = "org/app";
    {
        let fake = FakeHarbor::start();
        fake.answer("a", answer.clone());
        run(async {
            let s = state(
                &fake,
                &["a"],
                &[("CACHE_TTL", "10s"), ("STALE_WHILE_REVALIDATE", "1h")],
            );
            s.learn(name, "a");
            s.advance(Duration::from_secs(11));
            send(&s, method, path).await;
            // The client's request, one more when the mapped project said 404 (a fan-out), and
            // the refresh's probe; each HEAD refused without a challenge (the client's and the
            // probe's) asks the tag list once more.
            let asked = match (method, answer.status) {
                (_, 404) => 3,
                ("HEAD", 401) => 4,
                _ => 2,
            };
            until("the refresh probed a", || fake.requests("a") == asked).await;
            until("the refresh ended", || !s.refreshing(name)).await;
            mapping(&s, name).await == Some(("a".into(), false))
        })
    }
}

#[test]
fn client_requests_and_refreshes_judge_the_same_answers_the_same_way() {
    let tags = "/v2/proxy/org/app/tags/list";
    let elsewhere = [("location", "http://127.0.0.1:1/storage/blob")];
    let cases = [
        // A blob HEAD goes up as a one-byte ranged GET.
        (
            "HEAD",
            BLOB,
            Answer::with(206, &[("content-range", "bytes 0-0/10")], b"x"),
            true,
        ),
        (
            "HEAD",
            BLOB,
            Answer::with(416, &[("content-range", "bytes */0")], b""),
            true,
        ),
        ("HEAD", BLOB, Answer::with(307, &elsewhere, b""), true),
        ("GET", BLOB, Answer::with(307, &elsewhere, b""), true),
        ("HEAD", BLOB, Answer::status(404), false),
        ("HEAD", BLOB, Answer::status(401), false),
        ("HEAD", BLOB, Answer::status(429), false),
        ("HEAD", BLOB, Answer::status(500), false),
        ("HEAD", BLOB, Answer::status(503), false),
        ("HEAD", APP, manifest(), true),
        ("GET", APP, manifest(), true),
        ("HEAD", APP, Answer::with(307, &elsewhere, b""), false),
        ("HEAD", APP, Answer::status(404), false),
        ("HEAD", APP, Answer::status(503), false),
    ];
    for (method, path, answer, wins) in cases {
        let (client, refresh) = client_and_refresh_verdicts(method, path, &answer);
        let what = format!("{method} {path} answered {}", answer.status);
        assert_eq!(client, wins, "client request: {what}");
        assert_eq!(refresh, wins, "background refresh: {what}");
    }
    // A tag list never starts a refresh (Harbor lists the upstream's whole repository for it:
    // refresh::probe_of); a client's fan-out judges it.
    let listed = [
        (br#"{"name":"x","tags":["1"]}"#.as_slice(), true),
        (br#"{"name":"x","tags":[]}"#.as_slice(), false),
    ];
    for (body, wins) in listed {
        let answer = Answer::with(200, &[], body);
        assert_eq!(client_verdict("GET", tags, &answer), wins, "{body:?}");
    }
}

#[test]
fn answers_a_client_can_provoke_never_open_a_circuit() {
    let fake = FakeHarbor::start();
    run(async {
        // Harbor's errors are what this shows, not a last-known-good tag standing in for them.
        let s = state(
            &fake,
            &["a", "b"],
            &[("CIRCUIT_BREAKER_THRESHOLD", "1"), ("STALE_IF_ERROR", "0s")],
        );
        // What a client gets by choosing a name or a reference: a registry's 500 for a name it
        // refuses, 400, 401, 403, 404. None may cost the project its place in fan-outs.
        for (i, status) in [500, 400, 401, 403, 404, 500].into_iter().enumerate() {
            fake.answer("a", Answer::status(status));
            get(&s, &format!("/v2/proxy/n{i}/manifests/1")).await;
            assert_eq!(
                fake.requests("a"),
                i as u64 + 1,
                "a still asked after a {status}"
            );
        }
        // A mapped request judged the same way.
        fake.answer("a", manifest());
        assert_eq!(get(&s, APP).await.status, StatusCode::OK);
        fake.answer("a", Answer::status(500));
        assert_eq!(get(&s, APP).await.status.as_u16(), 500, "passed on");
        fake.answer("a", manifest());
        assert_eq!(
            get(&s, APP).await.status,
            StatusCode::OK,
            "not failing fast"
        );
    });
}

#[test]
fn a_project_where_the_name_would_be_too_long_is_not_asked() {
    let fake = FakeHarbor::start();
    fake.answer("a", manifest());
    fake.answer("pppppppppp", manifest());
    run(async {
        let s = state(&fake, &["a", "pppppppppp"], &[]);
        // "a/" + 250 fits the registry's 255 characters; "pppppppppp/" + 250 does not.
        let fits_a = format!("/v2/proxy/{}/manifests/1", "n".repeat(250));
        assert_eq!(get(&s, &fits_a).await.status, StatusCode::OK);
        assert_eq!((fake.requests("a"), fake.requests("pppppppppp")), (1, 0));
        // Too long for every project: refused, nobody asked.
        let fits_none = format!("/v2/proxy/{}/manifests/1", "n".repeat(254));
        let res = get(&s, &fits_none).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST);
        assert_eq!(error_code(&res), "NAME_INVALID");
        assert_eq!((fake.requests("a"), fake.requests("pppppppppp")), (1, 0));
    });
}

#[test]
fn harbor_session_cookies_never_reach_a_client() {
    let fake = FakeHarbor::start();
    fake.answer(
        "a",
        Answer::with(
            200,
            &[
                ("content-type", MANIFEST_TYPE),
                ("set-cookie", "sid=robot-session; Path=/; HttpOnly"),
                ("connection", "x-private"),
                ("x-private", "1"),
            ],
            br#"{"schemaVersion":2}"#,
        ),
    );
    run(async {
        let s = state(&fake, &["a"], &[]);
        for _ in 0..2 {
            // The fan-out's answer, then the mapped request's.
            let res = get(&s, APP).await;
            assert_eq!(res.status, StatusCode::OK);
            assert!(res.headers.get("set-cookie").is_none(), "{:?}", res.headers);
            assert!(
                res.headers.get("x-private").is_none(),
                "named by Connection"
            );
        }
    });
}

fn by_digest(algorithm: &str, body: &[u8]) -> String {
    use sha2::Digest;
    let hex = match algorithm {
        "sha256" => format!("{:x}", sha2::Sha256::digest(body)),
        "sha384" => format!("{:x}", sha2::Sha384::digest(body)),
        _ => format!("{:x}", sha2::Sha512::digest(body)),
    };
    format!("/v2/proxy/org/app/manifests/{algorithm}:{hex}")
}

#[test]
fn every_manifest_by_digest_is_verified_before_a_byte_is_sent() {
    let good = br#"{"schemaVersion":2}"#;
    for algorithm in ["sha256", "sha384", "sha512"] {
        for chunked in [false, true] {
            let fake = FakeHarbor::start();
            let answer = |body: &[u8]| {
                let a = Answer::with(200, &[("content-type", MANIFEST_TYPE)], body);
                if chunked {
                    a.chunked()
                } else {
                    a
                }
            };
            run(async {
                let s = state(&fake, &["a"], &[]);
                let what = format!("{algorithm}, chunked: {chunked}");
                fake.answer("a", answer(b"{\"schemaVersion\":2,\"evil\":1}"));
                let (status, body) = send_raw(&s, &by_digest(algorithm, good)).await;
                assert_eq!(status, StatusCode::BAD_GATEWAY, "{what}");
                assert!(
                    !body.unwrap().starts_with(b"{\"schemaVersion\":2,"),
                    "{what}"
                );
                fake.answer("a", answer(good));
                let (status, body) = send_raw(&s, &by_digest(algorithm, good)).await;
                assert_eq!(status, StatusCode::OK, "{what}");
                assert_eq!(&body.unwrap()[..], good, "{what}");
            });
        }
    }
}

#[test]
fn manifests_larger_than_4_mib_are_refused_or_cut() {
    let big = vec![b' '; (4 << 20) + 1];
    let fake = FakeHarbor::start();
    run(async {
        let s = state(&fake, &["a"], &[]);
        // Announced: refused before any byte.
        fake.answer(
            "a",
            Answer::with(200, &[("content-type", MANIFEST_TYPE)], &big),
        );
        let (status, _) = send_raw(&s, APP).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        // Not announced (chunked), with its digest: streamed and cut at the limit, a transfer the
        // client sees truncated.
        let digest = format!("sha256:{}", "0".repeat(64));
        let headers = [
            ("content-type", MANIFEST_TYPE),
            ("docker-content-digest", digest.as_str()),
        ];
        fake.answer("a", Answer::with(200, &headers, &big).chunked());
        let solo = state(&fake, &["a"], &[("COALESCE_PULLS", "false")]);
        for _ in 0..2 {
            // (The first is a fan-out's answer, the second a mapped one.)
            let (status, body) = send_raw(&solo, APP).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "the head went out before the size was known"
            );
            assert!(body.is_err(), "cut, never complete-looking");
        }
        // A mapped pull that may be shared is read whole before its head goes out: refused.
        assert_eq!(send_raw(&s, APP).await.0, StatusCode::BAD_GATEWAY);
        s.learn("org/app", "a");
        let (status, _) = send_raw(&s, APP).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "read whole, too large");
        // Without its digest (Harbor's answer to a tag it fetched upstream): read whole to hash it,
        // so refused outright.
        fake.answer(
            "a",
            Answer::with(200, &[("content-type", MANIFEST_TYPE)], &big).chunked(),
        );
        let (status, _) = send_raw(&s, APP).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        // By digest: read whole first, so refused outright.
        let (status, _) = send_raw(&s, &by_digest("sha256", &big)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        // At the limit exactly: passed on, streamed with its digest and read whole without one.
        let limit = vec![b' '; 4 << 20];
        for with_digest in [true, false] {
            let headers: &[(&str, &str)] = if with_digest {
                &headers
            } else {
                &[("content-type", MANIFEST_TYPE)]
            };
            fake.answer("a", Answer::with(200, headers, &limit).chunked());
            let (status, body) = send_raw(&s, APP).await;
            assert_eq!(status, StatusCode::OK, "with digest: {with_digest}");
            assert_eq!(body.unwrap().len(), 4 << 20, "with digest: {with_digest}");
        }
    });
}

#[test]
fn the_registrys_own_404_is_passed_on_when_the_projects_agree() {
    let telling = |message: &str| {
        Answer::with(
            404,
            &[("content-type", "application/json")],
            format!(r#"{{"errors":[{{"code":"MANIFEST_UNKNOWN","message":"{message}"}}]}}"#)
                .as_bytes(),
        )
    };
    let oci = "OCI index found, but accept header does not support OCI indexes";
    let fake = FakeHarbor::start();
    fake.answer("a", telling(oci));
    fake.answer("b", telling("manifest unknown"));
    run(async {
        let s = state(&fake, &["a", "b"], &[]);
        for _ in 0..2 {
            // The fan-out, then the remembered miss: the same words.
            let res = get(&s, APP).await;
            assert_eq!(res.status, StatusCode::NOT_FOUND);
            let v: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
            assert_eq!(v["errors"][0]["message"], oci, "{v}");
            assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
        }
        assert_eq!(fake.requests("a"), 1);
        // Projects that say different things: the router's own error.
        fake.answer("b", telling("something else entirely"));
        let res = get(&s, "/v2/proxy/org/other/manifests/1").await;
        let v: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
        assert_eq!(
            v["errors"][0]["detail"],
            "no proxy-cache project has this manifest"
        );
    });
}

#[test]
fn a_client_cannot_spend_more_than_its_fan_out_budget() {
    let fake = FakeHarbor::start();
    fake.answer_path("/v2/b/org/app/", manifest());
    run(async {
        // One fan-out a second, bursts of five.
        let s = state(&fake, &["a", "b"], &[("FANOUT_BUDGET_PER_IP", "1")]);
        let unknown = |i: usize| format!("/v2/proxy/random/n{i}/manifests/1");
        for i in 0..5 {
            let res = send_from(&s, "198.51.100.7", "GET", &unknown(i)).await;
            assert_eq!(res.status, StatusCode::NOT_FOUND, "within the burst");
        }
        let asked = fake.requests("a");
        let res = send_from(&s, "198.51.100.7", "GET", &unknown(5)).await;
        assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error_code(&res), "TOOMANYREQUESTS");
        assert_eq!(res.headers["retry-after"], "1");
        assert_eq!(fake.requests("a"), asked, "Harbor not asked");
        // What it already knows costs nothing: a remembered miss, a mapped name.
        let res = send_from(&s, "198.51.100.7", "GET", &unknown(0)).await;
        assert_eq!(res.status, StatusCode::NOT_FOUND);
        assert_eq!(
            send_from(&s, "203.0.113.9", "GET", APP).await.status,
            StatusCode::OK
        );
        assert_eq!(
            send_from(&s, "198.51.100.7", "GET", APP).await.status,
            StatusCode::OK
        );
        // Other clients keep their cold pulls.
        let res = send_from(&s, "203.0.113.9", "GET", &unknown(6)).await;
        assert_eq!(res.status, StatusCode::NOT_FOUND);
        // The budget refills with time.
        s.advance(Duration::from_secs(1));
        let res = send_from(&s, "198.51.100.7", "GET", &unknown(7)).await;
        assert_eq!(res.status, StatusCode::NOT_FOUND);
    });
}

#[test]
fn with_a_fanout_order_the_preferred_project_wins_even_when_it_answers_last() {
    let fake = FakeHarbor::start();
    fake.answer("a", manifest());
    fake.answer("b", manifest());
    fake.hold("b");
    run(async {
        let s = state(&fake, &["a", "b"], &[("FANOUT_ORDER", "b,a")]);
        let pending = spawn_get(&s, APP);
        until("both projects asked", || {
            fake.requests("a") == 1 && fake.requests("b") == 1
        })
        .await;
        // a has answered (a win); b, preferred, answers later and still wins.
        fake.release("b");
        assert_eq!(pending.await.status, StatusCode::OK);
        assert_eq!(mapping(&s, "org/app").await, Some(("b".into(), false)));
    });
}

#[test]
fn a_second_choice_is_learned_briefly_and_the_preferred_project_takes_over() {
    let fake = FakeHarbor::start();
    fake.answer("a", manifest());
    fake.answer("b", Answer::with(503, &[], b""));
    run(async {
        let s = state(
            &fake,
            &["a", "b"],
            &[
                ("FANOUT_ORDER", "b,a"),
                ("CACHE_TTL", "300s"),
                ("STALE_WHILE_REVALIDATE", "1h"),
            ],
        );
        assert_eq!(
            get(&s, APP).await.status,
            StatusCode::OK,
            "a serves while b fails"
        );
        assert_eq!(mapping(&s, "org/app").await, Some(("a".into(), false)));
        // A second choice goes stale after 30 s, not CACHE_TTL.
        s.advance(Duration::from_secs(31));
        assert_eq!(mapping(&s, "org/app").await, Some(("a".into(), true)));
        fake.answer("b", manifest());
        assert_eq!(get(&s, APP).await.status, StatusCode::OK);
        until("the refresh moved the mapping to b", || {
            futures_util::FutureExt::now_or_never(mapping(&s, "org/app"))
                == Some(Some(("b".into(), false)))
        })
        .await;
    });
}

/// Harbor's 404 body with `message`, as `src/lib/http/error.go` writes it.
fn harbor_404(message: &str) -> Answer {
    let body = serde_json::json!({"errors": [{"code": "NOT_FOUND", "message": message}]});
    Answer::with(
        404,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

#[test]
fn harbors_local_store_404_is_remembered_briefly_and_the_upstreams_for_the_negative_life() {
    let fake = FakeHarbor::start();
    run(async {
        let s = state(&fake, &["a", "b"], &[("NEGATIVE_CACHE_TTL", "1h")]);
        // The upstream said "not found": remembered for NEGATIVE_CACHE_TTL.
        fake.answer("a", harbor_404("repo a/org/app, tag v1 not found"));
        fake.answer("b", harbor_404("repo b/org/app, tag v1 not found"));
        assert_eq!(get(&s, APP).await.status, StatusCode::NOT_FOUND);
        s.advance(Duration::from_secs(600));
        assert_eq!(get(&s, APP).await.status, StatusCode::NOT_FOUND);
        assert_eq!((fake.requests("a"), fake.requests("b")), (1, 1));

        // One project's local store answered (its upstream could not be asked): seconds only.
        let other = "/v2/proxy/org/other/manifests/v1";
        fake.answer("b", harbor_404("artifact b/org/other:v1 not found"));
        fake.answer("a", harbor_404("repo a/org/other, tag v1 not found"));
        let res = get(&s, other).await;
        assert_eq!(res.status, StatusCode::NOT_FOUND);
        assert_eq!(
            get(&s, other).await.status,
            StatusCode::NOT_FOUND,
            "within its life: not asked again"
        );
        assert_eq!(fake.requests("b"), 2);
        s.advance(Duration::from_secs(6));
        // The upstream is back: the image is found at once.
        fake.answer("b", manifest());
        assert_eq!(get(&s, other).await.status, StatusCode::OK);
        assert_eq!(fake.requests("b"), 3);
    });
}

#[test]
fn harbors_local_store_404_never_erases_a_last_known_good_tag_nor_opens_a_circuit() {
    let fake = FakeHarbor::start();
    fake.answer("a", manifest());
    run(async {
        let s = state(&fake, &["a"], &[("CIRCUIT_BREAKER_THRESHOLD", "1")]);
        assert_eq!(get(&s, APP).await.status, StatusCode::OK);
        // The upstream is down and Harbor does not hold the tag locally: its unsure 404, answered.
        fake.answer("a", harbor_404("artifact a/org/app:v1 not found"));
        for _ in 0..3 {
            s.advance(Duration::from_secs(6));
            let res = get(&s, APP).await;
            assert_eq!(res.status, StatusCode::NOT_FOUND);
            assert!(
                res.headers.get("warning").is_none(),
                "an answer, not stood in for"
            );
        }
        // Each pull: the mapped request's 404, then the fan-out's; no circuit opened.
        assert_eq!(fake.requests("a"), 1 + 3 * 2, "asked every time");
        // Then Harbor fails: the tag stands in, as the 404s did not erase it.
        fake.answer("a", Answer::status(503));
        s.advance(Duration::from_secs(6));
        let res = get(&s, APP).await;
        assert_eq!(res.status, StatusCode::OK);
        assert!(res.headers.get("warning").is_some());

        // A sure 404 from the tag's project forgets it.
        fake.answer("a", manifest());
        s.advance(Duration::from_secs(60));
        assert_eq!(get(&s, APP).await.status, StatusCode::OK);
        fake.answer("a", harbor_404("repo a/org/app, tag v1 not found"));
        assert_eq!(get(&s, APP).await.status, StatusCode::NOT_FOUND);
        fake.answer("a", Answer::status(503));
        s.advance(Duration::from_secs(3600));
        let res = get(&s, APP).await;
        assert_ne!(res.status, StatusCode::OK, "forgotten");
        assert!(res.headers.get("warning").is_none(), "forgotten");
    });
}

/// A blob as Harbor answers one it holds: with its length and digest, `len` bytes.
fn blob(len: usize) -> (Answer, Vec<u8>) {
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let digest = BLOB.rsplit('/').next().unwrap();
    let answer = Answer::with(
        200,
        &[
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", digest),
        ],
        &body,
    );
    (answer, body)
}

fn spawn_raw(
    state: &Rc<State>,
    path: &'static str,
) -> monoio::task::JoinHandle<(StatusCode, Result<Bytes, std::io::Error>)> {
    let state = state.clone();
    harbor_router::task::spawn(async move { send_raw(&state, path).await })
}

/// The blob requests b received, with their ranges.
fn blob_requests(fake: &FakeHarbor) -> Vec<String> {
    fake.log()
        .into_iter()
        .filter(|l| l.contains("/blobs/"))
        .collect()
}

/// `n` GETs of the blob while b holds its answers, released once the first reached b and the
/// others went as far as they can without it.
async fn held_blob_pulls(
    fake: &FakeHarbor,
    s: &Rc<State>,
    n: usize,
) -> Vec<monoio::task::JoinHandle<(StatusCode, Result<Bytes, std::io::Error>)>> {
    let before = blob_requests(fake).len();
    fake.hold("b");
    let pulls: Vec<_> = (0..n).map(|_| spawn_raw(s, BLOB)).collect();
    until("the leader's request reached b", || {
        blob_requests(fake).len() == before + 1
    })
    .await;
    polled().await;
    fake.release("b");
    pulls
}

#[test]
fn identical_blob_pulls_share_one_transfer_and_a_failure_ends_them_all() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[]).await;
        let (answer, body) = blob(300_000);
        fake.answer("b", answer.clone());
        for p in held_blob_pulls(&fake, &s, 4).await {
            let (status, got) = p.await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(got.unwrap(), body, "every reader gets every byte");
        }
        assert_eq!(blob_requests(&fake).len(), 1, "one transfer for four pulls");

        // Harbor dies mid-body: every reader's transfer ends with an error, none looks complete.
        fake.answer("b", answer.cut_after(100_000));
        for p in held_blob_pulls(&fake, &s, 3).await {
            let (status, got) = p.await;
            assert_eq!(status, StatusCode::OK, "the head went out first");
            assert!(got.is_err(), "cut, never a short body that looks complete");
        }
        assert_eq!(blob_requests(&fake).len(), 2);
        // No later pull joins the failed transfer.
        fake.answer("b", blob(300_000).0);
        let (status, got) = send_raw(&s, BLOB).await;
        assert_eq!((status, got.unwrap()), (StatusCode::OK, body.into()));
        assert_eq!(blob_requests(&fake).len(), 3);
    });
}

#[test]
fn a_shared_blob_outlives_its_first_client_and_a_slow_reader_continues_alone() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[("SHARED_BLOB_WINDOW", "64KiB")]).await;
        let (answer, body) = blob(1 << 20);
        fake.answer("b", answer);
        fake.hold("b");
        // The first client takes the head and goes away; the second still gets every byte.
        let first = {
            let s = s.clone();
            harbor_router::task::spawn(async move {
                let req = Request::builder().uri(BLOB).body(()).unwrap();
                handle(&s, req).await.status()
            })
        };
        until("the leader's request reached b", || {
            blob_requests(&fake).len() == 1
        })
        .await;
        let second = spawn_raw(&s, BLOB);
        polled().await;
        fake.release("b");
        assert_eq!(first.await, StatusCode::OK);
        let (status, got) = second.await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            got.unwrap(),
            body,
            "the transfer went on without its first client"
        );
        assert_eq!(blob_requests(&fake).len(), 1);

        // A reader that does not read while another reads everything falls out of the window and
        // continues on a request of its own from where it was (Harbor ignores the range here and
        // sends the whole blob: its first bytes are skipped).
        fake.hold("b");
        let fast = spawn_raw(&s, BLOB);
        until("the leader's request reached b", || {
            blob_requests(&fake).len() == 2
        })
        .await;
        let slow = {
            let s = s.clone();
            harbor_router::task::spawn(async move {
                let req = Request::builder().uri(BLOB).body(()).unwrap();
                handle(&s, req).await
            })
        };
        polled().await;
        fake.release("b");
        // The slow reader takes its head and a first frame, then stops.
        let slow = slow.await;
        assert_eq!(slow.status(), StatusCode::OK);
        let mut slow = slow.into_body();
        let first = slow.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(!first.is_empty() && first.len() < body.len());
        let (status, got) = fast.await;
        assert_eq!(
            (status, got.unwrap()),
            (StatusCode::OK, body.clone().into())
        );
        let rest = slow.collect().await.unwrap().to_bytes();
        assert_eq!(
            [&first[..], &rest[..]].concat(),
            body,
            "every byte, in order, once"
        );
        let requests = blob_requests(&fake);
        assert_eq!(requests.len(), 3, "{requests:?}");
        let range = format!("range=bytes={}-", first.len());
        assert!(requests[2].ends_with(&range), "{requests:?}");
    });
}

#[test]
fn ranged_blob_pulls_and_pulls_with_coalescing_off_go_alone() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[]).await;
        fake.answer("b", blob(10_000).0);
        fake.hold("b");
        let ranged: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                harbor_router::task::spawn(async move {
                    let req = Request::builder()
                        .uri(BLOB)
                        .header("range", "bytes=0-99")
                        .body(())
                        .unwrap();
                    handle(&s, req).await.status()
                })
            })
            .collect();
        until("each ranged pull sent its own request", || {
            blob_requests(&fake).len() == 3
        })
        .await;
        fake.release("b");
        for p in ranged {
            p.await;
        }

        let fake = FakeHarbor::start();
        let off = mapped_state(&fake, &[("COALESCE_PULLS", "false")]).await;
        fake.answer("b", blob(10_000).0);
        fake.hold("b");
        let pulls: Vec<_> = (0..3).map(|_| spawn_raw(&off, BLOB)).collect();
        until("each pull sent its own request", || {
            blob_requests(&fake).len() == 3
        })
        .await;
        fake.release("b");
        for p in pulls {
            assert_eq!(p.await.0, StatusCode::OK);
        }
    });
}

#[test]
fn a_ranged_pull_joins_a_whole_transfer_in_progress_and_gets_its_slice() {
    let fake = FakeHarbor::start();
    run(async {
        let s = mapped_state(&fake, &[]).await;
        let (answer, body) = blob(300_000);
        fake.answer("b", answer);
        fake.hold("b");
        let whole = spawn_raw(&s, BLOB);
        until("the leader's request reached b", || {
            blob_requests(&fake).len() == 1
        })
        .await;
        let ranged = |range: &'static str| {
            let s = s.clone();
            harbor_router::task::spawn(async move {
                let req = Request::builder()
                    .uri(BLOB)
                    .header("range", range)
                    .body(())
                    .unwrap();
                let (parts, b) = handle(&s, req).await.into_parts();
                (parts, b.collect().await.unwrap().to_bytes())
            })
        };
        let middle = ranged("bytes=1000-1999");
        let tail = ranged("bytes=299990-");
        let past = ranged("bytes=5000-9999999");
        polled().await;
        fake.release("b");
        let (status, got) = whole.await;
        assert_eq!(
            (status, got.unwrap()),
            (StatusCode::OK, body.clone().into())
        );
        for (pull, from, to) in [
            (middle, 1000, 1999),
            (tail, 299_990, 299_999),
            (past, 5000, 299_999),
        ] {
            let (parts, got) = pull.await;
            assert_eq!(parts.status, StatusCode::PARTIAL_CONTENT);
            assert_eq!(
                parts.headers["content-range"],
                format!("bytes {from}-{to}/300000").as_str()
            );
            assert_eq!(
                parts.headers["content-length"],
                (to - from + 1).to_string().as_str()
            );
            assert_eq!(
                got,
                body[from..=to],
                "the range's bytes, from the shared transfer"
            );
        }
        assert_eq!(
            blob_requests(&fake).len(),
            1,
            "the ranged pulls asked Harbor nothing"
        );
    });
}
