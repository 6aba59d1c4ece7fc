//! The routing view the control plane publishes and the data plane reads: Harbor's proxy-cache
//! projects, in a stable order, with their upstream kind. A [`Snapshot`] is immutable; discovery
//! builds a whole new one and swaps it in at once, so a core sees either the old list or the new one,
//! never a mix. A core loads it once per request (`arc-swap`, a few nanoseconds, no lock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

/// What kind of registry a proxy-cache project mirrors (Harbor's registry `type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    /// `docker-hub`: single-segment names live under `library/`.
    DockerHub,
    /// Any other type Harbor reports (`github-ghcr`, `quay`, `docker-registry`, …).
    Other(String),
    /// The registry could not be read (the robot may lack the permission); treated as not Docker Hub.
    Unknown,
}

/// One proxy-cache project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub name: String,
    pub id: i64,
    pub registry_id: i64,
    pub kind: UpstreamKind,
    /// The upstream registry's URL, as Harbor reports it (for logs and operators).
    pub upstream_url: Option<String>,
    /// The registry host the project mirrors, as clients name it (`docker.io`, `ghcr.io`, …; see
    /// [`registry_host`]); `None` when the registry could not be read.
    pub registry: Option<String>,
}

/// The registry host a project of `kind` with upstream `url` mirrors, as a client names it in a
/// mirror request's `ns`: Docker Hub is `docker.io` (whatever URL Harbor shows for it), GitHub's
/// `ghcr.io`, Quay's `quay.io`; any other type (docker-registry, harbor, gitlab, …) the URL's host,
/// with its port when it is not the scheme's default. `None` when neither is known.
pub fn registry_host(kind: &UpstreamKind, url: Option<&str>) -> Option<String> {
    match kind {
        UpstreamKind::DockerHub => return Some("docker.io".into()),
        UpstreamKind::Other(k) if k == "github-ghcr" => return Some("ghcr.io".into()),
        UpstreamKind::Other(k) if k == "quay" => return Some("quay.io".into()),
        UpstreamKind::Unknown => return None,
        UpstreamKind::Other(_) => {}
    }
    let uri: http::Uri = url?.trim().parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let default = match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    };
    let with_port = match uri.port_u16() {
        Some(p) if p != default => format!("{host}:{p}"),
        _ => host.to_string(),
    };
    canonical_host(&with_port)
}

/// A registry host as a client names it, made comparable: lower case, Docker Hub's other names
/// (`registry-1.docker.io`, `index.docker.io`) as `docker.io`, a default port (`:443`) dropped.
/// `None` for what is not a host (`[host][:port]` of letters, digits, `.`, `-`, `:` for IPv6).
pub fn canonical_host(host: &str) -> Option<String> {
    let h = host.trim().to_ascii_lowercase();
    let h = h.strip_suffix(":443").unwrap_or(&h);
    let valid = !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !valid {
        return None;
    }
    Some(match h {
        "registry-1.docker.io" | "index.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        other => other.to_string(),
    })
}

impl Project {
    /// A project as discovery reads it; its registry host is derived from `kind` and `upstream_url`.
    pub fn new(
        name: String,
        id: i64,
        registry_id: i64,
        kind: UpstreamKind,
        upstream_url: Option<String>,
    ) -> Project {
        let registry = registry_host(&kind, upstream_url.as_deref());
        Project {
            name,
            id,
            registry_id,
            kind,
            upstream_url,
            registry,
        }
    }
}

/// Every proxy-cache project the router may route to, sorted by name and cut at
/// `MAX_FANOUT_PROJECTS`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub projects: Vec<Project>,
    /// When the discovery that produced this snapshot finished.
    pub built_at: Instant,
    /// Counts published snapshots (each core copies a new one once); 0 for a list loaded from
    /// Redis at start.
    pub generation: u64,
    /// A list loaded from Redis at start that no discovery round has confirmed yet.
    pub provisional: bool,
    /// What discovery learned of Harbor itself.
    pub harbor: HarborInfo,
}

/// What discovery learned of Harbor beyond the projects: shown by `/healthz` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HarborInfo {
    /// `harbor_version` from `/api/v2.0/systeminfo` (Harbor shows it to authenticated callers only).
    pub version: Option<String>,
    /// Harbor no longer accepts the robot account named here (it treats the router as anonymous):
    /// the projects are the last list read with working credentials.
    pub refused_user: Option<String>,
}

impl Snapshot {
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.built_at)
    }

    pub fn project(&self, name: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.name == name)
    }
}

/// The publication point: `None` until the first successful discovery.
pub type SharedSnapshot = Arc<ArcSwapOption<Snapshot>>;

pub fn shared() -> SharedSnapshot {
    Arc::new(ArcSwapOption::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_host_of_every_harbor_registry_type() {
        let other = |k: &str| UpstreamKind::Other(k.into());
        let cases: &[(UpstreamKind, Option<&str>, Option<&str>)] = &[
            (
                UpstreamKind::DockerHub,
                Some("https://hub.docker.com"),
                Some("docker.io"),
            ),
            (UpstreamKind::DockerHub, None, Some("docker.io")),
            (
                other("github-ghcr"),
                Some("https://ghcr.io"),
                Some("ghcr.io"),
            ),
            (other("quay"), Some("https://quay.io"), Some("quay.io")),
            (
                other("docker-registry"),
                Some("https://registry.k8s.io"),
                Some("registry.k8s.io"),
            ),
            (
                other("docker-registry"),
                Some("https://Registry.Example.com:5000/"),
                Some("registry.example.com:5000"),
            ),
            (
                other("docker-registry"),
                Some("http://10.0.0.7:80"),
                Some("10.0.0.7"),
            ),
            (
                other("docker-registry"),
                Some("https://mirror.example.com:443"),
                Some("mirror.example.com"),
            ),
            (
                other("harbor"),
                Some("https://harbor.other.org"),
                Some("harbor.other.org"),
            ),
            (
                other("gitlab"),
                Some("https://registry.gitlab.com"),
                Some("registry.gitlab.com"),
            ),
            (
                other("jfrog-artifactory"),
                Some("https://acme.jfrog.io"),
                Some("acme.jfrog.io"),
            ),
            (
                other("aws-ecr"),
                Some("https://123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
                Some("123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
            ),
            (
                other("azure-acr"),
                Some("https://acme.azurecr.io"),
                Some("acme.azurecr.io"),
            ),
            (other("google-gcr"), Some("https://gcr.io"), Some("gcr.io")),
            (
                other("docker-registry"),
                Some("https://registry-1.docker.io"),
                Some("docker.io"),
            ),
            (other("docker-registry"), None, None),
            (other("docker-registry"), Some("not a url"), None),
            (UpstreamKind::Unknown, Some("https://quay.io"), None),
        ];
        for (kind, url, want) in cases {
            assert_eq!(
                registry_host(kind, *url).as_deref(),
                *want,
                "{kind:?} {url:?}"
            );
        }
    }

    #[test]
    fn hosts_are_compared_canonically() {
        for (given, want) in [
            ("docker.io", Some("docker.io")),
            ("registry-1.docker.io", Some("docker.io")),
            ("index.docker.io", Some("docker.io")),
            ("GHCR.IO", Some("ghcr.io")),
            ("quay.io:443", Some("quay.io")),
            ("localhost:5000", Some("localhost:5000")),
            ("[fd00::1]:5000", Some("[fd00::1]:5000")),
            ("", None),
            ("evil.io/x", None),
            ("a b", None),
        ] {
            assert_eq!(canonical_host(given).as_deref(), want, "{given:?}");
        }
    }
}
