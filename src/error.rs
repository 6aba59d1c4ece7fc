//! The errors the router answers itself, in the registry's JSON form
//! (`{"errors":[{"code":"…","message":"…","detail":…}]}`), each knowing its spec code and its HTTP
//! status. Errors that Harbor sends are passed through untouched and never
//! become an [`Error`]; start-up errors use `anyhow` and never reach a client.

use bytes::Bytes;
use http::StatusCode;

/// An error answered by the router on the data plane.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No proxy-cache project has this manifest (every one answered 404).
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    /// No proxy-cache project has this blob.
    #[error("blob unknown to registry")]
    BlobUnknown,
    /// A blob HEAD Harbor could not size: it has not cached the blob yet (404, as Harbor's own
    /// HEAD).
    #[error("blob unknown to registry")]
    BlobNotCached,
    /// Harbor (its upstream) rate-limits; `retry_after` is Harbor's `Retry-After`, passed on.
    #[error("too many requests")]
    TooManyRequests {
        retry_after: Option<http::HeaderValue>,
    },
    /// This client used up its budget (`RATE_LIMIT_PER_IP`, `FANOUT_BUDGET_PER_IP`).
    #[error("too many requests")]
    ClientRateLimited {
        retry_after_secs: u64,
        reason: &'static str,
    },
    /// The router's robot account may not pull from the project that has the image.
    #[error("requested access to the resource is denied")]
    Denied { reason: &'static str },
    /// Harbor failed (errors, timeouts) for every project asked; retryable.
    #[error("upstream unavailable")]
    BadGateway { reason: &'static str },
    /// The path is not under `/v2/<PROXY_PROJECT>/`, or names no registry endpoint.
    #[error("repository name not known to registry")]
    NameUnknown { detail: &'static str },
    /// A mirror request names a registry (`ns`) that no proxy-cache project mirrors.
    #[error("repository name not known to registry")]
    RegistryUnknown { host: String },
    /// The repository name breaks the distribution name grammar.
    #[error("invalid repository name")]
    NameInvalid { reason: &'static str },
    /// The digest breaks the digest grammar or names an unsupported algorithm.
    #[error("provided digest did not match uploaded content")]
    DigestInvalid { reason: &'static str },
    /// The tag breaks the tag grammar (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`).
    #[error("manifest tag did not match URI")]
    TagInvalid { reason: &'static str },
    /// Any method but GET and HEAD: the router only serves pulls.
    #[error("the operation is unsupported")]
    MethodNotAllowed,
    /// A push endpoint (blob uploads): pushes go to a Harbor project directly.
    #[error("the operation is unsupported")]
    PushUnsupported,
    /// The router cannot serve this right now (no project known, upstream down); retryable.
    #[error("service unavailable")]
    Unavailable { reason: &'static str },
}

impl Error {
    /// The distribution spec's error code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::ManifestUnknown => "MANIFEST_UNKNOWN",
            Error::BlobUnknown | Error::BlobNotCached => "BLOB_UNKNOWN",
            Error::TooManyRequests { .. } | Error::ClientRateLimited { .. } => "TOOMANYREQUESTS",
            Error::Denied { .. } => "DENIED",
            Error::BadGateway { .. } => "UNAVAILABLE",
            Error::NameUnknown { .. } | Error::RegistryUnknown { .. } => "NAME_UNKNOWN",
            Error::NameInvalid { .. } => "NAME_INVALID",
            Error::DigestInvalid { .. } => "DIGEST_INVALID",
            // Not in the OCI spec's table; the CNCF distribution registry defines it for this case.
            Error::TagInvalid { .. } => "TAG_INVALID",
            Error::MethodNotAllowed | Error::PushUnsupported => "UNSUPPORTED",
            Error::Unavailable { .. } => "UNAVAILABLE",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::ManifestUnknown | Error::BlobUnknown | Error::BlobNotCached => {
                StatusCode::NOT_FOUND
            }
            Error::TooManyRequests { .. } | Error::ClientRateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Error::Denied { .. } => StatusCode::FORBIDDEN,
            Error::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            Error::NameUnknown { .. } | Error::RegistryUnknown { .. } => StatusCode::NOT_FOUND,
            Error::NameInvalid { .. } | Error::DigestInvalid { .. } | Error::TagInvalid { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::MethodNotAllowed | Error::PushUnsupported => StatusCode::METHOD_NOT_ALLOWED,
            Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `detail` member: why, in words an operator can act on.
    fn detail(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Error::RegistryUnknown { host } => {
                format!("no proxy-cache project mirrors the registry {host}").into()
            }
            other => other.fixed_detail().into(),
        }
    }

    fn fixed_detail(&self) -> &'static str {
        match self {
            Error::ManifestUnknown => "no proxy-cache project has this manifest",
            Error::BlobUnknown => "no proxy-cache project has this blob",
            Error::BlobNotCached => {
                "Harbor has not cached this blob yet and did not give its length; a GET fetches it"
            }
            Error::TooManyRequests { .. } => "Harbor's upstream registry is rate-limiting pulls",
            Error::Denied { reason }
            | Error::BadGateway { reason }
            | Error::ClientRateLimited { reason, .. } => reason,
            Error::NameUnknown { detail } => detail,
            Error::NameInvalid { reason }
            | Error::DigestInvalid { reason }
            | Error::TagInvalid { reason }
            | Error::Unavailable { reason } => reason,
            Error::MethodNotAllowed => {
                "only GET and HEAD are served: the router routes pulls; push to a Harbor project directly"
            }
            Error::PushUnsupported => "pushes are not routed; push to a Harbor project directly",
            Error::RegistryUnknown { .. } => "no proxy-cache project mirrors this registry",
        }
    }

    /// The JSON body, as the distribution spec lays it out.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "errors": [{
                "code": self.code(),
                "message": self.to_string(),
                "detail": self.detail(),
            }]
        });
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = Error::NameInvalid {
            reason: "path component \"..\" is not [a-z0-9]+",
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "invalid repository name");
        assert_eq!(
            v["errors"][0]["detail"],
            "path component \"..\" is not [a-z0-9]+"
        );
        assert_eq!(v["errors"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn codes_and_statuses() {
        let cases = [
            (Error::NameUnknown { detail: "" }, "NAME_UNKNOWN", 404),
            (Error::NameInvalid { reason: "" }, "NAME_INVALID", 400),
            (Error::DigestInvalid { reason: "" }, "DIGEST_INVALID", 400),
            (Error::TagInvalid { reason: "" }, "TAG_INVALID", 400),
            (Error::MethodNotAllowed, "UNSUPPORTED", 405),
            (Error::PushUnsupported, "UNSUPPORTED", 405),
            (Error::Unavailable { reason: "" }, "UNAVAILABLE", 503),
            (Error::ManifestUnknown, "MANIFEST_UNKNOWN", 404),
            (Error::BlobUnknown, "BLOB_UNKNOWN", 404),
            (Error::BlobNotCached, "BLOB_UNKNOWN", 404),
            (
                Error::TooManyRequests { retry_after: None },
                "TOOMANYREQUESTS",
                429,
            ),
            (Error::Denied { reason: "" }, "DENIED", 403),
            (
                Error::ClientRateLimited {
                    retry_after_secs: 1,
                    reason: "",
                },
                "TOOMANYREQUESTS",
                429,
            ),
            (Error::BadGateway { reason: "" }, "UNAVAILABLE", 502),
        ];
        for (e, code, status) in cases {
            assert_eq!(e.code(), code);
            assert_eq!(e.status().as_u16(), status, "{code}");
        }
    }
}
