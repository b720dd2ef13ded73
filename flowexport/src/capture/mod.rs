//! Capture stage: the kernel programs and their loader, which interfaces
//! they watch (names, globs, hotplug), what they leave out (filter rules),
//! the shared flow table, and the exact drain that turns the kernel's
//! counters into flows.
pub mod bpf_sys;
pub mod clock;
pub mod drain;
pub mod filter;
pub mod flow;
pub mod interfaces;
pub mod loader;
pub mod pins;
pub mod privileges;
pub mod table;
