//! The background refresh of a stale mapping: the same race as a fan-out, with the pull's probe (a
//! manifest HEAD, a one-byte blob GET, a referrers subject HEAD), at most one per name on a core at
//! a time. Never a tag list: Harbor answers one in a proxy project by listing the upstream's whole
//! repository (`src/server/middleware/repoproxy/tag.go`), so a probe with it would cost every
//! project an upstream listing; a name only listed keeps its mapping until it ages out, and the
//! next manifest or blob pull of it refreshes it. A winner re-learns the mapping; "not found anywhere" and failures keep it: the
//! probe's reference may be a tag that is simply missing, and a reference that is only missing must
//! not unmap the name. The mapping ages out on its own.

use std::rc::Rc;

use crate::metrics::labels::RaceKind;
use crate::snapshot::Snapshot;

use super::ask::{Ask, Endpoint};
use super::fanout::{self, Outcome};
use super::state::State;

/// Starts refreshing `ask.name`'s mapping in the background, unless a refresh of it is running.
pub fn start(state: &Rc<State>, snapshot: Rc<Snapshot>, ask: &Ask) {
    let Some(probe) = probe_of(ask) else {
        return;
    };
    let Some(claim) = state.routing.claim_refresh(&ask.mapping_key()) else {
        return;
    };
    let state = state.clone();
    crate::task::spawn(async move {
        let _claim = claim;
        let candidates = super::mirror::asked(&snapshot, &probe, state.mirror_gap_logged());
        let mut info = fanout::RaceInfo::default();
        let outcome = fanout::race(&state, &candidates, &probe, &mut info).await;
        state.metrics().race(RaceKind::Refresh, outcome.label());
        match outcome {
            Outcome::Won(project, res) => {
                state
                    .routing
                    .learn_won(&probe.mapping_key(), &project.name, info.choice);
                state.upstream().drain(res.into_body()).await;
            }
            Outcome::NotFound { .. } => {}
            Outcome::Lost(ending) => {
                tracing::debug!(
                    name = probe.name,
                    ?ending,
                    "refresh found nothing; keeping the stale mapping"
                )
            }
        }
    });
}

/// The probe a refresh started by `ask` sends, if it starts one: never for a tag list.
fn probe_of(ask: &Ask) -> Option<Ask> {
    (!matches!(ask.endpoint, Endpoint::Tags { .. })).then(|| ask.probe())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn a_tag_list_never_starts_a_refresh_and_the_others_probe_cheaply() {
        let ask = |endpoint| Ask {
            name: "a/b".into(),
            endpoint,
            head: false,
            headers: HeaderMap::new(),
            registry: None,
            root: false,
        };
        let tags = ask(Endpoint::Tags {
            query: "n=10".into(),
        });
        assert!(probe_of(&tags).is_none());
        let manifest = ask(Endpoint::Manifest {
            reference: "v1".into(),
            by_digest: false,
        });
        let probe = probe_of(&manifest).expect("a manifest pull refreshes");
        assert!(probe.head, "a manifest HEAD");
        let blob = ask(Endpoint::Blob {
            digest: "sha256:00".into(),
        });
        assert!(probe_of(&blob).is_some());
    }
}
