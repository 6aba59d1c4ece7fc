//! Harbor's answers when things fail, against the real registry: an upstream refused or hanging
//! (the local store answers, with Harbor's 404s), the upstream's not-found, the trimmed multi-arch
//! index, Harbor's database down, blobs Harbor has not cached (chunked or framed, and their
//! breaks), and tag lists merged with the upstream's and paged.

mod common;

use common::{bed_with, client, image};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use testbed::images::{DOCKER_LIST, OCI_INDEX};
use testbed::{
    basic_auth, Fault, SeedKind, Testbed, UncachedBlobs, Upstream, ADMIN_PASSWORD, ADMIN_USER,
    DEFAULT_ROBOT_PASSWORD, DEFAULT_ROBOT_USER,
};

const ACCEPT_ALL: [&str; 4] = testbed::images::ALL_MANIFEST_TYPES;
const INTERNAL_ERROR: &str = r#"{"errors":[{"code":"UNKNOWN","message":"internal server error"}]}"#;

/// A robot token naming every default project.
async fn robot_token(bed: &Testbed) -> String {
    let mut url = format!("{}/service/token?service=harbor-registry", bed.harbor.url());
    for p in [
        "dockerhub/x",
        "ghcr/x",
        "quay/x",
        "k8s/x",
        "library-local/x",
    ] {
        url.push_str(&format!("&scope=repository:{p}:pull"));
    }
    let resp = client()
        .get(url)
        .header(
            "Authorization",
            basic_auth(DEFAULT_ROBOT_USER, DEFAULT_ROBOT_PASSWORD),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn request(bed: &Testbed, method: Method, path: &str, token: &str) -> reqwest::RequestBuilder {
    let mut req = client()
        .request(method, format!("{}{path}", bed.harbor.url()))
        .bearer_auth(token);
    for a in ACCEPT_ALL {
        req = req.header("Accept", a);
    }
    req
}

async fn v2(bed: &Testbed, method: Method, path: &str, token: &str) -> reqwest::Response {
    request(bed, method, path, token).send().await.unwrap()
}

/// The request gets no answer within a short deadline (Harbor waits on a hanging upstream).
async fn hangs(bed: &Testbed, method: Method, path: &str, token: &str) {
    let err = request(bed, method, path, token)
        .timeout(Duration::from_millis(400))
        .send()
        .await
        .expect_err(&format!("{path} answered"));
    assert!(err.is_timeout(), "{path}: {err}");
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(data))
}

/// The answer is Harbor's `404 NOT_FOUND` with `message`.
async fn assert_not_found(resp: reqwest::Response, message: &str) {
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{message}");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"errors": [{"code": "NOT_FOUND", "message": message}]})
    );
}

/// A blob as the registry holds it (read directly, so Harbor's cache is untouched).
async fn registry_blob(bed: &Testbed, repository: &str, digest: &str) -> bytes::Bytes {
    let scope = format!("repository:{repository}:pull");
    let token = bed
        .token(Some((ADMIN_USER, ADMIN_PASSWORD)), &[&scope])
        .unwrap();
    let resp = client()
        .get(format!(
            "{}/v2/{repository}/blobs/{digest}",
            bed.registry.url()
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.bytes().await.unwrap()
}

fn key(p: &str, r: &str, reference: &str) -> (String, String, String) {
    (p.into(), r.into(), reference.into())
}

#[tokio::test]
async fn a_refused_upstream_leaves_the_local_store() {
    let (bed, seeded) = bed_with(&[
        image("ghcr/org/app", "v1", SeedKind::OciManifest),
        image("ghcr/org/app", "v2", SeedKind::OciManifest),
    ]);
    let token = robot_token(&bed).await;
    let (v1, v2_digest) = (&seeded[0], &seeded[1].digest);
    let tag_path = "/v2/ghcr/org/app/manifests/v1";
    let (config, layer) = (&v1.blobs[0], &v1.blobs[1]);
    // Through an upstream that answers: Harbor keeps the tag, its manifest and the blob fetched.
    assert_eq!(
        v2(&bed, Method::GET, tag_path, &token).await.status(),
        StatusCode::OK
    );
    let blob_path = |d: &str| format!("/v2/ghcr/org/app/blobs/{d}");
    let resp = v2(&bed, Method::GET, &blob_path(config), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.bytes().await.unwrap();
    let cached = bed.harbor.cached();
    assert_eq!(
        cached.tags.get(&key("ghcr", "org/app", "v1")),
        Some(&v1.digest)
    );
    assert!(cached
        .manifests
        .contains(&key("ghcr", "org/app", &v1.digest)));
    assert!(cached.blobs.contains(&("ghcr".into(), config.clone())));
    assert!(!cached.blobs.contains(&("ghcr".into(), layer.clone())));

    bed.harbor.set_upstream("ghcr", Upstream::Refused);
    // A cached tag: the local registry's answer, with the real digest (never the empty one).
    let resp = v2(&bed, Method::GET, tag_path, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "docker-content-digest"),
        Some(v1.digest.clone())
    );
    assert_eq!(sha256(&resp.bytes().await.unwrap()), v1.digest);
    let resp = v2(&bed, Method::HEAD, tag_path, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "docker-content-digest"),
        Some(v1.digest.clone())
    );
    let by_digest = format!("/v2/ghcr/org/app/manifests/{}", v1.digest);
    assert_eq!(
        v2(&bed, Method::GET, &by_digest, &token).await.status(),
        StatusCode::OK
    );
    // What Harbor never fetched, though the upstream (the registry) has it.
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/app/manifests/v2", &token).await;
    assert_not_found(resp, "artifact ghcr/org/app:v2 not found").await;
    let resp = v2(&bed, Method::HEAD, "/v2/ghcr/org/app/manifests/v2", &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.bytes().await.unwrap().is_empty());
    let path = format!("/v2/ghcr/org/app/manifests/{v2_digest}");
    let resp = v2(&bed, Method::GET, &path, &token).await;
    assert_not_found(
        resp,
        &format!("artifact ghcr/org/app@{v2_digest} not found"),
    )
    .await;
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/other/manifests/v1", &token).await;
    assert_not_found(resp, "repository ghcr/org/other not found").await;
    // Harbor looks an artifact up by repository and digest at once: no "repository" message.
    let path = format!("/v2/ghcr/org/other/manifests/{v2_digest}");
    let resp = v2(&bed, Method::GET, &path, &token).await;
    assert_not_found(
        resp,
        &format!("artifact ghcr/org/other@{v2_digest} not found"),
    )
    .await;
    // Blobs: the cached one is the registry's answer, the other is unknown.
    let resp = v2(&bed, Method::GET, &blob_path(config), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "docker-content-digest"), Some(config.clone()));
    let resp = v2(&bed, Method::GET, &blob_path(layer), &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");
    assert_eq!(body["errors"][0]["message"], "blob unknown to registry");
    let resp = v2(&bed, Method::HEAD, &blob_path(layer), &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // Tag lists hold the local tags only; an unknown repository has none.
    let before = bed.harbor.counters().tag_list_requests.get("ghcr").copied();
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/app/tags/list", &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"name": "ghcr/org/app", "tags": ["v1"]})
    );
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/other/tags/list", &token).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"name": "ghcr/org/other", "tags": []})
    );
    let counted = bed.harbor.counters().tag_list_requests["ghcr"];
    assert_eq!(counted, before.unwrap_or(0) + 2);

    // Once the upstream answers again, so does everything it has, with Harbor's merged list.
    bed.harbor.set_upstream("ghcr", Upstream::Up);
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/app/manifests/v2", &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/app/tags/list", &token).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["v1", "v2"])
    );

    // A store emptied (garbage collection) holds nothing: the refused upstream leaves 404s.
    bed.harbor.clear_cache();
    assert_eq!(bed.harbor.cached(), testbed::Cached::default());
    bed.harbor.set_upstream("ghcr", Upstream::Refused);
    let resp = v2(&bed, Method::GET, tag_path, &token).await;
    assert_not_found(resp, "repository ghcr/org/app not found").await;
}

#[tokio::test]
async fn a_hanging_upstream_never_answers_what_needs_it() {
    let (bed, seeded) = bed_with(&[image("quay/coreos/etcd", "v3.5.0", SeedKind::DockerSchema2)]);
    let token = robot_token(&bed).await;
    let s = &seeded[0];
    let tag_path = "/v2/quay/coreos/etcd/manifests/v3.5.0";
    let by_digest = format!("/v2/quay/coreos/etcd/manifests/{}", s.digest);
    let blob_path = |d: &str| format!("/v2/quay/coreos/etcd/blobs/{d}");
    assert_eq!(
        v2(&bed, Method::GET, tag_path, &token).await.status(),
        StatusCode::OK
    );
    let resp = v2(&bed, Method::GET, &blob_path(&s.blobs[0]), &token).await;
    resp.bytes().await.unwrap();

    bed.harbor.set_upstream("quay", Upstream::Hanging);
    // A tag is always checked upstream first; so are an uncached digest and blob, and tag lists.
    hangs(&bed, Method::GET, tag_path, &token).await;
    hangs(&bed, Method::HEAD, tag_path, &token).await;
    let unknown = format!("/v2/quay/coreos/etcd/manifests/sha256:{}", "0".repeat(64));
    hangs(&bed, Method::GET, &unknown, &token).await;
    hangs(&bed, Method::GET, &blob_path(&s.blobs[1]), &token).await;
    hangs(&bed, Method::GET, "/v2/quay/coreos/etcd/tags/list", &token).await;
    // What Harbor holds by digest, it serves without the upstream.
    let resp = v2(&bed, Method::GET, &by_digest, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(sha256(&resp.bytes().await.unwrap()), s.digest);
    let resp = v2(&bed, Method::GET, &blob_path(&s.blobs[0]), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // A blob HEAD and `n=0` need no upstream either.
    let resp = v2(&bed, Method::HEAD, &blob_path(&s.blobs[1]), &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = v2(
        &bed,
        Method::GET,
        "/v2/quay/coreos/etcd/tags/list?n=0",
        &token,
    )
    .await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"name": "quay/coreos/etcd", "tags": []})
    );
    // Other projects are not affected.
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/nope/manifests/v1", &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_upstream_that_lacks_a_manifest() {
    let (bed, seeded) = bed_with(&[
        image("quay/coreos/etcd", "v3.5.0", SeedKind::DockerSchema2),
        image("dockerhub/library/nginx", "latest", SeedKind::DockerSchema2),
        image("dockerhub/library/index", "1", SeedKind::OciIndex),
    ]);
    let token = robot_token(&bed).await;
    let resp = v2(
        &bed,
        Method::GET,
        "/v2/quay/coreos/etcd/manifests/nope",
        &token,
    )
    .await;
    assert_not_found(resp, "repo quay/coreos/etcd, tag nope not found").await;
    let resp = v2(
        &bed,
        Method::HEAD,
        "/v2/quay/coreos/etcd/manifests/nope",
        &token,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // For a digest, the tag part is empty.
    let digest = format!("sha256:{}", "1".repeat(64));
    let path = format!("/v2/quay/coreos/etcd/manifests/{digest}");
    let resp = v2(&bed, Method::GET, &path, &token).await;
    assert_not_found(resp, "repo quay/coreos/etcd, tag  not found").await;
    let resp = v2(
        &bed,
        Method::GET,
        "/v2/quay/coreos/none/manifests/x",
        &token,
    )
    .await;
    assert_not_found(resp, "repo quay/coreos/none, tag x not found").await;
    // A manifest the upstream has but the client does not accept is no "not found": the
    // registry's own words.
    let resp = client()
        .get(format!(
            "{}/v2/dockerhub/library/index/manifests/1",
            bed.harbor.url()
        ))
        .bearer_auth(&token)
        .header("Accept", testbed::images::DOCKER_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("OCI index found"), "{message}");
    // By default Docker Hub answers as it really does, with a 401 for a repository it does not
    // know: Harbor takes it for a failure and its local store answers ...
    let none = "/v2/dockerhub/library/none/manifests/x";
    let resp = v2(&bed, Method::GET, none, &token).await;
    assert_not_found(resp, "repository dockerhub/library/none not found").await;
    let resp = v2(&bed, Method::HEAD, none, &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // ... and switched off, it says "not found" as every upstream does.
    bed.harbor.set_docker_hub_401s(false);
    let resp = v2(&bed, Method::GET, none, &token).await;
    assert_not_found(resp, "repo dockerhub/library/none, tag x not found").await;
    bed.harbor.set_docker_hub_401s(true);
    // Other upstreams say "not found".
    let resp = v2(
        &bed,
        Method::GET,
        "/v2/quay/coreos/none/manifests/x",
        &token,
    )
    .await;
    assert_not_found(resp, "repo quay/coreos/none, tag x not found").await;
    let resp = v2(
        &bed,
        Method::GET,
        "/v2/dockerhub/library/nginx/manifests/nope",
        &token,
    )
    .await;
    assert_not_found(resp, "repo dockerhub/library/nginx, tag nope not found").await;
    // What the upstream has is still served (first fetch: Harbor's empty digest).
    let resp = v2(
        &bed,
        Method::GET,
        "/v2/dockerhub/library/nginx/manifests/latest",
        &token,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "docker-content-digest"), Some(String::new()));
    assert_eq!(sha256(&resp.bytes().await.unwrap()), seeded[1].digest);
}

/// The children of an index, as the registry lists them.
fn children(index: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(index).unwrap();
    v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn an_index_served_locally_holds_the_children_fetched() {
    let (bed, seeded) = bed_with(&[
        image("dockerhub/library/nginx", "latest", SeedKind::OciIndex),
        image(
            "dockerhub/library/alpine",
            "3.19",
            SeedKind::DockerManifestList,
        ),
    ]);
    let token = robot_token(&bed).await;
    let (nginx, alpine) = (&seeded[0], &seeded[1]);
    let tag_path = "/v2/dockerhub/library/nginx/manifests/latest";
    let resp = v2(&bed, Method::GET, tag_path, &token).await;
    let original = resp.bytes().await.unwrap();
    assert_eq!(sha256(&original), nginx.digest);
    let kids = children(&original);
    assert_eq!(kids.len(), 2);
    let child_path = |d: &str| format!("/v2/dockerhub/library/nginx/manifests/{d}");
    let resp = v2(&bed, Method::GET, &child_path(&kids[1]), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // The index is held under its tag only, not by its own digest.
    let cached = bed.harbor.cached();
    let repo = "library/nginx";
    assert!(!cached
        .manifests
        .contains(&key("dockerhub", repo, &nginx.digest)));
    assert!(cached.manifests.contains(&key("dockerhub", repo, &kids[1])));

    bed.harbor.set_upstream("dockerhub", Upstream::Refused);
    let resp = v2(&bed, Method::GET, tag_path, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_INDEX));
    let digest = header(&resp, "docker-content-digest").unwrap();
    let length = header(&resp, "content-length").unwrap();
    let etag = header(&resp, "etag").unwrap();
    let trimmed = resp.bytes().await.unwrap();
    assert_ne!(trimmed, original);
    assert_eq!(digest, sha256(&trimmed));
    assert_ne!(digest, nginx.digest);
    assert_eq!(etag.trim_matches('"'), digest);
    assert_eq!(length, trimmed.len().to_string());
    assert_eq!(children(&trimmed), vec![kids[1].clone()]);
    let v: Value = serde_json::from_slice(&trimmed).unwrap();
    assert_eq!(v["mediaType"], OCI_INDEX);
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["manifests"][0]["platform"]["architecture"], "arm64");
    // A HEAD tells the same digest and length.
    let resp = v2(&bed, Method::HEAD, tag_path, &token).await;
    assert_eq!(header(&resp, "docker-content-digest"), Some(digest.clone()));
    assert_eq!(header(&resp, "content-length"), Some(length));
    // Harbor's registry is asked by digest with the client's Accept lines: an OCI index to a
    // client that does not accept one is the registry's 404.
    for path in [tag_path.to_string(), child_path(&digest)] {
        let resp = client()
            .get(format!("{}{path}", bed.harbor.url()))
            .bearer_auth(&token)
            .header("Accept", testbed::images::DOCKER_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("OCI index found"), "{message}");
    }
    // The trimmed index is held by its digest, the original is not.
    let resp = v2(&bed, Method::GET, &child_path(&digest), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap(), trimmed);
    let resp = v2(&bed, Method::GET, &child_path(&nginx.digest), &token).await;
    let message = format!(
        "artifact dockerhub/library/nginx@{} not found",
        nginx.digest
    );
    assert_not_found(resp, &message).await;
    // The child not fetched is not held either.
    let resp = v2(&bed, Method::GET, &child_path(&kids[0]), &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // A list none of whose children reached the store is served as it came.
    bed.harbor.set_upstream("dockerhub", Upstream::Up);
    let alpine_tag = "/v2/dockerhub/library/alpine/manifests/3.19";
    let resp = v2(&bed, Method::GET, alpine_tag, &token).await;
    let alpine_original = resp.bytes().await.unwrap();
    bed.harbor.set_upstream("dockerhub", Upstream::Refused);
    let resp = v2(&bed, Method::GET, alpine_tag, &token).await;
    assert_eq!(
        header(&resp, "docker-content-digest"),
        Some(alpine.digest.clone())
    );
    assert_eq!(resp.bytes().await.unwrap(), alpine_original);
    // With one, it is trimmed, and stays a Docker manifest list.
    bed.harbor.set_upstream("dockerhub", Upstream::Up);
    let alpine_kids = children(&alpine_original);
    let path = format!("/v2/dockerhub/library/alpine/manifests/{}", alpine_kids[0]);
    assert_eq!(
        v2(&bed, Method::GET, &path, &token).await.status(),
        StatusCode::OK
    );
    bed.harbor.set_upstream("dockerhub", Upstream::Refused);
    // A Docker list is served as it is, whatever the client accepts (the registry is asked by
    // digest: no platform is picked).
    let resp = client()
        .get(format!("{}{alpine_tag}", bed.harbor.url()))
        .bearer_auth(&token)
        .header("Accept", testbed::images::DOCKER_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "content-type").as_deref(), Some(DOCKER_LIST));
    let body = resp.bytes().await.unwrap();
    assert_eq!(children(&body), vec![alpine_kids[0].clone()]);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["mediaType"], DOCKER_LIST);
}

#[tokio::test]
async fn a_database_down_fails_every_project_request() {
    let (bed, _) = bed_with(&[image("ghcr/org/app", "v1", SeedKind::OciManifest)]);
    let token = robot_token(&bed).await;
    bed.harbor.set_database_down(true);
    for path in [
        "/v2/ghcr/org/app/manifests/v1",
        "/v2/ghcr/org/app/tags/list",
        "/v2/ghcr/org/app/blobs/sha256:00",
        // Before Docker Hub's redirect: the project is read first.
        "/v2/dockerhub/nginx/manifests/latest",
        "/v2/library-local/x/manifests/y",
    ] {
        let resp = v2(&bed, Method::GET, path, &token).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, serde_json::from_str::<Value>(INTERNAL_ERROR).unwrap());
    }
    // The token service and the API still answer (the simplification the README names).
    let again = robot_token(&bed).await;
    assert!(!again.is_empty());
    let resp = client()
        .get(format!("{}/api/v2.0/projects", bed.harbor.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    bed.harbor.set_database_down(false);
    let resp = v2(&bed, Method::GET, "/v2/ghcr/org/app/manifests/v1", &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn blobs_harbor_has_not_cached() {
    let (bed, seeded) = bed_with(&[image("k8s/pause", "3.9", SeedKind::OciIndex)]);
    let token = robot_token(&bed).await;
    let s = &seeded[0];
    // Two platforms: config and layer each.
    let (config, layer, layer2) = (&s.blobs[0], &s.blobs[1], &s.blobs[3]);
    let path = |d: &str| format!("/v2/k8s/pause/blobs/{d}");
    let whole = registry_blob(&bed, "k8s/pause", layer).await;
    assert!(whole.len() > 4096);

    // ≤ 2.15: the whole blob, chunked, no length nor digest, a range ignored.
    bed.harbor.set_uncached_blobs(UncachedBlobs::Chunked);
    let resp = request(&bed, Method::GET, &path(layer), &token)
        .header("Range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), None);
    assert_eq!(
        header(&resp, "transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(header(&resp, "docker-content-digest"), None);
    assert_eq!(header(&resp, "etag"), None);
    assert_eq!(
        header(&resp, "content-type").as_deref(),
        Some("application/x-gzip")
    );
    assert_eq!(resp.bytes().await.unwrap(), whole);
    // Cached now: the registry's answer, the range honoured.
    let resp = request(&bed, Method::GET, &path(layer), &token)
        .header("Range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&resp, "docker-content-digest"), Some(layer.clone()));
    assert_eq!(resp.bytes().await.unwrap(), whole.slice(0..10));
    // A small answer Go's server buffers whole and frames itself (a JSON config).
    let resp = v2(&bed, Method::GET, &path(config), &token).await;
    let config_bytes = registry_blob(&bed, "k8s/pause", config).await;
    assert!(config_bytes.len() <= 2048);
    assert_eq!(
        header(&resp, "content-length"),
        Some(config_bytes.len().to_string())
    );
    assert_eq!(header(&resp, "docker-content-digest"), None);
    assert_eq!(
        header(&resp, "content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );

    // An upstream break (≤ 2.15): half the blob, Harbor's error JSON, a clean end; still uncached.
    bed.harbor.set_fault("k8s", Fault::BreakUncached);
    let whole2 = registry_blob(&bed, "k8s/pause", layer2).await;
    let resp = v2(&bed, Method::GET, &path(layer2), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), None);
    let body = resp.bytes().await.expect("a clean end of the chunked body");
    let half = whole2.len() / 2;
    assert_eq!(body.len(), half + INTERNAL_ERROR.len() + 1);
    assert_eq!(body.slice(..half), whole2.slice(..half));
    assert_eq!(&body[half..], format!("{INTERNAL_ERROR}\n").as_bytes());
    assert!(!bed
        .harbor
        .cached()
        .blobs
        .contains(&("k8s".into(), layer2.clone())));
    // A cached blob does not break.
    let resp = v2(&bed, Method::GET, &path(layer), &token).await;
    assert_eq!(resp.bytes().await.unwrap(), whole);

    // Main: the length and digest first; a break closes the connection short of the length.
    bed.harbor.set_uncached_blobs(UncachedBlobs::Framed);
    let resp = v2(&bed, Method::GET, &path(layer2), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "content-length"),
        Some(whole2.len().to_string())
    );
    assert!(resp.bytes().await.is_err(), "the body must be cut off");
    bed.harbor.clear_faults();
    let resp = request(&bed, Method::GET, &path(layer2), &token)
        .header("Range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "content-length"),
        Some(whole2.len().to_string())
    );
    assert_eq!(header(&resp, "docker-content-digest"), Some(layer2.clone()));
    assert_eq!(header(&resp, "etag"), Some(layer2.clone()));
    assert_eq!(resp.bytes().await.unwrap(), whole2);
    assert!(bed
        .harbor
        .cached()
        .blobs
        .contains(&("k8s".into(), layer2.clone())));
}

#[tokio::test]
async fn tag_lists_merge_the_upstream_and_page() {
    let (bed, _) = bed_with(&[image(
        "dockerhub/library/nginx",
        "latest",
        SeedKind::DockerSchema2,
    )]);
    let token = robot_token(&bed).await;
    let mut extra: Vec<String> = (0..5000).map(|i| format!("t{i:04}")).collect();
    extra.push("latest".into());
    extra.reverse();
    bed.harbor
        .set_upstream_tags("dockerhub", "library/nginx", extra);
    let list = "/v2/dockerhub/library/nginx/tags/list";
    let before = bed
        .harbor
        .counters()
        .tag_list_requests
        .get("dockerhub")
        .copied()
        .unwrap_or(0);

    let resp = v2(&bed, Method::GET, list, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "link"), None);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["name"], "dockerhub/library/nginx");
    let tags: Vec<&str> = body["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tags.len(), 5001, "sorted and unique");
    assert_eq!(&tags[..3], ["latest", "t0000", "t0001"]);
    assert_eq!(tags[5000], "t4999");

    // Harbor's paging: n, last, and a Link while more follow.
    let resp = v2(&bed, Method::GET, &format!("{list}?n=2"), &token).await;
    assert_eq!(
        header(&resp, "link"),
        Some(format!("<{list}?last=t0000&n=2>; rel=\"next\""))
    );
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["latest", "t0000"])
    );
    let resp = v2(&bed, Method::GET, &format!("{list}?n=2&last=t0000"), &token).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["t0001", "t0002"])
    );
    let resp = v2(&bed, Method::GET, &format!("{list}?n=2&last=t4997"), &token).await;
    assert_eq!(header(&resp, "link"), None);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["t4998", "t4999"])
    );
    let resp = v2(&bed, Method::GET, &format!("{list}?n=0"), &token).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"name": "dockerhub/library/nginx", "tags": []})
    );
    let resp = v2(&bed, Method::GET, &format!("{list}?n=-1"), &token).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["errors"][0]["code"],
        "BAD_REQUEST"
    );

    // An unknown repository: 200 with no tags, unless the upstream lists some.
    let none = "/v2/dockerhub/library/none/tags/list";
    let resp = v2(&bed, Method::GET, none, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"name": "dockerhub/library/none", "tags": []})
    );
    bed.harbor.set_upstream_tags(
        "dockerhub",
        "dockerhub/library/none",
        vec!["b".into(), "a".into()],
    );
    let resp = v2(&bed, Method::GET, none, &token).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["a", "b"])
    );

    let after = bed.harbor.counters().tag_list_requests["dockerhub"];
    assert_eq!(after, before + 8);
}
