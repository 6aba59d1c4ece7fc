//! This core's view of the routing list discovery publishes. A request does not clone the published
//! `Arc` (that would write its reference count from every core on every request): it peeks at it
//! through an `arc-swap` guard, compares the generation with the core's own copy, and takes an `Rc`
//! of that copy; the copy is refreshed once per core when a new snapshot is published.

use std::cell::RefCell;
use std::rc::Rc;

use crate::snapshot::{SharedSnapshot, Snapshot};

pub struct View {
    published: SharedSnapshot,
    copy: RefCell<Option<Rc<Snapshot>>>,
}

impl View {
    pub fn new(published: SharedSnapshot) -> View {
        View {
            published,
            copy: RefCell::new(None),
        }
    }

    /// The current routing list, `None` before discovery published one.
    pub fn get(&self) -> Option<Rc<Snapshot>> {
        let published = self.published.load();
        let published = published.as_ref()?;
        let mut copy = self.copy.borrow_mut();
        match copy.as_ref() {
            Some(v) if v.generation == published.generation => Some(v.clone()),
            _ => {
                let fresh = Rc::new(Snapshot::clone(published));
                *copy = Some(fresh.clone());
                Some(fresh)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn the_copy_follows_the_published_generation() {
        let published = crate::snapshot::shared();
        let view = View::new(published.clone());
        assert!(view.get().is_none());
        let snap = |generation| Snapshot {
            projects: Vec::new(),
            built_at: Instant::now(),
            generation,
            harbor: Default::default(),
            provisional: false,
        };
        published.store(Some(Arc::new(snap(1))));
        let a = view.get().unwrap();
        assert!(
            Rc::ptr_eq(&a, &view.get().unwrap()),
            "one copy per generation"
        );
        published.store(Some(Arc::new(snap(2))));
        assert_eq!(view.get().unwrap().generation, 2);
    }
}
