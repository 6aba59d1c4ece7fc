//! The registry protocol side of the router, as a [`crate::server::Handler`]: which requests exist
//! ([`route`]), how each is answered ([`handle`], [`pull`] and its phases), and the per-core state
//! they use ([`state`]).
//!
//! - [`route`]: method and path → `Route`, validated by the name grammar.
//! - [`handle`]: the handler: `/v2/`, health, refusals, the per-IP request limit, pulls.
//! - [`client`]: who the client is (peer, or `X-Forwarded-For` behind a trusted proxy).
//! - [`state`]: per-core state as handles, one per concern: `routing` (mappings, fan-outs in
//!   flight, refreshes), `circuits`, `remembered` answers, last-known-good `tags`, `budgets`, the
//!   `view` of the routing list, `counters`; [`settings`]: the registry's slice of the
//!   configuration.
//! - [`ask`]: one owned description of what a pull asks a project for.
//! - [`attempt`]: sending an ask to one project, and the one judge of the answer.
//! - [`outcome`]: the typed outcome of an answer ([`outcome::Heard`]) and the questions asked of it.
//! - [`tally`]: a race's decision as a pure tally of outcomes.
//! - [`pull`]: a pull's phases, in order: [`memory`], [`mapped`], [`fanout`] (with [`refresh`] for
//!   stale mappings), [`answer`]; [`stale`] for tags every project failed to confirm.
//! - [`forward`]: project paths, headers up and down, Harbor's same-project redirects.
//! - [`respond`]: building responses and registry errors.

pub mod answer;
pub mod ask;
pub mod attempt;
pub(crate) mod budgets;
pub(crate) mod circuits;
pub mod client;
pub(crate) mod counters;
pub mod fanout;
pub mod forward;
pub mod handle;
pub mod mapped;
pub mod memory;
pub mod mirror;
pub mod outcome;
pub mod pull;
pub mod refresh;
pub(crate) mod remembered;
pub mod respond;
pub mod route;
pub(crate) mod routing;
pub mod settings;
pub mod stale;
pub mod state;
pub(crate) mod tags;
pub mod tally;
#[doc(hidden)]
pub mod testing;
pub mod trace;
pub(crate) mod view;

pub use state::{ProcessState, State};
