//! [`Ask`]: one owned description of what a pull asks Harbor for (name, endpoint, HEAD or GET, the
//! client's headers that go up), used alike by the mapped request, every fan-out attempt and the
//! background refresh, so they send the same requests and are judged by one rule
//! ([`super::attempt::judge`]). It also says what a pull is called in keys and errors.

use std::fmt;

use http::header::{HeaderValue, ACCEPT, IF_RANGE, RANGE};
use http::{HeaderMap, Method};

use crate::error::Error;
use crate::registry::route::{Reference, Route};
use crate::snapshot::Project;
use crate::upstream::breaker::Lane;

use super::forward;

/// Which pull endpoint, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Manifest {
        reference: String,
        by_digest: bool,
    },
    Blob {
        digest: String,
    },
    /// `query`: `n` and `last` only, re-encoded (possibly empty).
    Tags {
        query: String,
    },
    /// `artifact_type`: the `artifactType` filter, if it looks like a media type.
    Referrers {
        digest: String,
        artifact_type: Option<String>,
    },
}

impl Endpoint {
    /// The endpoint of a pull route, with the parts of its query that go up. `None` for routes
    /// that are not pulls.
    pub fn of(route: &Route, query: Option<&str>) -> Option<(String, Endpoint)> {
        let (name, endpoint) = match *route {
            Route::Manifest { name, reference } => (
                name,
                Endpoint::Manifest {
                    reference: reference.as_str().to_string(),
                    by_digest: matches!(reference, Reference::Digest(_)),
                },
            ),
            Route::Blob { name, digest } => (
                name,
                Endpoint::Blob {
                    digest: digest.to_string(),
                },
            ),
            Route::TagsList { name } => (
                name,
                Endpoint::Tags {
                    query: tags_query(query),
                },
            ),
            Route::Referrers { name, digest } => (
                name,
                Endpoint::Referrers {
                    digest: digest.to_string(),
                    artifact_type: query.and_then(artifact_type).map(str::to_string),
                },
            ),
            Route::Base | Route::Healthz | Route::Readyz => return None,
        };
        Some((name.to_string(), endpoint))
    }

    /// A short name for logs and keys.
    pub fn kind(&self) -> &'static str {
        match self {
            Endpoint::Manifest { .. } => "manifest",
            Endpoint::Blob { .. } => "blob",
            Endpoint::Tags { .. } => "tags",
            Endpoint::Referrers { .. } => "referrers",
        }
    }

    /// What the router answers when no project has it.
    pub fn not_found(&self) -> Error {
        match self {
            Endpoint::Blob { .. } => Error::BlobUnknown,
            Endpoint::Tags { .. } => Error::NameUnknown {
                detail: "no proxy-cache project has tags for this repository",
            },
            _ => Error::ManifestUnknown,
        }
    }
}

/// The path after `/v2/<project>/<name>/`, with its query.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Manifest { reference, .. } => write!(f, "manifests/{reference}"),
            Endpoint::Blob { digest } => write!(f, "blobs/{digest}"),
            Endpoint::Tags { query } if query.is_empty() => f.write_str("tags/list"),
            Endpoint::Tags { query } => write!(f, "tags/list?{query}"),
            Endpoint::Referrers {
                digest,
                artifact_type: Some(t),
            } => write!(f, "referrers/{digest}?artifactType={t}"),
            Endpoint::Referrers { digest, .. } => write!(f, "referrers/{digest}"),
        }
    }
}

/// One pull, as it is asked of a project.
#[derive(Debug, Clone)]
pub struct Ask {
    pub name: String,
    pub endpoint: Endpoint,
    pub head: bool,
    /// The client's headers that go to Harbor ([`forward::headers_up`]).
    pub headers: HeaderMap,
    /// The registry the client named (`ns`, canonical), for a mirror request.
    pub registry: Option<String>,
    /// The client sent it in the root form (`/v2/<name>/…`, a mirror request).
    pub root: bool,
}

impl Ask {
    /// What finds the project that has this pull, in a fan-out or a refresh. A referrers request
    /// finds its subject manifest: Harbor answers referrers with 200 and an empty index for any
    /// subject, which proves nothing.
    pub fn locator(&self) -> Ask {
        match &self.endpoint {
            Endpoint::Referrers { digest, .. } => Ask {
                name: self.name.clone(),
                endpoint: Endpoint::Manifest {
                    reference: digest.clone(),
                    by_digest: true,
                },
                head: true,
                headers: self.headers.clone(),
                registry: self.registry.clone(),
                root: self.root,
            },
            _ => self.clone(),
        }
    }

    /// The cheapest request that finds the project (a background refresh needs no body). A tag list
    /// is probed without the client's `n` and `last`: a page past the end is empty and proves
    /// nothing.
    pub fn probe(&self) -> Ask {
        let mut probe = Ask {
            head: true,
            ..self.locator()
        };
        if let Endpoint::Tags { query } = &mut probe.endpoint {
            query.clear();
        }
        probe
    }

    /// The key of coalescing and of remembered misses: endpoint, name, path with its query, and for
    /// a manifest the Accept set (sorted, so the order of lines does not matter): a manifest
    /// "unknown" without an OCI Accept may well exist with one. A blob, a tag list or referrers do
    /// not depend on `Accept`, so clients that send different lines share one fan-out and one miss.
    pub fn key(&self) -> String {
        let by_accept = matches!(self.endpoint, Endpoint::Manifest { .. });
        let mut accepts: Vec<&str> = self
            .headers
            .get_all(ACCEPT)
            .iter()
            .filter(|_| by_accept)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        accepts.sort_unstable();
        format!(
            "{} {} {} {}{}",
            self.endpoint.kind(),
            self.name,
            self.endpoint,
            accepts.join(","),
            // Keys of mirror requests end in " @<registry>" (a name has no spaces).
            self.registry
                .as_deref()
                .map_or(String::new(), |r| format!(" @{r}"))
        )
    }

    /// The repository as the client named it: `<PROXY_PROJECT>/<name>`, or `<name>` in the root
    /// form.
    pub fn client_repository(&self, proxy: &str) -> String {
        if self.root {
            self.name.clone()
        } else {
            format!("{proxy}/{}", self.name)
        }
    }

    /// The key of this pull's `name → project` mapping: the name, or `<registry> <name>` for a
    /// mirror request (a space is in no name, so the two kinds of key never meet).
    pub fn mapping_key(&self) -> std::borrow::Cow<'_, str> {
        match &self.registry {
            None => std::borrow::Cow::Borrowed(&self.name),
            Some(r) => std::borrow::Cow::Owned(format!("{r} {}", self.name)),
        }
    }

    /// Whether answers to this pull may be kept in memory (manifests by digest, tag lists).
    pub fn kept_in_memory(&self) -> bool {
        match self.endpoint {
            Endpoint::Manifest {
                by_digest: true, ..
            }
            | Endpoint::Tags { .. } => true,
            Endpoint::Blob { .. } => self.head,
            _ => false,
        }
    }

    /// Where the kept answers of this pull live in memory (manifests by digest, tag lists).
    pub fn memory_key(&self) -> Option<String> {
        match &self.endpoint {
            Endpoint::Manifest {
                reference,
                by_digest: true,
            } => Some(format!("{}@{reference}", self.mapping_key())),
            // A kept tag list names the repository as its client did: the form is in the key.
            Endpoint::Tags { query } => Some(format!(
                "{}?{query}{}",
                self.mapping_key(),
                if self.root { " root" } else { "" }
            )),
            _ => None,
        }
    }

    /// The breaker lane of this pull: tag lookups need Harbor's upstream, content by digest does not.
    pub fn lane(&self) -> Lane {
        match self.endpoint {
            Endpoint::Manifest {
                by_digest: false, ..
            }
            | Endpoint::Tags { .. } => Lane::Tags,
            _ => Lane::Content,
        }
    }

    /// A manifest by tag: what a last-known-good answer may stand in for.
    pub fn tag(&self) -> Option<&str> {
        match &self.endpoint {
            Endpoint::Manifest {
                reference,
                by_digest: false,
            } => Some(reference),
            _ => None,
        }
    }

    pub fn is_blob(&self) -> bool {
        matches!(self.endpoint, Endpoint::Blob { .. })
    }

    /// The request that goes to `project`: its path, the method, and the headers. A blob HEAD goes
    /// up as a one-byte ranged GET (Harbor answers HEAD with 404 for blobs it has not cached yet); a
    /// tag-list HEAD as a GET (Harbor routes only GET for tag lists). Ranges are for blobs: a manifest
    /// is always asked whole, so a manifest by digest can be verified before it is passed on.
    pub fn request(&self, project: &Project) -> (Method, String, Option<HeaderMap>) {
        let path = forward::project_path(project, &self.name, &self.endpoint);
        let ranged = self.headers.contains_key(RANGE) || self.headers.contains_key(IF_RANGE);
        let mut headers = (ranged && !self.is_blob()).then(|| {
            let mut h = self.headers.clone();
            h.remove(RANGE);
            h.remove(IF_RANGE);
            h
        });
        let method = match (&self.endpoint, self.head) {
            (Endpoint::Blob { .. }, true) => {
                let mut h = self.headers.clone();
                h.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
                headers = Some(h);
                Method::GET
            }
            (Endpoint::Tags { .. }, _) | (_, false) => Method::GET,
            (_, true) => Method::HEAD,
        };
        (method, path, headers)
    }
}

/// `n` and `last` of a tag-list query, re-encoded; anything else is dropped.
fn tags_query(query: Option<&str>) -> String {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let ok = match k {
            "n" => !v.is_empty() && v.len() <= 6 && v.bytes().all(|b| b.is_ascii_digit()),
            "last" => {
                v.len() <= 256
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b))
            }
            _ => false,
        };
        if ok {
            out.push(format!("{k}={v}"));
        }
    }
    out.join("&")
}

/// `artifactType` of a referrers query, if it looks like a media type.
fn artifact_type(query: &str) -> Option<&str> {
    query.split('&').find_map(|p| {
        let v = p.strip_prefix("artifactType=")?;
        (v.len() <= 255
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+%/".contains(&b)))
        .then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::UpstreamKind;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ask(endpoint: Endpoint, head: bool) -> Ask {
        let mut headers = HeaderMap::new();
        headers.append(ACCEPT, HeaderValue::from_static("b/x, a/y"));
        headers.append(ACCEPT, HeaderValue::from_static("c/z"));
        Ask {
            name: "nginx".into(),
            endpoint,
            head,
            headers,
            registry: None,
            root: false,
        }
    }

    fn hub() -> Project {
        Project::new("hub".into(), 1, 1, UpstreamKind::DockerHub, None)
    }

    #[test]
    fn tag_queries_keep_only_n_and_last() {
        assert_eq!(tags_query(None), "");
        assert_eq!(tags_query(Some("n=10&last=v1.2")), "n=10&last=v1.2");
        assert_eq!(tags_query(Some("last=a&evil=1&n=x")), "last=a");
        assert_eq!(tags_query(Some("n=1%0d%0a")), "");
        assert_eq!(tags_query(Some("last=a b")), "");
    }

    #[test]
    fn requests_sent_for_each_endpoint() {
        let blob = Endpoint::Blob { digest: D.into() };
        let (m, path, h) = ask(blob.clone(), true).request(&hub());
        assert_eq!(m, Method::GET, "a blob HEAD goes up as a ranged GET");
        assert_eq!(path, format!("/v2/hub/library/nginx/blobs/{D}"));
        assert_eq!(h.unwrap()[RANGE], "bytes=0-0");
        assert_eq!(ask(blob, false).request(&hub()).0, Method::GET);
        let tags = Endpoint::Tags {
            query: "n=1".into(),
        };
        let (m, path, h) = ask(tags, true).request(&hub());
        assert_eq!(
            (m, h),
            (Method::GET, None),
            "a tag-list HEAD goes up as GET"
        );
        assert_eq!(path, "/v2/hub/library/nginx/tags/list?n=1");
        let manifest = Endpoint::Manifest {
            reference: "1".into(),
            by_digest: false,
        };
        assert_eq!(ask(manifest.clone(), true).request(&hub()).0, Method::HEAD);
        let mut ranged = ask(manifest, false);
        ranged
            .headers
            .insert(RANGE, HeaderValue::from_static("bytes=0-9"));
        let (m, _, h) = ranged.request(&hub());
        assert_eq!(m, Method::GET);
        assert!(!h.unwrap().contains_key(RANGE), "a manifest is asked whole");
        let mut ranged_blob = ask(Endpoint::Blob { digest: D.into() }, false);
        ranged_blob
            .headers
            .insert(RANGE, HeaderValue::from_static("bytes=0-9"));
        assert_eq!(
            ranged_blob.request(&hub()).2,
            None,
            "a blob keeps the client's range"
        );
    }

    #[test]
    fn referrers_are_located_by_their_subject_manifest() {
        let referrers = ask(
            Endpoint::Referrers {
                digest: D.into(),
                artifact_type: Some("application/x".into()),
            },
            false,
        );
        assert_eq!(
            referrers.request(&hub()).1,
            format!("/v2/hub/library/nginx/referrers/{D}?artifactType=application/x")
        );
        let locator = referrers.locator();
        let (m, path, _) = locator.request(&hub());
        assert_eq!(m, Method::HEAD);
        assert_eq!(path, format!("/v2/hub/library/nginx/manifests/{D}"));
        assert!(referrers.probe().head);
        let manifest = ask(
            Endpoint::Manifest {
                reference: "1".into(),
                by_digest: false,
            },
            false,
        );
        assert!(!manifest.locator().head, "a client GET races as a GET");
        assert!(manifest.probe().head, "a refresh needs no body");
        let page = ask(
            Endpoint::Tags {
                query: "n=10&last=v9".into(),
            },
            false,
        );
        assert_eq!(page.locator().endpoint, page.endpoint);
        assert_eq!(
            page.probe().request(&hub()).1,
            "/v2/hub/library/nginx/tags/list",
            "a refresh asks for the first page"
        );
    }

    #[test]
    fn keys_ignore_accept_order_but_not_accept_set() {
        let manifest = Endpoint::Manifest {
            reference: "1".into(),
            by_digest: false,
        };
        let a = ask(manifest.clone(), false);
        let mut b = a.clone();
        b.headers = HeaderMap::new();
        b.headers
            .append(ACCEPT, HeaderValue::from_static("c/z, a/y"));
        b.headers.append(ACCEPT, HeaderValue::from_static("b/x"));
        assert_eq!(a.key(), b.key());
        assert_eq!(a.key(), "manifest nginx manifests/1 a/y,b/x,c/z");
        b.headers.remove(ACCEPT);
        assert_ne!(a.key(), b.key());
        assert_eq!(a.memory_key(), None, "by tag: never kept");
    }
}
