//! FlowMessage decoding (what the Kafka consumers read): arbitrary bytes must
//! never panic, and whatever decodes must encode back to a message that
//! decodes to the same record; the dashboard's wire scan agrees with it.
#![no_main]
use flowexport::codec::protobuf;
use flowexport::record::FlowSummary;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for prefix in [false, true] {
        if let Ok(r) = protobuf::decode(data, prefix) {
            let mut buf = Vec::new();
            protobuf::encode(&r, prefix, &mut buf);
            assert_eq!(protobuf::decode(&buf, prefix).unwrap(), r);
        }
    }
    // The dashboard's wire scan reads every message the full decoder
    // accepts, to the same values (it may accept more: it does not check
    // the fields it skips).
    let scanned = protobuf::scan::scan(data);
    if let Ok(r) = protobuf::decode(data, false) {
        assert_eq!(
            scanned.expect("scan accepts what decode accepts"),
            FlowSummary::from_record(&r)
        );
    }
});
