//! The registry token flow against Harbor, per core: parse a `Bearer` challenge, cache tokens per scope
//! until shortly before they expire, and coalesce concurrent fetches of one scope into one request.
//! The fetch itself (an HTTP request through the pool) is done by [`super::Upstream`]; this module
//! owns the state and the rules, with time passed in so tests drive it.
//!
//! Harbor refuses tokens before they expire (a signing key rotated by a redeploy, clock skew between
//! core pods, a project recreated, a robot given access after its token was issued), and it says so
//! with `401 Basic realm="harbor"` (it words every refusal of a request that carried `Authorization`
//! that way). A refused token is dropped under every scope it was stored for ([`TokenCache::drop_token`])
//! and fetched again, once; a fresh token that is refused too is remembered as refused for
//! [`REFUSED_LIFE`] ([`TokenCache::refused`]), so a robot that may not pull costs Harbor one token
//! request (a password hash) per scope and interval, not one per pull.
//! Why tokens rather than Basic on every request: docs/architecture.md, "The upstream client".

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::unsync::Cache;

use http::HeaderValue;
use tokio::sync::oneshot;

use crate::flight::{Flights, Leader, Turn};

/// Tokens are renewed this long before they expire (or at 90% of a shorter life).
const RENEW_BEFORE: Duration = Duration::from_secs(30);
/// Longest token life believed, whatever the token service says (Harbor's default is 30 minutes).
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(24 * 3600);
/// Scopes whose token a core keeps (one per repository pulled recently).
const TOKENS_PER_CORE: usize = 10_000;
/// Longest query of one batched token request: the scopes beyond it use their own challenges.
const MAX_BATCH_QUERY: usize = 4096;
/// `expires_in` when the token service does not say (the distribution spec's default).
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(60);
/// How long a freshly fetched token that Harbor refused anyway is kept as refused: requests for its
/// scope are sent with it (Harbor checks a token cheaply) and not retried, and no new token is asked
/// for (each token request costs Harbor a password hash) until it ends.
pub const REFUSED_LIFE: Duration = Duration::from_secs(10);

/// A parsed `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    /// Space-separated scopes as sent; each becomes one `scope=` parameter.
    pub scope: Option<String>,
}

impl Challenge {
    /// Parses a Bearer challenge; `None` for other schemes or a challenge without a realm.
    pub fn parse(header: &str) -> Option<Challenge> {
        let rest = header.trim_start();
        let (scheme, params) = rest.split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut realm = None;
        let mut service = None;
        let mut scope = None;
        for (k, v) in parse_params(params) {
            match k.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(v),
                "service" => service = Some(v),
                "scope" => scope = Some(v),
                _ => {}
            }
        }
        Some(Challenge {
            realm: realm?,
            service,
            scope,
        })
    }

    /// The cache key: the scope set, or "" for a challenge without scope (`/v2/` itself).
    pub fn key(&self) -> String {
        self.scope.clone().unwrap_or_default()
    }
}

/// `k=v, k="quoted \" value", …` → pairs. Malformed pieces are skipped.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
            value = value.trim().to_string();
        }
        out.push((key.trim().to_string(), value));
    }
}

/// The scope a pull request needs, from its path: `/v2/<repo>/{manifests,blobs,tags,referrers}/…` →
/// `repository:<repo>:pull`. The endpoint is the last marker in the path (a repository may be called
/// `manifests` or `blobs`). `None` for other paths (no token needed up front).
pub fn scope_for_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    let i = ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .filter_map(|m| rest.rfind(m))
        .max()?;
    Some(format!("repository:{}:pull", &rest[..i]))
}

struct Cached {
    header: HeaderValue,
    renew_at: Instant,
    /// Harbor refused it although it was fresh (see [`REFUSED_LIFE`]).
    refused: bool,
}

/// A cached token for a scope.
#[derive(Debug, Clone)]
pub struct Token {
    pub header: HeaderValue,
    /// Harbor refused this token moments ago: send it, but do not fetch another one yet.
    pub refused: bool,
}

/// What a token fetch gives the requests that waited for it.
type Fetched = Result<HeaderValue, String>;

/// One core's token state.
pub struct TokenCache {
    tokens: RefCell<Cache<String, Cached>>,
    flights: Rc<Flights<Fetched>>,
    /// Token fetches and cache hits, read by the metrics.
    stats: Arc<super::Stats>,
    /// The realm and service of the last challenge seen: where to ask for tokens before a request
    /// is challenged (one request for the scopes of a whole fan-out).
    service: RefCell<Option<Challenge>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache::new(Arc::default())
    }
}

impl TokenCache {
    pub fn new(stats: Arc<super::Stats>) -> TokenCache {
        TokenCache {
            tokens: RefCell::new(Cache::new(TOKENS_PER_CORE)),
            flights: Rc::default(),
            stats,
            service: RefCell::new(None),
        }
    }
}

/// What a caller should do to get a token for a scope.
pub enum Ticket {
    /// A fresh cached token.
    Ready(HeaderValue),
    /// Nobody is fetching it: fetch, then call [`FetchGuard::finish`] (dropped unfinished, it lets
    /// the waiters fetch themselves).
    Fetch(FetchGuard),
    /// Someone else is fetching it: await this (an `Err` from the channel means the fetch was
    /// abandoned; ask again).
    Wait(oneshot::Receiver<Fetched>),
}

impl TokenCache {
    /// The cached token for `scope`, if still fresh (or still remembered as refused) at `now`.
    pub fn cached(&self, scope: &str, now: Instant) -> Option<Token> {
        let tokens = self.tokens.borrow();
        let c = tokens.get(scope)?;
        (now < c.renew_at).then(|| Token {
            header: c.header.clone(),
            refused: c.refused,
        })
    }

    pub fn ticket(self: &Rc<Self>, scope: &str, now: Instant) -> Ticket {
        if let Some(t) = self.cached(scope, now) {
            return Ticket::Ready(t.header);
        }
        match self.flights.join(scope) {
            Turn::Follow(rx) => Ticket::Wait(rx),
            Turn::Lead(leader) => {
                self.stats.token_fetches.inc();
                Ticket::Fetch(FetchGuard {
                    cache: self.clone(),
                    scope: scope.to_string(),
                    leader,
                })
            }
        }
    }

    /// Leads the fetch of every scope of `scopes` that has no token at `now` and that nobody is
    /// fetching (as many as fit one request of a few KiB): the batch of scopes that lost a refused
    /// token, fetched in one request. Scopes being fetched already are left to that fetch.
    pub fn lead_all(self: &Rc<Self>, scopes: &[String], now: Instant) -> Vec<FetchGuard> {
        let mut room = MAX_BATCH_QUERY;
        let mut guards = Vec::new();
        for scope in scopes {
            if self.cached(scope, now).is_some() {
                continue;
            }
            room = room.saturating_sub(scope.len() * 3 + 7);
            if room == 0 {
                break;
            }
            if let Turn::Lead(leader) = self.flights.join(scope) {
                guards.push(FetchGuard {
                    cache: self.clone(),
                    scope: scope.clone(),
                    leader,
                });
            }
        }
        if !guards.is_empty() {
            self.stats.token_fetches.inc();
        }
        guards
    }

    /// Drops `rejected` under every scope it is stored for (Harbor answered 401 to it: its signing
    /// key changed, the token was revoked, or the robot changed) and returns those scopes. A newer
    /// token of a scope is kept, and so is a scope's token already remembered as refused (it stays
    /// refused for the rest of [`REFUSED_LIFE`], whatever its siblings of a batch meet).
    pub fn drop_token(&self, rejected: &HeaderValue) -> Vec<String> {
        let dropped = RefCell::new(Vec::new());
        self.tokens.borrow_mut().retain(|scope, c| {
            let keep = c.header != *rejected || c.refused;
            if !keep {
                dropped.borrow_mut().push(scope.clone());
            }
            keep
        });
        dropped.into_inner()
    }

    /// Remembers that Harbor refused `header`, freshly fetched for `scope`, for [`REFUSED_LIFE`].
    pub fn refused(&self, scope: &str, header: HeaderValue, now: Instant) {
        self.tokens.borrow_mut().insert(
            scope.to_string(),
            Cached {
                header,
                renew_at: now + REFUSED_LIFE,
                refused: true,
            },
        );
    }

    /// Token requests this core sent (the coalescing tests count them).
    pub fn fetches(&self) -> u64 {
        self.stats.token_fetches.get()
    }

    /// The realm and service tokens come from, once a challenge named them.
    pub fn service(&self) -> Option<Challenge> {
        self.service.borrow().clone()
    }

    /// Remembers where `challenge` sends clients for tokens.
    pub fn saw(&self, challenge: &Challenge) {
        let mut service = self.service.borrow_mut();
        if service
            .as_ref()
            .is_none_or(|s| s.realm != challenge.realm || s.service != challenge.service)
        {
            *service = Some(Challenge {
                realm: challenge.realm.clone(),
                service: challenge.service.clone(),
                scope: None,
            });
        }
    }

    /// A challenge for the scopes of `scopes` without a fresh token at `now` (as many as fit a
    /// request of a few KiB), at the token service seen last; `None` when fewer than two are
    /// missing (one scope costs one request either way) or no challenge was seen yet.
    pub fn batch(&self, scopes: &[String], now: Instant) -> Option<Challenge> {
        let mut room = MAX_BATCH_QUERY;
        let missing: Vec<&str> = scopes
            .iter()
            .filter(|s| self.cached(s, now).is_none())
            .take_while(|s| {
                room = room.saturating_sub(s.len() * 3 + 7); // percent-encoded, `&scope=`
                room > 0
            })
            .map(String::as_str)
            .collect();
        if missing.len() < 2 {
            return None;
        }
        let service = self.service.borrow().clone()?;
        self.stats.token_fetches.inc();
        Some(Challenge {
            scope: Some(missing.join(" ")),
            ..service
        })
    }

    /// Stores one token fetched for the scopes of `batch` under each of them.
    pub fn store_batch(
        &self,
        batch: &Challenge,
        header: &HeaderValue,
        expires_in: Duration,
        now: Instant,
    ) {
        for scope in batch.scope.iter().flat_map(|s| s.split(' ')) {
            self.store(scope, header.clone(), expires_in, now);
        }
    }

    fn store(&self, scope: &str, header: HeaderValue, expires_in: Duration, now: Instant) {
        let expires_in = expires_in.min(MAX_EXPIRES_IN);
        let margin = RENEW_BEFORE.min(expires_in / 10);
        self.tokens.borrow_mut().insert(
            scope.to_string(),
            Cached {
                header,
                renew_at: now + expires_in - margin,
                refused: false,
            },
        );
    }
}

/// Held by the request fetching a scope's token; dropped unfinished, it lets the waiters fetch.
pub struct FetchGuard {
    cache: Rc<TokenCache>,
    scope: String,
    leader: Leader<Fetched>,
}

impl FetchGuard {
    /// The scope this guard fetches.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Records the outcome: a token (with its life) or an error message, and wakes the waiters.
    pub fn finish(self, result: Result<(HeaderValue, Duration), String>, now: Instant) {
        let shared = match result {
            Ok((header, expires_in)) => {
                self.cache
                    .store(&self.scope, header.clone(), expires_in, now);
                Ok(header)
            }
            Err(e) => Err(e),
        };
        self.leader.finish(shared);
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
