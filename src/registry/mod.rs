//! The registry protocol side of the router: which requests exist ([`route`]) and how each is
//! answered ([`handle`]).

pub mod handle;
pub mod route;
