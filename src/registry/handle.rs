//! Answers one request on a core: parse it into a [`Route`], answer what the router answers itself
//! (`/v2/`, health, refusals), and hand the pull endpoints to [`pull`]. This is the registry's
//! [`Handler`] for the server.

use std::rc::Rc;

use http::header::CONTENT_LENGTH;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::Body;
use crate::config::AccessLog;
use crate::metrics::health::{self, Facts, Probe};
use crate::metrics::labels::{Rejected, Requested, Verb};
use crate::registry::route::{self, Route};
use crate::server::Handler;

use super::mirror::{self, MirrorRequest};
use super::pull;
use super::respond::{error, json, API_VERSION, API_VERSION_HEADER};
use super::state::State;
use super::trace::{self, Trace, REQUEST_ID};

/// The registry a mirror answer is for (the distribution spec's "Registry Proxying").
const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");

impl Handler for State {
    type Body = Body;

    async fn handle(self: Rc<Self>, req: Request<Incoming>) -> Response<Body> {
        handle(&self, req).await
    }

    fn drained(&self) {
        State::drained(self);
    }
}

/// Routes and answers one request. Never fails: every problem becomes a registry error response.
/// Counts it, and logs it as `ACCESS_LOG` asks.
pub async fn handle<B>(state: &Rc<State>, req: Request<B>) -> Response<Body> {
    let (parts, _body) = req.into_parts();
    // A mirror request names its registry (`ns`): it may use the root form too.
    let ns = mirror::ns_of(parts.uri.query());
    let parsed = match ns {
        Some(_) => route::parse_mirror(&parts.method, parts.uri.path(), state.proxy_project()),
        None => route::parse(&parts.method, parts.uri.path(), state.proxy_project()),
    };
    let endpoint = match &parsed {
        Ok(Route::Base) => Requested::Base,
        Ok(Route::Healthz | Route::Readyz) => Requested::Health,
        Ok(Route::Manifest { .. }) => Requested::Manifest,
        Ok(Route::Blob { .. }) => Requested::Blob,
        Ok(Route::TagsList { .. }) => Requested::Tags,
        Ok(Route::Referrers { .. }) => Requested::Referrers,
        Err(_) => Requested::Other,
    };
    let method = match parts.method {
        Method::GET => Verb::Get,
        Method::HEAD => Verb::Head,
        _ => Verb::Other,
    };
    let name = parsed.as_ref().ok().and_then(Route::name);
    let access = state.settings.access_log;
    let mut trace = Trace::new(&parts.headers, || state.request_id(), access);
    let client = state.client_ip(&parts);
    let namespace = ns.as_ref().and_then(|n| n.as_ref().ok()).cloned();
    let mut res = answer(state, &parts, parsed, ns, client, &mut trace).await;
    let status = res.status();
    let metrics = state.metrics();
    metrics.request(endpoint, method, status);
    let pull = !matches!(
        endpoint,
        Requested::Base | Requested::Health | Requested::Other
    );
    if pull {
        metrics.pull(trace.route, endpoint == Requested::Blob, trace.elapsed());
    }
    if access != AccessLog::Off && endpoint != Requested::Health {
        let bytes = res
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        trace::log(
            access,
            &trace,
            &parts.method,
            endpoint,
            name,
            status,
            bytes,
            client,
        );
    }
    res.headers_mut().insert(REQUEST_ID, trace.id);
    if let Some(Ok(v)) = namespace.map(|n| HeaderValue::from_str(&n)) {
        // The distribution spec's "Registry Proxying": the registry the answer is for.
        res.headers_mut().insert(OCI_NAMESPACE, v);
    }
    res
}

async fn answer(
    state: &Rc<State>,
    parts: &http::request::Parts,
    parsed: Result<Route<'_>, crate::error::Error>,
    ns: Option<Result<String, crate::error::Error>>,
    client: std::net::IpAddr,
    trace: &mut Trace,
) -> Response<Body> {
    match parsed {
        // Probes are never limited.
        Ok(Route::Healthz) => return health(state, Probe::Liveness),
        Ok(Route::Readyz) => return health(state, Probe::Readiness),
        _ => {}
    }
    if let Err(e) = state.budgets.admit_request(client) {
        state.metrics().rejected(Rejected::RateLimit);
        return error(&e);
    }
    let route = match parsed {
        Ok(r) => r,
        Err(e) => {
            state.metrics().rejected(Rejected::Invalid);
            tracing::debug!(method = %parts.method, path = parts.uri.path(), code = e.code(), "refused");
            return error(&e);
        }
    };
    let mut res = match route {
        Route::Base => json(StatusCode::OK, &b"{}"[..]),
        _ => match ns.transpose() {
            Ok(registry) => {
                let root = route::proxy_tail(parts.uri.path(), state.proxy_project()).is_none();
                let mirror = registry.map(|registry| MirrorRequest { registry, root });
                pull::serve(state, parts, &route, client, mirror, trace).await
            }
            Err(e) => {
                state.metrics().rejected(Rejected::Invalid);
                error(&e)
            }
        },
    };
    res.headers_mut()
        .entry(API_VERSION_HEADER)
        .or_insert(API_VERSION);
    res
}

/// `/healthz` and `/readyz` (see [`crate::metrics::health`]: the same answer the metrics port
/// gives). The body names the worker that answered, so an operator (or a test) can see every core
/// serving.
fn health(state: &State, probe: Probe) -> Response<Body> {
    let view = state.view();
    let stuck = state.stuck_workers();
    let facts = Facts {
        list: view.as_deref().map(|s| (s, s.age(state.clock.now()))),
        stuck: &stuck,
        redis: state.redis_status(),
    };
    let (ok, mut body) = health::decide(probe, &facts);
    body["worker"] = state.worker().into();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body.to_string())
}
