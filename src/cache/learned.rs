//! The process-wide map of learned names: one [`Tier`] behind every core's shard. Read only when a
//! core's shard misses, written only when a core learns (or forgets) a mapping, never on a hit, so N
//! cores do not each fan out for the same new image. It is the one lock on the data plane, and no
//! request that hits its core's shard takes it.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::{Mapping, Tier, TierAnswer, TierLookup};

/// Entries kept; past it, new names are learned per core only until a sweep makes room.
const LEARNED_MAX: usize = 200_000;

#[derive(Default)]
pub struct LearnedMap {
    map: RwLock<HashMap<String, Mapping>>,
}

impl LearnedMap {
    pub fn mapping(&self, name: &str) -> Option<Mapping> {
        self.map.read().ok()?.get(name).cloned()
    }

    pub fn insert(&self, name: &str, mapping: &Mapping) {
        let Ok(mut map) = self.map.write() else {
            return;
        };
        if map.len() >= LEARNED_MAX && !map.contains_key(name) {
            return;
        }
        map.insert(name.to_string(), mapping.clone());
    }

    /// Removes `name` if it still points at `project` (another core may have learned better since).
    pub fn remove(&self, name: &str, project: &str) {
        if let Ok(mut map) = self.map.write() {
            if map.get(name).is_some_and(|m| m.project == project) {
                map.remove(name);
            }
        }
    }

    /// Drops mappings learned more than `max_age` before `now`.
    pub fn retain_younger(&self, now: Instant, max_age: Duration) {
        if let Ok(mut map) = self.map.write() {
            map.retain(|_, m| now.saturating_duration_since(m.learned_at) < max_age);
        }
    }
}

impl Tier for std::sync::Arc<LearnedMap> {
    fn get<'a>(&'a self, name: &'a str, _miss_key: &'a str) -> TierLookup<'a> {
        let found = self.mapping(name).map(TierAnswer::Mapped);
        Box::pin(std::future::ready(found))
    }

    fn learn(&self, name: &str, mapping: &Mapping) {
        self.insert(name, mapping);
    }

    fn forget(&self, name: &str, project: &str) {
        self.remove(name, project);
    }

    fn sweep(&self, now: Instant, max_age: Duration) {
        self.retain_younger(now, max_age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learn_forget_sweep() {
        let t0 = Instant::now();
        let m = LearnedMap::default();
        let mapping = |p: &str| Mapping {
            project: p.into(),
            learned_at: t0,
        };
        assert_eq!(m.mapping("a"), None);
        m.insert("a", &mapping("p"));
        assert_eq!(m.mapping("a").unwrap().project, "p");
        m.remove("a", "other");
        assert!(
            m.mapping("a").is_some(),
            "forgetting another project's mapping does nothing"
        );
        m.remove("a", "p");
        assert_eq!(m.mapping("a"), None);
        m.insert("b", &mapping("p"));
        m.retain_younger(t0 + Duration::from_secs(9), Duration::from_secs(10));
        assert!(m.mapping("b").is_some(), "younger than max_age: kept");
        m.retain_younger(t0 + Duration::from_secs(10), Duration::from_secs(10));
        assert_eq!(m.mapping("b"), None, "swept once as old as max_age");
    }
}
