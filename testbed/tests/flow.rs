//! The stand-in in front of the real registry: token flow, Harbor's /v2 quirks, faults, connection
//! dropping, no h2c, and seeding with media types preserved.

mod common;

use common::{bed_with, client, image};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use testbed::images::{DOCKER_MANIFEST, OCI_INDEX};
use testbed::{
    basic_auth, Fault, HarborConfig, SeedKind, Testbed, DEFAULT_ROBOT_PASSWORD, DEFAULT_ROBOT_USER,
};

const ROBOT: (&str, &str) = (DEFAULT_ROBOT_USER, DEFAULT_ROBOT_PASSWORD);
const ACCEPT_ALL: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

async fn robot_token(bed: &Testbed, repos: &[&str]) -> String {
    let mut url = format!("{}/service/token?service=harbor-registry", bed.harbor.url());
    for r in repos {
        url.push_str(&format!("&scope=repository:{r}:pull"));
    }
    let resp = client()
        .get(url)
        .header("Authorization", basic_auth(ROBOT.0, ROBOT.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn v2(bed: &Testbed, method: reqwest::Method, path: &str, token: &str) -> reqwest::Response {
    let mut req = client()
        .request(method, format!("{}{path}", bed.harbor.url()))
        .header("Authorization", format!("Bearer {token}"));
    for a in ACCEPT_ALL {
        req = req.header("Accept", a);
    }
    req.send().await.unwrap()
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn token_flow_against_the_real_registry() {
    let (bed, seeded) = bed_with(&[
        image("ghcr/org/app", "v1", SeedKind::OciManifest),
        image("quay/coreos/etcd", "v3.5.0", SeedKind::DockerSchema2),
    ]);
    let url = format!("{}/v2/ghcr/org/app/manifests/v1", bed.harbor.url());
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = header(&resp, "www-authenticate");
    assert!(
        challenge.starts_with(&format!(
            "Bearer realm=\"{}/service/token\",service=\"harbor-registry\"",
            bed.harbor.url()
        )),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"repository:ghcr/org/app:pull\""));

    let before = bed.harbor.counters().token_requests;
    let token = robot_token(&bed, &["ghcr/org/app", "quay/coreos/etcd"]).await;
    assert_eq!(bed.harbor.counters().token_requests, before + 1);
    for s in &seeded {
        let path = format!("/v2/{}/manifests/{}", s.repository, s.tag);
        let resp = v2(&bed, reqwest::Method::GET, &path, &token).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&resp, "content-type"), s.media_type);
        // Fetched upstream by tag: Harbor sends the digest of the request, empty for a tag.
        assert_eq!(header(&resp, "docker-content-digest"), "", "{path}");
        assert_eq!(header(&resp, "etag"), "", "{path}");
        let body = resp.bytes().await.unwrap();
        let digest = format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(&body));
        assert_eq!(digest, s.digest, "{path}");
        // A HEAD carries the real digest, and so does the next GET (Harbor holds the tag now).
        let resp = v2(&bed, reqwest::Method::HEAD, &path, &token).await;
        assert_eq!(header(&resp, "docker-content-digest"), s.digest);
        let resp = v2(&bed, reqwest::Method::GET, &path, &token).await;
        assert_eq!(header(&resp, "docker-content-digest"), s.digest);
    }
    // A token for another project is refused, with Harbor's Basic challenge (it carried one).
    let other = robot_token(&bed, &["quay/coreos/etcd"]).await;
    let resp = v2(
        &bed,
        reqwest::Method::GET,
        "/v2/ghcr/org/app/manifests/v1",
        &other,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&resp, "www-authenticate"), r#"Basic realm="harbor""#);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("unauthorized to access repository: ghcr/org/app, action: pull"));
    // Requests answered 401 are challenges, not answers: only the authorized ones count.
    let c = bed.harbor.counters();
    assert_eq!(c.manifest_requests["ghcr"], 3);
    assert_eq!(c.v2_requests["quay"], 3);
    assert_eq!(c.refused, 1);
}

#[tokio::test]
async fn separate_accept_lines_are_all_forwarded() {
    let (bed, seeded) = bed_with(&[image(
        "dockerhub/library/nginx",
        "latest",
        SeedKind::OciIndex,
    )]);
    let token = robot_token(&bed, &["dockerhub/library/nginx"]).await;
    let resp = client()
        .get(format!(
            "{}/v2/dockerhub/library/nginx/manifests/latest",
            bed.harbor.url()
        ))
        .header("Authorization", format!("Bearer {token}"))
        .header("Accept", DOCKER_MANIFEST)
        .header("Accept", OCI_INDEX)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the second Accept line was lost"
    );
    let body = resp.bytes().await.unwrap();
    let digest = format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(&body));
    assert_eq!(digest, seeded[0].digest);
}

#[tokio::test]
async fn harbor_quirks() {
    let (bed, seeded) = bed_with(&[image(
        "dockerhub/library/nginx",
        "latest",
        SeedKind::DockerSchema2,
    )]);
    let token = robot_token(
        &bed,
        &[
            "dockerhub/library/nginx",
            "ghcr/nope",
            "dockerhub/library/nope",
        ],
    )
    .await;
    let get = reqwest::Method::GET;
    // docker-hub: single-segment names are redirected to library/.
    for suffix in ["manifests/latest", "blobs/sha256:00", "tags/list"] {
        let resp = v2(
            &bed,
            get.clone(),
            &format!("/v2/dockerhub/nginx/{suffix}"),
            &token,
        )
        .await;
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            header(&resp, "location"),
            format!("/v2/dockerhub/library/nginx/{suffix}")
        );
    }
    // tags/list of an unknown repository in a proxy project: 200 with an empty list.
    let resp = v2(&bed, get.clone(), "/v2/ghcr/nope/tags/list", &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"name": "ghcr/nope", "tags": []}));
    // A known repository lists its tags.
    let resp = v2(
        &bed,
        get.clone(),
        "/v2/dockerhub/library/nginx/tags/list",
        &token,
    )
    .await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        serde_json::json!(["latest"])
    );
    // Missing manifest: Harbor's 404 from UseLocalManifest (the upstream does not have it).
    let resp = v2(
        &bed,
        get.clone(),
        "/v2/dockerhub/library/nginx/manifests/nope",
        &token,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        serde_json::json!({"errors": [{"code": "NOT_FOUND",
            "message": "repo dockerhub/library/nginx, tag nope not found"}]})
    );
    // Blob HEAD: 404 until fetched once with GET (streamed from the upstream: a range is not
    // passed on), then the registry's answer.
    let blob = &seeded[0].blobs[1];
    let path = format!("/v2/dockerhub/library/nginx/blobs/{blob}");
    let head = v2(&bed, reqwest::Method::HEAD, &path, &token).await;
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    let resp = client()
        .get(format!("{}{path}", bed.harbor.url()))
        .bearer_auth(&token)
        .header("Range", "bytes=0-0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // As ≤ v2.15 streams it (the default): chunked, no length or digest (tests/outage.rs has
    // the framed way of main).
    assert_eq!(header(&resp, "docker-content-digest"), "");
    assert_eq!(header(&resp, "content-length"), "");
    let len = resp.bytes().await.unwrap().len();
    let resp = v2(&bed, get.clone(), &path, &token).await;
    assert_eq!(header(&resp, "docker-content-digest"), *blob);
    assert_eq!(header(&resp, "content-length"), len.to_string());
    assert_eq!(resp.bytes().await.unwrap().len(), len);
    let head = v2(&bed, reqwest::Method::HEAD, &path, &token).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(header(&head, "content-length"), len.to_string());
}

#[tokio::test]
async fn faults() {
    let (bed, seeded) = bed_with(&[image("quay/coreos/etcd", "v3.5.0", SeedKind::DockerSchema2)]);
    let token = robot_token(&bed, &["quay/coreos/etcd"]).await;
    let path = "/v2/quay/coreos/etcd/manifests/v3.5.0";
    let get = reqwest::Method::GET;

    // In Harbor's words (src/lib/http/error.go).
    bed.harbor.set_fault("quay", Fault::Status(500));
    let resp = v2(&bed, get.clone(), path, &token).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        serde_json::json!({"errors": [{"code": "UNKNOWN", "message": "internal server error"}]})
    );

    // A rate limit has no Retry-After.
    bed.harbor.set_fault("quay", Fault::Status(429));
    let resp = v2(&bed, get.clone(), path, &token).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().get("retry-after").is_none());
    assert!(resp.text().await.unwrap().contains("\"TOO_MANY_REQUEST\""));

    // A vulnerability policy refuses manifest GETs; HEADs pass.
    bed.harbor.set_fault("quay", Fault::Policy);
    let resp = v2(&bed, get.clone(), path, &token).await;
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("\"PROJECTPOLICYVIOLATION\""));
    let resp = v2(&bed, reqwest::Method::HEAD, path, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Other projects are unaffected (this token does not name ghcr: refused).
    let resp = v2(&bed, get.clone(), "/v2/ghcr/x/manifests/y", &token).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // A held answer comes only once released; the hold does not touch 401 challenges.
    let held = bed.harbor.hold("quay");
    let challenged = client()
        .get(format!("{}{path}", bed.harbor.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(challenged.status(), StatusCode::UNAUTHORIZED);
    let answered = |bed: &Testbed| *bed.harbor.counters().answered.get("quay").unwrap_or(&0);
    let asked = |bed: &Testbed| bed.harbor.counters().manifest_requests["quay"];
    let (before, asked_before) = (answered(&bed), asked(&bed));
    let pending = tokio::spawn({
        let mut req = client()
            .get(format!("{}{path}", bed.harbor.url()))
            .bearer_auth(&token);
        for a in ACCEPT_ALL {
            req = req.header("Accept", a);
        }
        req.send()
    });
    let end = Instant::now() + Duration::from_secs(20);
    while asked(&bed) == asked_before {
        assert!(Instant::now() < end, "the held request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!pending.is_finished(), "a held answer is not sent");
    assert_eq!(answered(&bed), before, "nor counted");
    held.release();
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(answered(&bed), before + 1);

    bed.harbor.set_fault("quay", Fault::Hang);
    let t = Instant::now();
    let err = client()
        .get(format!("{}{path}", bed.harbor.url()))
        .bearer_auth(&token)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));

    bed.harbor.set_fault("quay", Fault::ResetMidBody);
    let blob = &seeded[0].blobs[1];
    let resp = v2(
        &bed,
        get.clone(),
        &format!("/v2/quay/coreos/etcd/blobs/{blob}"),
        &token,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.is_err(), "the body must be cut off");

    bed.harbor.clear_faults();
    let resp = v2(&bed, get.clone(), path, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "docker-content-digest"), seeded[0].digest);
}

#[test]
fn drop_connections_closes_keep_alive_connections() {
    use std::io::{Read, Write};
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let accepted = bed.harbor.counters().connections_accepted;
    let mut s = std::net::TcpStream::connect(bed.harbor.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = "GET /api/v2.0/projects HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 8192];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Still open: a second request on the same connection works.
    s.write_all(req.as_bytes()).unwrap();
    assert!(s.read(&mut buf).unwrap() > 0);
    assert_eq!(bed.harbor.counters().connections_accepted, accepted + 1);
    bed.harbor.drop_connections();
    let n = s.read(&mut buf).expect("EOF, not a timeout");
    assert_eq!(n, 0, "the connection must be closed");
}

#[tokio::test]
async fn no_h2c() {
    // Harbor's nginx and core speak HTTP/1.1 on plain TCP: HTTP/2's preface gets no HTTP/2 answer.
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let stream = tokio::net::TcpStream::connect(bed.harbor.addr())
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("{}/v2/", bed.harbor.url()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("refused at once");
    assert!(sent.is_err(), "an HTTP/2 answer: {sent:?}");
}

#[test]
fn seeding_preserves_media_types_and_digests() {
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let images = testbed::default_images();
    let seeded = bed.seed(&images).unwrap();
    for (img, s) in images.iter().zip(&seeded) {
        assert_eq!(s.media_type, img.kind.media_type(), "{}", s.repository);
        let platforms = match img.kind {
            SeedKind::OciIndex | SeedKind::DockerManifestList => 2,
            _ => 1,
        };
        assert_eq!(s.blobs.len(), 2 * platforms);
        let out = std::process::Command::new("skopeo")
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                "--creds",
                "admin:Harbor12345",
            ])
            .arg(format!(
                "docker://{}/{}:{}",
                bed.registry.addr(),
                s.repository,
                s.tag
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = format!(
            "sha256:{:x}",
            <sha2::Sha256 as sha2::Digest>::digest(&out.stdout)
        );
        assert_eq!(digest, s.digest, "{}", s.repository);
        let raw: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(raw["mediaType"], s.media_type.as_str());
    }
}
