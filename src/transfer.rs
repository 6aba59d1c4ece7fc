//! Blob transfers shared by identical pulls on every core: the one piece of data-plane state that
//! crosses cores, on the slow path only (a blob Harbor is asked for; never a hit answered from
//! memory, never a manifest).
//!
//! A rollout makes many nodes ask for the same layer at once, and their connections land on every
//! core. The first GET of a blob (by project, name and digest) leads a [`Transfer`]: its core asks
//! Harbor, and a pump task on that core copies Harbor's body into the transfer's buffer as it
//! arrives. Every identical GET on any core (the leader's own client included) is a [`Reader`] of
//! that buffer from byte 0, streaming as the bytes arrive.
//!
//! Bounds and rules:
//! - **A window per transfer.** The pump reads from Harbor only while the fastest reader has less
//!   than a window left to read, and keeps a window behind the fastest reader (a reader lagging
//!   less than that stays with the transfer): a transfer holds at most two windows and a frame. The bytes are copied out of hyper's buffers,
//!   so what is counted is what is pinned.
//! - **A process budget.** A new transfer reserves two windows from the budget; when it is spent,
//!   the pull goes alone, as without sharing.
//! - **Nobody waits for a slow reader.** A reader the window left behind falls out
//!   ([`Read::FellOut`]) and the caller continues it on a request of its own from its offset.
//! - **The transfer outlives its first client**: the pump runs while any reader is left; with none
//!   left it stops, and Harbor's request with it.
//! - **Failures end every reader** as a solo transfer would end (an error, never a short body that
//!   looks complete), and a transfer that failed takes no more readers: later pulls lead a new one.
//!   So does a transfer whose first bytes were already dropped (a reader starts at byte 0). A
//!   transfer stopped without a failure (its leader's core stopping) sends its readers on their own
//!   from where they are.
//! - **A finished blob lingers while it is whole.** A transfer that completed with its whole blob
//!   still buffered (a blob of at most two windows) and its bytes known good (they hashed to the
//!   digest, or Harbor named the digest and the length) stays joinable for the linger
//!   (`COALESCE_LINGER`): a rollout spread over seconds costs a pod one transfer per blob, not one
//!   per burst. It keeps its bytes reserved in the budget meanwhile, and gives them up, oldest
//!   first, when a new transfer needs the room: lingering never costs a transfer in progress its
//!   place.
//!
//! Wakers are stored under the transfer's lock and woken after it is released; a reader on another
//! core is woken across threads (monoio's `sync` feature).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// Finished transfers kept lingering at most (each holds a key, a head and a sleeping timer as
/// well as its bytes), oldest out first.
pub const MAX_LINGERING: usize = 1024;

/// Every transfer in progress in the process, by key.
pub struct Transfers {
    inner: Mutex<Registry>,
    /// Bytes a transfer may buffer ahead of its fastest reader.
    window: usize,
    /// Bytes all transfers together may reserve (two windows each, or a lingering blob's size).
    budget: usize,
    /// How long a finished transfer whose whole blob is buffered stays joinable; zero: not at all.
    linger: Duration,
}

#[derive(Default)]
struct Registry {
    by_key: HashMap<String, Weak<Transfer>>,
    /// Finished transfers kept joinable, each until its deadline, oldest first.
    lingering: VecDeque<(Instant, Arc<Transfer>)>,
    reserved: usize,
}

impl Registry {
    /// Whether `t` is the transfer its key leads to.
    fn holds(&self, t: &Transfer) -> bool {
        self.by_key
            .get(&t.key)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), t))
    }

    /// Later pulls of `t`'s key no longer find `t` (they lead a new transfer).
    fn forget(&mut self, t: &Transfer) {
        if self.holds(t) {
            self.by_key.remove(&t.key);
        }
    }

    /// `t` takes no more readers. Its reservation goes with its bytes: now, when no reader holds
    /// it any more (the registry's is the last reference: no pull can reach it again), else when
    /// the last reader drops it.
    fn retire(&mut self, t: &Arc<Transfer>) {
        self.forget(t);
        t.lock().closed = true;
        if Arc::strong_count(t) == 1 {
            self.reserved = self
                .reserved
                .saturating_sub(t.reserve.swap(0, Ordering::Relaxed));
        }
    }

    /// Retires the lingering transfers whose deadline has passed; they are dropped by the caller,
    /// after the registry's lock (a transfer's drop takes it).
    fn expire(&mut self, now: Instant, out: &mut Vec<Arc<Transfer>>) {
        while self
            .lingering
            .front()
            .is_some_and(|(until, _)| *until <= now)
        {
            let (_, t) = self.lingering.pop_front().expect("checked");
            self.retire(&t);
            out.push(t);
        }
    }

    /// Makes room for `reserve` more bytes within `budget` by retiring lingering transfers nobody
    /// reads, oldest first, when that is enough; `false` (and nothing retired) when it is not.
    fn room(&mut self, reserve: usize, budget: usize, out: &mut Vec<Arc<Transfer>>) -> bool {
        let idle = |t: &Arc<Transfer>| Arc::strong_count(t) == 1;
        let freeable: usize = self
            .lingering
            .iter()
            .filter(|(_, t)| idle(t))
            .map(|(_, t)| t.reserve.load(Ordering::Relaxed))
            .sum();
        if self.reserved.saturating_sub(freeable) + reserve > budget {
            return false;
        }
        let mut i = 0;
        while self.reserved + reserve > budget && i < self.lingering.len() {
            if idle(&self.lingering[i].1) {
                let (_, t) = self.lingering.remove(i).expect("in range");
                self.retire(&t);
                out.push(t);
            } else {
                i += 1;
            }
        }
        true
    }
}

/// How a pull takes part in a transfer.
pub enum Joined {
    /// It leads: it asks Harbor and hands the answer to [`Transfer::publish`] (or
    /// [`Transfer::unshared`]). It is the transfer's first reader.
    Lead(Arc<Transfer>),
    /// It reads the transfer another pull leads.
    Follow(Arc<Transfer>),
    /// The budget is spent: it goes alone.
    Alone,
}

impl Transfers {
    pub fn new(window: usize, budget: usize, linger: Duration) -> Arc<Transfers> {
        Arc::new(Transfers {
            inner: Mutex::default(),
            window: window.max(1),
            budget,
            linger,
        })
    }

    /// Joins the transfer of `key` in progress (or lingering), or leads a new one.
    pub fn join(self: &Arc<Self>, key: &str) -> Joined {
        self.join_at(key, Instant::now())
    }

    fn join_at(self: &Arc<Self>, key: &str, now: Instant) -> Joined {
        // Transfers that end here drop after the lock is released (their drop takes the lock).
        let mut ended: Vec<Arc<Transfer>> = Vec::new();
        let Ok(mut registry) = self.inner.lock() else {
            return Joined::Alone;
        };
        registry.expire(now, &mut ended);
        match registry.by_key.get(key).and_then(Weak::upgrade) {
            Some(t) if t.add_reader() => return Joined::Follow(t),
            other => ended.extend(other),
        }
        let reserve = self.window * 2;
        // Lingering blobs make room for a transfer, oldest first.
        if !registry.room(reserve, self.budget, &mut ended) {
            return Joined::Alone;
        }
        registry.reserved += reserve;
        let t = Arc::new(Transfer {
            key: key.to_string(),
            owner: self.clone(),
            window: self.window,
            reserve: AtomicUsize::new(reserve),
            state: Mutex::new(State {
                readers: 1,
                ..State::default()
            }),
        });
        registry.by_key.insert(key.to_string(), Arc::downgrade(&t));
        Joined::Lead(t)
    }

    /// Joins the transfer of `key` in progress from `offset` (a ranged pull), if it still holds
    /// that offset; never leads.
    pub fn follow_from(&self, key: &str, offset: u64) -> Option<Arc<Transfer>> {
        let mut ended = Vec::new();
        let t = {
            let mut registry = self.inner.lock().ok()?;
            registry.expire(Instant::now(), &mut ended);
            registry.by_key.get(key).and_then(Weak::upgrade)
        };
        drop(ended);
        let t = t?;
        let joined = {
            let mut s = t.lock();
            let start = s.chunks.front().map_or(s.end, |(o, _)| *o);
            let ok = !s.closed && !matches!(s.head, HeadState::Unshared) && start <= offset;
            if ok {
                s.readers += 1;
            }
            ok
        };
        joined.then_some(t)
    }

    /// Transfers in progress, and their readers (for the metrics; read at a scrape).
    pub fn in_progress(&self) -> (usize, usize) {
        let live: Vec<Arc<Transfer>> = match self.inner.lock() {
            Ok(r) => r.by_key.values().filter_map(Weak::upgrade).collect(),
            Err(_) => return (0, 0),
        };
        let readers = live.iter().map(|t| t.lock().readers).sum();
        (live.len(), readers)
    }

    /// Bytes reserved by the transfers in progress and the lingering ones.
    pub fn reserved(&self) -> usize {
        self.inner.lock().map_or(0, |r| r.reserved)
    }

    /// How long a finished whole blob stays joinable.
    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// Retires the lingering transfers whose time is up (their pump's core calls it once their
    /// linger has passed, so an idle process does not keep them).
    pub fn expire(&self) {
        self.expire_at(Instant::now());
    }

    fn expire_at(&self, now: Instant) {
        let mut ended = Vec::new();
        if let Ok(mut registry) = self.inner.lock() {
            registry.expire(now, &mut ended);
        }
        drop(ended);
    }

    /// A finished transfer whose whole blob is buffered stays joinable until `now` + the linger,
    /// reserving only its size; `false` when it may not (no linger, or it is no longer the key's
    /// transfer).
    fn keep(&self, t: &Arc<Transfer>, size: usize, now: Instant) -> bool {
        let Ok(mut registry) = self.inner.lock() else {
            return false;
        };
        if self.linger.is_zero() || !registry.holds(t) {
            return false;
        }
        let before = t.reserve.swap(size, Ordering::Relaxed);
        registry.reserved = registry.reserved.saturating_sub(before) + size;
        registry.lingering.push_back((now + self.linger, t.clone()));
        let mut ended = Vec::new();
        while registry.lingering.len() > MAX_LINGERING {
            let (_, old) = registry.lingering.pop_front().expect("not empty");
            registry.retire(&old);
            ended.push(old);
        }
        drop(registry);
        drop(ended);
        true
    }

    /// `t` takes no more readers: later pulls of its key lead a new transfer.
    fn close(&self, t: &Transfer) {
        if let Ok(mut registry) = self.inner.lock() {
            registry.forget(t);
        }
    }
}

/// One blob transfer from Harbor, read by every pull that joined it.
pub struct Transfer {
    key: String,
    owner: Arc<Transfers>,
    window: usize,
    /// Bytes this transfer holds of the budget (changed under the registry's lock).
    reserve: AtomicUsize,
    state: Mutex<State>,
}

/// What Harbor answered, for every reader's response head.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct State {
    head: HeadState,
    /// The buffered bytes, each chunk with its offset in the blob.
    chunks: VecDeque<(u64, Bytes)>,
    /// The offset just past the last byte buffered.
    end: u64,
    /// How the transfer ended, once it has.
    done: Option<End>,
    /// Readers that have not dropped.
    readers: usize,
    /// The furthest offset a reader has read to.
    fastest: u64,
    /// No more readers may join.
    closed: bool,
    readers_waiting: Vec<Waker>,
    pump_waiting: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Harbor's body ended.
    Complete,
    /// Harbor's body failed: every reader fails as a solo transfer would.
    Failed,
    /// Nobody read on, or the leader's core stopped: the readers left continue on their own.
    Abandoned,
}

#[derive(Default)]
enum HeadState {
    #[default]
    Pending,
    Shared(Arc<Head>),
    /// The leader's answer could not be shared: readers go alone.
    Unshared,
}

/// What a reader got.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Data(Bytes),
    /// Every byte was read and Harbor's body ended.
    End,
    /// Harbor's body failed (or the transfer was abandoned) before this reader's end.
    Failed,
    /// The window left this reader behind: it continues on its own from this offset.
    FellOut(u64),
}

/// What the pump may do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Room {
    /// Read the next frame from Harbor.
    Go,
    /// Every reader is gone: stop.
    NoReaders,
}

impl Transfer {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock poisons it; the state is still consistent enough to end readers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more reader, unless the transfer takes no more (closed, unshared, or its first
    /// bytes already dropped: a reader must start at byte 0).
    fn add_reader(&self) -> bool {
        let mut s = self.lock();
        let from_zero = s.chunks.front().map_or(s.end == 0, |(o, _)| *o == 0);
        if s.closed || matches!(s.head, HeadState::Unshared) || !from_zero {
            return false;
        }
        s.readers += 1;
        true
    }

    /// The leader's answer, for every reader: the pump then fills the buffer.
    pub fn publish(&self, head: Head) {
        let wake = {
            let mut s = self.lock();
            s.head = HeadState::Shared(Arc::new(head));
            std::mem::take(&mut s.readers_waiting)
        };
        wake.into_iter().for_each(Waker::wake);
    }

    /// The leader's answer cannot be shared (not a 200, a redirect, …): the readers waiting for
    /// the head go alone.
    pub fn unshared(&self) {
        let wake = {
            let mut s = self.lock();
            s.head = HeadState::Unshared;
            s.closed = true;
            std::mem::take(&mut s.readers_waiting)
        };
        self.owner.close(self);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Whether the head was published or refused ([`Transfer::publish`], [`Transfer::unshared`]).
    pub fn decided(&self) -> bool {
        !matches!(self.lock().head, HeadState::Pending)
    }

    /// The head, once the leader has it; `Ready(None)` when it cannot be shared.
    pub fn poll_head(&self, cx: &mut Context<'_>) -> Poll<Option<Arc<Head>>> {
        let mut s = self.lock();
        match &s.head {
            HeadState::Shared(h) => Poll::Ready(Some(h.clone())),
            HeadState::Unshared => Poll::Ready(None),
            HeadState::Pending => {
                wait(&mut s.readers_waiting, cx);
                Poll::Pending
            }
        }
    }

    /// Whether the pump may read on: while readers are left and the fastest has less than a
    /// window buffered ahead of it.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Room> {
        let mut s = self.lock();
        if s.done.is_some() {
            return Poll::Ready(Room::NoReaders);
        }
        if s.readers == 0 {
            // Closed under this lock: no pull joins a transfer that is about to stop.
            s.done = Some(End::Abandoned);
            s.closed = true;
            drop(s);
            self.owner.close(self);
            return Poll::Ready(Room::NoReaders);
        }
        if s.end - s.fastest < self.window as u64 {
            return Poll::Ready(Room::Go);
        }
        s.pump_waiting = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Bytes of Harbor's body, copied (so what the buffer holds is what it pins).
    pub fn push(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let wake = {
            let mut s = self.lock();
            let at = s.end;
            s.chunks.push_back((at, Bytes::copy_from_slice(data)));
            s.end += data.len() as u64;
            // Keep a window behind the fastest reader (a reader that lags less than that stays);
            // with less than a window ahead of it, the buffer holds two windows and a frame.
            while let Some((offset, chunk)) = s.chunks.front() {
                let chunk_end = offset + chunk.len() as u64;
                if chunk_end + self.window as u64 > s.fastest {
                    break;
                }
                s.chunks.pop_front();
            }
            std::mem::take(&mut s.readers_waiting)
        };
        wake.into_iter().for_each(Waker::wake);
    }

    /// Harbor's body failed: no more readers join, every reader ends with an error. The first end
    /// counts.
    pub fn fail(&self) {
        self.finish(End::Failed);
    }

    /// Harbor's body ended: every reader is told. `known_good` when its bytes are the blob's (they
    /// hashed to the digest, or Harbor named the digest and the length): then a transfer whose
    /// whole blob is still buffered lingers, joinable, and `true` is returned; otherwise no more
    /// readers join. The first end counts.
    pub fn complete(self: &Arc<Self>, known_good: bool) -> bool {
        self.complete_at(known_good, Instant::now())
    }

    fn complete_at(self: &Arc<Self>, known_good: bool, now: Instant) -> bool {
        let (readers, whole) = {
            let mut s = self.lock();
            if s.done.is_some() {
                return false;
            }
            s.done = Some(End::Complete);
            let from_zero = s.chunks.front().map_or(s.end == 0, |(o, _)| *o == 0);
            let whole = known_good
                && from_zero
                && matches!(s.head, HeadState::Shared(_))
                && s.end <= 2 * self.window as u64;
            // Closed under the same lock: no pull joins a transfer that will not linger.
            s.closed = !whole;
            (
                std::mem::take(&mut s.readers_waiting),
                whole.then_some(s.end as usize),
            )
        };
        let kept = whole.is_some_and(|size| self.owner.keep(self, size, now));
        if !kept {
            self.lock().closed = true;
            self.owner.close(self);
        }
        readers.into_iter().for_each(Waker::wake);
        kept
    }

    /// Stops the transfer without a failure (the leader's core is stopping): the readers left
    /// read what is buffered, then continue on their own. The pump, if it waits, is woken (on
    /// this core) to stop.
    pub fn abandon(&self) {
        self.finish(End::Abandoned);
    }

    fn finish(&self, how: End) {
        let (readers, pump) = {
            let mut s = self.lock();
            if s.done.is_some() {
                return;
            }
            s.done = Some(how);
            s.closed = true;
            (
                std::mem::take(&mut s.readers_waiting),
                s.pump_waiting.take(),
            )
        };
        self.owner.close(self);
        readers.into_iter().for_each(Waker::wake);
        if let Some(p) = pump {
            p.wake();
        }
    }

    /// Bytes buffered now.
    pub fn buffered(&self) -> u64 {
        let s = self.lock();
        s.chunks.iter().map(|(_, c)| c.len() as u64).sum()
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.owner.close(self);
        if let Ok(mut registry) = self.owner.inner.lock() {
            let reserve = self.reserve.swap(0, Ordering::Relaxed);
            registry.reserved = registry.reserved.saturating_sub(reserve);
        }
    }
}

/// Registers `cx`'s waker once (a task polled again before it was woken is not added twice).
fn wait(waiting: &mut Vec<Waker>, cx: &Context<'_>) {
    if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
        waiting.push(cx.waker().clone());
    }
}

/// One pull's place in a transfer. Dropping it tells the pump one reader fewer.
pub struct Reader {
    transfer: Arc<Transfer>,
    offset: u64,
    /// Fell out or finished: no longer counted among the readers.
    gone: bool,
}

impl Reader {
    /// The reader of a transfer the pull joined ([`Joined::Lead`] or [`Joined::Follow`]): it was
    /// counted when it joined.
    pub fn new(transfer: Arc<Transfer>) -> Reader {
        Reader {
            transfer,
            offset: 0,
            gone: false,
        }
    }

    /// The reader of a transfer a ranged pull joined at `offset` ([`Transfers::follow_from`]).
    pub fn at(transfer: Arc<Transfer>, offset: u64) -> Reader {
        Reader {
            transfer,
            offset,
            gone: false,
        }
    }

    pub fn transfer(&self) -> &Arc<Transfer> {
        &self.transfer
    }

    /// The next bytes from this reader's offset, as soon as the pump has them.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Read> {
        if self.gone {
            return Poll::Ready(Read::Failed);
        }
        let (read, wake) = {
            let mut s = self.transfer.lock();
            let start = s.chunks.front().map_or(s.end, |(o, _)| *o);
            if self.offset < start {
                (Poll::Ready(Read::FellOut(self.offset)), None)
            } else if self.offset < s.end {
                let i = s
                    .chunks
                    .partition_point(|(o, c)| o + c.len() as u64 <= self.offset);
                let (o, chunk) = &s.chunks[i];
                let data = chunk.slice((self.offset - o) as usize..);
                self.offset += data.len() as u64;
                let mut wake = None;
                if self.offset > s.fastest {
                    s.fastest = self.offset;
                    wake = s.pump_waiting.take();
                }
                (Poll::Ready(Read::Data(data)), wake)
            } else {
                match s.done {
                    Some(End::Complete) => (Poll::Ready(Read::End), None),
                    Some(End::Failed) => (Poll::Ready(Read::Failed), None),
                    Some(End::Abandoned) => (Poll::Ready(Read::FellOut(self.offset)), None),
                    None => {
                        wait(&mut s.readers_waiting, cx);
                        (Poll::Pending, None)
                    }
                }
            }
        };
        if let Some(w) = wake {
            w.wake();
        }
        if matches!(
            read,
            Poll::Ready(Read::FellOut(_) | Read::End | Read::Failed)
        ) {
            self.leave();
        }
        read
    }

    fn leave(&mut self) {
        if self.gone {
            return;
        }
        self.gone = true;
        let wake = {
            let mut s = self.transfer.lock();
            s.readers -= 1;
            s.pump_waiting.take()
        };
        if let Some(w) = wake {
            w.wake();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    fn lead(t: &Arc<Transfers>, key: &str) -> Arc<Transfer> {
        match t.join(key) {
            Joined::Lead(l) => l,
            _ => panic!("leads"),
        }
    }

    /// A transfer of `key` with its leader's reader and one follower's.
    fn pair(all: &Arc<Transfers>, key: &str) -> (Arc<Transfer>, Reader, Reader) {
        let t = lead(all, key);
        let Joined::Follow(f) = all.join(key) else {
            panic!("a second pull follows")
        };
        (t.clone(), Reader::new(t), Reader::new(f))
    }

    fn read_all(r: &mut Reader) -> (Vec<u8>, Read) {
        let mut got = Vec::new();
        loop {
            match r.poll_read(&mut cx()) {
                Poll::Ready(Read::Data(d)) => got.extend_from_slice(&d),
                Poll::Ready(other) => return (got, other),
                Poll::Pending => return (got, Read::Data(Bytes::new())),
            }
        }
    }

    #[test]
    fn readers_on_any_core_read_every_byte_and_later_pulls_lead_anew() {
        let all = Transfers::new(1024, 1 << 20, Duration::ZERO);
        let t = lead(&all, "k");
        let mut first = Reader::new(t.clone());
        let Joined::Follow(f) = all.join("k") else {
            panic!("a second pull follows")
        };
        let mut second = Reader::new(f);
        assert!(
            matches!(all.join("other"), Joined::Lead(_)),
            "keys are apart"
        );
        assert_eq!(first.transfer().poll_head(&mut cx()), Poll::Pending);
        t.publish(Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        });
        assert!(matches!(
            second.transfer().poll_head(&mut cx()),
            Poll::Ready(Some(_))
        ));
        t.push(b"hello ");
        t.push(b"world");
        assert_eq!(read_all(&mut first).0, b"hello world");
        t.complete(false);
        assert_eq!(read_all(&mut first), (Vec::new(), Read::End));
        assert_eq!(read_all(&mut second), (b"hello world".to_vec(), Read::End));
        assert!(
            matches!(all.join("k"), Joined::Lead(_)),
            "a finished transfer takes no more readers"
        );
    }

    #[test]
    fn the_window_bounds_the_buffer_and_leaves_the_slow_reader_behind() {
        let all = Transfers::new(10, 1 << 20, Duration::ZERO);
        let (t, mut fast, mut slow) = pair(&all, "k");
        for _ in 0..5 {
            assert_eq!(t.poll_room(&mut cx()), Poll::Ready(Room::Go));
            t.push(b"0123456789");
            let (got, _) = read_all(&mut fast);
            assert_eq!(got, b"0123456789");
            assert!(
                t.buffered() <= 2 * 10 + 10,
                "at most two windows and a frame"
            );
        }
        // The fast reader is a window ahead of nothing: the pump may go on.
        assert_eq!(t.poll_room(&mut cx()), Poll::Ready(Room::Go));
        assert!(matches!(
            slow.poll_read(&mut cx()),
            Poll::Ready(Read::FellOut(0))
        ));
        // With the fast reader stopped, the pump waits rather than outrun it.
        t.push(b"0123456789");
        assert_eq!(t.poll_room(&mut cx()), Poll::Pending);
        drop(fast);
        assert_eq!(
            t.poll_room(&mut cx()),
            Poll::Ready(Room::NoReaders),
            "no reader left: the pump stops"
        );
    }

    #[test]
    fn a_failure_ends_every_reader_and_the_budget_limits_transfers() {
        let all = Transfers::new(100, 400, Duration::ZERO);
        let t = lead(&all, "a");
        let Joined::Follow(f) = all.join("a") else {
            panic!()
        };
        let mut r = Reader::new(f);
        let b = lead(&all, "b");
        assert!(
            matches!(all.join("c"), Joined::Alone),
            "two transfers of two windows spend the budget"
        );
        t.publish(Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        });
        t.push(b"part");
        t.fail();
        assert_eq!(read_all(&mut r), (b"part".to_vec(), Read::Failed));
        drop(b);
        assert_eq!(
            all.reserved(),
            2 * 100,
            "a dropped transfer gives its reserve back"
        );
        assert!(
            matches!(all.join("a"), Joined::Lead(_)),
            "no one joins a failed transfer"
        );
        drop(t);
        drop(r);
        assert_eq!(all.reserved(), 0);
    }

    #[test]
    fn an_unshared_answer_sends_the_waiting_readers_alone() {
        let all = Transfers::new(100, 1000, Duration::ZERO);
        let t = lead(&all, "k");
        let Joined::Follow(f) = all.join("k") else {
            panic!()
        };
        t.unshared();
        assert_eq!(f.poll_head(&mut cx()), Poll::Ready(None));
        assert!(matches!(all.join("k"), Joined::Lead(_)));
    }

    fn publish_ok(t: &Transfer) {
        t.publish(Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        });
    }

    #[test]
    fn a_reader_lagging_less_than_a_window_stays_with_the_transfer() {
        let all = Transfers::new(10, 1 << 20, Duration::ZERO);
        let (t, mut fast, mut lagging) = pair(&all, "k");
        publish_ok(&t);
        for frame in [b"aaaa", b"bbbb", b"cccc"] {
            t.push(frame);
            read_all(&mut fast);
        }
        // 12 bytes ahead of nothing read, but the fastest is only 12 in: [0, 4) is within a window
        // of it.
        let (got, _) = read_all(&mut lagging);
        assert_eq!(got, b"aaaabbbbcccc", "never left behind within a window");
    }

    #[test]
    fn a_stopped_transfer_sends_its_readers_on_their_own_and_a_late_pull_leads_anew() {
        let all = Transfers::new(4, 1 << 20, Duration::ZERO);
        let t = lead(&all, "k");
        let mut r = Reader::new(t.clone());
        publish_ok(&t);
        t.push(b"aaaa");
        t.push(b"bbbb");
        assert_eq!(read_all(&mut r).0, b"aaaabbbb");
        t.push(b"cccc");
        // Byte 0 is gone: a new pull cannot read this transfer from the start.
        let Joined::Lead(fresh) = all.join("k") else {
            panic!("a late pull leads a transfer of its own")
        };
        assert!(!Arc::ptr_eq(&fresh, &t));
        t.abandon();
        assert_eq!(
            read_all(&mut r),
            (b"cccc".to_vec(), Read::FellOut(12)),
            "what is buffered, then on its own from there, not a failure"
        );
        assert_eq!(t.poll_room(&mut cx()), Poll::Ready(Room::NoReaders));
    }

    #[test]
    fn no_pull_joins_a_transfer_whose_readers_are_all_gone() {
        let all = Transfers::new(100, 1 << 20, Duration::ZERO);
        let t = lead(&all, "k");
        let r = Reader::new(t.clone());
        publish_ok(&t);
        drop(r);
        assert_eq!(t.poll_room(&mut cx()), Poll::Ready(Room::NoReaders));
        assert!(
            matches!(all.join("k"), Joined::Lead(_)),
            "the stopped transfer is closed"
        );
    }

    fn lingering(window: usize, budget: usize) -> Arc<Transfers> {
        Transfers::new(window, budget, Duration::from_secs(2))
    }

    /// A transfer of `key` that completed with `body`, known good, at `at`; whether it lingers.
    fn finished(all: &Arc<Transfers>, key: &str, body: &[u8], at: Instant) -> bool {
        let Joined::Lead(t) = all.join_at(key, at) else {
            panic!("{key} leads")
        };
        let mut r = Reader::new(t.clone());
        publish_ok(&t);
        t.push(body);
        let kept = t.complete_at(true, at);
        assert_eq!(read_all(&mut r), (body.to_vec(), Read::End));
        kept
    }

    #[test]
    fn a_finished_whole_blob_lingers_for_later_pulls_then_goes() {
        let all = lingering(100, 1 << 20);
        let t0 = Instant::now();
        assert!(finished(&all, "k", b"a small blob", t0));
        assert_eq!(all.reserved(), 12, "a lingering blob reserves its size");
        let at = t0 + Duration::from_millis(1999);
        let Joined::Follow(f) = all.join_at("k", at) else {
            panic!("a pull within the linger joins the finished transfer")
        };
        assert_eq!(
            read_all(&mut Reader::new(f)),
            (b"a small blob".to_vec(), Read::End)
        );
        let ranged = all.follow_from("k", 2).expect("a range joins it too");
        assert_eq!(read_all(&mut Reader::at(ranged, 2)).0, b"small blob");
        all.expire_at(t0 + Duration::from_secs(2));
        assert_eq!(all.reserved(), 0, "its time up, it gives its bytes back");
        assert!(
            matches!(
                all.join_at("k", t0 + Duration::from_secs(2)),
                Joined::Lead(_)
            ),
            "and the next pull leads"
        );
    }

    #[test]
    fn only_a_known_good_whole_blob_lingers() {
        let all = lingering(4, 1 << 20);
        let t0 = Instant::now();
        // Past two windows: its first bytes are gone by the end.
        let Joined::Lead(t) = all.join_at("long", t0) else {
            panic!()
        };
        let mut r = Reader::new(t.clone());
        publish_ok(&t);
        for _ in 0..4 {
            t.push(b"abcd");
            read_all(&mut r);
        }
        assert!(
            !t.complete_at(true, t0),
            "a blob past two windows is not whole"
        );
        // Its bytes unproven (they did not hash to the digest).
        let Joined::Lead(u) = all.join_at("unproven", t0) else {
            panic!()
        };
        publish_ok(&u);
        u.push(b"ab");
        assert!(!u.complete_at(false, t0));
        // A failed one.
        let Joined::Lead(v) = all.join_at("failed", t0) else {
            panic!()
        };
        publish_ok(&v);
        v.push(b"ab");
        v.fail();
        for key in ["long", "unproven", "failed"] {
            assert!(
                matches!(all.join_at(key, t0), Joined::Lead(_)),
                "{key}: the next pull leads"
            );
        }
        let off = Transfers::new(100, 1 << 20, Duration::ZERO);
        assert!(
            !finished(&off, "k", b"blob", t0),
            "no linger when it is zero"
        );
    }

    #[test]
    fn lingering_blobs_make_room_for_a_new_transfer_oldest_first() {
        // Room for two transfers in progress (two windows each).
        let all = lingering(100, 400);
        let t0 = Instant::now();
        assert!(finished(&all, "old", &[1; 100], t0));
        assert!(finished(
            &all,
            "new",
            &[2; 100],
            t0 + Duration::from_millis(1)
        ));
        let Joined::Lead(a) = all.join_at("a", t0) else {
            panic!()
        };
        assert_eq!(all.reserved(), 400);
        let Joined::Lead(b) = all.join_at("b", t0) else {
            panic!("the lingering blobs give way to a transfer")
        };
        assert_eq!(all.reserved(), 400, "both gave their room");
        assert!(
            matches!(all.join_at("c", t0), Joined::Alone),
            "transfers in progress keep theirs"
        );
        drop((a, b));
        assert_eq!(all.reserved(), 0);
        assert!(matches!(all.join_at("old", t0), Joined::Lead(_)));
    }

    #[test]
    fn a_lingering_blob_still_read_keeps_its_bytes_counted_and_none_is_given_up_in_vain() {
        let all = lingering(100, 400);
        let t0 = Instant::now();
        assert!(finished(&all, "read", &[1; 100], t0));
        let Joined::Follow(f) = all.join_at("read", t0) else {
            panic!()
        };
        let mut slow = Reader::new(f);
        assert!(finished(&all, "idle", &[2; 100], t0));
        let Joined::Lead(a) = all.join_at("a", t0) else {
            panic!()
        };
        // 400 reserved; a second transfer needs 200, and only the idle blob's 100 can go.
        assert!(matches!(all.join_at("b", t0), Joined::Alone));
        let Joined::Follow(g) = all.join_at("idle", t0) else {
            panic!("nothing was given up for a transfer that could not start")
        };
        drop(g);
        // Past the linger, the blob still being read is retired but stays counted.
        all.expire_at(t0 + Duration::from_secs(2));
        assert_eq!(
            all.reserved(),
            200 + 100,
            "the bytes a reader still holds stay counted"
        );
        assert_eq!(read_all(&mut slow).0.len(), 100);
        drop(slow);
        assert_eq!(all.reserved(), 200, "and go with the last reader");
        drop(a);
        assert_eq!(all.reserved(), 0);
    }

    #[test]
    fn no_more_than_max_lingering_transfers_linger() {
        let all = lingering(100, usize::MAX);
        let t0 = Instant::now();
        for i in 0..MAX_LINGERING + 3 {
            assert!(finished(&all, &format!("k{i}"), b"x", t0));
        }
        assert_eq!(all.in_progress().0, MAX_LINGERING);
        assert_eq!(all.reserved(), MAX_LINGERING);
        assert!(
            matches!(all.join_at("k0", t0), Joined::Lead(_)),
            "the oldest went"
        );
    }
}
