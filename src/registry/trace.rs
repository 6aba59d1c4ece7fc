//! What one request did, for its metrics and its access-log line: how it was answered, which project
//! served it, how many requests went to Harbor, and its request id. The id is the client's
//! `X-Request-Id` when it sent a sensible one, else one made here; it goes to Harbor with every
//! request of the pull and back to the client, so a pull can be followed into Harbor's logs.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use crate::config::AccessLog;
use crate::metrics::labels::{Answered, Requested};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id passed on.
const MAX_ID: usize = 128;

pub struct Trace {
    pub started: Instant,
    pub id: HeaderValue,
    /// How the pull was answered (`Refused` until a phase says otherwise).
    pub route: Answered,
    /// The project that answered; kept only when the access log may print it.
    pub project: Option<String>,
    /// Requests sent to Harbor for this pull.
    pub attempts: u32,
    keep_project: bool,
}

impl Trace {
    pub fn new(client: &HeaderMap, make_id: impl FnOnce() -> HeaderValue, log: AccessLog) -> Trace {
        let id = client
            .get(&REQUEST_ID)
            .filter(|v| sensible_id(v.as_bytes()))
            .cloned()
            .unwrap_or_else(make_id);
        Trace {
            started: Instant::now(),
            id,
            route: Answered::Refused,
            project: None,
            attempts: 0,
            keep_project: log != AccessLog::Off,
        }
    }

    /// The project that answered (or was asked, for a mapped request).
    pub fn project(&mut self, name: &str) {
        if self.keep_project {
            self.project = Some(name.to_string());
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Visible ASCII without spaces or quotes, at most [`MAX_ID`] bytes.
fn sensible_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_ID && v.iter().all(|b| b.is_ascii_graphic() && *b != b'"')
}

/// The access-log line of one answered request, when `log` asks for it.
#[allow(clippy::too_many_arguments)]
pub fn log(
    log: AccessLog,
    trace: &Trace,
    method: &Method,
    endpoint: Requested,
    name: Option<&str>,
    status: StatusCode,
    bytes: Option<u64>,
    client: IpAddr,
) {
    let wanted = match log {
        AccessLog::Off => false,
        // A stale answer is a 200 that stands in for a failure: logged with the errors.
        AccessLog::Errors => status.as_u16() >= 400 || trace.route == Answered::Stale,
        AccessLog::All => true,
    };
    if !wanted {
        return;
    }
    tracing::info!(
        target: "access",
        request_id = trace.id.to_str().unwrap_or(""),
        method = method.as_str(),
        endpoint = endpoint.as_str(),
        name = name.unwrap_or(""),
        status = status.as_u16(),
        // `/v2/` is no pull: it has no route (it is not refused).
        route = if endpoint == Requested::Base { "" } else { trace.route.as_str() },
        project = trace.project.as_deref().unwrap_or(""),
        attempts = trace.attempts,
        // Whole microseconds, in milliseconds: `23.245`, not `23.244752000000002`.
        duration_ms = trace.elapsed().as_micros() as f64 / 1000.0,
        bytes = bytes.unwrap_or(0),
        client = %client,
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_id_is_kept_when_sensible() {
        let make = || HeaderValue::from_static("made");
        let mut h = HeaderMap::new();
        let t = Trace::new(&h, make, AccessLog::Off);
        assert_eq!(t.id, "made");
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(Trace::new(&h, make, AccessLog::Off).id, "abc-123");
        for bad in ["has space", "quo\"te", ""] {
            h.insert(REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            assert_eq!(Trace::new(&h, make, AccessLog::Off).id, "made", "{bad:?}");
        }
        h.insert(REQUEST_ID, HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(Trace::new(&h, make, AccessLog::Off).id, "made");
    }

    #[test]
    fn the_project_is_kept_only_for_the_log() {
        let h = HeaderMap::new();
        let mk = || HeaderValue::from_static("i");
        let mut off = Trace::new(&h, mk, AccessLog::Off);
        off.project("dockerhub");
        assert_eq!(off.project, None);
        let mut on = Trace::new(&h, mk, AccessLog::Errors);
        on.project("dockerhub");
        assert_eq!(on.project.as_deref(), Some("dockerhub"));
    }
}
