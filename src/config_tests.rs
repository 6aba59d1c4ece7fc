//! Unit tests of `config.rs`: every variable's default, its accepted forms and its refusals, read from
//! a map (never from the process environment).

use super::*;
use std::io::Write;

fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_map(&map)
}

fn ok(pairs: &[(&str, &str)]) -> Config {
    parse(pairs).unwrap_or_else(|e| panic!("expected {pairs:?} to parse, got {e}"))
}

/// The refused variables' names, in order.
fn refused(pairs: &[(&str, &str)]) -> Vec<String> {
    match parse(pairs) {
        Ok(c) => panic!("expected {pairs:?} to be refused, got {c:?}"),
        Err(ConfigErrors(errs)) => errs.into_iter().map(|e| e.var).collect(),
    }
}

fn refused_with(pairs: &[(&str, &str)]) -> ConfigError {
    match parse(pairs) {
        Ok(c) => panic!("expected {pairs:?} to be refused, got {c:?}"),
        Err(ConfigErrors(mut errs)) => {
            assert_eq!(errs.len(), 1, "{errs:?}");
            errs.remove(0)
        }
    }
}

fn secret_file(content: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(content)
}

/// A file under the target dir that is removed on drop (no extra crate needed).
mod tempfile_path {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn with(content: &str) -> TempPath {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("hr-config-{}-{n}", std::process::id()));
            let mut f = std::fs::File::create(&p).unwrap();
            super::Write::write_all(&mut f, content.as_bytes()).unwrap();
            TempPath(p)
        }
        pub fn as_str(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn defaults() {
    let c = ok(&[]);
    assert_eq!(
        c.harbor_url,
        HarborUrl {
            tls: false,
            host: "harbor-core".into(),
            port: 80
        }
    );
    assert_eq!(c.harbor_credentials, None);
    assert_eq!(c.proxy_project, "proxy");
    assert_eq!(c.discovery_interval, Duration::from_secs(60));
    assert_eq!(c.resolver_timeout, Duration::from_secs(10));
    assert_eq!(c.cache_ttl, Duration::from_secs(300));
    assert_eq!(c.max_fanout_projects, 50);
    assert!(!c.http2_prior_knowledge);
    assert!(c.coalesce_pulls);
    assert_eq!(c.shared_blob_window, 4 << 20);
    assert_eq!(c.shared_blob_budget, 256 << 20);
    assert_eq!(c.rate_limit_per_ip, 0);
    assert_eq!(c.max_idle_conns_per_host, 512);
    assert_eq!(c.idle_conn_timeout, Duration::from_secs(90));
    assert_eq!(c.listen_addr, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.metrics_addr, "0.0.0.0:9090".parse().unwrap());
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.log_format, LogFormat::Pretty);
    assert!(c.redis_sentinels.is_empty());
    assert_eq!(c.redis_master_name, "mymaster");
    assert_eq!(c.redis_password, None);
    assert_eq!(c.redis_db, 0);
    assert_eq!(c.redis_key_prefix, "hr");
    assert_eq!(c.negative_cache_ttl, Duration::from_secs(30));
    assert_eq!(c.stale_while_revalidate, Duration::from_secs(60));
    assert_eq!(c.stale_if_error, Duration::from_secs(24 * 3600));
    assert_eq!(c.circuit_breaker_threshold, 5);
    assert_eq!(c.circuit_breaker_timeout, Duration::from_secs(30));
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(c.workers, cores);
    assert_eq!(c.io_driver, IoDriver::Auto);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.header_read_timeout, Duration::from_secs(30));
    assert_eq!(c.harbor_ca_file, None);
    assert_eq!(c.upstream_connect_timeout, Duration::from_secs(5));
    assert_eq!(c.upstream_response_timeout, Duration::from_secs(60));
    assert_eq!(c.manifest_cache_bytes, 64 << 20);
    assert_eq!(c.manifest_cache_ttl, Duration::from_secs(3600));
    assert_eq!(c.client_stall_timeout, Duration::from_secs(60));
}

#[test]
fn shared_blob_settings() {
    let c = ok(&[
        (ENV_SHARED_BLOB_WINDOW, "1MiB"),
        (ENV_SHARED_BLOB_BUDGET, "0"),
    ]);
    assert_eq!((c.shared_blob_window, c.shared_blob_budget), (1 << 20, 0));
    for bad in ["0", "1KiB", "2GiB", "lots"] {
        assert_eq!(
            refused(&[(ENV_SHARED_BLOB_WINDOW, bad)]),
            [ENV_SHARED_BLOB_WINDOW],
            "{bad}"
        );
    }
    assert_eq!(
        refused(&[(ENV_SHARED_BLOB_BUDGET, "-1")]),
        [ENV_SHARED_BLOB_BUDGET]
    );
}

#[test]
fn manifest_cache_settings() {
    for (text, bytes) in [
        ("0", 0),
        ("1048576", 1 << 20),
        ("512KiB", 512 << 10),
        ("64MiB", 64 << 20),
        ("1GiB", 1 << 30),
        ("10MB", 10_000_000),
    ] {
        assert_eq!(
            ok(&[(ENV_MANIFEST_CACHE_BYTES, text)]).manifest_cache_bytes,
            bytes,
            "{text}"
        );
    }
    for bad in ["-1", "64 mb", "lots", "1TiB", "99999999999999999999"] {
        assert_eq!(
            refused(&[(ENV_MANIFEST_CACHE_BYTES, bad)]),
            [ENV_MANIFEST_CACHE_BYTES],
            "{bad}"
        );
    }
    assert_eq!(
        ok(&[(ENV_MANIFEST_CACHE_TTL, "3h")]).manifest_cache_ttl,
        Duration::from_secs(3 * 3600)
    );
    assert_eq!(
        refused(&[(ENV_MANIFEST_CACHE_TTL, "0s")]),
        [ENV_MANIFEST_CACHE_TTL]
    );
}

#[test]
fn harbor_ca_file() {
    let ca = secret_file(&a_certificate());
    assert_eq!(
        ok(&[(ENV_HARBOR_CA_FILE, ca.as_str())])
            .harbor_ca_file
            .as_deref(),
        Some(ca.as_str())
    );
    let e = refused_with(&[(ENV_HARBOR_CA_FILE, "/nonexistent/ca.pem")]);
    assert_eq!(e.var, ENV_HARBOR_CA_FILE);
    assert!(e.problem.contains("cannot read"), "{}", e.problem);
    let e = refused_with(&[(ENV_HARBOR_CA_FILE, "/")]);
    assert!(e.problem.contains("not a file"), "{}", e.problem);
    for (content, says) in [
        ("", "holds no PEM certificate"),
        ("not-a-certificate-9d1c\n", "holds no PEM certificate"),
        (
            "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n",
            "not a PEM certificate file",
        ),
    ] {
        let bad = secret_file(content);
        let e = refused_with(&[(ENV_HARBOR_CA_FILE, bad.as_str())]);
        assert!(e.problem.contains(says), "{content:?}: {}", e.problem);
        assert!(!e.to_string().contains("9d1c"), "never the content: {e}");
    }
}

/// A certificate in PEM (self-signed; what a CA file holds).
fn a_certificate() -> String {
    rcgen::generate_simple_self_signed(vec!["ca.test".into()])
        .unwrap()
        .cert
        .pem()
}

#[test]
fn empty_values_count_as_unset() {
    let c = ok(&[
        (ENV_PROXY_PROJECT, ""),
        (ENV_WORKERS, ""),
        (ENV_LOG_LEVEL, ""),
    ]);
    assert_eq!(c.proxy_project, "proxy");
    assert_eq!(c.log_level, LogLevel::Info);
}

#[test]
fn harbor_url_forms() {
    let c = ok(&[(ENV_HARBOR_URL, "https://harbor.example.com")]);
    assert_eq!(
        c.harbor_url,
        HarborUrl {
            tls: true,
            host: "harbor.example.com".into(),
            port: 443
        }
    );
    assert_eq!(c.harbor_url.origin(), "https://harbor.example.com");
    let c = ok(&[(ENV_HARBOR_URL, "http://127.0.0.1:8081/")]);
    assert_eq!(c.harbor_url.port, 8081);
    assert_eq!(c.harbor_url.origin(), "http://127.0.0.1:8081");
    let c = ok(&[(ENV_HARBOR_URL, "http://[::1]:5000")]);
    assert_eq!(c.harbor_url.host, "::1");
    assert_eq!(c.harbor_url.origin(), "http://[::1]:5000");
    let c = ok(&[(ENV_HARBOR_URL, "HTTP://Harbor.Local")]);
    assert_eq!(c.harbor_url.host, "harbor.local");
}

#[test]
fn harbor_url_refusals() {
    for bad in [
        "ftp://harbor",
        "harbor:80",
        "not a url",
        "http://",
        "http://user:pw@harbor",
        "http://harbor/api",
        "http://harbor?x=1",
        "http://harbor:0",
        "http://harbor:99999",
        "//harbor",
    ] {
        let e = refused_with(&[(ENV_HARBOR_URL, bad)]);
        assert_eq!(e.var, ENV_HARBOR_URL, "{bad}");
        assert_eq!(
            e.value,
            Some(without_userinfo(bad)),
            "shown as given, less credentials"
        );
    }
    let e = refused_with(&[(ENV_HARBOR_URL, "ftp://harbor")]);
    assert!(e.problem.contains("not http or https"), "{}", e.problem);
}

#[test]
fn credentials_plain_and_file() {
    let c = ok(&[
        (ENV_HARBOR_USERNAME, "robot$router"),
        (ENV_HARBOR_PASSWORD, "s3cret"),
    ]);
    let cred = c.harbor_credentials.unwrap();
    assert_eq!(cred.username, "robot$router");
    assert_eq!(cred.password.expose(), "s3cret");

    let user = secret_file("robot$file\n");
    let pass = secret_file("from-file\r\n");
    let c = ok(&[
        ("HARBOR_USERNAME_FILE", user.as_str()),
        ("HARBOR_PASSWORD_FILE", pass.as_str()),
    ]);
    let cred = c.harbor_credentials.unwrap();
    assert_eq!(cred.username, "robot$file");
    assert_eq!(cred.password.expose(), "from-file");

    // Only the last newline is trimmed; a password may contain anything else.
    let pass = secret_file("two\nlines\n");
    let c = ok(&[
        (ENV_HARBOR_USERNAME, "u"),
        ("HARBOR_PASSWORD_FILE", pass.as_str()),
    ]);
    assert_eq!(
        c.harbor_credentials.unwrap().password.expose(),
        "two\nlines"
    );
}

#[test]
fn credentials_refusals() {
    assert_eq!(
        refused(&[(ENV_HARBOR_USERNAME, "u")]),
        [ENV_HARBOR_PASSWORD]
    );
    assert_eq!(
        refused(&[(ENV_HARBOR_PASSWORD, "p")]),
        [ENV_HARBOR_USERNAME]
    );
    let pass = secret_file("p\n");
    let e = refused_with(&[
        (ENV_HARBOR_USERNAME, "u"),
        (ENV_HARBOR_PASSWORD, "p"),
        ("HARBOR_PASSWORD_FILE", pass.as_str()),
    ]);
    assert_eq!(e.var, ENV_HARBOR_PASSWORD);
    assert!(e.problem.contains("both"), "{}", e.problem);
    assert_eq!(e.value, None, "a secret's value is never echoed");

    let e = refused_with(&[
        (ENV_HARBOR_USERNAME, "u"),
        ("HARBOR_PASSWORD_FILE", "/nonexistent/harbor-router/pw"),
    ]);
    assert_eq!(e.var, "HARBOR_PASSWORD_FILE");
    assert!(e.problem.contains("cannot read"), "{}", e.problem);

    let empty = secret_file("\n");
    let e = refused_with(&[
        (ENV_HARBOR_USERNAME, "u"),
        ("HARBOR_PASSWORD_FILE", empty.as_str()),
    ]);
    assert!(e.problem.contains("empty"), "{}", e.problem);

    let two = secret_file("a\nb\n");
    let e = refused_with(&[
        ("HARBOR_USERNAME_FILE", two.as_str()),
        (ENV_HARBOR_PASSWORD, "p"),
    ]);
    assert_eq!(e.var, "HARBOR_USERNAME_FILE");
}

#[test]
fn secrets_never_show() {
    let c = ok(&[
        (ENV_HARBOR_USERNAME, "u"),
        (ENV_HARBOR_PASSWORD, "hunter2-harbor"),
        (ENV_REDIS_PASSWORD, "hunter2-redis"),
    ]);
    let debug = format!("{c:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("Secret(***)"));
    assert_eq!(c.redis_password.unwrap().expose(), "hunter2-redis");
}

#[test]
fn proxy_project() {
    assert_eq!(
        ok(&[(ENV_PROXY_PROJECT, "hub-proxy.v2")]).proxy_project,
        "hub-proxy.v2"
    );
    for bad in ["Proxy", "a/b", "-x", "x-", "a..b", "a b", "_x"] {
        assert_eq!(
            refused(&[(ENV_PROXY_PROJECT, bad)]),
            [ENV_PROXY_PROJECT],
            "{bad}"
        );
    }
}

#[test]
fn durations() {
    let vars = [
        ENV_DISCOVERY_INTERVAL,
        ENV_RESOLVER_TIMEOUT,
        ENV_CACHE_TTL,
        ENV_IDLE_CONN_TIMEOUT,
        ENV_NEGATIVE_CACHE_TTL,
        ENV_STALE_WHILE_REVALIDATE,
        ENV_STALE_IF_ERROR,
        ENV_CIRCUIT_BREAKER_TIMEOUT,
        ENV_SHUTDOWN_TIMEOUT,
        ENV_HEADER_READ_TIMEOUT,
        ENV_UPSTREAM_CONNECT_TIMEOUT,
        ENV_UPSTREAM_RESPONSE_TIMEOUT,
        ENV_CLIENT_STALL_TIMEOUT,
        ENV_MANIFEST_CACHE_TTL,
    ];
    for var in vars {
        for (text, d) in [
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
        ] {
            let c = ok(&[(var, text)]);
            let got = match var {
                ENV_DISCOVERY_INTERVAL => c.discovery_interval,
                ENV_RESOLVER_TIMEOUT => c.resolver_timeout,
                ENV_CACHE_TTL => c.cache_ttl,
                ENV_IDLE_CONN_TIMEOUT => c.idle_conn_timeout,
                ENV_NEGATIVE_CACHE_TTL => c.negative_cache_ttl,
                ENV_STALE_WHILE_REVALIDATE => c.stale_while_revalidate,
                ENV_STALE_IF_ERROR => c.stale_if_error,
                ENV_CIRCUIT_BREAKER_TIMEOUT => c.circuit_breaker_timeout,
                ENV_SHUTDOWN_TIMEOUT => c.shutdown_timeout,
                ENV_HEADER_READ_TIMEOUT => c.header_read_timeout,
                ENV_UPSTREAM_CONNECT_TIMEOUT => c.upstream_connect_timeout,
                ENV_UPSTREAM_RESPONSE_TIMEOUT => c.upstream_response_timeout,
                ENV_CLIENT_STALL_TIMEOUT => c.client_stall_timeout,
                ENV_MANIFEST_CACHE_TTL => c.manifest_cache_ttl,
                _ => unreachable!(),
            };
            assert_eq!(got, d, "{var}={text}");
        }
        for bad in [
            "-5s",
            "10",
            "ten seconds",
            "5x",
            "1h-5m",
            "366d",
            "300000000000y",
        ] {
            let e = refused_with(&[(var, bad)]);
            assert_eq!(e.var, var);
            assert_eq!(e.value.as_deref(), Some(bad));
        }
    }
    // Zero disables these ...
    let c = ok(&[
        (ENV_NEGATIVE_CACHE_TTL, "0s"),
        (ENV_STALE_WHILE_REVALIDATE, "0s"),
        (ENV_STALE_IF_ERROR, "0s"),
        (ENV_SHUTDOWN_TIMEOUT, "0s"),
    ]);
    assert!(c.negative_cache_ttl.is_zero() && c.stale_while_revalidate.is_zero());
    assert!(c.stale_if_error.is_zero());
    assert!(c.shutdown_timeout.is_zero());
    // ... and is meaningless for the others.
    for var in [
        ENV_DISCOVERY_INTERVAL,
        ENV_RESOLVER_TIMEOUT,
        ENV_CACHE_TTL,
        ENV_IDLE_CONN_TIMEOUT,
        ENV_CIRCUIT_BREAKER_TIMEOUT,
        ENV_HEADER_READ_TIMEOUT,
        ENV_UPSTREAM_CONNECT_TIMEOUT,
        ENV_UPSTREAM_RESPONSE_TIMEOUT,
        ENV_CLIENT_STALL_TIMEOUT,
    ] {
        let e = refused_with(&[(var, "0s")]);
        assert!(
            e.problem.contains("greater than zero"),
            "{var}: {}",
            e.problem
        );
    }
}

#[test]
fn integers() {
    let c = ok(&[
        (ENV_MAX_FANOUT_PROJECTS, "7"),
        (ENV_RATE_LIMIT_PER_IP, "100"),
        (ENV_MAX_IDLE_CONNS_PER_HOST, "0"),
        (ENV_REDIS_DB, "3"),
        (ENV_CIRCUIT_BREAKER_THRESHOLD, "1"),
        (ENV_WORKERS, "3"),
    ]);
    assert_eq!(c.max_fanout_projects, 7);
    assert_eq!(c.rate_limit_per_ip, 100);
    assert_eq!(c.max_idle_conns_per_host, 0);
    assert_eq!(c.redis_db, 3);
    assert_eq!(c.circuit_breaker_threshold, 1);
    assert_eq!(c.workers, 3);
    for (var, bad) in [
        (ENV_MAX_FANOUT_PROJECTS, "0"),
        (ENV_MAX_FANOUT_PROJECTS, "1001"),
        (ENV_MAX_FANOUT_PROJECTS, "-1"),
        (ENV_RATE_LIMIT_PER_IP, "-1"),
        (ENV_RATE_LIMIT_PER_IP, "lots"),
        (ENV_RATE_LIMIT_PER_IP, "4294967296"),
        (ENV_MAX_IDLE_CONNS_PER_HOST, "65536"),
        (ENV_MAX_IDLE_CONNS_PER_HOST, "1.5"),
        (ENV_REDIS_DB, "-1"),
        (ENV_REDIS_DB, "x"),
        (ENV_CIRCUIT_BREAKER_THRESHOLD, "0"),
        (ENV_WORKERS, "0"),
        (ENV_WORKERS, "1025"),
        (ENV_WORKERS, "auto"),
    ] {
        let e = refused_with(&[(var, bad)]);
        assert_eq!((e.var.as_str(), e.value.as_deref()), (var, Some(bad)));
        assert!(e.problem.contains("between"), "{var}={bad}: {}", e.problem);
    }
}

#[test]
fn booleans() {
    for (text, v) in [
        ("true", true),
        ("TRUE", true),
        ("1", true),
        ("false", false),
        ("0", false),
    ] {
        assert_eq!(
            ok(&[(ENV_HTTP2_PRIOR_KNOWLEDGE, text)]).http2_prior_knowledge,
            v
        );
        assert_eq!(ok(&[(ENV_COALESCE_PULLS, text)]).coalesce_pulls, v);
    }
    for bad in ["yes", "2", "on"] {
        assert_eq!(
            refused(&[(ENV_HTTP2_PRIOR_KNOWLEDGE, bad)]),
            [ENV_HTTP2_PRIOR_KNOWLEDGE]
        );
    }
}

#[test]
fn tls_files_come_together_and_are_checked_at_start() {
    assert_eq!(ok(&[]).tls, None);
    let dir = std::env::temp_dir().join(format!("hr-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pair = rcgen::generate_simple_self_signed(vec!["r.test".into()]).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let c = ok(&[(ENV_TLS_CERT_FILE, &cert), (ENV_TLS_KEY_FILE, &key)]);
    assert_eq!(
        c.tls,
        Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone()
        })
    );
    assert_eq!(refused(&[(ENV_TLS_CERT_FILE, &cert)]), [ENV_TLS_KEY_FILE]);
    assert_eq!(refused(&[(ENV_TLS_KEY_FILE, &key)]), [ENV_TLS_CERT_FILE]);
    let e = refused_with(&[(ENV_TLS_CERT_FILE, &key), (ENV_TLS_KEY_FILE, &key)]);
    assert_eq!(e.var, ENV_TLS_CERT_FILE);
    assert_eq!(e.value, None, "never the file's content");
    assert_eq!(ok(&[]).tls_reload_interval, Duration::from_secs(10));
    assert_eq!(
        refused(&[(ENV_TLS_RELOAD_INTERVAL, "10ms")]),
        [ENV_TLS_RELOAD_INTERVAL]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redis_url_is_one_endpoint_instead_of_sentinels_and_is_never_echoed() {
    assert_eq!(ok(&[]).redis_url, None);
    for good in [
        "redis://redis.example:6379",
        "redis://10.0.0.5",
        "redis://:s3cret@redis.example:6380",
        "redis://router:s3cret@redis.example",
        "redis://redis.example:6379/",
        "rediss://redis.example:6380",
        "rediss://:s3cret@redis.example",
    ] {
        let c = ok(&[(ENV_REDIS_URL, good)]);
        assert_eq!(
            c.redis_url.as_ref().map(Secret::expose),
            Some(good),
            "{good}"
        );
        assert_eq!(c.redis_tls, good.starts_with("rediss://"), "{good}");
    }
    for bad in [
        "rediss://:s3cret@redis.example:6380/#insecure",
        "rediss://:s3cret@redis.example#insecure",
        "http://redis.example",
        "redis://",
        "redis://redis.example:0",
        "redis://redis.example:99999",
        "redis://:s3cret@redis.example/2",
    ] {
        let e = refused_with(&[(ENV_REDIS_URL, bad)]);
        assert_eq!(e.var, ENV_REDIS_URL, "{bad}");
        assert_eq!(e.value, None, "never echoed: {bad}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
    assert_eq!(
        refused(&[
            (ENV_REDIS_URL, "redis://redis.example"),
            (ENV_REDIS_SENTINELS, "s1:26379")
        ]),
        [ENV_REDIS_URL]
    );
    assert_eq!(
        refused(&[
            (ENV_REDIS_URL, "redis://:a@redis.example"),
            (ENV_REDIS_PASSWORD, "b")
        ]),
        [ENV_REDIS_PASSWORD]
    );
    let c = ok(&[
        (ENV_REDIS_URL, "redis://redis.example"),
        (ENV_REDIS_PASSWORD, "b"),
    ]);
    assert_eq!(c.redis_password.as_ref().map(Secret::expose), Some("b"));
    assert!(
        !format!("{c:?}").contains("redis.example"),
        "the URL is a secret in Debug too"
    );
}

#[test]
fn redis_tls_follows_the_url_or_is_asked_for_sentinel_and_a_ca_file_needs_it() {
    assert!(!ok(&[]).redis_tls);
    assert!(!ok(&[(ENV_REDIS_SENTINELS, "s1")]).redis_tls);
    let c = ok(&[(ENV_REDIS_SENTINELS, "s1"), (ENV_REDIS_TLS, "true")]);
    assert!(c.redis_tls);
    assert_eq!(c.redis_ca_file, None);
    // Said again for a rediss:// URL: fine; contradicting the URL: refused.
    assert!(ok(&[(ENV_REDIS_URL, "rediss://r"), (ENV_REDIS_TLS, "true")]).redis_tls);
    let e = refused_with(&[(ENV_REDIS_URL, "redis://r"), (ENV_REDIS_TLS, "true")]);
    assert_eq!(e.var, ENV_REDIS_TLS);
    assert!(e.problem.contains("rediss://"), "{e}");
    let e = refused_with(&[(ENV_REDIS_URL, "rediss://r"), (ENV_REDIS_TLS, "false")]);
    assert_eq!(e.var, ENV_REDIS_TLS);
    let e = refused_with(&[(ENV_REDIS_TLS, "sometimes")]);
    assert_eq!(e.var, ENV_REDIS_TLS);
    assert_eq!(e.value.as_deref(), Some("sometimes"));

    let ca = secret_file(&a_certificate());
    let ca = ca.as_str().to_string();
    let c = ok(&[(ENV_REDIS_URL, "rediss://r"), (ENV_REDIS_CA_FILE, &ca)]);
    assert_eq!(c.redis_ca_file.as_deref(), Some(ca.as_str()));
    let c = ok(&[
        (ENV_REDIS_SENTINELS, "s1"),
        (ENV_REDIS_TLS, "1"),
        (ENV_REDIS_CA_FILE, &ca),
    ]);
    assert_eq!(c.redis_ca_file.as_deref(), Some(ca.as_str()));
    // A CA file with TLS off is a mistake, not a setting.
    for pairs in [
        &[
            (ENV_REDIS_URL, "redis://r"),
            (ENV_REDIS_CA_FILE, ca.as_str()),
        ][..],
        &[
            (ENV_REDIS_SENTINELS, "s1"),
            (ENV_REDIS_CA_FILE, ca.as_str()),
        ][..],
    ] {
        let e = refused_with(pairs);
        assert_eq!(e.var, ENV_REDIS_CA_FILE);
        assert!(e.problem.contains("REDIS_TLS"), "{e}");
    }
    let empty = secret_file("no certificate");
    for bad in ["/nonexistent/ca.pem", empty.as_str()] {
        let e = refused_with(&[(ENV_REDIS_URL, "rediss://r"), (ENV_REDIS_CA_FILE, bad)]);
        assert_eq!(e.var, ENV_REDIS_CA_FILE);
    }
}

#[test]
fn coalesce_linger_is_a_short_duration() {
    assert_eq!(ok(&[]).coalesce_linger, Duration::from_secs(2));
    assert_eq!(
        ok(&[(ENV_COALESCE_LINGER, "0")]).coalesce_linger,
        Duration::ZERO
    );
    assert_eq!(
        ok(&[(ENV_COALESCE_LINGER, "500ms")]).coalesce_linger,
        Duration::from_millis(500)
    );
    assert_eq!(
        ok(&[(ENV_COALESCE_LINGER, "60s")]).coalesce_linger,
        Duration::from_secs(60)
    );
    for bad in ["61s", "-1s", "soon", "1h"] {
        let e = refused_with(&[(ENV_COALESCE_LINGER, bad)]);
        assert_eq!(e.var, ENV_COALESCE_LINGER, "{bad}");
    }
}

#[test]
fn listen_addresses() {
    let c = ok(&[
        (ENV_LISTEN_ADDR, "127.0.0.1:0"),
        (ENV_METRICS_ADDR, "[::1]:9100"),
    ]);
    assert_eq!(c.listen_addr, "127.0.0.1:0".parse().unwrap());
    assert_eq!(c.metrics_addr, "[::1]:9100".parse().unwrap());
    let c = ok(&[
        (ENV_LISTEN_ADDR, "localhost:8081"),
        (ENV_METRICS_ADDR, ":0"),
    ]);
    assert_eq!(c.listen_addr, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(c.metrics_addr, "0.0.0.0:0".parse().unwrap());
    for var in [ENV_LISTEN_ADDR, ENV_METRICS_ADDR] {
        for bad in ["8080", ":http", ":65536", "example.com:80", "1.2.3.4"] {
            assert_eq!(refused(&[(var, bad)]), [var], "{var}={bad}");
        }
    }
    assert_eq!(
        refused(&[(ENV_LISTEN_ADDR, ":9000"), (ENV_METRICS_ADDR, ":9000")]),
        [ENV_METRICS_ADDR]
    );
    // Port 0 twice is fine: each socket gets its own port.
    ok(&[
        (ENV_LISTEN_ADDR, "127.0.0.1:0"),
        (ENV_METRICS_ADDR, "127.0.0.1:0"),
    ]);
}

#[test]
fn log_settings() {
    for (text, level) in [
        ("debug", LogLevel::Debug),
        ("INFO", LogLevel::Info),
        ("warn", LogLevel::Warn),
        ("error", LogLevel::Error),
        ("trace", LogLevel::Trace),
    ] {
        assert_eq!(ok(&[(ENV_LOG_LEVEL, text)]).log_level, level);
    }
    assert_eq!(ok(&[(ENV_LOG_FORMAT, "json")]).log_format, LogFormat::Json);
    assert_eq!(
        ok(&[(ENV_LOG_FORMAT, "pretty")]).log_format,
        LogFormat::Pretty
    );
    assert_eq!(refused(&[(ENV_LOG_LEVEL, "verbose")]), [ENV_LOG_LEVEL]);
    assert_eq!(refused(&[(ENV_LOG_FORMAT, "xml")]), [ENV_LOG_FORMAT]);
}

#[test]
fn redis_settings() {
    let pw = secret_file("redispw\n");
    let c = ok(&[
        (
            ENV_REDIS_SENTINELS,
            "s1:26380, s2 ,[fd00::1]:26381,10.0.0.4",
        ),
        (ENV_REDIS_MASTER_NAME, "harbor-router"),
        ("REDIS_PASSWORD_FILE", pw.as_str()),
        (ENV_REDIS_KEY_PREFIX, "hr:prod"),
    ]);
    let s: Vec<(&str, u16)> = c
        .redis_sentinels
        .iter()
        .map(|s| (s.host.as_str(), s.port))
        .collect();
    assert_eq!(
        s,
        [
            ("s1", 26380),
            ("s2", 26379),
            ("fd00::1", 26381),
            ("10.0.0.4", 26379)
        ]
    );
    assert_eq!(c.redis_master_name, "harbor-router");
    assert_eq!(c.redis_password.unwrap().expose(), "redispw");
    assert_eq!(c.redis_key_prefix, "hr:prod");
    assert_eq!(
        c.redis_read_timeout,
        Duration::from_millis(5),
        "the default"
    );
    assert_eq!(
        ok(&[(ENV_REDIS_READ_TIMEOUT, "40ms")]).redis_read_timeout,
        Duration::from_millis(40)
    );
    for bad in ["0s", "11s", "soon", "-1ms"] {
        assert_eq!(
            refused(&[(ENV_REDIS_READ_TIMEOUT, bad)]),
            [ENV_REDIS_READ_TIMEOUT],
            "{bad}"
        );
    }
    for bad in ["s1:0", "s1:x", "s1,,s2", "a b:1", "[::1", "s1:70000"] {
        assert_eq!(
            refused(&[(ENV_REDIS_SENTINELS, bad)]),
            [ENV_REDIS_SENTINELS],
            "{bad}"
        );
    }
    assert_eq!(
        refused(&[(ENV_REDIS_MASTER_NAME, "my master")]),
        [ENV_REDIS_MASTER_NAME]
    );
    assert_eq!(
        refused(&[(ENV_REDIS_KEY_PREFIX, "a\tb")]),
        [ENV_REDIS_KEY_PREFIX]
    );
    assert_eq!(
        refused(&[(ENV_REDIS_KEY_PREFIX, &"x".repeat(129))]),
        [ENV_REDIS_KEY_PREFIX]
    );
    assert_eq!(
        refused(&[
            (ENV_REDIS_PASSWORD, "a"),
            ("REDIS_PASSWORD_FILE", pw.as_str())
        ]),
        [ENV_REDIS_PASSWORD]
    );
}

#[test]
fn io_driver() {
    assert_eq!(ok(&[(ENV_IO_DRIVER, "epoll")]).io_driver, IoDriver::Epoll);
    assert_eq!(
        ok(&[(ENV_IO_DRIVER, "io_uring")]).io_driver,
        IoDriver::IoUring
    );
    assert_eq!(ok(&[(ENV_IO_DRIVER, "AUTO")]).io_driver, IoDriver::Auto);
    assert_eq!(refused(&[(ENV_IO_DRIVER, "kqueue")]), [ENV_IO_DRIVER]);
}

#[test]
fn cpu_pinning() {
    assert_eq!(ok(&[]).cpu_pinning, CpuPinning::Auto);
    assert_eq!(ok(&[(ENV_CPU_PINNING, "on")]).cpu_pinning, CpuPinning::On);
    assert_eq!(ok(&[(ENV_CPU_PINNING, "OFF")]).cpu_pinning, CpuPinning::Off);
    assert_eq!(refused(&[(ENV_CPU_PINNING, "always")]), [ENV_CPU_PINNING]);
}

#[test]
fn every_bad_variable_is_reported_at_once() {
    let mut errs = refused(&[
        (ENV_HARBOR_URL, "ftp://x"),
        (ENV_WORKERS, "0"),
        (ENV_LOG_LEVEL, "loud"),
        (ENV_CACHE_TTL, "-1s"),
        (ENV_MAX_FANOUT_PROJECTS, "0"),
    ]);
    errs.sort();
    let mut want = [
        ENV_HARBOR_URL,
        ENV_WORKERS,
        ENV_LOG_LEVEL,
        ENV_CACHE_TTL,
        ENV_MAX_FANOUT_PROJECTS,
    ]
    .map(String::from);
    want.sort();
    assert_eq!(errs, want);
    let text = parse(&[(ENV_HARBOR_URL, "ftp://x"), (ENV_WORKERS, "0")])
        .unwrap_err()
        .to_string();
    assert!(text.contains("HARBOR_URL=\"ftp://x\""), "{text}");
    assert!(text.contains("WORKERS=\"0\""), "{text}");
}

#[test]
fn not_unicode_is_refused() {
    let err = Config::from_lookup(|name| {
        if name == ENV_PROXY_PROJECT {
            Lookup::NotUnicode
        } else {
            Lookup::Unset
        }
    })
    .unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].var, ENV_PROXY_PROJECT);
    assert!(err.0[0].problem.contains("UTF-8"));
}

#[test]
fn credentials_in_a_url_are_refused_without_being_shown() {
    for url in [
        "http://admin:topsecret@harbor",
        "https://admin:topsecret@harbor:8443/",
        "http://admin:top secret@harbor",
        "ftp://u:topsecret@x/a@b",
    ] {
        let e = refused_with(&[("HARBOR_URL", url)]);
        assert_eq!(e.var, "HARBOR_URL");
        let shown = e.to_string();
        assert!(
            !shown.contains("topsecret") && !shown.contains("top secret"),
            "{shown}"
        );
        assert!(shown.contains("***@"), "{shown}");
    }
    assert_eq!(without_userinfo("http://harbor:80"), "http://harbor:80");
    assert_eq!(without_userinfo("not a url"), "not a url");
    assert_eq!(
        without_userinfo("http:/admin:pw@h"),
        "http:/***@h",
        "a mistyped URL"
    );
    assert_eq!(
        without_userinfo("secret@redis:6379"),
        "***@redis:6379",
        "no scheme"
    );
    assert_eq!(without_userinfo("10s"), "10s");
    assert_eq!(without_userinfo("http://h/p@q"), "http://***@q");
    assert_eq!(
        without_userinfo("http://u:p?w/d@h"),
        "http://***@h",
        "raw ? and / in a password"
    );
}

#[test]
fn limits_and_trusted_proxies() {
    let c = ok(&[]);
    assert_eq!(c.rate_limit_per_ip, 0, "off unless asked");
    assert_eq!(c.fanout_budget_per_ip, 10);
    assert_eq!(c.max_connections, 10_000);
    assert_eq!(c.max_connections_per_client, 256);
    assert_eq!(
        ok(&[(ENV_MAX_CONNECTIONS_PER_CLIENT, "0")]).max_connections_per_client,
        0,
        "0 turns the cap off"
    );
    assert_eq!(
        refused(&[(ENV_MAX_CONNECTIONS_PER_CLIENT, "-1")]),
        [ENV_MAX_CONNECTIONS_PER_CLIENT]
    );
    assert!(
        c.trusted_proxies.is_empty(),
        "trust no forwarded header by default"
    );
    let c = ok(&[(ENV_TRUSTED_PROXIES, "10.0.0.0/8, 192.168.1.5,fd00::/8")]);
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let trusted = |s: &str| c.trusted_proxies.iter().any(|n| n.contains(ip(s)));
    assert!(trusted("10.1.2.3"));
    assert!(trusted("::ffff:10.1.2.3"), "v4-mapped");
    assert!(!trusted("11.0.0.1"));
    assert!(trusted("192.168.1.5"));
    assert!(!trusted("192.168.1.6"));
    assert!(trusted("fd12::1"));
    assert!(!trusted("fe80::1"));
    let c = ok(&[(ENV_TRUSTED_PROXIES, "0.0.0.0/0,10.0.0.1/31")]);
    assert!(c.trusted_proxies[0].contains(ip("8.8.8.8")));
    assert!(c.trusted_proxies[1].contains(ip("10.0.0.0")));
    for bad in [
        "10.0.0.0/33",
        "fd00::/129",
        "nope",
        "10.0.0.0/x",
        "10.0.0/8",
    ] {
        assert_eq!(
            refused(&[(ENV_TRUSTED_PROXIES, bad)]),
            [ENV_TRUSTED_PROXIES],
            "{bad}"
        );
    }
    for (var, bad) in [
        (ENV_FANOUT_BUDGET_PER_IP, "0"),
        (ENV_MAX_CONNECTIONS, "0"),
        (ENV_MAX_CONNECTIONS, "many"),
    ] {
        assert_eq!(refused(&[(var, bad)]), [var], "{var}={bad}");
    }
}
