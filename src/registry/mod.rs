//! The registry protocol side of the router: which requests exist ([`route`]), how each is answered
//! ([`handle`], and [`pull`] for the pull endpoints), how a name finds its project ([`resolve`],
//! [`fanout`]) and how a request and its answer cross to Harbor and back ([`forward`]).

pub mod fanout;
pub mod forward;
pub mod handle;
pub mod pull;
pub mod resolve;
pub mod route;
