//! The agent as a long-running service: state pinned in a BPF filesystem
//! (`--pin-dir`) outlives the process. A restart with `--keep-attached`
//! counts through the restart, a `kill -9` loses nothing, a second agent on
//! the same directory and pinned maps it cannot read are refused.
//!
//! Needs root. Each test pins into a directory of its own on the harness's
//! BPF filesystem and removes it at the end (also on failure).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowexport_tests::frames::*;
use flowexport_tests::tools::run_ok;
use flowexport_tests::*;

/// Removes a test's pin directory on drop (detaching whatever is left).
struct Pins(PathBuf);

impl Pins {
    fn new() -> Pins {
        Pins(pin_dir().unwrap())
    }
    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends `rounds` of every one of `flows` UDP flows from 10.50.0.1, ports
/// 30000.., to 10.50.0.2:53, paced (4 frames every 200 us).
fn send(l: &Link, flows: u16, rounds: usize) -> u64 {
    let frames = udp_flows("10.50.0.1", "10.50.0.2", 30000, flows, 53, 30);
    send_frames(&l.a, &l.a_dev, frames, rounds, 4, PACE).unwrap()
}

/// The agent's arguments ([`agent_args`] on the link's `b` side), pinning
/// into `pins`, then `extra`.
fn pinned_args<'a>(l: &'a Link, pins: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    agent_args(&[&l.b_dev], &[&["--pin-dir", pins], extra].concat())
}

fn agent(l: &Link, pins: &Pins, extra: &[&str]) -> Agent {
    Agent::start(&l.b, &pinned_args(l, &pins.arg(), extra)).unwrap()
}

/// An agent on `pins` that must refuse to start; its output.
fn refused(l: &Link, pins: &Pins, extra: &[&str]) -> AgentOutput {
    Agent::refused(&l.b, &pinned_args(l, &pins.arg(), extra), &[])
}

/// `flowexport agent --pin-dir DIR --detach`, run to its end.
fn detach(l: &Link, pins: &Pins) -> AgentOutput {
    Agent::spawn(&l.b, &["--pin-dir", &pins.arg(), "--detach"])
        .unwrap()
        .wait_exit(Duration::from_secs(30))
        .unwrap()
}

/// Packets per flow (by source port) in the records, and the largest
/// single record of each flow.
fn per_flow(records: &[serde_json::Value]) -> BTreeMap<u64, (u64, u64)> {
    let mut m: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for r in records {
        if r["dst_addr"] == "10.50.0.2" {
            let e = m.entry(r["src_port"].as_u64().unwrap()).or_default();
            let p = r["packets"].as_u64().unwrap();
            e.0 += p;
            e.1 = e.1.max(p);
        }
    }
    m
}

fn pinned(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Each of the 20 test flows carries exactly `packets` packets over `records`.
fn assert_every_flow_has(records: &[serde_json::Value], packets: u64) {
    let got = per_flow(records);
    assert_eq!(got.len(), 20, "{got:?}");
    for (port, (n, _)) in &got {
        assert_eq!(*n, packets, "flow from port {port}: {got:?}");
    }
}

/// No XDP program left on `dev` in `ns`.
fn assert_no_xdp(ns: &Netns, dev: &str) {
    let link = ns.exec(&["ip", "-d", "link", "show", "dev", dev]).unwrap();
    assert!(!link.contains("prog/xdp"), "{link}");
}

#[test]
fn restart_with_keep_attached_counts_every_packet() {
    let l = Link::new().unwrap();
    let pins = Pins::new();
    let first = agent(&l, &pins, &["--keep-attached"]);
    assert_eq!(send(&l, 20, 10), 200);
    let out = first.stop_ok();
    assert!(
        out.stderr.contains("left 2 links attached"),
        "{}",
        out.stderr
    );
    // Nothing was exported at that exit: the counts stay in the kernel.
    let mut records = out.records;
    assert!(per_flow(&records).is_empty());
    let left = pinned(&pins.0);
    assert!(
        left.contains(&"TABLE".to_string()) && left.contains(&format!("link:xdp:{}", l.b_dev)),
        "{left:?}"
    );
    // No agent: the programs keep counting.
    assert_eq!(send(&l, 20, 5), 100);
    let second = agent(&l, &pins, &[]);
    assert!(
        second.stderr().contains("adopting the pinned state"),
        "{}",
        second.stderr()
    );
    assert_eq!(send(&l, 20, 5), 100);
    let out = second.stop_ok();
    records.extend(out.records);
    assert_every_flow_has(&records, 20);
    // A normal exit removes the pins.
    assert!(pinned(&pins.0).is_empty(), "{:?}", pinned(&pins.0));
}

/// `--capture auto` keeps the ingress hook a pinned link has (XDP here,
/// where auto alone would pick TC on a veth), so a restart that changes the
/// capture to auto neither loses nor double-counts a packet; a TC link is
/// kept the same way.
#[test]
fn capture_auto_keeps_the_hook_of_a_pinned_link() {
    let l = Link::new().unwrap();
    let pins = Pins::new();
    let mut records = Vec::new();
    for (hook, first_capture) in [("XDP", "xdp"), ("TC", "tc")] {
        let first = agent(&l, &pins, &["--capture", first_capture, "--keep-attached"]);
        assert_eq!(send(&l, 20, 3), 60);
        records.extend(first.stop_ok().records);
        // Counted by the pinned programs while no agent runs.
        assert_eq!(send(&l, 20, 2), 40);
        let second = agent(&l, &pins, &["--capture", "auto"]);
        let adopted = format!("attached to {}: {hook} ingress (adopted link)", l.b_dev);
        assert!(second.stderr().contains(&adopted), "{}", second.stderr());
        assert_eq!(send(&l, 20, 1), 20);
        records.extend(second.stop_ok().records);
        assert!(pinned(&pins.0).is_empty(), "{:?}", pinned(&pins.0));
        assert_no_xdp(&l.b, &l.b_dev);
    }
    assert_every_flow_has(&records, 12);
}

#[test]
fn kill_9_loses_nothing() {
    let l = Link::new().unwrap();
    let pins = Pins::new();
    // Short timeouts and drains: exports are in progress when it dies.
    let quick = timeouts("300ms", "600ms", "100ms");
    let mut first = agent(&l, &pins, &quick);
    let mut sent = 0;
    for _ in 0..8 {
        sent += send(&l, 20, 5);
        std::thread::sleep(Duration::from_millis(60));
    }
    first.kill9();
    let mut records = first.stop().unwrap().records;
    // While no agent runs, the pinned programs keep counting.
    sent += send(&l, 20, 7);
    let second = agent(&l, &pins, &quick);
    for _ in 0..4 {
        sent += send(&l, 20, 5);
        std::thread::sleep(Duration::from_millis(60));
    }
    let out = second.stop_ok();
    records.extend(out.records);
    let got = per_flow(&records);
    assert_eq!(got.len(), 20);
    assert_eq!(sent, 20 * (8 * 5 + 7 + 4 * 5));
    let per = sent / 20;
    let mut dups = 0;
    for (port, (packets, largest)) in &got {
        // Nothing lost; at most one record of a flow exported twice (the
        // one the killed agent had sent but not yet committed).
        assert!(
            *packets >= per,
            "flow from port {port} lost packets: {got:?}"
        );
        assert!(
            *packets - per <= *largest,
            "flow from port {port}: {} duplicates: {got:?}",
            *packets - per
        );
        dups += *packets - per;
    }
    eprintln!("kill -9: {sent} packets sent, 0 lost, {dups} exported twice");
    assert!(pinned(&pins.0).is_empty());
}

/// Slots of the pinned `TABLE` in state `state`, and the entries of the
/// pinned `PENDING` map (exports in progress).
fn pinned_slots_and_pending(dir: &Path, state: u32) -> (usize, usize) {
    use aya::maps::{Array, HashMap, Map, MapData};
    use flowexport_common::{slot_state, PendingExport, TableSlot, SLOT_WORD_INDEX};
    let table = MapData::from_pin(dir.join("TABLE")).unwrap();
    let table: Array<_, TableSlot> = Array::try_from(Map::Array(table)).unwrap();
    // The control word: the key's u32 number SLOT_WORD_INDEX, the high half
    // of a u64 on this little-endian host.
    let word = |s: &TableSlot| (s.key.words64()[SLOT_WORD_INDEX / 2] >> 32) as u32;
    let slots = table
        .iter()
        .filter(|s| s.as_ref().is_ok_and(|s| slot_state(word(s)) == state))
        .count();
    let pending = MapData::from_pin(dir.join("PENDING")).unwrap();
    let pending: HashMap<_, u32, PendingExport> = HashMap::try_from(Map::HashMap(pending)).unwrap();
    (slots, pending.keys().count())
}

/// An idle flow's slot is retired at one drain and read whole at the next.
/// An agent killed in between has taken nothing from it and stored nothing
/// in `PENDING`: the retired slots hold every count, and the next agent
/// exports each flow once, exactly.
#[test]
fn kill_9_between_retiring_idle_flows_and_reading_them_loses_nothing() {
    use flowexport_common::{SLOT_RETIRING, SLOT_VALID};
    let l = Link::new().unwrap();
    let pins = Pins::new();
    // Idle after 2 s, drains 1.5 s apart. The flows are sent just after the
    // agent's drain clock starts, so the drain that finds them idle (3 s
    // after it, 1 s past their idle deadline) is far from the moment they
    // turn idle: all 20 are retired at the same drain and read 1.5 s later,
    // at the next. (With drains 2 s apart, that deadline fell on a drain,
    // which retired some flows and left the others to the next one.)
    let mut args = timeouts("60s", "2s", "1500ms").to_vec();
    args.extend(["--max-flows", "1024"]);
    let mut first = agent(&l, &pins, &args);
    let sent = send(&l, 20, 5);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    // Kill soon after the first sight of a retired slot, well before the
    // next drain. (Read again: a read of the table takes a syscall per slot,
    // and the first may have overlapped the drain that retired them.)
    let (retiring, pending) = loop {
        let (retiring, _) = pinned_slots_and_pending(&pins.0, SLOT_RETIRING);
        if retiring > 0 || std::time::Instant::now() > deadline {
            std::thread::sleep(Duration::from_millis(200));
            break pinned_slots_and_pending(&pins.0, SLOT_RETIRING);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    first.kill9();
    let killed = first.stop().unwrap().records;
    let (live, _) = pinned_slots_and_pending(&pins.0, SLOT_VALID);
    eprintln!("killed with {retiring} slots retired, {live} live");
    assert_eq!(
        retiring, 20,
        "the 20 idle flows' slots were not seen retired at one drain ({live} live)"
    );
    assert_eq!(pending, 0, "idle exports keep nothing in PENDING");
    let early = per_flow(&killed);
    assert!(early.is_empty(), "exported before the kill: {early:?}");
    let second = agent(&l, &pins, &args);
    let out = second.stop_ok();
    assert_eq!(sent, 20 * 5);
    assert_every_flow_has(&out.records, 5);
    // Each in one record, as without the kill.
    let got = per_flow(&out.records);
    assert!(got.values().all(|&(_, largest)| largest == 5), "{got:?}");
    assert!(pinned(&pins.0).is_empty());
}

#[test]
fn one_agent_per_pin_dir_and_foreign_layouts_are_refused() {
    let l = Link::new().unwrap();
    let pins = Pins::new();
    let first = agent(&l, &pins, &["--keep-attached"]);
    let pid = first.pid();
    // A second agent on the same directory: refused, naming the first.
    let out = refused(&l, &pins, &[]);
    assert!(
        out.stderr
            .contains(&format!("in use by another flowexport agent (PID {pid})")),
        "{}",
        out.stderr
    );
    assert_eq!(send(&l, 5, 4), 20);
    assert!(first.stop().unwrap().status.success());

    // Other sizes: refused (the counts stay pinned).
    let out = refused(&l, &pins, &["--max-flows", "4096"]);
    assert!(out.stderr.contains("cannot be resized"), "{}", out.stderr);
    let out = refused(&l, &pins, &["--cache-slots", "64"]);
    assert!(out.stderr.contains("cannot be resized"), "{}", out.stderr);

    // Another layout version (an upgrade that changed the maps): refused,
    // saying how to finish or discard them; nothing is touched.
    set_layout_version(&pins.0, 99);
    let out = refused(&l, &pins, &[]);
    assert!(
        out.stderr.contains("layout 99") && out.stderr.contains("rm -r"),
        "{}",
        out.stderr
    );
    // --detach cannot read it either: refused the same way.
    let out = detach(&l, &pins);
    assert!(!out.status.success());
    assert!(out.stderr.contains("layout 99"), "{}", out.stderr);
    assert!(pinned(&pins.0).contains(&"TABLE".to_string()));
    // Back to this version: the counts of that state are all there.
    set_layout_version(&pins.0, flowexport_common_layout());
    let last = agent(&l, &pins, &[]);
    let out = last.stop_ok();
    let got = per_flow(&out.records);
    assert_eq!(got.values().map(|v| v.0).sum::<u64>(), 20, "{got:?}");
}

/// The layout version the agent writes (CONTROL[1]).
fn flowexport_common_layout() -> u32 {
    flowexport_common::LAYOUT_VERSION
}

/// Overwrites the layout version in a pinned CONTROL map, as an agent of
/// another version would have left it.
fn set_layout_version(dir: &Path, v: u32) {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(dir.join("CONTROL")).unwrap();
    let mut a: Array<MapData, u32> = Array::try_from(Map::Array(data)).unwrap();
    a.set(1, v, 0).unwrap();
}

#[test]
fn without_cache_slots_an_agent_keeps_the_pinned_cache_size() {
    // The default depends on the CPU count (and a version may change it):
    // a restart without the flag must not be refused over it.
    let l = Link::new().unwrap();
    let pins = Pins::new();
    let first = agent(&l, &pins, &["--keep-attached", "--cache-slots", "64"]);
    assert_eq!(send(&l, 20, 4), 80);
    let mut records = first.stop_ok().records;
    assert_eq!(send(&l, 20, 2), 40);
    let second = agent(&l, &pins, &[]);
    assert_eq!(send(&l, 20, 2), 40);
    let out = second.stop_ok();
    assert!(
        out.stderr
            .contains("--cache-slots not given: the pinned state's 64 cache slots are kept")
            && out.stderr.contains("adopting the pinned state"),
        "{}",
        out.stderr
    );
    records.extend(out.records);
    assert_every_flow_has(&records, 8);
}

#[test]
fn detach_exports_what_keep_attached_left_and_removes_it() {
    let l = Link::new().unwrap();
    let pins = Pins::new();
    // Sizes other than the defaults: --detach adopts whatever is pinned.
    let first = agent(
        &l,
        &pins,
        &[
            "--keep-attached",
            "--max-flows",
            "4096",
            "--cache-slots",
            "64",
        ],
    );
    assert_eq!(send(&l, 20, 6), 120);
    let out = first.stop_ok();
    let mut records = out.records;
    // No agent: still counted.
    assert_eq!(send(&l, 20, 4), 80);
    let out = detach(&l, &pins);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("detaching the pinned state"),
        "{}",
        out.stderr
    );
    records.extend(out.records);
    assert_every_flow_has(&records, 10);
    // Nothing pinned, nothing attached any more.
    assert!(pinned(&pins.0).is_empty(), "{:?}", pinned(&pins.0));
    assert_no_xdp(&l.b, &l.b_dev);
    // With nothing pinned, --detach does nothing and succeeds.
    let out = detach(&l, &pins);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("nothing to detach"), "{}", out.stderr);
    assert!(out.records.is_empty());
}

const UNIT: &str = "/lib/systemd/system/flowexport-agent.service";

/// The package `cargo xtask deb` built for this version and architecture.
fn package_file() -> PathBuf {
    let arch = std::process::Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .unwrap();
    let arch = String::from_utf8_lossy(&arch.stdout).trim().to_string();
    let deb = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../target/debian/flowexport_{}_{arch}.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        deb.is_file(),
        "{} not found: build it with `cargo xtask deb` (scripts/test.sh does)",
        deb.display()
    );
    deb
}

fn package_installed() -> bool {
    std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "flowexport"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Purges the package on drop, so that a failing test leaves nothing
/// installed (its prerm also ends whatever the test's agent left pinned).
struct Package;

impl Drop for Package {
    fn drop(&mut self) {
        let _ = std::process::Command::new("dpkg")
            .args(["--purge", "flowexport"])
            .output();
    }
}

fn dpkg(args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new("dpkg");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    run_ok(&mut cmd, &format!("dpkg {args:?}"))
}

/// The value of `key=` in the installed unit (its last setting).
fn unit_setting(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{UNIT} has no {key}="))
        .trim()
        .to_string()
}

/// The unit's capability list ("CAP_BPF CAP_NET_ADMIN") as setpriv writes
/// it ("+bpf,+net_admin").
fn setpriv_caps(list: &str) -> String {
    list.split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `setpriv` arguments that run a command as the unit's User/Group with its
/// capabilities (ambient and bounding set) and NoNewPrivileges; `drop`
/// removes one capability (as a misconfigured unit would).
fn as_the_unit(unit: &str, drop: Option<&str>) -> Vec<String> {
    let ambient = unit_setting(unit, "AmbientCapabilities");
    assert_eq!(ambient, unit_setting(unit, "CapabilityBoundingSet"));
    let mut caps = setpriv_caps(&ambient);
    if let Some(d) = drop {
        caps = caps
            .split(',')
            .filter(|c| *c != d)
            .collect::<Vec<_>>()
            .join(",");
    }
    let mut argv = vec![
        "setpriv".to_string(),
        format!("--reuid={}", unit_setting(unit, "User")),
        format!("--regid={}", unit_setting(unit, "Group")),
        "--clear-groups".into(),
        format!("--inh-caps=-all,{caps}"),
        format!("--ambient-caps=-all,{caps}"),
        format!("--bounding-set=-all,{caps}"),
    ];
    assert_eq!(unit_setting(unit, "NoNewPrivileges"), "yes");
    argv.push("--no-new-privs".into());
    argv
}

/// JSON records among dpkg's output (the maintainer scripts' `--detach`
/// prints them there when there is no journal).
fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn package_installs_runs_as_the_service_and_purge_removes_it_all() {
    let deb = package_file();
    assert!(
        !package_installed(),
        "the flowexport package is installed on this machine; this test installs and purges \
         it: remove it first (dpkg --purge flowexport)"
    );
    let _purge = Package;
    dpkg(&["-i", deb.to_str().unwrap()]);

    for path in [
        "/usr/bin/flowexport",
        UNIT,
        "/etc/flowexport/agent.toml",
        "/usr/share/flowexport/prometheus/prometheus.yml",
        "/usr/share/flowexport/grafana/flowexport.json",
        "/usr/share/flowexport/detach.sh",
        "/usr/share/doc/flowexport/README.md",
    ] {
        assert!(
            Path::new(path).exists(),
            "the package did not install {path}"
        );
    }
    let conffiles = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Conffiles}", "flowexport"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/flowexport/agent.toml"),
        "agent.toml is not a conffile"
    );
    assert!(std::process::Command::new("getent")
        .args(["passwd", "flowexport"])
        .status()
        .unwrap()
        .success());
    run_ok(
        std::process::Command::new("systemd-analyze").args(["verify", UNIT]),
        &format!("systemd-analyze verify {UNIT}"),
    );

    // The operator's edit of the shipped config: the interface to watch
    // (and, here, a pin directory on the harness's BPF filesystem, which
    // `ip netns exec` leaves visible; the unit's ExecStartPre makes
    // /sys/fs/bpf/flowexport for the default).
    let l = Link::new().unwrap();
    let pins = Pins::new();
    let shipped = std::fs::read_to_string("/etc/flowexport/agent.toml").unwrap();
    std::fs::write(
        "/etc/flowexport/agent.toml",
        format!(
            "iface = [\"{}\"]\npin-dir = \"{}\"\n{shipped}",
            l.b_dev,
            pins.arg()
        ),
    )
    .unwrap();

    // The unit's ExecStart, as the unit's user with its capabilities.
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let exec_start = unit_setting(&unit, "ExecStart");
    assert!(!exec_start.contains(['"', '\'']), "{exec_start}");
    let mut argv_of_service = as_the_unit(&unit, None);
    argv_of_service.extend(exec_start.split_whitespace().map(String::from));
    let service = Agent::start_argv(&l.b, &argv_of_service).unwrap();
    assert_eq!(send(&l, 20, 6), 120);
    // systemctl stop: SIGTERM; --keep-attached leaves the programs counting.
    let out = service.stop_ok();
    let mut records = out.records;
    assert_eq!(send(&l, 20, 4), 80);

    // Without CAP_BPF, the same command says so.
    let mut argv = as_the_unit(&unit, Some("+bpf"));
    argv.extend(exec_start.split_whitespace().map(String::from));
    let out =
        l.b.exec(&argv.iter().map(String::as_str).collect::<Vec<_>>())
            .unwrap_err()
            .to_string();
    assert!(out.contains("missing CAP_BPF"), "{out}");

    // An upgrade to a version with the same map layout leaves the pinned
    // state to the new agent; one with another layout makes the installed
    // version export and detach it first (preinst, here with its layout
    // changed as a new package's would be).
    let preinst = "/var/lib/dpkg/info/flowexport.preinst";
    let same = std::process::Command::new("sh")
        .args([preinst, "upgrade", env!("CARGO_PKG_VERSION")])
        .output()
        .unwrap();
    assert!(same.status.success(), "{same:?}");
    assert!(json_lines(&same.stdout).is_empty());
    assert!(pinned(&pins.0).contains(&"TABLE".to_string()));
    let other = std::env::temp_dir().join(unique("preinst-"));
    let script = std::fs::read_to_string(preinst).unwrap();
    let bumped = format!("NEW_LAYOUT={}", flowexport_common_layout() + 1);
    let script = script.replace(
        &format!("NEW_LAYOUT={}", flowexport_common_layout()),
        &bumped,
    );
    assert!(script.contains(&bumped));
    std::fs::write(&other, script).unwrap();
    let upgrade = std::process::Command::new("sh")
        .arg(&other)
        .args(["upgrade", env!("CARGO_PKG_VERSION")])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&other);
    assert!(upgrade.status.success(), "{upgrade:?}");
    records.extend(json_lines(&upgrade.stdout));
    assert!(pinned(&pins.0).is_empty(), "{:?}", pinned(&pins.0));

    // The new version's service starts afresh and counts again.
    let service = Agent::start_argv(&l.b, &argv_of_service).unwrap();
    assert_eq!(send(&l, 20, 2), 40);
    let out = service.stop_ok();
    records.extend(out.records);

    // Purge: prerm exports what the programs counted since the stop,
    // detaches them and removes the pins; postrm removes the config.
    let out = dpkg(&["--purge", "flowexport"]);
    records.extend(json_lines(&out.stdout));
    // 6 + 4 packets per flow before the upgrade, 2 after it.
    assert_every_flow_has(&records, 12);
    assert!(pinned(&pins.0).is_empty(), "{:?}", pinned(&pins.0));
    assert_no_xdp(&l.b, &l.b_dev);
    // (The TC egress link is TCX on 6.6+, which `tc filter show` does not
    // list: its pin, gone above, was its last reference.)
    for path in [
        "/usr/bin/flowexport",
        UNIT,
        "/etc/flowexport",
        "/usr/share/flowexport",
    ] {
        assert!(!Path::new(path).exists(), "purge left {path}");
    }
    let procs = std::process::Command::new("pgrep")
        .args(["-f", "/usr/bin/flowexport"])
        .output()
        .unwrap();
    assert!(procs.stdout.is_empty(), "{procs:?}");
}

/// Packets per ingress interface (`in_if`) of the test's flows.
fn per_in_if(records: &[serde_json::Value]) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for r in records {
        if r["dst_addr"] == "10.50.0.2" {
            *m.entry(r["in_if"].as_u64().unwrap()).or_default() += r["packets"].as_u64().unwrap();
        }
    }
    m
}

#[test]
fn restart_detaches_interfaces_no_longer_asked_for() {
    let l = Link::new().unwrap();
    // A second veth pair between the same namespaces.
    let l2 = Link::between(Netns::borrowed(&l.a.name), Netns::borrowed(&l.b.name)).unwrap();
    let (if1, if2) = (
        l.b.ifindex(&l.b_dev).unwrap() as u64,
        l.b.ifindex(&l2.b_dev).unwrap() as u64,
    );
    let pins = Pins::new();
    let first = agent(&l, &pins, &["--iface", &l2.b_dev, "--keep-attached"]);
    assert_eq!(send(&l, 5, 4), 20);
    assert_eq!(send(&l2, 5, 6), 30);
    let out = first.stop_ok();
    let mut records = out.records;
    // Restarted for the first interface only: the second one's programs go
    // (what they counted is still exported), the first keeps counting.
    let second = agent(&l, &pins, &[]);
    assert!(
        second
            .stderr()
            .contains(&format!("detached link:xdp:{}", l2.b_dev)),
        "{}",
        second.stderr()
    );
    assert_no_xdp(&l.b, &l2.b_dev);
    assert!(!pinned(&pins.0).contains(&format!("link:xdp:{}", l2.b_dev)));
    assert_eq!(send(&l, 5, 2), 10);
    assert_eq!(send(&l2, 5, 2), 10);
    let out = second.stop_ok();
    records.extend(out.records);
    let got = per_in_if(&records);
    assert_eq!(got, BTreeMap::from([(if1, 30), (if2, 30)]), "{got:?}");
}

/// Flows the full table sends to the fallback ring and the overflow
/// counters: what one agent read of them is exported at its
/// `--keep-attached` exit, and the next one continues from there (nothing
/// read twice, nothing skipped).
#[test]
fn full_table_overflow_is_exported_once_across_restarts() {
    let l = Link::new().unwrap();
    let pins = Pins::new();
    // 8 table entries, 8 cache slots and a one-page ring (46 events) for
    // 600 flows: most packets can only go to the overflow counters.
    let first = agent(&l, &pins, &[&TINY_TABLE[..], &["--keep-attached"]].concat());
    assert_eq!(send(&l, 600, 1), 600);
    let out = first.stop_ok();
    let mut records = out.records;
    let exported_first: u64 = records.iter().map(|r| r["packets"].as_u64().unwrap()).sum();
    // No agent: counted into the pinned table, ring and counters.
    assert_eq!(send(&l, 600, 1), 600);
    let second = agent(&l, &pins, &TINY_TABLE);
    let out = second.stop_ok();
    records.extend(out.records);
    let got = totals(&records);
    let packets: u64 = got.values().map(|t| t.packets).sum();
    let bytes: u64 = got.values().map(|t| t.bytes).sum();
    assert_eq!((packets, bytes), (1200, 1200 * 58), "{got:?}");
    assert!(
        got.keys().any(|id| id.proto == 0),
        "no overflow record: {got:?}"
    );
    // The first agent held flows in memory, and exported them as it left.
    assert!(exported_first > 0);
}
