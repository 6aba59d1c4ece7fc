//! Harbor API and token service of the stand-in, without a registry behind it.

use base64::Engine;
use reqwest::StatusCode;
use serde_json::Value;
use testbed::{basic_auth, HarborConfig, ProjectSpec, RegistrySpec, StandIn};

const ROBOT: (&str, &str) = ("robot$ci", "s3cret");

fn many_projects(n: usize) -> Vec<ProjectSpec> {
    (0..n)
        .map(|i| ProjectSpec {
            name: format!("p{i:03}"),
            public: i % 2 == 0,
            registry: (i % 3 == 0).then(|| RegistrySpec {
                id: i as i64 + 1000,
                name: format!("up{i}"),
                kind: "docker-hub".into(),
                url: "https://hub.docker.com".into(),
            }),
        })
        .collect()
}

fn start(projects: Vec<ProjectSpec>) -> StandIn {
    let config = HarborConfig {
        projects,
        robot: Some((ROBOT.0.into(), ROBOT.1.into())),
        token_ttl: std::time::Duration::from_secs(600),
        ..Default::default()
    };
    StandIn::start(config, None).unwrap()
}

async fn get(url: &str, auth: Option<(&str, &str)>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url);
    if let Some((u, p)) = auth {
        req = req.header("Authorization", basic_auth(u, p));
    }
    req.send().await.unwrap()
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn projects_paginate_with_link_and_total() {
    let harbor = start(many_projects(250));
    let base = harbor.url();
    let mut seen = Vec::new();
    let expected_links = [
        r#"</api/v2.0/projects?page=2&page_size=100>; rel="next""#.to_string(),
        r#"</api/v2.0/projects?page=1&page_size=100>; rel="prev" , </api/v2.0/projects?page=3&page_size=100>; rel="next""#.to_string(),
        r#"</api/v2.0/projects?page=2&page_size=100>; rel="prev""#.to_string(),
    ];
    for page in 1..=3 {
        let url = format!("{base}/api/v2.0/projects?page={page}&page_size=100");
        let resp = get(&url, Some(ROBOT)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-total-count").as_deref(), Some("250"));
        assert_eq!(
            header(&resp, "link"),
            Some(expected_links[page - 1].clone())
        );
        let body: Vec<Value> = resp.json().await.unwrap();
        assert_eq!(body.len(), if page < 3 { 100 } else { 50 });
        seen.extend(body);
    }
    for (i, p) in seen.iter().enumerate() {
        assert_eq!(p["project_id"], Value::from(i as i64 + 1));
        assert_eq!(p["name"], Value::from(format!("p{i:03}")));
        let public = if i % 2 == 0 { "true" } else { "false" };
        assert_eq!(
            p["metadata"]["public"],
            Value::from(public),
            "string, not bool"
        );
        match i % 3 {
            0 => assert_eq!(p["registry_id"], Value::from(i as i64 + 1000)),
            _ => assert!(
                p.get("registry_id").is_none(),
                "non-proxy has no registry_id"
            ),
        }
        assert!(p["owner_id"].is_i64() && p["repo_count"].is_i64() && p["deleted"].is_boolean());
        assert!(p["creation_time"].as_str().unwrap().contains('T'));
    }
    // Defaults: page 1, page_size 10.
    let resp = get(&format!("{base}/api/v2.0/projects"), Some(ROBOT)).await;
    assert_eq!(
        header(&resp, "link").as_deref(),
        Some(r#"</api/v2.0/projects?page=2&page_size=10>; rel="next""#)
    );
    assert_eq!(resp.json::<Vec<Value>>().await.unwrap().len(), 10);
    assert_eq!(harbor.counters().api_requests, 4);
}

#[tokio::test]
async fn anonymous_and_bad_credentials_see_public_projects_only() {
    let harbor = start(many_projects(250));
    let url = format!("{}/api/v2.0/projects?page=2&page_size=100", harbor.url());
    let resp = get(&url, None).await;
    assert_eq!(header(&resp, "x-total-count").as_deref(), Some("125"));
    assert!(header(&resp, "link").unwrap().contains(r#"rel="prev""#));
    assert!(!header(&resp, "link").unwrap().contains(r#"rel="next""#));
    let body: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(body.len(), 25);
    assert!(body.iter().all(|p| p["metadata"]["public"] == "true"));

    // Harbor treats credentials it does not accept as anonymous (security/robot.go, basic_auth.go).
    for wrong in [(ROBOT.0, "wrong"), ("nobody", "x")] {
        let resp = get(&url, Some(wrong)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-total-count").as_deref(), Some("125"));
    }
    // So does it a robot it stopped accepting.
    harbor.set_robot_refused(true);
    let resp = get(&url, Some(ROBOT)).await;
    assert_eq!(header(&resp, "x-total-count").as_deref(), Some("125"));
    harbor.set_robot_refused(false);
    let resp = get(&url, Some(ROBOT)).await;
    assert_eq!(header(&resp, "x-total-count").as_deref(), Some("250"));

    let too_big = format!("{}/api/v2.0/projects?page_size=101", harbor.url());
    assert_eq!(
        get(&too_big, Some(ROBOT)).await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn registries_endpoint() {
    let harbor = start(testbed::default_projects());
    let url = |id: i64| format!("{}/api/v2.0/registries/{id}", harbor.url());
    let resp = get(&url(2), Some(ROBOT)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["id"], 2);
    assert_eq!(r["type"], "github-ghcr");
    assert_eq!(r["url"], "https://ghcr.io");
    assert_eq!(r["credential"]["access_secret"], "*****");
    assert_eq!(
        get(&url(99), Some(ROBOT)).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(&url(2), None).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(&url(2), Some(("x", "y"))).await.status(),
        StatusCode::UNAUTHORIZED
    );
    harbor.set_registries_forbidden(true);
    assert_eq!(
        get(&url(2), Some(ROBOT)).await.status(),
        StatusCode::FORBIDDEN
    );
    harbor.set_registries_forbidden(false);
    assert_eq!(get(&url(2), Some(ROBOT)).await.status(), StatusCode::OK);
    // A robot Harbor stopped accepting is anonymous: 401 here, where a valid robot gets 200 or 403.
    harbor.set_robot_refused(true);
    assert_eq!(
        get(&url(2), Some(ROBOT)).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn systeminfo_names_the_version_to_authenticated_callers() {
    let harbor = start(testbed::default_projects());
    let url = format!("{}/api/v2.0/systeminfo", harbor.url());
    let v: Value = get(&url, Some(ROBOT)).await.json().await.unwrap();
    assert_eq!(v["harbor_version"], testbed::DEFAULT_VERSION);
    assert_eq!(v["auth_mode"], "db_auth");
    for caller in [None, Some((ROBOT.0, "wrong"))] {
        let v: Value = get(&url, caller).await.json().await.unwrap();
        assert!(v.get("harbor_version").is_none(), "{v}");
        assert_eq!(v["auth_mode"], "db_auth");
    }
    harbor.set_robot_refused(true);
    let v: Value = get(&url, Some(ROBOT)).await.json().await.unwrap();
    assert!(v.get("harbor_version").is_none(), "{v}");
    assert_eq!(harbor.counters().systeminfo_requests, 4);
}

#[tokio::test]
async fn pages_shift_between_requests() {
    use testbed::Shift;
    let harbor = start(many_projects(150));
    let page = |n: usize| {
        let url = format!("{}/api/v2.0/projects?page={n}&page_size=100", harbor.url());
        async move {
            let resp = get(&url, Some(ROBOT)).await;
            let total = header(&resp, "x-total-count").unwrap();
            let names: Vec<String> = resp
                .json::<Vec<Value>>()
                .await
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect();
            (total, names)
        }
    };
    // Sorted by name, as Harbor lists them.
    let (_, first) = page(1).await;
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(first, sorted);
    // A project created after the first page: the second page starts with the first page's last.
    harbor.shift_pages(Shift::Create(ProjectSpec {
        name: "a-new".into(),
        public: true,
        registry: None,
    }));
    let (total, first) = page(1).await;
    assert_eq!(total, "150");
    let (total, second) = page(2).await;
    assert_eq!(total, "151");
    assert_eq!(second[0], first[99], "shifted down: one project twice");
    // One deleted after the first page: the second page skips one.
    harbor.shift_pages(Shift::Delete("a-new".into()));
    let (_, first) = page(1).await;
    let (total, second) = page(2).await;
    assert_eq!(total, "150");
    assert_eq!(first[99], "p098");
    assert_eq!(second[0], "p100", "shifted up: p099 is on no page");
}

fn claims(token: &str) -> (Value, Value) {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let decode = |s: &str| serde_json::from_slice::<Value>(&b64.decode(s).unwrap()).unwrap();
    (decode(parts[0]), decode(parts[1]))
}

#[tokio::test]
async fn token_service_grants_by_caller() {
    let mut projects = testbed::default_projects();
    projects[1].public = false; // ghcr private
    projects[2].public = true; // quay public
    let harbor = start(projects);
    let url = format!(
        "{}/service/token?service=harbor-registry&scope=repository%3Aghcr%2Forg%2Fapp%3Apull&scope=repository:quay/a/b:pull,push&account=x",
        harbor.url()
    );
    let resp = get(&url, Some(ROBOT)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["expires_in"], 600);
    assert_eq!(body["token"], body["access_token"]);
    assert!(body["issued_at"].as_str().unwrap().contains('T'));
    let (header, c) = claims(body["token"].as_str().unwrap());
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"].as_str().unwrap().split(':').count(), 12);
    assert_eq!(c["aud"], "harbor-registry");
    assert_eq!(c["sub"], ROBOT.0);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
    assert_eq!(
        c["access"],
        serde_json::json!([
            {"type":"repository","name":"ghcr/org/app","actions":["pull"]},
            {"type":"repository","name":"quay/a/b","actions":["pull"]},
        ])
    );
    // Anonymous: pull on public projects only.
    let (_, c) = claims(
        get(&url, None).await.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(
        c["access"],
        serde_json::json!([{"type":"repository","name":"quay/a/b","actions":["pull"]}])
    );
    // Credentials Harbor does not accept get anonymous rights when scopes are asked…
    let resp = get(&url, Some((ROBOT.0, "bad"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, c) = claims(
        resp.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(c["sub"], "");
    assert_eq!(
        c["access"],
        serde_json::json!([{"type":"repository","name":"quay/a/b","actions":["pull"]}])
    );
    // … and a 401 when none is (src/core/service/token/creator.go).
    let bare = format!("{}/service/token?service=harbor-registry", harbor.url());
    assert_eq!(
        get(&bare, Some((ROBOT.0, "bad"))).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(&bare, None).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get(&bare, Some(ROBOT)).await.status(), StatusCode::OK);
    // A project the robot lost its permission on is not granted.
    harbor.set_robot_denied("ghcr", true);
    let (_, c) = claims(
        get(&url, Some(ROBOT)).await.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(
        c["access"],
        serde_json::json!([{"type":"repository","name":"quay/a/b","actions":["pull"]}])
    );
    assert_eq!(harbor.counters().token_requests, 7);
}
