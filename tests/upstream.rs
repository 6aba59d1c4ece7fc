//! The per-core upstream client against the real registry behind the stand-in Harbor: the token
//! flow (one fetch, then the cached token), keep-alive reuse, connections killed between requests,
//! and the same scenario over TLS (nginx with a CA made by the test) and TLS with HTTP/2 by ALPN;
//! HTTP/2 with prior knowledge against a Harbor that speaks no h2c; tokens Harbor refuses before
//! they expire.

mod common;

use std::rc::Rc;

use http::header::{ACCEPT, CONTENT_LENGTH};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use harbor_router::clock::Clock;
use harbor_router::config::Config;
use harbor_router::upstream::{self, AuthMode, Upstream};
use testbed::{HarborConfig, Seeded, Testbed};

use common::nginx::{Listen, TlsFront};
use common::relay::Relay;
use common::run;

fn client_config(harbor_url: &str, extra: &[(&str, &str)]) -> Config {
    let mut vars = vec![
        ("HARBOR_USERNAME", testbed::DEFAULT_ROBOT_USER),
        ("HARBOR_PASSWORD", testbed::DEFAULT_ROBOT_PASSWORD),
    ];
    vars.extend_from_slice(extra);
    common::config(harbor_url, &vars)
}

/// Harbor's client for `config`.
fn harbor(config: &Config) -> anyhow::Result<std::sync::Arc<upstream::Harbor>> {
    upstream::Harbor::new(&upstream::Settings::from_config(config))
}

fn accept_all() -> HeaderMap {
    let mut h = HeaderMap::new();
    for t in testbed::images::ALL_MANIFEST_TYPES {
        h.append(ACCEPT, HeaderValue::from_static(t));
    }
    h
}

/// GET the seeded manifest; checks status, digest header (Harbor sends `""` for a tag it fetched
/// from the upstream) and that the body hashes to the digest.
async fn pull_manifest(up: &Upstream, seeded: &Seeded) {
    let path = format!("/v2/{}/manifests/{}", seeded.repository, seeded.tag);
    let res = up
        .send(Method::GET, &path, &accept_all(), AuthMode::Registry)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(res.status(), 200, "GET {path}");
    let digest = res.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(digest.is_empty() || digest == seeded.digest, "{digest}");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(format!("sha256:{:x}", Sha256::digest(&body)), seeded.digest);
}

/// The whole scenario through `relay` (which the test uses to kill connections).
fn scenario(bed: &Testbed, seeded: &Seeded, relay: &Relay, config: Config, expect_h2: bool) {
    let shared = upstream::Harbor::new(&upstream::Settings::from_config(&config)).unwrap();
    let tokens_before = bed.harbor.counters().token_requests;
    run(async {
        let up = Upstream::new(shared.clone(), Clock::system());
        for _ in 0..5 {
            pull_manifest(&up, seeded).await;
        }
        // HEAD: headers only, with the length of the GET body.
        let path = format!("/v2/{}/manifests/{}", seeded.repository, seeded.tag);
        let res = up
            .send(Method::HEAD, &path, &accept_all(), AuthMode::Registry)
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().contains_key(CONTENT_LENGTH));
        assert!(res
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());

        assert_eq!(
            up.token_fetches(),
            1,
            "one token fetch, then the cached token"
        );
        assert_eq!(bed.harbor.counters().token_requests - tokens_before, 1);
        let stats = up.pool_stats();
        assert_eq!(
            stats.connections_opened, 1,
            "keep-alive: one connection for 7 requests"
        );

        // Harbor's side of every connection goes away between requests: no error reaches the caller.
        for round in 0..3 {
            relay.cut_all();
            pull_manifest(&up, seeded).await;
            assert_eq!(
                up.pool_stats().connections_opened,
                2 + round,
                "a new connection after each cut"
            );
        }
        assert_eq!(up.token_fetches(), 1, "the token outlives connections");

        // Concurrent first requests for a new scope on one core share one token fetch.
        let fresh = Rc::new(Upstream::new(shared.clone(), Clock::system()));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let up = fresh.clone();
                let seeded = seeded.clone();
                harbor_router::task::spawn(async move { pull_manifest(&up, &seeded).await })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        assert_eq!(fresh.token_fetches(), 1);
        if expect_h2 {
            assert_eq!(
                fresh.pool_stats().connections_opened,
                1,
                "HTTP/2 multiplexes"
            );
        } else {
            assert!(
                fresh.pool_stats().connections_opened > 1,
                "HTTP/1.1 needs a connection per request in flight"
            );
        }
    });
    assert_eq!(bed.harbor.counters().token_requests - tokens_before, 2);
}

#[test]
fn http1_token_flow_reuse_and_killed_connections() {
    let (bed, seeded) = common::bed_with_app();
    let relay = Relay::start(bed.harbor.addr(), true);
    let config = client_config(&format!("http://{}", relay.addr), &[]);
    scenario(&bed, &seeded, &relay, config, false);
}

#[test]
fn http2_prior_knowledge_against_a_harbor_without_h2c_falls_back_to_http1() {
    // Harbor's own nginx speaks HTTP/1.1 on plain TCP: the first request fails over HTTP/2, is sent
    // again over HTTP/1.1, and the core keeps to HTTP/1.1.
    let (bed, seeded) = common::bed_with_app();
    let nginx = TlsFront::listening(bed.harbor.addr(), Listen::Plain);
    let url = format!("http://{}", nginx.addr);
    let config = client_config(&url, &[("HTTP2_PRIOR_KNOWLEDGE", "true")]);
    let shared = upstream::Harbor::new(&upstream::Settings::from_config(&config)).unwrap();
    run(async {
        let up = Rc::new(Upstream::new(shared, Clock::system()));
        pull_manifest(&up, &seeded).await;
        assert_eq!(up.stats().h2c_refused.get(), 1);
        assert!(!up.multiplexed(), "HTTP/1.1 from now on");
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (up, seeded) = (up.clone(), seeded.clone());
                harbor_router::task::spawn(async move { pull_manifest(&up, &seeded).await })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        assert_eq!(up.stats().h2c_refused.get(), 1, "found out once");
    });
}

#[test]
fn http2_prior_knowledge_through_an_h2c_front() {
    // A front that speaks h2c: one multiplexed connection, no fallback, whatever fails later.
    let (bed, seeded) = common::bed_with_app();
    let nginx = TlsFront::listening(bed.harbor.addr(), Listen::H2c);
    let relay = Relay::start(nginx.addr, true);
    let config = client_config(
        &format!("http://{}", relay.addr),
        &[("HTTP2_PRIOR_KNOWLEDGE", "true")],
    );
    scenario(&bed, &seeded, &relay, config, true);
    let shared = harbor(&client_config(
        &format!("http://{}", nginx.addr),
        &[("HTTP2_PRIOR_KNOWLEDGE", "true")],
    ))
    .unwrap();
    run(async {
        let up = Upstream::new(shared, Clock::system());
        pull_manifest(&up, &seeded).await;
        assert!(up.multiplexed());
        assert_eq!(up.stats().h2c_refused.get(), 0);
    });
}

#[test]
fn tls_with_a_private_ca() {
    let (bed, seeded) = common::bed_with_app();
    let nginx = TlsFront::start(bed.harbor.addr());
    let relay = Relay::start(nginx.addr, true);
    let ca = nginx.ca_file.to_str().unwrap().to_string();
    let url = format!("https://localhost:{}", relay.addr.port());
    scenario(
        &bed,
        &seeded,
        &relay,
        client_config(&url, &[("HARBOR_CA_FILE", &ca)]),
        false,
    );
    // Over TLS, HTTP2_PRIOR_KNOWLEDGE offers h2 by ALPN; nginx accepts it.
    let config = client_config(
        &url,
        &[("HARBOR_CA_FILE", &ca), ("HTTP2_PRIOR_KNOWLEDGE", "true")],
    );
    scenario(&bed, &seeded, &relay, config, true);
}

/// The error a `GET /v2/` to `harbor_url` fails with.
fn error_for(harbor_url: &str) -> upstream::UpstreamError {
    let shared = harbor(&client_config(harbor_url, &[])).unwrap();
    run(async {
        Upstream::new(shared, Clock::system())
            .send(Method::GET, "/v2/", &HeaderMap::new(), AuthMode::Registry)
            .await
            .expect_err("the request must fail")
    })
}

#[test]
fn tls_refuses_an_unknown_ca() {
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let nginx = TlsFront::start(bed.harbor.addr());
    let url = format!("https://localhost:{}", nginx.addr.port());
    let err = error_for(&url);
    assert!(matches!(err, upstream::UpstreamError::Tls(_)), "{err}");
}

#[test]
fn idle_connections_are_bounded_and_expire() {
    let (bed, seeded) = common::bed_with_app();
    let config = client_config(
        &bed.harbor.url(),
        &[
            ("MAX_IDLE_CONNS_PER_HOST", "2"),
            ("IDLE_CONN_TIMEOUT", "300ms"),
        ],
    );
    let shared = upstream::Harbor::new(&upstream::Settings::from_config(&config)).unwrap();
    run(async {
        let up = Rc::new(Upstream::new(shared, Clock::system()));
        pull_manifest(&up, &seeded).await; // token first, so the burst below is 6 plain requests
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let (up, seeded) = (up.clone(), seeded.clone());
                harbor_router::task::spawn(async move { pull_manifest(&up, &seeded).await })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        assert!(
            up.pool_stats().connections_opened >= 3,
            "{:?}",
            up.pool_stats()
        );
        assert_eq!(up.idle_count(), 2, "at most MAX_IDLE_CONNS_PER_HOST kept");
        // The sweeper closes them after IDLE_CONN_TIMEOUT.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while up.idle_count() > 0 {
            assert!(
                std::time::Instant::now() < end,
                "idle connections never expired"
            );
            monoio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn a_hanging_harbor_hits_the_response_timeout() {
    let (bed, seeded) = common::bed_with_app();
    let config = client_config(&bed.harbor.url(), &[("UPSTREAM_RESPONSE_TIMEOUT", "300ms")]);
    let shared = upstream::Harbor::new(&upstream::Settings::from_config(&config)).unwrap();
    run(async {
        let up = Upstream::new(shared, Clock::system());
        pull_manifest(&up, &seeded).await;
        bed.harbor.set_fault("ghcr", testbed::Fault::Hang);
        let started = std::time::Instant::now();
        let path = format!("/v2/{}/manifests/{}", seeded.repository, seeded.tag);
        let err = up
            .send(Method::GET, &path, &accept_all(), AuthMode::Registry)
            .await
            .unwrap_err();
        assert!(
            matches!(err, upstream::UpstreamError::ResponseTimeout(_)),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // The hung connection is not reused: the next request after the fault clears succeeds.
        bed.harbor.clear_faults();
        pull_manifest(&up, &seeded).await;
    });
}

#[test]
fn nothing_listening_is_a_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = error_for(&format!("http://127.0.0.1:{port}"));
    assert!(matches!(err, upstream::UpstreamError::Connect(_)), "{err}");
}

/// A client that has pulled `seeded` (so it knows the token service) and holds one batched token
/// for the scopes of `repos`, as a fan-out leaves it.
async fn with_a_batch(
    shared: std::sync::Arc<upstream::Harbor>,
    seeded: &Seeded,
    repos: &[&str],
) -> Rc<Upstream> {
    let up = Rc::new(Upstream::new(shared, Clock::system()));
    pull_manifest(&up, seeded).await;
    up.prefetch_tokens(
        repos.iter().map(|r| r.to_string()),
        std::time::Duration::from_secs(5),
    )
    .await;
    up
}

/// GET `/v2/<repo>/manifests/v1`, read to its end; its status.
async fn get_v1(up: &Upstream, repo: &str) -> u16 {
    let path = format!("/v2/{repo}/manifests/v1");
    let res = up
        .send(Method::GET, &path, &accept_all(), AuthMode::Registry)
        .await
        .unwrap();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    status
}

/// GET the seeded manifest and return its status.
async fn status_of(up: &Upstream, seeded: &Seeded) -> u16 {
    let path = format!("/v2/{}/manifests/{}", seeded.repository, seeded.tag);
    let res = up
        .send(Method::GET, &path, &accept_all(), AuthMode::Registry)
        .await
        .unwrap();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    status
}

#[test]
fn a_token_harbor_refuses_costs_one_token_request_not_its_life() {
    // ghcr is private: a token Harbor no longer accepts makes the request anonymous and refused.
    let (bed, seeded) = common::bed_with_app();
    let shared = harbor(&client_config(&bed.harbor.url(), &[])).unwrap();
    run(async {
        let up = Upstream::new(shared, Clock::system());
        pull_manifest(&up, &seeded).await;
        for change in ["rotate", "revoke"] {
            let tokens = bed.harbor.counters().token_requests;
            match change {
                "rotate" => bed.harbor.rotate_signing_key(),
                _ => bed.harbor.revoke_tokens(),
            }
            for _ in 0..5 {
                pull_manifest(&up, &seeded).await;
            }
            assert_eq!(
                bed.harbor.counters().token_requests - tokens,
                1,
                "{change}: one new token, then it is cached"
            );
        }
        assert_eq!(up.stats().tokens_refused.get(), 2);
    });
}

#[test]
fn a_robot_that_may_not_pull_is_asked_for_a_token_once_per_interval() {
    let (bed, seeded) = common::bed_with_app();
    let shared = harbor(&client_config(&bed.harbor.url(), &[])).unwrap();
    run(async {
        let up = Upstream::new(shared, Clock::system());
        pull_manifest(&up, &seeded).await;
        bed.harbor.set_robot_denied("ghcr", true);
        bed.harbor.revoke_tokens();
        let tokens = bed.harbor.counters().token_requests;
        for _ in 0..10 {
            assert_eq!(status_of(&up, &seeded).await, 401);
        }
        assert_eq!(
            bed.harbor.counters().token_requests - tokens,
            1,
            "the fresh token refused too is remembered"
        );
        // Given back: after the refusal is forgotten, the next request gets a token that works.
        bed.harbor.set_robot_denied("ghcr", false);
        monoio::time::sleep(upstream::auth::REFUSED_LIFE).await;
        assert_eq!(status_of(&up, &seeded).await, 200);
        assert_eq!(bed.harbor.counters().token_requests - tokens, 2);
    });
}

#[test]
fn tokens_of_a_batch_are_fetched_again_in_one_request() {
    // A fan-out's batched token covers several scopes; refused, it is fetched again for all of
    // them in one request.
    let (bed, seeded) = common::bed_with_app();
    let shared = harbor(&client_config(&bed.harbor.url(), &[])).unwrap();
    run(async {
        let repos = ["quay/a", "quay/b", "ghcr/c"];
        let up = with_a_batch(shared, &seeded, &repos).await;
        bed.harbor.rotate_signing_key();
        let tokens = bed.harbor.counters().token_requests;
        let tasks: Vec<_> = repos
            .iter()
            .map(|r| {
                let (up, repo) = (up.clone(), r.to_string());
                harbor_router::task::spawn(async move { get_v1(&up, &repo).await })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        assert_eq!(bed.harbor.counters().token_requests - tokens, 1);
    });
}

#[test]
fn a_refusal_is_remembered_per_scope_whatever_its_batch_siblings_meet() {
    // Two private scopes share a batched token; Harbor then treats the robot as anonymous. Pulls
    // alternating between the two scopes must not each cost a token request.
    let (bed, seeded) = common::bed_with_app();
    let shared = harbor(&client_config(&bed.harbor.url(), &[])).unwrap();
    run(async {
        let repos = ["ghcr/org/other", "quay/coreos/etcd"];
        let up = with_a_batch(shared, &seeded, &repos).await;
        bed.harbor.set_robot_refused(true);
        bed.harbor.revoke_tokens();
        let tokens = bed.harbor.counters().token_requests;
        for _ in 0..10 {
            for r in repos {
                assert_eq!(get_v1(&up, r).await, 401);
            }
        }
        let asked = bed.harbor.counters().token_requests - tokens;
        assert!(
            asked <= 2,
            "{asked} token requests for 20 refused pulls over 2 scopes"
        );
    });
}
