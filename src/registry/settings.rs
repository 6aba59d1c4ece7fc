//! The registry's slice of the configuration: what the pull path and its per-core state read, and
//! nothing else (Harbor's client has its own, [`crate::upstream::Settings`], and so does the
//! server). Built once from [`Config`] at start and shared read-only by every core.

use std::time::Duration;

use crate::cache::Ttls;
use crate::config::{AccessLog, Cidr, Config};

#[derive(Debug, Clone)]
pub struct Settings {
    /// The first path segment clients use instead of a real project.
    pub proxy_project: String,
    /// Bound for one attempt while finding a name's project (and for a mapped manifest's head).
    pub resolver_timeout: Duration,
    /// Identical concurrent mapped pulls share one request to Harbor (blobs across cores).
    pub coalesce_pulls: bool,
    /// How long a finished shared answer stays joinable (see [`super::sharing`]).
    pub coalesce_linger: Duration,
    pub shared_blob_window: usize,
    pub shared_blob_budget: usize,
    /// How long the lives of mappings, misses and kept manifests are.
    pub ttls: Ttls,
    /// Byte budget of this core's manifests kept by digest.
    pub manifest_bytes: u64,
    /// How long a tag's last confirmed answer may stand in for failures; zero: never.
    pub stale_if_error: Duration,
    /// Preferred projects, first first (empty: the fastest answer wins).
    pub fanout_order: Vec<String>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Idle connections to Harbor a core keeps: also the bound on race attempts finishing after
    /// their race.
    pub max_idle_conns_per_host: usize,
    pub access_log: AccessLog,
    pub circuit_breaker_threshold: u32,
    pub circuit_breaker_timeout: Duration,
    /// Requests and fan-outs per second per client IP.
    pub rate_limit_per_ip: u32,
    pub fanout_budget_per_ip: u32,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            proxy_project: config.proxy_project.clone(),
            resolver_timeout: config.resolver_timeout,
            coalesce_pulls: config.coalesce_pulls,
            coalesce_linger: config.coalesce_linger,
            shared_blob_window: config.shared_blob_window as usize,
            shared_blob_budget: config.shared_blob_budget as usize,
            ttls: Ttls {
                mapping: config.cache_ttl,
                stale: config.stale_while_revalidate,
                miss: config.negative_cache_ttl,
                manifest: config.manifest_cache_ttl,
            },
            manifest_bytes: config.manifest_cache_bytes / config.workers.max(1) as u64,
            stale_if_error: config.stale_if_error,
            fanout_order: config.fanout_order.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            max_idle_conns_per_host: config.max_idle_conns_per_host,
            access_log: config.access_log,
            circuit_breaker_threshold: config.circuit_breaker_threshold,
            circuit_breaker_timeout: config.circuit_breaker_timeout,
            rate_limit_per_ip: config.rate_limit_per_ip,
            fanout_budget_per_ip: config.fanout_budget_per_ip,
        }
    }
}
