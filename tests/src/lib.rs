//! Test harness for flowexport's integration tests: network namespaces and
//! veth pairs created per test (removed on drop, also when a test panics),
//! raw frames built byte by byte and injected with AF_PACKET, and the real
//! `flowexport` binary run inside a namespace.
//!
//! Traffic only ever crosses veth pairs created here: frames are injected on
//! one end and seen by the programs on the other.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod frames;
pub mod kafka;
pub mod prometheus;
pub mod tools;
pub mod trafgen;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call (interface names are
/// limited to 15 bytes).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with every interface in it) on drop
/// unless it is only borrowed.
pub struct Netns {
    pub name: String,
    owned: bool,
}

impl Netns {
    pub fn new() -> Result<Netns> {
        let name = unique("fens");
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name, owned: true };
        // No IPv6 autoconfiguration, router solicitations or MLD reports: the
        // only packets on our links are the ones a test sends.
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on a namespace someone else owns (not deleted on drop).
    pub fn borrowed(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            owned: false,
        }
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
            .context("setns")
    }

    /// Like [`Netns::run`], but returns at once with the thread's handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<std::io::Result<T>>> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is a netns file.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        }))
    }

    /// A counter from this namespace's /proc/net/snmp (`Tcp`, `Ip`, ...).
    pub fn snmp(&self, group: &str, field: &str) -> Result<u64> {
        self.proc_counter("/proc/net/snmp", group, field)
    }

    /// A counter from this namespace's /proc/net/netstat (`IpExt`, `TcpExt`).
    pub fn netstat(&self, group: &str, field: &str) -> Result<u64> {
        self.proc_counter("/proc/net/netstat", group, field)
    }

    /// Both files hold pairs of lines, `Group: names...` then `Group: values...`.
    fn proc_counter(&self, file: &str, group: &str, field: &str) -> Result<u64> {
        let text = self.exec(&["cat", file])?;
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (lines.next(), lines.next());
        let (Some(names), Some(values)) = (names, values) else {
            bail!("no {group} section in {file}");
        };
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .with_context(|| format!("no {group} {field} in {file}"))?;
        values
            .split_whitespace()
            .nth(i)
            .with_context(|| format!("{group} {field}: no value in {file}"))?
            .parse()
            .with_context(|| format!("{group} {field} in {file}"))
    }

    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let dev = dev.to_string();
        self.run(move || {
            let c = std::ffi::CString::new(dev).unwrap();
            // SAFETY: valid C string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        })
    }

    /// (tx_dropped, rx_dropped) of an interface in this namespace.
    pub fn drops(&self, dev: &str) -> Result<(u64, u64)> {
        let out = self.exec(&["ip", "-j", "-s", "link", "show", dev])?;
        let v: Value = serde_json::from_str(&out)?;
        let s = &v[0]["stats64"];
        Ok((
            s["tx"]["dropped"].as_u64().unwrap_or(0),
            s["rx"]["dropped"].as_u64().unwrap_or(0),
        ))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `a.a_dev` <-> `b.b_dev`, both up,
/// no addresses.
pub struct Link {
    pub a: Netns,
    pub b: Netns,
    pub a_dev: String,
    pub b_dev: String,
}

impl Link {
    pub fn new() -> Result<Link> {
        let a = Netns::new()?;
        let b = Netns::new()?;
        Link::between(a, b)
    }

    /// [`Netns::drops`] of both ends (a, then b): what the link itself
    /// dropped so far.
    pub fn drops(&self) -> [(u64, u64); 2] {
        [
            self.a.drops(&self.a_dev).unwrap(),
            self.b.drops(&self.b_dev).unwrap(),
        ]
    }

    /// A new veth pair from `a` to `b` (both namespaces already exist).
    pub fn between(a: Netns, b: Netns) -> Result<Link> {
        let (a_dev, b_dev) = veth_between(&a, &b)?;
        Ok(Link { a, b, a_dev, b_dev })
    }
}

/// Adds a veth pair between two namespaces without owning them; returns
/// (dev in `a`, dev in `b`). Removed when either namespace is deleted.
pub fn veth_between(a: &Netns, b: &Netns) -> Result<(String, String)> {
    let a_dev = unique("vea");
    let b_dev = unique("veb");
    veth_named(a, &a_dev, b, &b_dev)?;
    Ok((a_dev, b_dev))
}

/// Adds a veth pair `a_dev` (in `a`) <-> `b_dev` (in `b`), both up.
pub fn veth_named(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    sh(&[
        "ip", "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev,
        "netns", &b.name,
    ])?;
    a.exec(&["ip", "link", "set", a_dev, "up"])?;
    b.exec(&["ip", "link", "set", b_dev, "up"])?;
    Ok(())
}

/// The tests' usual pacing: [`send`] sleeps this long every 64 frames.
pub const PACE: Duration = Duration::from_micros(200);

/// Sends each frame `repeat` times out of `dev` in `ns`, paced (64 frames
/// every [`PACE`]); returns the number of frames sent.
pub fn send(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>, repeat: usize) -> u64 {
    send_frames(ns, dev, frames, repeat, 64, PACE).expect("send frames")
}

/// Sends `frame` `n` times like [`send`], and asserts that all went out.
pub fn send_one(ns: &Netns, dev: &str, frame: Vec<u8>, n: usize) {
    assert_eq!(send(ns, dev, vec![frame], n), n as u64);
}

/// Sends each frame `repeat` times out of `dev` in `ns` with AF_PACKET.
/// Every `pace_every` frames it sleeps `pace` so the receiving veth's ring
/// never overflows. Returns the number of frames sent.
pub fn send_frames(
    ns: &Netns,
    dev: &str,
    frames: Vec<Vec<u8>>,
    repeat: usize,
    pace_every: usize,
    pace: Duration,
) -> Result<u64> {
    let dev = dev.to_string();
    ns.run(move || -> Result<u64> {
        // SAFETY: plain socket syscalls with valid arguments.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            let c = std::ffi::CString::new(dev.clone()).unwrap();
            let ifindex = libc::if_nametoindex(c.as_ptr());
            if ifindex == 0 {
                libc::close(fd);
                bail!("no interface {dev}");
            }
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            let mut sent = 0u64;
            for _ in 0..repeat {
                for f in &frames {
                    let n = libc::sendto(
                        fd,
                        f.as_ptr() as *const libc::c_void,
                        f.len(),
                        0,
                        &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                        size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if n != f.len() as isize {
                        let e = std::io::Error::last_os_error();
                        libc::close(fd);
                        bail!("sendto on {dev} after {sent} frames: {e}");
                    }
                    sent += 1;
                    if pace_every > 0 && sent.is_multiple_of(pace_every as u64) {
                        std::thread::sleep(pace);
                    }
                }
            }
            libc::close(fd);
            Ok(sent)
        }
    })?
}

/// Agent flags: `--iface` for each of `iface`, native XDP unless `extra`
/// picks the capture, then `extra`.
pub fn iface_args<'a>(iface: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = Vec::new();
    for i in iface {
        a.push("--iface");
        a.push(*i);
    }
    // Native XDP, unless the test counts ingress with TC or AF_XDP.
    if !extra.contains(&"--capture") {
        a.extend_from_slice(&["--xdp-mode", "native"]);
    }
    a.extend_from_slice(extra);
    a
}

/// Agent flags shared by the tests: [`iface_args`] with the sampler
/// address 192.0.2.10; timeouts long enough that only shutdown exports
/// (unless `extra` says otherwise).
pub fn agent_args<'a>(iface: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    iface_args(
        iface,
        &[&["--sampler-address", "192.0.2.10"], extra].concat(),
    )
}

/// Agent flags of a Kafka sink to `topic` on `brokers` (sampler address
/// 192.0.2.20), then `extra`.
pub fn kafka_agent_args<'a>(
    dev: &'a str,
    brokers: &'a str,
    topic: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let sink = [
        "--sampler-address",
        "192.0.2.20",
        "--kafka-brokers",
        brokers,
        "--kafka-topic",
        topic,
    ];
    iface_args(&[dev], &[&sink, extra].concat())
}

/// `--active-timeout`, `--idle-timeout` and `--drain-interval` flags.
pub fn timeouts<'a>(active: &'a str, idle: &'a str, drain: &'a str) -> [&'a str; 6] {
    [
        "--active-timeout",
        active,
        "--idle-timeout",
        idle,
        "--drain-interval",
        drain,
    ]
}

/// A tiny flow table: 8 entries, 8 cache slots (flows evicted from the
/// cache meet the full table, and the full ring too) and a one-page
/// fallback ring (46 events of 88 bytes).
pub const TINY_TABLE: [&str; 6] = [
    "--max-flows",
    "8",
    "--cache-slots",
    "8",
    "--fallback-ring-bytes",
    "4096",
];

/// Path of the `flowexport` binary under test: $FLOWEXPORT_BIN, else the
/// one cargo built next to this test executable.
pub fn flowexport_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOWEXPORT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/flowexport
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("flowexport");
    assert!(
        p.is_file(),
        "{} not found: build it first (`cargo build --bins`) or set FLOWEXPORT_BIN",
        p.display()
    );
    p
}

/// A running `flowexport agent` (or `collect`) inside a namespace. Killed on drop.
pub struct Agent {
    child: Option<Child>,
    stdout: Option<std::thread::JoinHandle<Vec<String>>>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
    ns_name: String,
    /// The pin directory the harness gave an agent (not one a test chose):
    /// removed on drop, so that a killed agent's pinned maps go.
    own_pins: Option<PathBuf>,
}

/// What a finished agent left behind.
pub struct AgentOutput {
    pub status: std::process::ExitStatus,
    pub records: Vec<Value>,
    pub stderr: String,
}

impl Agent {
    /// Starts `flowexport agent ARGS` in `ns` and waits until it reports that
    /// it is running (programs attached).
    pub fn start(ns: &Netns, args: &[&str]) -> Result<Agent> {
        Agent::start_command(ns, "agent", args, "flowexport agent running")
    }

    /// Starts `flowexport collect ARGS` in `ns` and waits until its sockets
    /// and metrics endpoint are up.
    pub fn collector(ns: &Netns, args: &[&str]) -> Result<Agent> {
        Agent::start_command(ns, "collect", args, "flowexport collector running")
    }

    /// Starts `flowexport COMMAND ARGS` and waits for `ready` on stderr.
    pub fn start_command(ns: &Netns, command: &str, args: &[&str], ready: &str) -> Result<Agent> {
        let mut agent = Agent::spawn_command(ns, command, args)?;
        agent.wait_ready(ready, command)?;
        Ok(agent)
    }

    /// `flowexport enrich` from topic `input` to `enriched` with a customer
    /// list and an ASN CSV, started and reading.
    pub fn start_enrich(ns: &Netns, brokers: &str, customers: &str, asn: &str) -> Result<Agent> {
        Agent::start_command(
            ns,
            "enrich",
            &[
                "--kafka-brokers",
                brokers,
                "--in-topic",
                "input",
                "--out-topic",
                "enriched",
                "--customers",
                customers,
                "--asn-csv",
                asn,
            ],
            "reading topic",
        )
    }

    /// `flowexport split` from topic `enriched` to per-customer topics
    /// `cust-<cid>`, started and reading.
    pub fn start_split(ns: &Netns, brokers: &str) -> Result<Agent> {
        Agent::start_command(
            ns,
            "split",
            &[
                "--kafka-brokers",
                brokers,
                "--in-topic",
                "enriched",
                "--topic-prefix",
                "cust-",
            ],
            "reading topic",
        )
    }

    /// Waits up to 30 s for `ready` on stderr.
    fn wait_ready(&mut self, ready: &str, command: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.stderr().contains(ready) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                bail!("{command} exited early ({status}): {}", self.stderr());
            }
            if Instant::now() > deadline {
                bail!("{command} not ready after 30s: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent without waiting for it (for start-up error tests).
    pub fn spawn(ns: &Netns, args: &[&str]) -> Result<Agent> {
        Agent::spawn_command(ns, "agent", args)
    }

    /// Starts `flowexport COMMAND ARGS` without waiting for it.
    pub fn spawn_command(ns: &Netns, command: &str, args: &[&str]) -> Result<Agent> {
        Agent::spawn_wrapped(ns, &[], command, args)
    }

    /// Starts `WRAPPER... flowexport agent ARGS` in `ns` (e.g. `setpriv`
    /// with a user and capabilities) and waits until it runs.
    pub fn start_wrapped(ns: &Netns, wrapper: &[&str], args: &[&str]) -> Result<Agent> {
        let mut agent = Agent::spawn_wrapped(ns, wrapper, "agent", args)?;
        agent.wait_ready("flowexport agent running", "agent")?;
        Ok(agent)
    }

    /// Starts `WRAPPER... flowexport COMMAND ARGS` in `ns`.
    pub fn spawn_wrapped(
        ns: &Netns,
        wrapper: &[&str],
        command: &str,
        args: &[&str],
    ) -> Result<Agent> {
        let bin = flowexport_bin();
        // Every agent pins its state (the default) in a directory of its own
        // on the harness's BPF filesystem, unless the test chose one:
        // `ip netns exec` hides the host's /sys/fs/bpf.
        let own_pins = if command == "agent" && !args.contains(&"--pin-dir") {
            Some(pin_dir()?)
        } else {
            None
        };
        let mut argv: Vec<String> = wrapper.iter().map(ToString::to_string).collect();
        argv.push(bin.display().to_string());
        argv.push(command.into());
        argv.extend(args.iter().map(ToString::to_string));
        if let Some(d) = &own_pins {
            argv.extend(["--pin-dir".into(), d.display().to_string()]);
        }
        Agent::spawn_argv(ns, &argv, own_pins)
    }

    /// Runs exactly `argv` in `ns` (a systemd unit's ExecStart, say, behind
    /// `setpriv`) and waits until the agent runs.
    pub fn start_argv(ns: &Netns, argv: &[String]) -> Result<Agent> {
        let mut agent = Agent::spawn_argv(ns, argv, None)?;
        agent.wait_ready("flowexport agent running", "agent")?;
        Ok(agent)
    }

    fn spawn_argv(ns: &Netns, argv: &[String], own_pins: Option<PathBuf>) -> Result<Agent> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(argv)
            // FLOWEXPORT_TEST_LOG=debug shows the agents' drain lines.
            .env(
                "RUST_LOG",
                std::env::var("FLOWEXPORT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {argv:?}"))?;
        let mut out = child.stdout.take().unwrap();
        // Read it all as bytes and split at the end: line by line, this
        // (unoptimized) reader would be what paces an agent exporting
        // hundreds of thousands of records through the pipe.
        let stdout = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = Read::read_to_end(&mut out, &mut all);
            String::from_utf8_lossy(&all)
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        });
        let err = child.stderr.take().unwrap();
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Agent {
            child: Some(child),
            stdout: Some(stdout),
            stderr_lines,
            ns_name: ns.name.clone(),
            own_pins,
        })
    }

    /// The process id (`ip netns exec` becomes the command).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (SIGHUP, say) and returns at once.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// SIGKILL, as a crash: nothing is flushed or committed.
    pub fn kill9(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr_lines.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM (unless the agent already exited), waits up to 30 s,
    /// and returns its status, parsed stdout records and stderr.
    pub fn stop(mut self) -> Result<AgentOutput> {
        let mut child = self.child.take().unwrap();
        if child.try_wait()?.is_none() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "agent did not exit within 30s of SIGTERM: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.output(status)
    }

    /// [`Agent::stop`], which must succeed: a clean exit.
    pub fn stop_ok(self) -> AgentOutput {
        let out = self.stop().unwrap();
        assert!(out.status.success(), "{}", out.stderr);
        out
    }

    /// The exited agent's status, parsed stdout records and stderr.
    fn output(&mut self, status: std::process::ExitStatus) -> Result<AgentOutput> {
        let lines = self.stdout.take().unwrap().join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut records = Vec::new();
        for l in lines {
            let v: Value = serde_json::from_str(&l)
                .with_context(|| format!("stdout line is not JSON: {l:?}"))?;
            records.push(v);
        }
        Ok(AgentOutput {
            status,
            records,
            stderr: self.stderr(),
        })
    }

    /// Waits for the agent to exit by itself (start-up errors, `--detach`).
    pub fn wait_exit(mut self, timeout: Duration) -> Result<AgentOutput> {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("agent still running after {timeout:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.output(status)
    }

    /// Runs `flowexport agent ARGS` in `ns` to its end, which must be a
    /// refusal (a failure exit) whose stderr says each of `says`; returns
    /// its output.
    pub fn refused(ns: &Netns, args: &[&str], says: &[&str]) -> AgentOutput {
        let out = Agent::spawn(ns, args)
            .unwrap()
            .wait_exit(Duration::from_secs(30))
            .unwrap();
        assert!(
            !out.status.success(),
            "{args:?} was accepted: {}",
            out.stderr
        );
        for s in says {
            assert!(
                out.stderr.contains(s),
                "{args:?}: no {s:?} in {}",
                out.stderr
            );
        }
        out
    }

    /// Fetches /metrics from the agent's default endpoint inside its namespace.
    pub fn metrics(&self, port: u16) -> Result<String> {
        fetch_metrics(&Netns::borrowed(&self.ns_name), port)
    }

    /// Scrapes the metrics on `port` until `ready` holds for the scrape, for
    /// up to `timeout`; whether it did, and the last scrape.
    pub fn wait_metrics(
        &self,
        port: u16,
        timeout: Duration,
        mut ready: impl FnMut(&str) -> bool,
    ) -> (bool, String) {
        let mut m = String::new();
        let ok = wait_until(timeout, || {
            m = self.metrics(port).unwrap_or_default();
            ready(&m)
        });
        (ok, m)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = &self.own_pins {
            // Removing the pins detaches what is left and frees the maps.
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Where the harness mounts a BPF filesystem for the agents' pins.
pub const TEST_BPF_FS: &str = "/run/flowexport-tests/bpf";

/// A new, empty directory on the harness's BPF filesystem (mounted at
/// [`TEST_BPF_FS`] the first time), writable by any user (the unprivileged
/// tests' agent runs as nobody).
pub fn pin_dir() -> Result<PathBuf> {
    static MOUNTED: Mutex<bool> = Mutex::new(false);
    let mut mounted = MOUNTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !*mounted {
        std::fs::create_dir_all(TEST_BPF_FS)?;
        let is_mount = Command::new("mountpoint")
            .args(["-q", TEST_BPF_FS])
            .status()
            .is_ok_and(|s| s.success());
        if !is_mount {
            sh(&["mount", "-t", "bpf", "bpf", TEST_BPF_FS])?;
        }
        sh(&["chmod", "0777", TEST_BPF_FS])?;
        *mounted = true;
    }
    let d = PathBuf::from(TEST_BPF_FS).join(unique("pins"));
    std::fs::create_dir(&d)?;
    sh(&["chmod", "0777", d.to_str().unwrap()])?;
    Ok(d)
}

/// Fetches /metrics from 127.0.0.1:`port` inside `ns`.
pub fn fetch_metrics(ns: &Netns, port: u16) -> Result<String> {
    ns.run(move || -> Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })?
}

/// The value of one metric sample (`name{labels} value`) in a scrape.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

/// Asserts that the sample `name` in the scrape `m` is `want`.
pub fn assert_metric(m: &str, name: &str, want: f64) {
    assert_eq!(metric(m, name), Some(want), "{name}:\n{m}");
}

/// Identity of a flow in the JSON records (everything but the counters).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowId {
    pub direction: u64,
    pub in_if: u64,
    pub out_if: u64,
    pub src: String,
    pub dst: String,
    pub proto: u64,
    pub src_port: u64,
    pub dst_port: u64,
    pub icmp_type: u64,
    pub icmp_code: u64,
    pub vlan_id: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
    pub tcp_flags: u64,
    pub records: u64,
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("record field {k} missing or not a number: {v}"))
}

impl FlowId {
    pub fn of(v: &Value) -> FlowId {
        FlowId {
            direction: u(v, "flow_direction"),
            in_if: u(v, "in_if"),
            out_if: u(v, "out_if"),
            src: v["src_addr"].as_str().unwrap().to_string(),
            dst: v["dst_addr"].as_str().unwrap().to_string(),
            proto: u(v, "proto"),
            src_port: u(v, "src_port"),
            dst_port: u(v, "dst_port"),
            icmp_type: u(v, "icmp_type"),
            icmp_code: u(v, "icmp_code"),
            vlan_id: u(v, "vlan_id"),
        }
    }

    /// Shorthand for the common case.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        direction: u64,
        ifindex: u32,
        src: &str,
        dst: &str,
        proto: u64,
        src_port: u64,
        dst_port: u64,
        vlan_id: u64,
    ) -> FlowId {
        let ifindex = ifindex as u64;
        FlowId {
            direction,
            in_if: if direction == 0 { ifindex } else { 0 },
            out_if: if direction == 1 { ifindex } else { 0 },
            src: src.to_string(),
            dst: dst.to_string(),
            proto,
            src_port,
            dst_port,
            icmp_type: 0,
            icmp_code: 0,
            vlan_id,
        }
    }

    pub fn icmp(mut self, ty: u64, code: u64) -> FlowId {
        self.icmp_type = ty;
        self.icmp_code = code;
        self
    }
}

/// Asserts that the flows (packets, bytes, OR of TCP flags) are exactly
/// `want`: no flow missing, none extra.
pub fn assert_flows(got: &BTreeMap<FlowId, Totals>, want: &[(FlowId, u64, u64, u64)]) {
    let want: BTreeMap<FlowId, (u64, u64, u64)> = want
        .iter()
        .map(|(id, p, b, f)| (id.clone(), (*p, *b, *f)))
        .collect();
    let got: BTreeMap<FlowId, (u64, u64, u64)> = got
        .iter()
        .map(|(id, t)| (id.clone(), (t.packets, t.bytes, t.tcp_flags)))
        .collect();
    assert_eq!(got, want, "flows (packets, bytes, tcp_flags) differ");
}

/// Sums records per flow (a flow may be split across active-timeout slices).
pub fn totals(records: &[Value]) -> BTreeMap<FlowId, Totals> {
    let mut m: BTreeMap<FlowId, Totals> = BTreeMap::new();
    for r in records {
        let t = m.entry(FlowId::of(r)).or_default();
        t.packets += u(r, "packets");
        t.bytes += u(r, "bytes");
        t.tcp_flags |= u(r, "tcp_flags");
        t.records += 1;
    }
    m
}

pub fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Runs `f` with a deadline; used to bound waits in tests.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
