//! JSON lines (`codec::json`): for every record a FlowMessage decodes to
//! (arbitrary addresses, counters, types), flowexport's writer produces
//! exactly serde_json's bytes, and they read back to the same record.
#![no_main]
use flowexport::codec::{json, protobuf};
use flowexport::record::{from_json, FlowRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = protobuf::decode(data, false) else {
        return;
    };
    // Fields FlowMessage does not carry, from the input's bytes too.
    let tail = |i: usize| data.get(data.len().saturating_sub(i + 1)).copied().unwrap_or(0);
    r.src_cid = u32::from(tail(0));
    r.cid = u32::from(tail(1)) << 24;
    if tail(2) % 2 == 1 {
        r.src_as_name = String::from_utf8_lossy(&data[..data.len().min(24)]).into_owned();
    }
    let mut ours = Vec::new();
    json::write_record(&mut ours, &r);
    let theirs = serde_json::to_vec(&r).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs)
    );
    let back: FlowRecord = from_json(&ours).unwrap();
    assert_eq!(back, r);
});
