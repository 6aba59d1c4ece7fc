//! Every environment variable the router reads: its name (`ENV_*`), its default, how it is parsed and
//! what is refused. This is the only module that looks at the environment; everything else receives a
//! validated [`Config`].
//!
//! Parsing goes through a lookup function so that tests pass a map instead of touching the process
//! environment. Every variable is parsed even after one has failed, so an operator sees every mistake in
//! one start instead of one per restart. Secrets (`HARBOR_PASSWORD`, `REDIS_PASSWORD`) are held in
//! [`Secret`], whose `Debug` never shows the value, and their values never appear in error messages.
//!
//! Conventions shared by all variables:
//! - an empty value counts as unset (Kubernetes renders optional values as empty strings);
//! - durations are Go-style strings read by `humantime` (`500ms`, `10s`, `5m`, `1h30m`);
//! - booleans accept `true`, `false`, `1`, `0` (case-insensitive);
//! - `X_FILE` reads the value of `X` from a file, trailing newline trimmed; setting both is an error.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

pub const ENV_HARBOR_URL: &str = "HARBOR_URL";
pub const ENV_HARBOR_USERNAME: &str = "HARBOR_USERNAME";
pub const ENV_HARBOR_PASSWORD: &str = "HARBOR_PASSWORD";
pub const ENV_PROXY_PROJECT: &str = "PROXY_PROJECT";
pub const ENV_DISCOVERY_INTERVAL: &str = "DISCOVERY_INTERVAL";
pub const ENV_RESOLVER_TIMEOUT: &str = "RESOLVER_TIMEOUT";
pub const ENV_CACHE_TTL: &str = "CACHE_TTL";
pub const ENV_MAX_FANOUT_PROJECTS: &str = "MAX_FANOUT_PROJECTS";
pub const ENV_HTTP2_PRIOR_KNOWLEDGE: &str = "HTTP2_PRIOR_KNOWLEDGE";
pub const ENV_RATE_LIMIT_PER_IP: &str = "RATE_LIMIT_PER_IP";
pub const ENV_FANOUT_BUDGET_PER_IP: &str = "FANOUT_BUDGET_PER_IP";
pub const ENV_FANOUT_ORDER: &str = "FANOUT_ORDER";
pub const ENV_TRUSTED_PROXIES: &str = "TRUSTED_PROXIES";
pub const ENV_MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
pub const ENV_MAX_CONNECTIONS_PER_CLIENT: &str = "MAX_CONNECTIONS_PER_CLIENT";
pub const ENV_MAX_IDLE_CONNS_PER_HOST: &str = "MAX_IDLE_CONNS_PER_HOST";
pub const ENV_IDLE_CONN_TIMEOUT: &str = "IDLE_CONN_TIMEOUT";
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";
pub const ENV_METRICS_ADDR: &str = "METRICS_ADDR";
pub const ENV_LOG_LEVEL: &str = "LOG_LEVEL";
pub const ENV_LOG_FORMAT: &str = "LOG_FORMAT";
pub const ENV_ACCESS_LOG: &str = "ACCESS_LOG";
pub const ENV_REDIS_URL: &str = "REDIS_URL";
pub const ENV_REDIS_SENTINELS: &str = "REDIS_SENTINELS";
pub const ENV_REDIS_MASTER_NAME: &str = "REDIS_MASTER_NAME";
pub const ENV_REDIS_PASSWORD: &str = "REDIS_PASSWORD";
pub const ENV_REDIS_DB: &str = "REDIS_DB";
pub const ENV_REDIS_KEY_PREFIX: &str = "REDIS_KEY_PREFIX";
pub const ENV_REDIS_READ_TIMEOUT: &str = "REDIS_READ_TIMEOUT";
pub const ENV_REDIS_TLS: &str = "REDIS_TLS";
pub const ENV_REDIS_CA_FILE: &str = "REDIS_CA_FILE";
pub const ENV_NEGATIVE_CACHE_TTL: &str = "NEGATIVE_CACHE_TTL";
pub const ENV_STALE_WHILE_REVALIDATE: &str = "STALE_WHILE_REVALIDATE";
pub const ENV_STALE_IF_ERROR: &str = "STALE_IF_ERROR";
pub const ENV_CIRCUIT_BREAKER_THRESHOLD: &str = "CIRCUIT_BREAKER_THRESHOLD";
pub const ENV_CIRCUIT_BREAKER_TIMEOUT: &str = "CIRCUIT_BREAKER_TIMEOUT";
pub const ENV_WORKERS: &str = "WORKERS";
pub const ENV_IO_DRIVER: &str = "IO_DRIVER";
pub const ENV_CPU_PINNING: &str = "CPU_PINNING";
pub const ENV_COALESCE_PULLS: &str = "COALESCE_PULLS";
pub const ENV_COALESCE_LINGER: &str = "COALESCE_LINGER";
pub const ENV_SHARED_BLOB_WINDOW: &str = "SHARED_BLOB_WINDOW";
pub const ENV_SHARED_BLOB_BUDGET: &str = "SHARED_BLOB_BUDGET";
pub const ENV_SHUTDOWN_TIMEOUT: &str = "SHUTDOWN_TIMEOUT";
pub const ENV_HEADER_READ_TIMEOUT: &str = "HEADER_READ_TIMEOUT";
pub const ENV_HARBOR_CA_FILE: &str = "HARBOR_CA_FILE";
pub const ENV_TLS_CERT_FILE: &str = "TLS_CERT_FILE";
pub const ENV_TLS_KEY_FILE: &str = "TLS_KEY_FILE";
pub const ENV_TLS_RELOAD_INTERVAL: &str = "TLS_RELOAD_INTERVAL";
pub const ENV_UPSTREAM_CONNECT_TIMEOUT: &str = "UPSTREAM_CONNECT_TIMEOUT";
pub const ENV_UPSTREAM_RESPONSE_TIMEOUT: &str = "UPSTREAM_RESPONSE_TIMEOUT";
pub const ENV_MANIFEST_CACHE_BYTES: &str = "MANIFEST_CACHE_BYTES";
pub const ENV_CLIENT_STALL_TIMEOUT: &str = "CLIENT_STALL_TIMEOUT";
pub const ENV_MANIFEST_CACHE_TTL: &str = "MANIFEST_CACHE_TTL";

/// Redis sentinel port used when an entry of `REDIS_SENTINELS` has none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;
const MAX_FANOUT_LIMIT: usize = 1000;
const MAX_WORKERS: usize = 1024;
const MAX_COALESCE_LINGER: Duration = Duration::from_secs(60);

/// A secret value: usable by the code that needs it, invisible in `Debug` and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is sent to the service it is for.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The robot account the router uses against Harbor's API and token service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// Harbor's base URL, split into the parts the upstream client needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarborUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl HarborUrl {
    /// `scheme://host[:port]`, the form used to build request URLs and log lines.
    pub fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let default_port = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default_port {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{}", self.port)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Which requests get an access log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    /// Answers with a status of 400 or more.
    Errors,
    All,
}

/// Which io driver each data-plane core runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring when the kernel (and seccomp) allow it, epoll otherwise, with a log line saying why.
    Auto,
    IoUring,
    Epoll,
}

/// Whether the data-plane workers pin themselves to CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPinning {
    /// Only when the process owns its CPUs: its allowed set is smaller than the machine's online
    /// CPUs (the kubelet's static CPU manager gave it exclusive ones). Under the default CPU manager
    /// the allowed set is the whole node, shared with interrupts and other pods: no pinning.
    Auto,
    On,
    Off,
}

impl CpuPinning {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuPinning::Auto => "auto",
            CpuPinning::On => "on",
            CpuPinning::Off => "off",
        }
    }
}

/// A Redis Sentinel endpoint from `REDIS_SENTINELS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelAddr {
    pub host: String,
    pub port: u16,
}

/// The whole validated configuration. Field docs say why each exists; the README lists defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where Harbor's API, token service and `/v2/` live.
    pub harbor_url: HarborUrl,
    /// Extra CA certificates (PEM) trusted for an `https://` HARBOR_URL, e.g. a private CA.
    pub harbor_ca_file: Option<String>,
    /// Bound for opening one connection to Harbor (TCP, TLS and HTTP handshakes).
    pub upstream_connect_timeout: Duration,
    /// Bound for Harbor's response headers to one request (bodies stream without this bound).
    pub upstream_response_timeout: Duration,
    /// The robot account; `None` means anonymous access (public projects only).
    pub harbor_credentials: Option<Credentials>,
    /// The first path segment clients use instead of a real project: `/v2/<proxy_project>/<name>/…`.
    pub proxy_project: String,
    /// How often the project list is read from Harbor.
    pub discovery_interval: Duration,
    /// Upper bound for one upstream attempt while resolving a name to a project.
    pub resolver_timeout: Duration,
    /// How long a learned `name → project` mapping is trusted before it is revalidated.
    pub cache_ttl: Duration,
    /// At most this many projects are asked in one fan-out.
    pub max_fanout_projects: usize,
    /// Talk HTTP/2 to Harbor without negotiation (h2c or ALPN-less h2).
    pub http2_prior_knowledge: bool,
    /// Identical concurrent pulls share one request to Harbor: manifests and tag lists per core,
    /// blobs across cores.
    pub coalesce_pulls: bool,
    /// How long a shared answer stays joinable once it finished: a successful manifest or tag
    /// list per core, a whole blob of at most two windows across cores; zero: only while in the
    /// air.
    pub coalesce_linger: Duration,
    /// Bytes a shared blob transfer may read ahead of its fastest reader.
    pub shared_blob_window: u64,
    /// Bytes every shared blob transfer together may hold (two windows each); 0: blobs go alone.
    pub shared_blob_budget: u64,
    /// Requests per second per client IP; 0 turns the limiter off (and its cross-core cost with it).
    pub rate_limit_per_ip: u32,
    /// Fan-outs (requests that ask every project) per second per client IP, across all cores.
    pub fanout_budget_per_ip: u32,
    /// Preferred projects, first first: among the projects that have an image, the earliest wins.
    /// Empty: the fastest answer wins.
    pub fanout_order: Vec<String>,
    /// Peers whose `X-Forwarded-For` is believed (load balancers, ingress controllers).
    pub trusted_proxies: Vec<Cidr>,
    /// Client connections open at once, across the workers (each worker takes its share).
    pub max_connections: usize,
    /// Client connections one client address may hold open at once (each worker takes its share);
    /// 0: no such cap. `trusted_proxies` are exempt.
    pub max_connections_per_client: usize,
    /// Idle keep-alive connections to Harbor kept per core.
    pub max_idle_conns_per_host: usize,
    /// An idle upstream connection is closed after this long.
    pub idle_conn_timeout: Duration,
    /// The client-facing listener (one SO_REUSEPORT socket per worker).
    pub listen_addr: SocketAddr,
    /// The admin listener (`/metrics`), served off the data-plane cores.
    pub metrics_addr: SocketAddr,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub access_log: AccessLog,
    /// One Redis endpoint (`REDIS_URL`: a managed Redis, a single server); it may hold a password.
    /// At most one of it and `redis_sentinels`.
    pub redis_url: Option<Secret>,
    /// Empty (and no `redis_url`): mappings live in memory only.
    pub redis_sentinels: Vec<SentinelAddr>,
    pub redis_master_name: String,
    pub redis_password: Option<Secret>,
    pub redis_db: u32,
    /// Namespaces every key, so several routers (or environments) can share one Redis.
    pub redis_key_prefix: String,
    /// Longest a core waits for Redis on a local miss before it fans out without it.
    pub redis_read_timeout: Duration,
    /// TLS to Redis: to the Sentinels and the master they name (`REDIS_TLS`), or to the endpoint of
    /// a `rediss://` REDIS_URL. Certificates are checked against the host connected to.
    pub redis_tls: bool,
    /// Extra CA certificates (PEM) trusted for Redis, beside the system's store (a private CA).
    pub redis_ca_file: Option<String>,
    /// How long "no project has this name" is remembered; 0 disables negative caching.
    pub negative_cache_ttl: Duration,
    /// How long past `cache_ttl` a mapping is still served while it is refreshed; 0 disables.
    pub stale_while_revalidate: Duration,
    /// How long after its last confirmation a tag's answer may stand in when every project that
    /// could confirm it fails; 0 disables.
    pub stale_if_error: Duration,
    /// Consecutive failures that open a project's circuit.
    pub circuit_breaker_threshold: u32,
    /// The longest an open circuit waits before one probe (the first wait is `breaker::FIRST_OPEN`).
    pub circuit_breaker_timeout: Duration,
    /// Byte budget of the by-digest manifest cache for the whole process (split across workers); 0
    /// turns it off.
    pub manifest_cache_bytes: u64,
    /// Longest life of a cached manifest, so Harbor keeps recording pulls of hot images.
    pub manifest_cache_ttl: Duration,
    /// Data-plane threads, one event loop and one listener each.
    pub workers: usize,
    pub io_driver: IoDriver,
    pub cpu_pinning: CpuPinning,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// How long a client may accept no bytes of a response before its connection is cut.
    pub client_stall_timeout: Duration,
    /// How long a client may take to send a request head, counted from the end of the previous
    /// response; it is therefore also the keep-alive idle timeout. Stops slowloris clients.
    pub header_read_timeout: Duration,
    /// The client listener speaks TLS with this certificate and key (both files checked at start).
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are read again to notice a new certificate.
    pub tls_reload_interval: Duration,
}

/// `TLS_CERT_FILE` and `TLS_KEY_FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
}

/// One refused variable: its name, the value as given (never for secrets) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub var: String,
    pub value: Option<String>,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={:?}: {}", self.var, v, self.problem),
            None => write!(f, "{}: {}", self.var, self.problem),
        }
    }
}

/// Every refused variable of one parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// What looking up one variable gives: unset, a value, or bytes that are not UTF-8.
pub enum Lookup {
    Unset,
    Value(String),
    NotUnicode,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigErrors> {
        Config::from_lookup(|name| match std::env::var(name) {
            Ok(v) => Lookup::Value(v),
            Err(std::env::VarError::NotPresent) => Lookup::Unset,
            Err(std::env::VarError::NotUnicode(_)) => Lookup::NotUnicode,
        })
    }

    /// Reads a map, as tests do.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Config, ConfigErrors> {
        Config::from_lookup(|name| match map.get(name) {
            Some(v) => Lookup::Value(v.clone()),
            None => Lookup::Unset,
        })
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Lookup) -> Result<Config, ConfigErrors> {
        let mut r = Reader {
            lookup: &lookup,
            errors: Vec::new(),
        };
        let harbor_url = r.parse(ENV_HARBOR_URL, "http://harbor-core:80", parse_harbor_url);
        let username = r.string_or_file(ENV_HARBOR_USERNAME, false);
        let password = r.string_or_file(ENV_HARBOR_PASSWORD, true);
        let harbor_credentials = match (username, password) {
            (Ok(Some(username)), Ok(Some(password))) => Some(Credentials {
                username,
                password: Secret(password),
            }),
            (Ok(None), Ok(None)) | (Err(()), _) | (_, Err(())) => None,
            (Ok(Some(_)), Ok(None)) => {
                r.refuse(ENV_HARBOR_PASSWORD, None, "HARBOR_USERNAME is set, so a password is needed (HARBOR_PASSWORD or HARBOR_PASSWORD_FILE)");
                None
            }
            (Ok(None), Ok(Some(_))) => {
                r.refuse(ENV_HARBOR_USERNAME, None, "HARBOR_PASSWORD is set, so a username is needed (HARBOR_USERNAME or HARBOR_USERNAME_FILE)");
                None
            }
        };
        let harbor_ca_file = r.parse(ENV_HARBOR_CA_FILE, "", certificates_file);
        let upstream_connect_timeout =
            r.parse(ENV_UPSTREAM_CONNECT_TIMEOUT, "5s", positive_duration);
        let upstream_response_timeout =
            r.parse(ENV_UPSTREAM_RESPONSE_TIMEOUT, "60s", positive_duration);
        let proxy_project = r.parse(ENV_PROXY_PROJECT, "proxy", parse_project_name);
        let discovery_interval = r.parse(ENV_DISCOVERY_INTERVAL, "60s", positive_duration);
        let resolver_timeout = r.parse(ENV_RESOLVER_TIMEOUT, "10s", positive_duration);
        let cache_ttl = r.parse(ENV_CACHE_TTL, "300s", positive_duration);
        let max_fanout_projects = r.parse(ENV_MAX_FANOUT_PROJECTS, "50", |v| {
            ranged_int(v, 1, MAX_FANOUT_LIMIT as u64).map(|n| n as usize)
        });
        let http2_prior_knowledge = r.parse(ENV_HTTP2_PRIOR_KNOWLEDGE, "false", parse_bool);
        let coalesce_pulls = r.parse(ENV_COALESCE_PULLS, "true", parse_bool);
        let coalesce_linger = r.parse(ENV_COALESCE_LINGER, "2s", |v| {
            let d = parse_duration(v)?;
            if d > MAX_COALESCE_LINGER {
                return Err(
                    "must be at most 60s (an answer kept longer is a cache, not a linger)".into(),
                );
            }
            Ok(d)
        });
        let shared_blob_window = r.parse(ENV_SHARED_BLOB_WINDOW, "4MiB", |v| {
            let b = parse_bytes(v)?;
            if !(64 << 10..=1 << 30).contains(&b) {
                return Err("must be 64KiB to 1GiB".into());
            }
            Ok(b)
        });
        let shared_blob_budget = r.parse(ENV_SHARED_BLOB_BUDGET, "256MiB", parse_bytes);
        let rate_limit_per_ip = r.parse(ENV_RATE_LIMIT_PER_IP, "0", |v| {
            ranged_int(v, 0, u32::MAX as u64).map(|n| n as u32)
        });
        let fanout_order = r.parse(ENV_FANOUT_ORDER, "", |v| {
            let mut out: Vec<String> = Vec::new();
            for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let name = parse_project_name(name).map_err(|e| format!("{name:?}: {e}"))?;
                if out.contains(&name) {
                    return Err(format!("{name:?} is listed twice"));
                }
                out.push(name);
            }
            Ok(out)
        });
        let fanout_budget_per_ip = r.parse(ENV_FANOUT_BUDGET_PER_IP, "10", |v| {
            ranged_int(v, 1, 1_000_000).map(|n| n as u32)
        });
        let trusted_proxies = r.parse(ENV_TRUSTED_PROXIES, "", parse_cidrs);
        let max_connections = r.parse(ENV_MAX_CONNECTIONS, "10000", |v| {
            ranged_int(v, 1, 10_000_000).map(|n| n as usize)
        });
        let max_connections_per_client = r.parse(ENV_MAX_CONNECTIONS_PER_CLIENT, "256", |v| {
            ranged_int(v, 0, 10_000_000).map(|n| n as usize)
        });
        let max_idle_conns_per_host = r.parse(ENV_MAX_IDLE_CONNS_PER_HOST, "512", |v| {
            ranged_int(v, 0, 65535).map(|n| n as usize)
        });
        let idle_conn_timeout = r.parse(ENV_IDLE_CONN_TIMEOUT, "90s", positive_duration);
        let listen_addr = r.parse(ENV_LISTEN_ADDR, ":8080", parse_listen_addr);
        let metrics_addr = r.parse(ENV_METRICS_ADDR, ":9090", parse_listen_addr);
        let log_level = r.parse(ENV_LOG_LEVEL, "info", parse_log_level);
        let log_format = r.parse(ENV_LOG_FORMAT, "pretty", parse_log_format);
        let access_log = r.parse(ENV_ACCESS_LOG, "errors", |v| {
            match v.to_ascii_lowercase().as_str() {
                "off" | "none" => Ok(AccessLog::Off),
                "errors" => Ok(AccessLog::Errors),
                "all" => Ok(AccessLog::All),
                _ => Err("must be off, errors or all".to_string()),
            }
        });
        let redis_sentinels = r.parse(ENV_REDIS_SENTINELS, "", parse_sentinels);
        let redis_url = match r.raw(ENV_REDIS_URL) {
            None => Some(None),
            Some(url) => match parse_redis_url(url.trim()) {
                Ok(shape) => Some(Some((Secret(url.trim().to_string()), shape))),
                Err(problem) => {
                    // The value is not repeated: it may hold a password.
                    r.refuse(ENV_REDIS_URL, None, problem);
                    None
                }
            },
        };
        let redis_master_name = r.parse(ENV_REDIS_MASTER_NAME, "mymaster", parse_token);
        let redis_password = r
            .string_or_file(ENV_REDIS_PASSWORD, true)
            .ok()
            .flatten()
            .map(Secret);
        if let (Some(Some(_)), Some(sentinels)) = (&redis_url, &redis_sentinels) {
            if !sentinels.is_empty() {
                r.refuse(ENV_REDIS_URL, None, "set it or REDIS_SENTINELS, not both");
            }
        }
        if let (Some(Some((_, RedisUrl { password: true, .. }))), Some(_)) =
            (&redis_url, &redis_password)
        {
            r.refuse(
                ENV_REDIS_PASSWORD,
                None,
                "REDIS_URL holds a password already: set one or the other",
            );
        }
        let url_tls = match &redis_url {
            Some(Some((_, shape))) => Some(shape.tls),
            _ => None,
        };
        let redis_tls = match r.raw(ENV_REDIS_TLS).map(|v| (parse_bool(v.trim()), v)) {
            None => url_tls.unwrap_or(false),
            Some((Err(problem), v)) => {
                r.refuse(ENV_REDIS_TLS, Some(v), problem);
                false
            }
            Some((Ok(tls), _)) => {
                match url_tls {
                    Some(false) if tls => r.refuse(
                        ENV_REDIS_TLS,
                        None,
                        "REDIS_URL is redis:// (no TLS): for TLS to that endpoint write rediss://",
                    ),
                    Some(true) if !tls => r.refuse(
                        ENV_REDIS_TLS,
                        None,
                        "REDIS_URL is rediss:// (TLS): unset REDIS_TLS, or write redis://",
                    ),
                    _ => {}
                }
                tls
            }
        };
        let redis_ca_file = r.parse(ENV_REDIS_CA_FILE, "", certificates_file);
        if let Some(Some(_)) = &redis_ca_file {
            if !redis_tls {
                r.refuse(
                    ENV_REDIS_CA_FILE,
                    None,
                    "TLS to Redis is off: set REDIS_TLS=true (Sentinel) or write rediss:// (REDIS_URL)",
                );
            }
        }
        let redis_db = r.parse(ENV_REDIS_DB, "0", |v| {
            ranged_int(v, 0, i32::MAX as u64).map(|n| n as u32)
        });
        let redis_key_prefix = r.parse(ENV_REDIS_KEY_PREFIX, "hr", parse_token);
        let redis_read_timeout = r.parse(
            ENV_REDIS_READ_TIMEOUT,
            "5ms",
            |v| match positive_duration(v)? {
                d if d > Duration::from_secs(10) => {
                    Err("must be at most 10s: a core waits this long on a miss".into())
                }
                d => Ok(d),
            },
        );
        let negative_cache_ttl = r.parse(ENV_NEGATIVE_CACHE_TTL, "30s", any_duration);
        let stale_while_revalidate = r.parse(ENV_STALE_WHILE_REVALIDATE, "60s", any_duration);
        let stale_if_error = r.parse(ENV_STALE_IF_ERROR, "24h", any_duration);
        let circuit_breaker_threshold = r.parse(ENV_CIRCUIT_BREAKER_THRESHOLD, "5", |v| {
            ranged_int(v, 1, 1_000_000).map(|n| n as u32)
        });
        let circuit_breaker_timeout =
            r.parse(ENV_CIRCUIT_BREAKER_TIMEOUT, "30s", positive_duration);
        let default_workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string();
        let workers = r.parse(ENV_WORKERS, &default_workers, |v| {
            ranged_int(v, 1, MAX_WORKERS as u64).map(|n| n as usize)
        });
        let io_driver = r.parse(ENV_IO_DRIVER, "auto", parse_io_driver);
        let cpu_pinning = r.parse(ENV_CPU_PINNING, "auto", |v| {
            match v.to_ascii_lowercase().as_str() {
                "auto" => Ok(CpuPinning::Auto),
                "on" | "true" | "1" => Ok(CpuPinning::On),
                "off" | "false" | "0" => Ok(CpuPinning::Off),
                _ => Err("must be auto, on or off".into()),
            }
        });
        let manifest_cache_bytes = r.parse(ENV_MANIFEST_CACHE_BYTES, "64MiB", parse_bytes);
        let manifest_cache_ttl = r.parse(ENV_MANIFEST_CACHE_TTL, "1h", positive_duration);
        let shutdown_timeout = r.parse(ENV_SHUTDOWN_TIMEOUT, "30s", any_duration);
        let header_read_timeout = r.parse(ENV_HEADER_READ_TIMEOUT, "30s", positive_duration);
        let client_stall_timeout = r.parse(ENV_CLIENT_STALL_TIMEOUT, "60s", positive_duration);
        let tls_reload_interval = r.parse(ENV_TLS_RELOAD_INTERVAL, "10s", |v| {
            let d = parse_duration(v)?;
            if d < Duration::from_millis(100) {
                return Err("must be at least 100ms".into());
            }
            Ok(d)
        });
        let tls_cert = r.raw(ENV_TLS_CERT_FILE);
        let tls_key = r.raw(ENV_TLS_KEY_FILE);
        let tls = match (tls_cert, tls_key) {
            (None, None) => Some(None),
            (Some(_), None) => {
                r.refuse(ENV_TLS_KEY_FILE, None, "must be set with TLS_CERT_FILE");
                None
            }
            (None, Some(_)) => {
                r.refuse(ENV_TLS_CERT_FILE, None, "must be set with TLS_KEY_FILE");
                None
            }
            (Some(cert), Some(key)) => match crate::certs::load(&cert, &key) {
                Ok(_) => Some(Some(TlsFiles { cert, key })),
                Err(e) => {
                    let var = match e.file {
                        crate::certs::File::Cert => ENV_TLS_CERT_FILE,
                        crate::certs::File::Key => ENV_TLS_KEY_FILE,
                    };
                    // What is wrong, never the file's content.
                    r.refuse(var, None, e.problem);
                    None
                }
            },
        };

        if let (Some(l), Some(m)) = (listen_addr, metrics_addr) {
            if l.port() != 0 && l == m {
                r.refuse(
                    ENV_METRICS_ADDR,
                    Some(m.to_string()),
                    "must differ from LISTEN_ADDR",
                );
            }
        }

        if !r.errors.is_empty() {
            return Err(ConfigErrors(r.errors));
        }
        // Every `None` above pushed an error, so all of these are present.
        Ok(Config {
            harbor_url: harbor_url.expect("checked"),
            harbor_credentials,
            harbor_ca_file: harbor_ca_file.expect("checked"),
            upstream_connect_timeout: upstream_connect_timeout.expect("checked"),
            upstream_response_timeout: upstream_response_timeout.expect("checked"),
            proxy_project: proxy_project.expect("checked"),
            discovery_interval: discovery_interval.expect("checked"),
            resolver_timeout: resolver_timeout.expect("checked"),
            cache_ttl: cache_ttl.expect("checked"),
            max_fanout_projects: max_fanout_projects.expect("checked"),
            http2_prior_knowledge: http2_prior_knowledge.expect("checked"),
            coalesce_pulls: coalesce_pulls.expect("checked"),
            coalesce_linger: coalesce_linger.expect("checked"),
            shared_blob_window: shared_blob_window.expect("checked"),
            shared_blob_budget: shared_blob_budget.expect("checked"),
            rate_limit_per_ip: rate_limit_per_ip.expect("checked"),
            fanout_budget_per_ip: fanout_budget_per_ip.expect("checked"),
            fanout_order: fanout_order.expect("checked"),
            trusted_proxies: trusted_proxies.expect("checked"),
            max_connections: max_connections.expect("checked"),
            max_connections_per_client: max_connections_per_client.expect("checked"),
            max_idle_conns_per_host: max_idle_conns_per_host.expect("checked"),
            idle_conn_timeout: idle_conn_timeout.expect("checked"),
            listen_addr: listen_addr.expect("checked"),
            metrics_addr: metrics_addr.expect("checked"),
            log_level: log_level.expect("checked"),
            log_format: log_format.expect("checked"),
            access_log: access_log.expect("checked"),
            redis_url: redis_url.expect("checked").map(|(url, _)| url),
            redis_tls,
            redis_ca_file: redis_ca_file.expect("checked"),
            redis_sentinels: redis_sentinels.expect("checked"),
            redis_master_name: redis_master_name.expect("checked"),
            redis_password,
            redis_db: redis_db.expect("checked"),
            redis_key_prefix: redis_key_prefix.expect("checked"),
            redis_read_timeout: redis_read_timeout.expect("checked"),
            negative_cache_ttl: negative_cache_ttl.expect("checked"),
            stale_while_revalidate: stale_while_revalidate.expect("checked"),
            stale_if_error: stale_if_error.expect("checked"),
            circuit_breaker_threshold: circuit_breaker_threshold.expect("checked"),
            circuit_breaker_timeout: circuit_breaker_timeout.expect("checked"),
            manifest_cache_bytes: manifest_cache_bytes.expect("checked"),
            manifest_cache_ttl: manifest_cache_ttl.expect("checked"),
            workers: workers.expect("checked"),
            io_driver: io_driver.expect("checked"),
            cpu_pinning: cpu_pinning.expect("checked"),
            shutdown_timeout: shutdown_timeout.expect("checked"),
            header_read_timeout: header_read_timeout.expect("checked"),
            tls: tls.expect("checked"),
            tls_reload_interval: tls_reload_interval.expect("checked"),
            client_stall_timeout: client_stall_timeout.expect("checked"),
        })
    }
}

/// Collects values and errors while the variables are read one by one.
struct Reader<'a, F: Fn(&str) -> Lookup> {
    lookup: &'a F,
    errors: Vec<ConfigError>,
}

impl<F: Fn(&str) -> Lookup> Reader<'_, F> {
    fn refuse(&mut self, var: &str, value: Option<String>, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            var: var.to_string(),
            value: value.map(|v| without_userinfo(&v)),
            problem: problem.into(),
        });
    }

    /// The raw value, with empty meaning unset; a non-UTF-8 value is refused.
    fn raw(&mut self, var: &str) -> Option<String> {
        match (self.lookup)(var) {
            Lookup::Unset => None,
            Lookup::Value(v) if v.is_empty() => None,
            Lookup::Value(v) => Some(v),
            Lookup::NotUnicode => {
                self.refuse(var, None, "is not valid UTF-8");
                None
            }
        }
    }

    /// Parses `var` (or `default` when unset). `None` means an error was recorded.
    fn parse<T>(
        &mut self,
        var: &str,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.raw(var);
        let text = value.as_deref().unwrap_or(default);
        match parse(text.trim()) {
            Ok(v) => Some(v),
            Err(problem) => {
                self.refuse(var, Some(text.to_string()), problem);
                None
            }
        }
    }

    /// A string from `var` or from the file named by `var_FILE` (not both). `Err` means an error was
    /// recorded.
    fn string_or_file(&mut self, var: &str, secret: bool) -> Result<Option<String>, ()> {
        let before = self.errors.len();
        let value = self.string_or_file_inner(var, secret);
        if self.errors.len() > before {
            Err(())
        } else {
            Ok(value)
        }
    }

    fn string_or_file_inner(&mut self, var: &str, secret: bool) -> Option<String> {
        let file_var = format!("{var}_FILE");
        let plain = self.raw(var);
        let path = self.raw(&file_var);
        match (plain, path) {
            (Some(_), Some(_)) => {
                self.refuse(
                    var,
                    None,
                    format!("both {var} and {file_var} are set; set only one"),
                );
                None
            }
            (Some(v), None) => Some(v),
            (None, None) => None,
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let v = text
                        .strip_suffix('\n')
                        .map(|s| s.strip_suffix('\r').unwrap_or(s))
                        .unwrap_or(&text);
                    if v.is_empty() {
                        self.refuse(&file_var, Some(path), "the file is empty");
                        None
                    } else if !secret && v.contains(['\n', '\r']) {
                        self.refuse(&file_var, Some(path), "the file holds more than one line");
                        None
                    } else {
                        Some(v.to_string())
                    }
                }
                Err(e) => {
                    self.refuse(&file_var, Some(path), format!("cannot read the file: {e}"));
                    None
                }
            },
        }
    }
}

/// A value as it may be shown: in anything that may carry credentials before an `@`
/// (`scheme://user:pass@…`, a mistyped `http:/user:pass@…`, a bare `secret@host:port`), everything
/// between the scheme's `:` (and the slashes after it), or the start, and the last `@` is replaced by
/// `***`, so a password never reaches an error message, whatever characters it holds. A path before
/// an `@` is hidden too: a small price.
fn without_userinfo(v: &str) -> String {
    let Some(at) = v.rfind('@') else {
        return v.to_string();
    };
    let start = match v.find(':') {
        Some(colon) if colon < at => {
            let after = &v[colon + 1..];
            colon + 1 + after.len() - after.trim_start_matches('/').len()
        }
        _ => 0,
    };
    if start > at {
        return v.to_string();
    }
    format!("{}***{}", &v[..start], &v[at..])
}

fn parse_harbor_url(v: &str) -> Result<HarborUrl, String> {
    let uri: http::Uri = v
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected http(s)://host[:port]"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => return Err(format!("scheme {other:?} is not http or https")),
        None => return Err("has no scheme; expected http(s)://host[:port]".into()),
    };
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err(
            "must not carry credentials; use HARBOR_USERNAME and HARBOR_PASSWORD(_FILE)".into(),
        );
    }
    let raw_host = authority.host();
    let host = raw_host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("has no host".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(
            "must be only scheme://host[:port]: Harbor serves /v2/ and /api/ at its root".into(),
        );
    }
    // The authority is `host[:port]` (credentials were refused above).
    let port = match authority.as_str()[raw_host.len()..].strip_prefix(':') {
        None if tls => 443,
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(0) => return Err("port 0 is not a port Harbor can listen on".into()),
            Ok(p) => p,
            Err(_) => return Err("the port is not a number from 1 to 65535".into()),
        },
    };
    Ok(HarborUrl {
        tls,
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// A Harbor project name as the proxy prefix: one component of the distribution name grammar.
fn parse_project_name(v: &str) -> Result<String, String> {
    if crate::names::is_name_component(v) && v.len() <= crate::names::MAX_NAME_LEN {
        Ok(v.to_string())
    } else {
        Err("must be a lowercase name component: [a-z0-9]+ joined by '.', '_', '__' or '-'".into())
    }
}

/// What a `REDIS_URL` says beside where the endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RedisUrl {
    /// It holds a password.
    password: bool,
    /// `rediss://`: TLS.
    tls: bool,
}

/// A `REDIS_URL`: `redis://` or `rediss://`, then `[user[:password]@]host[:port]`. The database is
/// `REDIS_DB`'s; no option is taken (the `redis` crate's `#insecure`, which skips the certificate
/// check, least of all).
fn parse_redis_url(v: &str) -> Result<RedisUrl, String> {
    const FORM: &str = "must be redis://[user[:password]@]host[:port] (or rediss:// for TLS)";
    let (rest, tls) = match (v.strip_prefix("redis://"), v.strip_prefix("rediss://")) {
        (Some(rest), _) => (rest, false),
        (None, Some(rest)) => (rest, true),
        (None, None) => return Err(FORM.into()),
    };
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    if hostport.contains('#') {
        return Err("takes no #fragment: the certificate is always checked".into());
    }
    if hostport.contains('/') || hostport.contains('?') {
        let path = hostport.split_once('/').map_or("", |(_, p)| p);
        if !path.is_empty() || hostport.contains('?') {
            return Err("takes no database or options: the database is REDIS_DB".into());
        }
    }
    let hostport = hostport.trim_end_matches('/');
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (hostport, None),
    };
    if host.is_empty() || host.contains(['@', ' ']) {
        return Err(FORM.into());
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err("has a port that is not 1 to 65535".into()),
        }
    }
    if redis::IntoConnectionInfo::into_connection_info(v).is_err() {
        return Err(FORM.into());
    }
    Ok(RedisUrl {
        password: userinfo.is_some_and(|u| u.split_once(':').is_some_and(|(_, pw)| !pw.is_empty())),
        tls,
    })
}

/// Longest CA file read (a system bundle is about 200 KiB).
const CA_FILE_MAX: u64 = 4 << 20;

/// A path to a PEM file of one or more CA certificates, or unset (`""`). What is wrong is said
/// without the content.
fn certificates_file(v: &str) -> Result<Option<String>, String> {
    use rustls::pki_types::pem::PemObject;
    let Some(path) = readable_file(v)? else {
        return Ok(None);
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.len() > CA_FILE_MAX => {
            return Err(format!("is larger than {} MiB", CA_FILE_MAX >> 20))
        }
        _ => {}
    }
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read the file: {e}"))?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "is not a PEM certificate file".to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(Some(path))
}

/// A path to a readable file, or unset (`""`).
fn readable_file(v: &str) -> Result<Option<String>, String> {
    if v.is_empty() {
        return Ok(None);
    }
    match std::fs::metadata(v) {
        Ok(m) if m.is_file() => std::fs::File::open(v)
            .map(|_| Some(v.to_string()))
            .map_err(|e| format!("cannot read the file: {e}")),
        Ok(_) => Err("is not a file".into()),
        Err(e) => Err(format!("cannot read the file: {e}")),
    }
}

/// Longest duration accepted anywhere: far beyond any sensible setting, far below what would
/// overflow instant arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_duration(v: &str) -> Result<Duration, String> {
    if v.starts_with('-') {
        return Err("must not be negative".into());
    }
    let d = humantime::parse_duration(v)
        .map_err(|e| format!("not a duration ({e}); examples: 500ms, 10s, 5m, 1h30m"))?;
    if d > MAX_DURATION {
        return Err("must be at most 365 days".into());
    }
    Ok(d)
}

fn positive_duration(v: &str) -> Result<Duration, String> {
    match parse_duration(v)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

fn any_duration(v: &str) -> Result<Duration, String> {
    parse_duration(v)
}

fn ranged_int(v: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = v
        .parse()
        .map_err(|_| format!("not a whole number between {min} and {max}"))?;
    if n < min || n > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(n)
}

/// A byte count: `1048576`, `512KiB`, `64MiB`, `1GiB` (also `KB`, `MB`, `GB` as powers of 1000).
fn parse_bytes(v: &str) -> Result<u64, String> {
    const FORM: &str = "not a size; examples: 0, 1048576, 512KiB, 64MiB, 1GiB";
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| FORM.to_string())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(FORM.into()),
    };
    let bytes = n.checked_mul(mult).ok_or("too large")?;
    if bytes > 64 << 30 {
        return Err("must be at most 64GiB".into());
    }
    Ok(bytes)
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("must be true, false, 1 or 0".into()),
    }
}

/// `:port` (all IPv4 interfaces), `ip:port`, `[ipv6]:port` or `localhost:port`.
fn parse_listen_addr(v: &str) -> Result<SocketAddr, String> {
    const FORM: &str = "expected :port, ip:port, [ipv6]:port or localhost:port";
    if let Some(port) = v.strip_prefix(':') {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("bad port; {FORM}"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Some(port) = v.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("bad port; {FORM}"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    v.parse::<SocketAddr>().map_err(|_| FORM.to_string())
}

fn parse_log_level(v: &str) -> Result<LogLevel, String> {
    match v.to_ascii_lowercase().as_str() {
        "trace" => Ok(LogLevel::Trace),
        "debug" => Ok(LogLevel::Debug),
        "info" => Ok(LogLevel::Info),
        "warn" | "warning" => Ok(LogLevel::Warn),
        "error" => Ok(LogLevel::Error),
        _ => Err("must be one of debug, info, warn, error (or trace)".into()),
    }
}

fn parse_log_format(v: &str) -> Result<LogFormat, String> {
    match v.to_ascii_lowercase().as_str() {
        "pretty" | "text" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        _ => Err("must be pretty or json".into()),
    }
}

fn parse_io_driver(v: &str) -> Result<IoDriver, String> {
    match v.to_ascii_lowercase().as_str() {
        "auto" => Ok(IoDriver::Auto),
        "io_uring" | "iouring" | "uring" => Ok(IoDriver::IoUring),
        "epoll" => Ok(IoDriver::Epoll),
        _ => Err("must be auto, io_uring or epoll".into()),
    }
}

/// A non-empty word without whitespace, quotes or control characters (Redis names and prefixes).
fn parse_token(v: &str) -> Result<String, String> {
    if v.len() > 128 {
        return Err("must be at most 128 characters".into());
    }
    if v.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\'')
    {
        return Err("must not contain whitespace, quotes or control characters".into());
    }
    Ok(v.to_string())
}

/// `host[:port],host[:port],…`; an empty list means Redis is off.
/// An address block: `addr/len`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map(V4).unwrap_or(V6(v6)),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.len),
            (V6(net), V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.len),
            _ => false,
        }
    }
}

/// Whether the first `len` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let (whole, rest) = (usize::from(len / 8), len % 8);
    a[..whole] == b[..whole] && (rest == 0 || (a[whole] ^ b[whole]) & (0xffu8 << (8 - rest)) == 0)
}

/// `10.0.0.0/8, 192.168.1.5, fd00::/8`: address blocks, separated by commas.
fn parse_cidrs(v: &str) -> Result<Vec<Cidr>, String> {
    let mut out = Vec::new();
    for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (addr, len) = entry.split_once('/').unwrap_or((entry, ""));
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{entry:?} is not an address or address/length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            "" => max,
            l => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{entry:?}: the length must be 0 to {max}"))?,
        };
        out.push(Cidr { addr, len });
    }
    Ok(out)
}

fn parse_sentinels(v: &str) -> Result<Vec<SentinelAddr>, String> {
    let mut out = Vec::new();
    for entry in v.split(',').map(str::trim) {
        if entry.is_empty() {
            if v.trim().is_empty() {
                continue;
            }
            return Err("has an empty entry; expected host:port,host:port".into());
        }
        let (host, port) = split_host_port(entry)
            .ok_or_else(|| format!("entry {entry:?} is not host or host:port"))?;
        out.push(SentinelAddr {
            host: host.to_string(),
            port: port.unwrap_or(DEFAULT_SENTINEL_PORT),
        });
    }
    Ok(out)
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`; `None` when malformed.
fn split_host_port(entry: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match entry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (entry, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !host_ok {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return None,
            Ok(n) => Some(n),
        },
    };
    Some((host, port))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
