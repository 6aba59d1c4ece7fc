//! What the in-process tests need of a core beyond its handler: a core whose clock the test moves,
//! and a look at (or a nudge to) its routing. The router itself never uses this module.

use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{LearnedMap, Tier};
use crate::clock::TestClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::snapshot::SharedSnapshot;
use crate::upstream::{self, Upstream};

use super::routing::{Freshness, Located};
use super::settings::Settings;
use super::state::{ProcessState, State};

/// One core's state on a test clock (it derefs to the state the handler takes).
pub struct TestCore {
    state: Rc<State>,
    clock: TestClock,
}

impl Deref for TestCore {
    type Target = Rc<State>;

    fn deref(&self) -> &Rc<State> {
        &self.state
    }
}

/// Worker 0's state for `config`, routing by `snapshot`, with the process-wide learned map as its
/// one shared tier.
pub fn core(config: &Config, snapshot: SharedSnapshot) -> TestCore {
    let harbor =
        upstream::Harbor::new(&upstream::Settings::from_config(config)).expect("a Harbor client");
    let learned = Arc::new(LearnedMap::default());
    let process = ProcessState::new(
        Arc::new(Settings::from_config(config)),
        harbor,
        snapshot.clone(),
        learned.clone(),
        None,
        Metrics::new(snapshot, None),
    );
    let clock = TestClock::new();
    let tiers: Vec<Rc<dyn Tier>> = vec![Rc::new(learned)];
    let state = State::with_tiers(0, process, tiers, clock.clock());
    TestCore { state, clock }
}

impl TestCore {
    /// Moves this core's clock forward: mappings, misses and circuits age by `by`.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// The project `name` is mapped to right now, and whether the mapping is stale.
    pub async fn mapping(&self, name: &str) -> Option<(String, bool)> {
        let view = self.state.view()?;
        match self.state.routing.lookup(&view, name, "").await {
            Located::Mapped { project, freshness } => {
                Some((project.name.clone(), freshness == Freshness::Stale))
            }
            _ => None,
        }
    }

    /// Maps `name` to `project`, as a fan-out that found it there would.
    pub fn learn(&self, name: &str, project: &str) {
        self.state.routing.learn(name, project);
    }

    /// Whether a background refresh of `name` is running.
    pub fn refreshing(&self, name: &str) -> bool {
        self.state.routing.claim_refresh(name).is_none()
    }

    /// The core's client to Harbor.
    pub fn upstream(&self) -> &Upstream {
        &self.state.upstream
    }
}
