//! The bounded label values, as enums indexing fixed arrays of counters: a label value is an index,
//! never a string built per request. Never an image name, a tag or a client address.

/// A bounded label: its values, each a name and an index into a fixed array of counters.
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    fn index(self) -> usize;
}

/// Defines an enum of label values with `ALL`, `COUNT`, `as_str` and `index` (and [`Label`]).
macro_rules! label {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const COUNT: usize = $name::ALL.len();

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl Label for $name {
            const ALL: &'static [$name] = $name::ALL;
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
            fn index(self) -> usize {
                $name::index(self)
            }
        }
    };
}

label!(
    /// What a request asked for (`endpoint`).
    Requested {
        Base => "base",
        Manifest => "manifest",
        Blob => "blob",
        Tags => "tags",
        Referrers => "referrers",
        Health => "health",
        Other => "other",
    }
);

label!(
    /// The request method (`method`).
    Verb {
        Get => "GET",
        Head => "HEAD",
        Other => "other",
    }
);

label!(
    /// The status class of an answer (`status`).
    StatusClass {
        Informational => "1xx",
        Success => "2xx",
        Redirect => "3xx",
        ClientError => "4xx",
        ServerError => "5xx",
    }
);

impl StatusClass {
    pub fn of(code: http::StatusCode) -> StatusClass {
        match code.as_u16() {
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirect,
            400..=499 => StatusClass::ClientError,
            500.. => StatusClass::ServerError,
            _ => StatusClass::Informational,
        }
    }
}

label!(
    /// How a pull was answered (`route`), in the order the pull's phases run.
    Answered {
        Memory => "memory",
        Negative => "negative",
        Mapped => "mapped",
        FanOut => "fanout",
        Refused => "refused",
        Stale => "stale",
    }
);

label!(
    /// Why a tag was answered with its last-known-good digest (`reason`): every project that could
    /// confirm it answered 429 (rate_limited), 503 or had its circuit open (unavailable), or failed
    /// otherwise: no answer, a timeout, 502, 504 (failed).
    StaleReason {
        RateLimited => "rate_limited",
        Unavailable => "unavailable",
        Failed => "failed",
    }
);

label!(
    /// Where a lookup looked (`layer`).
    Layer {
        Core => "core",
        Memory => "memory",
        Process => "process",
        Redis => "redis",
    }
);

label!(
    /// What a lookup found (`result`).
    LookupResult {
        Hit => "hit",
        Stale => "stale",
        Negative => "negative",
        Miss => "miss",
    }
);

label!(
    /// Why a race ran (`kind`): a client's request, or the background refresh of a stale mapping.
    RaceKind {
        Request => "request",
        Refresh => "refresh",
    }
);

label!(
    /// How a race ended (`outcome`).
    RaceOutcome {
        Found => "found",
        NotFound => "not_found",
        Failed => "failed",
    }
);

label!(
    /// What a request that shared another's request to Harbor asked for (`kind`).
    SharedKind {
        Manifest => "manifest",
        TagList => "tag_list",
        Blob => "blob",
    }
);

label!(
    /// Why the router refused a request itself (`reason`).
    Rejected {
        RateLimit => "rate_limit",
        FanOutBudget => "fanout_budget",
        Invalid => "invalid",
    }
);

label!(
    /// Why a request to Harbor got no usable answer (`kind`).
    ErrorKind {
        Connect => "connect",
        Timeout => "timeout",
        ServerError => "5xx",
        Protocol => "protocol",
        Token => "token",
    }
);

label!(
    /// Where a project's circuit went (`to`).
    Circuit {
        Open => "open",
        Closed => "closed",
    }
);

/// A project's circuit (`lane`): the breaker's own type (see `upstream::breaker`).
pub use crate::upstream::breaker::Lane;

impl Label for Lane {
    const ALL: &'static [Lane] = Lane::ALL;
    fn as_str(self) -> &'static str {
        Lane::as_str(self)
    }
    fn index(self) -> usize {
        Lane::index(self)
    }
}

/// The Redis link's state (`state`): the link's own type (`off` when `REDIS_SENTINELS` is not set).
pub use crate::share::Status as RedisState;

impl Label for RedisState {
    const ALL: &'static [RedisState] = RedisState::ALL;
    fn as_str(self) -> &'static str {
        RedisState::as_str(self)
    }
    fn index(self) -> usize {
        RedisState::index(self)
    }
}
