//! What this core remembers of Harbor's answers ([`Answers`]): misses (no project has a pull),
//! manifests by digest and tag lists, each with its life, decided with the core's clock.

use std::cell::RefCell;
use std::time::Instant;

use bytes::Bytes;

use crate::cache::{Answers, Kept, Ttls};
use crate::clock::Clock;

/// Blob descriptors remembered per core (a pull's layers and config: a few to a few dozen each).
pub const DESCRIPTORS_PER_CORE: usize = 65_536;
/// Descriptors taken from one manifest at most.
const DESCRIPTORS_PER_MANIFEST: usize = 1024;

pub struct Remembered {
    answers: RefCell<Answers>,
    /// `<mapping key>@<digest>` → the blob's size, from the manifests this core served whole.
    descriptors: RefCell<quick_cache::unsync::Cache<String, u64>>,
    clock: Clock,
}

impl Remembered {
    pub fn new(ttls: Ttls, manifest_bytes: u64, clock: Clock) -> Remembered {
        Remembered {
            answers: RefCell::new(Answers::new(ttls, manifest_bytes)),
            descriptors: RefCell::new(quick_cache::unsync::Cache::new(DESCRIPTORS_PER_CORE)),
            clock,
        }
    }

    /// Learns the blobs (config and layers) an image manifest of `name` (a mapping key) names, with
    /// their sizes: a client's blob HEAD is then answered without asking Harbor, which answers a
    /// blob it has not cached yet with 404 to a HEAD (goharbor/harbor#22609) and, up to v2.15,
    /// without its length to a GET.
    pub fn learn_blobs(&self, name: &str, manifest: &[u8]) {
        let Ok(m) = serde_json::from_slice::<serde_json::Value>(manifest) else {
            return;
        };
        let config = m.get("config").into_iter();
        let layers = m
            .get("layers")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten();
        let mut descriptors = self.descriptors.borrow_mut();
        for d in config.chain(layers).take(DESCRIPTORS_PER_MANIFEST) {
            let (Some(digest), Some(size)) = (
                d.get("digest").and_then(|v| v.as_str()),
                d.get("size").and_then(|v| v.as_u64()),
            ) else {
                continue;
            };
            if crate::names::valid_digest(digest).is_ok() {
                descriptors.insert(format!("{name}@{digest}"), size);
            }
        }
    }

    /// The size of blob `digest` of `name` (a mapping key), if a manifest this core served names it.
    pub fn blob_size(&self, name: &str, digest: &str) -> Option<u64> {
        self.descriptors
            .borrow()
            .get(format!("{name}@{digest}").as_str())
            .copied()
    }

    /// `Some` when `key` is a remembered miss, with the registry's error body if it had one.
    pub fn miss(&self, key: &str) -> Option<Option<Bytes>> {
        self.answers.borrow().miss(key, self.clock.now())
    }

    /// No project has the pull `key`: remembered for `NEGATIVE_CACHE_TTL`.
    pub fn remember_miss(&self, key: &str, detail: Option<Bytes>) {
        self.answers
            .borrow_mut()
            .remember_miss(key, detail, self.clock.now());
    }

    /// A miss only Harbor's unsure 404s said (`cache::UNSURE_MISS_LIFE`): this core only.
    pub fn remember_unsure_miss(&self, key: &str, detail: Option<Bytes>) {
        self.answers
            .borrow_mut()
            .remember_unsure_miss(key, detail, self.clock.now());
    }

    /// A miss another pod found, remembered until it ends there.
    pub fn remember_miss_until(&self, key: &str, detail: Option<Bytes>, until: Instant) {
        self.answers
            .borrow_mut()
            .remember_miss_until(key, detail, until);
    }

    pub fn manifest(&self, key: &str) -> Option<Kept> {
        self.answers
            .borrow()
            .manifest(key, self.clock.now())
            .cloned()
    }

    pub fn keep_manifest(&self, key: &str, kept: Kept) {
        self.answers
            .borrow_mut()
            .keep_manifest(key, kept, self.clock.now());
    }

    pub fn tags(&self, key: &str) -> Option<Kept> {
        self.answers.borrow().tags(key, self.clock.now()).cloned()
    }

    pub fn keep_tags(&self, key: &str, kept: Kept) {
        self.answers
            .borrow_mut()
            .keep_tags(key, kept, self.clock.now());
    }

    /// Drops what expired (off the request path).
    pub fn sweep(&self) {
        self.answers.borrow_mut().sweep(self.clock.now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;
    use std::time::Duration;

    #[test]
    fn a_miss_is_remembered_for_its_life() {
        let clock = TestClock::new();
        let ttls = Ttls {
            mapping: Duration::from_secs(300),
            stale: Duration::ZERO,
            miss: Duration::from_secs(30),
            manifest: Duration::from_secs(3600),
        };
        let r = Remembered::new(ttls, 1 << 20, clock.clock());
        r.remember_miss("k", Some(Bytes::from_static(b"{}")));
        assert_eq!(r.miss("k"), Some(Some(Bytes::from_static(b"{}"))));
        assert_eq!(r.miss("other"), None);
        clock.advance(Duration::from_secs(30));
        assert_eq!(r.miss("k"), None, "gone after NEGATIVE_CACHE_TTL");
        let until = clock.clock().now() + Duration::from_secs(5);
        r.remember_miss_until("k", None, until);
        assert_eq!(r.miss("k"), Some(None));
        clock.advance(Duration::from_secs(5));
        assert_eq!(
            r.miss("k"),
            None,
            "another pod's miss ends when it ends there"
        );
    }
}
