//! The Redis thread: one tokio runtime running the `redis` crate. It finds the master through
//! Sentinel (or connects to the one endpoint of `REDIS_URL`: a managed Redis, whose failover happens
//! behind that endpoint), serves the cores' queues (reads first, coalesced by name; writes in
//! pipelines), listens for moved mappings and for Sentinel's `+switch-master`, and pings the master.
//! Any error (the connection drops, the master answers `READONLY` after a failover, a command gets
//! no answer within [`RESPONSE_LIMIT`]) sends it back through Sentinel to the current master (or to
//! the endpoint again); while it reconnects, with backoff and jitter, the cores serve from memory
//! and fan-out. It logs once per state change.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::{mpsc, watch, Notify};

use crate::cache::{LearnedMap, Mapping};
use crate::config::Config;
use crate::snapshot::{SharedSnapshot, Snapshot};

use super::schema::{
    unix_ms, Keys, StoredChange, StoredManifest, StoredMapping, StoredMiss, StoredProjects,
    StoredTag, PROJECTS_LIFE, RECENT_MAX,
};
use super::source::Source;
use super::{instant_of, Answer, Asking, Read, Shared, Status, Write};

/// Longest wait for one command's answer (a frozen master is left after this).
const RESPONSE_LIMIT: Duration = Duration::from_secs(1);
/// Longest wait for Sentinel to name a master and for the connection to it.
const CONNECT_LIMIT: Duration = Duration::from_secs(2);
/// How often an idle connection is checked.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Reconnect backoff bounds (each wait is jittered down to half).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Commands per pipeline.
const BATCH: usize = 256;
/// Longest the warm start may take.
const WARM_LIMIT: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the reconnect backoff.
const STEADY: Duration = Duration::from_secs(10);
/// Mappings fetched per MGET at warm start.
const WARM_CHUNK: usize = 1000;

pub(super) struct Link {
    pub config: Arc<Config>,
    pub shared: Shared,
    pub snapshot: SharedSnapshot,
    pub learned: Arc<LearnedMap>,
    pub shutdown: watch::Receiver<bool>,
}

/// Why the link left a master.
type Lost = String;

impl Link {
    /// Serves the queues on `rt` (built by the starter, so a router that says "listening" has it).
    pub fn run(
        self,
        rt: tokio::runtime::Runtime,
        source: Source,
        writes: mpsc::Receiver<Write>,
        reads: mpsc::Receiver<Read>,
    ) {
        rt.block_on(self.serve(source, writes, reads));
    }

    async fn serve(
        self,
        mut source: Source,
        mut writes: mpsc::Receiver<Write>,
        mut reads: mpsc::Receiver<Read>,
    ) {
        let keys = Keys::new(&self.config.redis_key_prefix, self.config.redis_db);
        let mut backoff = BACKOFF_MIN;
        let mut last_problem: Option<String> = None;
        let mut warmed = false;
        let mut shutdown = self.shutdown.clone();
        loop {
            let connected = tokio::select! {
                c = tokio::time::timeout(CONNECT_LIMIT, connect(&mut source, self.config.redis_tls)) => c,
                _ = shutdown.changed() => return,
            };
            let connected = match connected {
                Ok(Ok((mut conn, master))) => match cluster_mode(&mut conn).await {
                    Ok(cluster) => {
                        self.shared.set_cluster(cluster);
                        if cluster {
                            Err(CLUSTER_REFUSED.to_string())
                        } else {
                            Ok((conn, master))
                        }
                    }
                    Err(e) => Err(describe(&e)),
                },
                Ok(Err(problem)) => Err(problem),
                Err(_) => Err(format!("no master within {CONNECT_LIMIT:?}")),
            };
            match connected {
                Err(problem) => self.down(&mut last_problem, problem),
                Ok((mut conn, master)) => {
                    last_problem = None;
                    self.shared.set_state(Status::Up);
                    tracing::info!(master = %master, via = source.via(), "Redis connected; sharing mappings");
                    let since = std::time::Instant::now();
                    let why = tokio::select! {
                        why = self.connected(&mut conn, &mut source, &keys, &mut warmed, &mut writes, &mut reads) => why,
                        _ = shutdown.changed() => return,
                    };
                    self.down(&mut last_problem, why);
                    if since.elapsed() >= STEADY {
                        backoff = BACKOFF_MIN;
                    }
                }
            }
            let wait = jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = idle(wait, &mut writes, &mut reads) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Uses a fresh connection to the master until it fails: warm start (once per process), the
    /// listeners, the queues. Returns why it stopped.
    async fn connected(
        &self,
        conn: &mut MultiplexedConnection,
        source: &mut Source,
        keys: &Keys,
        warmed: &mut bool,
        writes: &mut mpsc::Receiver<Write>,
        reads: &mut mpsc::Receiver<Read>,
    ) -> Lost {
        let warm = async {
            self.load_list(conn, keys).await?;
            self.load_mappings(conn, keys, warmed).await
        };
        if let Err(e) = warm.await {
            return describe(&e);
        }
        // Discovery may have read the projects while Redis was away: share them now (with the time
        // it read them, so a list that is already old is not passed off as a fresh one).
        if let Some(s) = self.snapshot.load().as_ref() {
            self.shared.publish_projects(s);
        }
        let lost = Arc::new(Notify::new());
        let listeners = self.listen(source, keys, lost.clone()).await;
        let why = self.work(conn, keys, writes, reads, &lost, warmed).await;
        drop(listeners);
        why
    }

    /// Marks the link down and logs the problem when it is a new one.
    fn down(&self, last: &mut Option<String>, problem: String) {
        self.shared.set_state(Status::Down);
        self.shared.inner.errors.inc();
        if last.as_deref() != Some(problem.as_str()) {
            tracing::warn!(problem = %problem, "Redis unavailable; serving from memory and fan-out, retrying in the background");
            *last = Some(problem);
        }
    }

    /// Serves the queues on `conn` until something goes wrong; returns what.
    async fn work(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        writes: &mut mpsc::Receiver<Write>,
        reads: &mut mpsc::Receiver<Read>,
        lost: &Notify,
        warmed: &mut bool,
    ) -> Lost {
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut read_batch = Vec::with_capacity(BATCH);
        let mut write_batch = Vec::with_capacity(BATCH);
        loop {
            let result = tokio::select! {
                biased;
                _ = lost.notified() => return "Sentinel switched the master, or the change listener stopped".into(),
                n = reads.recv_many(&mut read_batch, BATCH) => {
                    if n == 0 { return "the read queue closed".into() }
                    self.shared.inner.reads_done.add(n as u64);
                    serve_reads(conn, keys, &mut read_batch).await
                }
                n = writes.recv_many(&mut write_batch, BATCH) => {
                    if n == 0 { return "the write queue closed".into() }
                    let r = self.serve_writes(conn, keys, &mut write_batch).await;
                    if r.is_ok() {
                        // Counted once Redis has them: a reader of the metric can rely on them.
                        self.shared.inner.writes_done.add(n as u64);
                    }
                    if writes.is_empty() && self.shared.inner.shedding.swap(false, Ordering::Relaxed) {
                        tracing::info!(shed_total = self.shared.shed(), "Redis write queue drained; writes flow again");
                    }
                    r
                }
                // Warm start waits for a snapshot to check mappings against; the tick retries it.
                _ = ping.tick() => match self.load_mappings(conn, keys, warmed).await {
                    Ok(()) => redis::cmd("PING").query_async::<()>(conn).await,
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                return describe(&e);
            }
        }
    }

    async fn serve_writes(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        batch: &mut Vec<Write>,
    ) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        let now = unix_ms(SystemTime::now());
        for w in batch.drain(..) {
            match w {
                Write::Mapping {
                    name,
                    stored,
                    life,
                    moved,
                } => {
                    let value = serde_json::to_string(&stored).unwrap_or_default();
                    let Some(left) = life_left(life, stored.at, now) else {
                        continue;
                    };
                    pipe.cmd("SET")
                        .arg(keys.mapping(&name))
                        .arg(&value)
                        .arg("PX")
                        .arg(left);
                    pipe.cmd("ZADD")
                        .arg(keys.recent())
                        .arg(stored.at)
                        .arg(&name);
                    pipe.cmd("ZREMRANGEBYRANK")
                        .arg(keys.recent())
                        .arg(0)
                        .arg(-(RECENT_MAX as i64) - 1);
                    pipe.cmd("PEXPIRE")
                        .arg(keys.recent())
                        .arg(life.as_millis() as u64);
                    if moved {
                        let change = StoredChange::new(&name, &stored);
                        pipe.cmd("PUBLISH")
                            .arg(keys.changes())
                            .arg(serde_json::to_string(&change).unwrap_or_default());
                    }
                }
                Write::Miss { key, stored, ttl } => {
                    pipe.cmd("SET")
                        .arg(keys.miss(&key))
                        .arg(serde_json::to_string(&stored).unwrap_or_default())
                        .arg("PX")
                        .arg(ttl.as_millis().max(1) as u64);
                }
                Write::Tag { key, stored, life } => {
                    let Some(left) = life_left(life, stored.at, now) else {
                        continue;
                    };
                    pipe.cmd("SET")
                        .arg(keys.tag(&key))
                        .arg(serde_json::to_string(&stored).unwrap_or_default())
                        .arg("PX")
                        .arg(left);
                    // The manifest it names (if a pod shared it) lives as long as the tag.
                    pipe.cmd("PEXPIRE")
                        .arg(keys.manifest(&stored.digest))
                        .arg(life.as_millis() as u64);
                }
                Write::Manifest {
                    digest,
                    value,
                    life,
                } => {
                    pipe.cmd("SET")
                        .arg(keys.manifest(&digest))
                        .arg(value)
                        .arg("PX")
                        .arg(life.as_millis() as u64);
                }
                Write::ForgetTag(key) => {
                    pipe.cmd("DEL").arg(keys.tag(&key));
                }
                Write::Projects(list) => {
                    pipe.cmd("SET")
                        .arg(keys.projects())
                        .arg(serde_json::to_string(&list).unwrap_or_default())
                        .arg("PX")
                        .arg(PROJECTS_LIFE.as_millis() as u64);
                }
            }
        }
        if pipe.is_empty() {
            return Ok(());
        }
        // One refused command (a key of the wrong type) is not a reason to leave the master; a
        // master that became a replica (READONLY) is.
        let results: Vec<redis::RedisResult<redis::Value>> =
            pipe.ignore_errors().query_async(conn).await?;
        for r in results {
            if let Err(e) = r {
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
                    return Err(e);
                }
                tracing::debug!(error = %e, "Redis refused a write");
            }
        }
        Ok(())
    }

    /// Before the first discovery: loads the project list, as a provisional snapshot when it is
    /// young enough. Refused or unreadable values are logged, not a reason to leave the master.
    async fn load_list(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
    ) -> Result<(), RedisError> {
        if self.snapshot.load().is_some() {
            return Ok(());
        }
        let raw: Option<Vec<u8>> = match redis::cmd("GET")
            .arg(keys.projects())
            .query_async(conn)
            .await
        {
            Ok(raw) => raw,
            Err(e) if connection_trouble(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %describe(&e), "cannot read the project list in Redis");
                None
            }
        };
        let now = unix_ms(SystemTime::now());
        match raw.and_then(|r| StoredProjects::decode(&r, self.config.max_fanout_projects, now)) {
            Some(list) => self.provisional(&list, now),
            None => tracing::info!("no usable project list in Redis; waiting for discovery"),
        }
        Ok(())
    }

    /// Once per process, as soon as a snapshot exists to check them against: loads the newest
    /// mappings into the process map. Sets `done` once it has run (whatever it found).
    async fn load_mappings(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        done: &mut bool,
    ) -> Result<(), RedisError> {
        if *done {
            return Ok(());
        }
        let Some(snapshot) = self.snapshot.load_full() else {
            return Ok(());
        };
        match tokio::time::timeout(WARM_LIMIT, self.read_mappings(conn, keys, &snapshot)).await {
            Ok(Ok(loaded)) => {
                tracing::info!(mappings = loaded, "warm start: mappings loaded from Redis")
            }
            Ok(Err(e)) if connection_trouble(&e) => return Err(e),
            Ok(Err(e)) => {
                tracing::warn!(error = %describe(&e), "warm start: cannot read the recent mappings in Redis")
            }
            Err(_) => tracing::warn!(
                "warm start from Redis took longer than {WARM_LIMIT:?}; went on without the rest"
            ),
        }
        *done = true;
        Ok(())
    }

    async fn read_mappings(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        snapshot: &Snapshot,
    ) -> Result<usize, RedisError> {
        let names: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(keys.recent())
            .arg(0)
            .arg(RECENT_MAX as i64 - 1)
            .query_async(conn)
            .await?;
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| super::schema::valid_mapping_key(n))
            .collect();
        let life = self.shared.inner.mapping_life;
        let now = unix_ms(SystemTime::now());
        let mut loaded = 0usize;
        for chunk in names.chunks(WARM_CHUNK) {
            let mapping_keys: Vec<String> = chunk.iter().map(|n| keys.mapping(n)).collect();
            // MGET answers nil for a key of another type.
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&mapping_keys)
                .query_async(conn)
                .await?;
            for (name, raw) in chunk.iter().zip(values) {
                let Some(m) = raw.and_then(|r| StoredMapping::decode(&r, now)) else {
                    continue;
                };
                let learned_at = instant_of(m.at);
                if !m.valid_in(snapshot) || learned_at.elapsed() >= life {
                    continue;
                }
                self.learned.insert(
                    name,
                    &Mapping {
                        project: m.project,
                        learned_at,
                    },
                );
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// Publishes `list` as a provisional snapshot, unless discovery was first. However old the list
    /// (its key lives [`PROJECTS_LIFE`]), it keeps the time discovery read it: a pod that starts
    /// while Harbor's API is down serves with what the other pods last read, and its age shows in
    /// `/readyz` and `harbor_router_project_list_age_seconds` (the alert, not readiness, is what says
    /// the list is old).
    fn provisional(&self, list: &StoredProjects, now: u64) {
        let age = Duration::from_millis(now.saturating_sub(list.at));
        let built_at = instant_of(list.at);
        let projects = list.projects();
        let count = projects.len();
        let provisional = Arc::new(Snapshot {
            projects,
            built_at,
            generation: 0,
            harbor: Default::default(),
            provisional: true,
        });
        let before = self
            .snapshot
            .compare_and_swap(&None::<Arc<Snapshot>>, Some(provisional));
        if before.is_none() {
            tracing::info!(
                projects = count,
                age_seconds = age.as_secs(),
                "serving with the project list from Redis until discovery completes"
            );
        }
    }

    /// Starts the listeners: moved mappings on the changes channel, and Sentinel's
    /// `+switch-master`. Either one noticing a switch (or its connection ending) wakes `lost`.
    async fn listen(&self, source: &mut Source, keys: &Keys, lost: Arc<Notify>) -> Listeners {
        let mut tasks = Vec::new();
        if let Ok(Ok(client)) = tokio::time::timeout(CONNECT_LIMIT, source.client()).await {
            let changes = keys.changes();
            let (shared, snapshot, learned, lost) = (
                self.shared.clone(),
                self.snapshot.clone(),
                self.learned.clone(),
                lost.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let subscribed = tokio::time::timeout(CONNECT_LIMIT, async {
                    let mut ps = client.get_async_pubsub().await?;
                    ps.subscribe(&changes).await?;
                    Ok::<_, RedisError>(ps)
                })
                .await;
                let Ok(Ok(ps)) = subscribed else {
                    // The master's other commands still work; the next connection tries again.
                    tracing::warn!("cannot subscribe to moved mappings on the Redis master; other pods' moves are not heard until the link reconnects");
                    return;
                };
                let mut messages = ps.into_on_message();
                use futures_util::StreamExt;
                while let Some(msg) = messages.next().await {
                    heard(&shared, &snapshot, &learned, msg.get_payload_bytes());
                }
                lost.notify_one();
            }));
        }
        let Source::Sentinel(sentinel) = source else {
            return Listeners(tasks);
        };
        if let Ok(Ok(client)) =
            tokio::time::timeout(CONNECT_LIMIT, sentinel.async_get_sentinel_client()).await
        {
            let master = self.config.redis_master_name.clone();
            tasks.push(tokio::spawn(async move {
                let subscribed = tokio::time::timeout(CONNECT_LIMIT, async {
                    let mut ps = client.get_async_pubsub().await?;
                    ps.subscribe("+switch-master").await?;
                    Ok::<_, RedisError>(ps)
                })
                .await;
                let Ok(Ok(ps)) = subscribed else {
                    tracing::warn!("cannot subscribe to Sentinel's +switch-master; a failover is noticed when the master stops answering");
                    return;
                };
                let mut messages = ps.into_on_message();
                use futures_util::StreamExt;
                while let Some(msg) = messages.next().await {
                    let text = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                    if text.split(' ').next() == Some(master.as_str()) {
                        tracing::info!(switch = %text, "Sentinel switched the Redis master");
                        lost.notify_one();
                        return;
                    }
                }
                // A sentinel going away is not a reason to leave the master.
            }));
        }
        Listeners(tasks)
    }
}

/// The listener tasks of one connection; stopped when it is left (or the link stops).
struct Listeners(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Listeners {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A moved mapping (from another pod, or from another core of this one): checked against this
/// pod's snapshot, then adopted by the process map and by every core that has a copy.
fn heard(shared: &Shared, snapshot: &SharedSnapshot, learned: &LearnedMap, payload: &[u8]) {
    let Some(change) = StoredChange::decode(payload, unix_ms(SystemTime::now())) else {
        return;
    };
    let m = change.mapping();
    if !snapshot.load().as_ref().is_some_and(|s| m.valid_in(s)) {
        return;
    }
    let mapping = Mapping {
        project: m.project,
        learned_at: instant_of(m.at),
    };
    tracing::debug!(name = %change.name, project = %mapping.project, "a mapping moved; following");
    learned.insert(&change.name, &mapping);
    if let Ok(cores) = shared.inner.cores.lock() {
        for core in cores.iter() {
            let _ = core.try_send((change.name.clone(), mapping.clone()));
        }
    }
}

/// Milliseconds left of a value's `life` counted from `at` (unix ms), at `now`; `None` when none.
fn life_left(life: Duration, at: u64, now: u64) -> Option<u64> {
    let left = (life.as_millis() as u64).saturating_sub(now.saturating_sub(at));
    (left > 0).then_some(left)
}

/// Readers waiting for one answer.
type Waiting = Vec<(Asking, Vec<tokio::sync::oneshot::Sender<Answer>>)>;

/// Groups a batch of reads by what they ask, so cores missing the same name at once cost one read;
/// reads whose core stopped waiting are dropped.
fn group(batch: &mut Vec<Read>) -> Waiting {
    let mut index: HashMap<Asking, usize> = HashMap::new();
    let mut waiting: Waiting = Vec::new();
    for r in batch.drain(..) {
        if r.reply.is_closed() {
            continue;
        }
        let key = r.asking;
        match index.get(&key) {
            Some(&i) => waiting[i].1.push(r.reply),
            None => {
                index.insert(key.clone(), waiting.len());
                waiting.push((key, vec![r.reply]));
            }
        }
    }
    waiting
}

/// Answers a batch of reads with one pipeline: a pair of GETs per distinct (name, miss key), one
/// GET per distinct tag.
async fn serve_reads(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    batch: &mut Vec<Read>,
) -> Result<(), RedisError> {
    let waiting = group(batch);
    if waiting.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (asking, _) in &waiting {
        match asking {
            Asking::Lookup { name, miss_key } => {
                pipe.cmd("GET").arg(keys.mapping(name));
                pipe.cmd("GET").arg(keys.miss(miss_key));
            }
            Asking::Tag(key) => {
                pipe.cmd("GET").arg(keys.tag(key));
            }
            Asking::Manifest(digest) => {
                pipe.cmd("GET").arg(keys.manifest(digest));
            }
        }
    }
    // A key holding the wrong type fails its own GET, not the pipeline (nor the connection).
    let values: Vec<redis::RedisResult<Option<Vec<u8>>>> =
        pipe.ignore_errors().query_async(conn).await?;
    let value = |i: usize| -> Option<Vec<u8>> {
        match values.get(i) {
            Some(Ok(v)) => v.clone(),
            _ => None,
        }
    };
    let now = unix_ms(SystemTime::now());
    let mut i = 0;
    for (asking, replies) in waiting {
        let answer = match asking {
            Asking::Lookup { .. } => {
                i += 2;
                Answer {
                    mapping: value(i - 2).and_then(|r| StoredMapping::decode(&r, now)),
                    miss: value(i - 1).and_then(|r| StoredMiss::decode(&r)),
                    tag: None,
                    manifest: None,
                }
            }
            Asking::Tag(_) => {
                i += 1;
                Answer {
                    tag: value(i - 1).and_then(|r| StoredTag::decode(&r, now)),
                    ..Answer::default()
                }
            }
            Asking::Manifest(digest) => {
                i += 1;
                Answer {
                    manifest: value(i - 1)
                        .and_then(|r| StoredManifest::decode(&r, &digest))
                        .map(Box::new),
                    ..Answer::default()
                }
            }
        };
        for reply in replies {
            let _ = reply.send(answer.clone());
        }
    }
    Ok(())
}

/// Why the link does not use a Redis Cluster node.
const CLUSTER_REFUSED: &str = "this Redis is a Redis Cluster node (cluster mode): the link's multi-key reads and pipelines need a single Redis, so mappings stay in memory; point REDIS_URL or REDIS_SENTINELS at a non-cluster Redis (a managed service's cluster mode disabled)";

/// Whether the server on `conn` runs in cluster mode (`INFO cluster`: `cluster_enabled:1`). A
/// server that refuses `INFO` (some managed services rename it) is taken as a single Redis; only a
/// connection problem is an error.
async fn cluster_mode(conn: &mut MultiplexedConnection) -> Result<bool, RedisError> {
    match redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(conn)
        .await
    {
        Ok(info) => Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1")),
        Err(e) if connection_trouble(&e) || e.is_timeout() => Err(e),
        Err(_) => Ok(false),
    }
}

/// Finds the master (through Sentinel, or at its one endpoint) and connects to it (in TLS when
/// `tls`); what went wrong, described for the log, when it cannot.
async fn connect(
    source: &mut Source,
    tls: bool,
) -> Result<(MultiplexedConnection, String), String> {
    // Through Sentinel, the crate opens the master (and the Sentinels) while finding it: a
    // certificate it refuses shows here.
    let client = source
        .client()
        .await
        .map_err(|e| describe_connecting(&e, source.unnamed_address(), tls))?;
    let master = client.get_connection_info().addr().to_string();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_LIMIT))
        .set_response_timeout(Some(RESPONSE_LIMIT));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| describe_connecting(&e, &master, tls))?;
    Ok((conn, master))
}

/// While down: waits `wait`, dropping what the cores queued before they saw the state (reads are
/// answered "nothing" by dropping them; writes would be stale by the time Redis is back).
async fn idle(
    wait: Duration,
    writes: &mut mpsc::Receiver<Write>,
    reads: &mut mpsc::Receiver<Read>,
) {
    let deadline = tokio::time::Instant::now() + wait;
    let (mut dropped_writes, mut dropped_reads) = (Vec::new(), Vec::new());
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return,
            n = writes.recv_many(&mut dropped_writes, BATCH) => { if n == 0 { return } dropped_writes.clear() }
            n = reads.recv_many(&mut dropped_reads, BATCH) => { if n == 0 { return } dropped_reads.clear() }
        }
    }
}

/// Half to all of `d`, so pods do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos() as u64);
    let half = d / 2;
    half + Duration::from_nanos(nanos % (half.as_nanos() as u64).max(1))
}

/// An error that says the connection (or the master behind it) is no longer usable, as opposed to
/// one command refused (a key of the wrong type).
fn connection_trouble(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

/// What went wrong connecting to `addr`, for the log: [`describe`], with the address, and for an
/// error that a wrong TLS setting explains, the setting.
fn describe_connecting(e: &RedisError, addr: &str, tls: bool) -> String {
    let tls_failure = tls_error(e);
    if let Some(rustls::Error::InvalidCertificate(why)) = tls_failure {
        use rustls::CertificateError as C;
        return match why {
            C::NotValidForNameContext { presented, .. } => {
                not_named(addr, &format!(" (it names {})", presented.join(", ")))
            }
            C::NotValidForName => not_named(addr, ""),
            C::UnknownIssuer | C::BadSignature => format!(
                "Redis's certificate at {addr} is not trusted ({why:?}): REDIS_CA_FILE must hold the CA that signed it (the system's trust store is used beside it)"
            ),
            _ => format!("Redis's certificate at {addr} is refused: {why:?}"),
        };
    }
    if tls_failure.is_some() {
        return format!(
            "TLS to Redis at {addr} failed ({e}): is that a TLS port? (redis:// and no REDIS_TLS for a plain one)"
        );
    }
    let problem = describe(e);
    // What a TLS-only port does to a plain client: it resets or closes the connection (a refusal,
    // a name that does not resolve or a host that does not answer is something else).
    use std::io::ErrorKind as Io;
    let cut_off = matches!(
        io_error(e).map(std::io::Error::kind),
        Some(Io::ConnectionReset | Io::UnexpectedEof | Io::ConnectionAborted | Io::BrokenPipe)
    );
    if !tls && cut_off {
        return format!(
            "{problem} at {addr}; a Redis that speaks only TLS closes plain connections: for TLS write rediss:// (REDIS_URL) or set REDIS_TLS=true"
        );
    }
    format!("{problem} at {addr}")
}

/// A certificate that names other hosts than `addr`'s (`names`, when known, says which).
fn not_named(addr: &str, names: &str) -> String {
    format!(
        "Redis's certificate at {addr} does not name that host{names}: it needs the host as a subject alternative name (an IP SAN when Sentinel names the master by address)"
    )
}

/// The I/O error under `e`, if any: the `redis` crate holds it behind an `Arc`, which is what its
/// `source` names.
fn io_error(e: &RedisError) -> Option<&std::io::Error> {
    use std::error::Error;
    let mut cause = e.source();
    while let Some(c) = cause {
        let c: &(dyn Error + 'static) = match c.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
            Some(shared) => &**shared,
            None => c,
        };
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cause = c.source();
    }
    None
}

/// The TLS error under `e`, if it is one (an I/O error that carries a rustls error).
fn tls_error(e: &RedisError) -> Option<&rustls::Error> {
    io_error(e)?.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What went wrong, for the log, in the operator's terms. Never includes the password.
fn describe(e: &RedisError) -> String {
    use redis::ErrorKind;
    if e.kind() == ErrorKind::AuthenticationFailed
        || e.to_string().contains("WRONGPASS")
        || e.to_string().contains("NOAUTH")
    {
        return "Redis refused the credentials: check REDIS_PASSWORD (or the user and password in REDIS_URL)".into();
    }
    if e.to_string().contains("READONLY") {
        return "the master became a replica (failover): connecting again".into();
    }
    if e.is_timeout() {
        return format!("Redis gave no answer within {RESPONSE_LIMIT:?}");
    }
    if e.is_io_error() || e.is_connection_dropped() {
        return format!("connection to Redis lost: {e}");
    }
    format!("Redis error: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, miss_key: &str) -> (Read, tokio::sync::oneshot::Receiver<Answer>) {
        let asking = Asking::Lookup {
            name: name.into(),
            miss_key: miss_key.into(),
        };
        asked(asking)
    }

    fn asked(asking: Asking) -> (Read, tokio::sync::oneshot::Receiver<Answer>) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        (Read { asking, reply }, rx)
    }

    #[test]
    fn reads_of_one_name_are_grouped_and_abandoned_ones_dropped() {
        let (a1, _k1) = read("nginx", "m1");
        let (a2, _k2) = read("nginx", "m1");
        let (b, _k3) = read("nginx", "m2");
        let (c, gone) = read("alpine", "m3");
        drop(gone);
        let (d, _k4) = read("nginx", "m1");
        let (t1, _k5) = asked(Asking::Tag("m1".into()));
        let (t2, _k6) = asked(Asking::Tag("m1".into()));
        let mut batch = vec![a1, a2, b, c, d, t1, t2];
        let g = group(&mut batch);
        let shape: Vec<(String, usize)> = g
            .iter()
            .map(|(a, w)| {
                let what = match a {
                    Asking::Lookup { name, miss_key } => format!("{name} {miss_key}"),
                    Asking::Tag(key) => format!("tag {key}"),
                    Asking::Manifest(digest) => format!("manifest {digest}"),
                };
                (what, w.len())
            })
            .collect();
        let want = [("nginx m1", 3), ("nginx m2", 1), ("tag m1", 2)];
        let want: Vec<(String, usize)> = want.iter().map(|(a, n)| (a.to_string(), *n)).collect();
        assert_eq!(shape, want);
        assert!(batch.is_empty());
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(
                j >= Duration::from_millis(50) && j <= Duration::from_millis(100),
                "{j:?}"
            );
        }
    }
}
