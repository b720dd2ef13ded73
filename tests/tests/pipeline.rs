//! The whole bwNetFlow-style pipeline on real parts: the agent on a veth
//! pair → Kafka `input` → `enrich` → `enriched` → `split` (per-customer
//! topics) and → `dashboard` → the real Prometheus (Debian's), scraping the
//! shipped configuration and answering every expression of the shipped
//! Grafana dashboard. Plus pmacct-format JSON into the dashboard in
//! flow-exporter's drop-in mode, with exact counter values.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use flowexport::codec::protobuf;
use flowexport_tests::frames::*;
use flowexport_tests::kafka::Broker;
use flowexport_tests::prometheus::Prometheus;
use flowexport_tests::*;
use serde_json::Value;

const CUSTOMERS: &str = "\
10.50.1.0/24,1
10.50.2.0/24,2
2001:db8:50:3::/64,3
";

const ASN: &str = "\
10.50.0.0/16,64500,OUR-NET
10.60.0.0/16,64501,PEER-NET
2001:db8:50::/48,64500,OUR-NET
2001:db8:60::/48,64501,PEER-NET
";

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `expr` in the Grafana dashboard JSON.
fn grafana_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => grafana_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| grafana_exprs(v, out)),
        _ => {}
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let d = std::env::temp_dir().join(unique("fe-pipe-"));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn agent_to_enrich_split_dashboard_and_prometheus() {
    let l = Link::new().unwrap();
    let broker = Broker::start_with(&l.b, &[("input", 2), ("enriched", 1)]).unwrap();
    let dir = TempDir::new();
    let customers = dir.write("customers.csv", CUSTOMERS);
    let asn = dir.write("asn.csv", ASN);
    let brokers = broker.addr();

    let args = kafka_agent_args(&l.b_dev, &brokers, "input", &["--idle-timeout", "1s"]);
    let agent = Agent::start(&l.b, &args).unwrap();
    // Ingress (frames from the other namespace arrive at the agent's XDP
    // program) and egress (frames sent from the agent's side pass its TC
    // program). (cid, packets, bytes) per customer, by the cid rule: the
    // destination of ingress, the source of egress.
    let (a, a_dev, b, b_dev) = (&l.a, &l.a_dev, &l.b, &l.b_dev);
    send_one(
        a,
        a_dev,
        eth4("10.60.0.5", "10.50.1.10", &L4::udp(40000, 53, 100)),
        7,
    );
    let syn = L4::tcp(40001, 443, TCP_SYN, 0);
    send_one(b, b_dev, eth4("10.50.2.20", "10.60.0.6", &syn), 4);
    let ntp = L4::udp(40002, 123, 50);
    send_one(
        a,
        a_dev,
        eth6("2001:db8:60::1", "2001:db8:50:3::9", &ntp),
        5,
    );
    // No customer on either side: dropped by split.
    send_one(
        a,
        a_dev,
        eth4("10.70.0.1", "10.70.0.2", &L4::udp(1, 2, 10)),
        3,
    );
    let want: BTreeMap<u32, (u64, u64)> =
        BTreeMap::from([(1, (7, 7 * 128)), (2, (4, 4 * 40)), (3, (5, 5 * 98))]);

    let enrich = Agent::start_enrich(&l.b, &brokers, &customers, &asn).unwrap();
    let split = Agent::start_split(&l.b, &brokers).unwrap();
    let dashboard = Agent::start_command(
        &l.b,
        "dashboard",
        &[
            "--kafka-brokers",
            &brokers,
            "--topic",
            "enriched",
            "--format",
            "protobuf",
            // No name file: the AS names are the ones enrich put in the
            // records.
            "--asn",
            "64500",
            "--start-offset",
            "earliest",
            "--metrics-addr",
            ":9595",
        ],
        "dashboard reading topic",
    )
    .unwrap();

    // Per-customer topics: exact packets and bytes.
    for (cid, (packets, bytes)) in &want {
        let topic = format!("cust-{cid}");
        let mut got = (0, 0);
        let ok = wait_until(Duration::from_secs(90), || {
            if broker.count(&topic) == 0 {
                return false;
            }
            let recs: Vec<_> = broker
                .consume_all(&topic)
                .unwrap()
                .iter()
                .map(|m| protobuf::decode(&m.payload, false).unwrap())
                .collect();
            assert!(recs.iter().all(|r| r.cid == *cid));
            got = (
                recs.iter().map(|r| r.packets).sum(),
                recs.iter().map(|r| r.bytes).sum(),
            );
            got.0 >= *packets
        });
        assert!(
            ok,
            "{topic}: {got:?}\nagent: {}\nenrich: {}\nsplit: {}",
            agent.stderr(),
            enrich.stderr(),
            split.stderr()
        );
        assert_eq!(got, (*packets, *bytes), "{topic}");
    }
    // The flow without a customer reached `enriched` and was dropped by
    // split (waited for: the agent may export it a drain after the others).
    let (ok, m) = split.wait_metrics(9593, Duration::from_secs(30), |m| {
        metric(m, "flowexport_bridge_dropped_total") >= Some(1.0)
    });
    assert!(ok, "{m}\n{}", split.stderr());
    assert_metric(&m, "flowexport_bridge_dropped_total", 1.0);

    // Dashboard counters, exact (once it has read all of `enriched`).
    let (ok, m) = dashboard.wait_metrics(9595, Duration::from_secs(30), |m| {
        metric(
            m,
            "flowexport_dashboard_host_bytes_total{host=\"192.0.2.20\"}",
        ) >= Some(1660.0)
    });
    assert!(ok, "{m}\n{}", dashboard.stderr());
    let want_lines = [
        "flowexport_dashboard_bytes_total{app=\"dns\",cid=\"1\",direction=\"ingress\",ip_version=\"4\",proto=\"udp\"} 896",
        "flowexport_dashboard_packets_total{app=\"https\",cid=\"2\",direction=\"egress\",ip_version=\"4\",proto=\"tcp\"} 4",
        "flowexport_dashboard_bytes_total{app=\"ntp\",cid=\"3\",direction=\"ingress\",ip_version=\"6\",proto=\"udp\"} 490",
        "flowexport_dashboard_bytes_total{app=\"other\",cid=\"none\",direction=\"ingress\",ip_version=\"4\",proto=\"udp\"} 114",
        "flowexport_dashboard_host_bytes_total{host=\"192.0.2.20\"} 1660",
        "flow_transmit_bytes_total{destination_as=\"64501\",destination_as_name=\"PEER-NET\",hostname=\"192.0.2.20\",source_as=\"64500\",source_as_name=\"OUR-NET\"} 160",
        "flow_receive_bytes_total{destination_as=\"64500\",destination_as_name=\"OUR-NET\",hostname=\"192.0.2.20\",source_as=\"64501\",source_as_name=\"PEER-NET\"} 1386",
    ];
    for line in want_lines {
        assert!(m.contains(line), "missing {line}\n{m}");
    }
    // One undecodable message, so the dashboard's error panel has data.
    broker
        .produce("enriched", vec![(b"junk".to_vec(), b"\x08".to_vec())])
        .unwrap();
    let (ok, _) = dashboard.wait_metrics(9595, Duration::from_secs(30), |m| {
        metric(
            m,
            "flowexport_dashboard_undecodable_total{reason=\"protobuf\"}",
        ) == Some(1.0)
    });
    assert!(ok);

    // Prometheus with the shipped configuration (scrape interval shortened).
    let config = repo_file("deploy/prometheus/prometheus.yml")
        .replace("scrape_interval: 15s", "scrape_interval: 1s");
    assert!(config.contains("scrape_interval: 1s"));
    let prom = Prometheus::start(&l.b, &config).unwrap();
    for job in [
        "flowexport-agent",
        "flowexport-enrich",
        "flowexport-split",
        "flowexport-dashboard",
    ] {
        let q = format!("up{{job=\"{job}\"}} == 1");
        assert!(
            wait_until(Duration::from_secs(30), || prom
                .query(&q)
                .is_ok_and(|r| r.len() == 1)),
            "{job} not scraped: {}",
            prom.log()
        );
    }
    // rate() needs two samples of every series.
    std::thread::sleep(Duration::from_secs(3));
    let dash: Value = serde_json::from_str(&repo_file("deploy/grafana/flowexport.json")).unwrap();
    let mut exprs = Vec::new();
    grafana_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut empty = Vec::new();
    for e in &exprs {
        let ok = wait_until(Duration::from_secs(15), || {
            prom.query(e).is_ok_and(|r| !r.is_empty())
        });
        if !ok {
            empty.push(e.clone());
        }
    }
    assert!(
        empty.is_empty(),
        "Grafana expressions without data: {empty:#?}"
    );
    // And the numbers behind the customer panel are the traffic sent.
    let r = prom
        .query("sum by (cid) (flowexport_dashboard_bytes_total)")
        .unwrap();
    let got: BTreeMap<String, f64> = r
        .iter()
        .map(|s| {
            (
                s["metric"]["cid"].as_str().unwrap().to_string(),
                s["value"][1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        BTreeMap::from([
            ("1".to_string(), 896.0),
            ("2".to_string(), 160.0),
            ("3".to_string(), 490.0),
            ("none".to_string(), 114.0),
        ])
    );
    drop(prom);
    for a in [dashboard, split, enrich, agent] {
        a.stop_ok();
    }
}

/// pmacct's JSON, as its Kafka plugin writes it, into the dashboard run
/// with flow-exporter's command line (`--broker --topic --asn`).
#[test]
fn pmacct_json_into_the_flow_exporter_drop_in() {
    let ns = Netns::new().unwrap();
    let broker = Broker::start_with(&ns, &[("pmacct.acct", 1)]).unwrap();
    let dir = TempDir::new();
    // CIDR-Report's asn.txt format, as flow-exporter fetched it.
    let names = dir.write(
        "asn.txt",
        "15169\tGOOGLE - Google LLC, US\n6939\tHURRICANE - Hurricane Electric LLC, US\n",
    );
    let msg = |label: &str, src: u32, dst: u32, bytes: u64| {
        format!(
            "{{\"event_type\": \"purge\", \"label\": \"{label}\", \"as_src\": {src}, \"as_dst\": {dst}, \
             \"ip_src\": \"192.0.2.1\", \"ip_dst\": \"198.51.100.1\", \"port_src\": 443, \"port_dst\": 50000, \
             \"ip_proto\": \"tcp\", \"packets\": 2, \"bytes\": {bytes}}}"
        )
        .into_bytes()
    };
    let msgs = vec![
        msg("bdr1.ny1", 15169, 6939, 100),
        msg("bdr1.ny1", 15169, 6939, 200),
        msg("bdr2.ny1", 15169, 6939, 300),
        msg("bdr1.ny1", 6939, 15169, 52),
        msg("bdr1.ny1", 1, 2, 999),
        b"not json at all".to_vec(),
        b"{\"label\": \"bdr1.ny1\", \"as_src\": 15169}".to_vec(),
    ];
    broker
        .produce(
            "pmacct.acct",
            msgs.into_iter().map(|m| (Vec::new(), m)).collect(),
        )
        .unwrap();
    let brokers = broker.addr();
    // flow-exporter's flags (`--broker --topic --asn`), then `extra`.
    let dashboard = |extra: &[&str], ready: &str| {
        let drop_in = [
            "--broker",
            &brokers,
            "--topic",
            "pmacct.acct",
            "--asn",
            "15169",
        ];
        Agent::start_command(&ns, "dashboard", &[&drop_in, extra].concat(), ready).unwrap()
    };
    // flow-exporter's flags, plus the names file (no network look-up) and
    // an explicit start offset (flow-exporter always starts at the newest).
    let d = dashboard(
        &["--asn-names", &names, "--start-offset", "earliest"],
        "dashboard reading topic",
    );
    // A message is counted as read before it is decoded: wait for the
    // last ones' effects too.
    let (ok, m) = d.wait_metrics(9590, Duration::from_secs(30), |m| {
        metric(m, "flowexport_dashboard_messages_total") == Some(7.0)
            && metric(m, "flowexport_dashboard_undecodable_total{reason=\"json\"}") >= Some(2.0)
    });
    assert!(ok, "{m}\n{}", d.stderr());
    let g = "destination_as=\"6939\",destination_as_name=\"HURRICANE - Hurricane Electric LLC\"";
    let s = "source_as=\"15169\",source_as_name=\"GOOGLE - Google LLC\"";
    for border in ["bdr1.ny1", "bdr2.ny1"] {
        let name = format!("flow_transmit_bytes_total{{{g},hostname=\"{border}\",{s}}}");
        assert_metric(&m, &name, 300.0);
    }
    assert_metric(
        &m,
        "flow_receive_bytes_total{destination_as=\"15169\",destination_as_name=\"GOOGLE - Google LLC\",hostname=\"bdr1.ny1\",source_as=\"6939\",source_as_name=\"HURRICANE - Hurricane Electric LLC\"}",
        52.0,
    );
    assert_eq!(m.matches("\nflow_transmit_bytes_total{").count(), 2, "{m}");
    assert_eq!(m.matches("\nflow_receive_bytes_total{").count(), 1, "{m}");
    // Malformed JSON is counted, not ignored.
    assert_metric(
        &m,
        "flowexport_dashboard_undecodable_total{reason=\"json\"}",
        2.0,
    );
    d.stop_ok();

    // flow-exporter's exact command line starts (and reads from the newest
    // message on, pmacct-json implied by --asn).
    dashboard(&[], "pmacct.acct as PmacctJson").stop_ok();
}
