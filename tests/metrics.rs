//! `/metrics` end to end: the router binary in front of the stand-in Harbor and the real registry,
//! known traffic (hits, a fan-out, a remembered miss, a blob, a manifest from memory, an upstream
//! error), then exact counts from a scrape; `promtool check metrics` on the text format; OpenMetrics
//! when asked for; the access log.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use testbed::{Fault, Testbed};

use common::{request, wait_until, Response, Router};

struct Env {
    bed: Testbed,
    router: Router,
    metrics: SocketAddr,
    seeded: Vec<testbed::Seeded>,
}

fn start(extra: &[(&str, &str)]) -> Env {
    let (bed, app) = common::bed_with_app();
    let seeded = vec![app];
    let url = bed.harbor.url();
    let mut env = common::bed_env(&url);
    env.extend_from_slice(extra);
    let router = Router::start(&env);
    let metrics = router.metrics_addr();
    wait_until("the router is ready", || {
        common::get(router.addr, "/readyz").status == 200
    });
    Env {
        bed,
        router,
        metrics,
        seeded,
    }
}

impl Env {
    fn manifest(&self, method: &str, name: &str, reference: &str) -> Response {
        common::manifest(self.router.addr, method, name, reference)
    }

    fn scrape(&self, accept: Option<&str>) -> Response {
        let extra: Vec<String> = accept.map(|a| format!("Accept: {a}")).into_iter().collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        request(self.metrics, "GET", "/metrics", &extra)
    }

    /// `name{labels}` → value of one text-format scrape.
    fn samples(&self) -> BTreeMap<String, f64> {
        let res = self.scrape(None);
        assert_eq!(res.status, 200);
        common::samples(&String::from_utf8(res.body).unwrap())
    }
}

fn get(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have:\n{}", keys(s)))
}

fn keys(s: &BTreeMap<String, f64>) -> String {
    s.keys().cloned().collect::<Vec<_>>().join("\n")
}

/// `promtool check metrics` (Debian's `prometheus` package) on `text`.
fn promtool(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by scripts/test.sh");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn known_traffic_gives_exact_counts() {
    let env = start(&[]);
    let app = &env.seeded[0];
    // A fan-out finds the image (ghcr wins), then three mapped hits.
    assert_eq!(env.manifest("GET", "org/app", "v1").status, 200);
    for _ in 0..3 {
        assert_eq!(env.manifest("GET", "org/app", "v1").status, 200);
    }
    // By digest: asked once (mapped), then answered from memory.
    assert_eq!(env.manifest("GET", "org/app", &app.digest).status, 200);
    assert_eq!(env.manifest("GET", "org/app", &app.digest).status, 200);
    // A blob, mapped.
    let blob = request(
        env.router.addr,
        "GET",
        &format!("/v2/proxy/org/app/blobs/{}", app.blobs[0]),
        &[],
    );
    assert_eq!(blob.status, 200);
    // A miss found by a fan-out, then remembered.
    assert_eq!(env.manifest("GET", "nowhere/x", "v1").status, 404);
    assert_eq!(env.manifest("GET", "nowhere/x", "v1").status, 404);
    // An upstream error: quay answers 503 in the next fan-out (which ghcr does not win either).
    env.bed.harbor.set_fault("quay", Fault::Status(503));
    assert_eq!(env.manifest("GET", "other/y", "v1").status, 502);
    env.bed.harbor.clear_faults();
    // A refusal.
    assert_eq!(request(env.router.addr, "GET", "/v2/nope", &[]).status, 404);

    let s = env.samples();
    let req = |endpoint: &str, status: &str| {
        get(
            &s,
            &format!(
                r#"harbor_router_requests_total{{endpoint="{endpoint}",method="GET",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(req("manifest", "2xx"), 6.0);
    assert_eq!(req("manifest", "4xx"), 2.0);
    assert_eq!(req("manifest", "5xx"), 1.0);
    assert_eq!(req("blob", "2xx"), 1.0);
    assert_eq!(req("other", "4xx"), 1.0);
    let route = |r: &str| {
        get(
            &s,
            &format!(r#"harbor_router_pull_duration_seconds_count{{route="{r}"}}"#),
        )
    };
    assert_eq!(route("fanout"), 3.0, "org/app, nowhere/x, other/y");
    assert_eq!(
        route("mapped"),
        5.0,
        "3 tag hits, the digest once, the blob"
    );
    assert_eq!(route("memory"), 1.0);
    assert_eq!(route("negative"), 1.0);
    assert_eq!(get(&s, "harbor_router_blob_first_byte_seconds_count"), 1.0);
    let fanouts = |o: &str| {
        get(
            &s,
            &format!(r#"harbor_router_fanouts_total{{kind="request",outcome="{o}"}}"#),
        )
    };
    assert_eq!(fanouts("found"), 1.0);
    assert_eq!(fanouts("not_found"), 1.0);
    assert_eq!(fanouts("failed"), 1.0);
    assert_eq!(get(&s, "harbor_router_fanout_width_projects_count"), 3.0);
    assert_eq!(get(&s, "harbor_router_fanout_width_projects_sum"), 12.0);
    let lookup = |layer: &str, result: &str| {
        get(
            &s,
            &format!(r#"harbor_router_cache_lookups_total{{layer="{layer}",result="{result}"}}"#),
        )
    };
    assert_eq!(lookup("core", "hit"), 5.0);
    assert_eq!(lookup("core", "negative"), 1.0);
    assert_eq!(lookup("core", "miss"), 3.0);
    assert_eq!(lookup("process", "miss"), 3.0);
    assert_eq!(lookup("memory", "hit"), 1.0);
    assert_eq!(lookup("memory", "miss"), 1.0);
    assert_eq!(
        get(
            &s,
            r#"harbor_router_upstream_errors_total{project="quay",kind="5xx"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            r#"harbor_router_upstream_responses_total{project="quay",status="5xx"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            r#"harbor_router_upstream_responses_total{project="ghcr",status="2xx"}"#
        ),
        6.0,
        "the fan-out's win, 3 tag hits, the digest, the blob"
    );
    assert_eq!(
        get(
            &s,
            r#"harbor_router_rejected_requests_total{reason="invalid"}"#
        ),
        1.0
    );
    assert_eq!(get(&s, "harbor_router_projects"), 4.0);
    assert!(get(&s, r#"harbor_router_discovery_runs_total{result="ok"}"#) >= 1.0);
    assert!(get(&s, "harbor_router_response_bytes_total") > 4096.0);
    // Eleven requests above, each on its own connection, and at least one readiness probe.
    assert!(get(&s, "harbor_router_client_connections_accepted_total") >= 12.0);
    assert!(get(&s, r#"harbor_router_upstream_connections{state="open"}"#) >= 1.0);
    assert!(get(&s, "harbor_router_token_fetches_total") >= 1.0);
    assert!(get(&s, "harbor_router_token_cache_hits_total") >= 1.0);
    assert_eq!(get(&s, r#"harbor_router_build_info{version="0.1.0"}"#), 1.0);
    assert!(
        keys(&s).contains("harbor_router_worker_info{worker=\"0\",io_driver="),
        "{}",
        keys(&s)
    );
    assert!(
        !keys(&s).contains("org/app") && !keys(&s).contains("127.0.0.1"),
        "never an image name or a client address"
    );

    // The text format passes promtool; OpenMetrics is served when asked for.
    let text = String::from_utf8(env.scrape(None).body).unwrap();
    promtool(&text);
    let om = env.scrape(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    ));
    assert!(om
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let om = String::from_utf8(om.body).unwrap();
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE harbor_router_requests counter\n"));
    assert!(om.contains("harbor_router_requests_total{"));
    // Every counter family is named without `_total`, its samples with it; every histogram series
    // ends with a `+Inf` bucket.
    for family in om.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = family.split_once(' ').unwrap();
        match kind {
            "counter" => {
                assert!(!name.ends_with("_total"), "{name}");
                assert!(om.contains(&format!("\n{name}_total")), "{name}");
            }
            "histogram" => {
                let buckets = om.matches(&format!("\n{name}_bucket")).count();
                let counts = om.matches(&format!("\n{name}_count")).count();
                let inf = om
                    .lines()
                    .filter(|l| {
                        l.starts_with(&format!("{name}_bucket")) && l.contains("le=\"+Inf\"")
                    })
                    .count();
                assert!(
                    buckets > 0 && inf == counts,
                    "{name}: {inf} +Inf, {counts} series"
                );
            }
            _ => {}
        }
    }
    let res = request(env.metrics, "GET", "/", &[]);
    assert_eq!(res.status, 404);
}

#[test]
fn the_access_log_follows_a_pull_into_harbor() {
    let env = start(&[("ACCESS_LOG", "all")]);
    let res = request(
        env.router.addr,
        "GET",
        "/v2/proxy/org/app/manifests/v1",
        &[
            "X-Request-Id: pull-42",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ],
    );
    assert_eq!(res.status, 200);
    assert_eq!(res.header("x-request-id"), Some("pull-42"));
    let line = env
        .router
        .wait_log(|l| l.contains(r#""request_id":"pull-42""#));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["target"], "access", "{v}");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["endpoint"], "manifest");
    assert_eq!(v["name"], "org/app");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "fanout");
    assert_eq!(v["project"], "ghcr");
    assert_eq!(v["attempts"], 4);
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
    let printed = line.split(r#""duration_ms":"#).nth(1).unwrap();
    let printed = printed.split([',', '}']).next().unwrap();
    let decimals = printed.split('.').nth(1).map_or(0, str::len);
    assert!(
        decimals <= 3,
        "whole microseconds, in milliseconds: {printed}"
    );
    assert!(v["bytes"].as_u64().unwrap() > 0);
    // Harbor saw the id on the requests of this pull.
    assert!(
        env.bed.harbor.counters().request_ids.contains("pull-42"),
        "{:?}",
        env.bed.harbor.counters().request_ids
    );
    // A request without an id gets one.
    let res = env.manifest("HEAD", "org/app", "v1");
    let id = res.header("x-request-id").unwrap().to_string();
    assert_eq!(id.len(), 20, "{id}");
    env.router.wait_log(|l| {
        l.contains(&format!(r#""request_id":"{id}""#)) && l.contains(r#""route":"mapped""#)
    });
    // `/v2/` is no pull: no route, and not "refused".
    let res = common::request(env.router.addr, "GET", "/v2/", &["X-Request-Id: base-1"]);
    assert_eq!(res.status, 200);
    let line = env
        .router
        .wait_log(|l| l.contains(r#""request_id":"base-1""#));
    assert!(line.contains(r#""route":"""#), "{line}");
}

#[test]
fn the_default_access_log_has_errors_only() {
    let env = start(&[]);
    assert_eq!(env.manifest("GET", "org/app", "v1").status, 200);
    assert_eq!(env.manifest("GET", "nowhere/z", "v1").status, 404);
    env.router
        .wait_log(|l| l.contains(r#""target":"access""#) && l.contains(r#""name":"nowhere/z""#));
    assert!(
        !env.router
            .logs()
            .iter()
            .any(|l| l.contains(r#""target":"access""#) && l.contains(r#""name":"org/app""#)),
        "a 200 is not logged by default"
    );
}

/// Every `harbor_router_…` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("harbor_router_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if end > "harbor_router_".len() {
            names.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The rule groups of the PrometheusRule (everything under `spec:`), as a plain rules file.
fn rule_groups() -> String {
    let s = std::fs::read_to_string("deploy/monitoring/prometheusrule.yaml").unwrap();
    let mut lines = s.lines().skip_while(|l| *l != "spec:");
    lines.next();
    lines
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = std::env::temp_dir().join(format!("hr-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rules.yaml"), rule_groups()).unwrap();
    std::fs::copy(
        "deploy/monitoring/rules-test.yaml",
        dir.join("rules-test.yaml"),
    )
    .unwrap();
    for args in [
        vec!["check", "rules", "rules.yaml"],
        vec!["test", "rules", "rules-test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_dashboard_and_the_rules_name_only_metrics_that_exist() {
    let env = start(&[]);
    let text = String::from_utf8(env.scrape(None).body).unwrap();
    // Families from the TYPE lines; histograms expose _bucket, _sum and _count.
    let mut exposed = std::collections::BTreeSet::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = l.split(' ');
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        exposed.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exposed.insert(format!("{name}{suffix}"));
            }
        }
    }
    assert!(exposed.len() >= 36, "{exposed:?}");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/monitoring/grafana-dashboard.json").unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 20);
    exprs.push(rule_groups());
    exprs.push(std::fs::read_to_string("docs/observability.md").unwrap());
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                exposed.contains(&name),
                "{name} is not exposed (in {e:.80})"
            );
        }
    }
    // And every exposed family is documented.
    let doc = std::fs::read_to_string("docs/observability.md").unwrap();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = l.split(' ').next().unwrap();
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} is missing from docs/observability.md"
        );
    }
}
