//! The agent's IPFIX and NetFlow v9 export, checked by real third-party
//! decoders from Debian: nfcapd receives the export of known veth traffic and
//! nfdump must report exactly the packets and bytes sent per flow; tshark
//! dissects a capture of the same export and must find nothing malformed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use flowexport_tests::frames::*;
use flowexport_tests::tools::*;
use flowexport_tests::*;

/// tshark capturing UDP on the namespace's loopback into `file`.
fn tshark_capture(ns: &Netns, file: &std::path::Path) -> Proc {
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "tshark", "-i", "lo", "-f", "udp", "-w",
        ])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tshark must be installed: scripts/setup.sh --test");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("Capturing on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("tshark did not start capturing");
    Proc(Some(child))
}

/// Runs tshark over the capture with `args`, decoding `ports` as
/// NetFlow/IPFIX; returns its output lines.
fn tshark(file: &std::path::Path, ports: &[u16], args: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(file);
    for p in ports {
        cmd.arg("-d").arg(format!("udp.port=={p},cflow"));
    }
    let out = run_ok(cmd.args(args), "tshark");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs tshark over the capture, decoding both ports as NetFlow/IPFIX;
/// returns (export packets dissected, malformed or warning/error items).
fn tshark_check(file: &std::path::Path, ports: &[u16]) -> (usize, Vec<String>) {
    let n = tshark(file, ports, &["-Y", "cflow"])
        .iter()
        .filter(|l| l.contains("CFLOW"))
        .count();
    let bad = tshark(
        file,
        ports,
        &[
            "-Y",
            "_ws.malformed || _ws.expert.severity >= 6291456",
            "-T",
            "fields",
            "-e",
            "frame.number",
            "-e",
            "_ws.expert.message",
        ],
    );
    (n, bad)
}

#[test]
fn ipfix_and_netflow9_export_decoded_by_nfdump_and_tshark() {
    let l = Link::new().unwrap();
    let dir = std::env::temp_dir().join(unique("fe-nf-"));
    let (p_ipfix, p_v9) = (free_udp_port(&l.b), free_udp_port(&l.b));
    let mut cap_ipfix = nfcapd(&l.b, &dir.join("ipfix"), p_ipfix, None);
    let mut cap_v9 = nfcapd(&l.b, &dir.join("v9"), p_v9, None);
    let pcap = dir.join("export.pcap");
    let mut shark = tshark_capture(&l.b, &pcap);
    let ifb = l.b.ifindex(&l.b_dev).unwrap() as u64;
    let (t_ipfix, t_v9) = (format!("127.0.0.1:{p_ipfix}"), format!("127.0.0.1:{p_v9}"));
    // Small packets and a template refresh every 2 packets: several export
    // packets, some without templates, all checked.
    let flags = [
        "--ipfix",
        &t_ipfix,
        "--netflow9",
        &t_v9,
        "--export-packet-size",
        "400",
        "--template-packets",
        "2",
        "--observation-domain",
        "77",
    ];
    let agent = Agent::start(&l.b, &iface_args(&[&l.b_dev], &flags)).unwrap();
    // nfdump's key: (src, dst, sport, dport, proto).
    let key = |src: &str, dst: &str, sport, dport, proto: &str| -> NfKey {
        (src.into(), dst.into(), sport, dport, proto.into())
    };
    let mut want: BTreeMap<NfKey, (u64, u64, u64, u64)> = BTreeMap::new();
    for i in 0..20u16 {
        let frame = eth4(
            "10.50.0.1",
            "10.50.0.2",
            &L4::udp(3000 + i, 53, 100 + i as usize),
        );
        let n = 1 + i as u64;
        assert_eq!(send(&l.a, &l.a_dev, vec![frame], n as usize), n);
        let k = key("10.50.0.1", "10.50.0.2", 3000 + i as u64, 53, "UDP");
        want.insert(k, (n, n * (128 + i as u64), ifb, 0));
    }
    let (s6, d6) = ("2001:db8:50::1", "2001:db8:50::2");
    send(
        &l.a,
        &l.a_dev,
        vec![eth6(s6, d6, &L4::tcp(40000, 443, TCP_SYN | TCP_ACK, 200))],
        6,
    );
    want.insert(key(s6, d6, 40000, 443, "TCP"), (6, 6 * 260, ifb, 0));
    // Egress.
    send(
        &l.b,
        &l.b_dev,
        vec![eth4("10.50.1.2", "10.50.1.1", &L4::udp(123, 123, 48))],
        4,
    );
    want.insert(
        key("10.50.1.2", "10.50.1.1", 123, 123, "UDP"),
        (4, 4 * 76, 0, ifb),
    );

    let out = agent.stop_ok();
    assert!(out.records.is_empty(), "stdout is off with other sinks");
    // The agent has sent its last export packet; both nfcapd must have read
    // every datagram before they are stopped (their sockets' queues empty),
    // and tshark gets a moment for the last packets of its capture.
    assert!(
        wait_until(Duration::from_secs(10), || [p_ipfix, p_v9]
            .iter()
            .all(|p| udp_recv_queue(&l.b, *p) == Some(0))),
        "nfcapd did not read all export packets: queues {:?} {:?}",
        udp_recv_queue(&l.b, p_ipfix),
        udp_recv_queue(&l.b, p_v9)
    );
    std::thread::sleep(Duration::from_millis(500));
    cap_ipfix.term();
    cap_v9.term();
    shark.term();

    for proto in ["ipfix", "v9"] {
        let got = nfdump(&dir.join(proto));
        assert_eq!(got, want, "{proto}: nfdump's flows differ");
    }
    let (n, bad) = tshark_check(&pcap, &[p_ipfix, p_v9]);
    assert!(n >= 4, "tshark saw only {n} export packets");
    assert!(bad.is_empty(), "tshark found problems: {bad:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--sampling 10`: 100,000 packets in 10 flows; the kernel keeps about one
/// in ten. Every record says sampling_rate 10 and the sampled count lies
/// within 5 standard deviations of 10,000 (sd = sqrt(100000 x 0.1 x 0.9) =
/// 95). The IPFIX and NetFlow v9 exports carry the rate in their options
/// data (IPFIX: samplingInterval 10 and samplingProbability 0.1): tshark
/// reads it, and `flowexport collect` gives every decoded
/// record rate 10 and the same sampled counts as the agent's JSON.
#[test]
fn sampling_rate_in_records_and_in_ipfix_and_netflow9_options() {
    let l = Link::new().unwrap();
    let dir = std::env::temp_dir().join(unique("fe-sampling-"));
    std::fs::create_dir_all(&dir).unwrap();
    let (p_ipfix, p_v9) = (free_udp_port(&l.b), free_udp_port(&l.b));
    let pcap = dir.join("export.pcap");
    let mut shark = tshark_capture(&l.b, &pcap);
    let (t_ipfix, t_v9) = (format!("127.0.0.1:{p_ipfix}"), format!("127.0.0.1:{p_v9}"));
    let collector = Agent::collector(&l.b, &["--listen", &t_ipfix, "--listen", &t_v9]).unwrap();
    let flags = [
        "--sampling",
        "10",
        "--stdout",
        "--ipfix",
        &t_ipfix,
        "--netflow9",
        &t_v9,
    ];
    let agent = Agent::start(&l.b, &iface_args(&[&l.b_dev], &flags)).unwrap();
    let frames = udp_flows("10.60.0.1", "10.60.0.2", 5000, 10, 53, 100);
    assert_eq!(send(&l.a, &l.a_dev, frames, 10_000), 100_000);

    let out = agent.stop_ok();
    assert!(!out.records.is_empty());
    let field = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap_or(u64::MAX);
    assert!(
        out.records.iter().all(|r| field(r, "sampling_rate") == 10),
        "every record says rate 10"
    );
    let sampled: u64 = out.records.iter().map(|r| field(r, "packets")).sum();
    assert!(
        (10_000 - 475..=10_000 + 475).contains(&sampled),
        "sampled {sampled} of 100000 packets at 1 in 10"
    );
    // The exports: decoded by our collector, per protocol.
    assert!(
        wait_until(Duration::from_secs(10), || [p_ipfix, p_v9]
            .iter()
            .all(|p| udp_recv_queue(&l.b, *p) == Some(0))),
        "the collector did not read every export packet"
    );
    std::thread::sleep(Duration::from_millis(500));
    let decoded = collector.stop_ok();
    for ty in ["IPFIX", "NETFLOW_V9"] {
        let recs: Vec<_> = decoded.records.iter().filter(|r| r["type"] == ty).collect();
        assert_eq!(recs.len(), out.records.len(), "{ty} records");
        assert!(recs.iter().all(|r| field(r, "sampling_rate") == 10), "{ty}");
        let packets: u64 = recs.iter().map(|r| field(r, "packets")).sum();
        assert_eq!(packets, sampled, "{ty}: the sampled counts");
    }
    // tshark: the options data of both exports, and nothing malformed.
    shark.term();
    let lines: std::collections::BTreeSet<String> = tshark(
        &pcap,
        &[p_ipfix, p_v9],
        &[
            "-Y",
            "cflow.sampling_interval",
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-e",
            "udp.dstport",
            "-e",
            "cflow.sampling_interval",
            "-e",
            "cflow.sampling_algorithm",
            "-e",
            "cflow.sampling_probability",
        ],
    )
    .into_iter()
    .collect();
    let want: std::collections::BTreeSet<String> =
        [format!("{p_ipfix},10,2,0.1"), format!("{p_v9},10,2,")]
            .into_iter()
            .collect();
    assert_eq!(lines, want, "tshark's view of the options data");
    let (n, bad) = tshark_check(&pcap, &[p_ipfix, p_v9]);
    assert!(n >= 2, "tshark saw only {n} export packets");
    assert!(bad.is_empty(), "tshark found problems: {bad:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
