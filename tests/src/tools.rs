//! External programs the tests run beside flowexport: a child-process guard,
//! free ports, and nfcapd/nfdump (Debian's nfdump package) as the reference
//! NetFlow/IPFIX collector.

use std::collections::BTreeMap;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{wait_until, Netns};

pub fn free_tcp_port(ns: &Netns) -> u16 {
    ns.run(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
    .unwrap()
}

pub fn free_udp_port(ns: &Netns) -> u16 {
    ns.run(|| {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
    .unwrap()
}

/// Runs `cmd` to its end; it must succeed (`what` names it in the failure).
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sends `signal` to `child`, then waits up to 10 s for it to exit (killed
/// after).
pub fn stop_child(mut c: Child, signal: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// A child process in a namespace, killed on drop.
pub struct Proc(pub Option<Child>);

impl Proc {
    /// Starts `cmd` with its output discarded; `missing` is the panic
    /// message when it cannot start.
    pub fn spawn(cmd: &mut Command, missing: &str) -> Proc {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(missing);
        Proc(Some(child))
    }

    /// SIGTERM, then up to 10 s for the process to exit (killed after).
    pub fn term(&mut self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Sends `signal`, then waits up to 10 s for the process to exit
    /// (killed after).
    pub fn stop_with(&mut self, signal: i32) {
        if let Some(c) = self.0.take() {
            stop_child(c, signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn udp_listening(ns: &Netns, port: u16) -> bool {
    ns.exec(&["ss", "-Hlun", &format!("sport = :{port}")])
        .is_ok_and(|o| !o.trim().is_empty())
}

/// Bytes waiting in the receive queue of the UDP socket bound to `port` in
/// `ns` (None: no such socket).
pub fn udp_recv_queue(ns: &Netns, port: u16) -> Option<u64> {
    let out = ns
        .exec(&["ss", "-Hlun", &format!("sport = :{port}")])
        .ok()?;
    // Columns: State Recv-Q Send-Q Local Peer.
    out.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}

/// Datagrams the kernel dropped at the UDP socket bound to `port` in `ns`
/// (`ss -m`'s `d`; None: no such socket).
pub fn udp_drops(ns: &Netns, port: u16) -> Option<u64> {
    udp_skmem(ns, port, "d")
}

/// A field of `ss -m`'s socket memory for the first UDP socket on `port`
/// in `ns`, by its name (`d`: drops, `rb`: the receive buffer's limit, the
/// kernel's double of SO_RCVBUF).
pub fn udp_skmem(ns: &Netns, port: u16, field: &str) -> Option<u64> {
    let out = ns
        .exec(&["ss", "-Huanm", &format!("sport = :{port}")])
        .ok()?;
    let skmem = out.split("skmem:(").nth(1)?;
    let inner = skmem.split(')').next()?;
    inner
        .split(',')
        .find_map(|f| f.strip_prefix(field)?.parse().ok())
}

/// nfcapd writing into `dir`, listening on 127.0.0.1:`port` in `ns`; with
/// `repeat_to`, it also repeats every packet it receives, unchanged, to that
/// 127.0.0.1 port (nfcapd's `-R`), so a second collector sees the same stream.
pub fn nfcapd(ns: &Netns, dir: &std::path::Path, port: u16, repeat_to: Option<u16>) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "nfcapd", "-w"])
        .arg(dir)
        .args(["-p", &port.to_string(), "-b", "127.0.0.1"]);
    if let Some(r) = repeat_to {
        cmd.args(["-R", &format!("127.0.0.1/{r}")]);
    }
    let p = Proc::spawn(
        &mut cmd,
        "nfcapd (Debian package nfdump) must be installed: scripts/setup.sh --test",
    );
    assert!(
        wait_until(Duration::from_secs(10), || udp_listening(ns, port)),
        "nfcapd not listening"
    );
    p
}

/// nfdump's view of a directory: (src, dst, sport, dport, proto) ->
/// (packets, bytes, in, out), summed.
pub type NfKey = (String, String, u64, u64, String);
/// nfdump's totals per flow: (packets, bytes, in, out).
pub type NfMap = BTreeMap<NfKey, (u64, u64, u64, u64)>;
pub fn nfdump(dir: &std::path::Path) -> NfMap {
    let out = run_ok(
        Command::new("nfdump")
            .arg("-R")
            .arg(dir)
            .args(["-o", "csv"]),
        "nfdump",
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("csv header").split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    let (sa, da, sp, dp, pr, ipkt, ibyt, inn, outt) = (
        col("sa"),
        col("da"),
        col("sp"),
        col("dp"),
        col("pr"),
        col("ipkt"),
        col("ibyt"),
        col("in"),
        col("out"),
    );
    let mut m = BTreeMap::new();
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        if f.len() < header.len() {
            continue;
        }
        let n = |i: usize| f[i].trim().parse::<u64>().unwrap();
        let e = m
            .entry((
                f[sa].to_string(),
                f[da].to_string(),
                n(sp),
                n(dp),
                f[pr].to_string(),
            ))
            .or_insert((0, 0, 0, 0));
        e.0 += n(ipkt);
        e.1 += n(ibyt);
        e.2 = n(inn);
        e.3 = n(outt);
    }
    m
}
