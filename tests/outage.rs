//! Harbor's answers when it or its upstream fails, against the stand-in Harbor and the real
//! registry: Harbor's 500 (its database) on a tag the router confirmed is stood in for without
//! asking Harbor for the digest; a blob HEAD is answered from the manifest the router served; a
//! tag-list fan-out for an unknown name asks each project once, whatever `Accept` lines its
//! clients send.

mod common;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use testbed::{Fault, Testbed};

use common::{bed_with_app, manifest, request, wait_until, Router};

/// The proxy-cache projects of the default test bed.
const PROJECTS: [&str; 4] = ["dockerhub", "ghcr", "k8s", "quay"];
const WARNING: &str = "110 harbor-router \"Response is Stale\"";

/// A router in front of Harbor at `url`, ready.
fn router(url: &str, vars: &[(&str, &str)]) -> Router {
    let mut env = common::bed_env(url);
    env.extend_from_slice(vars);
    let router = Router::start(&env);
    wait_until("the router is ready", || {
        common::get(router.addr, "/readyz").status == 200
    });
    router
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn counts(bed: &Testbed, pick: fn(&testbed::Counters) -> &BTreeMap<String, u64>) -> Vec<u64> {
    let c = bed.harbor.counters();
    PROJECTS
        .iter()
        .map(|p| pick(&c).get(*p).copied().unwrap_or(0))
        .collect()
}

#[test]
fn a_confirmed_tag_is_answered_through_harbors_500_without_asking_harbor_for_its_digest() {
    let (bed, app) = bed_with_app();
    let router = router(
        &bed.harbor.url(),
        &[("CIRCUIT_BREAKER_THRESHOLD", "2"), ("CACHE_TTL", "1h")],
    );
    let addr = router.addr;
    // One GET of the tag: its manifest streams through the router, which keeps it with the tag.
    let fresh = manifest(addr, "GET", "org/app", "v1");
    assert_eq!(fresh.status, 200);
    assert_eq!(sha256(&fresh.body), app.digest);

    // Harbor's database fails: every answer is 500 UNKNOWN (src/lib/http/error.go).
    for p in PROJECTS {
        bed.harbor.set_fault(p, Fault::Status(500));
    }
    let asked = || bed.harbor.counters().manifest_requests["ghcr"];
    let before = asked();
    for round in 0..4 {
        let res = manifest(addr, "GET", "org/app", "v1");
        assert_eq!(res.status, 200, "round {round}: {:?}", res.body);
        assert_eq!(res.header("warning"), Some(WARNING), "round {round}");
        assert_eq!(
            res.header("docker-content-digest"),
            Some(app.digest.as_str())
        );
        assert_eq!(
            sha256(&res.body),
            app.digest,
            "round {round}: the manifest itself"
        );
        // A 500 never opens a circuit (a client can provoke one): the tag is asked every time,
        // and nothing else is (the stale GET needed no by-digest request).
        assert_eq!(asked(), before + round + 1, "round {round}");
    }
    // The by-digest GET a client sends next is answered from the router's memory.
    let res = manifest(addr, "GET", "org/app", &app.digest);
    assert_eq!(res.status, 200);
    assert_eq!(sha256(&res.body), app.digest);
    assert_eq!(asked(), before + 4, "the digest was not asked of Harbor");
    let m = router.scrape();
    assert!(m["harbor_router_stale_answers_total{reason=\"failed\"}"] >= 4.0);
    assert_eq!(
        m["harbor_router_circuit_transitions_total{project=\"ghcr\",lane=\"tags\",to=\"open\"}"],
        0.0,
        "no circuit opened"
    );
}

#[test]
fn a_blob_head_is_answered_from_the_manifest_the_router_served() {
    let (bed, app) = bed_with_app();
    let router = router(&bed.harbor.url(), &[]);
    let addr = router.addr;
    let res = manifest(addr, "GET", "org/app", &app.digest);
    assert_eq!(res.status, 200);
    let m: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
    let mut descriptors = vec![m["config"].clone()];
    descriptors.extend(m["layers"].as_array().unwrap().iter().cloned());
    // The fan-out's other attempts finish after the client's answer: count from when they did.
    wait_until("every project answered the fan-out", || {
        let (asked, answered) = (
            counts(&bed, |c| &c.v2_requests),
            counts(&bed, |c| &c.answered),
        );
        asked.iter().all(|n| *n >= 1) && asked == answered
    });
    let before = counts(&bed, |c| &c.v2_requests);
    for d in &descriptors {
        let digest = d["digest"].as_str().unwrap();
        let size = d["size"].as_u64().unwrap().to_string();
        let path = format!("/v2/proxy/org/app/blobs/{digest}");
        let res = request(addr, "HEAD", &path, &[]);
        assert_eq!(res.status, 200, "{digest}");
        assert_eq!(
            res.header("content-length"),
            Some(size.as_str()),
            "{digest}"
        );
        assert_eq!(
            res.header("docker-content-digest"),
            Some(digest),
            "{digest}"
        );
    }
    assert_eq!(
        counts(&bed, |c| &c.v2_requests),
        before,
        "no blob HEAD went to Harbor (which answers 404 to a blob it has not cached)"
    );
    // A blob no manifest named still goes to Harbor, as one small request.
    let other = "sha256:".to_string() + &"0".repeat(64);
    let res = request(
        addr,
        "HEAD",
        &format!("/v2/proxy/org/app/blobs/{other}"),
        &[],
    );
    assert_eq!(res.status, 404);
}

#[test]
fn a_tag_list_fan_out_for_an_unknown_name_asks_each_project_once() {
    let bed = Testbed::start(testbed::HarborConfig::default()).unwrap();
    let router = router(&bed.harbor.url(), &[("NEGATIVE_CACHE_TTL", "1h")]);
    let addr = router.addr;
    let path = "/v2/proxy/no/such/tags/list";
    let accepts = [
        vec![],
        vec!["Accept: application/json"],
        vec!["Accept: */*"],
        vec!["Accept: application/json", "Accept: text/plain"],
    ];
    let before = counts(&bed, |c| &c.v2_requests);
    std::thread::scope(|s| {
        for accept in &accepts {
            for _ in 0..3 {
                s.spawn(move || {
                    let res = request(addr, "GET", path, accept);
                    assert_eq!(res.status, 404, "{accept:?}");
                    assert_eq!(res.error_code(), "NAME_UNKNOWN");
                });
            }
        }
    });
    for accept in &accepts {
        assert_eq!(request(addr, "GET", path, accept).status, 404);
    }
    let asked: Vec<u64> = counts(&bed, |c| &c.v2_requests)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert_eq!(
        asked,
        vec![1; PROJECTS.len()],
        "each project asked once for {} requests with {} Accept sets",
        accepts.len() * 4,
        accepts.len()
    );
}
