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
}

/// Every proxy-cache project the router may route to, sorted by name and cut at
/// `MAX_FANOUT_PROJECTS`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub projects: Vec<Project>,
    /// When the discovery that produced this snapshot finished.
    pub built_at: Instant,
    /// Counts published snapshots, starting at 1; 0 is a provisional list loaded from Redis at
    /// start, used until discovery completes.
    pub generation: u64,
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
