//! Test bed for harbor-router (work in progress).
