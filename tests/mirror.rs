//! Registry-aware mirroring against the stand-in Harbor and the real registry: a request that names
//! its registry (`?ns=<host>`, as containerd sends to a mirror) is served only by the projects that
//! mirror that registry, in the `PROXY_PROJECT` form and in the root form, cold and warm, in both
//! orders; a registry nobody mirrors gets 404 `NAME_UNKNOWN` naming it; `ns` never reaches Harbor.

mod common;

use testbed::{HarborConfig, SeedImage, SeedKind, Seeded, Testbed};

use common::{request, wait_until, Response, Router};

fn image(repository: &str, layer_bytes: usize) -> SeedImage {
    SeedImage {
        repository: repository.into(),
        tag: "v1".into(),
        kind: SeedKind::OciManifest,
        layer_bytes,
    }
}

/// The test bed with `shared/tool:v1` in ghcr and in quay (different content), Docker Hub's
/// `library/alpine:v1` and registry.k8s.io's `pause:v1`.
fn bed() -> (Testbed, Vec<Seeded>) {
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let seeded = bed
        .seed(&[
            image("ghcr/shared/tool", 1000),
            image("quay/shared/tool", 2000),
            image("dockerhub/library/alpine", 500),
            image("k8s/pause", 300),
        ])
        .unwrap();
    assert_ne!(seeded[0].digest, seeded[1].digest);
    (bed, seeded)
}

/// A router with the default `COALESCE_LINGER` on: what lingers must keep each registry's and each
/// form's answer apart.
fn router(bed: &Testbed) -> Router {
    let url = bed.harbor.url();
    let mut env = common::bed_env(&url);
    env.push(("COALESCE_LINGER", "2s"));
    let router = Router::start(&env);
    wait_until("the router is ready", || {
        common::get(router.addr, "/readyz").status == 200
    });
    router
}

fn pull(router: &Router, path: &str) -> Response {
    common::pull(router.addr, "GET", path)
}

fn digest(res: &Response) -> String {
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    res.header("docker-content-digest").unwrap().to_string()
}

const PROXY_FORM: &str = "/v2/proxy/shared/tool/manifests/v1";
const ROOT_FORM: &str = "/v2/shared/tool/manifests/v1";

#[test]
fn each_registry_gets_its_own_image_in_both_forms_cold_and_warm() {
    let (bed, seeded) = bed();
    let (ghcr, quay) = (&seeded[0].digest, &seeded[1].digest);
    for order in [["ghcr.io", "quay.io"], ["quay.io", "ghcr.io"]] {
        let router = router(&bed);
        for round in ["cold", "warm"] {
            for ns in order {
                let want = if ns == "ghcr.io" { ghcr } else { quay };
                for form in [PROXY_FORM, ROOT_FORM] {
                    let res = pull(&router, &format!("{form}?ns={ns}"));
                    assert_eq!(&digest(&res), want, "{ns} {form} {round} {order:?}");
                    assert_eq!(res.header("oci-namespace"), Some(ns));
                }
            }
        }
    }
    // Docker Hub by any of its names, with its library/ rule; ns never reaches Harbor.
    let router = router(&bed);
    for ns in ["docker.io", "registry-1.docker.io", "index.docker.io"] {
        let res = pull(&router, &format!("/v2/alpine/manifests/v1?ns={ns}"));
        assert_eq!(digest(&res), seeded[2].digest, "{ns}");
        assert_eq!(res.header("oci-namespace"), Some("docker.io"));
    }
    assert!(
        !bed.harbor
            .counters()
            .queries
            .iter()
            .any(|q| q.contains("ns=")),
        "{:?}",
        bed.harbor.counters().queries
    );
}

#[test]
fn a_mirror_request_never_takes_another_registrys_image() {
    let (bed, seeded) = bed();
    let router = router(&bed);
    // quay answers last: a router that raced every project would serve ghcr's image.
    let held = bed.harbor.hold("quay");
    let quay_before = *bed.harbor.counters().v2_requests.get("quay").unwrap_or(&0);
    let res = std::thread::scope(|s| {
        let pulling = s.spawn(|| pull(&router, &format!("{PROXY_FORM}?ns=quay.io")));
        wait_until("the request reached quay", || {
            *bed.harbor.counters().v2_requests.get("quay").unwrap_or(&0) > quay_before
        });
        held.release();
        pulling.join().unwrap()
    });
    assert_eq!(digest(&res), seeded[1].digest);
    assert_eq!(
        bed.harbor.counters().v2_requests.get("ghcr"),
        None,
        "ghcr was never asked"
    );
}

#[test]
fn unknown_registries_and_requests_without_ns() {
    let (bed, seeded) = bed();
    let router = router(&bed);
    let res = pull(&router, &format!("{ROOT_FORM}?ns=registry.example.org"));
    assert_eq!(res.status, 404);
    assert_eq!(res.error_code(), "NAME_UNKNOWN");
    assert!(
        String::from_utf8_lossy(&res.body).contains("registry.example.org"),
        "the detail names the host"
    );
    assert_eq!(
        pull(&router, &format!("{ROOT_FORM}?ns=bad%2Fhost")).status,
        404
    );
    // Without ns: the root form is not routed, the PROXY_PROJECT form races every project.
    let res = pull(&router, ROOT_FORM);
    assert_eq!(res.status, 404);
    assert_eq!(res.error_code(), "NAME_UNKNOWN");
    let res = pull(&router, PROXY_FORM);
    assert!([&seeded[0].digest, &seeded[1].digest].contains(&&digest(&res)));
    assert_eq!(res.header("oci-namespace"), None);
    // A tag list names the repository as the client did, in either form.
    for (path, name) in [
        ("/v2/shared/tool/tags/list?ns=ghcr.io", "shared/tool"),
        (
            "/v2/proxy/shared/tool/tags/list?ns=ghcr.io",
            "proxy/shared/tool",
        ),
    ] {
        let res = request(router.addr, "GET", path, &[]);
        assert_eq!(res.status, 200, "{path}");
        assert_eq!(res.json()["name"], name, "{path}");
        assert_eq!(res.json()["tags"], serde_json::json!(["v1"]));
    }
    // An ns-less mapping does not leak into a mirror request, nor the other way round.
    let ghcr = digest(&pull(&router, &format!("{PROXY_FORM}?ns=ghcr.io")));
    let quay = digest(&pull(&router, &format!("{PROXY_FORM}?ns=quay.io")));
    assert_eq!(
        (ghcr, quay),
        (seeded[0].digest.clone(), seeded[1].digest.clone())
    );
}

/// hosts.toml for `registry`, sending pulls to the router in one of the two forms containerd knows.
fn hosts_toml(
    dir: &std::path::Path,
    registry: &str,
    router: std::net::SocketAddr,
    override_path: bool,
) {
    let d = dir.join(registry);
    std::fs::create_dir_all(&d).unwrap();
    let (url, extra) = if override_path {
        (
            format!("http://{router}/v2/proxy"),
            "  override_path = true\n",
        )
    } else {
        (format!("http://{router}"), "")
    };
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"https://{registry}\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{extra}"
        ),
    )
    .unwrap();
}

#[test]
fn containerd_pulls_each_registry_through_the_router() {
    let (bed, seeded) = bed();
    let router = router(&bed);
    let node = testbed::containerd::Containerd::start().unwrap();
    let images = [
        ("ghcr.io/shared/tool:v1", &seeded[0].digest),
        ("quay.io/shared/tool:v1", &seeded[1].digest),
        ("docker.io/library/alpine:v1", &seeded[2].digest),
        ("registry.k8s.io/pause:v1", &seeded[3].digest),
    ];
    // The router's caches are cold for the first form and order, warm after; containerd's own
    // content is forgotten after each pull, so every pull goes to the router.
    for override_path in [true, false] {
        let hosts = node.hosts_dir(if override_path {
            "hosts-proxy"
        } else {
            "hosts-root"
        });
        for registry in ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"] {
            hosts_toml(&hosts, registry, router.addr, override_path);
        }
        for reversed in [false, true] {
            let mut order = images.to_vec();
            if reversed {
                order.reverse();
            }
            for (reference, want) in order {
                let got = node
                    .pull(&hosts, reference)
                    .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", node.log()));
                assert_eq!(
                    &got, want,
                    "{reference} (override_path = {override_path}, reversed = {reversed})"
                );
                node.forget(reference);
            }
        }
    }
    // Every pull went through the router, naming its registry.
    let m = router.scrape();
    assert!(m[r#"harbor_router_upstream_responses_total{project="k8s",status="2xx"}"#] >= 1.0);
    assert_eq!(
        m.get(r#"harbor_router_requests_total{endpoint="manifest",method="GET",status="4xx"}"#),
        None,
        "no pull was refused"
    );
}

#[test]
fn with_fanout_order_the_preferred_project_serves_a_shared_name_cold_and_warm() {
    let (bed, seeded) = bed();
    let url = bed.harbor.url();
    let answered = |p: &str| *bed.harbor.counters().answered.get(p).unwrap_or(&0);
    for _ in 0..3 {
        let mut env = common::bed_env(&url);
        env.push(("FANOUT_ORDER", "quay,ghcr"));
        let router = Router::start(&env);
        wait_until("the router is ready", || {
            common::get(router.addr, "/readyz").status == 200
        });
        // quay, preferred, answers after ghcr has answered.
        let held = bed.harbor.hold("quay");
        let ghcr_before = answered("ghcr");
        let res = std::thread::scope(|s| {
            let pulling = s.spawn(|| pull(&router, PROXY_FORM));
            wait_until("ghcr answered first", || answered("ghcr") > ghcr_before);
            held.release();
            pulling.join().unwrap()
        });
        assert_eq!(digest(&res), seeded[1].digest, "cold: quay's image");
        for _ in 0..3 {
            assert_eq!(digest(&pull(&router, PROXY_FORM)), seeded[1].digest, "warm");
        }
    }
}
