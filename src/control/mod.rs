//! The control plane: threads that keep the data plane's read-only views up to date, off the
//! data-plane cores. Today: [`discovery`] (Harbor's proxy-cache projects → `Snapshot`).

pub mod discovery;
