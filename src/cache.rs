//! What a core remembers between requests, with expiry instants stored in the values and `now` passed
//! in (quick_cache has no per-entry TTL):
//! - **mappings** `name → project`, fresh for `CACHE_TTL`, then served stale (and refreshed in the
//!   background) for `STALE_WHILE_REVALIDATE`, then gone;
//! - **misses** `name:reference → not in any project`, for `NEGATIVE_CACHE_TTL`;
//! - **manifests by digest**, immutable content, within a byte budget and for at most
//!   `MANIFEST_CACHE_TTL` (so Harbor keeps seeing pulls of hot images; see docs/architecture.md);
//! - **tag lists**, for `CACHE_TTL`.
//!
//! [`RouteCache`] is one core's shard (`!Send`, no lock). [`LearnedMap`] is the one process-wide map:
//! read only when a core's shard misses, written only when a core learns a mapping, never on a hit, so
//! N cores do not each fan out for the same new image.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use quick_cache::unsync::Cache;
use quick_cache::Weighter;

/// Names remembered per core.
const MAPPINGS_PER_CORE: usize = 100_000;
/// Misses remembered per core.
const MISSES_PER_CORE: usize = 20_000;
/// Memory for tag lists per core (they are keyed by client-chosen `n` and `last`, so by bytes).
const TAG_LIST_BYTES_PER_CORE: u64 = 16 << 20;
/// Entries in the process-wide learned map; past it, new names are learned per core only.
const LEARNED_MAX: usize = 200_000;

/// Where a name was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub project: String,
    pub learned_at: Instant,
}

/// A mapping's state at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Fresh(String),
    /// Past `CACHE_TTL` but within `STALE_WHILE_REVALIDATE`: use it, and refresh it.
    Stale(String),
    Miss,
}

/// A manifest kept by digest: the bytes and the headers to send with them.
#[derive(Debug, Clone)]
pub struct CachedManifest {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub expires_at: Instant,
}

/// A tag list kept briefly: the rewritten answer.
#[derive(Debug, Clone)]
pub struct CachedTags {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub expires_at: Instant,
}

#[derive(Clone)]
struct ManifestWeight;

impl Weighter<String, CachedManifest> for ManifestWeight {
    fn weight(&self, key: &String, val: &CachedManifest) -> u64 {
        (key.len() + val.body.len() + headers_weight(&val.headers)) as u64
    }
}

#[derive(Clone)]
struct TagsWeight;

impl Weighter<String, CachedTags> for TagsWeight {
    fn weight(&self, key: &String, val: &CachedTags) -> u64 {
        (key.len() + val.body.len() + headers_weight(&val.headers)) as u64
    }
}

/// Roughly what a header map holds in memory.
fn headers_weight(h: &HeaderMap) -> usize {
    h.iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum::<usize>()
        + 64
}

/// Lifetimes, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub mapping: Duration,
    pub stale: Duration,
    pub miss: Duration,
    pub manifest: Duration,
}

/// One core's shard.
pub struct RouteCache {
    ttls: Ttls,
    mappings: Cache<String, Mapping>,
    misses: Cache<String, Instant>,
    manifests: Cache<String, CachedManifest, ManifestWeight>,
    tags: Cache<String, CachedTags, TagsWeight>,
}

impl RouteCache {
    /// `manifest_bytes` is this core's share of `MANIFEST_CACHE_BYTES` (0 turns it off).
    pub fn new(ttls: Ttls, manifest_bytes: u64) -> RouteCache {
        RouteCache {
            ttls,
            mappings: Cache::new(MAPPINGS_PER_CORE),
            misses: Cache::new(MISSES_PER_CORE),
            manifests: Cache::with_weighter(
                (manifest_bytes / 4096).max(1) as usize,
                manifest_bytes.max(1),
                ManifestWeight,
            ),
            tags: Cache::with_weighter(2_000, TAG_LIST_BYTES_PER_CORE, TagsWeight),
        }
    }

    pub fn lookup(&self, name: &str, now: Instant) -> Lookup {
        match self.mappings.get(name) {
            Some(m) => classify(m, self.ttls, now),
            None => Lookup::Miss,
        }
    }

    /// Stores a mapping learned (or confirmed) at `learned_at`.
    pub fn learn(&mut self, name: &str, project: &str, learned_at: Instant) {
        self.mappings.insert(
            name.to_string(),
            Mapping {
                project: project.to_string(),
                learned_at,
            },
        );
    }

    pub fn forget(&mut self, name: &str) {
        self.mappings.remove(name);
    }

    /// Whether `key` (`name:reference`) is a remembered miss.
    pub fn is_miss(&self, key: &str, now: Instant) -> bool {
        self.misses.get(key).is_some_and(|until| now < *until)
    }

    pub fn remember_miss(&mut self, key: &str, now: Instant) {
        if !self.ttls.miss.is_zero() {
            self.misses.insert(key.to_string(), now + self.ttls.miss);
        }
    }

    pub fn manifest(&self, key: &str, now: Instant) -> Option<&CachedManifest> {
        self.manifests.get(key).filter(|m| now < m.expires_at)
    }

    pub fn keep_manifest(&mut self, key: &str, headers: HeaderMap, body: Bytes, now: Instant) {
        if self.manifests.capacity() <= 1 {
            return;
        }
        self.manifests.insert(
            key.to_string(),
            CachedManifest {
                headers,
                body,
                expires_at: now + self.ttls.manifest,
            },
        );
    }

    pub fn tags(&self, key: &str, now: Instant) -> Option<&CachedTags> {
        self.tags.get(key).filter(|t| now < t.expires_at)
    }

    pub fn keep_tags(&mut self, key: &str, headers: HeaderMap, body: Bytes, now: Instant) {
        self.tags.insert(
            key.to_string(),
            CachedTags {
                headers,
                body,
                expires_at: now + self.ttls.mapping,
            },
        );
    }

    /// Drops what has expired (called from a per-core timer, not on requests).
    pub fn sweep(&mut self, now: Instant) {
        let ttls = self.ttls;
        self.mappings
            .retain(|_, m| classify(m, ttls, now) != Lookup::Miss);
        self.misses.retain(|_, until| now < *until);
        self.manifests.retain(|_, m| now < m.expires_at);
        self.tags.retain(|_, t| now < t.expires_at);
    }
}

fn classify(m: &Mapping, ttls: Ttls, now: Instant) -> Lookup {
    let age = now.saturating_duration_since(m.learned_at);
    if age < ttls.mapping {
        Lookup::Fresh(m.project.clone())
    } else if age < ttls.mapping + ttls.stale {
        Lookup::Stale(m.project.clone())
    } else {
        Lookup::Miss
    }
}

/// The process-wide map of learned names: consulted on a core's miss, written on a learn.
#[derive(Default)]
pub struct LearnedMap {
    map: RwLock<HashMap<String, Mapping>>,
}

impl LearnedMap {
    pub fn get(&self, name: &str) -> Option<Mapping> {
        self.map.read().ok()?.get(name).cloned()
    }

    pub fn learn(&self, name: &str, project: &str, learned_at: Instant) {
        let Ok(mut map) = self.map.write() else {
            return;
        };
        if map.len() >= LEARNED_MAX && !map.contains_key(name) {
            // Full: this name stays per core until the next sweep makes room.
            return;
        }
        map.insert(
            name.to_string(),
            Mapping {
                project: project.to_string(),
                learned_at,
            },
        );
    }

    /// Drops mappings learned more than `max_age` before `now` (one core calls it every minute).
    pub fn sweep(&self, now: Instant, max_age: Duration) {
        if let Ok(mut map) = self.map.write() {
            map.retain(|_, m| now.saturating_duration_since(m.learned_at) < max_age);
        }
    }

    pub fn forget(&self, name: &str, project: &str) {
        if let Ok(mut map) = self.map.write() {
            if map.get(name).is_some_and(|m| m.project == project) {
                map.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttls() -> Ttls {
        Ttls {
            mapping: Duration::from_secs(300),
            stale: Duration::from_secs(60),
            miss: Duration::from_secs(30),
            manifest: Duration::from_secs(3600),
        }
    }

    #[test]
    fn mappings_go_fresh_stale_gone() {
        let t0 = Instant::now();
        let mut c = RouteCache::new(ttls(), 1 << 20);
        assert_eq!(c.lookup("nginx", t0), Lookup::Miss);
        c.learn("nginx", "dockerhub", t0);
        assert_eq!(
            c.lookup("nginx", t0 + Duration::from_secs(299)),
            Lookup::Fresh("dockerhub".into())
        );
        assert_eq!(
            c.lookup("nginx", t0 + Duration::from_secs(300)),
            Lookup::Stale("dockerhub".into())
        );
        assert_eq!(
            c.lookup("nginx", t0 + Duration::from_secs(359)),
            Lookup::Stale("dockerhub".into())
        );
        assert_eq!(
            c.lookup("nginx", t0 + Duration::from_secs(360)),
            Lookup::Miss
        );
        c.learn("nginx", "other", t0 + Duration::from_secs(360));
        assert_eq!(
            c.lookup("nginx", t0 + Duration::from_secs(361)),
            Lookup::Fresh("other".into())
        );
        c.forget("nginx");
        assert_eq!(c.lookup("nginx", t0), Lookup::Miss);
    }

    #[test]
    fn stale_disabled() {
        let t0 = Instant::now();
        let mut c = RouteCache::new(
            Ttls {
                stale: Duration::ZERO,
                ..ttls()
            },
            0,
        );
        c.learn("a", "p", t0);
        assert_eq!(c.lookup("a", t0 + Duration::from_secs(300)), Lookup::Miss);
    }

    #[test]
    fn misses_expire_and_can_be_disabled() {
        let t0 = Instant::now();
        let mut c = RouteCache::new(ttls(), 0);
        c.remember_miss("a:latest", t0);
        assert!(c.is_miss("a:latest", t0 + Duration::from_secs(29)));
        assert!(!c.is_miss("a:latest", t0 + Duration::from_secs(30)));
        assert!(!c.is_miss("a:other", t0));
        let mut off = RouteCache::new(
            Ttls {
                miss: Duration::ZERO,
                ..ttls()
            },
            0,
        );
        off.remember_miss("a:latest", t0);
        assert!(!off.is_miss("a:latest", t0));
    }

    #[test]
    fn manifests_respect_budget_and_life() {
        let t0 = Instant::now();
        let mut c = RouteCache::new(ttls(), 64 * 1024);
        c.keep_manifest(
            "a@sha256:1",
            HeaderMap::new(),
            Bytes::from(vec![0; 1000]),
            t0,
        );
        assert!(c.manifest("a@sha256:1", t0).is_some());
        assert!(c
            .manifest("a@sha256:1", t0 + Duration::from_secs(3600))
            .is_none());
        // A manifest larger than the budget is not kept (and evicts nothing useful).
        c.keep_manifest(
            "big",
            HeaderMap::new(),
            Bytes::from(vec![0; 100 * 1024]),
            t0,
        );
        assert!(c.manifest("big", t0).is_none());
        // The budget holds: many entries never exceed it.
        for i in 0..200 {
            c.keep_manifest(
                &format!("m{i}"),
                HeaderMap::new(),
                Bytes::from(vec![0; 1000]),
                t0,
            );
        }
        let kept = (0..200)
            .filter(|i| c.manifest(&format!("m{i}"), t0).is_some())
            .count();
        // Each entry weighs its body, its key and ~64 bytes of (empty) headers.
        assert!(kept > 10 && kept * 1064 <= 64 * 1024 + 1064, "kept {kept}");
        // Off.
        let mut off = RouteCache::new(ttls(), 0);
        off.keep_manifest("a", HeaderMap::new(), Bytes::from_static(b"{}"), t0);
        assert!(off.manifest("a", t0).is_none());
    }

    #[test]
    fn sweep_drops_expired() {
        let t0 = Instant::now();
        let mut c = RouteCache::new(ttls(), 1 << 20);
        c.learn("a", "p", t0);
        c.remember_miss("b:x", t0);
        c.keep_tags("a?", HeaderMap::new(), Bytes::new(), t0);
        c.sweep(t0 + Duration::from_secs(400));
        assert_eq!(
            c.lookup("a", t0),
            Lookup::Miss,
            "swept, even when asked with an old now"
        );
        assert!(!c.is_miss("b:x", t0));
        assert!(c.tags("a?", t0).is_none());
    }

    #[test]
    fn learned_map_is_shared_state() {
        let t0 = Instant::now();
        let m = LearnedMap::default();
        assert_eq!(m.get("a"), None);
        m.learn("a", "p", t0);
        assert_eq!(m.get("a").unwrap().project, "p");
        m.forget("a", "other");
        assert!(
            m.get("a").is_some(),
            "forgetting another project's mapping does nothing"
        );
        m.forget("a", "p");
        assert_eq!(m.get("a"), None);
        m.learn("b", "p", t0);
        m.sweep(t0 + Duration::from_secs(10), Duration::from_secs(10));
        assert_eq!(m.get("b"), None, "swept once older than max_age");
    }
}
