//! Capture stage: the kernel programs and their loader, which interfaces
//! they watch (names, globs, hotplug), what they leave out (filter rules),
//! the shared flow table, and the exact drain that turns the kernel's
//! counters into flows; and the second source, AF_XDP sockets counting in
//! userspace with the same parser and flow table (`afxdp`).
pub mod afxdp;
pub mod aggregator;
pub(crate) mod bpf_sys;
pub(crate) mod clock;
pub mod drain;
pub mod filter;
pub(crate) mod flow;
pub(crate) mod interfaces;
pub mod loader;
pub(crate) mod pins;
pub(crate) mod privileges;
pub(crate) mod replay;
pub mod table;
