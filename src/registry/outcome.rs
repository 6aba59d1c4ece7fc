//! What one project said to one request: the one typed outcome of an attempt ([`Heard`]), and why an
//! attempt failed ([`Failure`]). Every decision about an answer asks it a question here (does it
//! count against the circuit? may a last-known-good tag stand in for it? may it be remembered as a
//! miss?), so the breakers, the fan-out's tally, the stale path and the metrics cannot disagree on
//! what an answer meant. The judge that turns a status into a [`Heard`] is
//! [`super::attempt::judge`].

use crate::metrics::labels::StaleReason;

/// Why an attempt got no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer in time (`RESOLVER_TIMEOUT`, or the response timeout).
    Timeout,
    /// No answer: the connection, TLS or HTTP failed, or the token flow did.
    Transport,
    /// Harbor or its upstream is down or overloaded: 502, 503, 504.
    Status(u16),
    /// Harbor's upstream is rate-limiting (429).
    RateLimited,
    /// The project's circuit is open on this core: it was not asked.
    CircuitOpen,
    /// Harbor failed inside (its database or Redis): 500 `UNKNOWN`. Never counted against a
    /// circuit (the registry answers 500 to a name it refuses, and a client chooses the name), but
    /// a failure all the same: a tag Harbor confirmed may be stood in for.
    Internal,
}

/// What a project answered (or failed to), as every decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// It has it: a 2xx, an empty blob's 416 to its one-byte range, a blob redirected to storage.
    Has,
    /// It does not have it: 404, or a tag list that proves nothing.
    NotHere,
    /// Harbor's 404 from its local store after it did not, or could not, ask the upstream
    /// ("artifact R:T not found", "repository R not found": see [`super::attempt::unsure`]): absent,
    /// or the upstream was down or refused Harbor. Answered 404, remembered briefly on this core
    /// only; never erases a last-known-good tag.
    Unsure,
    /// Harbor refused the router's credentials for it (401 after a fresh token, or 403).
    /// `challenged`: Harbor's own refusal; without a challenge, a 401 its upstream gave Harbor.
    Denied { challenged: bool },
    /// It has it, and its policy refuses the pull (412 `PROJECTPOLICYVIOLATION`).
    Policy,
    /// Another answer that is neither "here" nor "not here" (400, another 4xx).
    Refused(u16),
    /// No usable answer.
    Failed(Failure),
}

impl Heard {
    /// Whether the project's circuit counts it as a failure: only what no client can provoke by
    /// its choice of name or reference (no answer, a timeout, 502–504). Never a 4xx, a 429 or a
    /// 500 (the registry answers 500 to a name it refuses).
    pub fn counts_against_circuit(self) -> bool {
        matches!(
            self,
            Heard::Failed(Failure::Timeout | Failure::Transport | Failure::Status(_))
        )
    }

    /// Whether a last-known-good answer may stand in for it: a failure (rate limits and open
    /// circuits included), never anything a project answered.
    pub fn may_stand_in(self) -> bool {
        matches!(self, Heard::Failed(_))
    }

    /// Whether it says "not here", surely or not: a pull every project said this to is not found.
    pub fn is_absence(self) -> bool {
        matches!(self, Heard::NotHere | Heard::Unsure)
    }

    /// Whether it proves absence: a pull every project said this to is remembered as a miss for
    /// `NEGATIVE_CACHE_TTL` and shared, and a last-known-good tag of the project is forgotten.
    pub fn proves_absence(self) -> bool {
        self == Heard::NotHere
    }

    /// Whether the project answered (anything but a failure): a last-known-good answer of a
    /// project that answered this pull never stands in, whatever the others did.
    pub fn answered(self) -> bool {
        !self.may_stand_in()
    }

    /// How a stale answer standing in for this failure is counted.
    pub fn stale_reason(self) -> StaleReason {
        match self {
            Heard::Failed(Failure::RateLimited) => StaleReason::RateLimited,
            Heard::Failed(Failure::CircuitOpen | Failure::Status(503)) => StaleReason::Unavailable,
            _ => StaleReason::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_questions_asked_of_each_outcome() {
        use Failure::*;
        // (outcome, counts against the circuit, may be stood in for, says absent, proves it)
        let cases = [
            (Heard::Has, false, false, false, false),
            (Heard::NotHere, false, false, true, true),
            (Heard::Unsure, false, false, true, false),
            (
                Heard::Denied { challenged: true },
                false,
                false,
                false,
                false,
            ),
            (
                Heard::Denied { challenged: false },
                false,
                false,
                false,
                false,
            ),
            (Heard::Policy, false, false, false, false),
            (Heard::Refused(400), false, false, false, false),
            (Heard::Failed(Internal), false, true, false, false),
            (Heard::Failed(Timeout), true, true, false, false),
            (Heard::Failed(Transport), true, true, false, false),
            (Heard::Failed(Status(502)), true, true, false, false),
            (Heard::Failed(Status(503)), true, true, false, false),
            (Heard::Failed(RateLimited), false, true, false, false),
            (Heard::Failed(CircuitOpen), false, true, false, false),
        ];
        for (heard, circuit, stand_in, absent, proof) in cases {
            assert_eq!(heard.counts_against_circuit(), circuit, "{heard:?}");
            assert_eq!(heard.may_stand_in(), stand_in, "{heard:?}");
            assert_eq!(heard.is_absence(), absent, "{heard:?}");
            assert_eq!(heard.proves_absence(), proof, "{heard:?}");
            assert_eq!(heard.answered(), !stand_in, "{heard:?}");
        }
        assert_eq!(
            Heard::Failed(RateLimited).stale_reason(),
            StaleReason::RateLimited
        );
        assert_eq!(
            Heard::Failed(CircuitOpen).stale_reason(),
            StaleReason::Unavailable
        );
        assert_eq!(
            Heard::Failed(Status(503)).stale_reason(),
            StaleReason::Unavailable
        );
        assert_eq!(Heard::Failed(Timeout).stale_reason(), StaleReason::Failed);
    }
}
