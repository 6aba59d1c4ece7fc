//! The registry protocol side of the router, as a [`crate::server::Handler`]: which requests exist
//! ([`route`]), how each is answered ([`handle`], [`pull`] and its phases), and the per-core state
//! they use ([`state`]).
//!
//! - [`route`]: method and path → `Route`, validated by the name grammar.
//! - [`handle`]: the handler: `/v2/`, health, refusals, the per-IP request limit, pulls.
//! - [`client`]: who the client is (peer, or `X-Forwarded-For` behind a trusted proxy).
//! - [`state`]: per-core state as handles, one per concern: `routing` (mappings, fan-outs in
//!   flight, refreshes), `circuits`, `remembered` answers, last-known-good `tags`, `budgets`,
//!   `sharing` (mapped pulls in the air, [`sharing`]), the `view` of the routing list, `counters`; [`settings`]: the registry's slice of the
//!   configuration.
//! - [`ask`]: one owned description of what a pull asks a project for.
//! - [`attempt`]: sending an ask to one project, and the one judge of the answer.
//! - [`outcome`]: the typed outcome of an answer ([`outcome::Heard`]) and the questions asked of it.
//! - [`tally`]: a race's decision as a pure tally of outcomes.
//! - [`context`]: one pull's context, carried through its phases.
//! - [`pull`]: a pull's phases, in order: [`memory`], [`mapped`] (through [`sharing`]), [`fanout`] (with [`refresh`] for
//!   stale mappings), [`answer`]; [`stale`] for tags every project failed to confirm.
//! - [`forward`]: project paths, headers up and down, Harbor's same-project redirects.
//! - [`respond`]: building responses and registry errors.
//! - `testing` (hidden): a core on a test clock, for the in-process tests.

pub(crate) mod answer;
pub(crate) mod ask;
pub(crate) mod attempt;
pub(crate) mod budgets;
pub(crate) mod circuits;
pub(crate) mod client;
pub(crate) mod context;
pub(crate) mod counters;
pub(crate) mod fanout;
pub(crate) mod forward;
pub mod handle;
pub(crate) mod mapped;
pub(crate) mod memory;
pub(crate) mod mirror;
pub(crate) mod outcome;
pub(crate) mod pull;
pub(crate) mod refresh;
pub(crate) mod remembered;
pub(crate) mod respond;
pub(crate) mod route;
pub(crate) mod routing;
pub(crate) mod settings;
pub(crate) mod sharing;
pub(crate) mod stale;
pub(crate) mod state;
pub(crate) mod tags;
pub(crate) mod tally;
#[doc(hidden)]
pub mod testing;
pub(crate) mod trace;
pub(crate) mod view;

pub(crate) use state::ProcessState;
pub use state::State;
