//! The key schema in Redis, version 1, and the values' encoding. Every key starts with
//! `<REDIS_KEY_PREFIX>:v1:`; a later schema uses another version segment, so routers of two versions
//! sharing one Redis never read each other's keys. Values are JSON objects with `"v": 1` too: a value
//! of another version, of the wrong shape or naming a project this pod does not know is ignored (and
//! overwritten by the next learn), never trusted into a route.
//!
//! `manifest:` keys were added to version 1 without a new version segment: they are content
//! addressed (a value is used only when its manifest hashes to the digest in its key), a router
//! that does not know them never reads them, and one that does finds them absent for tags another
//! router shared, the state it already copes with. A new version would have stopped pods of the
//! two builds sharing anything during a rollout.
//!
//! | key | type | value | expiry |
//! |---|---|---|---|
//! | `map:<name>` | string | `{"v":1,"project":…,"project_id":…,"at":<unix ms>}` | `CACHE_TTL + STALE_WHILE_REVALIDATE` |
//! | `miss:<sha256 of the miss key>` | string | `{"v":1,"until":<unix ms>,"projects":<fingerprint>,"detail":…}` | `NEGATIVE_CACHE_TTL` |
//! | `recent` | sorted set | names, scored by learning time (unix ms), the newest [`RECENT_MAX`] | refreshed on each write, mapping life |
//! | `tag:<sha256 of the pull key>` | string | `{"v":1,"digest":…,"media_type":…,"length":…,"project":…,"project_id":…,"at":<unix ms>}` | `STALE_IF_ERROR` from `at` |
//! | `manifest:<digest>` | string | `{"v":1,"media_type":…,"manifest":<the manifest, a JSON string>}`, at most [`MAX_MANIFEST_VALUE`] | `STALE_IF_ERROR`, renewed with each `tag:` write naming the digest |
//! | `projects` | string | `{"v":1,"at":<unix ms>,"projects":[…]}` as discovery read them | [`PROJECTS_LIFE`] |
//! | `changes:<REDIS_DB>` | channel | `{"v":1,"name":…,"project":…,"project_id":…,"at":…}` | — |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::{Project, Snapshot, UpstreamKind};

pub const VERSION: u32 = 1;
/// Names kept in the `recent` set, loaded by a starting pod.
pub const RECENT_MAX: usize = 50_000;
/// How long a published project list is kept (a reader also checks its age against its own bound).
pub const PROJECTS_LIFE: Duration = Duration::from_secs(24 * 3600);
/// Largest mapping, miss or change value read; anything larger is not one of ours.
pub const MAX_VALUE: usize = 8 * 1024;
/// Largest project list read (1000 projects with long URLs fit).
pub const MAX_PROJECTS_VALUE: usize = 1 << 20;
/// Largest manifest value read or written: the largest kept manifest
/// ([`crate::cache::MAX_KEPT_MANIFEST`]) in a JSON string, where escaping can make it grow.
pub const MAX_MANIFEST_VALUE: usize = 160 * 1024;
/// Largest registry error body passed on from a shared miss (as for a fan-out's own).
pub const MAX_DETAIL: usize = 4 * 1024;
/// How far in the future a stored time may be (clocks of pods differ a little); beyond, the value
/// is refused.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Whether unix time `at` (ms) is not later than `now` plus the allowed skew.
pub fn not_future(at: u64, now: u64) -> bool {
    at <= now + CLOCK_SKEW.as_millis() as u64
}

/// Identifies a project list by its projects' names and ids (FNV-1a, stable across builds): a miss
/// is used only by a pod that knows the same projects as the pod that found it.
pub fn fingerprint(projects: &[Project]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in projects {
        for b in p.name.bytes().chain([0]).chain(p.id.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    base: String,
    db: u32,
}

impl Keys {
    pub fn new(prefix: &str, db: u32) -> Keys {
        Keys {
            base: format!("{prefix}:v{VERSION}:"),
            db,
        }
    }

    pub fn mapping(&self, name: &str) -> String {
        format!("{}map:{name}", self.base)
    }

    /// Miss keys hold the client's Accept set: hashed, so a key's size is bounded whatever it asks.
    pub fn miss(&self, key: &str) -> String {
        self.hashed("miss:", key)
    }

    /// A last-known-good tag, by its pull key (name, tag, Accept set, registry): hashed as misses are.
    pub fn tag(&self, key: &str) -> String {
        self.hashed("tag:", key)
    }

    /// A manifest kept with last-known-good tags, by its digest (a valid digest: bounded).
    pub fn manifest(&self, digest: &str) -> String {
        format!("{}manifest:{digest}", self.base)
    }

    fn hashed(&self, kind: &str, key: &str) -> String {
        use std::fmt::Write;
        let digest = Sha256::digest(key.as_bytes());
        let mut out = format!("{}{kind}", self.base);
        for b in digest {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    pub fn recent(&self) -> String {
        format!("{}recent", self.base)
    }

    pub fn projects(&self) -> String {
        format!("{}projects", self.base)
    }

    /// Pub/sub ignores the database number: the channel names it, so environments that share one
    /// Redis through `REDIS_DB` do not hear each other's moves.
    pub fn changes(&self) -> String {
        format!("{}changes:{}", self.base, self.db)
    }
}

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether `snapshot` has project `name` with id `id` (a stored value naming a project this pod
/// does not know, or the same name with another id, is not used).
fn known_project(snapshot: &Snapshot, name: &str, id: i64) -> bool {
    snapshot.project(name).is_some_and(|p| p.id == id)
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

    /// Reads a stored value; `None` for anything but a version-1 mapping learned no later than
    /// `now` (unix ms, give or take [`CLOCK_SKEW`]).
    pub fn decode(raw: &[u8], now: u64) -> Option<StoredMapping> {
        if raw.len() > MAX_VALUE {
            return None;
        }
        let m: StoredMapping = serde_json::from_slice(raw).ok()?;
        (m.v == VERSION && not_future(m.at, now)).then_some(m)
    }

    /// Usable in `snapshot`: the project is there under the same name and id.
    pub fn valid_in(&self, snapshot: &Snapshot) -> bool {
        known_project(snapshot, &self.project, self.project_id)
    }
}

/// A last-known-good tag as stored: what the tag resolved to, in which project, confirmed when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTag {
    pub v: u32,
    pub digest: String,
    pub media_type: String,
    pub length: u64,
    pub project: String,
    pub project_id: i64,
    pub at: u64,
}

/// Longest media type believed from a stored tag or manifest.
const MAX_MEDIA_TYPE: usize = 255;

/// A plain `type/subtype` media type, short enough.
fn media_type_ok(media_type: &str) -> bool {
    media_type.len() <= MAX_MEDIA_TYPE
        && media_type.split_once('/').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && media_type
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"/.+-_".contains(&c))
        })
}

impl StoredTag {
    /// Reads a stored tag; `None` for anything but a version-1 tag confirmed no later than `now`,
    /// whose digest is a digest, whose media type is a plain `type/subtype` and whose length a
    /// manifest may have.
    pub fn decode(raw: &[u8], now: u64) -> Option<StoredTag> {
        if raw.len() > MAX_VALUE {
            return None;
        }
        let t: StoredTag = serde_json::from_slice(raw).ok()?;
        let ok = t.v == VERSION
            && not_future(t.at, now)
            && crate::names::valid_digest(&t.digest).is_ok()
            && media_type_ok(&t.media_type)
            && t.length <= crate::names::MAX_MANIFEST_BYTES;
        ok.then_some(t)
    }

    /// Usable in `snapshot`: the project is there under the same name and id.
    pub fn valid_in(&self, snapshot: &Snapshot) -> bool {
        known_project(snapshot, &self.project, self.project_id)
    }
}

/// A manifest a last-known-good tag resolved to, as stored under its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredManifest {
    pub v: u32,
    pub media_type: String,
    pub manifest: String,
}

impl StoredManifest {
    /// The value for `manifest` (of `media_type`), if it can be one: UTF-8 (manifests are JSON),
    /// no larger than a kept manifest, and encoded within [`MAX_MANIFEST_VALUE`].
    pub fn encode(media_type: &str, manifest: &[u8]) -> Option<String> {
        if manifest.len() > crate::cache::MAX_KEPT_MANIFEST || !media_type_ok(media_type) {
            return None;
        }
        let stored = StoredManifest {
            v: VERSION,
            media_type: media_type.to_string(),
            manifest: std::str::from_utf8(manifest).ok()?.to_string(),
        };
        let value = serde_json::to_string(&stored).ok()?;
        (value.len() <= MAX_MANIFEST_VALUE).then_some(value)
    }

    /// Reads the value stored under `digest`; `None` for anything but a version-1 manifest of a
    /// plain media type that hashes to `digest` (a value that lies about its key is never served).
    pub fn decode(raw: &[u8], digest: &str) -> Option<StoredManifest> {
        if raw.len() > MAX_MANIFEST_VALUE {
            return None;
        }
        let m: StoredManifest = serde_json::from_slice(raw).ok()?;
        let ok = m.v == VERSION
            && media_type_ok(&m.media_type)
            && m.manifest.len() <= crate::cache::MAX_KEPT_MANIFEST
            && hashes_to(m.manifest.as_bytes(), digest);
        ok.then_some(m)
    }
}

/// Whether `content` hashes to `digest` (`sha256:`, `sha384:` or `sha512:` and lowercase hex).
fn hashes_to(content: &[u8], digest: &str) -> bool {
    fn hex(d: &[u8]) -> String {
        use std::fmt::Write;
        d.iter()
            .fold(String::with_capacity(d.len() * 2), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    }
    let Some((algorithm, want)) = digest.split_once(':') else {
        return false;
    };
    let got = match algorithm {
        "sha256" => hex(&Sha256::digest(content)),
        "sha384" => hex(&sha2::Sha384::digest(content)),
        "sha512" => hex(&sha2::Sha512::digest(content)),
        _ => return false,
    };
    got == want
}

/// A remembered miss as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMiss {
    pub v: u32,
    pub until: u64,
    /// The [`fingerprint`] of the project list the fan-out asked.
    pub projects: u64,
    /// The registry's own error body when the projects agreed on one that says more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl StoredMiss {
    /// Reads a stored miss; `None` for anything but a version-1 miss. A detail that is not a
    /// registry error body of at most [`MAX_DETAIL`] bytes is dropped (the router's own 404 is
    /// answered instead).
    pub fn decode(raw: &[u8]) -> Option<StoredMiss> {
        if raw.len() > MAX_VALUE {
            return None;
        }
        let mut m: StoredMiss = serde_json::from_slice(raw).ok()?;
        if m.detail.as_deref().is_some_and(|d| !registry_error(d)) {
            m.detail = None;
        }
        (m.v == VERSION).then_some(m)
    }
}

/// `{"errors":[{"code":"…",…},…]}` with at least one error, at most [`MAX_DETAIL`] bytes.
fn registry_error(body: &str) -> bool {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Code>,
    }
    #[derive(Deserialize)]
    struct Code {
        #[allow(dead_code)]
        code: String,
    }
    body.len() <= MAX_DETAIL
        && serde_json::from_str::<Errors>(body).is_ok_and(|e| !e.errors.is_empty())
}

/// A mapping's key: a repository name, or `<registry> <name>` for a mirror request's mapping.
pub fn valid_mapping_key(key: &str) -> bool {
    match key.split_once(' ') {
        Some((host, name)) => {
            crate::snapshot::canonical_host(host).as_deref() == Some(host)
                && crate::names::valid_name(name).is_ok()
        }
        None => crate::names::valid_name(key).is_ok(),
    }
}

/// A change of mapping, published on `changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChange {
    pub v: u32,
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
    pub fn new(name: &str, m: &StoredMapping) -> StoredChange {
        StoredChange {
            v: VERSION,
            name: name.to_string(),
            mapping: StoredMappingFields {
                project: m.project.clone(),
                project_id: m.project_id,
                at: m.at,
            },
        }
    }

    pub fn decode(raw: &[u8], now: u64) -> Option<StoredChange> {
        if raw.len() > MAX_VALUE {
            return None;
        }
        let c: StoredChange = serde_json::from_slice(raw).ok()?;
        (c.v == VERSION && valid_mapping_key(&c.name) && not_future(c.mapping.at, now)).then_some(c)
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

    /// Reads a stored list; `None` for another version, the wrong shape, an empty list, a project
    /// whose name is not a project name, or a list read later than `now` (unix ms, give or take
    /// [`CLOCK_SKEW`]).
    pub fn decode(raw: &[u8], max_projects: usize, now: u64) -> Option<StoredProjects> {
        if raw.len() > MAX_PROJECTS_VALUE {
            return None;
        }
        let l: StoredProjects = serde_json::from_slice(raw).ok()?;
        if !not_future(l.at, now) {
            return None;
        }
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
            .map(|p| {
                let kind = match p.kind.as_deref() {
                    Some("docker-hub") => UpstreamKind::DockerHub,
                    Some(k) => UpstreamKind::Other(k.to_string()),
                    None => UpstreamKind::Unknown,
                };
                Project::new(p.name.clone(), p.id, p.registry_id, kind, p.url.clone())
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
        Project::new(
            name.into(),
            id,
            id,
            UpstreamKind::DockerHub,
            Some("https://hub.docker.com".into()),
        )
    }

    #[test]
    fn a_manifest_is_used_only_under_its_own_digest() {
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
        let digest = format!("sha256:{:x}", Sha256::digest(manifest));
        let media_type = "application/vnd.oci.image.manifest.v1+json";
        let value = StoredManifest::encode(media_type, manifest).unwrap();
        let back = StoredManifest::decode(value.as_bytes(), &digest).unwrap();
        assert_eq!(back.manifest.as_bytes(), manifest, "byte for byte");
        assert_eq!(back.media_type, media_type);
        let other = format!("sha256:{:x}", Sha256::digest(b"other"));
        assert_eq!(StoredManifest::decode(value.as_bytes(), &other), None);
        let sha512 = format!("sha512:{:x}", sha2::Sha512::digest(manifest));
        assert!(StoredManifest::decode(value.as_bytes(), &sha512).is_some());
        assert_eq!(StoredManifest::decode(value.as_bytes(), "md5:00"), None);
        // Another version, a bad media type, a manifest too large to keep, not UTF-8: refused.
        let v2 = value.replace(r#""v":1"#, r#""v":2"#);
        assert_eq!(StoredManifest::decode(v2.as_bytes(), &digest), None);
        assert_eq!(StoredManifest::encode("text plain", manifest), None);
        let big = vec![b' '; crate::cache::MAX_KEPT_MANIFEST + 1];
        assert_eq!(StoredManifest::encode(media_type, &big), None);
        assert_eq!(StoredManifest::encode(media_type, b"\xff\xfe"), None);
        // The largest kept manifest, escaped at its worst, still fits a value.
        let worst = vec![b'"'; crate::cache::MAX_KEPT_MANIFEST];
        assert!(StoredManifest::encode(media_type, &worst).is_some());
    }

    #[test]
    fn keys_are_versioned_and_bounded() {
        let k = Keys::new("hr", 3);
        assert_eq!(
            k.changes(),
            "hr:v1:changes:3",
            "pub/sub ignores the db: the channel names it"
        );
        assert_eq!(k.mapping("library/nginx"), "hr:v1:map:library/nginx");
        assert_eq!(k.projects(), "hr:v1:projects");
        let long = "m ".to_string() + &"a,".repeat(5000);
        assert_eq!(k.miss(&long).len(), "hr:v1:miss:".len() + 64);
        assert_ne!(k.miss("a"), k.miss("b"));
        assert_eq!(k.tag(&long).len(), "hr:v1:tag:".len() + 64);
        assert_ne!(k.tag("a"), k.miss("a"), "tags and misses never share a key");
        assert_eq!(k.manifest("sha256:ab"), "hr:v1:manifest:sha256:ab");
    }

    #[test]
    fn tags_round_trip_and_reject_what_they_cannot_trust() {
        let snap = Snapshot {
            projects: vec![project("dockerhub", 1)],
            built_at: Instant::now(),
            generation: 1,
            harbor: Default::default(),
            provisional: false,
        };
        let digest = format!("sha256:{}", "a".repeat(64));
        let t = StoredTag {
            v: VERSION,
            digest: digest.clone(),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            length: 1234,
            project: "dockerhub".into(),
            project_id: 1,
            at: 100_000,
        };
        let raw = serde_json::to_vec(&t).unwrap();
        assert_eq!(StoredTag::decode(&raw, 100_000), Some(t.clone()));
        assert!(t.valid_in(&snap));
        assert_eq!(StoredTag::decode(&raw, 0), None, "confirmed in the future");
        let bad = [
            StoredTag {
                digest: "sha256:short".into(),
                ..t.clone()
            },
            StoredTag {
                media_type: "text/html\r\nSet-Cookie: a=b".into(),
                ..t.clone()
            },
            StoredTag {
                media_type: "nonsense".into(),
                ..t.clone()
            },
            StoredTag {
                length: 1 << 40,
                ..t.clone()
            },
            StoredTag { v: 2, ..t.clone() },
        ];
        for b in bad {
            let raw = serde_json::to_vec(&b).unwrap();
            assert_eq!(StoredTag::decode(&raw, 100_000), None, "{b:?}");
        }
        assert_eq!(StoredTag::decode(b"garbage", 100_000), None);
        assert!(!StoredTag {
            project_id: 9,
            ..t.clone()
        }
        .valid_in(&snap));
    }

    #[test]
    fn mappings_round_trip_and_reject_what_they_cannot_trust() {
        let snap = Snapshot {
            projects: vec![project("dockerhub", 1), project("ghcr", 2)],
            built_at: Instant::now(),
            generation: 1,
            harbor: Default::default(),
            provisional: false,
        };
        let m = StoredMapping::new(&snap.projects[0], 100_000);
        let raw = serde_json::to_vec(&m).unwrap();
        let back = StoredMapping::decode(&raw, 100_000).unwrap();
        assert_eq!(
            StoredMapping::decode(&raw, 0),
            None,
            "learned in the future (beyond the skew)"
        );
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
                StoredMapping::decode(g, u64::MAX / 2),
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
        let unknown = Project::new("quay".into(), 3, 3, UpstreamKind::Unknown, None);
        let projects = vec![project("dockerhub", 1), unknown];
        let raw = serde_json::to_vec(&StoredProjects::new(&projects, 100_000)).unwrap();
        let back = StoredProjects::decode(&raw, 50, 100_000).unwrap();
        assert_eq!(
            StoredProjects::decode(&raw, 50, 0),
            None,
            "read in the future"
        );
        assert_eq!(back.at, 100_000);
        assert_eq!(back.projects(), projects);
        assert_eq!(
            StoredProjects::decode(&raw, 1, 100_000),
            None,
            "longer than the cut"
        );
        for bad in [
            br#"{"v":1,"at":1,"projects":[]}"#.as_slice(),
            br#"{"v":3,"at":1,"projects":[{"name":"a","id":1,"registry_id":1}]}"#,
            br#"{"v":1,"at":1,"projects":[{"name":"A B","id":1,"registry_id":1}]}"#,
            br#"{"v":1,"at":1,"projects":[{"name":"a","id":1,"registry_id":0}]}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(StoredProjects::decode(bad, 50, 99), None);
        }
    }

    #[test]
    fn fingerprints_follow_names_and_ids() {
        let a = [project("dockerhub", 1), project("ghcr", 2)];
        let b = [project("dockerhub", 1), project("ghcr", 3)];
        let c = [project("dockerhub", 1)];
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }

    #[test]
    fn changes_round_trip() {
        let m = StoredMapping::new(&project("ghcr", 2), 5);
        let c = StoredChange::new("org/app", &m);
        let raw = serde_json::to_vec(&c).unwrap();
        let back = StoredChange::decode(&raw, 5).unwrap();
        assert_eq!(back.mapping(), m);
        let mirror = StoredChange::new("ghcr.io org/app", &m);
        assert!(StoredChange::decode(&serde_json::to_vec(&mirror).unwrap(), 5).is_some());
        for bad in ["../Bad", "GHCR.io org/app", "ghcr.io Bad", "a b c"] {
            assert!(!valid_mapping_key(bad), "{bad}");
        }
        let bad_name = StoredChange::new("../Bad", &m);
        assert_eq!(
            StoredChange::decode(&serde_json::to_vec(&bad_name).unwrap(), 5),
            None
        );
        let ok = br#"{"v":1,"until":5,"projects":7}"#;
        assert_eq!(StoredMiss::decode(ok).unwrap().projects, 7);
        let told = br#"{"v":1,"until":5,"projects":7,"detail":"{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\"}]}"}"#;
        assert!(StoredMiss::decode(told).unwrap().detail.is_some());
        let evil = br#"{"v":1,"until":5,"projects":7,"detail":"<html>buy now</html>"}"#;
        assert_eq!(
            StoredMiss::decode(evil).unwrap().detail,
            None,
            "not a registry error"
        );
        let huge = format!(
            r#"{{"v":1,"until":5,"projects":7,"detail":"{{\"errors\":[{{\"code\":\"{}\"}}]}}"}}"#,
            "X".repeat(5000)
        );
        assert_eq!(
            StoredMiss::decode(huge.as_bytes()).unwrap().detail,
            None,
            "too long"
        );
        assert!(StoredMiss::decode(br#"{"v":0,"until":5,"projects":7}"#).is_none());
        assert!(
            StoredMiss::decode(br#"{"v":1,"until":5}"#).is_none(),
            "no fingerprint"
        );
    }
}
