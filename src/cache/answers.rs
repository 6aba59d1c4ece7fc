//! Answers a core can give from memory, each with its expiry instant in the value:
//! - **misses** (`name`, endpoint, Accept set → not in any project), for `NEGATIVE_CACHE_TTL`;
//! - **manifests by digest**, immutable content, within a byte budget and for at most
//!   `MANIFEST_CACHE_TTL` (so Harbor keeps seeing pulls of hot images; see docs/architecture.md);
//! - **tag lists**, for `CACHE_TTL`.
//!
//! One core's, `!Send`, no lock.

use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use quick_cache::unsync::Cache;
use quick_cache::Weighter;

use super::Ttls;

/// Misses remembered per core.
const MISSES_PER_CORE: usize = 20_000;
/// Memory for tag lists per core (they are keyed by client-chosen `n` and `last`, so by bytes).
const TAG_LIST_BYTES_PER_CORE: u64 = 16 << 20;

/// An answer kept whole: the headers to send and the body.
#[derive(Debug, Clone)]
pub struct Kept {
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
struct Entry {
    kept: Kept,
    expires_at: Instant,
}

/// Weighs an entry by what it holds in memory: key, body, and roughly its header map.
#[derive(Clone)]
struct ByBytes;

impl Weighter<String, Entry> for ByBytes {
    fn weight(&self, key: &String, val: &Entry) -> u64 {
        let headers = val
            .kept
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum::<usize>()
            + 64;
        (key.len() + val.kept.body.len() + headers) as u64
    }
}

/// A remembered miss: until when, and the registry's own error body when it said more than "not
/// found" (see `registry::attempt`).
#[derive(Debug, Clone)]
struct Miss {
    until: Instant,
    detail: Option<Bytes>,
}

/// One core's remembered answers.
/// How long a miss is remembered when a project's 404 was Harbor's local store answering for an
/// upstream it could not ask (absent, or the upstream down: nothing tells them apart): long enough
/// that a burst of pulls of a missing name costs Harbor one fan-out, short enough that an image is
/// pulled again within seconds of its upstream coming back.
pub const UNSURE_MISS_LIFE: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Answers {
    ttls: Ttls,
    misses: Cache<String, Miss>,
    manifests: Cache<String, Entry, ByBytes>,
    tags: Cache<String, Entry, ByBytes>,
}

impl Answers {
    /// `manifest_bytes` is this core's share of `MANIFEST_CACHE_BYTES` (0 turns it off).
    pub fn new(ttls: Ttls, manifest_bytes: u64) -> Answers {
        Answers {
            ttls,
            misses: Cache::new(MISSES_PER_CORE),
            manifests: Cache::with_weighter(
                (manifest_bytes / 4096).max(1) as usize,
                manifest_bytes.max(1),
                ByBytes,
            ),
            tags: Cache::with_weighter(2_000, TAG_LIST_BYTES_PER_CORE, ByBytes),
        }
    }

    /// `Some` when `key` is a remembered miss, with the registry's error body if it had one.
    pub fn miss(&self, key: &str, now: Instant) -> Option<Option<Bytes>> {
        let m = self.misses.get(key).filter(|m| now < m.until)?;
        Some(m.detail.clone())
    }

    pub fn remember_miss(&mut self, key: &str, detail: Option<Bytes>, now: Instant) {
        self.remember_miss_until(key, detail, now + self.ttls.miss);
    }

    /// Remembers a miss Harbor was not sure of ([`UNSURE_MISS_LIFE`], at most `NEGATIVE_CACHE_TTL`).
    pub fn remember_unsure_miss(&mut self, key: &str, detail: Option<Bytes>, now: Instant) {
        let life = UNSURE_MISS_LIFE.min(self.ttls.miss);
        self.remember_miss_until(key, detail, now + life);
    }

    /// Remembers a miss until `until` (a miss heard from another pod keeps the expiry it was stored
    /// with).
    pub fn remember_miss_until(&mut self, key: &str, detail: Option<Bytes>, until: Instant) {
        if !self.ttls.miss.is_zero() {
            self.misses.insert(key.to_string(), Miss { until, detail });
        }
    }

    pub fn manifest(&self, key: &str, now: Instant) -> Option<&Kept> {
        live(self.manifests.get(key), now)
    }

    pub fn keep_manifest(&mut self, key: &str, kept: Kept, now: Instant) {
        if self.manifests.capacity() <= 1 {
            return;
        }
        let expires_at = now + self.ttls.manifest;
        self.manifests
            .insert(key.to_string(), Entry { kept, expires_at });
    }

    pub fn tags(&self, key: &str, now: Instant) -> Option<&Kept> {
        live(self.tags.get(key), now)
    }

    pub fn keep_tags(&mut self, key: &str, kept: Kept, now: Instant) {
        let expires_at = now + self.ttls.mapping;
        self.tags
            .insert(key.to_string(), Entry { kept, expires_at });
    }

    /// Drops what has expired (called from a per-core timer, not on requests).
    pub fn sweep(&mut self, now: Instant) {
        self.misses.retain(|_, m| now < m.until);
        self.manifests.retain(|_, e| now < e.expires_at);
        self.tags.retain(|_, e| now < e.expires_at);
    }
}

fn live(entry: Option<&Entry>, now: Instant) -> Option<&Kept> {
    entry.filter(|e| now < e.expires_at).map(|e| &e.kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ttls() -> Ttls {
        Ttls {
            mapping: Duration::from_secs(300),
            stale: Duration::from_secs(60),
            miss: Duration::from_secs(30),
            manifest: Duration::from_secs(3600),
        }
    }

    fn kept(len: usize) -> Kept {
        Kept {
            headers: HeaderMap::new(),
            body: Bytes::from(vec![0; len]),
        }
    }

    #[test]
    fn misses_expire_and_can_be_disabled() {
        let t0 = Instant::now();
        let mut c = Answers::new(ttls(), 0);
        c.remember_miss("a:latest", None, t0);
        assert_eq!(c.miss("a:latest", t0 + Duration::from_secs(29)), Some(None));
        assert_eq!(c.miss("a:latest", t0 + Duration::from_secs(30)), None);
        assert_eq!(c.miss("a:other", t0), None);
        let detail = Bytes::from_static(b"{}");
        c.remember_miss("b", Some(detail.clone()), t0);
        assert_eq!(
            c.miss("b", t0),
            Some(Some(detail)),
            "with the registry's words"
        );
        let mut off = Answers::new(
            Ttls {
                miss: Duration::ZERO,
                ..ttls()
            },
            0,
        );
        off.remember_miss("a:latest", None, t0);
        assert_eq!(off.miss("a:latest", t0), None);
    }

    #[test]
    fn manifests_respect_budget_and_life() {
        let t0 = Instant::now();
        let mut c = Answers::new(ttls(), 64 * 1024);
        c.keep_manifest("a@sha256:1", kept(1000), t0);
        assert!(c.manifest("a@sha256:1", t0).is_some());
        assert!(c
            .manifest("a@sha256:1", t0 + Duration::from_secs(3600))
            .is_none());
        // A manifest larger than the budget is not kept (and evicts nothing useful).
        c.keep_manifest("big", kept(100 * 1024), t0);
        assert!(c.manifest("big", t0).is_none());
        // The budget holds: many entries never exceed it.
        for i in 0..200 {
            c.keep_manifest(&format!("m{i}"), kept(1000), t0);
        }
        let count = (0..200)
            .filter(|i| c.manifest(&format!("m{i}"), t0).is_some())
            .count();
        // Each entry weighs its body, its key and ~64 bytes of (empty) headers.
        assert!(
            count > 10 && count * 1064 <= 64 * 1024 + 1064,
            "kept {count}"
        );
        // Off.
        let mut off = Answers::new(ttls(), 0);
        off.keep_manifest("a", kept(2), t0);
        assert!(off.manifest("a", t0).is_none());
    }

    #[test]
    fn sweep_drops_expired() {
        let t0 = Instant::now();
        let mut c = Answers::new(ttls(), 1 << 20);
        c.remember_miss("b:x", None, t0);
        c.keep_tags("a?", kept(0), t0);
        c.keep_manifest("m", kept(10), t0);
        c.sweep(t0 + Duration::from_secs(299));
        assert!(c.tags("a?", t0).is_some(), "not yet expired: kept");
        c.sweep(t0 + Duration::from_secs(3600));
        assert!(
            c.miss("b:x", t0).is_none(),
            "swept, even when asked with an old now"
        );
        assert!(c.tags("a?", t0).is_none());
        assert!(c.manifest("m", t0).is_none());
    }
}
