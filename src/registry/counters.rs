//! This core's counters for the registry: the core's own ([`CoreMetrics`]) and one set per project,
//! made on the project's first use. Written by this core only, read by the scrape thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crate::metrics::{CoreMetrics, ProjectMetrics};

/// One core's counters.
pub struct Counters {
    core: Arc<CoreMetrics>,
    /// By project name (the scrape reads them through `core`).
    projects: RefCell<HashMap<String, Arc<ProjectMetrics>>>,
}

impl Counters {
    pub fn new(core: Arc<CoreMetrics>) -> Counters {
        Counters {
            core,
            projects: RefCell::default(),
        }
    }

    /// This core's counters.
    pub fn core(&self) -> &CoreMetrics {
        &self.core
    }

    /// Runs `f` on this core's counters for `project` (created on the project's first use).
    pub fn project(&self, project: &str, f: impl FnOnce(&ProjectMetrics)) {
        if let Some(m) = self.projects.borrow().get(project) {
            return f(m);
        }
        let m = self.core.add_project(project);
        f(&m);
        self.projects.borrow_mut().insert(project.to_string(), m);
    }
}
