//! `cargo xtask bench consumers`: enrich and dashboard, measured side by
//! side in one run.
//!
//! 1. In process, one core: enrich's per-record work (protobuf decode,
//!    customer and ASN lookups in 100k-prefix tables, protobuf encode) and
//!    the dashboard's (decode, counters), ns/record.
//! 2. End to end on a local Tansu broker (or `--brokers HOST:PORT`, or
//!    `--mock-cluster` for librdkafka's in-process mock broker): N
//!    records on a topic, read by bare rdkafka consumers (one joining a
//!    group as enrich does, one assigned the partition as the dashboard
//!    does), by a bare consume + produce copy, by `flowexport enrich`
//!    (reading, enriching and producing every record to another topic,
//!    offsets committed after the acks) and by `flowexport dashboard`
//!    (reading and counting). Each is timed twice: from its start (client
//!    creation or process spawn) to its last record, and from its first
//!    record read to its last (the steady rate, without group join or file
//!    loading); and charged its CPU time (utime + stime) for records per
//!    CPU-second.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowexport::codec::protobuf;
use flowexport::dashboard::{self, Dashboard, InputFormat};
use flowexport::enrich::{files, AsnDb, Enricher};
use flowexport::record::{FlowRecord, FlowType, ETYPE_IPV4};
use flowexport::sink::kafka::protobuf_message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use flowexport_benches::util::{cpu_seconds, send_waiting};

const PREFIXES: usize = 100_000;
const IN_PROCESS_RECORDS: usize = 200_000;
const IN_PROCESS_ROUNDS: usize = 5;
const E2E_RECORDS: usize = 100_000;
const MOCK_E2E_RECORDS: usize = 40_000;

/// One reader's end-to-end figures.
#[derive(Clone, Copy)]
struct Rates {
    /// records/s from start (client creation or process spawn) to the last
    /// record: includes the group join and, for flowexport, loading files.
    whole: f64,
    /// records/s from the first record read to the last record done: the
    /// throughput once running.
    steady: f64,
    /// records per CPU-second of the reading process.
    per_cpu: f64,
}

/// `done` records in `secs` since the first record, of which the first
/// `before` were read by then (1 for the bare readers: the first itself).
fn steady(n: usize, before: f64, secs: f64) -> f64 {
    (n as f64 - before) / secs
}

impl Rates {
    /// A bare reader in this process: `n` records, started at `t` with
    /// `cpu0` CPU seconds used, its first record read at `first`, its last
    /// done now.
    fn of_this_process(n: usize, t: Instant, cpu0: f64, first: Instant) -> Rates {
        let cpu = cpu_seconds(std::process::id()) - cpu0;
        Rates {
            whole: n as f64 / t.elapsed().as_secs_f64(),
            steady: steady(n, 1.0, first.elapsed().as_secs_f64()),
            per_cpu: n as f64 / cpu,
        }
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 100k distinct prefixes in 10.0.0.0/8 (lengths 16..=28, so they nest)
/// plus 10% IPv6, as a customer list; an ASN table of the /16s.
fn tables() -> (String, String) {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut seen = std::collections::HashSet::new();
    let mut customers = String::new();
    while seen.len() < PREFIXES {
        let line = if seen.len() % 10 == 9 {
            let len = 32 + (rng.next() % 33) as u32;
            let a = (0x2001_0db8u128 << 96) | ((rng.next() as u128) << 32);
            let mask = u128::MAX << (128 - len);
            format!("{}/{len}", std::net::Ipv6Addr::from(a & mask))
        } else {
            let len = 16 + (rng.next() % 13) as u32;
            let a = 0x0a00_0000u32 | (rng.next() as u32 & 0x00ff_ffff);
            let mask = u32::MAX << (32 - len);
            format!("{}/{len}", std::net::Ipv4Addr::from(a & mask))
        };
        if seen.insert(line.clone()) {
            let _ = writeln!(customers, "{line},{}", seen.len() % 5000 + 1);
        }
    }
    let mut asn = String::new();
    for i in 0..256u32 {
        let _ = writeln!(asn, "10.{i}.0.0/16,{},NET-{i}", 64512 + i);
    }
    (customers, asn)
}

fn records(n: usize) -> Vec<FlowRecord> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|i| FlowRecord {
            flow_type: FlowType::Ipfix,
            time_received_ns: 1_763_800_000_000_000_000 + i as u64,
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            time_flow_start_ns: 1_763_799_990_000_000_000,
            time_flow_end_ns: 1_763_799_999_000_000_000,
            bytes: 1_000 + rng.next() % 1_000_000,
            packets: 1 + rng.next() % 1000,
            src_addr: std::net::Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0xff_ffff))
                .into(),
            dst_addr: std::net::Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0xff_ffff))
                .into(),
            etype: ETYPE_IPV4,
            proto: if i % 4 == 0 { 6 } else { 17 },
            src_port: (1024 + i % 60000) as u16,
            dst_port: [53, 80, 443, 123][i % 4],
            flow_direction: (i % 2) as u8,
            sampling_rate: 1,
            ..FlowRecord::default()
        })
        .collect()
}

fn encode_all(recs: &[FlowRecord]) -> Vec<(Vec<u8>, Vec<u8>)> {
    recs.iter().map(protobuf_message).collect()
}

/// ns/record of `f` over every message, best of the rounds.
fn time_per_record(msgs: &[(Vec<u8>, Vec<u8>)], mut f: impl FnMut(&[u8])) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..IN_PROCESS_ROUNDS {
        let t = Instant::now();
        for (_, v) in msgs {
            f(v);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / msgs.len() as f64);
    }
    best
}

/// A plain producer (acks=all) with room for a whole run in its queue.
fn bare_producer(brokers: &str) -> Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

fn produce(brokers: &str, topic: &str, msgs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    let p = bare_producer(brokers)?;
    for (k, v) in msgs {
        send_waiting(&p, BaseRecord::to(topic).key(&k[..]).payload(&v[..]));
    }
    p.flush(Duration::from_secs(300))?;
    Ok(())
}

/// A plain consumer reading from the beginning, committing nothing.
fn bare_reader(brokers: &str, group: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

/// The bare consumer: records/s and records per CPU-second of this process.
/// `group`: join a consumer group and subscribe, as enrich does (both pay
/// the same group join); else assign partition 0 from the beginning, as the
/// dashboard does.
fn bare_consumer(brokers: &str, topic: &str, n: usize, group: bool) -> Result<Rates> {
    let cpu0 = cpu_seconds(std::process::id());
    let t = Instant::now();
    let c = bare_reader(brokers, &format!("bare-{}-{group}", std::process::id()))?;
    if group {
        c.subscribe(&[topic])?;
    } else {
        // As the dashboard does: the topic's metadata first, so librdkafka
        // does not learn it lazily after the assignment.
        c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)?;
        c.assign(&tpl)?;
    }
    let mut bytes = 0usize;
    let first = read_n(&c, n, "bare consumer", t, |m| {
        bytes += rdkafka::Message::payload(m).map_or(0, <[u8]>::len);
    })?;
    std::hint::black_box(bytes);
    Ok(Rates::of_this_process(n, t, cpu0, first))
}

/// Polls `c` until `n` messages were handed to `each` (300 s after `t` at
/// most); returns when the first one arrived.
fn read_n(
    c: &BaseConsumer,
    n: usize,
    what: &str,
    t: Instant,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<Instant> {
    let mut got = 0;
    let mut first = None;
    while got < n {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("{what} read {got} of {n} in 300 s");
        }
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            first.get_or_insert_with(Instant::now);
            each(&m);
            got += 1;
        }
    }
    Ok(first.unwrap_or(t))
}

/// A bare copy: the same consumer, and a producer (acks=all) writing every
/// payload unchanged to `out`, waiting for all acks at the end: the broker
/// work enrich causes, without flowexport.
fn bare_copy(brokers: &str, topic: &str, out: &str, n: usize) -> Result<Rates> {
    let cpu0 = cpu_seconds(std::process::id());
    let t = Instant::now();
    let c = bare_reader(brokers, &format!("copy-{}", std::process::id()))?;
    c.subscribe(&[topic])?;
    let p = bare_producer(brokers)?;
    let first = read_n(&c, n, "bare copy", t, |m| {
        let payload = rdkafka::Message::payload(m).unwrap_or_default();
        let key = rdkafka::Message::key(m).unwrap_or_default();
        send_waiting(&p, BaseRecord::to(out).key(key).payload(payload));
    })?;
    p.flush(Duration::from_secs(300))?;
    Ok(Rates::of_this_process(n, t, cpu0, first))
}

/// Creates a topic with one partition (it may exist already).
fn create_topic(brokers: &str, name: &str) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nt = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    let res = rt.block_on(admin.create_topics([&nt], &AdminOptions::new()))?;
    for r in res {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("creating topic {t}: {e}"),
        }
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

/// Runs `flowexport ARGS` until `done(metrics)` holds. `read(metrics)` is
/// the count of records read so far: the first scrape where it is above 0
/// starts the steady-state clock, with that count already read.
fn run_flowexport(
    bin: &Path,
    args: &[&str],
    port: u16,
    n: usize,
    read: impl Fn(&str) -> Option<f64>,
    done: impl Fn(&str) -> bool,
) -> Result<Rates> {
    let t = Instant::now();
    let mut child: Child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let mut cpu = 0.0;
    let mut first: Option<(Instant, f64)> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("flowexport {args:?} exited early: {status}");
        }
        if t.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            bail!("flowexport {args:?} not done in 300 s");
        }
        cpu = cpu_seconds(pid).max(cpu);
        if let Some(m) = scrape(port) {
            if first.is_none() {
                if let Some(c) = read(&m).filter(|c| *c > 0.0) {
                    first = Some((Instant::now(), c));
                }
            }
            if done(&m) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).max(cpu);
    let _ = child.kill();
    let _ = child.wait();
    let (t0, before) = first.unwrap_or((t, 0.0));
    Ok(Rates {
        whole: n as f64 / secs,
        steady: steady(n, before, t0.elapsed().as_secs_f64().min(secs)),
        per_cpu: n as f64 / cpu,
    })
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("fe-bench-consumers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (customers_text, asn_text) = tables();
    let customers_path = dir.join("customers.csv");
    let asn_path = dir.join("asn.csv");
    std::fs::write(&customers_path, &customers_text)?;
    std::fs::write(&asn_path, &asn_text)?;

    // 1. In process.
    let t = Instant::now();
    let customers = files::parse_customers(&customers_path, &customers_text)?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let asn = files::parse_asn_csv(&asn_path, &asn_text)?;
    let enricher = Enricher::new(customers, Some(AsnDb::Csv(asn)));
    let recs = records(IN_PROCESS_RECORDS);
    let msgs = encode_all(&recs);
    let mut matched = 0usize;
    let mut out = Vec::with_capacity(512);
    let mut enc = protobuf::Encoder::default();
    let mut dec = protobuf::Decoder::default();
    let enrich_ns = time_per_record(&msgs, |v| {
        let mut r = dec.decode(v).expect("valid");
        matched += enricher.apply(&mut r) as usize;
        out.clear();
        enc.encode(&r, false, &mut out);
    });
    // Where enrich's time goes.
    let decode_ns = time_per_record(&msgs, |v| {
        std::hint::black_box(dec.decode(v).expect("valid"));
    });
    let mut lookups = 0usize;
    let lookup_ns = time_per_record(&msgs, |v| {
        let _ = v;
        lookups += 1;
        let r = &recs[lookups % recs.len()];
        let mut x = r.clone();
        enricher.apply(&mut x);
        std::hint::black_box(x);
    });
    let encode_ns = time_per_record(&msgs, |v| {
        let _ = v;
        lookups += 1;
        out.clear();
        enc.encode(&recs[lookups % recs.len()], false, &mut out);
        std::hint::black_box(&out);
    });
    let registry = prometheus::Registry::new();
    let mut dash = Dashboard::new(
        &registry,
        Some(64512),
        HashMap::new(),
        10_000,
        1_000,
        100_000,
    );
    // Enriched input, as the dashboard would read it.
    let enriched: Vec<FlowRecord> = recs
        .iter()
        .map(|r| {
            let mut r = r.clone();
            enricher.apply(&mut r);
            r
        })
        .collect();
    let enriched_msgs = encode_all(&enriched);
    let dash_ns = time_per_record(&enriched_msgs, |v| {
        let f = dashboard::decode(InputFormat::Protobuf, v).expect("valid");
        dash.add(&f);
    });
    let rounds = IN_PROCESS_ROUNDS * IN_PROCESS_RECORDS;
    println!("## Consumers benchmark\n");
    println!(
        "In process, one core ({IN_PROCESS_RECORDS} records x {IN_PROCESS_ROUNDS} rounds, best round; \
         customer list of {PREFIXES} prefixes built in {build_ms:.0} ms; {:.0}% of flows matched a customer):\n",
        100.0 * matched as f64 / rounds as f64
    );
    println!("| stage | ns/record | records/s |");
    println!("| --- | --- | --- |");
    println!(
        "| enrich: decode + 2 customer + 2 ASN lookups + encode | {enrich_ns:.0} | {:.2} M |",
        1e3 / enrich_ns
    );
    println!(
        "| of which: protobuf decode | {decode_ns:.0} | {:.2} M |",
        1e3 / decode_ns
    );
    println!(
        "| of which: record copy + 2 customer + 2 ASN lookups | {lookup_ns:.0} | {:.2} M |",
        1e3 / lookup_ns
    );
    println!(
        "| of which: protobuf encode | {encode_ns:.0} | {:.2} M |",
        1e3 / encode_ns
    );
    println!(
        "| dashboard: decode + counters | {dash_ns:.0} | {:.2} M |",
        1e3 / dash_ns
    );

    // 2. End to end: the local Tansu, or `--brokers HOST:PORT` (any other
    // broker already running; topics get this run's own names).
    // `--mock-cluster`: librdkafka's in-process mock broker (in memory,
    // inside this process), a broker whose writes are not slower than its
    // reads.
    let mock = std::env::args().any(|a| a == "--mock-cluster");
    let external = std::env::args().skip_while(|a| a != "--brokers").nth(1);
    let tansu;
    let mut mock_cluster = None;
    let (brokers, broker_name) = match &external {
        Some(b) => (b.clone(), format!("the broker at {b}")),
        None if mock => {
            let c = mock_cluster.insert(rdkafka::mocking::MockCluster::new(1)?);
            (
                c.bootstrap_servers(),
                "librdkafka's mock cluster (in memory, in the benchmark's process)".to_string(),
            )
        }
        None => {
            tansu = flowexport_benches::tansu("flows")?;
            (tansu.addr(), "a local Tansu broker".to_string())
        }
    };
    let pid = std::process::id();
    let topic = |name: &str| {
        if external.is_some() {
            format!("{name}-{pid}")
        } else {
            name.to_string()
        }
    };
    let (flows_t, enriched_t, copied_t) = (topic("flows"), topic("enriched"), topic("copied"));
    if let Some(c) = &mock_cluster {
        // The mock cluster takes no CreateTopics requests.
        for t in [&flows_t, &enriched_t, &copied_t] {
            c.create_topic(t, 1, 1)?;
        }
    } else {
        if external.is_some() {
            create_topic(&brokers, &flows_t)?;
        }
        create_topic(&brokers, &enriched_t)?;
        create_topic(&brokers, &copied_t)?;
    }
    // The mock cluster keeps about 5 MB per partition and deletes older
    // messages beyond it: stay under that.
    let e2e_records = if mock_cluster.is_some() {
        MOCK_E2E_RECORDS
    } else {
        E2E_RECORDS
    };
    let e2e = encode_all(&records(e2e_records));
    produce(&brokers, &flows_t, &e2e)?;
    let bin: PathBuf = flowexport_benches::util::flowexport_bin()?;
    let bare = bare_consumer(&brokers, &flows_t, e2e_records, true)?;
    let bare_assigned = bare_consumer(&brokers, &flows_t, e2e_records, false)?;
    let copy = bare_copy(&brokers, &flows_t, &copied_t, e2e_records)?;
    let n = e2e_records as f64;
    let port = free_port()?;
    let ps = port.to_string();
    let metrics = format!("127.0.0.1:{ps}");
    let (customers_arg, asn_arg) = (
        customers_path.display().to_string(),
        asn_path.display().to_string(),
    );
    let enrich = run_flowexport(
        &bin,
        &[
            "enrich",
            "--kafka-brokers",
            &brokers,
            "--in-topic",
            &flows_t,
            "--out-topic",
            &enriched_t,
            "--customers",
            &customers_arg,
            "--asn-csv",
            &asn_arg,
            "--metrics-addr",
            &metrics,
            "--group-id",
            &format!("bench-enrich-{pid}"),
        ],
        port,
        e2e_records,
        |m| metric(m, "flowexport_bridge_consumed_total"),
        |m| {
            metric(m, "flowexport_bridge_consumed_total") == Some(n)
                && metric(m, "flowexport_bridge_delivered_total") == Some(n)
        },
    )?;
    let port = free_port()?;
    let metrics = format!(":{port}");
    let dash = run_flowexport(
        &bin,
        &[
            "dashboard",
            "--kafka-brokers",
            &brokers,
            "--topic",
            &flows_t,
            "--start-offset",
            "earliest",
            "--metrics-addr",
            &metrics,
        ],
        port,
        e2e_records,
        |m| metric(m, "flowexport_dashboard_messages_total"),
        |m| metric(m, "flowexport_dashboard_messages_total") == Some(n),
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nEnd to end on {broker_name} ({e2e_records} records, 1 partition). Whole run: \
         wall time from start (client creation, or process spawn: group join, and for \
         enrich loading its tables) to the last record. Steady: from the first record \
         read to the last record done. CPU: utime + stime of the reading process over \
         the whole run.\n"
    );
    println!(
        "| reader | records/s, whole run | records/s, steady | records per CPU-second | \
         vs its bare consumer, whole run | vs its bare consumer, steady |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let row = |name: &str, r: Rates, base: Rates| {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0}% | {:.0}% |",
            r.whole,
            r.steady,
            r.per_cpu,
            100.0 * r.whole / base.whole,
            100.0 * r.steady / base.steady
        );
    };
    row(
        "bare rdkafka consumer, group member (baseline of enrich)",
        bare,
        bare,
    );
    row(
        "bare rdkafka consumer, partition assigned (baseline of dashboard)",
        bare_assigned,
        bare_assigned,
    );
    row(
        "bare rdkafka consume + produce copy (acks=all), the broker work enrich causes",
        copy,
        bare,
    );
    row(
        "flowexport enrich (read, enrich, produce, commit after acks)",
        enrich,
        bare,
    );
    row("flowexport dashboard (read, count)", dash, bare_assigned);
    Ok(())
}
