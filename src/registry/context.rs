//! One pull's context (pingora's per-request `CTX`), carried through the phases of
//! [`super::pull`]: what is asked, under which key, of which snapshot, for which client, what it
//! did (its trace), and who said what (its [`Log`]), which the last phase ([`super::stale`]) reads.

use std::net::IpAddr;
use std::rc::Rc;

use crate::metrics::labels::StaleReason;
use crate::snapshot::{Project, Snapshot};

use super::ask::Ask;
use super::trace::Trace;

/// One pull's context, carried through its phases (each phase takes the pull and the state it
/// uses): what is asked, under which key, of which snapshot, for which client, what it did (the
/// trace), and who said what (the [`Log`]).
pub struct Pull<'s, 't> {
    pub ask: Ask,
    /// Coalescing, remembered misses and last-known-good tags key on it.
    pub key: String,
    pub snapshot: &'s Rc<Snapshot>,
    pub client: IpAddr,
    pub trace: &'t mut Trace,
    pub log: Log<'s>,
}

/// Who said what for one pull, as the last phase needs it.
#[derive(Default)]
pub struct Log<'s> {
    /// The project whose answer this is (a 2xx, or what the mapped project said).
    pub by: Option<&'s Project>,
    /// The answer stands for a failure by the judge's rules (no answer in time, 502–504, 429, open
    /// circuits), counted as this; not for anything a project answered, nor the router refusing
    /// the client.
    pub failure: Option<StaleReason>,
    /// The projects that answered (404, 401, 403, 500…) rather than failed.
    pub answered: Vec<String>,
}
