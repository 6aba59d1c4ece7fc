//! The key schema in Redis, version 1, and the values' encoding. Every key starts with
//! `<REDIS_KEY_PREFIX>:v1:`; a later schema uses another version segment, so routers of two versions
//! sharing one Redis never read each other's keys. Values are JSON objects with `"v": 1` too: a value
//! of another version, of the wrong shape or naming a project this pod does not know is ignored (and
//! overwritten by the next learn), never trusted into a route.
//!
//! | key | type | value | expiry |
//! |---|---|---|---|
//! | `map:<name>` | string | `{"v":1,"project":…,"project_id":…,"at":<unix ms>}` | `CACHE_TTL + STALE_WHILE_REVALIDATE` |
//! | `miss:<sha256 of the miss key>` | string | `{"v":1,"until":<unix ms>,"detail":…}` | `NEGATIVE_CACHE_TTL` |
//! | `recent` | sorted set | names, scored by learning time (unix ms), the newest [`RECENT_MAX`] | refreshed on each write, mapping life |
//! | `projects` | string | `{"v":1,"at":<unix ms>,"projects":[…]}` as discovery read them | [`PROJECTS_LIFE`] |
//! | `changes` | channel | `{"v":1,"origin":…,"name":…,"project":…,"project_id":…,"at":…}` | — |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::{Project, Snapshot, UpstreamKind};

pub const VERSION: u32 = 1;
/// Names kept in the `recent` set, loaded by a starting pod.
pub const RECENT_MAX: usize = 50_000;
/// How long a published project list is kept (a reader also checks its age against its own bound).
pub const PROJECTS_LIFE: Duration = Duration::from_secs(24 * 3600);

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    base: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            base: format!("{prefix}:v{VERSION}:"),
        }
    }

    pub fn mapping(&self, name: &str) -> String {
        format!("{}map:{name}", self.base)
    }

    /// Miss keys hold the client's Accept set: hashed, so a key's size is bounded whatever it asks.
    pub fn miss(&self, key: &str) -> String {
        let digest = Sha256::digest(key.as_bytes());
        let mut out = format!("{}miss:", self.base);
        for b in digest {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    pub fn recent(&self) -> String {
        format!("{}recent", self.base)
    }

    pub fn projects(&self) -> String {
        format!("{}projects", self.base)
    }

    pub fn changes(&self) -> String {
        format!("{}changes", self.base)
    }
}

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A mapping as stored: the project's name and id as discovery knows them, and when it was learned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMapping {
    pub v: u32,
    pub project: String,
    pub project_id: i64,
    pub at: u64,
}

impl StoredMapping {
    pub fn new(project: &Project, at: u64) -> StoredMapping {
        StoredMapping {
            v: VERSION,
            project: project.name.clone(),
            project_id: project.id,
            at,
        }
    }

    /// Reads a stored value; `None` for anything but a version-1 mapping.
    pub fn decode(raw: &[u8]) -> Option<StoredMapping> {
        let m: StoredMapping = serde_json::from_slice(raw).ok()?;
        (m.v == VERSION).then_some(m)
    }

    /// Usable in `snapshot`: the project is there under the same name and id.
    pub fn valid_in(&self, snapshot: &Snapshot) -> bool {
        snapshot
            .project(&self.project)
            .is_some_and(|p| p.id == self.project_id)
    }
}

/// A remembered miss as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMiss {
    pub v: u32,
    pub until: u64,
    /// The registry's own error body when the projects agreed on one that says more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl StoredMiss {
    pub fn decode(raw: &[u8]) -> Option<StoredMiss> {
        let m: StoredMiss = serde_json::from_slice(raw).ok()?;
        (m.v == VERSION).then_some(m)
    }
}

/// A change of mapping, published on `changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChange {
    pub v: u32,
    /// The publishing process, so it ignores its own messages.
    pub origin: u64,
    pub name: String,
    #[serde(flatten)]
    pub mapping: StoredMappingFields,
}

/// The mapping inside a change (its own `v` is the message's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMappingFields {
    pub project: String,
    pub project_id: i64,
    pub at: u64,
}

impl StoredChange {
    pub fn new(origin: u64, name: &str, m: &StoredMapping) -> StoredChange {
        StoredChange {
            v: VERSION,
            origin,
            name: name.to_string(),
            mapping: StoredMappingFields {
                project: m.project.clone(),
                project_id: m.project_id,
                at: m.at,
            },
        }
    }

    pub fn decode(raw: &[u8]) -> Option<StoredChange> {
        let c: StoredChange = serde_json::from_slice(raw).ok()?;
        (c.v == VERSION && crate::names::valid_name(&c.name).is_ok()).then_some(c)
    }

    pub fn mapping(&self) -> StoredMapping {
        StoredMapping {
            v: VERSION,
            project: self.mapping.project.clone(),
            project_id: self.mapping.project_id,
            at: self.mapping.at,
        }
    }
}

/// The project list as discovery read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProjects {
    pub v: u32,
    pub at: u64,
    pub projects: Vec<StoredProject>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProject {
    pub name: String,
    pub id: i64,
    pub registry_id: i64,
    /// Harbor's registry type; absent when the registry could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl StoredProjects {
    pub fn new(projects: &[Project], at: u64) -> StoredProjects {
        StoredProjects {
            v: VERSION,
            at,
            projects: projects
                .iter()
                .map(|p| StoredProject {
                    name: p.name.clone(),
                    id: p.id,
                    registry_id: p.registry_id,
                    kind: match &p.kind {
                        UpstreamKind::DockerHub => Some("docker-hub".into()),
                        UpstreamKind::Other(k) => Some(k.clone()),
                        UpstreamKind::Unknown => None,
                    },
                    url: p.upstream_url.clone(),
                })
                .collect(),
        }
    }

    /// Reads a stored list; `None` for another version, the wrong shape, an empty list, or a project
    /// whose name is not a project name.
    pub fn decode(raw: &[u8], max_projects: usize) -> Option<StoredProjects> {
        let l: StoredProjects = serde_json::from_slice(raw).ok()?;
        let names_ok = l
            .projects
            .iter()
            .all(|p| crate::names::is_name_component(&p.name) && p.registry_id > 0);
        (l.v == VERSION && names_ok && !l.projects.is_empty() && l.projects.len() <= max_projects)
            .then_some(l)
    }

    /// The projects, sorted by name as discovery sorts them.
    pub fn projects(&self) -> Vec<Project> {
        let mut out: Vec<Project> = self
            .projects
            .iter()
            .map(|p| Project {
                name: p.name.clone(),
                id: p.id,
                registry_id: p.registry_id,
                kind: match p.kind.as_deref() {
                    Some("docker-hub") => UpstreamKind::DockerHub,
                    Some(k) => UpstreamKind::Other(k.to_string()),
                    None => UpstreamKind::Unknown,
                },
                upstream_url: p.url.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn project(name: &str, id: i64) -> Project {
        Project {
            name: name.into(),
            id,
            registry_id: id,
            kind: UpstreamKind::DockerHub,
            upstream_url: Some("https://hub.docker.com".into()),
        }
    }

    #[test]
    fn keys_are_versioned_and_bounded() {
        let k = Keys::new("hr");
        assert_eq!(k.mapping("library/nginx"), "hr:v1:map:library/nginx");
        assert_eq!(k.projects(), "hr:v1:projects");
        let long = "m ".to_string() + &"a,".repeat(5000);
        assert_eq!(k.miss(&long).len(), "hr:v1:miss:".len() + 64);
        assert_ne!(k.miss("a"), k.miss("b"));
    }

    #[test]
    fn mappings_round_trip_and_reject_what_they_cannot_trust() {
        let snap = Snapshot {
            projects: vec![project("dockerhub", 1), project("ghcr", 2)],
            built_at: Instant::now(),
            generation: 1,
        };
        let m = StoredMapping::new(&snap.projects[0], 1234);
        let raw = serde_json::to_vec(&m).unwrap();
        let back = StoredMapping::decode(&raw).unwrap();
        assert_eq!(back, m);
        assert!(back.valid_in(&snap));
        let garbage: [&[u8]; 6] = [
            b"not json",
            b"42",
            br#"{"v":2,"project":"dockerhub","project_id":1,"at":1}"#,
            br#"{"v":1,"project":7,"project_id":1,"at":1}"#,
            br#"{"v":1,"project":"dockerhub"}"#,
            b"",
        ];
        for g in garbage {
            assert_eq!(
                StoredMapping::decode(g),
                None,
                "{:?}",
                String::from_utf8_lossy(g)
            );
        }
        let unknown = StoredMapping {
            project: "elsewhere".into(),
            ..m.clone()
        };
        assert!(!unknown.valid_in(&snap), "a project this pod does not know");
        let other_id = StoredMapping {
            project_id: 9,
            ..m.clone()
        };
        assert!(!other_id.valid_in(&snap), "same name, another project");
    }

    #[test]
    fn project_lists_round_trip_and_bad_ones_are_refused() {
        let mut unknown = project("quay", 3);
        unknown.kind = UpstreamKind::Unknown;
        unknown.upstream_url = None;
        let projects = vec![project("dockerhub", 1), unknown];
        let raw = serde_json::to_vec(&StoredProjects::new(&projects, 99)).unwrap();
        let back = StoredProjects::decode(&raw, 50).unwrap();
        assert_eq!(back.at, 99);
        assert_eq!(back.projects(), projects);
        assert_eq!(StoredProjects::decode(&raw, 1), None, "longer than the cut");
        for bad in [
            br#"{"v":1,"at":1,"projects":[]}"#.as_slice(),
            br#"{"v":3,"at":1,"projects":[{"name":"a","id":1,"registry_id":1}]}"#,
            br#"{"v":1,"at":1,"projects":[{"name":"A B","id":1,"registry_id":1}]}"#,
            br#"{"v":1,"at":1,"projects":[{"name":"a","id":1,"registry_id":0}]}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(StoredProjects::decode(bad, 50), None);
        }
    }

    #[test]
    fn changes_round_trip() {
        let m = StoredMapping::new(&project("ghcr", 2), 5);
        let c = StoredChange::new(77, "org/app", &m);
        let raw = serde_json::to_vec(&c).unwrap();
        let back = StoredChange::decode(&raw).unwrap();
        assert_eq!(back.origin, 77);
        assert_eq!(back.mapping(), m);
        let bad_name = StoredChange::new(77, "../Bad", &m);
        assert_eq!(
            StoredChange::decode(&serde_json::to_vec(&bad_name).unwrap()),
            None
        );
        let misses: [&[u8]; 3] = [
            br#"{"v":1,"until":5}"#,
            br#"{"v":1,"until":5,"detail":"x"}"#,
            br#"{"v":0,"until":5}"#,
        ];
        assert!(StoredMiss::decode(misses[0]).is_some());
        assert_eq!(
            StoredMiss::decode(misses[1]).unwrap().detail.as_deref(),
            Some("x")
        );
        assert!(StoredMiss::decode(misses[2]).is_none());
    }
}
