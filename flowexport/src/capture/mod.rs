//! Capture stage: the kernel programs and their loader, the shared flow
//! table, and the exact drain that turns the kernel's counters into flows.
pub mod bpf_sys;
pub mod clock;
pub mod drain;
pub mod loader;
pub mod pins;
pub mod privileges;
pub mod table;
