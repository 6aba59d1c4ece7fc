//! Identical pulls on one core share one request to Harbor (`COALESCE_PULLS`, on by default).
//!
//! A rollout makes many nodes ask for the same tag, index and manifests within milliseconds; each
//! request Harbor gets for a tag is one more upstream request of its own (and, for Docker Hub, one
//! more against the pull limit). So on each core the first mapped request for a manifest (by tag or
//! by digest, not yet in memory) or a tag list leads a flight ([`crate::flight`]), and identical
//! ones that arrive while it is in the air wait for its answer instead of sending their own:
//! at most one request per core for one object, and nothing shared between cores (a pod sends at
//! most `WORKERS`).
//!
//! - **Identical** means the same project, endpoint, name, reference or query, Accept set and
//!   registry (the pull's key). Conditional requests (`If-None-Match`, `If-Modified-Since`) go
//!   alone: their answer is the asker's.
//! - **A HEAD may join a GET, never lead one**: a HEAD that finds a GET in the air takes its answer
//!   less the body; otherwise it leads a flight that only HEADs join. A GET never waits for a HEAD
//!   (its body would be missing) and is never turned into one.
//! - **Every check stays**: the leader's answer went through everything a solo answer does (size
//!   limit, digest verification, the tag's last-known-good record); what is shared is that answer,
//!   read whole (a manifest is at most 4 MiB, a tag list is bounded), with its failure, if any, so a
//!   follower of a failed tag answers from its last-known-good digest as the leader would.
//! - **Cancellation**: a leader whose client went away drops the flight; its followers ask again and
//!   one of them leads. An answer that cannot be shared (its body could not be read whole) sends the
//!   followers on requests of their own.
//!
//! Blobs are not shared here: they are large and streamed, and concurrent pulls of one blob mostly
//! land on different cores.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::flight::{Flights, Turn};

use super::outcome::Heard;

/// What a flight hands its followers: the leader's answer, or `None` when it could not be shared.
pub type Shared = Option<std::rc::Rc<Outcome>>;

/// One core's flights of mapped pulls.
#[derive(Default)]
pub struct Sharing {
    flights: std::rc::Rc<Flights<Shared>>,
}

impl Sharing {
    /// Whether the pull `key` (its project and its key) leads a flight or waits for one: a HEAD
    /// follows a GET in the air, else leads or follows a flight of HEADs; a GET leads or follows a
    /// flight of GETs.
    pub fn turn(&self, key: &str, head: bool) -> Turn<Shared> {
        let get = format!("GET {key}");
        if head {
            if let Some(rx) = self.flights.follow(&get) {
                return Turn::Follow(rx);
            }
            return self.flights.join(&format!("HEAD {key}"));
        }
        self.flights.join(&get)
    }
}

/// A mapped request's result in a form every follower can answer from.
#[derive(Debug)]
pub enum Outcome {
    /// Harbor's answer (`failure` when it was one by the judge's rules); `head` when the leader
    /// was a HEAD, whose headers describe a body it never read.
    Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        failure: Option<Heard>,
        head: bool,
    },
    /// The project answered 404.
    Gone { sure: bool },
}
