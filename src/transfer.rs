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
//!   looks complete), and a transfer that failed or finished takes no more readers: later pulls
//!   lead a new one. So does a transfer whose first bytes were already dropped (a reader starts at
//!   byte 0). A transfer stopped without a failure (its leader's core stopping) sends its readers
//!   on their own from where they are.
//!
//! Wakers are stored under the transfer's lock and woken after it is released; a reader on another
//! core is woken across threads (monoio's `sync` feature).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// Every transfer in progress in the process, by key.
pub struct Transfers {
    inner: Mutex<Registry>,
    /// Bytes a transfer may buffer ahead of its fastest reader.
    window: usize,
    /// Bytes all transfers together may reserve (two windows each).
    budget: usize,
}

#[derive(Default)]
struct Registry {
    by_key: HashMap<String, Weak<Transfer>>,
    reserved: usize,
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
    pub fn new(window: usize, budget: usize) -> Arc<Transfers> {
        Arc::new(Transfers {
            inner: Mutex::default(),
            window: window.max(1),
            budget,
        })
    }

    /// Joins the transfer of `key` in progress, or leads a new one.
    pub fn join(self: &Arc<Self>, key: &str) -> Joined {
        // A transfer that ends here drops after the lock is released (its drop takes the lock).
        let _ended: Option<Arc<Transfer>>;
        let Ok(mut registry) = self.inner.lock() else {
            return Joined::Alone;
        };
        match registry.by_key.get(key).and_then(Weak::upgrade) {
            Some(t) if t.add_reader() => return Joined::Follow(t),
            other => _ended = other,
        }
        let reserve = self.window * 2;
        if registry.reserved + reserve > self.budget {
            return Joined::Alone;
        }
        registry.reserved += reserve;
        let t = Arc::new(Transfer {
            key: key.to_string(),
            owner: self.clone(),
            window: self.window,
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
        let t = self
            .inner
            .lock()
            .ok()?
            .by_key
            .get(key)
            .and_then(Weak::upgrade)?;
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

    /// Bytes reserved by the transfers in progress.
    pub fn reserved(&self) -> usize {
        self.inner.lock().map_or(0, |r| r.reserved)
    }

    /// `t` takes no more readers: later pulls of its key lead a new transfer.
    fn close(&self, t: &Transfer) {
        if let Ok(mut registry) = self.inner.lock() {
            let ours = registry
                .by_key
                .get(&t.key)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), t));
            if ours {
                registry.by_key.remove(&t.key);
            }
        }
    }
}

/// One blob transfer from Harbor, read by every pull that joined it.
pub struct Transfer {
    key: String,
    owner: Arc<Transfers>,
    window: usize,
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

    /// Harbor's body ended (`ok`) or failed; no more readers join, every reader is told. The
    /// first end counts.
    pub fn end(&self, ok: bool) {
        self.finish(if ok { End::Complete } else { End::Failed });
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
            registry.reserved = registry.reserved.saturating_sub(self.window * 2);
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
        let all = Transfers::new(1024, 1 << 20);
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
        t.end(true);
        assert_eq!(read_all(&mut first), (Vec::new(), Read::End));
        assert_eq!(read_all(&mut second), (b"hello world".to_vec(), Read::End));
        assert!(
            matches!(all.join("k"), Joined::Lead(_)),
            "a finished transfer takes no more readers"
        );
    }

    #[test]
    fn the_window_bounds_the_buffer_and_leaves_the_slow_reader_behind() {
        let all = Transfers::new(10, 1 << 20);
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
        let all = Transfers::new(100, 400);
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
        t.end(false);
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
        let all = Transfers::new(100, 1000);
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
        let all = Transfers::new(10, 1 << 20);
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
        let all = Transfers::new(4, 1 << 20);
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
        let all = Transfers::new(100, 1 << 20);
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
}
