//! A race's decision as a pure tally: the attempts' outcomes go in as they arrive, and it says when
//! a win is taken (and whether it was a second choice) and, when nothing wins, how the race ends.
//! No IO, no clock: [`super::fanout`] runs the attempts and holds their answers; this decides.
//!
//! The rules:
//! - Fastest wins, unless `FANOUT_ORDER` ranks the projects: then a win is held until every project
//!   ranked above it has answered without having it or failed, and a better win replaces a held one
//!   (the worse is released, for its answer to be read and let go). A win taken while a project
//!   ranked above it was unavailable (circuit open, failed, rate-limited, refused) is a second choice.
//! - Nothing wins: every project said "not here" (and none was left out) → not found, with the
//!   registry's own 404 body when the telling ones agree, and sure unless one of them was Harbor's
//!   unsure 404 ([`Heard::Unsure`]); else a policy refusal (the project has
//!   it) → that answer; else a rate limit → 429 with Harbor's `Retry-After`; else a failure → 502; else
//!   circuits open → 503; else Harbor refused the router's credentials → 403; else (only other
//!   answers) → 502.

use bytes::Bytes;
use http::HeaderValue;

use super::outcome::{Failure, Heard};

/// A slot: the index of an attempt among the candidates.
pub type Slot = usize;

/// What one observation decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// This slot's win is taken: the race is over.
    pub take: Option<Take>,
    /// This slot's held win lost to a better one: read its answer to the end and let it go.
    pub release: Option<Slot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub slot: Slot,
    /// A project ranked above it could not answer: learned for a short life only.
    pub second_choice: bool,
}

/// How a race that nobody won ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Every project said "not here", with the registry's own body when the telling ones agreed;
    /// `sure` when none of them was Harbor's unsure 404 (only a sure miss is remembered for
    /// `NEGATIVE_CACHE_TTL`, shared, and erases a last-known-good tag).
    NotFound { detail: Option<Bytes>, sure: bool },
    /// This slot's policy refusal (412) is the answer: its project has it. `second_choice` as for
    /// a win: a project ranked above it could not answer.
    Policy { slot: Slot, second_choice: bool },
    /// Rate-limited, with Harbor's `Retry-After` (the first one given).
    RateLimited(Option<HeaderValue>),
    /// Some failed (no answer, 502–504).
    Failed,
    /// Not found where asked, and the other projects' circuits are open.
    Unavailable,
    /// Harbor refused the router's credentials where it may be (the others said "not here");
    /// `challenged`: Harbor's own refusal at least once (else only its upstream's, relayed).
    Denied { challenged: bool },
    /// No project could be asked: the name is too long for every one.
    NameTooLong,
    /// No project could be asked: every circuit is open.
    AllOpen,
}

/// One race's state.
#[derive(Debug)]
pub struct Tally {
    ordered: bool,
    /// The rank of each started slot (by slot), `None` once it answered or for a skipped one.
    pending: Vec<Option<usize>>,
    /// Ranks of projects that cannot have a say: skipped, failed, rate-limited, refused.
    unavailable: Vec<usize>,
    started: usize,
    skipped: bool,
    all_not_here: bool,
    /// A project said Harbor's unsure 404.
    unsure: bool,
    detail: Option<Bytes>,
    details_agree: bool,
    retry_after: Option<HeaderValue>,
    rate_limited: bool,
    failed: bool,
    /// Harbor refused the router's credentials: `Some(challenged)` (any refusal with a challenge).
    denied: Option<bool>,
    /// A policy refusal (slot, rank): the first one heard.
    policy: Option<(Slot, usize)>,
    /// With `FANOUT_ORDER`: the best win so far (rank, slot), held until nothing better can come.
    held: Option<(usize, Slot)>,
}

impl Tally {
    /// A race over `slots` candidates; `ordered` when `FANOUT_ORDER` ranks them.
    pub fn new(slots: usize, ordered: bool) -> Tally {
        Tally {
            ordered,
            pending: vec![None; slots],
            unavailable: Vec::new(),
            started: 0,
            skipped: false,
            all_not_here: true,
            unsure: false,
            detail: None,
            details_agree: true,
            retry_after: None,
            rate_limited: false,
            failed: false,
            denied: None,
            policy: None,
            held: None,
        }
    }

    /// The candidate of `rank` was left out (its circuit is open): it cannot say "not here".
    pub fn skip(&mut self, rank: usize) {
        self.skipped = true;
        self.all_not_here = false;
        self.unavailable.push(rank);
    }

    /// The attempt of `slot`, ranked `rank`, is sent.
    pub fn start(&mut self, slot: Slot, rank: usize) {
        self.pending[slot] = Some(rank);
        self.started += 1;
    }

    /// How the race ends before it starts: nothing could be asked.
    pub fn nothing_asked(&self) -> Option<Ending> {
        match (self.started, self.skipped) {
            (0, false) => Some(Ending::NameTooLong),
            (0, true) => Some(Ending::AllOpen),
            _ => None,
        }
    }

    /// `slot` said `heard`; `detail` is a 404's telling body, `retry_after` a 429's header.
    pub fn observe(
        &mut self,
        slot: Slot,
        heard: Heard,
        detail: Option<Bytes>,
        retry_after: Option<HeaderValue>,
    ) -> Step {
        let Some(rank) = self.pending.get_mut(slot).and_then(Option::take) else {
            return Step::default(); // not started, or already heard
        };
        let mut step = Step::default();
        match heard {
            Heard::Has if !self.ordered => {
                step.take = Some(Take {
                    slot,
                    second_choice: false,
                });
                return step;
            }
            Heard::Has => match self.held {
                Some((best, _)) if best <= rank => step.release = Some(slot),
                _ => step.release = self.held.replace((rank, slot)).map(|(_, s)| s),
            },
            Heard::NotHere | Heard::Unsure => {
                self.unsure |= heard == Heard::Unsure;
                if let Some(body) = detail {
                    match &self.detail {
                        None => self.detail = Some(body),
                        Some(d) => self.details_agree &= *d == body,
                    }
                }
            }
            other => {
                self.all_not_here = false;
                self.unavailable.push(rank);
                match other {
                    Heard::Failed(Failure::RateLimited) => {
                        self.rate_limited = true;
                        self.retry_after = self.retry_after.take().or(retry_after);
                    }
                    Heard::Failed(_) => self.failed = true,
                    Heard::Denied { challenged } => {
                        self.denied = Some(challenged || self.denied == Some(true));
                    }
                    Heard::Policy => {
                        self.policy.get_or_insert((slot, rank));
                    }
                    _ => {}
                }
            }
        }
        if let Some((best, held)) = self.held {
            if self.pending.iter().flatten().all(|r| *r > best) {
                self.held = None;
                step.take = Some(Take {
                    slot: held,
                    second_choice: self.unavailable.iter().any(|r| *r < best),
                });
            }
        }
        step
    }

    /// How a race in which nothing was taken ends, once every attempt answered.
    pub fn end(self) -> Ending {
        if let Some(e) = self.nothing_asked() {
            return e;
        }
        if self.all_not_here {
            Ending::NotFound {
                detail: self.detail.filter(|_| self.details_agree),
                sure: !self.unsure,
            }
        } else if let Some((slot, rank)) = self.policy {
            Ending::Policy {
                slot,
                second_choice: self.ordered && self.unavailable.iter().any(|r| *r < rank),
            }
        } else if self.rate_limited {
            Ending::RateLimited(self.retry_after)
        } else if self.failed {
            Ending::Failed
        } else if self.skipped {
            Ending::Unavailable
        } else if let Some(challenged) = self.denied {
            Ending::Denied { challenged }
        } else {
            Ending::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A race's events: (slot, what it said), in the order they arrive.
    type Events = &'static [(Slot, Heard)];
    /// The rank of each slot; `None` for one whose circuit is open.
    type Ranks = &'static [Option<usize>];

    const HAS: Heard = Heard::Has;
    const NOT_HERE: Heard = Heard::NotHere;
    const FAILED: Heard = Heard::Failed(Failure::Status(503));
    const UNSURE: Heard = Heard::Unsure;
    const INTERNAL: Heard = Heard::Failed(Failure::Internal);
    const NOT_FOUND: Ending = Ending::NotFound {
        detail: None,
        sure: true,
    };
    const LIMITED: Heard = Heard::Failed(Failure::RateLimited);
    const DENIED: Heard = Heard::Denied { challenged: true };
    const RELAYED_401: Heard = Heard::Denied { challenged: false };
    const DENIED_END: Ending = Ending::Denied { challenged: true };

    /// Runs a race: `ranks` by slot (`None`: skipped), then `events` (slot, outcome) in order;
    /// returns the taken win, if any, and the releases, or how it ended.
    fn race(
        ordered: bool,
        ranks: &[Option<usize>],
        events: &[(Slot, Heard)],
    ) -> (Option<Take>, Vec<Slot>, Option<Ending>) {
        let mut t = Tally::new(ranks.len(), ordered);
        for (slot, rank) in ranks.iter().enumerate() {
            match rank {
                Some(r) => t.start(slot, *r),
                None => t.skip(slot),
            }
        }
        let mut released = Vec::new();
        for (slot, heard) in events {
            let step = t.observe(*slot, *heard, None, None);
            released.extend(step.release);
            if step.take.is_some() {
                return (step.take, released, None);
            }
        }
        (None, released, Some(t.end()))
    }

    fn take(slot: Slot, second_choice: bool) -> Option<Take> {
        Some(Take {
            slot,
            second_choice,
        })
    }

    #[test]
    fn fastest_wins_without_an_order() {
        let all = [Some(0), Some(1), Some(2)];
        assert_eq!(race(false, &all, &[(2, HAS)]).0, take(2, false));
        assert_eq!(
            race(false, &all, &[(0, FAILED), (1, HAS)]).0,
            take(1, false),
            "no second choices without an order"
        );
    }

    #[test]
    fn with_an_order_the_best_ranked_project_that_has_it_wins() {
        let all = [Some(0), Some(1), Some(2)];
        let cases: &[(Events, Option<Take>, &[Slot])] = &[
            // The preferred project answers last and still wins.
            (&[(2, HAS), (1, HAS), (0, HAS)], take(0, false), &[2, 1]),
            // The preferred project says "not here": the next one wins once it has spoken.
            (&[(1, HAS), (0, NOT_HERE)], take(1, false), &[]),
            // A worse win after a better one held is released at once.
            (&[(1, HAS), (2, HAS), (0, NOT_HERE)], take(1, false), &[2]),
            // The preferred project failed, was rate-limited or refused: a second choice.
            (&[(2, HAS), (0, FAILED), (1, NOT_HERE)], take(2, true), &[]),
            (&[(1, HAS), (0, LIMITED)], take(1, true), &[]),
            (&[(1, HAS), (0, DENIED)], take(1, true), &[]),
            (&[(1, HAS), (0, INTERNAL)], take(1, true), &[]),
            (&[(1, HAS), (0, Heard::Refused(400))], take(1, true), &[]),
            // Harbor's unsure 404 is a "not here" like any other for the order.
            (&[(1, HAS), (0, UNSURE)], take(1, false), &[]),
        ];
        for (events, want, released) in cases {
            let (got, rel, _) = race(true, &all, events);
            assert_eq!(got, *want, "{events:?}");
            assert_eq!(rel, *released, "{events:?}");
        }
        // A preferred project whose circuit is open: the win is a second choice.
        let skipped = [None, Some(1), Some(2)];
        assert_eq!(race(true, &skipped, &[(1, HAS)]).0, take(1, true));
        // Ranks decide, not slots (FANOUT_ORDER lists slot 2 first).
        let reordered = [Some(2), Some(1), Some(0)];
        assert_eq!(
            race(true, &reordered, &[(0, HAS), (2, HAS)]).0,
            take(2, false)
        );
    }

    #[test]
    fn how_a_race_nobody_wins_ends() {
        const ALL: Ranks = &[Some(0), Some(1)];
        let all = ALL;
        let cases: &[(Ranks, Events, Ending)] = &[
            (all, &[(0, NOT_HERE), (1, NOT_HERE)], NOT_FOUND),
            (
                all,
                &[(0, NOT_HERE), (1, UNSURE)],
                Ending::NotFound {
                    detail: None,
                    sure: false,
                },
            ),
            (all, &[(0, UNSURE), (1, FAILED)], Ending::Failed),
            (all, &[(0, INTERNAL), (1, NOT_HERE)], Ending::Failed),
            (all, &[(0, NOT_HERE), (1, FAILED)], Ending::Failed),
            (
                all,
                &[(0, NOT_HERE), (1, LIMITED)],
                Ending::RateLimited(None),
            ),
            (all, &[(0, FAILED), (1, LIMITED)], Ending::RateLimited(None)),
            (all, &[(0, NOT_HERE), (1, DENIED)], DENIED_END),
            (
                all,
                &[(0, NOT_HERE), (1, RELAYED_401)],
                Ending::Denied { challenged: false },
            ),
            (all, &[(0, RELAYED_401), (1, DENIED)], DENIED_END),
            (all, &[(0, FAILED), (1, DENIED)], Ending::Failed),
            (all, &[(0, NOT_HERE), (1, Heard::Policy)], policy(1, false)),
            (
                all,
                &[(0, NOT_HERE), (1, Heard::Refused(400))],
                Ending::Failed,
            ),
            (&[None, Some(1)], &[(1, NOT_HERE)], Ending::Unavailable),
            (&[None, Some(1)], &[(1, DENIED)], Ending::Unavailable),
            (&[None, Some(1)], &[(1, FAILED)], Ending::Failed),
            (&[None, None], &[], Ending::AllOpen),
            (&[], &[], Ending::NameTooLong),
        ];
        for (ranks, events, want) in cases {
            for ordered in [false, true] {
                let (taken, _, ending) = race(ordered, ranks, events);
                assert_eq!(taken, None);
                assert_eq!(ending.as_ref(), Some(want), "{ranks:?} {events:?}");
            }
        }
        // A policy refusal ranked below a project that could not answer is a second choice, as a
        // win would be (with FANOUT_ORDER only).
        let events: Events = &[(0, LIMITED), (1, Heard::Policy)];
        assert_eq!(race(true, all, events).2, Some(policy(1, true)));
        assert_eq!(race(false, all, events).2, Some(policy(1, false)));
        let events: Events = &[(1, LIMITED), (0, Heard::Policy)];
        assert_eq!(race(true, all, events).2, Some(policy(0, false)));
    }

    fn policy(slot: Slot, second_choice: bool) -> Ending {
        Ending::Policy {
            slot,
            second_choice,
        }
    }

    #[test]
    fn agreed_404_details_are_passed_on_and_disagreeing_ones_are_not() {
        let telling = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        let run = |a: Option<Bytes>, b: Option<Bytes>| {
            let mut t = Tally::new(2, false);
            t.start(0, 0);
            t.start(1, 1);
            t.observe(0, NOT_HERE, a, None);
            t.observe(1, NOT_HERE, b, None);
            t.end()
        };
        let found = |detail| Ending::NotFound { detail, sure: true };
        assert_eq!(run(telling("oci"), telling("oci")), found(telling("oci")));
        assert_eq!(run(telling("oci"), None), found(telling("oci")));
        assert_eq!(run(telling("a"), telling("b")), found(None));
    }

    #[test]
    fn the_first_retry_after_is_kept_and_late_or_repeated_outcomes_are_ignored() {
        let mut t = Tally::new(3, false);
        for s in 0..3 {
            t.start(s, s);
        }
        t.observe(0, LIMITED, None, Some(HeaderValue::from_static("7")));
        t.observe(1, LIMITED, None, Some(HeaderValue::from_static("9")));
        // A slot heard twice, or one never started, changes nothing.
        assert_eq!(t.observe(1, HAS, None, None), Step::default());
        assert_eq!(t.observe(7, HAS, None, None), Step::default());
        t.observe(2, NOT_HERE, None, None);
        assert_eq!(
            t.end(),
            Ending::RateLimited(Some(HeaderValue::from_static("7")))
        );
    }
}
