//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz; `scripts/fuzz.sh` runs them for a bounded
//! time): each takes arbitrary bytes, feeds them to one hand-written parser, and checks what must
//! hold of its answer. They live in the library so that crashes the fuzzer finds become ordinary
//! regression tests (`tests/fuzz_regressions.rs` replays `fuzz/regressions/<target>/*`).

use http::{HeaderMap, HeaderValue, Method};

use crate::names;
use crate::registry::route::{self, Route};

/// One fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("route", route),
    ("link", link),
    ("challenge", challenge),
    ("config", config),
    ("tag_list", tag_list),
    ("forwarded_for", forwarded_for),
    ("query", query),
];

/// The route parser: whatever it accepts satisfies the name grammar and the limits.
pub fn route(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let name = match route::parse(&Method::GET, path, "proxy") {
        Ok(Route::Manifest { name, .. })
        | Ok(Route::Blob { name, .. })
        | Ok(Route::TagsList { name })
        | Ok(Route::Referrers { name, .. }) => name,
        _ => return,
    };
    assert!(name.len() <= names::MAX_NAME_LEN);
    assert!(name.split('/').all(names::is_name_component), "{name:?}");
}

/// Discovery's `Link` parser: a next page is always a path under the projects API.
pub fn link(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::LINK, value);
    if let Ok(Some(path)) = crate::control::discovery::next_link(&headers) {
        assert!(path.starts_with("/api/v2.0/projects?"), "{path:?}");
    }
}

/// The `WWW-Authenticate` parser: a challenge always has a realm, and its key is its scope.
pub fn challenge(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(c) = crate::upstream::auth::Challenge::parse(text) {
        assert_eq!(c.key(), c.scope.clone().unwrap_or_default());
    }
}

/// The configuration: arbitrary values for every variable are refused or accepted, never a panic,
/// and a refusal never shows a password written into a URL.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Lines of `NAME=value`; HARBOR_URL defaults to something valid so other variables are reached.
    let mut map = std::collections::HashMap::new();
    map.insert("HARBOR_URL".to_string(), "http://harbor".to_string());
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            map.insert(k.to_string(), v.to_string());
        }
    }
    if let Err(errors) = crate::config::Config::from_map(&map) {
        for e in &errors.0 {
            let (Some(shown), Some(given)) = (&e.value, map.get(&e.var)) else {
                continue;
            };
            // What sits between the first `:` and the last `@` of the value as given never shows.
            let (Some(colon), Some(at)) = (given.find(':'), given.rfind('@')) else {
                continue;
            };
            if colon < at {
                let secret = given[colon + 1..at].trim_start_matches('/');
                // Where the credentials were: after the scheme's colon, before the host (what
                // comes before the colon and after the last `@` is shown, and may repeat anything).
                let end = shown.rfind('@').unwrap_or(shown.len()).max(colon + 1);
                let where_they_were = shown.get(colon + 1..end).unwrap_or("");
                if secret.len() >= 3 && !secret.contains("***") {
                    assert!(!where_they_were.contains(secret), "{}: {shown:?}", e.var);
                }
            }
        }
    }
}

/// Tag-list bodies: judged, renamed, and their `Link` rewritten, whatever Harbor sends.
pub fn tag_list(data: &[u8]) {
    let body = bytes::Bytes::copy_from_slice(data);
    let has_tags = crate::registry::attempt::lists_tags(&body);
    let renamed = crate::registry::answer::renamed_tag_list(body.clone(), "proxy/a");
    if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data).is_ok() {
        let v: serde_json::Value = serde_json::from_slice(&renamed).expect("still JSON");
        assert_eq!(v["name"], "proxy/a");
        assert_eq!(crate::registry::attempt::lists_tags(&renamed), has_tags);
    } else {
        assert_eq!(renamed, body, "anything else passes unchanged");
    }
    let _ = crate::registry::attempt::telling(data);
    if let Ok(link) = HeaderValue::from_bytes(data) {
        let mut h = HeaderMap::new();
        h.insert(http::header::LINK, link);
        crate::registry::answer::rewrite_links(&mut h, "/v2/hub/a/", "/v2/proxy/a/");
    }
}

/// `X-Forwarded-For` behind a trusted proxy: the client is one of the addresses sent, or the peer.
pub fn forwarded_for(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let (mut parts, ()) = http::Request::builder()
        .header("x-forwarded-for", value)
        .body(())
        .expect("a request")
        .into_parts();
    let peer: std::net::SocketAddr = "10.0.0.1:1".parse().expect("an address");
    parts.extensions.insert(crate::server::Peer(peer));
    let mut map = std::collections::HashMap::new();
    map.insert("HARBOR_URL".to_string(), "http://h".to_string());
    map.insert("TRUSTED_PROXIES".to_string(), "10.0.0.0/8".to_string());
    let trusted = crate::config::Config::from_map(&map)
        .expect("valid")
        .trusted_proxies;
    let ip = crate::registry::client::client_ip(&parts, &trusted);
    let sent: Vec<std::net::IpAddr> = String::from_utf8_lossy(data)
        .split(',')
        .filter_map(|h| {
            let h = h.trim();
            h.parse()
                .ok()
                .or_else(|| h.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        })
        .collect();
    assert!(ip == peer.ip() || sent.contains(&ip), "{ip} from {sent:?}");
}

/// Query strings of tag lists and referrers: what goes up is re-encoded from a short whitelist.
pub fn query(data: &[u8]) {
    let Ok(q) = std::str::from_utf8(data) else {
        return;
    };
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    for r in [
        Route::TagsList { name: "a" },
        Route::Referrers { name: "a", digest },
    ] {
        if let Some((_, endpoint)) = crate::registry::ask::Endpoint::of(&r, Some(q)) {
            let tail = endpoint.to_string();
            assert!(
                tail.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'#' && b != b'\\'),
                "{tail:?}"
            );
            assert!(http::uri::PathAndQuery::try_from(format!("/v2/x/a/{tail}")).is_ok());
        }
    }
}
