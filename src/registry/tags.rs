//! What tags last resolved to on this core (`STALE_IF_ERROR`, [`LastGood`]), shared with the other
//! pods through Redis when it is configured, and the log line of stale answers (the first, then one
//! a minute with the count). Decisions are made with the core's clock; what goes to Redis carries
//! the system clock's time, as Redis's other readers do.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use crate::cache::{
    Confirmed, LastGood, Resolved, Seen, LAST_GOOD_BYTES_PER_CORE, LAST_GOOD_PER_CORE,
};
use crate::clock::Clock;
use crate::share::Shared;
use crate::snapshot::{Project, Snapshot};

/// Who is told that a tag is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tell {
    /// This pod found it: the other pods are told too (through Redis).
    OtherPods,
    /// This pod heard it from another: nothing to repeat.
    ThisPod,
}

pub struct Tags {
    last_good: RefCell<LastGood>,
    /// Redis, when configured.
    shared: Option<Shared>,
    /// Stale answers since the last log line about them, and when that line was written.
    stale_log: Cell<(u64, Option<Instant>)>,
    clock: Clock,
    worker: usize,
}

impl Tags {
    pub fn new(life: Duration, shared: Option<Shared>, clock: Clock, worker: usize) -> Tags {
        Tags {
            last_good: RefCell::new(LastGood::new(
                life,
                LAST_GOOD_PER_CORE,
                LAST_GOOD_BYTES_PER_CORE,
            )),
            shared,
            stale_log: Cell::new((0, None)),
            clock,
            worker,
        }
    }

    /// Whether tags are remembered at all (`STALE_IF_ERROR` is not zero).
    pub fn enabled(&self) -> bool {
        self.last_good.borrow().enabled()
    }

    /// `project` answered the tag pull `key` with `seen`: remembered, and shared through Redis when
    /// this core learned it, saw it change, or last shared it a while ago (never on every hit).
    /// `true` when the entry wants the manifest itself ([`Tags::keep_manifest`]).
    pub fn confirm(&self, key: &str, seen: Seen<'_>, project: &Project) -> bool {
        let now = self.clock.now();
        let (how, wants_manifest) = self.last_good.borrow_mut().confirm(key, seen, now);
        if how == Confirmed::Same {
            return wants_manifest;
        }
        if let Some(shared) = &self.shared {
            if let Some((resolved, _)) = self.last_good.borrow().get(key, now) {
                shared.share_tag(key, &resolved, project, Instant::now());
            }
        }
        wants_manifest
    }

    /// The manifest of the tag pull `key`, streamed whole and hashing to `digest`: kept with the
    /// entry, so a stale GET needs nothing from Harbor, and shared under its digest through Redis,
    /// so another pod's does not either.
    pub fn keep_manifest(&self, key: &str, digest: &http::HeaderValue, manifest: bytes::Bytes) {
        let kept = self
            .last_good
            .borrow_mut()
            .keep_manifest(key, digest, manifest.clone());
        if let (Some(media_type), Some(shared)) = (kept, &self.shared) {
            shared.share_manifest(digest, &media_type, &manifest);
        }
    }

    /// The manifest the tag pull `key` resolved to (`resolved`, which has none kept) as another pod
    /// shared it through Redis; kept with this core's entry from then on.
    pub async fn shared_manifest(&self, key: &str, resolved: &Resolved) -> Option<bytes::Bytes> {
        let shared = self.shared.as_ref()?;
        let manifest = shared
            .manifest(&resolved.digest, &resolved.media_type)
            .await?;
        if manifest.len() as u64 != resolved.length {
            return None;
        }
        self.last_good
            .borrow_mut()
            .keep_manifest(key, &resolved.digest, manifest.clone());
        Some(manifest)
    }

    /// What the tag pull `key` last resolved to, and how long ago: this core's memory, else (with
    /// Redis) what another pod shared, remembered here from then on.
    pub async fn last_good(&self, key: &str, snapshot: &Snapshot) -> Option<(Resolved, Duration)> {
        let now = self.clock.now();
        if let Some(found) = self.last_good.borrow().get(key, now) {
            return Some(found);
        }
        let shared = self.shared.as_ref().filter(|_| self.enabled())?;
        let (resolved, at) = shared.tag(key, snapshot).await?;
        let age = Instant::now().saturating_duration_since(at);
        let at = now.checked_sub(age).unwrap_or(now);
        self.last_good.borrow_mut().heard(key, resolved.clone(), at);
        Some((resolved, age))
    }

    /// `project` said the tag pull `key` is not there: if that is where the tag last resolved, the
    /// tag is forgotten here and in Redis (a 404 is an answer; it is never masked by an older one).
    pub fn forget(&self, key: &str, project: &str) {
        if self.last_good.borrow_mut().forget(key, project) {
            if let Some(shared) = &self.shared {
                shared.forget_tag(key);
            }
        }
    }

    /// No project has the tag pull `key` (every one said "not here"): forgotten here, and in Redis
    /// when `tell` says the other pods are to be told.
    pub fn forget_everywhere(&self, key: &str, tell: Tell) {
        self.last_good.borrow_mut().forget_any(key);
        if let (Tell::OtherPods, Some(shared)) = (tell, &self.shared) {
            shared.forget_tag(key);
        }
    }

    /// Counts a stale answer; logs the first, then at most one line a minute with the count since.
    pub fn served_stale(&self, name: &str, project: &str, age: Duration, why: &str) {
        let (count, last) = self.stale_log.get();
        let now = self.clock.now();
        if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(60)) {
            self.stale_log.set((count + 1, last));
            return;
        }
        tracing::warn!(
            worker = self.worker,
            name,
            project,
            age_s = age.as_secs(),
            why,
            since_last_line = count,
            "every project failed: answered a tag with its last-known-good digest (STALE_IF_ERROR)"
        );
        self.stale_log.set((0, Some(now)));
    }

    /// Drops what expired (off the request path).
    pub fn sweep(&self) {
        self.last_good.borrow_mut().sweep(self.clock.now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;
    use crate::snapshot::UpstreamKind;
    use http::HeaderValue;

    #[test]
    fn a_tag_stands_for_its_life_and_a_404_from_its_project_forgets_it() {
        let clock = TestClock::new();
        let tags = Tags::new(Duration::from_secs(3600), None, clock.clock(), 0);
        let ghcr = Project::new("ghcr".into(), 1, 1, UpstreamKind::Unknown, None);
        let digest = HeaderValue::from_static("sha256:00");
        let media = HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json");
        let seen = || Seen {
            digest: &digest,
            media_type: &media,
            length: 10,
            project: "ghcr",
        };
        let snap = Snapshot {
            projects: vec![ghcr.clone()],
            built_at: Instant::now(),
            generation: 1,
            harbor: Default::default(),
            provisional: false,
        };
        let found = |tags: &Tags| {
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .build()
                .unwrap()
                .block_on(tags.last_good("k", &snap))
        };
        tags.confirm("k", seen(), &ghcr);
        clock.advance(Duration::from_secs(60));
        let (resolved, age) = found(&tags).expect("remembered");
        assert_eq!(resolved.project, "ghcr");
        assert!(age >= Duration::from_secs(60));
        tags.forget("k", "quay");
        assert!(
            found(&tags).is_some(),
            "another project's 404 does not forget it"
        );
        tags.forget("k", "ghcr");
        assert!(found(&tags).is_none());
        tags.confirm("k", seen(), &ghcr);
        clock.advance(Duration::from_secs(3600));
        assert!(found(&tags).is_none(), "past STALE_IF_ERROR");
        tags.confirm("k", seen(), &ghcr);
        tags.forget_everywhere("k", Tell::ThisPod);
        assert!(found(&tags).is_none());
    }
}
