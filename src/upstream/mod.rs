//! The client side: requests from the router to Harbor. [`Upstream`] is one core's client (the
//! discovery thread has its own): it builds requests for Harbor's origin, runs the registry token flow
//! ([`auth`]), and sends them through the core's keep-alive [`pool`]. Response bodies come back
//! streaming ([`pool::UpstreamBody`]), never collected, except the small ones this module reads itself
//! (token answers, 401 bodies).
//!
//! Registry requests use the token flow ([`AuthMode::Registry`], explained in docs/architecture.md,
//! "The upstream client"); Harbor API requests (discovery) use Basic. A client's own `Authorization`
//! header is never used here.

pub mod auth;
pub mod breaker;
pub mod pool;
pub mod tls;

use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use rustls::pki_types::ServerName;

use crate::clock::Clock;
use crate::config::{Config, Credentials, HarborUrl};
use crate::counter::{Counter, Gauge};
use auth::{scope_for_path, Challenge, Ticket, TokenCache};
use pool::{Pool, PoolStats, Target, UpstreamBody};

/// Largest body this module reads whole (token answers, error bodies it discards).
const SMALL_BODY_LIMIT: usize = 64 * 1024;

/// Why a request to Harbor failed without an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no address is known for Harbor's host (DNS failed)")]
    NoAddress,
    #[error("cannot connect to Harbor: {0}")]
    Connect(std::io::Error),
    #[error("connecting to Harbor took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake with Harbor failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP handshake with Harbor failed: {0}")]
    Handshake(hyper::Error),
    #[error("request to Harbor failed: {0}")]
    Request(hyper::Error),
    #[error("Harbor did not answer within {0:?}")]
    ResponseTimeout(Duration),
    #[error("token request failed: {0}")]
    Token(String),
    #[error("the request path is not a valid URI: {0}")]
    BadPath(String),
}

impl UpstreamError {
    /// The connection failed before any response came back (closed, reset, cancelled), so a GET or
    /// HEAD may be sent again on another one. A parse error or a timeout is not retried: another
    /// try would meet the same answer.
    pub fn before_response(&self) -> bool {
        match self {
            UpstreamError::Request(e) => !(e.is_parse() || e.is_user() || e.is_timeout()),
            _ => false,
        }
    }
}

/// How a request authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Registry `/v2/` request: cached token, or the challenge → token → retry flow.
    Registry,
    /// Harbor API request: the robot's Basic credentials.
    Basic,
}

/// The configuration the client to Harbor reads: its slice of [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: HarborUrl,
    pub ca_file: Option<String>,
    pub credentials: Option<Credentials>,
    pub http2: bool,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            url: config.harbor_url.clone(),
            ca_file: config.harbor_ca_file.clone(),
            credentials: config.harbor_credentials.clone(),
            http2: config.http2_prior_knowledge,
            connect_timeout: config.upstream_connect_timeout,
            response_timeout: config.upstream_response_timeout,
            max_idle: config.max_idle_conns_per_host,
            idle_timeout: config.idle_conn_timeout,
        }
    }
}

/// Harbor as every core's client reaches it: origin, resolved addresses, TLS, credentials. Built
/// once at start, shared read-only.
pub struct Harbor {
    target: Arc<Target>,
    origin: HarborUrl,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host_header: HeaderValue,
    basic: Option<HeaderValue>,
    response_timeout: Duration,
}

impl Harbor {
    /// Builds the shared client from its settings: TLS config, resolved addresses.
    pub fn new(settings: &Settings) -> anyhow::Result<Arc<Harbor>> {
        let url = &settings.url;
        let tls = if url.tls {
            let tls = tls::client_config(settings.ca_file.as_deref(), settings.http2)?;
            let name = ServerName::try_from(url.host.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "HARBOR_URL host {:?} is not a TLS server name: {e}",
                    url.host
                )
            })?;
            Some((tls, name))
        } else {
            None
        };
        let mut resolved = resolve(url);
        resolved.sort();
        let addrs = Arc::new(ArcSwap::from_pointee(resolved));
        let target = Arc::new(Target {
            addrs,
            tls,
            http2: settings.http2,
            connect_timeout: settings.connect_timeout,
            body_stall_timeout: settings.response_timeout,
            max_idle: settings.max_idle,
            idle_timeout: settings.idle_timeout,
        });
        let origin = url.origin();
        let uri: Uri = origin.parse()?;
        let basic = settings.credentials.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password.expose());
            let mut v = HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ))
            .expect("base64 is a valid header value");
            v.set_sensitive(true);
            v
        });
        Ok(Arc::new(Harbor {
            target,
            origin: url.clone(),
            scheme: uri.scheme().cloned().expect("origin has a scheme"),
            authority: uri.authority().cloned().expect("origin has an authority"),
            host_header: HeaderValue::from_str(uri.authority().expect("authority").as_str())?,
            basic,
            response_timeout: settings.response_timeout,
        }))
    }

    /// Resolves Harbor's host again (blocking: call it off the data-plane cores) and publishes the
    /// result if it is not empty.
    pub fn refresh_addresses(&self) {
        let mut addrs = resolve(&self.origin);
        addrs.sort();
        if !addrs.is_empty() && *self.target.addrs.load_full() != addrs {
            tracing::info!(addrs = ?addrs, "Harbor's addresses changed");
            self.target.addrs.store(Arc::new(addrs));
        }
    }
}

fn resolve(url: &HarborUrl) -> Vec<SocketAddr> {
    match (url.host.as_str(), url.port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            tracing::warn!(host = %url.host, error = %e, "cannot resolve Harbor's host yet");
            Vec::new()
        }
    }
}

/// One core's client to Harbor.
pub struct Upstream {
    harbor: Arc<Harbor>,
    pool: Rc<Pool>,
    tokens: Rc<TokenCache>,
    /// This core's own copies of values cloned into every request: cloning the shared ones would
    /// write their (atomic) reference counts from every core.
    authority: http::uri::Authority,
    host_header: HeaderValue,
    stats: Arc<Stats>,
    /// Decides when tokens are renewed and how long a refusal is remembered.
    clock: Clock,
}

/// One core's client counters: written by that core, read by the metrics scrape.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_opened: Counter,
    /// Connections whose task is running (HTTP/1.1 and HTTP/2).
    pub open: Gauge,
    /// Idle HTTP/1.1 connections in the pool.
    pub idle: Gauge,
    pub requests: Counter,
    /// Requests sent on a pooled connection.
    pub reused: Counter,
    /// Requests sent again after a pooled connection failed before any answer.
    pub retried: Counter,
    /// Token requests to Harbor's token service (one per scope or batch of scopes).
    pub token_fetches: Counter,
    /// Cached tokens Harbor refused before they expired (each dropped and fetched again).
    pub tokens_refused: Counter,
    /// HTTP/2 with prior knowledge met a Harbor that does not speak it (then HTTP/1.1 is used).
    pub h2c_refused: Counter,
    /// Requests sent with a fresh token from the cache (no challenge, no token request).
    pub token_hits: Counter,
}

impl Upstream {
    /// Call on the thread (and inside the monoio runtime) that will use it; `clock` decides token
    /// lives.
    pub fn new(harbor: Arc<Harbor>, clock: Clock) -> Upstream {
        let authority = http::uri::Authority::try_from(harbor.authority.as_str())
            .expect("an authority parses again");
        let host_header = HeaderValue::from_bytes(harbor.host_header.as_bytes())
            .expect("a header value parses again");
        let stats = Arc::new(Stats::default());
        Upstream {
            pool: Pool::new(harbor.target.clone(), stats.clone()),
            harbor,
            tokens: Rc::new(TokenCache::new(stats.clone())),
            stats,
            authority,
            host_header,
            clock,
        }
    }

    /// This client's counters, for the metrics.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Idle HTTP/1.1 connections in this core's pool.
    pub fn idle_count(&self) -> usize {
        self.pool.idle_count()
    }

    /// Whether requests to Harbor share an HTTP/2 connection (offered, and not declined).
    pub fn multiplexed(&self) -> bool {
        self.pool.multiplexed()
    }

    /// Whether an absolute URL points at Harbor itself (`HARBOR_URL`'s host and port).
    pub fn is_harbor(&self, uri: &Uri) -> bool {
        let origin = &self.harbor.origin;
        let Some(host) = uri.host() else { return false };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let default = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        host.eq_ignore_ascii_case(&origin.host) && uri.port_u16().unwrap_or(default) == origin.port
    }

    /// Token fetches this client started.
    pub fn token_fetches(&self) -> u64 {
        self.tokens.fetches()
    }

    /// Sends a GET or HEAD for `path_and_query` on Harbor with `headers`, authenticating per `auth`.
    ///
    /// Registry requests go with the scope's cached token. A 401 with a challenge to a request that
    /// had none is the token flow's first step (fetch, then send again); a 401 with a challenge,
    /// Basic or Bearer, to a request that carried a token means Harbor refused it: the token is
    /// dropped under every scope it was stored for, fetched again (in one request for all those
    /// scopes) and the request sent once more. A fresh token refused too is remembered as refused
    /// for its scope ([`auth::REFUSED_LIFE`]) and the 401 returned. A 401 without a challenge is an
    /// answer (Harbor relays its upstream's refusal of a blob that way) and is returned as it is.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        auth: AuthMode,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut req = self.request(method.clone(), path_and_query, headers)?;
        if auth == AuthMode::Basic {
            return self.send_basic(req).await;
        }
        let scope = scope_for_path(req.uri().path());
        let sent = scope
            .as_ref()
            .and_then(|s| self.tokens.cached(s, self.clock.now()));
        if let Some(token) = &sent {
            self.stats.token_hits.inc();
            req.headers_mut()
                .insert(AUTHORIZATION, token.header.clone());
        }
        let res = self.send_timed(req).await?;
        if res.status() != StatusCode::UNAUTHORIZED {
            return Ok(res);
        }
        // Harbor sends an empty challenge when it cannot tell the project (a project deleted since
        // discovery): not a verdict on the token.
        let Some(challenge) = res
            .headers()
            .get(WWW_AUTHENTICATE)
            .filter(|v| challenges(v))
        else {
            return Ok(res);
        };
        let bearer = challenge.to_str().ok().and_then(Challenge::parse);
        if let Some(c) = &bearer {
            self.tokens.saw(c);
        }
        let token = match (&sent, bearer) {
            // Refused moments ago with a fresh token: Harbor does not let the robot pull this.
            (Some(t), _) if t.refused => return Ok(res),
            (Some(t), bearer) => {
                // Harbor refused a token we still believed in: never send it again. The scopes
                // that lose it are claimed for one new token request before anything else runs,
                // so the requests that meet the same refusal wait for that one.
                let mut scopes = self.tokens.drop_token(&t.header);
                if !scopes.is_empty() {
                    self.stats.tokens_refused.inc();
                    tracing::debug!(
                        scopes = scopes.len(),
                        "Harbor refused a cached token; fetching a new one"
                    );
                }
                let scope = scope.clone().unwrap_or_default();
                // This request's scope first, so it is in the batch whatever its size.
                scopes.retain(|s| *s != scope);
                scopes.insert(0, scope.clone());
                let guards = self.tokens.lead_all(&scopes, self.clock.now());
                self.drain(res.into_body()).await;
                // Boxed: a rare path, kept out of the size of every request's future.
                Box::pin(self.refetch(bearer, scope, guards)).await?
            }
            (None, Some(c)) => {
                self.drain(res.into_body()).await;
                Box::pin(self.bounded(self.token(&c))).await?
            }
            // A Basic challenge to a request that carried no token: nothing to fetch.
            (None, None) => return Ok(res),
        };
        let mut req = self.request(method, path_and_query, headers)?;
        req.headers_mut().insert(AUTHORIZATION, token.clone());
        let res = self.send_timed(req).await?;
        let challenged = res.headers().get(WWW_AUTHENTICATE).is_some_and(challenges);
        if res.status() == StatusCode::UNAUTHORIZED && challenged {
            // A fresh token refused too: remembered, so the next pulls do not each cost Harbor a
            // token request.
            if let Some(scope) = &scope {
                self.tokens.refused(scope, token, self.clock.now());
            }
        }
        Ok(res)
    }

    /// `fut` within the response timeout.
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        let limit = self.harbor.response_timeout;
        monoio::time::timeout(limit, fut)
            .await
            .map_err(|_| UpstreamError::ResponseTimeout(limit))?
    }

    /// A new token for `scope` after Harbor refused the one stored for it: one request for the
    /// scopes of `guards` (those that lost the token and that nobody else was fetching), or the
    /// fetch in flight for `scope`. The token service is the one `bearer` names, else the one seen
    /// last, else the one an unauthenticated `GET /v2/` names.
    async fn refetch(
        &self,
        bearer: Option<Challenge>,
        scope: String,
        guards: Vec<auth::FetchGuard>,
    ) -> Result<HeaderValue, UpstreamError> {
        let service = match bearer.or_else(|| self.tokens.service()) {
            Some(s) => s,
            None => self.bounded(self.discover_service()).await?,
        };
        let own = Challenge {
            scope: Some(scope.clone()),
            ..service.clone()
        };
        if guards.is_empty() {
            // Another request is fetching this scope's token: share it.
            return self.bounded(self.token(&own)).await;
        }
        let scopes: Vec<&str> = guards.iter().map(|g| g.scope()).collect();
        let led = scopes.contains(&scope.as_str());
        let batch = Challenge {
            scope: Some(scopes.join(" ")),
            ..service
        };
        let result = self.bounded(self.fetch_token(&batch)).await;
        let now = self.clock.now();
        for guard in guards {
            guard.finish(shared(&result), now);
        }
        match result {
            Ok((h, _)) if led => Ok(h),
            Ok(_) => self.bounded(self.token(&own)).await,
            Err(e) => Err(e),
        }
    }

    /// The token service, from the challenge to an unauthenticated `GET /v2/` (first contact).
    async fn discover_service(&self) -> Result<Challenge, UpstreamError> {
        let req = self.request(Method::GET, "/v2/", &HeaderMap::new())?;
        let res = self.send_timed(req).await?;
        let challenge = res
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse);
        self.drain(res.into_body()).await;
        let challenge = challenge
            .ok_or_else(|| UpstreamError::Token("Harbor's /v2/ names no token service".into()))?;
        self.tokens.saw(&challenge);
        Ok(Challenge {
            scope: None,
            ..challenge
        })
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<Request<Empty<Bytes>>, UpstreamError> {
        let uri = Uri::builder()
            .scheme(self.harbor.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| UpstreamError::BadPath(format!("{path_and_query:?}: {e}")))?;
        let mut req = Request::new(Empty::new());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers.clone();
        req.headers_mut().insert(HOST, self.host_header.clone());
        Ok(req)
    }

    /// Reads a small body to its end (so its connection can be reused), within the response timeout;
    /// a body that is large or stalls is dropped with its connection instead.
    pub async fn drain(&self, body: UpstreamBody) {
        self.read_small(body).await;
    }

    /// Like [`Upstream::drain`], keeping what was read: `None` when the body was too large, stalled
    /// or broke.
    pub async fn read_small(&self, body: UpstreamBody) -> Option<Bytes> {
        let limit = self.harbor.response_timeout;
        let read = Limited::new(body, SMALL_BODY_LIMIT).collect();
        let collected = monoio::time::timeout(limit, read).await.ok()?.ok()?;
        Some(collected.to_bytes())
    }

    /// Sends with the robot's Basic credentials (anonymous when none are configured).
    async fn send_basic(
        &self,
        mut req: Request<Empty<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if let Some(b) = &self.harbor.basic {
            req.headers_mut().insert(AUTHORIZATION, b.clone());
        }
        self.send_timed(req).await
    }

    async fn send_timed(
        &self,
        req: Request<Empty<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let limit = self.harbor.response_timeout;
        monoio::time::timeout(limit, self.pool.send(req))
            .await
            .map_err(|_| UpstreamError::ResponseTimeout(limit))?
    }

    /// Fetches one token for every repository of `repositories` this core holds no fresh token
    /// for, in one request to the token service (it takes repeated `scope` parameters), so a fan-out
    /// costs Harbor one password check, not one per project. Does nothing before the first
    /// challenge (the token service is not known yet) or for fewer than two missing scopes; waits
    /// at most `within`; a failure is left to each request's own challenge. A scope the robot may
    /// not pull gets the batch's token too; Harbor refuses it, and the challenge flow takes over.
    pub async fn prefetch_tokens(
        &self,
        repositories: impl Iterator<Item = String>,
        within: Duration,
    ) {
        let scopes: Vec<String> = repositories
            .map(|r| format!("repository:{r}:pull"))
            .collect();
        let Some(batch) = self.tokens.batch(&scopes, self.clock.now()) else {
            return;
        };
        let limit = within.min(self.harbor.response_timeout);
        match monoio::time::timeout(limit, self.fetch_token(&batch)).await {
            Ok(Ok((header, ttl))) => {
                self.tokens
                    .store_batch(&batch, &header, ttl, self.clock.now())
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "batched token request failed"),
            Err(_) => tracing::debug!("batched token request timed out"),
        }
    }

    /// A token for the challenged scope: cached, shared with a fetch in flight, or fetched.
    async fn token(&self, challenge: &Challenge) -> Result<HeaderValue, UpstreamError> {
        let key = challenge.key();
        loop {
            match self.tokens.ticket(&key, self.clock.now()) {
                Ticket::Ready(h) => return Ok(h),
                Ticket::Wait(rx) => match rx.await {
                    Ok(Ok(h)) => return Ok(h),
                    Ok(Err(msg)) => return Err(UpstreamError::Token(msg)),
                    Err(_) => continue, // the fetching request was cancelled: try ourselves
                },
                Ticket::Fetch(guard) => {
                    let result = self.fetch_token(challenge).await;
                    guard.finish(shared(&result), self.clock.now());
                    return result.map(|(h, _)| h);
                }
            }
        }
    }

    async fn fetch_token(
        &self,
        challenge: &Challenge,
    ) -> Result<(HeaderValue, Duration), UpstreamError> {
        let realm: Uri = challenge
            .realm
            .parse()
            .map_err(|_| UpstreamError::Token(format!("unusable realm {:?}", challenge.realm)))?;
        let mut query = String::new();
        if let Some(service) = &challenge.service {
            query.push_str("service=");
            query.push_str(&encode_query(service));
        }
        for scope in challenge.scope.iter().flat_map(|s| s.split(' ')) {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str("scope=");
            query.push_str(&encode_query(scope));
        }
        let path = format!("{}?{query}", realm.path());
        let req = self.request(Method::GET, &path, &HeaderMap::new())?;
        let res = self.send_basic(req).await?;
        let status = res.status();
        let limit = self.harbor.response_timeout;
        let body = monoio::time::timeout(
            limit,
            Limited::new(res.into_body(), SMALL_BODY_LIMIT).collect(),
        )
        .await
        .map_err(|_| UpstreamError::Token(format!("answer not read within {limit:?}")))?
        .map_err(|e| UpstreamError::Token(format!("unreadable answer: {e}")))?
        .to_bytes();
        if !status.is_success() {
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                tracing::warn!(%status, "Harbor's token service refused the robot's credentials");
            }
            return Err(UpstreamError::Token(format!(
                "token service answered {status}"
            )));
        }
        parse_token(&body)
    }
}

/// A token fetch's result as the requests that waited for it get it.
fn shared(
    result: &Result<(HeaderValue, Duration), UpstreamError>,
) -> Result<(HeaderValue, Duration), String> {
    match result {
        Ok((h, ttl)) => Ok((h.clone(), *ttl)),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether a `WWW-Authenticate` value is a challenge at all (Harbor sends an empty one for a project
/// it does not know: `src/server/middleware/v2auth/auth.go`, `check`).
pub fn challenges(value: &HeaderValue) -> bool {
    !value.as_bytes().iter().all(u8::is_ascii_whitespace)
}

/// `{"token": …}` or `{"access_token": …}`, with `expires_in` seconds.
fn parse_token(body: &[u8]) -> Result<(HeaderValue, Duration), UpstreamError> {
    #[derive(serde::Deserialize)]
    struct TokenAnswer {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let t: TokenAnswer = serde_json::from_slice(body)
        .map_err(|e| UpstreamError::Token(format!("answer is not a token: {e}")))?;
    let token = t
        .token
        .or(t.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| UpstreamError::Token("answer holds no token".into()))?;
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| UpstreamError::Token("token is not a valid header value".into()))?;
    header.set_sensitive(true);
    let ttl = t
        .expires_in
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s).min(auth::MAX_EXPIRES_IN))
        .unwrap_or(auth::DEFAULT_EXPIRES_IN);
    Ok((header, ttl))
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encoding() {
        assert_eq!(
            encode_query("repository:dockerhub/library/nginx:pull"),
            "repository%3Adockerhub%2Flibrary%2Fnginx%3Apull"
        );
        assert_eq!(encode_query("harbor-registry"), "harbor-registry");
    }

    #[test]
    fn token_answers() {
        let (h, ttl) = parse_token(br#"{"token":"abc","expires_in":1800}"#).unwrap();
        assert_eq!(h, "Bearer abc");
        assert!(h.is_sensitive());
        assert_eq!(ttl, Duration::from_secs(1800));
        let (h, ttl) = parse_token(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(h, "Bearer xyz");
        assert_eq!(ttl, auth::DEFAULT_EXPIRES_IN);
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
        assert!(parse_token(br#"{"token":"a\nb"}"#).is_err());
        let (_, ttl) = parse_token(br#"{"token":"a","expires_in":18446744073709551615}"#).unwrap();
        assert_eq!(ttl, auth::MAX_EXPIRES_IN);
    }
}
