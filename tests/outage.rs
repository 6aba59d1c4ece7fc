//! Harbor's answers when it or its upstream fails, against the stand-in Harbor and the real
//! registry: Harbor's 500 (its database) on a tag the router confirmed is stood in for without
//! asking Harbor for the digest; a blob HEAD is answered from the manifest the router served; a
//! tag-list fan-out for an unknown name asks each project once, whatever `Accept` lines its
//! clients send; a cached image pulls with skopeo and containerd while every upstream is down (Harbor
//! answering from its local store); a blob Harbor sends without its length is checked against its
//! digest; a tag list merged with a large upstream list comes through whole; circuits a Harbor
//! restart opened close within seconds of its return, not after `CIRCUIT_BREAKER_TIMEOUT`.

mod common;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use std::process::Command;

use testbed::{Fault, Testbed, UncachedBlobs, Upstream};

use common::{bed_with_app, manifest, request, wait_until};

/// The proxy-cache projects of the default test bed.
const PROJECTS: [&str; 4] = ["dockerhub", "ghcr", "k8s", "quay"];
const WARNING: &str = "110 harbor-router \"Response is Stale\"";

use common::bed_router as router;

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

/// `skopeo copy` of `image` (`<name>:<tag>`) through the router at `addr` into a fresh directory;
/// the copied manifest's digest.
fn skopeo_copy(addr: std::net::SocketAddr, image: &str, to: &str) -> String {
    let dir = std::env::temp_dir().join(format!("hr-outage-{}-{to}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            &format!("docker://{addr}/proxy/{image}"),
            &format!("dir:{}", dir.display()),
        ])
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {image} ({to}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = sha256(&std::fs::read(dir.join("manifest.json")).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    digest
}

#[test]
fn skopeo_and_containerd_pull_a_cached_image_while_every_upstream_is_down() {
    let (bed, app) = bed_with_app();
    // Harbor caches the image as it serves it once.
    {
        let warm = router(&bed.harbor.url(), &[]);
        assert_eq!(skopeo_copy(warm.addr, "org/app:v1", "warm"), app.digest);
    }
    for p in PROJECTS {
        bed.harbor.set_upstream(p, Upstream::Refused);
    }
    // A router that never saw the image: a fan-out, no last-known-good tag to lean on. Harbor's
    // ghcr serves its local copy; the others answer their local store's 404.
    let cold = router(&bed.harbor.url(), &[("NEGATIVE_CACHE_TTL", "1h")]);
    assert_eq!(skopeo_copy(cold.addr, "org/app:v1", "cold"), app.digest);
    let node = testbed::containerd::Containerd::start().unwrap();
    let hosts = node.hosts_dir("hosts");
    let d = hosts.join("ghcr.io");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"https://ghcr.io\"\n\n[host.\"http://{}/v2/proxy\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n",
            cold.addr
        ),
    )
    .unwrap();
    let got = node
        .pull(&hosts, "ghcr.io/org/app:v1")
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", node.log()));
    assert_eq!(got, app.digest, "containerd's pull");

    // A tag Harbor does not hold: its local store's 404, answered and remembered only briefly.
    let res = manifest(cold.addr, "GET", "org/app", "not-cached");
    assert_eq!(res.status, 404);
    let m = cold.scrape();
    assert!(m[r#"harbor_router_upstream_unsure_not_found_total{project="ghcr"}"#] >= 1.0);
}

#[test]
fn a_confirmed_tag_is_answered_through_harbors_database_failing() {
    let (bed, app) = bed_with_app();
    let router = router(&bed.harbor.url(), &[]);
    let addr = router.addr;
    assert_eq!(manifest(addr, "GET", "org/app", "v1").status, 200);
    bed.harbor.set_database_down(true);
    let res = manifest(addr, "GET", "org/app", "v1");
    assert_eq!(res.status, 200, "{:?}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.header("warning"), Some(WARNING));
    assert_eq!(sha256(&res.body), app.digest);
    let res = manifest(addr, "GET", "org/app", &app.digest);
    assert_eq!(res.status, 200, "the digest, from memory");
    // What the router never saw gets Harbor's 500.
    assert_eq!(manifest(addr, "GET", "org/app", "v2").status, 500);
    bed.harbor.set_database_down(false);
    let res = manifest(addr, "GET", "org/app", "v1");
    assert_eq!(
        (res.status, res.header("warning")),
        (200, None),
        "fresh again"
    );
}

/// A blob GET through the router at `addr`, raw: the head (lower case) and the body's bytes; an
/// empty head when the connection closed before one.
fn raw_blob(addr: std::net::SocketAddr, name: &str, digest: &str) -> (String, Vec<u8>) {
    let raw = common::raw(
        addr,
        format!(
            "GET /v2/proxy/{name}/blobs/{digest} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|e| e + 4) else {
        assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
        return (String::new(), Vec::new());
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    (head, raw[end..].to_vec())
}

/// The `Content-Length` a lower-cased head announces.
fn announced(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
}

/// `ghcr/org/big` (a 64 KiB layer) seeded, and Harbor sending the blobs it has not cached chunked,
/// without their digest (Harbor up to v2.15).
fn big_uncached(bed: &testbed::Testbed) -> testbed::Seeded {
    let big = bed
        .seed(&[testbed::SeedImage {
            repository: "ghcr/org/big".into(),
            tag: "v1".into(),
            kind: testbed::SeedKind::OciManifest,
            layer_bytes: 64 << 10,
        }])
        .unwrap()
        .remove(0);
    bed.harbor.set_uncached_blobs(UncachedBlobs::Chunked);
    big
}

#[test]
fn a_blob_harbor_sends_without_its_digest_is_checked_against_it() {
    let (bed, app) = bed_with_app();
    let big = big_uncached(&bed);
    let router = router(&bed.harbor.url(), &[]);
    let addr = router.addr;
    for (name, image) in [("org/app", &app), ("org/big", &big)] {
        assert_eq!(manifest(addr, "GET", name, &image.digest).status, 200);
    }
    // The upstream breaks mid-blob: Harbor appends its error to the 200 and ends it cleanly; a small
    // answer fits Go's write buffer and goes out with the length of what was written.
    bed.harbor.set_fault("ghcr", Fault::BreakUncached);
    // The router checks it on its last frame: cut before it (here the only one, so the connection
    // closes before the head went out).
    let (head, body) = raw_blob(addr, "org/app", &app.blobs[0]);
    if !head.is_empty() {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length = announced(&head).expect("a small answer is framed");
        assert!(body.len() < length, "cut short of its length: {head}");
    }
    // A larger one is chunked: never ended with its last chunk.
    let (head, body) = raw_blob(addr, "org/big", &big.blobs[1]);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(
        common::dechunk(&body).map(|(b, _)| b),
        None,
        "the chunked answer must not end cleanly"
    );
    for digest in [&app.blobs[0], &big.blobs[1]] {
        router
            .wait_log(|l| l.contains("does not hash to its digest") && l.contains(digest.as_str()));
    }
    // A whole one streams through as Harbor sent it, and hashes to its digest.
    bed.harbor.clear_faults();
    let (head, body) = raw_blob(addr, "org/app", &app.blobs[1]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("docker-content-digest"), "{head}");
    let body = match announced(&head) {
        Some(n) => body[..n].to_vec(),
        None => common::dechunk(&body)
            .map(|(b, _)| b)
            .expect("a chunked body that ends cleanly"),
    };
    assert_eq!(sha256(&body), app.blobs[1]);
}

#[test]
fn a_blob_that_does_not_hash_to_its_digest_never_lingers() {
    let (bed, _app) = bed_with_app();
    let big = big_uncached(&bed);
    let router = router(&bed.harbor.url(), &[("COALESCE_LINGER", "30s")]);
    let addr = router.addr;
    assert_eq!(manifest(addr, "GET", "org/big", &big.digest).status, 200);
    let layer = &big.blobs[1];
    let asked = || {
        bed.harbor
            .counters()
            .v2_requests
            .get("ghcr")
            .copied()
            .unwrap_or(0)
    };
    let whole = |(head, body): (String, Vec<u8>)| -> Vec<u8> {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        common::dechunk(&body)
            .map(|(b, _)| b)
            .expect("a chunked body that ends cleanly")
    };
    // Harbor's upstream breaks mid-blob: a 200 that ends cleanly with Harbor's error appended.
    bed.harbor.set_fault("ghcr", Fault::BreakUncached);
    let (_, broken) = raw_blob(addr, "org/big", layer);
    assert_eq!(common::dechunk(&broken).map(|(b, _)| b), None);
    bed.harbor.clear_faults();
    // It did not linger: the next pull asks Harbor, and gets the blob.
    let before = asked();
    assert_eq!(sha256(&whole(raw_blob(addr, "org/big", layer))), *layer);
    assert_eq!(
        asked(),
        before + 1,
        "a broken transfer is never served again"
    );
    // A whole one does linger (so the check above is not the linger being off).
    assert_eq!(sha256(&whole(raw_blob(addr, "org/big", layer))), *layer);
    assert_eq!(asked(), before + 1, "the whole blob lingers");
}

#[test]
fn a_tag_list_merged_with_a_large_upstream_list_comes_through_whole() {
    let (bed, _app) = bed_with_app();
    let upstream: Vec<String> = (0..5000).map(|i| format!("u{i:05}")).collect();
    bed.harbor
        .set_upstream_tags("ghcr", "org/app", upstream.clone());
    let router = router(&bed.harbor.url(), &[]);
    let res = request(router.addr, "GET", "/v2/proxy/org/app/tags/list", &[]);
    assert_eq!(res.status, 200);
    let tags: Vec<String> = serde_json::from_value(res.json()["tags"].clone()).unwrap();
    let mut want = upstream;
    want.push("v1".into());
    want.sort();
    assert_eq!(tags, want);
    assert_eq!(res.json()["name"], "proxy/org/app");
}

#[test]
fn a_stale_index_needs_nothing_harbor_only_holds_trimmed() {
    let bed = Testbed::start(testbed::HarborConfig::default()).unwrap();
    let index = bed
        .seed(&[testbed::SeedImage {
            repository: "ghcr/org/multi".into(),
            tag: "v1".into(),
            kind: testbed::SeedKind::OciIndex,
            layer_bytes: 1024,
        }])
        .unwrap()
        .remove(0);
    let router = router(&bed.harbor.url(), &[("RESOLVER_TIMEOUT", "1s")]);
    let addr = router.addr;
    let fresh = manifest(addr, "GET", "org/multi", "v1");
    assert_eq!(fresh.status, 200);
    assert_eq!(sha256(&fresh.body), index.digest);
    // The upstream hangs: Harbor waits on every tag lookup, and holds the index only trimmed
    // under its tag, never under its original digest (src/controller/proxy/manifestcache.go).
    for p in PROJECTS {
        bed.harbor.set_upstream(p, Upstream::Hanging);
    }
    let res = manifest(addr, "GET", "org/multi", "v1");
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.header("warning"), Some(WARNING));
    assert_eq!(
        sha256(&res.body),
        index.digest,
        "the index as it was served"
    );
    // The by-digest GET a client sends next: from the router's memory, not Harbor (which would
    // hang on it).
    let res = manifest(addr, "GET", "org/multi", &index.digest);
    assert_eq!(res.status, 200);
    assert_eq!(sha256(&res.body), index.digest);
}

#[test]
fn circuits_opened_by_a_harbor_restart_close_within_seconds_of_its_return() {
    let (bed, app) = bed_with_app();
    // The default timeout: an opened circuit must not keep the project out for all of it.
    let router = router(
        &bed.harbor.url(),
        &[
            ("CIRCUIT_BREAKER_THRESHOLD", "2"),
            ("CIRCUIT_BREAKER_TIMEOUT", "30s"),
        ],
    );
    let addr = router.addr;
    let layer = app.blobs.last().unwrap();
    let blob = format!("/v2/proxy/org/app/blobs/{layer}");
    assert_eq!(manifest(addr, "GET", "org/app", "v1").status, 200);
    assert_eq!(request(addr, "GET", &blob, &[]).status, 200);

    // Harbor restarts: every connection reset, new ones closed at accept for 3 s. Pulls in that
    // time open ghcr's content circuit.
    let pause = std::time::Duration::from_secs(3);
    bed.harbor.restart(pause);
    let back = std::time::Instant::now() + pause;
    let opened =
        "harbor_router_circuit_transitions_total{project=\"ghcr\",lane=\"content\",to=\"open\"}";
    wait_until("ghcr's content circuit opened", || {
        let status = request(addr, "GET", &blob, &[]).status;
        assert_ne!(status, 200, "Harbor is restarting");
        router.scrape().get(opened).copied().unwrap_or(0.0) >= 1.0
    });
    while std::time::Instant::now() < back {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Harbor accepts again: the blob is served within a few seconds, not CIRCUIT_BREAKER_TIMEOUT.
    wait_until("the blob is served again", || {
        request(addr, "GET", &blob, &[]).status == 200
    });
    let late = back.elapsed();
    assert!(
        late < std::time::Duration::from_secs(8),
        "the blob was refused for {late:?} after Harbor was back"
    );
    let logs = router.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("circuit closed") && l.contains(r#""project":"ghcr""#)),
        "the circuit closed by a probe"
    );
}
