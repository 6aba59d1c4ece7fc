//! Sharing what pods learn through Redis, found through Sentinel. Redis is an accelerator, never a
//! dependency: every request is served correctly while it is slow, frozen, down, failing over,
//! refusing the password or holding garbage.
//!
//! - One thread of its own ([`link`]) runs the `redis` crate on a tokio runtime; the cores talk to it
//!   through bounded channels and never wait on it longer than `REDIS_READ_TIMEOUT`.
//! - **Write-behind**: mappings learned by fan-outs, and misses, are queued fire-and-forget; a full
//!   queue sheds the write (counted, logged once per state change).
//! - **Read on miss** ([`RedisTier`], the last mapping tier): a core that misses its shard and the
//!   process map asks Redis before it fans out; the link coalesces the reads of one name.
//! - **Warm start**: discovery publishes the project list; a starting process loads it (as a
//!   provisional snapshot, when young enough) and the recent mappings.
//! - **Invalidation**: a mapping that moved is published on a channel; every pod's copies follow.
//! - **Last-known-good tags**: what a tag resolved to is written when a core learns it or sees it
//!   change (and again after a quarter of `STALE_IF_ERROR`, never per hit), and read only when every
//!   project that could confirm a tag failed and the core remembers nothing of it.
//!
//! Nothing here is touched by a request that hits its core's shard. The key schema is in [`schema`].

mod link;
pub mod schema;
mod source;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http::HeaderValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::cache::{LearnedMap, Mapping, Resolved, Tier, TierAnswer, TierLookup};
use crate::config::Config;
use crate::counter::Counter;
use crate::snapshot::{Project, SharedSnapshot, Snapshot};

use schema::{
    fingerprint, unix_ms, StoredManifest, StoredMapping, StoredMiss, StoredProjects, StoredTag,
};

/// Writes queued for the link before new ones are shed.
const WRITE_QUEUE: usize = 8192;
/// Reads queued for the link before a core stops asking (and fans out).
const READ_QUEUE: usize = 1024;
/// Changes queued per core.
const CHANGE_QUEUE: usize = 1024;

/// The link's state, as the health answer and the metrics show it; `Off` when Redis is not
/// configured (never the state of a link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Connecting = 0,
    Up = 1,
    Down = 2,
    Off = 3,
}

impl Status {
    pub const ALL: &'static [Status] = &[Status::Off, Status::Connecting, Status::Up, Status::Down];

    fn from_u8(v: u8) -> Status {
        match v {
            1 => Status::Up,
            2 => Status::Down,
            _ => Status::Connecting,
        }
    }

    /// The state of `link`, `Off` without one.
    pub fn of(link: Option<&Shared>) -> Status {
        link.map_or(Status::Off, Shared::status)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Off => "off",
            Status::Connecting => "connecting",
            Status::Up => "up",
            Status::Down => "down",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A write for the link.
#[derive(Debug)]
pub(crate) enum Write {
    Mapping {
        name: String,
        stored: StoredMapping,
        life: Duration,
        /// Publish it: the name was mapped elsewhere before.
        moved: bool,
    },
    Miss {
        key: String,
        stored: StoredMiss,
        ttl: Duration,
    },
    Projects(StoredProjects),
    Tag {
        key: String,
        stored: StoredTag,
        life: Duration,
    },
    /// A tag no longer to be stood in for (a project answered that it is not there).
    ForgetTag(String),
    /// A manifest a last-known-good tag resolved to, under its digest (an encoded
    /// [`StoredManifest`]).
    Manifest {
        digest: String,
        value: String,
        life: Duration,
    },
}

/// What a read asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Asking {
    /// The mapping of `name` and the miss `miss_key`.
    Lookup { name: String, miss_key: String },
    /// The last-known-good answer of the tag pull `key`.
    Tag(String),
    /// The manifest stored under this digest.
    Manifest(String),
}

/// A read for the link.
pub(crate) struct Read {
    asking: Asking,
    reply: oneshot::Sender<Answer>,
}

/// How a core's read went.
enum ReadOutcome {
    Answered(Box<Answer>),
    /// Asked, but no answer in time: counted as a miss at the Redis layer.
    TimedOut,
    /// Not sent (the link is down, or its read queue is full).
    NotAsked,
}

/// What Redis holds for one read (undecoded values are dropped by the link).
#[derive(Debug, Clone, Default)]
pub(crate) struct Answer {
    mapping: Option<StoredMapping>,
    miss: Option<StoredMiss>,
    tag: Option<StoredTag>,
    manifest: Option<Box<StoredManifest>>,
}

/// What the cores and the link share: the queues' senders and a few flags written on state changes
/// (never per request on a hit).
struct Inner {
    writes: mpsc::Sender<Write>,
    reads: mpsc::Sender<Read>,
    status: AtomicU8,
    /// A write was shed since the link last said the queue drained.
    shedding: AtomicBool,
    /// The endpoint the link reached last is a Redis Cluster node, which the link cannot use.
    cluster: AtomicBool,
    shed: AtomicU64,
    /// Reads answered, writes sent, times the link left (or could not reach) a master: the link's.
    reads_done: Counter,
    writes_done: Counter,
    errors: Counter,
    /// Reads a core stopped waiting for (`REDIS_READ_TIMEOUT`): written by the cores, rarely.
    read_timeouts: Counter,
    read_timeout: Duration,
    mapping_life: Duration,
    /// This pod's `NEGATIVE_CACHE_TTL`: the longest a shared miss is believed here (0: never).
    miss_life: Duration,
    /// This pod's `STALE_IF_ERROR`: how long a shared tag lives, and the oldest believed here.
    tag_life: Duration,
    /// Each core's change queue, registered when the core starts.
    cores: Mutex<Vec<mpsc::Sender<(String, Mapping)>>>,
}

/// What the link has done, as counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisStats {
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub shed: u64,
    pub read_timeouts: u64,
    /// The last endpoint reached is a Redis Cluster node.
    pub cluster: bool,
}

/// The cores' handle to Redis. Cloning shares it.
#[derive(Clone)]
pub struct Shared {
    inner: Arc<Inner>,
}

impl Shared {
    /// Starts the Redis thread when `REDIS_SENTINELS` or `REDIS_URL` is set. It fills `snapshot` with the
    /// project list from Redis if discovery has published nothing yet, and `learned` with the recent
    /// mappings; it stops when `shutdown` flips.
    pub fn start(
        config: &Arc<Config>,
        snapshot: SharedSnapshot,
        learned: Arc<LearnedMap>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Option<(Shared, std::thread::JoinHandle<()>)>> {
        let Some(source) = source::Source::from_config(config)? else {
            return Ok(None);
        };
        let (shared, write_rx, read_rx) = Shared::new(config, WRITE_QUEUE);
        let link = link::Link {
            config: config.clone(),
            shared: shared.clone(),
            snapshot,
            learned,
            shutdown,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the Redis runtime")?;
        let thread = std::thread::Builder::new()
            .name("hr-redis".into())
            .spawn(move || link.run(rt, source, write_rx, read_rx))
            .context("cannot spawn the Redis thread")?;
        Ok(Some((shared, thread)))
    }

    /// The handle and the link's ends of its queues.
    fn new(
        config: &Config,
        write_queue: usize,
    ) -> (Shared, mpsc::Receiver<Write>, mpsc::Receiver<Read>) {
        let (writes, write_rx) = mpsc::channel(write_queue);
        let (reads, read_rx) = mpsc::channel(READ_QUEUE);
        let shared = Shared {
            inner: Arc::new(Inner {
                writes,
                reads,
                status: AtomicU8::new(Status::Connecting as u8),
                shedding: AtomicBool::new(false),
                cluster: AtomicBool::new(false),
                shed: AtomicU64::new(0),
                reads_done: Counter::default(),
                writes_done: Counter::default(),
                errors: Counter::default(),
                read_timeouts: Counter::default(),
                read_timeout: config.redis_read_timeout,
                mapping_life: config.cache_ttl + config.stale_while_revalidate,
                miss_life: config.negative_cache_ttl,
                tag_life: config.stale_if_error,
                cores: Mutex::new(Vec::new()),
            }),
        };
        (shared, write_rx, read_rx)
    }

    pub fn status(&self) -> Status {
        self.state()
    }

    fn state(&self) -> Status {
        Status::from_u8(self.inner.status.load(Ordering::Relaxed))
    }

    fn set_state(&self, s: Status) {
        self.inner.status.store(s as u8, Ordering::Relaxed);
    }

    /// Writes shed so far (the queue was full).
    pub fn shed(&self) -> u64 {
        self.inner.shed.load(Ordering::Relaxed)
    }

    /// The link's counters, for the metrics.
    pub fn stats(&self) -> RedisStats {
        RedisStats {
            reads: self.inner.reads_done.get(),
            writes: self.inner.writes_done.get(),
            errors: self.inner.errors.get(),
            shed: self.shed(),
            read_timeouts: self.inner.read_timeouts.get(),
            cluster: self.inner.cluster.load(Ordering::Relaxed),
        }
    }

    /// Whether the endpoint the link reached is a Redis Cluster node (the link's own).
    pub(crate) fn set_cluster(&self, cluster: bool) {
        self.inner.cluster.store(cluster, Ordering::Relaxed);
    }

    /// A core's view of Redis, for its mapping tiers.
    pub fn tier(&self, snapshot: SharedSnapshot) -> RedisTier {
        RedisTier {
            shared: self.clone(),
            snapshot,
        }
    }

    /// Registers a core: the returned queue delivers mappings other pods moved.
    pub fn register_core(&self) -> mpsc::Receiver<(String, Mapping)> {
        let (tx, rx) = mpsc::channel(CHANGE_QUEUE);
        if let Ok(mut cores) = self.inner.cores.lock() {
            cores.push(tx);
        }
        rx
    }

    /// Publishes a list discovery read, with the time it was read, for pods that start later.
    pub fn publish_projects(&self, snapshot: &Snapshot) {
        if snapshot.provisional {
            return; // provisional: it came from Redis
        }
        self.write(Write::Projects(StoredProjects::new(
            &snapshot.projects,
            unix_ms_of(snapshot.built_at),
        )));
    }

    /// Queues `w` unless Redis is down (nothing would take it) or the queue is full (shed).
    fn write(&self, w: Write) {
        if self.state() != Status::Up {
            return;
        }
        if self.inner.writes.try_send(w).is_err() {
            self.inner.shed.fetch_add(1, Ordering::Relaxed);
            if !self.inner.shedding.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    queue = WRITE_QUEUE,
                    "Redis write queue full: shedding writes (mappings stay in memory)"
                );
            }
        }
    }

    /// Shares what the tag pull `key` resolved to (in `project`, confirmed at `at`).
    pub fn share_tag(&self, key: &str, resolved: &Resolved, project: &Project, at: Instant) {
        let life = self.inner.tag_life;
        if life.is_zero() {
            return;
        }
        let (Ok(digest), Ok(media_type)) = (resolved.digest.to_str(), resolved.media_type.to_str())
        else {
            return;
        };
        self.write(Write::Tag {
            key: key.to_string(),
            stored: StoredTag {
                v: schema::VERSION,
                digest: digest.to_string(),
                media_type: media_type.to_string(),
                length: resolved.length,
                project: project.name.clone(),
                project_id: project.id,
                at: unix_ms_of(at),
            },
            life,
        });
    }

    /// Drops the shared last-known-good answer of the tag pull `key`.
    pub fn forget_tag(&self, key: &str) {
        if !self.inner.tag_life.is_zero() {
            self.write(Write::ForgetTag(key.to_string()));
        }
    }

    /// What another pod last saw the tag pull `key` resolve to, and when, if that names a project
    /// of `snapshot` and is younger than `STALE_IF_ERROR`; waits at most `REDIS_READ_TIMEOUT`.
    pub async fn tag(&self, key: &str, snapshot: &Snapshot) -> Option<(Resolved, Instant)> {
        let ReadOutcome::Answered(answer) = self.read(Asking::Tag(key.to_string())).await else {
            return None;
        };
        let t = answer.tag.filter(|t| t.valid_in(snapshot))?;
        let at = instant_of(t.at);
        if at.elapsed() >= self.inner.tag_life {
            return None;
        }
        let resolved = Resolved {
            digest: HeaderValue::from_str(&t.digest).ok()?,
            media_type: HeaderValue::from_str(&t.media_type).ok()?,
            length: t.length,
            project: t.project,
            // Stored under its digest, read when a stale GET needs it ([`Shared::manifest`]).
            manifest: None,
        };
        Some((resolved, at))
    }

    /// Shares `manifest`, what a last-known-good tag resolved to (`digest`, of `media_type`), for
    /// another pod's stale GET; kept as long as a tag naming it is shared.
    pub fn share_manifest(&self, digest: &HeaderValue, media_type: &HeaderValue, manifest: &[u8]) {
        let life = self.inner.tag_life;
        if life.is_zero() {
            return;
        }
        let (Ok(digest), Ok(media_type)) = (digest.to_str(), media_type.to_str()) else {
            return;
        };
        if crate::names::valid_digest(digest).is_err() {
            return;
        }
        let Some(value) = StoredManifest::encode(media_type, manifest) else {
            return;
        };
        self.write(Write::Manifest {
            digest: digest.to_string(),
            value,
            life,
        });
    }

    /// The manifest another pod shared under `digest`, if it hashes to it and is of `media_type`;
    /// waits at most `REDIS_READ_TIMEOUT`.
    pub async fn manifest(&self, digest: &HeaderValue, media_type: &HeaderValue) -> Option<Bytes> {
        let digest = digest.to_str().ok()?;
        crate::names::valid_digest(digest).ok()?;
        let ReadOutcome::Answered(answer) = self.read(Asking::Manifest(digest.to_string())).await
        else {
            return None;
        };
        let m = answer.manifest?;
        (m.media_type.as_bytes() == media_type.as_bytes()).then(|| Bytes::from(m.manifest))
    }

    /// Asks the link, waiting at most `REDIS_READ_TIMEOUT`.
    async fn read(&self, asking: Asking) -> ReadOutcome {
        if self.state() != Status::Up {
            return ReadOutcome::NotAsked;
        }
        let (reply, answer) = oneshot::channel();
        let read = Read { asking, reply };
        if self.inner.reads.try_send(read).is_err() {
            return ReadOutcome::NotAsked;
        }
        match monoio::time::timeout(self.inner.read_timeout, answer).await {
            Ok(Ok(answer)) => ReadOutcome::Answered(Box::new(answer)),
            // The link dropped the read (it lost the master meanwhile).
            Ok(Err(_)) => ReadOutcome::TimedOut,
            Err(_) => {
                self.inner.read_timeouts.inc_shared();
                ReadOutcome::TimedOut
            }
        }
    }
}

/// The instant `at` (unix ms) was, on this process's monotonic clock; never in the future.
pub(crate) fn instant_of(at: u64) -> Instant {
    let now = Instant::now();
    let age = unix_ms(SystemTime::now()).saturating_sub(at);
    now.checked_sub(Duration::from_millis(age)).unwrap_or(now)
}

/// Unix ms of the monotonic instant `t`.
fn unix_ms_of(t: Instant) -> u64 {
    let age = Instant::now().saturating_duration_since(t);
    unix_ms(SystemTime::now()).saturating_sub(age.as_millis() as u64)
}

/// Redis as one core's last mapping tier. Its answers are checked against the current snapshot: a
/// mapping to a project this pod does not know (by name and id) is not used.
pub struct RedisTier {
    shared: Shared,
    snapshot: SharedSnapshot,
}

impl RedisTier {
    fn stored(&self, mapping: &Mapping) -> Option<StoredMapping> {
        let snapshot = self.snapshot.load();
        let project = snapshot.as_ref()?.project(&mapping.project)?;
        Some(StoredMapping::new(project, unix_ms_of(mapping.learned_at)))
    }

    fn write_mapping(&self, name: &str, mapping: &Mapping, moved: bool) {
        if let Some(stored) = self.stored(mapping) {
            self.shared.write(Write::Mapping {
                name: name.to_string(),
                stored,
                life: self.shared.inner.mapping_life,
                moved,
            });
        }
    }
}

impl Tier for RedisTier {
    fn get<'a>(&'a self, name: &'a str, miss_key: &'a str) -> TierLookup<'a> {
        Box::pin(async move {
            let asking = Asking::Lookup {
                name: name.to_string(),
                miss_key: miss_key.to_string(),
            };
            let answer = match self.shared.read(asking).await {
                ReadOutcome::Answered(a) => a,
                ReadOutcome::TimedOut => return None,
                ReadOutcome::NotAsked => return Some(TierAnswer::NotAsked),
            };
            let snapshot = self.snapshot.load_full()?;
            if let Some(m) = answer.mapping.filter(|m| m.valid_in(&snapshot)) {
                return Some(TierAnswer::Mapped(Mapping {
                    project: m.project,
                    learned_at: instant_of(m.at),
                }));
            }
            // A miss counts only for the same projects, and never longer than this pod's own
            // NEGATIVE_CACHE_TTL (0: misses are not remembered here at all); one that claims to
            // last longer than this pod would have written it is not believed.
            let miss = answer
                .miss
                .filter(|m| m.projects == fingerprint(&snapshot.projects))?;
            let life = self.shared.inner.miss_life;
            let left = Duration::from_millis(miss.until.checked_sub(unix_ms(SystemTime::now()))?);
            if left > life + schema::CLOCK_SKEW {
                return None;
            }
            let left = left.min(life);
            if left.is_zero() {
                return None;
            }
            Some(TierAnswer::Missing {
                detail: miss.detail.map(Bytes::from),
                until: Instant::now() + left,
            })
        })
    }

    fn learn(&self, name: &str, mapping: &Mapping) {
        self.write_mapping(name, mapping, false);
    }

    fn moved(&self, name: &str, mapping: &Mapping) {
        self.write_mapping(name, mapping, true);
    }

    /// A wrong mapping in Redis is overwritten by the next learn and is never used for a project
    /// the pod does not know; it is not deleted here (another pod may have written a better one).
    fn forget(&self, _name: &str, _project: &str) {}

    fn missed(&self, key: &str, detail: Option<&Bytes>, ttl: Duration) {
        let until = unix_ms(SystemTime::now()) + ttl.as_millis() as u64;
        let Some(snapshot) = self.snapshot.load_full() else {
            return;
        };
        self.shared.write(Write::Miss {
            key: key.to_string(),
            stored: StoredMiss {
                v: schema::VERSION,
                until,
                projects: fingerprint(&snapshot.projects),
                detail: detail.and_then(|d| std::str::from_utf8(d).ok().map(str::to_string)),
            },
            ttl,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let env = std::collections::HashMap::from([("HARBOR_URL", "http://harbor.test")]);
        Config::from_lookup(|k| match env.get(k) {
            Some(v) => crate::config::Lookup::Value(v.to_string()),
            None => crate::config::Lookup::Unset,
        })
        .unwrap()
    }

    fn miss(key: &str) -> Write {
        Write::Miss {
            key: key.into(),
            stored: StoredMiss {
                v: schema::VERSION,
                until: 0,
                projects: 0,
                detail: None,
            },
            ttl: Duration::from_secs(1),
        }
    }

    #[test]
    fn writes_wait_for_the_link_and_a_full_queue_sheds_them() {
        let (shared, mut writes, _reads) = Shared::new(&config(), 2);
        shared.write(miss("before"));
        assert!(writes.try_recv().is_err(), "not queued while connecting");
        shared.set_state(Status::Up);
        for k in ["a", "b", "c", "d"] {
            shared.write(miss(k));
        }
        assert_eq!(shared.shed(), 2, "two fit, two are shed");
        assert!(shared.inner.shedding.load(Ordering::Relaxed));
        let queued: Vec<String> = std::iter::from_fn(|| writes.try_recv().ok())
            .map(|w| match w {
                Write::Miss { key, .. } => key,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(queued, ["a", "b"]);
        shared.set_state(Status::Down);
        shared.write(miss("down"));
        assert!(writes.try_recv().is_err(), "not queued while down");
        assert_eq!(shared.shed(), 2, "skipped while down, not shed");
    }

    #[test]
    fn monotonic_and_unix_times_convert_both_ways() {
        let now = unix_ms(SystemTime::now());
        let t = instant_of(now - 60_000);
        let age = t.elapsed();
        assert!(
            age >= Duration::from_secs(59) && age < Duration::from_secs(62),
            "{age:?}"
        );
        let back = unix_ms_of(t);
        assert!(back.abs_diff(now - 60_000) < 1000);
        assert!(
            instant_of(now + 3_600_000) <= Instant::now(),
            "never in the future"
        );
    }
}
