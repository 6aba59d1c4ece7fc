//! `/healthz` and `/readyz`: one decision, answered on both ports (the registry port by whichever
//! core takes the connection, `METRICS_ADDR` by the metrics thread, whose slots no client of the
//! registry port can take: a probe there is never refused for `MAX_CONNECTIONS`).
//!
//! - **Liveness** (`/healthz`) is the data plane's: 200 unless a worker has not beaten its
//!   heartbeat for `server::Heartbeat`'s limit (a core stuck in a system call or a loop), then 503
//!   naming the stuck workers. It does not depend on Harbor: restarting a pod because Harbor is
//!   down would only lose its caches.
//! - **Readiness** (`/readyz`) is 200 while the router has a project list with at least one
//!   project (one loaded from Redis at start counts: `"provisional": true`) and no worker is stuck.
//!   The list's age is not a condition: a Harbor API outage keeps every pod's last good list, and
//!   an age condition would empty the Service at once on every pod, defeating last-known-good tags.
//!   The age is reported (`snapshot_age_seconds`, the metric `harbor_router_project_list_age_seconds`
//!   and its alert) instead.
//!
//! Redis's state, Harbor's version and a refusal of the router's credentials are shown, never
//! conditions.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Metrics;
use crate::snapshot::Snapshot;

/// Which question a probe asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: should the pod be restarted?
    Liveness,
    /// `/readyz`: should the pod get traffic?
    Readiness,
}

impl Probe {
    /// The probe a path asks, if it is one.
    pub fn of_path(path: &str) -> Option<Probe> {
        match path {
            "/healthz" => Some(Probe::Liveness),
            "/readyz" => Some(Probe::Readiness),
            _ => None,
        }
    }
}

/// What a health answer is made of, gathered by the port that answers.
pub struct Facts<'a> {
    /// The project list, with its age.
    pub list: Option<(&'a Snapshot, Duration)>,
    /// Workers whose heartbeat stopped.
    pub stuck: &'a [usize],
    /// Redis's state, when Redis is configured.
    pub redis: Option<&'static str>,
}

/// The answer: whether the probe passes, and the JSON body that says why.
pub fn decide(probe: Probe, facts: &Facts) -> (bool, Value) {
    let list_reason = match facts.list {
        None => Some("no proxy-cache project discovered yet"),
        Some((s, _)) if s.projects.is_empty() => Some(if s.harbor.refused_user.is_some() {
            "Harbor does not accept the router's credentials (HARBOR_USERNAME, HARBOR_PASSWORD)"
        } else {
            "Harbor lists no proxy-cache project the robot can see"
        }),
        Some(_) => None,
    };
    let stuck_reason = (!facts.stuck.is_empty())
        .then_some("a data-plane worker stopped beating its heartbeat (a core is stuck)");
    let ready = list_reason.is_none() && stuck_reason.is_none();
    let ok = match probe {
        Probe::Liveness => stuck_reason.is_none(),
        Probe::Readiness => ready,
    };
    let mut body = json!({ "status": if ok { "ok" } else { "unavailable" } });
    let reason = match probe {
        Probe::Liveness => stuck_reason,
        Probe::Readiness => stuck_reason.or(list_reason),
    };
    if let Some(r) = reason {
        body["reason"] = r.into();
    }
    if probe == Probe::Liveness {
        // What readiness would say, for a person reading the liveness answer.
        body["ready"] = ready.into();
        if let (true, Some(r)) = (stuck_reason.is_none(), list_reason) {
            body["not_ready"] = r.into();
        }
    }
    if !facts.stuck.is_empty() {
        body["stuck_workers"] = facts.stuck.into();
    }
    if let Some((s, age)) = facts.list {
        body["projects"] = s.projects.len().into();
        if !s.projects.is_empty() {
            body["snapshot_age_seconds"] = age.as_secs().into();
        }
        if s.provisional {
            // Loaded from Redis at start; discovery has not completed yet.
            body["provisional"] = true.into();
        }
        if let Some(v) = &s.harbor.version {
            body["harbor_version"] = v.as_str().into();
        }
        if s.harbor.refused_user.is_some() {
            // The user is named in the log, not to anyone who can reach the listener.
            body["harbor_credentials"] = "refused".into();
        }
    }
    if let Some(redis) = facts.redis {
        body["redis"] = redis.into();
    }
    (ok, body)
}

impl Metrics {
    /// The workers whose heartbeat is older than the limit at `now` (none before every worker is
    /// registered). Lock-free: atomic loads of what each worker stores once a second.
    pub fn stuck_workers(&self, now: Instant) -> Vec<usize> {
        self.heartbeats
            .get()
            .map(|all| {
                all.iter()
                    .filter(|(_, s)| s.heartbeat.stuck(now))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The answer to `probe` from the process's own state (the metrics port's).
    pub fn health(&self, probe: Probe) -> (bool, Value) {
        let now = Instant::now();
        let list = self.snapshot.load_full();
        let stuck = self.stuck_workers(now);
        let facts = Facts {
            list: list.as_deref().map(|s| (s, s.age(now))),
            stuck: &stuck,
            redis: self.redis.as_ref().map(|r| r.status().as_str()),
        };
        decide(probe, &facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{HarborInfo, Project, UpstreamKind};

    fn list(projects: usize, provisional: bool) -> Snapshot {
        Snapshot {
            projects: (0..projects)
                .map(|i| {
                    Project::new(
                        format!("p{i}"),
                        i as i64,
                        i as i64,
                        UpstreamKind::DockerHub,
                        None,
                    )
                })
                .collect(),
            built_at: Instant::now(),
            generation: 1,
            harbor: HarborInfo::default(),
            provisional,
        }
    }

    fn ask(probe: Probe, list: Option<&Snapshot>, age: u64, stuck: &[usize]) -> (bool, Value) {
        decide(
            probe,
            &Facts {
                list: list.map(|s| (s, Duration::from_secs(age))),
                stuck,
                redis: Some("down"),
            },
        )
    }

    #[test]
    fn a_pod_with_a_project_list_stays_ready_however_old_the_list() {
        let l = list(3, false);
        let (ok, body) = ask(Probe::Readiness, Some(&l), 86_400, &[]);
        assert!(ok, "{body}");
        assert_eq!(body["snapshot_age_seconds"], 86_400);
        assert_eq!(body["projects"], 3);
        assert_eq!(body["redis"], "down", "shown, not a condition");
        let p = list(2, true);
        let (ok, body) = ask(Probe::Readiness, Some(&p), 5, &[]);
        assert!(ok, "a list from Redis counts: {body}");
        assert_eq!(body["provisional"], true);
    }

    #[test]
    fn without_projects_the_pod_is_alive_but_not_ready() {
        for l in [None, Some(list(0, false))] {
            let (ready, body) = ask(Probe::Readiness, l.as_ref(), 0, &[]);
            assert!(!ready, "{body}");
            assert_eq!(body["status"], "unavailable");
            assert!(body["reason"]
                .as_str()
                .unwrap()
                .contains("proxy-cache project"));
            let (alive, body) = ask(Probe::Liveness, l.as_ref(), 0, &[]);
            assert!(alive, "liveness does not depend on Harbor: {body}");
            assert_eq!(body["ready"], false);
            assert!(body["not_ready"].as_str().is_some(), "{body}");
        }
    }

    #[test]
    fn a_stuck_worker_fails_both_probes_and_is_named() {
        let l = list(3, false);
        for probe in [Probe::Liveness, Probe::Readiness] {
            let (ok, body) = ask(probe, Some(&l), 0, &[1]);
            assert!(!ok, "{body}");
            assert_eq!(body["stuck_workers"], json!([1]));
            assert!(body["reason"].as_str().unwrap().contains("stuck"), "{body}");
        }
        let (alive, _) = ask(Probe::Liveness, Some(&l), 0, &[]);
        assert!(alive);
    }

    #[test]
    fn the_paths_are_the_probes() {
        assert_eq!(Probe::of_path("/healthz"), Some(Probe::Liveness));
        assert_eq!(Probe::of_path("/readyz"), Some(Probe::Readiness));
        assert_eq!(Probe::of_path("/metrics"), None);
    }
}
