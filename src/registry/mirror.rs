//! Registry-aware mirroring: a request that names its registry (`?ns=<host>`, as containerd and
//! CRI-O send to a mirror) is routed only among the projects that mirror that host, never to another
//! registry's content. Without `ns`, routing is as before (every project is a candidate).
//!
//! - `ns` is compared canonically (`snapshot::canonical_host`: Docker Hub's aliases are `docker.io`).
//! - Candidates: the projects whose registry host is `ns`; if there are none, the projects whose
//!   registry could not be read (no known host; the gap is logged once per core); never a project
//!   whose known host differs. None at all: 404 `NAME_UNKNOWN` naming the host.
//! - Caches are keyed by registry when `ns` is given (`Ask::key`, `Ask::mapping_key`), so an ns-less
//!   client and an ns-aware one cannot poison each other.

use std::cell::Cell;

use crate::error::Error;
use crate::snapshot::{canonical_host, Project, Snapshot};

use super::ask::Ask;

/// A request that names its registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    /// The registry host, canonical.
    pub registry: String,
    /// Sent in the root form (`/v2/<name>/…`) rather than under `PROXY_PROJECT`.
    pub root: bool,
}

/// The registry a request names, from its query: `Some(Ok(host))` for a usable `ns`, `Some(Err)`
/// for one that is not a host, `None` without `ns`.
pub fn ns_of(query: Option<&str>) -> Option<Result<String, Error>> {
    let raw = query?.split('&').find_map(|p| p.strip_prefix("ns="))?;
    // Go's url.Values encodes `:` (a port) as `%3A`; nothing else a host holds is encoded.
    let decoded = raw.replace("%3A", ":").replace("%3a", ":");
    Some(canonical_host(&decoded).ok_or(Error::NameUnknown {
        detail: "the ns parameter is not a registry host",
    }))
}

/// The projects that may have `ask`: every one, or for a mirror request those of its registry.
pub fn asked<'s>(snapshot: &'s Snapshot, ask: &Ask, gap_logged: &Cell<bool>) -> Vec<&'s Project> {
    match &ask.registry {
        None => snapshot.projects.iter().collect(),
        Some(host) => candidates(snapshot, host, gap_logged),
    }
}

/// The projects that may serve a request for registry `host`.
pub fn candidates<'s>(
    snapshot: &'s Snapshot,
    host: &str,
    gap_logged: &Cell<bool>,
) -> Vec<&'s Project> {
    let exact: Vec<&Project> = snapshot
        .projects
        .iter()
        .filter(|p| p.registry.as_deref() == Some(host))
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    let unknown: Vec<&Project> = snapshot
        .projects
        .iter()
        .filter(|p| p.registry.is_none())
        .collect();
    if !unknown.is_empty() && !gap_logged.replace(true) {
        let names: Vec<&str> = unknown.iter().map(|p| p.name.as_str()).collect();
        tracing::warn!(registry = host, projects = ?names,
            "no proxy-cache project is known to mirror this registry; asking the projects whose registry could not be read (give the robot permission to read registries to route exactly)");
    }
    unknown
}

/// Whether any project may serve a request for `host` ([`candidates`] would not be empty).
pub fn mirrored(snapshot: &Snapshot, host: &str) -> bool {
    snapshot
        .projects
        .iter()
        .any(|p| p.registry.is_none() || p.registry.as_deref() == Some(host))
}

/// Whether `project` may serve a request for `host` (see [`candidates`]).
pub fn serves(snapshot: &Snapshot, project: &Project, host: &str) -> bool {
    match project.registry.as_deref() {
        Some(h) => h == host,
        None => !snapshot
            .projects
            .iter()
            .any(|p| p.registry.as_deref() == Some(host)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::UpstreamKind;

    fn snapshot(projects: Vec<Project>) -> Snapshot {
        Snapshot {
            projects,
            built_at: std::time::Instant::now(),
            generation: 1,
            harbor: Default::default(),
            provisional: false,
        }
    }

    fn p(name: &str, kind: UpstreamKind, url: Option<&str>) -> Project {
        Project::new(name.into(), 1, 1, kind, url.map(str::to_string))
    }

    #[test]
    fn ns_is_read_decoded_and_checked() {
        assert_eq!(ns_of(None), None);
        assert_eq!(ns_of(Some("n=10&last=a")), None);
        assert_eq!(
            ns_of(Some("ns=docker.io")).unwrap().ok().as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            ns_of(Some("n=1&ns=registry-1.docker.io"))
                .unwrap()
                .ok()
                .as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            ns_of(Some("ns=localhost%3A5000")).unwrap().ok().as_deref(),
            Some("localhost:5000")
        );
        assert!(ns_of(Some("ns=evil%2Fpath")).unwrap().is_err());
        assert!(ns_of(Some("ns=")).unwrap().is_err());
    }

    #[test]
    fn only_the_projects_of_the_named_registry_then_the_unknown_ones() {
        let other = |k: &str| UpstreamKind::Other(k.into());
        let s = snapshot(vec![
            p("dockerhub", UpstreamKind::DockerHub, None),
            p("ghcr", other("github-ghcr"), Some("https://ghcr.io")),
            p("quay", other("quay"), Some("https://quay.io")),
            p("mystery", UpstreamKind::Unknown, None),
        ]);
        let names = |v: Vec<&Project>| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let gap = Cell::new(false);
        assert_eq!(names(candidates(&s, "ghcr.io", &gap)), ["ghcr"]);
        assert_eq!(names(candidates(&s, "docker.io", &gap)), ["dockerhub"]);
        assert!(!gap.get());
        assert_eq!(
            names(candidates(&s, "registry.k8s.io", &gap)),
            ["mystery"],
            "no project known for it: only those whose registry is unknown"
        );
        assert!(gap.get(), "the gap is logged");
        assert!(serves(&s, &s.projects[1], "ghcr.io"));
        assert!(!serves(&s, &s.projects[2], "ghcr.io"));
        assert!(
            !serves(&s, &s.projects[3], "ghcr.io"),
            "ghcr.io has a known project"
        );
        assert!(serves(&s, &s.projects[3], "registry.k8s.io"));
        let known = snapshot(vec![p("quay", other("quay"), Some("https://quay.io"))]);
        assert!(candidates(&known, "ghcr.io", &gap).is_empty());
        assert!(!mirrored(&known, "ghcr.io"));
        assert!(mirrored(&known, "quay.io"));
        assert!(
            mirrored(&s, "registry.k8s.io"),
            "through the unknown project"
        );
    }
}
