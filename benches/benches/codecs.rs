//! Micro-benchmarks of the codecs on one core, with a harness (divan):
//! `cargo bench -p flowexport-benches --bench codecs`. Per call, the time
//! for one batch; divan prints items per second. The same streams as
//! `cargo xtask bench collect`'s in-process rows (flowexport's own exporter,
//! 30 records per packet).

use std::net::IpAddr;

use divan::counter::ItemsCount;
use divan::{black_box, Bencher};
use flowexport::codec::netflow::encode::ExportProtocol;
use flowexport::codec::netflow::NetflowDecoder;
use flowexport::codec::{json, protobuf};
use flowexport::record::FlowRecord;
use flowexport_benches::util::{flows, stream, RECORDS_PER_PACKET};

/// Export packets per decoding batch.
const PACKETS: usize = 100;
/// Records per formatting batch.
const RECORDS: usize = 4096;

fn main() {
    divan::main();
}

fn decode(b: Bencher<'_, '_>, proto: ExportProtocol) {
    let pkts = stream(proto, PACKETS).expect("the exporter builds packets");
    let exporter: IpAddr = "192.0.2.1".parse().expect("valid");
    let mut d = NetflowDecoder::default();
    let mut out = Vec::with_capacity(64);
    b.counter(ItemsCount::new(PACKETS * RECORDS_PER_PACKET))
        .bench_local(|| {
            for p in &pkts {
                out.clear();
                d.decode(exporter, p, 1, &mut out).expect("valid packet");
                black_box(&out);
            }
        });
}

/// A batch of JSON lines, each record written by `write`.
fn json_lines(b: Bencher<'_, '_>, mut write: impl FnMut(&mut Vec<u8>, &FlowRecord)) {
    let recs = flows(RECORDS);
    let mut out = Vec::with_capacity(1 << 21);
    b.counter(ItemsCount::new(RECORDS)).bench_local(|| {
        out.clear();
        for r in &recs {
            write(&mut out, r);
            out.push(b'\n');
        }
        black_box(&out);
    });
}

/// Benchmarks that each run one of the functions above with an argument:
/// `name: function(argument);`.
macro_rules! benches {
    ($($name:ident: $run:ident($arg:expr);)*) => {
        $(
            #[divan::bench]
            fn $name(b: Bencher<'_, '_>) {
                $run(b, $arg);
            }
        )*
    };
}

benches! {
    decode_netflow_v9: decode(ExportProtocol::NetflowV9);
    decode_ipfix: decode(ExportProtocol::Ipfix);
    json_lines_writer: json_lines(json::write_record);
    json_lines_serde_json: json_lines(|out, r| serde_json::to_writer(out, r).expect("serializable"));
}

#[divan::bench]
fn protobuf_encode(b: Bencher<'_, '_>) {
    let recs = flows(RECORDS);
    let mut enc = protobuf::Encoder::default();
    let mut out = Vec::with_capacity(256);
    b.counter(ItemsCount::new(RECORDS)).bench_local(|| {
        for r in &recs {
            out.clear();
            enc.encode(r, false, &mut out);
            black_box(&out);
        }
    });
}

#[divan::bench]
fn protobuf_scan(b: Bencher<'_, '_>) {
    let mut enc = protobuf::Encoder::default();
    let msgs: Vec<Vec<u8>> = flows(RECORDS)
        .iter()
        .map(|r| {
            let mut out = Vec::new();
            enc.encode(r, false, &mut out);
            out
        })
        .collect();
    b.counter(ItemsCount::new(RECORDS)).bench_local(|| {
        for m in &msgs {
            black_box(protobuf::scan::scan(m).expect("valid message"));
        }
    });
}
