//! The stand-in's `/v2/` authentication, as Harbor's core answers it: tokens it stops accepting
//! (a rotated signing key, revoked tokens) make a request anonymous, a refused request that carried
//! `Authorization` is told `Basic realm="harbor"`, a robot Harbor stops accepting is anonymous.

use reqwest::{Method, StatusCode};
use serde_json::Value;
use testbed::{basic_auth, HarborConfig, SeedImage, SeedKind, Testbed};

const ROBOT: (&str, &str) = (testbed::DEFAULT_ROBOT_USER, testbed::DEFAULT_ROBOT_PASSWORD);
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

fn bed() -> Testbed {
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    // ghcr is private, k8s public (testbed::default_projects).
    let images = [("ghcr/org/app", "v1"), ("k8s/pause", "3.9")].map(|(r, t)| SeedImage {
        repository: r.into(),
        tag: t.into(),
        kind: SeedKind::OciManifest,
        layer_bytes: 1000,
    });
    bed.seed(&images).unwrap();
    bed
}

async fn token(bed: &Testbed, creds: Option<(&str, &str)>, repos: &[&str]) -> String {
    let mut url = format!("{}/service/token?service=harbor-registry", bed.harbor.url());
    for r in repos {
        url.push_str(&format!("&scope=repository:{r}:pull"));
    }
    let mut req = reqwest::Client::new().get(url);
    if let Some((u, p)) = creds {
        req = req.header("Authorization", basic_auth(u, p));
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `HEAD path` with `authorization` (none when empty): status and `WWW-Authenticate`.
async fn head(bed: &Testbed, path: &str, authorization: &str) -> (StatusCode, String) {
    let mut req = reqwest::Client::new()
        .request(Method::HEAD, format!("{}{path}", bed.harbor.url()))
        .header("Accept", ACCEPT);
    if !authorization.is_empty() {
        req = req.header("Authorization", authorization);
    }
    let resp = req.send().await.unwrap();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (resp.status(), challenge)
}

const PRIVATE: &str = "/v2/ghcr/org/app/manifests/v1";
const PUBLIC: &str = "/v2/k8s/pause/manifests/3.9";

#[tokio::test]
async fn a_rotated_key_or_revoked_tokens_make_a_request_anonymous() {
    let bed = bed();
    for change in ["rotate", "revoke"] {
        let t = format!(
            "Bearer {}",
            token(&bed, Some(ROBOT), &["ghcr/org/app", "k8s/pause"]).await
        );
        assert_eq!(head(&bed, PRIVATE, &t).await.0, StatusCode::OK);
        match change {
            "rotate" => bed.harbor.rotate_signing_key(),
            _ => bed.harbor.revoke_tokens(),
        }
        // The old token is anonymous now: refused on a private project, with Harbor's Basic
        // challenge (the request carried Authorization), and still good enough for a public one.
        let (status, challenge) = head(&bed, PRIVATE, &t).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{change}");
        assert_eq!(challenge, r#"Basic realm="harbor""#, "{change}");
        assert_eq!(head(&bed, PUBLIC, &t).await.0, StatusCode::OK, "{change}");
        // A new token works.
        let fresh = format!(
            "Bearer {}",
            token(&bed, Some(ROBOT), &["ghcr/org/app"]).await
        );
        assert_eq!(
            head(&bed, PRIVATE, &fresh).await.0,
            StatusCode::OK,
            "{change}"
        );
    }
    assert_eq!(bed.harbor.counters().refused, 2);
}

#[tokio::test]
async fn challenges_as_harbor_words_them() {
    let bed = bed();
    // No Authorization: the Bearer challenge, even for a public project (#11271).
    for path in [PRIVATE, PUBLIC] {
        let (status, challenge) = head(&bed, path, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(challenge.starts_with(&format!(
            r#"Bearer realm="{}/service/token",service="harbor-registry""#,
            bed.harbor.url()
        )));
    }
    // A valid token without the project: refused, whether the project is public or not.
    let other = format!(
        "Bearer {}",
        token(&bed, Some(ROBOT), &["dockerhub/x"]).await
    );
    for path in [PRIVATE, PUBLIC] {
        let (status, challenge) = head(&bed, path, &other).await;
        assert_eq!(
            (status, challenge.as_str()),
            (StatusCode::UNAUTHORIZED, r#"Basic realm="harbor""#),
            "{path}"
        );
    }
    // A garbage token is anonymous: the public project only.
    assert_eq!(head(&bed, PUBLIC, "Bearer x.y.z").await.0, StatusCode::OK);
    assert_eq!(
        head(&bed, PRIVATE, "Bearer x.y.z").await.0,
        StatusCode::UNAUTHORIZED
    );
    // The robot's Basic credentials are accepted on /v2/ too.
    let basic = basic_auth(ROBOT.0, ROBOT.1);
    assert_eq!(head(&bed, PRIVATE, &basic).await.0, StatusCode::OK);
    // /v2/ itself needs an authenticated caller; an anonymous token is not one.
    let anon = format!("Bearer {}", token(&bed, None, &["k8s/pause"]).await);
    assert_eq!(head(&bed, "/v2/", &anon).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(head(&bed, "/v2/", &other).await.0, StatusCode::OK);
    let (status, challenge) = head(&bed, "/v2/", "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!challenge.contains("scope="), "{challenge}");
}

#[tokio::test]
async fn a_robot_harbor_stops_accepting_is_anonymous() {
    let bed = bed();
    bed.harbor.set_robot_refused(true);
    // Its token has anonymous rights: the public project only.
    let t = format!(
        "Bearer {}",
        token(&bed, Some(ROBOT), &["ghcr/org/app", "k8s/pause"]).await
    );
    assert_eq!(head(&bed, PUBLIC, &t).await.0, StatusCode::OK);
    assert_eq!(head(&bed, PRIVATE, &t).await.0, StatusCode::UNAUTHORIZED);
    bed.harbor.set_robot_refused(false);
    assert_eq!(
        head(&bed, PRIVATE, &t).await.0,
        StatusCode::UNAUTHORIZED,
        "the token keeps what it named"
    );
    let t = format!(
        "Bearer {}",
        token(&bed, Some(ROBOT), &["ghcr/org/app"]).await
    );
    assert_eq!(head(&bed, PRIVATE, &t).await.0, StatusCode::OK);
    // A permission taken away: new tokens lack the project, old ones keep it.
    bed.harbor.set_robot_denied("ghcr", true);
    assert_eq!(head(&bed, PRIVATE, &t).await.0, StatusCode::OK);
    let denied = format!(
        "Bearer {}",
        token(&bed, Some(ROBOT), &["ghcr/org/app"]).await
    );
    assert_eq!(
        head(&bed, PRIVATE, &denied).await.0,
        StatusCode::UNAUTHORIZED
    );
}
