//! Last-known-good tags: what each tag last resolved to on this core (digest, media type, length,
//! the project that answered, when it was last confirmed), so a tag can still be answered when every
//! project that could confirm it fails (`STALE_IF_ERROR`, see `registry::stale`). Taken from an
//! answer's headers, never its body. Keyed like a pull (name, tag, Accept set, registry); bounded by
//! entries and bytes; one core's, `!Send`, no lock.

use std::time::{Duration, Instant};

use http::HeaderValue;
use quick_cache::unsync::Cache;
use quick_cache::Weighter;

/// Tags remembered per core.
pub const LAST_GOOD_PER_CORE: usize = 16_384;
/// Memory for remembered tags per core (keys and kept manifests included; a key holds the Accept
/// set, ~100–600 bytes; a manifest is typically 0.5–10 KiB).
pub const LAST_GOOD_BYTES_PER_CORE: u64 = 16 << 20;
/// Largest manifest kept with its tag: an image manifest or an index of a few dozen platforms.
pub const MAX_KEPT_MANIFEST: usize = 64 << 10;

/// What a tag resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `Docker-Content-Digest`.
    pub digest: HeaderValue,
    /// `Content-Type`.
    pub media_type: HeaderValue,
    /// The manifest's length in bytes.
    pub length: u64,
    /// The project that answered.
    pub project: String,
    /// The manifest, once a GET streamed it whole (it hashes to `digest`); never shared.
    pub manifest: Option<bytes::Bytes>,
}

/// An answer's view of what a tag resolved to, borrowed from its headers.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub digest: &'a HeaderValue,
    pub media_type: &'a HeaderValue,
    pub length: u64,
    pub project: &'a str,
}

impl Seen<'_> {
    /// The same answer: the same digest from the same project. (A HEAD and a GET of one tag may
    /// differ in how `Content-Type` is spelled; that is not a change worth sharing.)
    fn matches(&self, r: &Resolved) -> bool {
        *self.digest == r.digest && self.project == r.project
    }

    /// An owned copy: the values are copied out of the answer's read buffer (a slice would pin the
    /// whole buffer for as long as the entry lives).
    fn owned(&self) -> Resolved {
        let copy = |v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).expect("was valid");
        Resolved {
            digest: copy(self.digest),
            media_type: copy(self.media_type),
            length: self.length,
            project: self.project.to_string(),
            manifest: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    resolved: Resolved,
    /// Last confirmed by a project's answer.
    at: Instant,
    /// Last reported as [`Confirmed::Learned`], [`Confirmed::Changed`] or [`Confirmed::Due`] (so
    /// shared).
    shared: Instant,
}

/// Weighs an entry by what it holds (key, values, the entry's own size), and at least `floor`: the
/// byte budget over the entry budget, so the one weight bounds both.
#[derive(Clone)]
struct ByBytes {
    floor: u64,
}

impl Weighter<String, Entry> for ByBytes {
    fn weight(&self, key: &String, e: &Entry) -> u64 {
        let r = &e.resolved;
        let manifest = r.manifest.as_ref().map_or(0, |m| m.len());
        let held =
            key.len() + r.digest.len() + r.media_type.len() + r.project.len() + manifest + 128;
        (held as u64).max(self.floor)
    }
}

/// How a confirmation changed what is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// The tag was not remembered (or has aged out): learned now.
    Learned,
    /// The tag resolves to another digest (or project) than remembered.
    Changed,
    /// The same answer again: only its time moved.
    Same,
    /// The same answer again, last shared a quarter of the life ago or more: share it again, so a
    /// tag that never changes does not age out of the shared copy while it is in use.
    Due,
}

/// One core's last-known-good tags.
pub struct LastGood {
    entries: Cache<String, Entry, ByBytes>,
    life: Duration,
}

impl LastGood {
    /// Remembers tags for `life` after their last confirmation (`STALE_IF_ERROR`; zero: never),
    /// within `entries` and `bytes`.
    pub fn new(life: Duration, entries: usize, bytes: u64) -> LastGood {
        let (entries, bytes) = if life.is_zero() {
            (1, 1)
        } else {
            (entries, bytes)
        };
        let (entries, bytes) = (entries.max(1), bytes.max(1));
        let floor = bytes.div_ceil(entries as u64);
        LastGood {
            entries: Cache::with_weighter(entries, bytes, ByBytes { floor }),
            life,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.life.is_zero()
    }

    /// A project answered `key` with `resolved` at `now`, and whether the entry still wants its
    /// manifest ([`LastGood::keep_manifest`]). Allocates only when the tag is learned or changed; a
    /// confirmation of the same answer updates its time in place.
    pub fn confirm(&mut self, key: &str, seen: Seen<'_>, now: Instant) -> (Confirmed, bool) {
        if !self.enabled() {
            return (Confirmed::Same, false);
        }
        let life = self.life;
        if let Some(mut e) = self.entries.get_mut(key) {
            let live = now.saturating_duration_since(e.at) < life;
            let how = if !live {
                Confirmed::Learned
            } else if !seen.matches(&e.resolved) {
                Confirmed::Changed
            } else if now.saturating_duration_since(e.shared) >= life / 4 {
                Confirmed::Due
            } else {
                e.at = now;
                if e.resolved.length != seen.length || e.resolved.media_type != *seen.media_type {
                    e.resolved = seen.owned();
                }
                return (Confirmed::Same, e.resolved.manifest.is_none());
            };
            *e = Entry {
                resolved: seen.owned(),
                at: now,
                shared: now,
            };
            return (how, true);
        }
        let e = Entry {
            resolved: seen.owned(),
            at: now,
            shared: now,
        };
        self.entries.insert(key.to_string(), e);
        (Confirmed::Learned, true)
    }

    /// Keeps `manifest` (the caller checked it hashes to `digest`) with `key`'s entry, if the entry
    /// still resolves to `digest` and the manifest is at most [`MAX_KEPT_MANIFEST`].
    /// The entry's media type when it was kept.
    pub fn keep_manifest(
        &mut self,
        key: &str,
        digest: &HeaderValue,
        manifest: bytes::Bytes,
    ) -> Option<HeaderValue> {
        if manifest.len() > MAX_KEPT_MANIFEST {
            return None;
        }
        let mut e = self.entries.get(key).cloned()?;
        if e.resolved.digest != digest || e.resolved.manifest.is_some() {
            return None;
        }
        e.resolved.manifest = Some(manifest);
        let media_type = e.resolved.media_type.clone();
        // Inserted again, so the entry is weighed with its manifest.
        self.entries.insert(key.to_string(), e);
        Some(media_type)
    }

    /// Remembers `resolved` for `key`, confirmed at `at` (heard from another pod), unless this core
    /// knows a more recent answer.
    pub fn heard(&mut self, key: &str, resolved: Resolved, at: Instant) {
        if !self.enabled() || self.entries.get(key).is_some_and(|e| e.at >= at) {
            return;
        }
        let e = Entry {
            resolved,
            at,
            shared: at,
        };
        self.entries.insert(key.to_string(), e);
    }

    /// What `key` last resolved to and how long ago, if that is younger than the life.
    pub fn get(&self, key: &str, now: Instant) -> Option<(Resolved, Duration)> {
        let e = self.entries.get(key)?;
        let age = now.saturating_duration_since(e.at);
        (age < self.life).then(|| (e.resolved.clone(), age))
    }

    /// Drops `key` if it last resolved in `project` (which said the tag is not there); `true` when
    /// it did.
    pub fn forget(&mut self, key: &str, project: &str) -> bool {
        self.entries
            .remove_if(key, |e| e.resolved.project == project)
            .is_some()
    }

    /// Drops `key`, whichever project it resolved in (no project has the tag any more).
    pub fn forget_any(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }

    /// Drops what has aged out (called from a per-core timer, not on requests).
    pub fn sweep(&mut self, now: Instant) {
        let life = self.life;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.at) < life);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The weight held, in bytes as [`ByBytes`] counts them.
    #[cfg(test)]
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFE: Duration = Duration::from_secs(3600);

    /// Confirms `key` as resolving to `digest` (in project ghcr).
    fn confirm(c: &mut LastGood, key: &str, digest: &str, now: Instant) -> Confirmed {
        confirm_wanting(c, key, digest, now).0
    }

    fn confirm_wanting(
        c: &mut LastGood,
        key: &str,
        digest: &str,
        now: Instant,
    ) -> (Confirmed, bool) {
        let r = resolved(digest);
        let seen = Seen {
            digest: &r.digest,
            media_type: &r.media_type,
            length: r.length,
            project: &r.project,
        };
        c.confirm(key, seen, now)
    }

    fn resolved(digest: &str) -> Resolved {
        Resolved {
            digest: HeaderValue::from_str(digest).unwrap(),
            media_type: HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
            length: 512,
            project: "ghcr".into(),
            manifest: None,
        }
    }

    #[test]
    fn a_manifest_is_kept_once_per_digest_and_dropped_when_the_tag_moves() {
        let t0 = Instant::now();
        // A floor weight (1 MiB / 100 000 entries) far below a manifest.
        let mut c = LastGood::new(LIFE, 100_000, 1 << 20);
        let a = HeaderValue::from_static("sha256:a");
        assert_eq!(
            confirm_wanting(&mut c, "k", "sha256:a", t0),
            (Confirmed::Learned, true)
        );
        let before = c.weight();
        // Another digest's manifest, or one too large, is not kept.
        c.keep_manifest("k", &HeaderValue::from_static("sha256:b"), "b".into());
        c.keep_manifest("k", &a, vec![0u8; MAX_KEPT_MANIFEST + 1].into());
        assert_eq!(c.get("k", t0).unwrap().0.manifest, None);
        c.keep_manifest("k", &a, vec![7u8; 4000].into());
        assert_eq!(c.get("k", t0).unwrap().0.manifest.unwrap().len(), 4000);
        assert!(c.weight() >= before + 4000, "weighed with its manifest");
        // Kept: a confirmation of the same digest no longer wants it.
        assert_eq!(
            confirm_wanting(&mut c, "k", "sha256:a", t0),
            (Confirmed::Same, false)
        );
        // The tag moved: the old manifest goes, the new one is wanted.
        assert_eq!(
            confirm_wanting(&mut c, "k", "sha256:b", t0),
            (Confirmed::Changed, true)
        );
        assert_eq!(c.get("k", t0).unwrap().0.manifest, None);
        // A key never confirmed keeps nothing.
        c.keep_manifest("other", &a, "x".into());
        assert!(c.get("other", t0).is_none());
    }

    #[test]
    fn learns_confirms_and_changes() {
        let t0 = Instant::now();
        let mut c = LastGood::new(LIFE, 100, 1 << 20);
        assert_eq!(confirm(&mut c, "k", "sha256:a", t0), Confirmed::Learned);
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(confirm(&mut c, "k", "sha256:a", t1), Confirmed::Same);
        let (r, age) = c.get("k", t1 + Duration::from_secs(5)).unwrap();
        assert_eq!(r.digest, "sha256:a");
        assert_eq!(
            age,
            Duration::from_secs(5),
            "aged from the last confirmation"
        );
        assert_eq!(confirm(&mut c, "k", "sha256:b", t1), Confirmed::Changed);
        assert_eq!(c.get("k", t1).unwrap().0.digest, "sha256:b");
        let t2 = t1 + LIFE / 4;
        assert_eq!(
            confirm(&mut c, "k", "sha256:b", t2),
            Confirmed::Due,
            "shared again after a quarter of its life"
        );
        assert_eq!(confirm(&mut c, "k", "sha256:b", t2), Confirmed::Same);
        assert!(c.get("other", t1).is_none());
    }

    #[test]
    fn ages_out_after_its_life() {
        let t0 = Instant::now();
        let mut c = LastGood::new(LIFE, 100, 1 << 20);
        confirm(&mut c, "k", "sha256:a", t0);
        assert!(c.get("k", t0 + LIFE - Duration::from_secs(1)).is_some());
        assert!(c.get("k", t0 + LIFE).is_none());
        // Confirmed again after it aged out: learned anew (shared again).
        assert_eq!(
            confirm(&mut c, "k", "sha256:a", t0 + LIFE),
            Confirmed::Learned
        );
        c.sweep(t0 + 2 * LIFE);
        assert!(c.is_empty());
    }

    #[test]
    fn zero_life_remembers_nothing() {
        let t0 = Instant::now();
        let mut c = LastGood::new(Duration::ZERO, 100, 1 << 20);
        confirm(&mut c, "k", "sha256:a", t0);
        c.heard("k", resolved("sha256:a"), t0);
        assert!(c.get("k", t0).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_by_entries_and_by_bytes() {
        let t0 = Instant::now();
        let mut c = LastGood::new(LIFE, 50, 1 << 20);
        for i in 0..500 {
            confirm(&mut c, &format!("k{i}"), "sha256:a", t0);
        }
        assert!(c.len() <= 50, "entries bound: {}", c.len());
        let bytes = 16 * 1024;
        let mut c = LastGood::new(LIFE, 10_000, bytes);
        let long_key = "x".repeat(900);
        for i in 0..500 {
            confirm(&mut c, &format!("{long_key}{i}"), "sha256:a", t0);
        }
        assert!(c.weight() <= bytes, "bytes bound: {}", c.weight());
        assert!(
            c.len() >= 5 && c.len() <= 16,
            "about 1 KiB an entry: {}",
            c.len()
        );
    }

    #[test]
    fn heard_never_overwrites_a_newer_local_answer() {
        let t0 = Instant::now();
        let mut c = LastGood::new(LIFE, 100, 1 << 20);
        confirm(&mut c, "k", "sha256:new", t0 + Duration::from_secs(10));
        c.heard("k", resolved("sha256:old"), t0);
        assert_eq!(
            c.get("k", t0 + Duration::from_secs(10)).unwrap().0.digest,
            "sha256:new"
        );
        c.heard("j", resolved("sha256:j"), t0);
        assert_eq!(c.get("j", t0).unwrap().0.digest, "sha256:j");
        assert!(!c.forget("j", "quay"));
        assert!(
            c.get("j", t0).is_some(),
            "another project's 404 says nothing of it"
        );
        assert!(c.forget("j", "ghcr"));
        assert!(c.get("j", t0).is_none());
        c.heard("j", resolved("sha256:j"), t0);
        assert!(c.forget_any("j"));
        assert!(c.get("j", t0).is_none());
    }
}
