//! Discovery against the stand-in Harbor (`testbed`): the project set, pagination, credentials,
//! registry types, and the router's health following the snapshot.

mod common;

use harbor_router::clock::Clock;
use harbor_router::config::Config;
use harbor_router::control::discovery::{discover, Discovered, DiscoveryError, Robot};
use harbor_router::snapshot::{Project, UpstreamKind};
use harbor_router::upstream::{self, Upstream};
use testbed::{HarborConfig, ProjectSpec, RegistrySpec, Shift, StandIn};

use common::relay::Relay;
use common::{get, wait_for, Router};

const ROBOT: (&str, &str) = ("robot$router", "router-secret");

fn config(harbor: &str, creds: Option<(&str, &str)>) -> Config {
    match creds {
        Some((u, p)) => common::config(harbor, &[("HARBOR_USERNAME", u), ("HARBOR_PASSWORD", p)]),
        None => common::config(harbor, &[]),
    }
}

/// Runs one discovery round in a monoio runtime on this thread.
fn discover_once(
    harbor: &str,
    creds: Option<(&str, &str)>,
) -> Result<Vec<Project>, DiscoveryError> {
    round(harbor, creds).map(|d| d.projects)
}

/// One round.
fn round(harbor: &str, creds: Option<(&str, &str)>) -> Result<Discovered, DiscoveryError> {
    let config = config(harbor, creds);
    let shared = upstream::Harbor::new(&upstream::Settings::from_config(&config)).unwrap();
    let user = creds.map(|c| c.0).unwrap_or("(anonymous)").to_string();
    common::run(async move {
        let client = Upstream::new(shared, Clock::system());
        let robot = Robot {
            user: &user,
            credentials: creds.is_some(),
        };
        discover(&client, &robot).await
    })
}

fn standin(projects: Vec<ProjectSpec>) -> StandIn {
    StandIn::start(
        HarborConfig {
            projects,
            ..HarborConfig::default()
        },
        None,
    )
    .unwrap()
}

fn names(projects: &[Project]) -> Vec<&str> {
    projects.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn finds_exactly_the_proxy_projects_with_their_kinds() {
    let harbor = standin(testbed::default_projects());
    let projects = discover_once(&harbor.url(), Some(ROBOT)).unwrap();
    assert_eq!(
        names(&projects),
        ["dockerhub", "ghcr", "k8s", "quay"],
        "sorted, non-proxy left out"
    );
    let kind = |n: &str| projects.iter().find(|p| p.name == n).unwrap().kind.clone();
    assert_eq!(kind("dockerhub"), UpstreamKind::DockerHub);
    assert_eq!(kind("ghcr"), UpstreamKind::Other("github-ghcr".into()));
    assert_eq!(kind("quay"), UpstreamKind::Other("quay".into()));
    let hub = projects.iter().find(|p| p.name == "dockerhub").unwrap();
    assert_eq!(hub.upstream_url.as_deref(), Some("https://hub.docker.com"));
    assert!(hub.id > 0 && hub.registry_id > 0);
}

#[test]
fn follows_pagination_across_250_projects() {
    // 250 proxy projects over 3 upstream registries, with 25 ordinary projects in between.
    let projects: Vec<ProjectSpec> = (0..275)
        .map(|i| ProjectSpec {
            name: format!("p{i:03}"),
            public: false,
            registry: (i % 11 != 7).then(|| RegistrySpec {
                id: (i % 3) as i64 + 1,
                name: format!("upstream-{}", i % 3),
                kind: if i % 3 == 0 { "docker-hub" } else { "quay" }.into(),
                url: "https://example.invalid".into(),
            }),
        })
        .collect();
    let harbor = standin(projects.clone());
    let found = discover_once(&harbor.url(), Some(ROBOT)).unwrap();
    let mut want: Vec<String> = projects
        .iter()
        .filter(|p| p.registry.is_some())
        .map(|p| p.name.clone())
        .collect();
    want.sort();
    assert_eq!(want.len(), 250);
    assert_eq!(
        names(&found),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    // systeminfo, 3 pages of 100, one read per distinct registry.
    assert_eq!(harbor.counters().api_requests, 1 + 3 + 3);
}

#[test]
fn anonymous_sees_public_projects_only() {
    let mut projects = testbed::default_projects();
    for p in projects
        .iter_mut()
        .filter(|p| p.name == "ghcr" || p.name == "quay")
    {
        p.public = false;
    }
    let harbor = standin(projects);
    // Anonymous discovery cannot read registries (401), so types are unknown but projects are listed.
    let found = discover_once(&harbor.url(), None).unwrap();
    assert_eq!(names(&found), ["dockerhub", "k8s"]);
    assert!(found.iter().all(|p| p.kind == UpstreamKind::Unknown));
}

#[test]
fn bad_credentials_are_a_credentials_error_naming_the_user() {
    // Harbor answers a wrong password as to an anonymous caller (public projects, 200): systeminfo
    // without the version says so.
    let harbor = standin(testbed::default_projects());
    let err = discover_once(&harbor.url(), Some(("robot$router", "wrong-password"))).unwrap_err();
    assert!(matches!(err, DiscoveryError::Credentials { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("robot$router"), "{text}");
    assert!(text.contains("no harbor_version"), "{text}");
    assert!(!text.contains("wrong-password"), "{text}");
    // The same when Harbor stops accepting a robot it accepted.
    let found = round(&harbor.url(), Some(ROBOT)).unwrap();
    assert_eq!(found.version.as_deref(), Some(testbed::DEFAULT_VERSION));
    harbor.set_robot_refused(true);
    let err = discover_once(&harbor.url(), Some(ROBOT)).unwrap_err();
    assert!(matches!(err, DiscoveryError::Credentials { .. }), "{err}");
}

#[test]
fn without_systeminfo_a_refused_robot_shows_in_registries() {
    let harbor = standin(testbed::default_projects());
    harbor.hide_systeminfo(true);
    let good = round(&harbor.url(), Some(ROBOT)).unwrap();
    assert_eq!(good.version, None);
    assert_eq!(names(&good.projects), ["dockerhub", "ghcr", "k8s", "quay"]);
    harbor.set_robot_refused(true);
    // registries/{id} answers 401, as to an anonymous caller (a valid robot gets 200 or 403).
    let err = round(&harbor.url(), Some(ROBOT)).unwrap_err();
    assert!(matches!(err, DiscoveryError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("answered 401"), "{err}");
    // Anonymous by configuration: the public list is the list.
    let anon = round(&harbor.url(), None).unwrap();
    assert_eq!(names(&anon.projects), ["dockerhub", "k8s"]);
}

#[test]
fn pages_that_shift_while_they_are_read_lose_and_repeat_no_project() {
    let proxy = |name: &str| ProjectSpec {
        name: name.into(),
        public: true,
        registry: Some(RegistrySpec {
            id: 1,
            name: "hub".into(),
            kind: "docker-hub".into(),
            url: "https://hub.docker.com".into(),
        }),
    };
    let projects: Vec<ProjectSpec> = (0..150).map(|i| proxy(&format!("p{i:03}"))).collect();
    let harbor = standin(projects);
    let want: Vec<String> = (0..150).map(|i| format!("p{i:03}")).collect();
    // A project created before the second page: p099 would be read twice.
    harbor.shift_pages(Shift::Create(proxy("a-new")));
    let found = discover_once(&harbor.url(), Some(ROBOT)).unwrap();
    let mut with_new = want.clone();
    with_new.insert(0, "a-new".into());
    assert_eq!(
        names(&found),
        with_new.iter().map(String::as_str).collect::<Vec<_>>()
    );
    // One deleted before the second page: p100 would be on no page.
    harbor.shift_pages(Shift::Delete("a-new".into()));
    let pages = harbor.counters().project_pages;
    let found = discover_once(&harbor.url(), Some(ROBOT)).unwrap();
    assert_eq!(
        names(&found),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(harbor.counters().project_pages - pages, 4, "read twice");
    // A list that changes under every read: the reads are merged, no project lost or repeated.
    for name in ["a-1", "a-2", "a-3"] {
        harbor.shift_pages(Shift::Create(proxy(name)));
    }
    let found = discover_once(&harbor.url(), Some(ROBOT)).unwrap();
    let got = names(&found);
    for p in want.iter().map(String::as_str).chain(["a-1", "a-2"]) {
        assert!(got.contains(&p), "{p} missing");
    }
    let mut unique = got.clone();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "no duplicate");
}

#[test]
fn registries_the_robot_cannot_read_leave_the_type_unknown() {
    let harbor = standin(testbed::default_projects());
    harbor.set_registries_forbidden(true);
    let found = discover_once(&harbor.url(), Some(ROBOT)).unwrap();
    assert_eq!(names(&found), ["dockerhub", "ghcr", "k8s", "quay"]);
    assert!(found.iter().all(|p| p.kind == UpstreamKind::Unknown));
}

#[test]
fn readiness_follows_discovery_and_survives_harbor_going_away() {
    let harbor = standin(testbed::default_projects());
    // Harbor unreachable at first: the relay refuses every connection.
    let relay = Relay::start(harbor.addr(), false);
    let harbor_url = format!("http://{}", relay.addr);
    let r = Router::start(&[
        ("WORKERS", "2"),
        ("HARBOR_URL", &harbor_url),
        ("HARBOR_USERNAME", ROBOT.0),
        ("HARBOR_PASSWORD", ROBOT.1),
        ("DISCOVERY_INTERVAL", "1s"),
    ]);
    r.wait_log(|l| l.contains("discovery failed"));
    let res = get(r.addr, "/readyz");
    assert_eq!(res.status, 503);
    assert_eq!(
        res.json()["reason"],
        "no proxy-cache project discovered yet"
    );
    let res = get(r.addr, "/healthz");
    assert_eq!(res.status, 200, "alive without Harbor");
    assert_eq!(
        res.json()["not_ready"],
        "no proxy-cache project discovered yet"
    );

    relay.set_forward(true);
    let res = wait_for("ready once Harbor answers", || {
        let res = get(r.addr, "/readyz");
        (res.status == 200).then_some(res)
    });
    assert_eq!(res.json()["projects"], 4);
    assert_eq!(get(r.addr, "/healthz").status, 200);
    r.wait_log(|l| l.contains("proxy-cache projects discovered") && l.contains("dockerhub"));

    // Harbor goes away: the last good list is kept, and the pod stays ready however old it gets
    // (an age condition would empty the Service on every pod at once). Its age is reported.
    relay.set_forward(false);
    relay.cut_all();
    let metrics = r.metrics_addr();
    for addr in [r.addr, metrics] {
        let v = wait_for("the list ages past 3 discovery intervals", || {
            let res = get(addr, "/readyz");
            assert_eq!(res.status, 200, "ready through the outage: {}", res.text());
            let v = res.json();
            (v["snapshot_age_seconds"].as_u64().unwrap() >= 4).then_some(v)
        });
        assert_eq!(v["projects"], 4, "the last good list is kept: {v}");
        let health = get(addr, "/healthz");
        assert_eq!(health.status, 200, "liveness does not depend on Harbor");
    }
    let age = r.scrape()["harbor_router_project_list_age_seconds"];
    assert!(age >= 4.0, "the age is a metric: {age}");
    r.wait_log(|l| {
        l.contains("keeping the last good project list") && l.contains(r#""kept_projects":4"#)
    });
}
