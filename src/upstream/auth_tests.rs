//! Unit tests of the token flow's state: challenge parsing, scope derivation, expiry, coalescing.

use super::*;
use std::rc::Rc;

#[test]
fn parses_harbor_challenges() {
    let c = Challenge::parse(
        r#"Bearer realm="https://harbor.example.com/service/token",service="harbor-registry",scope="repository:dockerhub/library/nginx:pull""#,
    )
    .unwrap();
    assert_eq!(c.realm, "https://harbor.example.com/service/token");
    assert_eq!(c.service.as_deref(), Some("harbor-registry"));
    assert_eq!(
        c.scope.as_deref(),
        Some("repository:dockerhub/library/nginx:pull")
    );
    assert_eq!(c.key(), "repository:dockerhub/library/nginx:pull");

    // Other spacing, unquoted values, escapes, unknown parameters, and no scope.
    let c = Challenge::parse(
        r#"bearer  realm=http://h/t , service="a\"b", error="insufficient_scope""#,
    )
    .unwrap();
    assert_eq!(c.realm, "http://h/t");
    assert_eq!(c.service.as_deref(), Some("a\"b"));
    assert_eq!(c.scope, None);
    assert_eq!(c.key(), "");

    assert_eq!(Challenge::parse(r#"Basic realm="harbor""#), None);
    assert_eq!(Challenge::parse(r#"Bearer service="x""#), None, "no realm");
    assert_eq!(Challenge::parse("Bearer"), None);
    assert_eq!(Challenge::parse(""), None);
}

#[test]
fn scopes_from_paths() {
    let cases = [
        (
            "/v2/dockerhub/library/nginx/manifests/latest",
            Some("dockerhub/library/nginx"),
        ),
        (
            "/v2/quay/coreos/etcd/blobs/sha256:00",
            Some("quay/coreos/etcd"),
        ),
        ("/v2/ghcr/org/app/tags/list", Some("ghcr/org/app")),
        // The last marker wins, whatever its kind: a repository may be called "manifests".
        ("/v2/p/manifests/manifests/v1", Some("p/manifests")),
        (
            "/v2/proxy/manifests/blobs/sha256:00",
            Some("proxy/manifests"),
        ),
        ("/v2/p/blobs/x/tags/list", Some("p/blobs/x")),
        ("/v2/", None),
        ("/api/v2.0/projects", None),
    ];
    for (path, repo) in cases {
        let want = repo.map(|r| format!("repository:{r}:pull"));
        assert_eq!(scope_for_path(path), want, "{path}");
    }
}

fn token(s: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {s}")).unwrap()
}

#[test]
fn tokens_are_cached_until_shortly_before_expiry() {
    let cache = Rc::new(TokenCache::default());
    let t0 = Instant::now();
    let Ticket::Fetch(guard) = cache.ticket("s", t0) else {
        panic!("first ask fetches")
    };
    guard.finish(Ok((token("a"), Duration::from_secs(1800))), t0);
    assert_eq!(
        cache.cached_header("s", t0 + Duration::from_secs(1769)),
        Some(token("a"))
    );
    assert_eq!(
        cache.cached_header("s", t0 + Duration::from_secs(1770)),
        None,
        "renewed 30s early"
    );
    assert!(matches!(
        cache.ticket("s", t0 + Duration::from_secs(60)),
        Ticket::Ready(_)
    ));
    assert!(matches!(
        cache.ticket("s", t0 + Duration::from_secs(1790)),
        Ticket::Fetch(_)
    ));
    // A short-lived token is renewed at 90% of its life.
    let Ticket::Fetch(g) = cache.ticket("short", t0) else {
        panic!()
    };
    g.finish(Ok((token("b"), Duration::from_secs(60))), t0);
    assert!(cache
        .cached_header("short", t0 + Duration::from_secs(53))
        .is_some());
    assert!(cache
        .cached_header("short", t0 + Duration::from_secs(54))
        .is_none());
    // Scopes are independent.
    assert_eq!(cache.cached_header("other", t0), None);
}

#[test]
fn concurrent_asks_share_one_fetch() {
    let cache = Rc::new(TokenCache::default());
    let now = Instant::now();
    let Ticket::Fetch(guard) = cache.ticket("s", now) else {
        panic!()
    };
    let Ticket::Wait(mut w1) = cache.ticket("s", now) else {
        panic!("second waits")
    };
    let Ticket::Wait(mut w2) = cache.ticket("s", now) else {
        panic!("third waits")
    };
    assert_eq!(cache.fetches(), 1);
    guard.finish(Ok((token("x"), Duration::from_secs(300))), now);
    assert_eq!(w1.try_recv().unwrap().unwrap(), token("x"));
    assert_eq!(w2.try_recv().unwrap().unwrap(), token("x"));
    assert!(matches!(cache.ticket("s", now), Ticket::Ready(_)));
    assert_eq!(cache.fetches(), 1);
}

type Waiter = tokio::sync::oneshot::Receiver<Result<HeaderValue, String>>;

/// A cache where one ask is fetching scope "s" and a second one waits for it.
fn fetching_with_a_waiter() -> (Rc<TokenCache>, Instant, FetchGuard, Waiter) {
    let cache = Rc::new(TokenCache::default());
    let now = Instant::now();
    let Ticket::Fetch(guard) = cache.ticket("s", now) else {
        panic!("the first ask fetches")
    };
    let Ticket::Wait(w) = cache.ticket("s", now) else {
        panic!("the second ask waits")
    };
    (cache, now, guard, w)
}

#[test]
fn failures_are_shared_but_not_cached() {
    let (cache, now, guard, mut w) = fetching_with_a_waiter();
    guard.finish(Err("token service answered 401".into()), now);
    assert_eq!(
        w.try_recv().unwrap().unwrap_err(),
        "token service answered 401"
    );
    assert!(
        matches!(cache.ticket("s", now), Ticket::Fetch(_)),
        "the next ask fetches again"
    );
}

#[test]
fn an_abandoned_fetch_releases_its_waiters() {
    let (cache, now, guard, mut w) = fetching_with_a_waiter();
    drop(guard);
    assert_eq!(
        w.try_recv().unwrap_err(),
        tokio::sync::oneshot::error::TryRecvError::Closed,
        "the waiter learns the fetch is gone"
    );
    assert!(matches!(cache.ticket("s", now), Ticket::Fetch(_)));
}

#[test]
fn a_rejected_token_is_dropped_but_a_newer_one_kept() {
    let cache = Rc::new(TokenCache::default());
    let now = Instant::now();
    let Ticket::Fetch(g) = cache.ticket("s", now) else {
        panic!()
    };
    g.finish(Ok((token("old"), Duration::from_secs(1800))), now);
    cache.drop_token(&token("other"));
    assert_eq!(
        cache.cached_header("s", now),
        Some(token("old")),
        "only the rejected value is dropped"
    );
    cache.drop_token(&token("old"));
    assert_eq!(cache.cached_header("s", now), None);
    assert!(matches!(cache.ticket("s", now), Ticket::Fetch(_)));
}

#[test]
fn absurd_lifetimes_are_clamped() {
    let cache = Rc::new(TokenCache::default());
    let now = Instant::now();
    let Ticket::Fetch(g) = cache.ticket("s", now) else {
        panic!()
    };
    g.finish(Ok((token("t"), Duration::from_secs(u64::MAX / 2))), now);
    assert!(cache.cached_header("s", now + MAX_EXPIRES_IN).is_none());
}

#[test]
fn a_batch_asks_for_every_missing_scope_at_the_last_token_service() {
    let cache = TokenCache::default();
    let now = Instant::now();
    let scopes: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|r| format!("repository:{r}:pull"))
        .collect();
    assert!(
        cache.batch(&scopes, now).is_none(),
        "no token service known yet"
    );
    let challenge = Challenge::parse(
        r#"Bearer realm="https://harbor/service/token",service="harbor-registry",scope="repository:x:pull""#,
    )
    .unwrap();
    cache.saw(&challenge);
    cache.store(
        "repository:a:pull",
        token("a"),
        Duration::from_secs(60),
        now,
    );
    let batch = cache.batch(&scopes, now).expect("two scopes missing");
    assert_eq!(batch.realm, "https://harbor/service/token");
    assert_eq!(batch.service.as_deref(), Some("harbor-registry"));
    assert_eq!(
        batch.scope.as_deref(),
        Some("repository:b:pull repository:c:pull")
    );
    cache.store_batch(&batch, &token("bc"), Duration::from_secs(60), now);
    assert_eq!(
        cache.cached_header("repository:b:pull", now),
        Some(token("bc"))
    );
    assert_eq!(
        cache.cached_header("repository:c:pull", now),
        Some(token("bc"))
    );
    assert_eq!(
        cache.cached_header("repository:a:pull", now),
        Some(token("a"))
    );
    assert!(cache.batch(&scopes, now).is_none(), "nothing missing");
    assert!(
        cache
            .batch(&scopes[..1], now + Duration::from_secs(3600))
            .is_none(),
        "one missing scope: the challenge flow costs the same"
    );
}

#[test]
fn a_batch_fits_one_request_of_a_few_kib() {
    let cache = TokenCache::default();
    let now = Instant::now();
    cache.saw(&Challenge::parse(r#"Bearer realm="https://h/service/token",service="s""#).unwrap());
    let scopes: Vec<String> = (0..100)
        .map(|i| format!("repository:project{i}/{}:pull", "n".repeat(200)))
        .collect();
    let batch = cache.batch(&scopes, now).expect("a batch");
    let asked = batch.scope.as_deref().unwrap();
    let n = asked.split(' ').count();
    assert!((2..100).contains(&n), "{n} scopes in one request");
    assert!(asked.len() * 3 < 4096 + 1000, "{} bytes", asked.len());
}

impl TokenCache {
    fn cached_header(&self, scope: &str, now: Instant) -> Option<HeaderValue> {
        self.cached(scope, now).map(|t| t.header)
    }
}

#[test]
fn a_refused_token_is_dropped_under_every_scope_it_was_stored_for() {
    let cache = TokenCache::default();
    let now = Instant::now();
    let batch = Challenge {
        realm: "https://harbor/service/token".into(),
        service: None,
        scope: Some("repository:a:pull repository:b:pull repository:c:pull".into()),
    };
    cache.store_batch(&batch, &token("abc"), Duration::from_secs(1800), now);
    cache.store(
        "repository:d:pull",
        token("d"),
        Duration::from_secs(1800),
        now,
    );
    let mut dropped = cache.drop_token(&token("abc"));
    dropped.sort();
    assert_eq!(
        dropped,
        [
            "repository:a:pull",
            "repository:b:pull",
            "repository:c:pull"
        ]
    );
    for s in ["a", "b", "c"] {
        assert_eq!(
            cache.cached_header(&format!("repository:{s}:pull"), now),
            None
        );
    }
    assert_eq!(
        cache.cached_header("repository:d:pull", now),
        Some(token("d"))
    );
    assert!(cache.drop_token(&token("abc")).is_empty(), "once");
}

#[test]
fn a_token_refused_when_fresh_is_remembered_briefly() {
    let cache = Rc::new(TokenCache::default());
    let now = Instant::now();
    cache.refused("s", token("anon"), now);
    let t = cache
        .cached("s", now + REFUSED_LIFE - Duration::from_millis(1))
        .unwrap();
    assert!(t.refused);
    assert_eq!(t.header, token("anon"));
    assert!(
        matches!(cache.ticket("s", now), Ticket::Ready(_)),
        "no new token request while it is remembered"
    );
    assert_eq!(cache.fetches(), 0);
    assert!(
        cache.cached("s", now + REFUSED_LIFE).is_none(),
        "then asked again"
    );
    assert!(matches!(
        cache.ticket("s", now + REFUSED_LIFE),
        Ticket::Fetch(_)
    ));
    // A token that works replaces it, unflagged.
    cache.store("s", token("ok"), Duration::from_secs(60), now);
    assert!(!cache.cached("s", now).unwrap().refused);
}

#[test]
fn scopes_that_lost_a_token_are_fetched_in_one_batch() {
    let cache = Rc::new(TokenCache::default());
    let now = Instant::now();
    let scopes: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|r| format!("repository:{r}:pull"))
        .collect();
    // b is being fetched by another request; c has a token.
    let Ticket::Fetch(b) = cache.ticket(&scopes[1], now) else {
        panic!()
    };
    cache.store(&scopes[2], token("c"), Duration::from_secs(60), now);
    let before = cache.fetches();
    let guards = cache.lead_all(&scopes, now);
    let led: Vec<&str> = guards.iter().map(FetchGuard::scope).collect();
    assert_eq!(led, ["repository:a:pull"]);
    assert_eq!(cache.fetches(), before + 1, "one request for the batch");
    // A request for a waits for the batch.
    let Ticket::Wait(mut w) = cache.ticket(&scopes[0], now) else {
        panic!("a is being fetched")
    };
    for g in guards {
        g.finish(Ok((token("new"), Duration::from_secs(60))), now);
    }
    assert_eq!(w.try_recv().unwrap().unwrap(), token("new"));
    assert_eq!(cache.cached_header(&scopes[0], now), Some(token("new")));
    drop(b);
    assert!(cache.lead_all(&[], now).is_empty());
    assert_eq!(cache.fetches(), before + 1, "an empty batch asks nothing");
}
