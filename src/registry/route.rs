//! Turns a request's method and path into a [`Route`], validating the repository name, tag and digest
//! against the distribution spec's grammars before anything else sees them. It owns the URL layout of
//! the router (`/v2/<PROXY_PROJECT>/<name>/…`, `/healthz`, `/readyz`); it does not know about
//! projects, caches or upstreams.
//!
//! Nothing is percent-decoded: `%` appears in no valid name, tag or digest, so an encoded path
//! (`%2e%2e`, `%2f`) is simply invalid rather than a second spelling of something valid.

use http::Method;

use crate::error::Error;

/// Longest repository name accepted after the proxy prefix, as the distribution registry limits it.
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag, from the tag grammar.
const MAX_TAG_LEN: usize = 128;

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
    let tail = path
        .strip_prefix("/v2/")
        .and_then(|p| p.strip_prefix(proxy))
        .and_then(|p| p.strip_prefix('/'))
        .ok_or(Error::NameUnknown {
            detail: "only /v2/<PROXY_PROJECT>/<name>/… is routed",
        })?;
    parse_endpoint(tail)
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

/// One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_name_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-"+, always followed by an alphanumeric.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_name(name: &str) -> Result<&str, Error> {
    if name.is_empty() {
        return Err(Error::NameInvalid {
            reason: "the repository name is empty",
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::NameInvalid {
            reason: "the repository name is longer than 255 characters",
        });
    }
    if name.split('/').all(is_name_component) {
        Ok(name)
    } else {
        Err(Error::NameInvalid {
            reason: "each path component must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*",
        })
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn valid_tag(tag: &str) -> Result<&str, Error> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-');
    if ok {
        Ok(tag)
    } else {
        Err(Error::TagInvalid {
            reason: "a tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}",
        })
    }
}

/// `algorithm:hex` for sha256, sha384 and sha512, lowercase hex of the algorithm's length.
fn valid_digest(digest: &str) -> Result<&str, Error> {
    let (algorithm, hex) = digest.split_once(':').ok_or(Error::DigestInvalid {
        reason: "a digest is algorithm:encoded",
    })?;
    let len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => {
            return Err(Error::DigestInvalid {
                reason: "unsupported digest algorithm; expected sha256, sha384 or sha512",
            })
        }
    };
    let hex_ok = hex.len() == len
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    if hex_ok {
        Ok(digest)
    } else {
        Err(Error::DigestInvalid {
            reason: "the encoded part must be lowercase hex of the algorithm's length",
        })
    }
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
