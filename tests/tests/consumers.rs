//! `flowexport enrich` and `flowexport split` on a real Kafka-protocol broker
//! (Tansu with SQLite storage, in the test's namespace): customer ids and AS
//! numbers checked per record, per-customer topics checked for exact totals,
//! and a `kill -9` of enrich mid-stream that loses nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use flowexport::codec::protobuf;
use flowexport::record::{FlowRecord, FlowType};
use flowexport::sink::kafka::protobuf_message;
use flowexport_tests::kafka::Broker;
use flowexport_tests::*;

const CUSTOMERS: &str = "\
# test customers: prefix,cid
10.1.0.0/16,1
10.1.5.0/24,11   # a more specific prefix of another customer
2001:db8:1::/48,2
";

const ASN: &str = "\
198.51.100.0/24,AS64501,DOC-NET, Example
2001:db8:ff::/48,64502
";

/// The customer of an address, written out by hand (not with the
/// library's prefix table) from CUSTOMERS.
fn customer_of(a: IpAddr) -> u32 {
    match a {
        IpAddr::V4(v) => {
            let o = v.octets();
            match (o[0], o[1], o[2]) {
                (10, 1, 5) => 11,
                (10, 1, _) => 1,
                _ => 0,
            }
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            if s[..3] == [0x2001, 0xdb8, 1] {
                2
            } else {
                0
            }
        }
    }
}

/// Flow `i` of the input: a mix of families, directions, customers on
/// either side and no customer at all. `sequence_num` carries `i`.
fn flow(i: u32) -> FlowRecord {
    let (src, dst): (IpAddr, IpAddr) = match i % 6 {
        0 => (
            format!("10.1.5.{}", i % 250 + 1).parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
        ),
        1 => (
            format!("10.1.9.{}", i % 250 + 1).parse().unwrap(),
            "198.51.100.8".parse().unwrap(),
        ),
        2 => (
            "198.51.100.9".parse().unwrap(),
            format!("10.1.5.{}", i % 250 + 1).parse().unwrap(),
        ),
        3 => (
            format!("2001:db8:1::{i:x}").parse().unwrap(),
            "2001:db8:ff::1".parse().unwrap(),
        ),
        4 => ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()),
        _ => (
            format!("10.1.9.{}", i % 250 + 1).parse().unwrap(),
            format!("10.1.5.{}", i % 250 + 1).parse().unwrap(),
        ),
    };
    FlowRecord {
        flow_type: FlowType::Ipfix,
        sequence_num: i,
        time_received_ns: 1_763_800_000_000_000_000 + i as u64,
        src_addr: src,
        dst_addr: dst,
        etype: if src.is_ipv4() { 0x0800 } else { 0x86dd },
        proto: 17,
        src_port: 1000 + (i % 100) as u16,
        dst_port: 53,
        flow_direction: (i / 6 % 2) as u8,
        packets: 1 + (i % 7) as u64,
        bytes: 100 + (i % 13) as u64 * 10,
        src_as: 7,
        dst_as: 8,
        ..FlowRecord::default()
    }
}

/// Checks that every input flow (by `sequence_num`) reached the output with
/// its expected customer id; returns the duplicates.
fn every_input_enriched_once_or_more(out: &[FlowRecord], flows: &[FlowRecord]) -> u64 {
    let mut seen = vec![0u32; flows.len()];
    for r in out {
        seen[r.sequence_num as usize] += 1;
        assert_eq!(r.cid, expected_cid(&flows[r.sequence_num as usize]));
    }
    let lost: Vec<usize> = (0..flows.len()).filter(|i| seen[*i] == 0).collect();
    assert!(
        lost.is_empty(),
        "{} records lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    (out.len() - flows.len()) as u64
}

/// The cid rule (README): the local side (destination of ingress, source of
/// egress), else the other side.
fn expected_cid(r: &FlowRecord) -> u32 {
    let (s, d) = (customer_of(r.src_addr), customer_of(r.dst_addr));
    let (local, remote) = if r.flow_direction == 1 {
        (s, d)
    } else {
        (d, s)
    };
    if local != 0 {
        local
    } else {
        remote
    }
}

fn messages(flows: &[FlowRecord]) -> Vec<(Vec<u8>, Vec<u8>)> {
    flows.iter().map(protobuf_message).collect()
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(unique("fe-enrich-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("customers.csv"), CUSTOMERS).unwrap();
        std::fs::write(dir.join("asn.csv"), ASN).unwrap();
        Files { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn decode_all(b: &Broker, topic: &str) -> Vec<FlowRecord> {
    b.consume_all(topic)
        .unwrap()
        .iter()
        .map(|m| protobuf::decode(&m.payload, false).expect("valid FlowMessage"))
        .collect()
}

/// A namespace, a broker in it with `topics` (name, partitions), and the
/// customer and ASN files.
fn setup(topics: &[(&str, u32)]) -> (Netns, Broker, Files) {
    let ns = Netns::new().unwrap();
    let broker = Broker::start_with(&ns, topics).unwrap();
    (ns, broker, Files::new())
}

fn wait_count(b: &Broker, topic: &str, n: u64, who: &Agent) {
    let mut got = 0;
    let ok = wait_until(Duration::from_secs(90), || {
        got = b.count(topic);
        got >= n
    });
    assert!(ok, "{topic}: {got} of {n} messages; log:\n{}", who.stderr());
}

#[test]
fn enrich_then_split_per_customer_exact() {
    let (ns, broker, files) = setup(&[("input", 2), ("enriched", 1)]);
    let flows: Vec<FlowRecord> = (0..600).map(flow).collect();
    let mut msgs = messages(&flows);
    // Three messages that are not FlowMessages: counted and skipped.
    for junk in [&b"\xff\xff\xff"[..], b"\x0a\x05ab", b"\x08"] {
        msgs.push((b"junk".to_vec(), junk.to_vec()));
    }
    broker.produce("input", msgs).unwrap();

    let brokers = broker.addr();
    let (customers, asn) = (files.path("customers.csv"), files.path("asn.csv"));
    let enrich = Agent::start_enrich(&ns, &brokers, &customers, &asn).unwrap();
    wait_count(&broker, "enriched", 600, &enrich);
    // The counters are updated as messages are read and acknowledged:
    // waited for, then exact.
    let (ok, m) = enrich.wait_metrics(9592, Duration::from_secs(30), |m| {
        metric(m, "flowexport_bridge_consumed_total") >= Some(603.0)
            && metric(m, "flowexport_bridge_delivered_total") >= Some(600.0)
    });
    assert!(ok, "{m}\n{}", enrich.stderr());
    assert_metric(&m, "flowexport_bridge_consumed_total", 603.0);
    assert_metric(&m, "flowexport_bridge_undecodable_total", 3.0);
    assert_metric(&m, "flowexport_bridge_delivered_total", 600.0);
    // The batch is committed once its acks are in (at the latest when the
    // next, empty batch ends).
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &enrich.metrics(9592).unwrap_or_default(),
            "flowexport_bridge_batches_committed_total"
        )
        .is_some_and(|b| b >= 1.0)),
        "{m}"
    );
    assert_metric(&m, "flowexport_enrich_customer_prefixes", 3.0);

    let out = decode_all(&broker, "enriched");
    assert_eq!(out.len(), 600);
    let mut by_seq: BTreeMap<u32, FlowRecord> = BTreeMap::new();
    for r in out {
        assert!(by_seq.insert(r.sequence_num, r).is_none(), "duplicate");
    }
    for want in &flows {
        let got = &by_seq[&want.sequence_num];
        let (sc, dc) = (customer_of(want.src_addr), customer_of(want.dst_addr));
        assert_eq!(
            (got.src_cid, got.dst_cid, got.cid),
            (sc, dc, expected_cid(want)),
            "flow {}: {} -> {} dir {}",
            want.sequence_num,
            want.src_addr,
            want.dst_addr,
            want.flow_direction
        );
        // AS numbers from the table where it has the address, else the
        // exporter's.
        let dst_as = match want.dst_addr.to_string().as_str() {
            a if a.starts_with("198.51.100.") => (64501, "DOC-NET, Example"),
            a if a.starts_with("2001:db8:ff:") => (64502, ""),
            _ => (8, ""),
        };
        assert_eq!((got.dst_as, got.dst_as_name.as_str()), dst_as);
        let src_as = if want.src_addr.to_string() == "198.51.100.9" {
            (64501, "DOC-NET, Example")
        } else {
            (7, "")
        };
        assert_eq!((got.src_as, got.src_as_name.as_str()), src_as);
        // Everything else passes through unchanged.
        let mut same = got.clone();
        (same.src_cid, same.dst_cid, same.cid) = (0, 0, 0);
        (same.src_as, same.dst_as) = (7, 8);
        (same.src_as_name, same.dst_as_name) = (String::new(), String::new());
        assert_eq!(&same, want);
    }

    // SIGHUP: a bad file is refused (old tables stay), a good one is used
    // for what comes next; nothing is lost either way.
    // Writes the customer list, sends SIGHUP and waits for `logged`.
    let reload = |list: &str, logged: &str| {
        std::fs::write(&customers, list).unwrap();
        enrich.signal(libc::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(20), || enrich.stderr().contains(logged)),
            "{}",
            enrich.stderr()
        );
    };
    reload(
        "10.1.0.0/16,1\n10.1.5.0/24,x\n",
        "reload failed, keeping the old tables",
    );
    broker.produce("input", messages(&[flow(600)])).unwrap();
    wait_count(&broker, "enriched", 601, &enrich);
    reload("10.1.0.0/16,1\n10.1.5.0/24,12\n", "SIGHUP: files reloaded");
    broker.produce("input", messages(&[flow(606)])).unwrap();
    wait_count(&broker, "enriched", 602, &enrich);
    let late: Vec<(u32, u32)> = decode_all(&broker, "enriched")
        .iter()
        .filter(|r| r.sequence_num >= 600)
        .map(|r| (r.sequence_num, r.src_cid))
        .collect();
    // flow(600) and flow(606) both come from 10.1.5.x: 11 with the old
    // table, 12 with the new.
    assert_eq!(late, vec![(600, 11), (606, 12)]);
    let m = enrich.metrics(9592).unwrap();
    assert_metric(&m, "flowexport_enrich_reloads_total", 1.0);

    // split: one topic per customer (created by split), no-customer flows
    // dropped.
    let split = Agent::start_split(&ns, &brokers).unwrap();
    let mut want: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    let split_input = flows
        .iter()
        .map(|f| (f.clone(), expected_cid(f)))
        .chain([(flow(600), 11), (flow(606), 12)]);
    for (f, c) in split_input {
        if c != 0 {
            let e = want.entry(c).or_default();
            *e = (e.0 + 1, e.1 + f.packets, e.2 + f.bytes);
        }
    }
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), vec![1, 2, 11, 12]);
    let unmatched = 602 - want.values().map(|v| v.0).sum::<u64>();
    assert_eq!(unmatched, 100);
    for (cid, (n, _, _)) in &want {
        wait_count(&broker, &format!("cust-{cid}"), *n, &split);
    }
    let m = split.metrics(9593).unwrap();
    assert_metric(&m, "flowexport_bridge_dropped_total", unmatched as f64);
    for (cid, (n, packets, bytes)) in &want {
        let recs = decode_all(&broker, &format!("cust-{cid}"));
        assert!(recs.iter().all(|r| r.cid == *cid));
        let got = (
            recs.len() as u64,
            recs.iter().map(|r| r.packets).sum::<u64>(),
            recs.iter().map(|r| r.bytes).sum::<u64>(),
        );
        assert_eq!(got, (*n, *packets, *bytes), "customer {cid}");
    }
    for a in [enrich, split] {
        a.stop_ok();
    }
}

/// Runs `command` over N records, kills it with SIGKILL once 2000 outputs
/// landed, restarts it, and checks that every input record reached one of
/// `outputs` (none lost) with at most two batches of duplicates (the two
/// batches in flight).
fn killed_mid_stream_loses_nothing(
    command: &str,
    in_topic: &str,
    outputs: &[&str],
    extra: &[&str],
) {
    const N: u32 = 50_000;
    const BATCH: u64 = 500;
    let (ns, broker, files) = setup(&[(in_topic, 2)]);
    if command == "enrich" {
        broker.create_topic(outputs[0], 2).unwrap();
    }
    // Input records as enrich would have written them (split routes by cid).
    let flows: Vec<FlowRecord> = (0..N)
        .map(|i| {
            let mut f = flow(i);
            if command == "split" {
                f.cid = expected_cid(&f);
            }
            f
        })
        .collect();
    broker.produce(in_topic, messages(&flows)).unwrap();
    let brokers = broker.addr();
    let customers = files.path("customers.csv");
    let batch = BATCH.to_string();
    let mut args = vec![
        "--kafka-brokers",
        &brokers,
        "--in-topic",
        in_topic,
        "--batch-records",
        &batch,
        // A dead member leaves the group within seconds, not 45.
        "-X",
        "session.timeout.ms=6000",
        "-X",
        "heartbeat.interval.ms=1000",
    ];
    if command == "enrich" {
        args.extend(["--customers", customers.as_str()]);
    }
    args.extend_from_slice(extra);
    let total = |b: &Broker| outputs.iter().map(|t| b.count(t)).sum::<u64>();
    let mut first = Agent::start_command(&ns, command, &args, "reading topic").unwrap();
    assert!(
        wait_until(Duration::from_secs(90), || total(&broker) >= 2_000),
        "{}",
        first.stderr()
    );
    first.kill9();
    let at_kill = total(&broker);
    assert!(
        at_kill < N as u64,
        "{command} finished before the kill ({at_kill})"
    );
    let second = Agent::start_command(&ns, command, &args, "reading topic").unwrap();
    assert!(
        wait_until(Duration::from_secs(90), || total(&broker) >= N as u64),
        "{} of {N}: {}",
        total(&broker),
        second.stderr()
    );
    // Let anything still in flight land, then read everything.
    std::thread::sleep(Duration::from_secs(2));
    let out: Vec<FlowRecord> = outputs
        .iter()
        .flat_map(|t| decode_all(&broker, t))
        .collect();
    let dups = every_input_enriched_once_or_more(&out, &flows);
    // Only the (at most two) batches produced but not committed are read
    // again.
    assert!(
        dups <= 2 * BATCH,
        "{dups} duplicates > two batches of {BATCH}"
    );
    eprintln!("{command}: kill -9 after {at_kill} of {N} records: 0 lost, {dups} duplicates");
    second.stop_ok();
}

#[test]
fn enrich_killed_mid_stream_loses_nothing() {
    killed_mid_stream_loses_nothing(
        "enrich",
        "input",
        &["enriched"],
        &["--out-topic", "enriched"],
    );
}

#[test]
fn split_killed_mid_stream_loses_nothing() {
    // Every record has a destination: per-customer topics (created by
    // split) and one for flows without a customer.
    killed_mid_stream_loses_nothing(
        "split",
        "enriched",
        &["cust-1", "cust-2", "cust-11", "cust-none"],
        &["--topic-prefix", "cust-", "--unmatched-topic", "cust-none"],
    );
}

/// JSON in and out (`--kafka-format json` upstream, JSON consumers
/// downstream).
#[test]
fn enrich_reads_and_writes_json() {
    let (ns, broker, files) = setup(&[("jin", 1), ("jout", 1)]);
    let flows: Vec<FlowRecord> = (0..60).map(flow).collect();
    let mut msgs: Vec<(Vec<u8>, Vec<u8>)> = flows
        .iter()
        .map(|r| (Vec::new(), r.to_json().into_bytes()))
        .collect();
    msgs.push((Vec::new(), b"{\"src_addr\": \"not an address\"}".to_vec()));
    // Well-formed JSON without the byte counter: malformed, not a zero flow.
    msgs.push((
        Vec::new(),
        br#"{"src_addr":"10.0.0.1","dst_addr":"10.0.0.2","packets":1}"#.to_vec(),
    ));
    broker.produce("jin", msgs).unwrap();
    let (brokers, customers) = (broker.addr(), files.path("customers.csv"));
    let enrich = Agent::start_command(
        &ns,
        "enrich",
        &[
            "--kafka-brokers",
            &brokers,
            "--in-topic",
            "jin",
            "--out-topic",
            "jout",
            "--customers",
            &customers,
            "--in-format",
            "json",
            "--out-format",
            "json",
        ],
        "reading topic",
    )
    .unwrap();
    wait_count(&broker, "jout", 60, &enrich);
    let out: Vec<FlowRecord> = broker
        .consume_all("jout")
        .unwrap()
        .iter()
        .map(|m| flowexport::record::from_json(&m.payload).expect("JSON record"))
        .collect();
    assert_eq!(out.len(), 60);
    for (got, want) in out.iter().zip(&flows) {
        assert_eq!(got.sequence_num, want.sequence_num);
        assert_eq!(
            (got.src_cid, got.dst_cid, got.cid),
            (
                customer_of(want.src_addr),
                customer_of(want.dst_addr),
                expected_cid(want)
            )
        );
        assert_eq!((got.packets, got.bytes), (want.packets, want.bytes));
    }
    let m = enrich.metrics(9592).unwrap();
    assert_metric(&m, "flowexport_bridge_undecodable_total", 2.0);
    enrich.stop_ok();
}

#[test]
fn enrich_refuses_bad_files_naming_file_and_line() {
    let ns = Netns::new().unwrap();
    let files = Files::new();
    let bad = files.path("bad.csv");
    std::fs::write(&bad, "10.0.0.0/8,1\n\n10.0.0.1/8,2\n").unwrap();
    // enrich with this customer list must exit non-zero; its stderr.
    let refused = |customers: &str| {
        let a = Agent::spawn_command(
            &ns,
            "enrich",
            &[
                "--kafka-brokers",
                "127.0.0.1:9",
                "--in-topic",
                "in",
                "--out-topic",
                "out",
                "--customers",
                customers,
            ],
        )
        .unwrap();
        let o = a.wait_exit(Duration::from_secs(20)).unwrap();
        assert!(!o.status.success(), "{}", o.stderr);
        o.stderr
    };
    let err = refused(&bad);
    assert!(
        err.contains(&format!(
            "{bad} line 3: 10.0.0.1/8 has host bits set; write 10.0.0.0/8"
        )),
        "{err}"
    );
    let err = refused(&files.path("missing.csv"));
    assert!(err.contains("missing.csv: cannot read: "), "{err}");
}

/// Scale-out and failover: two enrich processes in one consumer group share
/// a 4-partition topic (cooperative-sticky assignment, the default), both
/// consuming while the input keeps coming; `kill -9` of the member that is
/// not the group's leader (the second to join); the survivor takes over
/// all partitions and every record reaches the output, with its customer
/// ids, and duplicates only from the batches in flight.
#[test]
fn enrich_group_survives_the_death_of_a_member() {
    // Below 65536: flow(i) puts i in an IPv6 address group.
    const N: u32 = 60_000;
    const CHUNKS: u32 = 12;
    const BATCH: u64 = 500;
    let (ns, broker, files) = setup(&[("gin", 4), ("gout", 4)]);
    let flows: Vec<FlowRecord> = (0..N).map(flow).collect();
    let brokers = broker.addr();
    let customers = files.path("customers.csv");
    let batch = BATCH.to_string();
    let member = |port: &str| {
        let addr = format!("127.0.0.1:{port}");
        let args = [
            "--kafka-brokers",
            &brokers,
            "--in-topic",
            "gin",
            "--out-topic",
            "gout",
            "--customers",
            &customers,
            "--group-id",
            "scale-out",
            "--batch-records",
            &batch,
            "--metrics-addr",
            &addr,
            // A dead member leaves the group within seconds, not 45.
            "-X",
            "session.timeout.ms=6000",
            "-X",
            "heartbeat.interval.ms=1000",
        ];
        Agent::start_command(&ns, "enrich", &args, "reading topic").unwrap()
    };
    let owned = |a: &Agent, port: u16| {
        metric(
            &a.metrics(port).unwrap_or_default(),
            "flowexport_bridge_partitions_owned",
        )
        .unwrap_or(-1.0)
    };
    let consumed = |a: &Agent, port: u16| {
        metric(
            &a.metrics(port).unwrap_or_default(),
            "flowexport_bridge_consumed_total",
        )
        .unwrap_or(0.0)
    };
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    std::thread::scope(|s| {
        // The input arrives over several seconds, so that both members
        // are reading when one dies: a third of it, then (at the first
        // signal) the next half once the group has split, then the last two
        // chunks after the kill, so that each member has new input to read
        // however long the group took to form. Should an assertion fail,
        // the sender is dropped and the producer runs to its end.
        let go = go;
        let producer = s.spawn(|| {
            for c in 0..CHUNKS {
                if c == CHUNKS / 3 || c == CHUNKS - 2 {
                    let _ = gate.lock().unwrap().recv();
                }
                let lo = (c * N / CHUNKS) as usize;
                let hi = ((c + 1) * N / CHUNKS) as usize;
                broker.produce("gin", messages(&flows[lo..hi])).unwrap();
                std::thread::sleep(Duration::from_millis(700));
            }
        });
        let a = member("9611");
        assert!(
            wait_until(Duration::from_secs(60), || owned(&a, 9611) == 4.0),
            "the first member never owned the 4 partitions: {}",
            a.stderr()
        );
        let mut b = member("9612");
        // Cooperative-sticky: the first member hands over two partitions,
        // keeps reading the other two.
        let split = || owned(&a, 9611) == 2.0 && owned(&b, 9612) == 2.0;
        assert!(
            wait_until(Duration::from_secs(60), split),
            "the group did not split the partitions: a {} b {}\n{}\n{}",
            owned(&a, 9611),
            owned(&b, 9612),
            a.stderr(),
            b.stderr()
        );
        go.send(()).unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || split()
                && consumed(&b, 9612) > 0.0),
            "the group did not split the partitions: a {} b {}\n{}\n{}",
            owned(&a, 9611),
            owned(&b, 9612),
            a.stderr(),
            b.stderr()
        );
        let a_before = consumed(&a, 9611);
        b.kill9();
        let killed_at = std::time::Instant::now();
        go.send(()).unwrap();
        // The session timeout (6 s) removes the dead member; the survivor
        // gets its partitions.
        assert!(
            wait_until(Duration::from_secs(60), || owned(&a, 9611) == 4.0),
            "the survivor never took over the dead member's partitions: {}",
            a.stderr()
        );
        let takeover = killed_at.elapsed();
        producer.join().unwrap();
        assert!(
            wait_until(Duration::from_secs(120), || broker.count("gout")
                >= N as u64),
            "{} of {N} records in the output: {}",
            broker.count("gout"),
            a.stderr()
        );
        std::thread::sleep(Duration::from_secs(2));
        let out = decode_all(&broker, "gout");
        let dups = every_input_enriched_once_or_more(&out, &flows);
        // The README's bound: each member's two batches in flight at a
        // rebalance or a crash may be read again.
        assert!(
            dups <= 2 * 2 * BATCH,
            "{dups} duplicates > two batches of {BATCH} per member"
        );
        assert!(consumed(&a, 9611) > a_before);
        eprintln!(
            "group failover: survivor owned all 4 partitions {:.1} s after the kill; \
             0 lost, {dups} duplicates",
            takeover.as_secs_f64()
        );
        a.stop_ok();
    });
}
