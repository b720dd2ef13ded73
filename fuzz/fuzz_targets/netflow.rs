//! NetFlow v5/v9/IPFIX decoder: arbitrary bytes, split into several packets
//! from two exporters so templates learned from one packet meet data in the
//! next. Must never panic.
#![no_main]
use flowexport::codec::netflow::NetflowDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut d = NetflowDecoder::new(1_000_000, 64 * 1024);
    let mut out = Vec::new();
    let exporters = ["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
    // Packets separated by the byte 0xfe, so the fuzzer can build
    // template-then-data sequences.
    for (i, pkt) in data.split(|b| *b == 0xfe).enumerate() {
        let _ = d.decode(exporters[i % 2], pkt, i as u64 * 400_000, &mut out);
    }
});
