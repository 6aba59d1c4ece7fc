//! The router against Harbor's real answers, as Harbor's source gives them (goharbor/harbor main and
//! v2.9–v2.15) and the stand-in models them: tokens refused before they expire (a rotated signing
//! key, revoked tokens), a robot Harbor stops accepting, a vulnerability policy's 412, a manifest
//! fetched upstream by tag with an empty digest, HTTP/2 prior knowledge against a Harbor without
//! h2c, and Harbor's version. skopeo and containerd pull through a key rotation.

mod common;

use std::process::Command;

use sha2::{Digest, Sha256};
use testbed::{EmptyDigests, Fault, HarborConfig, SeedImage, SeedKind, Seeded, Testbed};

use common::{get, wait_for, wait_until, Response, Router};

fn image(repository: &str, tag: &str, kind: SeedKind) -> SeedImage {
    SeedImage {
        repository: repository.into(),
        tag: tag.into(),
        kind,
        layer_bytes: 8192,
    }
}

/// A test bed with an image in private ghcr, one in private quay and one in public dockerhub.
fn bed() -> (Testbed, Vec<Seeded>) {
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let seeded = bed
        .seed(&[
            image("ghcr/org/app", "v1", SeedKind::OciManifest),
            image("quay/coreos/etcd", "v3.5.0", SeedKind::DockerSchema2),
            image(
                "dockerhub/library/alpine",
                "3.19",
                SeedKind::DockerManifestList,
            ),
        ])
        .unwrap();
    (bed, seeded)
}

fn router(bed: &Testbed, extra: &[(&str, &str)]) -> Router {
    let url = bed.harbor.url();
    let mut env = common::bed_env(&url);
    env.extend_from_slice(extra);
    let router = Router::start(&env);
    wait_until("the router is ready", || {
        get(router.addr, "/readyz").status == 200
    });
    router
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn pull(router: &Router, name: &str, reference: &str) -> Response {
    common::manifest(router.addr, "GET", name, reference)
}

fn token_requests(bed: &Testbed) -> u64 {
    bed.harbor.counters().token_requests
}

fn skopeo(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_refused_token_costs_one_token_request_not_its_life() {
    let (bed, seeded) = bed();
    let router = router(&bed, &[]);
    for _ in 0..3 {
        assert_eq!(pull(&router, "org/app", "v1").status, 200);
    }
    for change in ["rotate", "revoke"] {
        match change {
            "rotate" => bed.harbor.rotate_signing_key(),
            _ => bed.harbor.revoke_tokens(),
        }
        let tokens = token_requests(&bed);
        for _ in 0..20 {
            let res = pull(&router, "org/app", "v1");
            assert_eq!(
                res.status,
                200,
                "{change}: {:?}",
                String::from_utf8_lossy(&res.body)
            );
            assert_eq!(sha256(&res.body), seeded[0].digest);
        }
        assert_eq!(
            token_requests(&bed) - tokens,
            1,
            "{change}: one token request, then cached"
        );
    }
    let m = router.scrape();
    assert_eq!(m["harbor_router_tokens_refused_total"], 2.0);
}

#[test]
fn skopeo_and_containerd_pull_through_a_key_rotation() {
    let (bed, seeded) = bed();
    let router = router(&bed, &[("WORKERS", "2")]);
    let host = router.addr.to_string();
    let dir = std::env::temp_dir().join(format!("hr-harbor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = |round: usize| {
        let dest = format!("dir:{}", dir.join(round.to_string()).display());
        let src = format!("docker://{host}/proxy/org/app:v1");
        skopeo(&["copy", "--src-tls-verify=false", &src, &dest])
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let copied = std::fs::read(dir.join(round.to_string()).join("manifest.json")).unwrap();
        assert_eq!(sha256(&copied), seeded[0].digest, "round {round}");
    };
    let node = testbed::containerd::Containerd::start().unwrap();
    let hosts = node.hosts_dir("hosts");
    let ghcr = hosts.join("ghcr.io");
    std::fs::create_dir_all(&ghcr).unwrap();
    std::fs::write(
        ghcr.join("hosts.toml"),
        format!(
            "server = \"https://ghcr.io\"\n\n[host.\"http://{host}/v2/proxy\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"
        ),
    )
    .unwrap();
    let fetch = |round: usize| {
        let reference = "ghcr.io/org/app:v1";
        let got = node
            .pull(&hosts, reference)
            .unwrap_or_else(|e| panic!("round {round}: {e}\ncontainerd log:\n{}", node.log()));
        assert_eq!(got, seeded[0].digest, "round {round}");
        node.forget(reference);
    };
    copy(0);
    fetch(0);
    for round in 1..=2 {
        bed.harbor.rotate_signing_key();
        copy(round);
        fetch(round);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let m = router.scrape();
    assert!(m["harbor_router_tokens_refused_total"] >= 2.0);
    assert!(bed.harbor.counters().refused >= 2);
}

#[test]
fn a_robot_harbor_stops_accepting_keeps_the_list_and_says_so() {
    let (bed, seeded) = bed();
    let router = router(&bed, &[("DISCOVERY_INTERVAL", "300ms")]);
    assert_eq!(pull(&router, "org/app", "v1").status, 200);
    let health = get(router.addr, "/healthz").json();
    assert_eq!(health["projects"], 4);
    assert!(health.get("harbor_credentials").is_none(), "{health}");

    bed.harbor.set_robot_refused(true);
    let health = wait_for("healthz says the credentials are refused", || {
        let h = get(router.addr, "/healthz").json();
        (h["harbor_credentials"] == "refused").then_some(h)
    });
    // The last list read with working credentials, not the public projects an anonymous caller sees.
    assert_eq!(health["projects"], 4, "{health}");
    assert!(
        health.get("harbor_user").is_none(),
        "the user is for the log only"
    );
    assert_eq!(
        get(router.addr, "/readyz").status,
        200,
        "Harbor answers: still ready"
    );
    assert_eq!(
        router.scrape()["harbor_router_harbor_credentials_refused"],
        1.0
    );
    // Logged once, as an error naming the user and never the secret, however many rounds pass.
    let rounds = |r: &Router| r.scrape()[r#"harbor_router_discovery_runs_total{result="failed"}"#];
    let seen = rounds(&router);
    wait_until("three more rounds", || rounds(&router) >= seen + 3.0);
    let logged: Vec<String> = router
        .logs()
        .into_iter()
        .filter(|l| l.contains("does not accept the router's credentials"))
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].contains(r#""level":"ERROR""#), "{}", logged[0]);
    assert!(logged[0].contains("robot$router"), "{}", logged[0]);
    assert!(!router
        .logs()
        .iter()
        .any(|l| l.contains(testbed::DEFAULT_ROBOT_PASSWORD)));

    // The tokens issued before keep working until they expire; once they are gone, private
    // projects refuse the router: a registry error that says so, mapped or fanned out, and never
    // remembered as a miss (a miss would answer 404).
    bed.harbor.revoke_tokens();
    for (name, reference) in [
        ("org/app", "v1"),
        ("coreos/etcd", "v3.5.0"),
        ("org/app", "v1"),
    ] {
        let res = pull(&router, name, reference);
        assert_eq!(
            res.status,
            403,
            "{name}: {:?}",
            String::from_utf8_lossy(&res.body)
        );
        assert_eq!(res.error_code(), "DENIED");
        let detail = res.json()["errors"][0]["detail"].to_string();
        assert!(detail.contains("credentials"), "{detail}");
    }
    // A public project still serves (Harbor lets anonymous pull it).
    let res = pull(&router, "library/alpine", "3.19");
    assert_eq!(res.status, 200);
    assert_eq!(sha256(&res.body), seeded[2].digest);

    // Harbor accepts the robot again: the refusal clears, pulls resume.
    bed.harbor.set_robot_refused(false);
    wait_until("healthz clears the refusal", || {
        get(router.addr, "/healthz")
            .json()
            .get("harbor_credentials")
            .is_none()
    });
    router.wait_log(|l| l.contains("discovery recovered"));
    wait_until("the private project serves again", || {
        pull(&router, "coreos/etcd", "v3.5.0").status == 200
    });
    assert_eq!(
        router.scrape()["harbor_router_harbor_credentials_refused"],
        0.0
    );
}

#[test]
fn a_policy_refusal_reaches_the_client_as_harbor_sent_it() {
    let (bed, _seeded) = bed();
    let router = router(&bed, &[]);
    bed.harbor.set_fault("quay", Fault::Policy);
    // Cold (a fan-out: the other projects say 404), then mapped.
    for round in ["cold", "mapped"] {
        let res = pull(&router, "coreos/etcd", "v3.5.0");
        assert_eq!(
            res.status,
            412,
            "{round}: {:?}",
            String::from_utf8_lossy(&res.body)
        );
        assert_eq!(res.error_code(), "PROJECTPOLICYVIOLATION", "{round}");
        assert!(
            res.json()["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("cannot be pulled due to configured policy"),
            "{round}"
        );
    }
    // The HEAD passes the policy (Harbor checks GETs).
    let res = common::manifest(router.addr, "HEAD", "coreos/etcd", "v3.5.0");
    assert_eq!(res.status, 200);
}

#[test]
fn a_manifest_fetched_upstream_by_tag_gets_its_digest() {
    let (bed, seeded) = bed();
    let router = router(&bed, &[]);
    bed.harbor.set_empty_digests(EmptyDigests::Always);
    for round in ["cold", "mapped"] {
        let res = pull(&router, "org/app", "v1");
        assert_eq!(res.status, 200, "{round}");
        assert_eq!(sha256(&res.body), seeded[0].digest, "{round}");
        assert_eq!(
            res.header("docker-content-digest"),
            Some(seeded[0].digest.as_str()),
            "{round}"
        );
        assert_eq!(
            res.header("etag"),
            Some(format!("\"{}\"", seeded[0].digest).as_str()),
            "{round}"
        );
        assert_eq!(
            res.header("content-length"),
            Some(res.body.len().to_string().as_str())
        );
    }
    // The tag is remembered with that digest: Harbor's tag lookups failing, it stands in.
    bed.harbor
        .set_fault("ghcr", Fault::TagLookups(Box::new(Fault::Status(503))));
    let res = pull(&router, "org/app", "v1");
    assert_eq!(res.status, 200);
    assert!(res
        .header("warning")
        .is_some_and(|w| w.contains("Response is Stale")));
    assert_eq!(
        res.header("docker-content-digest"),
        Some(seeded[0].digest.as_str())
    );
    // skopeo reads the digest off the answer.
    bed.harbor.clear_faults();
    let raw = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/proxy/org/app:v1", router.addr),
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["Digest"], seeded[0].digest.as_str());
}

#[test]
fn http2_prior_knowledge_against_a_harbor_without_h2c_says_so_and_uses_http1() {
    let (bed, seeded) = bed();
    let router = router(&bed, &[("HTTP2_PRIOR_KNOWLEDGE", "true")]);
    for _ in 0..3 {
        let res = pull(&router, "org/app", "v1");
        assert_eq!(
            res.status,
            200,
            "{:?}\n{}",
            String::from_utf8_lossy(&res.body),
            router.logs().join("\n")
        );
        assert_eq!(sha256(&res.body), seeded[0].digest);
    }
    let line = router.wait_log(|l| l.contains("does not speak HTTP/2 without TLS"));
    assert!(line.contains("HTTP2_PRIOR_KNOWLEDGE"), "{line}");
    assert!(line.contains(r#""level":"ERROR""#), "{line}");
    let said = router
        .logs()
        .iter()
        .filter(|l| l.contains("does not speak HTTP/2"))
        .count();
    assert_eq!(said, 1, "said once");
    assert!(router.scrape()["harbor_router_upstream_h2c_refused_total"] >= 1.0);
}

#[test]
fn harbors_version_is_in_health_and_metrics() {
    let (bed, _seeded) = bed();
    let router = router(&bed, &[]);
    let health = get(router.addr, "/healthz").json();
    assert_eq!(health["harbor_version"], testbed::DEFAULT_VERSION);
    let m = router.scrape();
    let key = format!(
        r#"harbor_router_harbor_info{{version="{}"}}"#,
        testbed::DEFAULT_VERSION
    );
    assert_eq!(m.get(&key), Some(&1.0), "{m:?}");
}

#[test]
fn an_upstream_refusal_relayed_without_a_challenge_is_not_a_token_problem() {
    // Harbor relays its upstream's 401 on a blob with no WWW-Authenticate: the router's token is
    // fine, so nothing is fetched again, and the client is told whose refusal it was.
    let (bed, seeded) = bed();
    let router = router(&bed, &[]);
    assert_eq!(pull(&router, "org/app", "v1").status, 200);
    let blob = &seeded[0].blobs[1];
    let path = format!("/v2/proxy/org/app/blobs/{blob}");
    assert_eq!(get(router.addr, &path).status, 200);
    bed.harbor.set_fault("ghcr", Fault::Status(401));
    let tokens = token_requests(&bed);
    let res = get(router.addr, &path);
    assert_eq!(res.status, 403);
    assert_eq!(res.error_code(), "DENIED");
    let detail = res.json()["errors"][0]["detail"].to_string();
    assert!(detail.contains("upstream registry refused"), "{detail}");
    assert_eq!(token_requests(&bed), tokens, "no token fetched for it");
    assert_eq!(router.scrape()["harbor_router_tokens_refused_total"], 0.0);
}

#[test]
fn a_head_to_a_project_deleted_since_discovery_is_not_a_refusal() {
    // A HEAD's 401 has no body to tell a deleted project from a relayed refusal: the router asks
    // the project's tag list (n=0) to read Harbor's "project <name> not found".
    let (bed, _seeded) = bed();
    let router = router(&bed, &[]);
    let head = |name: &str, reference: &str| common::manifest(router.addr, "HEAD", name, reference);
    assert_eq!(pull(&router, "library/alpine", "3.19").status, 200);
    bed.harbor.delete_project("dockerhub");
    // Mapped to the deleted project, and a name no project has (a fan-out that asks it too).
    assert_eq!(head("library/alpine", "3.19").status, 404);
    assert_eq!(head("nobody/has-this", "v1").status, 404);
    assert_eq!(router.scrape()["harbor_router_tokens_refused_total"], 0.0);
    assert_eq!(head("org/app", "v1").status, 200);
}

#[test]
fn a_project_deleted_since_discovery_is_not_a_refused_token_nor_a_refusal() {
    // Harbor answers a request for a project it cannot find with 401, an empty challenge and
    // "project <name> not found" (src/server/middleware/v2auth/auth.go): the router's tokens are
    // fine and stay, and the image is not there.
    let (bed, _seeded) = bed();
    let router = router(&bed, &[]);
    assert_eq!(pull(&router, "coreos/etcd", "v3.5.0").status, 200);
    bed.harbor.delete_project("quay");
    let tokens = token_requests(&bed);
    // The name mapped to the deleted project: the mapping is dropped, the fan-out finds it
    // nowhere.
    let res = pull(&router, "coreos/etcd", "v3.5.0");
    assert_eq!(res.status, 404, "{}", res.text());
    assert_eq!(res.error_code(), "MANIFEST_UNKNOWN");
    assert_eq!(token_requests(&bed), tokens, "no token fetched again");
    // A name no project has: every project, the deleted one too, is asked; a 404, not a 403.
    let res = pull(&router, "nobody/has-this", "v1");
    assert_eq!(res.status, 404, "{}", res.text());
    assert_eq!(res.error_code(), "MANIFEST_UNKNOWN");
    let m = router.scrape();
    assert_eq!(m["harbor_router_tokens_refused_total"], 0.0);
    // Other projects' tokens and images are untouched.
    assert_eq!(pull(&router, "org/app", "v1").status, 200);
}
