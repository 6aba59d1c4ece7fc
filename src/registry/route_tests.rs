//! Table-driven tests of the route parser, hostile input included.

use super::*;

const SHA256: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn get(path: &str) -> Result<Route<'_>, Error> {
    parse(&Method::GET, path, "proxy")
}

/// The error code a path gets, or "OK".
fn code(path: &str) -> &'static str {
    match get(path) {
        Ok(_) => "OK",
        Err(e) => e.code(),
    }
}

#[test]
fn valid_routes() {
    let sha512 = format!("sha512:{}", "ab".repeat(64));
    let cases: Vec<(String, Route<'static>)> = vec![
        ("/v2/".into(), Route::Base),
        ("/v2".into(), Route::Base),
        ("/healthz".into(), Route::Healthz),
        ("/readyz".into(), Route::Readyz),
        (
            "/v2/proxy/nginx/manifests/latest".into(),
            Route::Manifest {
                name: "nginx",
                reference: Reference::Tag("latest"),
            },
        ),
        (
            "/v2/proxy/coreos/etcd/manifests/v3.5.0".into(),
            Route::Manifest {
                name: "coreos/etcd",
                reference: Reference::Tag("v3.5.0"),
            },
        ),
        (
            format!("/v2/proxy/library/nginx/manifests/{SHA256}"),
            Route::Manifest {
                name: "library/nginx",
                reference: Reference::Digest(SHA256),
            },
        ),
        (
            format!("/v2/proxy/a/b/c/blobs/{SHA256}"),
            Route::Blob {
                name: "a/b/c",
                digest: SHA256,
            },
        ),
        (
            "/v2/proxy/org/app/tags/list".into(),
            Route::TagsList { name: "org/app" },
        ),
        (
            format!("/v2/proxy/org/app/referrers/{SHA256}"),
            Route::Referrers {
                name: "org/app",
                digest: SHA256,
            },
        ),
        // A repository may itself be called "manifests", "blobs" or "tags".
        (
            "/v2/proxy/x/manifests/manifests/latest".into(),
            Route::Manifest {
                name: "x/manifests",
                reference: Reference::Tag("latest"),
            },
        ),
        (
            "/v2/proxy/tags/tags/list".into(),
            Route::TagsList { name: "tags" },
        ),
        // Separators of the name grammar.
        (
            "/v2/proxy/a.b_c__d---e/f-g/manifests/_T.a-g_".into(),
            Route::Manifest {
                name: "a.b_c__d---e/f-g",
                reference: Reference::Tag("_T.a-g_"),
            },
        ),
    ];
    for (path, want) in &cases {
        let got = get(path).unwrap_or_else(|e| panic!("{path}: {e:?}"));
        // Compare through Debug: the `want` borrows from 'static strings, `got` from `path`.
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "{path}");
    }
    let path = format!("/v2/proxy/x/blobs/{sha512}");
    assert!(matches!(get(&path), Ok(Route::Blob { .. })));
    let sha384 = format!("sha384:{}", "0".repeat(96));
    assert!(matches!(
        get(&format!("/v2/proxy/x/manifests/{sha384}")),
        Ok(Route::Manifest { .. })
    ));
    // The tag grammar allows 128 characters.
    let long_tag = format!("/v2/proxy/x/manifests/{}", "t".repeat(128));
    assert_eq!(code(&long_tag), "OK");
    // The name may be 255 characters.
    let long_name = format!("/v2/proxy/{}/tags/list", "n".repeat(255));
    assert_eq!(code(&long_name), "OK");
}

#[test]
fn refused_paths() {
    let long_name = format!("/v2/proxy/{}/tags/list", "n".repeat(256));
    let long_tag = format!("/v2/proxy/x/manifests/{}", "t".repeat(129));
    let cases: Vec<(String, &str)> = vec![
        // Not under the proxy project.
        ("/".into(), "NAME_UNKNOWN"),
        ("/v2/_catalog".into(), "NAME_UNKNOWN"),
        (
            "/v2/dockerhub/nginx/manifests/latest".into(),
            "NAME_UNKNOWN",
        ),
        ("/v2/proxyx/nginx/manifests/latest".into(), "NAME_UNKNOWN"),
        ("/v2/proxy".into(), "NAME_UNKNOWN"),
        ("/v2/proxy/".into(), "NAME_UNKNOWN"),
        ("/V2/proxy/nginx/manifests/latest".into(), "NAME_UNKNOWN"),
        ("/healthz/".into(), "NAME_UNKNOWN"),
        ("/metrics".into(), "NAME_UNKNOWN"),
        // Not a registry endpoint.
        ("/v2/proxy/nginx".into(), "NAME_UNKNOWN"),
        ("/v2/proxy/nginx/manifests/latest/".into(), "NAME_UNKNOWN"),
        ("/v2/proxy/nginx/tags/list/".into(), "NAME_UNKNOWN"),
        ("/v2/proxy/nginx/whatever/x".into(), "NAME_UNKNOWN"),
        // Names.
        ("/v2/proxy/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy//nginx/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/a//b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/../etc/manifests/latest".into(), "NAME_INVALID"),
        (
            "/v2/proxy/a/../../b/manifests/latest".into(),
            "NAME_INVALID",
        ),
        ("/v2/proxy/%2e%2e/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/a%2fb/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/%ff%fe/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/Nginx/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/-nginx/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/nginx-/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/a..b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/a___b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/a.-b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/a b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/ngïnx/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy/a\0b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/proxy//tags/list".into(), "NAME_INVALID"),
        (long_name, "NAME_INVALID"),
        // Tags.
        (long_tag, "TAG_INVALID"),
        ("/v2/proxy/x/manifests/.latest".into(), "TAG_INVALID"),
        ("/v2/proxy/x/manifests/-latest".into(), "TAG_INVALID"),
        ("/v2/proxy/x/manifests/..".into(), "TAG_INVALID"),
        ("/v2/proxy/x/manifests/%2e%2e".into(), "TAG_INVALID"),
        ("/v2/proxy/x/manifests/la test".into(), "TAG_INVALID"),
        ("/v2/proxy/x/manifests/".into(), "TAG_INVALID"),
        // Digests.
        ("/v2/proxy/x/manifests/sha256:abc".into(), "DIGEST_INVALID"),
        ("/v2/proxy/x/blobs/latest".into(), "DIGEST_INVALID"),
        ("/v2/proxy/x/blobs/".into(), "DIGEST_INVALID"),
        (
            format!("/v2/proxy/x/blobs/{}", SHA256.to_uppercase()),
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/proxy/x/blobs/md5:{}", "0".repeat(32)),
            "DIGEST_INVALID",
        ),
        (format!("/v2/proxy/x/blobs/{}0", SHA256), "DIGEST_INVALID"),
        (
            format!("/v2/proxy/x/blobs/sha256:{}", "g".repeat(64)),
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/proxy/x/referrers/sha256:{}", "0".repeat(63)),
            "DIGEST_INVALID",
        ),
        // Pushes.
        ("/v2/proxy/x/blobs/uploads/".into(), "UNSUPPORTED"),
        ("/v2/proxy/x/blobs/uploads".into(), "UNSUPPORTED"),
        (
            "/v2/proxy/x/y/blobs/uploads/6f1f-4c0e-9b8c".into(),
            "UNSUPPORTED",
        ),
    ];
    for (path, want) in &cases {
        assert_eq!(code(path), *want, "{path:?}");
    }
}

#[test]
fn only_get_and_head() {
    let path = "/v2/proxy/nginx/manifests/latest";
    assert!(parse(&Method::HEAD, path, "proxy").is_ok());
    assert!(parse(&Method::HEAD, "/v2/", "proxy").is_ok());
    for m in [
        "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "BREW",
    ] {
        let m = Method::from_bytes(m.as_bytes()).unwrap();
        for p in [path, "/v2/", "/healthz", "/nowhere"] {
            assert_eq!(
                parse(&m, p, "proxy"),
                Err(Error::MethodNotAllowed),
                "{m} {p}"
            );
        }
    }
}

#[test]
fn proxy_prefix_is_configurable() {
    let r = parse(&Method::GET, "/v2/hub/nginx/manifests/1", "hub").unwrap();
    assert!(matches!(r, Route::Manifest { name: "nginx", .. }));
    assert_eq!(
        parse(&Method::GET, "/v2/proxy/nginx/manifests/1", "hub").map_err(|e| e.code()),
        Err("NAME_UNKNOWN")
    );
}

#[test]
fn mirror_requests_take_both_forms() {
    let m = |path| parse_mirror(&Method::GET, path, "proxy");
    assert_eq!(
        m("/v2/proxy/library/nginx/manifests/1").unwrap().name(),
        Some("library/nginx"),
        "the PROXY_PROJECT form (override_path)"
    );
    assert_eq!(
        m("/v2/library/nginx/manifests/1").unwrap().name(),
        Some("library/nginx"),
        "the root form"
    );
    assert_eq!(
        m("/v2/proxy/proxy/tool/manifests/1").unwrap().name(),
        Some("proxy/tool"),
        "an image under a user named like PROXY_PROJECT, in the PROXY_PROJECT form"
    );
    assert_eq!(
        m("/v2/proxy/tool/manifests/1").unwrap().name(),
        Some("tool"),
        "the PROXY_PROJECT form wins a collision"
    );
    assert!(matches!(m("/v2/"), Ok(Route::Base)));
    assert!(matches!(m("/healthz"), Ok(Route::Healthz)));
    assert!(m("/v2/Bad/manifests/1").is_err());
    assert!(parse_mirror(&Method::POST, "/v2/a/blobs/uploads/", "proxy").is_err());
    assert!(
        parse(&Method::GET, "/v2/library/nginx/manifests/1", "proxy").is_err(),
        "without ns the root form is not routed"
    );
}
