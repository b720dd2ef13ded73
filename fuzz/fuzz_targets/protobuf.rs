//! FlowMessage decoding (what the Kafka consumers read): arbitrary bytes must
//! never panic, and whatever decodes must encode back to a message that
//! decodes to the same record.
#![no_main]
use flowexport::codec::protobuf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for prefix in [false, true] {
        if let Ok(r) = protobuf::decode(data, prefix) {
            let mut buf = Vec::new();
            protobuf::encode(&r, prefix, &mut buf);
            assert_eq!(protobuf::decode(&buf, prefix).unwrap(), r);
        }
    }
});
