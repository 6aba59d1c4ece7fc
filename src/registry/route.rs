//! Turns a request's method and path into a [`Route`], validating the repository name, tag and digest
//! against the distribution spec's grammars before anything else sees them. It owns the URL layout of
//! the router (`/v2/<PROXY_PROJECT>/<name>/…`, `/healthz`, `/readyz`); it does not know about
//! projects, caches or upstreams.
//!
//! Nothing is percent-decoded: `%` appears in no valid name, tag or digest, so an encoded path
//! (`%2e%2e`, `%2f`) is simply invalid rather than a second spelling of something valid.

use http::Method;

use crate::error::Error;
use crate::names::{valid_digest, valid_name, valid_tag};

/// A request the router knows how to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/v2/`: the API version check every client makes first.
    Base,
    /// `/healthz`: liveness and readiness, for probes.
    Healthz,
    /// `/readyz`.
    Readyz,
    /// `/v2/<proxy>/<name>/manifests/<reference>`.
    Manifest {
        name: &'a str,
        reference: Reference<'a>,
    },
    /// `/v2/<proxy>/<name>/blobs/<digest>`.
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<proxy>/<name>/tags/list` (`n` and `last` live in the query string).
    TagsList { name: &'a str },
    /// `/v2/<proxy>/<name>/referrers/<digest>` (OCI 1.1).
    Referrers { name: &'a str, digest: &'a str },
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference<'a> {
    Tag(&'a str),
    Digest(&'a str),
}

impl Reference<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(s) | Reference::Digest(s) => s,
        }
    }
}

impl<'a> Route<'a> {
    /// The repository name of a pull route.
    pub fn name(&self) -> Option<&'a str> {
        match *self {
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name, .. } => Some(name),
            Route::Base | Route::Healthz | Route::Readyz => None,
        }
    }
}

/// Parses one request. `proxy` is `PROXY_PROJECT`; `path` is the raw path without the query.
pub fn parse<'a>(method: &Method, path: &'a str, proxy: &str) -> Result<Route<'a>, Error> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Error::MethodNotAllowed);
    }
    match path {
        "/healthz" => return Ok(Route::Healthz),
        "/readyz" => return Ok(Route::Readyz),
        "/v2" | "/v2/" => return Ok(Route::Base),
        _ => {}
    }
    let tail = proxy_tail(path, proxy).ok_or(Error::NameUnknown {
        detail: "only /v2/<PROXY_PROJECT>/<name>/… is routed",
    })?;
    parse_endpoint(tail)
}

/// What follows `/v2/<PROXY_PROJECT>/` in `path`; `None` when the path is not in that form.
pub fn proxy_tail<'a>(path: &'a str, proxy: &str) -> Option<&'a str> {
    path.strip_prefix("/v2/")?
        .strip_prefix(proxy)?
        .strip_prefix('/')
}

/// Parses a mirror request (one that names its registry in `ns`). The `PROXY_PROJECT` form
/// (`/v2/<PROXY_PROJECT>/<name>/…`, containerd's `override_path = true`) comes first; any other
/// `/v2/<name>/…` is the root form (a plain mirror entry). So an image whose first path component is
/// `PROXY_PROJECT` (a Docker Hub user named like it) is reached only in the `PROXY_PROJECT` form:
/// `/v2/<PROXY_PROJECT>/<PROXY_PROJECT>/<rest>/…`.
pub fn parse_mirror<'a>(method: &Method, path: &'a str, proxy: &str) -> Result<Route<'a>, Error> {
    match path.strip_prefix("/v2/") {
        Some(tail) if proxy_tail(path, proxy).is_none() && !tail.is_empty() => {
            if method != Method::GET && method != Method::HEAD {
                return Err(Error::MethodNotAllowed);
            }
            parse_endpoint(tail)
        }
        _ => parse(method, path, proxy),
    }
}

/// `<name>/<endpoint>` after the proxy prefix.
fn parse_endpoint(tail: &str) -> Result<Route<'_>, Error> {
    const UNKNOWN: Error = Error::NameUnknown {
        detail: "unknown registry endpoint",
    };
    if let Some(name) = tail.strip_suffix("/tags/list") {
        return Ok(Route::TagsList {
            name: valid_name(name)?,
        });
    }
    let (head, last) = tail.rsplit_once('/').ok_or(UNKNOWN)?;
    let (name, kind) = head.rsplit_once('/').unwrap_or(("", head));
    match kind {
        "manifests" => {
            let name = valid_name(name)?;
            let reference = if last.contains(':') {
                Reference::Digest(valid_digest(last)?)
            } else {
                Reference::Tag(valid_tag(last)?)
            };
            Ok(Route::Manifest { name, reference })
        }
        "blobs" if last == "uploads" => Err(Error::PushUnsupported),
        "blobs" => Ok(Route::Blob {
            name: valid_name(name)?,
            digest: valid_digest(last)?,
        }),
        "uploads" if name.ends_with("/blobs") || name == "blobs" => Err(Error::PushUnsupported),
        "referrers" => Ok(Route::Referrers {
            name: valid_name(name)?,
            digest: valid_digest(last)?,
        }),
        _ => Err(UNKNOWN),
    }
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
