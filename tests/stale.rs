//! Last-known-good tags (`STALE_IF_ERROR`) against the stand-in Harbor and the real registry: a tag
//! resolved once is still answered (HEAD and GET, with its digest and a `Warning`) while every
//! project fails with 5xx, 429, a hang, or Harbor refusing connections; a real skopeo pull by tag
//! completes while Harbor's tag lookups fail and its by-digest answers work; a tag that moved is
//! served fresh; a 404 is never masked; `0s` turns it off.

mod common;

use std::process::Command;

use sha2::{Digest, Sha256};
use testbed::{Fault, SeedImage, SeedKind, Seeded, Testbed};

use common::relay::Relay;
use common::{bed_with_app, manifest, wait_until, Response};

/// The proxy-cache projects of the default test bed.
const PROJECTS: [&str; 4] = ["dockerhub", "ghcr", "k8s", "quay"];
const WARNING: &str = "110 harbor-router \"Response is Stale\"";
/// No mapping outlives a request (a pull takes more than a microsecond), nor a miss: every pull fans
/// out over every project. (`1ms` is not enough: the next pull may come within it.)
const FAN_OUT_ALWAYS: [(&str, &str); 3] = [
    ("CACHE_TTL", "1us"),
    ("STALE_WHILE_REVALIDATE", "0s"),
    ("NEGATIVE_CACHE_TTL", "0s"),
];

use common::bed_router as router;

fn fail_every_project(bed: &Testbed, fault: Fault) {
    for p in PROJECTS {
        bed.harbor.set_fault(p, fault.clone());
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A fresh 200 for the tag: its digest, no warning.
fn assert_fresh(res: &Response, seeded: &Seeded, what: &str) {
    assert_eq!(res.status, 200, "{what}");
    assert_eq!(
        res.header("docker-content-digest"),
        Some(seeded.digest.as_str()),
        "{what}"
    );
    assert_eq!(res.header("warning"), None, "{what}: served fresh");
}

/// A stale 200 for the tag: its last-known-good digest, the warning, an age.
fn assert_stale(res: &Response, seeded: &Seeded, head: bool, what: &str) {
    assert_eq!(
        res.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&res.body)
    );
    assert_eq!(
        res.header("docker-content-digest"),
        Some(seeded.digest.as_str()),
        "{what}"
    );
    assert_eq!(res.header("warning"), Some(WARNING), "{what}");
    assert!(
        res.header("age").is_some_and(|a| a.parse::<u64>().is_ok()),
        "{what}"
    );
    assert_eq!(
        res.header("content-type"),
        Some(seeded.media_type.as_str()),
        "{what}"
    );
    if !head {
        assert_eq!(
            sha256(&res.body),
            seeded.digest,
            "{what}: the manifest itself"
        );
    }
}

#[test]
fn a_tag_is_answered_with_its_last_known_good_digest_through_every_kind_of_failure() {
    let (bed, app) = bed_with_app();
    let mut relay = Relay::start(bed.harbor.addr(), true);
    let url = format!("http://{}", relay.addr);
    // Short timeouts keep the hang and the circuits quick.
    let router = router(
        &url,
        &[
            ("RESOLVER_TIMEOUT", "1s"),
            ("CIRCUIT_BREAKER_TIMEOUT", "1s"),
        ],
    );
    let addr = router.addr;
    let head = manifest(addr, "HEAD", "org/app", "v1");
    assert_fresh(&head, &app, "HEAD");
    let length = head.header("content-length").unwrap().to_string();
    assert_fresh(&manifest(addr, "GET", "org/app", "v1"), &app, "GET");
    // The manifest by digest, as containerd asks it after its HEAD: kept in the core's memory.
    assert_eq!(manifest(addr, "GET", "org/app", &app.digest).status, 200);

    let faults = [
        ("503", Fault::Status(503)),
        ("502", Fault::Status(502)),
        ("504", Fault::Status(504)),
        ("429", Fault::Status(429)),
        ("a hang", Fault::Hang),
    ];
    for (what, fault) in faults {
        fail_every_project(&bed, fault);
        let res = manifest(addr, "HEAD", "org/app", "v1");
        assert_stale(&res, &app, true, &format!("{what}: HEAD"));
        assert_eq!(res.header("content-length"), Some(length.as_str()));
        let res = manifest(addr, "GET", "org/app", "v1");
        assert_stale(&res, &app, false, &format!("{what}: GET"));
        bed.harbor.clear_faults();
        // Served fresh again as soon as Harbor answers (once the tag lane's circuit, if these
        // failures opened it, lets a probe through).
        wait_until("the tag is served fresh again", || {
            let res = manifest(addr, "GET", "org/app", "v1");
            res.status == 200 && res.header("warning").is_none()
        });
    }

    // Harbor gone: connections refused.
    relay.close();
    assert_stale(
        &manifest(addr, "HEAD", "org/app", "v1"),
        &app,
        true,
        "refused: HEAD",
    );
    assert_stale(
        &manifest(addr, "GET", "org/app", "v1"),
        &app,
        false,
        "refused: GET",
    );
    // A tag never resolved has nothing to stand in: the failure is answered.
    let res = manifest(addr, "GET", "org/app", "never-seen");
    assert!(res.status >= 500, "{}", res.status);
    assert_eq!(res.header("warning"), None);

    let m = router.scrape();
    for reason in ["rate_limited", "unavailable", "failed"] {
        let n = m[&format!("harbor_router_stale_answers_total{{reason=\"{reason}\"}}")];
        assert!(n >= 2.0, "{reason}: {n}");
    }
    router.wait_log(|l| l.contains("last-known-good digest") && l.contains("org/app"));
}

#[test]
fn a_moved_tag_is_served_fresh_and_a_404_is_never_masked() {
    let (bed, app) = bed_with_app();
    let url = bed.harbor.url();
    let router = router(&url, &[("NEGATIVE_CACHE_TTL", "0s")]);
    let addr = router.addr;
    assert_fresh(&manifest(addr, "GET", "org/app", "v1"), &app, "first");

    // The tag moves upstream: the next answer is the new digest, fresh, and what is remembered.
    let moved = bed
        .seed(&[SeedImage {
            repository: "ghcr/org/app".into(),
            tag: "v1".into(),
            kind: SeedKind::OciManifest,
            layer_bytes: 8192,
        }])
        .unwrap()
        .remove(0);
    assert_ne!(moved.digest, app.digest);
    assert_fresh(&manifest(addr, "HEAD", "org/app", "v1"), &moved, "moved");
    fail_every_project(&bed, Fault::Status(503));
    assert_stale(
        &manifest(addr, "HEAD", "org/app", "v1"),
        &moved,
        true,
        "the moved digest is the one remembered",
    );
    bed.harbor.clear_faults();

    // Every project says 404: that is the answer.
    bed.harbor.set_fault("ghcr", Fault::Status(404));
    for method in ["HEAD", "GET"] {
        let res = manifest(addr, method, "org/app", "v1");
        assert_eq!(res.status, 404, "{method}");
        assert_eq!(res.header("warning"), None, "{method}");
    }
    // The project that had the tag said 404: it is forgotten, a later failure is not masked by it.
    // (A HEAD: it would be answered from memory alone.)
    fail_every_project(&bed, Fault::Status(503));
    let res = manifest(addr, "HEAD", "org/app", "v1");
    assert_eq!(res.status, 503);
    assert_eq!(res.header("warning"), None);
}

#[test]
fn skopeo_pulls_a_tag_while_harbors_tag_lookups_fail() {
    let (bed, app) = bed_with_app();
    let url = bed.harbor.url();
    // One failed tag lookup opens the project's circuit for tags: content by digest must still flow.
    let router = router(&url, &[("CIRCUIT_BREAKER_THRESHOLD", "1")]);
    let src = format!("docker://{}/proxy/org/app:v1", router.addr);
    let dir = std::env::temp_dir().join(format!("hr-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = |to: &str| {
        let dest = format!("dir:{}", dir.join(to).display());
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                &src,
                &dest,
            ])
            .output()
            .expect("run skopeo");
        let manifest = std::fs::read(dir.join(to).join("manifest.json")).ok();
        (out, manifest)
    };
    let (out, copied) = copy("before");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&copied.unwrap()), app.digest);

    // Harbor's upstream is down: tag lookups fail; what Harbor holds by digest it still serves.
    fail_every_project(&bed, Fault::TagLookups(Box::new(Fault::Status(503))));
    let (out, copied) = copy("during");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&copied.unwrap()), app.digest);
    let _ = std::fs::remove_dir_all(&dir);
    let m = router.scrape();
    assert!(m[r#"harbor_router_stale_answers_total{reason="unavailable"}"#] >= 1.0);

    // Off: the failure is answered.
    let off = self::router(&url, &[("STALE_IF_ERROR", "0s")]);
    bed.harbor.clear_faults();
    assert_fresh(&manifest(off.addr, "GET", "org/app", "v1"), &app, "off");
    fail_every_project(&bed, Fault::TagLookups(Box::new(Fault::Status(503))));
    let res = manifest(off.addr, "GET", "org/app", "v1");
    assert_eq!(res.status, 503);
    assert_eq!(res.header("warning"), None);
}

#[test]
fn a_fan_out_that_fails_everywhere_stands_in_too_unless_the_tags_project_said_404() {
    let (bed, app) = bed_with_app();
    let url = bed.harbor.url();
    let router = router(&url, &FAN_OUT_ALWAYS);
    let addr = router.addr;
    assert_fresh(&manifest(addr, "HEAD", "org/app", "v1"), &app, "first");
    fail_every_project(&bed, Fault::Status(502));
    assert_stale(
        &manifest(addr, "HEAD", "org/app", "v1"),
        &app,
        true,
        "every project of the fan-out failed",
    );
    // The tag's own project says 404 while the others fail: that is an answer about the tag, and
    // the remembered digest is forgotten, not served. (A GET: a HEAD's 404 has no body to tell
    // the upstream's "not found" from Harbor's local store's, so it forgets nothing.)
    bed.harbor.set_fault("ghcr", Fault::Status(404));
    let res = manifest(addr, "GET", "org/app", "v1");
    assert_eq!(res.status, 502);
    assert_eq!(res.header("warning"), None);
    bed.harbor.set_fault("ghcr", Fault::Status(502));
    let res = manifest(addr, "HEAD", "org/app", "v1");
    assert_eq!(res.status, 502, "forgotten");
    assert_eq!(res.header("warning"), None);
}

#[test]
fn a_tag_no_project_has_any_more_or_one_that_refuses_is_not_stood_in_for() {
    let (bed, app) = bed_with_app();
    let url = bed.harbor.url();
    let router = router(&url, &FAN_OUT_ALWAYS);
    let addr = router.addr;
    assert_fresh(&manifest(addr, "HEAD", "org/app", "v1"), &app, "first");
    // Every project refuses (the robot lost its rights, say): an answer, not a failure.
    fail_every_project(&bed, Fault::Status(403));
    let res = manifest(addr, "HEAD", "org/app", "v1");
    assert_eq!(res.header("warning"), None, "{}", res.status);
    assert_ne!(res.status, 200);
    // Deleted upstream: every project says 404, then Harbor fails: the deleted tag is not served.
    bed.harbor.clear_faults();
    assert_fresh(&manifest(addr, "HEAD", "org/app", "v1"), &app, "again");
    bed.harbor.set_fault("ghcr", Fault::Status(404));
    assert_eq!(manifest(addr, "GET", "org/app", "v1").status, 404);
    fail_every_project(&bed, Fault::Status(502));
    let res = manifest(addr, "HEAD", "org/app", "v1");
    assert_eq!(res.status, 502);
    assert_eq!(
        res.header("warning"),
        None,
        "forgotten when no project had it"
    );

    // A mapped project that refuses: its 403 is the answer.
    let mapped = self::router(&url, &[]);
    bed.harbor.clear_faults();
    assert_fresh(
        &manifest(mapped.addr, "HEAD", "org/app", "v1"),
        &app,
        "mapped",
    );
    bed.harbor.set_fault("ghcr", Fault::Status(403));
    let res = manifest(mapped.addr, "HEAD", "org/app", "v1");
    assert_eq!(res.status, 403);
    assert_eq!(res.header("warning"), None);
}
