//! Capture stage: the kernel programs, their loader, and the exact drain.
pub mod clock;
pub mod drain;
pub mod loader;
pub mod rcu;
