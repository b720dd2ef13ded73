//! sFlow v5 decoder: arbitrary datagrams must never panic.
#![no_main]
use flowexport::codec::sflow;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let _ = sflow::decode("192.0.2.1".parse().unwrap(), data, 0, &mut out);
});
