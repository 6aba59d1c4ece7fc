//! Coalescing on one core: the first request for a key leads (does the work), the others wait for its
//! result. Used for fan-outs (one per name on a core), mapped pulls (one per identical request on a
//! core) and token fetches (one per scope on a core).
//! Everything here is `!Send` and lock-free: it lives on one core.
//!
//! A leader dropped before it finishes (its client went away and the request was cancelled) closes
//! the waiters' channels; each waiter then asks again and one of them leads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use tokio::sync::oneshot;

/// The flights in progress on one core, by key.
pub struct Flights<T> {
    waiting: RefCell<HashMap<String, Vec<oneshot::Sender<T>>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            waiting: RefCell::default(),
        }
    }
}

/// Whether a request leads a flight or waits for one.
pub enum Turn<T> {
    Lead(Leader<T>),
    /// `Err` from the channel: the leader was dropped; join again.
    Follow(oneshot::Receiver<T>),
}

impl<T: Clone> Flights<T> {
    /// Waits for the flight in progress for `key`, if there is one; never leads.
    pub fn follow(&self, key: &str) -> Option<oneshot::Receiver<T>> {
        let mut waiting = self.waiting.borrow_mut();
        let list = waiting.get_mut(key)?;
        let (tx, rx) = oneshot::channel();
        list.push(tx);
        Some(rx)
    }

    pub fn join(self: &Rc<Self>, key: &str) -> Turn<T> {
        let mut waiting = self.waiting.borrow_mut();
        if let Some(list) = waiting.get_mut(key) {
            let (tx, rx) = oneshot::channel();
            list.push(tx);
            return Turn::Follow(rx);
        }
        waiting.insert(key.to_string(), Vec::new());
        Turn::Lead(Leader {
            flights: self.clone(),
            key: key.to_string(),
            done: false,
        })
    }
}

/// Held by the request doing the work for a key.
pub struct Leader<T> {
    flights: Rc<Flights<T>>,
    key: String,
    done: bool,
}

impl<T: Clone> Leader<T> {
    /// The flight's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Ends the flight and gives every waiter the result.
    pub fn finish(mut self, result: T) {
        self.done = true;
        let waiters = self
            .flights
            .waiting
            .borrow_mut()
            .remove(&self.key)
            .unwrap_or_default();
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

impl<T> Drop for Leader<T> {
    fn drop(&mut self) {
        if !self.done {
            // Dropping the senders wakes the waiters with an error; they join again.
            self.flights.waiting.borrow_mut().remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot::error::TryRecvError;

    #[test]
    fn one_leads_the_others_wait_and_share_the_result() {
        let f = Rc::new(Flights::<u32>::default());
        let Turn::Lead(leader) = f.join("k") else {
            panic!("first leads")
        };
        let Turn::Follow(mut a) = f.join("k") else {
            panic!("second waits")
        };
        let Turn::Follow(mut b) = f.join("k") else {
            panic!("third waits")
        };
        assert!(
            matches!(f.join("other"), Turn::Lead(_)),
            "keys are independent"
        );
        leader.finish(7);
        assert_eq!(a.try_recv().unwrap(), 7);
        assert_eq!(b.try_recv().unwrap(), 7);
        assert!(
            matches!(f.join("k"), Turn::Lead(_)),
            "a finished flight is gone"
        );
    }

    #[test]
    fn following_joins_a_flight_in_progress_and_never_leads() {
        let f = Rc::new(Flights::<u32>::default());
        assert!(f.follow("k").is_none(), "no flight: nothing to follow");
        assert!(
            matches!(f.join("k"), Turn::Lead(_)),
            "following did not start one"
        );
        let Turn::Lead(leader) = f.join("k") else {
            panic!("the dropped leader's flight is gone")
        };
        let mut w = f.follow("k").expect("a flight in progress");
        leader.finish(3);
        assert_eq!(w.try_recv().unwrap(), 3);
    }

    #[test]
    fn a_dropped_leader_releases_the_waiters() {
        let f = Rc::new(Flights::<u32>::default());
        let Turn::Lead(leader) = f.join("k") else {
            panic!()
        };
        let Turn::Follow(mut w) = f.join("k") else {
            panic!()
        };
        assert_eq!(
            w.try_recv().unwrap_err(),
            TryRecvError::Empty,
            "waiting while the leader works"
        );
        drop(leader);
        assert_eq!(
            w.try_recv().unwrap_err(),
            TryRecvError::Closed,
            "a dropped leader closes the waiters' channels"
        );
        assert!(matches!(f.join("k"), Turn::Lead(_)));
    }
}
