//! Tasks on a core, each polled with a waker that keeps one identity for its whole life.
//!
//! Futures that park a waker commonly skip the swap when the new one `will_wake` the one they hold,
//! and wake the old one when they swap it (`want`, which hyper's client uses for "the connection is
//! ready", does both). `will_wake` compares the waker's data and vtable pointers. monoio builds a
//! task's vtable as a constant inside a generic function, so the waker it polls a task with and the
//! clones made from it can carry two copies of one vtable at two addresses (one per codegen unit;
//! seen in the dev profile). Then `will_wake` is false for a task's own waker, and a parked future
//! polled again wakes its own task, which polls it again: a task that wakes itself forever.
//! monoio reaps I/O completions only when its run queue is empty, so that task also starves every
//! other I/O on the core, and the future it waits for never becomes ready: the core spins and
//! serves nothing. (It happened to a shared blob's follower continuing on its own while its core
//! drained.)
//!
//! [`spawn`] and [`Stable`] give a task one waker of our own, built once, whose vtable is a single
//! `static`: every clone of it `will_wake` every other. Wakes pass through to monoio's waker.
//! Every task of the data plane is spawned through [`spawn`] (clippy refuses `monoio::spawn`), and
//! each worker's main future is wrapped in [`Stable`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

/// Spawns `future` on the current core's runtime, polled with a waker of one identity.
#[allow(clippy::disallowed_methods)]
pub fn spawn<F>(future: F) -> monoio::task::JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    monoio::spawn(Stable::new(future))
}

/// hyper's executor (HTTP/2 connections spawn their streams' tasks): [`spawn`].
#[derive(Clone, Copy, Debug)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + 'static,
    F::Output: 'static,
{
    fn execute(&self, future: F) {
        spawn(future);
    }
}

/// `F`, polled with a waker of one identity (see the module).
pub struct Stable<F> {
    inner: F,
    /// Ours, wrapping the runtime's waker for this task (rebuilt if the task's waker changes).
    waker: Option<Waker>,
}

impl<F> Stable<F> {
    pub fn new(inner: F) -> Stable<F> {
        Stable { inner, waker: None }
    }
}

impl<F: Future> Future for Stable<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is never moved out of the pinned `Stable`; `waker` is not structural.
        let this = unsafe { self.get_unchecked_mut() };
        let current = cx.waker();
        let same = this
            .waker
            .as_ref()
            .is_some_and(|ours| wrapped(ours).data() == current.data());
        if !same {
            this.waker = Some(ours(current.clone()));
        }
        let ours = this.waker.as_ref().expect("set above");
        let mut cx = Context::from_waker(ours);
        // SAFETY: pinned projection of `inner` (see above).
        unsafe { Pin::new_unchecked(&mut this.inner) }.poll(&mut cx)
    }
}

/// The one vtable of our wakers: its data is an `Arc<Waker>` (the runtime's waker).
static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop_waker);

fn ours(runtime: Waker) -> Waker {
    let data = Arc::into_raw(Arc::new(runtime)).cast::<()>();
    // SAFETY: `data` is an `Arc<Waker>` and the vtable's functions treat it as one.
    unsafe { Waker::from_raw(RawWaker::new(data, &VTABLE)) }
}

/// The runtime's waker inside one of ours.
fn wrapped(ours: &Waker) -> &Waker {
    debug_assert!(std::ptr::eq(ours.vtable(), &VTABLE));
    // SAFETY: our wakers' data is an `Arc<Waker>`, alive while `ours` is.
    unsafe { &*ours.data().cast::<Waker>() }
}

unsafe fn clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` came from `Arc::into_raw` of an `Arc<Waker>` (see `ours`).
    unsafe { Arc::increment_strong_count(data.cast::<Waker>()) };
    RawWaker::new(data, &VTABLE)
}

unsafe fn wake(data: *const ()) {
    // SAFETY: as in `clone`; this consumes the reference the waker held.
    let runtime = unsafe { Arc::from_raw(data.cast::<Waker>()) };
    runtime.wake_by_ref();
}

unsafe fn wake_by_ref(data: *const ()) {
    // SAFETY: as in `clone`; the waker holds its reference.
    unsafe { &*data.cast::<Waker>() }.wake_by_ref();
}

unsafe fn drop_waker(data: *const ()) {
    // SAFETY: as in `clone`; this releases the reference the waker held.
    drop(unsafe { Arc::from_raw(data.cast::<Waker>()) });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    /// Parks a waker the way `want` does: kept when the new one `will_wake` it, else swapped and
    /// the old one woken. Ready once `open` is set.
    struct Parker {
        open: Rc<Cell<bool>>,
        parked: Rc<RefCell<Option<Waker>>>,
        polls: Rc<Cell<u64>>,
    }

    impl Future for Parker {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.set(self.polls.get() + 1);
            if self.open.get() {
                return Poll::Ready(());
            }
            let mut parked = self.parked.borrow_mut();
            let keep = parked.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if !keep {
                if let Some(old) = parked.replace(cx.waker().clone()) {
                    old.wake();
                }
            }
            Poll::Pending
        }
    }

    /// Polls of a parked task woken once from outside, over many rounds of the runtime.
    ///
    /// Without [`Stable`] this never returns in the dev profile: the task wakes itself on every poll,
    /// the runtime never parks, and the timers below never fire.
    fn polls_after_one_spurious_wake() -> u64 {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            let open = Rc::new(Cell::new(false));
            let parked = Rc::new(RefCell::new(None));
            let polls = Rc::new(Cell::new(0));
            let parker = Parker {
                open: open.clone(),
                parked: parked.clone(),
                polls: polls.clone(),
            };
            let handle = spawn(parker);
            // Let it park, then wake it once, as a timer or a socket would.
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            let waker = parked.borrow().clone().expect("parked");
            waker.wake_by_ref();
            monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            let n = polls.get();
            open.set(true);
            waker.wake();
            handle.await;
            n
        })
    }

    #[test]
    fn a_parked_task_woken_once_is_polled_once_more_not_forever() {
        assert_eq!(polls_after_one_spurious_wake(), 2, "park, one wake, park");
    }

    #[test]
    fn clones_of_a_stable_waker_will_wake_each_other() {
        let runtime = Waker::noop().clone();
        let a = ours(runtime);
        let b = a.clone();
        assert!(b.will_wake(&a) && a.will_wake(&b.clone()));
    }
}
