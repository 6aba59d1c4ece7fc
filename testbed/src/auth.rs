//! Who a request is, as Harbor's core decides it, and what it may pull. Harbor authenticates every
//! request itself and talks to its registry with credentials of its own, so the stand-in does the
//! same: it checks the tokens it issued and forwards to the real registry with an internal token.
//!
//! Harbor's rules (goharbor/harbor main, checked against v2.9–v2.15):
//! - `src/server/middleware/security/`: the first generator that recognises the request wins. A
//!   bearer token (`v2_token.go`) counts only when its signature, times (60 s leeway), audience and
//!   issue time (after the project's creation) check out; otherwise the request falls through to
//!   anonymous. Basic credentials (`robot.go`, `basic_auth.go`): a wrong, expired or disabled robot is
//!   not refused but anonymous.
//! - `src/common/security/v2token/context.go`: a valid token grants what its `access` list names, by
//!   *project* (the first path segment of each entry), nothing else, public projects included.
//!   Anonymous may pull public projects.
//! - `src/server/middleware/v2auth/auth.go` (`getChallenge`): a refused `/v2/` request that carried
//!   `Authorization` gets `401 WWW-Authenticate: Basic realm="harbor"`; only a request without one gets
//!   the Bearer challenge. A GET or HEAD of a repository without `Authorization` is always challenged
//!   (#11271), public or not.
//!
//! The switches: [`Auth::rotate`] (a redeploy with a new signing key), [`Auth::revoke`] (tokens
//! issued so far stop counting: a project recreated, clock skew between core pods).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::keys::{TokenKeys, ISSUER};
use crate::standin::{harbor_error, Body, State};
use crate::{ProjectSpec, ADMIN_PASSWORD, ADMIN_USER};

/// Harbor's `common.JwtLeeway`.
const LEEWAY_SECS: i64 = 60;
/// Life of the internal tokens the stand-in sends to its registry.
const INTERNAL_LIFE: Duration = Duration::from_secs(300);

/// Who is calling Harbor's API or token service, from `Authorization`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    Anonymous,
    Robot(String),
    Admin,
}

/// What a `/v2/` request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rights {
    /// No credentials, or credentials Harbor does not accept (bad, expired, refused token).
    Anonymous,
    /// A valid token: its subject (empty for an anonymous one) and actions by project.
    Token {
        subject: String,
        access: HashMap<String, Vec<String>>,
    },
    /// Basic credentials of a caller Harbor accepts.
    Basic(Caller),
}

/// The stand-in's token state: the signing key of the tokens it issues (rotatable), the tokens it
/// issued and revoked, and the internal tokens it gives the registry behind it.
pub(crate) struct Auth {
    /// The key the registry trusts (its `rootcertbundle`): internal tokens, and the registry's own
    /// realm for seeding.
    pub registry_keys: TokenKeys,
    /// The key of the tokens clients get; starts as the registry's, replaced by [`Auth::rotate`].
    signer: Mutex<TokenKeys>,
    /// `jti`s issued, and those [`Auth::revoke`] made worthless.
    issued: Mutex<HashSet<String>>,
    revoked: Mutex<HashSet<String>>,
    /// Internal tokens by repository (`""` for `/v2/` itself), with when to renew them.
    internal: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl Auth {
    pub fn new(registry_keys: TokenKeys) -> Auth {
        Auth {
            signer: Mutex::new(registry_keys.clone()),
            registry_keys,
            issued: Mutex::default(),
            revoked: Mutex::default(),
            internal: Mutex::default(),
        }
    }

    /// A new signing key: every token issued before no longer verifies.
    pub fn rotate(&self) -> anyhow::Result<()> {
        *self.signer.lock().unwrap() = TokenKeys::ephemeral()?;
        Ok(())
    }

    /// Every token issued so far stops counting (its `jti` is refused).
    pub fn revoke(&self) {
        let issued = std::mem::take(&mut *self.issued.lock().unwrap());
        self.revoked.lock().unwrap().extend(issued);
    }

    /// Signs a client token and records its `jti`.
    pub fn issue(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        if let Some(jti) = claims.get("jti").and_then(|j| j.as_str()) {
            self.issued.lock().unwrap().insert(jti.to_string());
        }
        self.signer.lock().unwrap().sign_jwt(claims)
    }

    /// The claims of a client token Harbor would accept now, else `None`.
    fn accepted(&self, token: &str) -> Option<serde_json::Value> {
        let claims = self.signer.lock().unwrap().verify_jwt(token)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let time = |k: &str| claims.get(k).and_then(|v| v.as_i64());
        let fresh = time("exp")? + LEEWAY_SECS >= now
            && time("nbf").unwrap_or(i64::MIN) - LEEWAY_SECS <= now
            && time("iat").is_some();
        let audience = claims.get("aud").and_then(|a| a.as_str()) == Some(crate::registry::SERVICE);
        let jti = claims.get("jti").and_then(|j| j.as_str()).unwrap_or("");
        let revoked = self.revoked.lock().unwrap().contains(jti);
        (fresh && audience && !revoked).then_some(claims)
    }

    /// The `Authorization` value for the registry behind the stand-in: a token with pull (and, for
    /// the admin, push) on `repository`, signed with the key the registry trusts.
    pub fn internal(&self, repository: &str) -> HeaderValue {
        let now = Instant::now();
        let mut cache = self.internal.lock().unwrap();
        if let Some((h, renew)) = cache.get(repository) {
            if now < *renew {
                return h.clone();
            }
        }
        let iat = time::OffsetDateTime::now_utc().unix_timestamp();
        let access = if repository.is_empty() {
            json!([])
        } else {
            json!([{"type": "repository", "name": repository, "actions": ["pull"]}])
        };
        let claims = json!({
            "iss": ISSUER, "sub": "harbor-core", "aud": crate::registry::SERVICE,
            "exp": iat + INTERNAL_LIFE.as_secs() as i64, "nbf": iat - 5, "iat": iat,
            "jti": format!("{:032x}", rand::random::<u128>()), "access": access,
        });
        let token = self
            .registry_keys
            .sign_jwt(&claims)
            .expect("the registry key signs");
        let h = HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is a header");
        cache.insert(repository.to_string(), (h.clone(), now + INTERNAL_LIFE / 2));
        h
    }
}

/// Basic credentials of `headers`, decoded.
fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (u, p) = String::from_utf8(decoded)
        .ok()?
        .split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))?;
    Some((u, p))
}

/// The caller of an API or token request: credentials Harbor does not accept (wrong, or a robot
/// that expired or was disabled) are anonymous, not refused.
pub(crate) fn classify(state: &State, headers: &HeaderMap) -> Caller {
    let Some((user, password)) = basic(headers) else {
        return Caller::Anonymous;
    };
    if user == ADMIN_USER && password == ADMIN_PASSWORD {
        return Caller::Admin;
    }
    match &state.config.robot {
        Some((u, p)) if *u == user && *p == password && !state.switches().robot_refused => {
            Caller::Robot(user)
        }
        _ => Caller::Anonymous,
    }
}

/// What a `/v2/` request may do, by its `Authorization`.
pub(crate) fn rights(state: &State, headers: &HeaderMap) -> Rights {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        let Some(claims) = state.auth.accepted(token.trim()) else {
            return Rights::Anonymous;
        };
        let mut access: HashMap<String, Vec<String>> = HashMap::new();
        for a in claims["access"].as_array().into_iter().flatten() {
            if a["type"] != "repository" {
                continue;
            }
            let project = a["name"]
                .as_str()
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap_or("");
            let actions = a["actions"].as_array().into_iter().flatten();
            // Like Harbor's map by project: a later entry for the same project replaces an earlier.
            access.insert(
                project.to_string(),
                actions
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
            );
        }
        let subject = claims["sub"].as_str().unwrap_or("").to_string();
        return Rights::Token { subject, access };
    }
    match classify(state, headers) {
        Caller::Anonymous => Rights::Anonymous,
        c => Rights::Basic(c),
    }
}

impl Rights {
    /// Harbor's `IsAuthenticated`.
    pub fn authenticated(&self) -> bool {
        match self {
            Rights::Anonymous => false,
            Rights::Token { subject, .. } => !subject.is_empty(),
            Rights::Basic(_) => true,
        }
    }

    /// Whether these rights pull from `project`.
    pub fn may_pull(&self, state: &State, project: &str) -> bool {
        let spec = state.project(project);
        match self {
            Rights::Anonymous => spec.is_some_and(|p| p.public),
            Rights::Token { access, .. } => access
                .get(project)
                .is_some_and(|a| a.iter().any(|x| x == "pull" || x == "*")),
            Rights::Basic(Caller::Admin) => true,
            Rights::Basic(Caller::Robot(_)) => spec.is_some_and(|p| robot_may_pull(state, &p)),
            Rights::Basic(Caller::Anonymous) => false,
        }
    }
}

/// Whether the robot account has pull on `project` (every project, unless the test took it away).
pub(crate) fn robot_may_pull(state: &State, project: &ProjectSpec) -> bool {
    !state.switches().robot_denied.contains(&project.name)
}

/// Harbor's refusal of a `/v2/` request (`v2auth.Middleware`): a request that carried
/// `Authorization` is told `Basic realm="harbor"`; one without is sent to the token service for
/// `scope` (none for `/v2/` itself).
pub(crate) fn refusal(
    state: &State,
    headers: &HeaderMap,
    scope: Option<&str>,
    message: &str,
) -> Response<Body> {
    let challenge = if headers.contains_key(header::AUTHORIZATION) {
        r#"Basic realm="harbor""#.to_string()
    } else {
        let mut c = format!(
            r#"Bearer realm="{}/service/token",service="{}""#,
            state.url,
            crate::registry::SERVICE
        );
        if let Some(s) = scope {
            c.push_str(&format!(r#",scope="{s}""#));
        }
        c
    };
    let mut res = harbor_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    let h = res.headers_mut();
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    h.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&challenge).expect("a challenge is a header"),
    );
    res
}
