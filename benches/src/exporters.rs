//! The exporters a benchmark runs on the receiving end of a veth pair: the
//! agent, softflowd, fprobe and pmacctd (nfprobe), each started in its own
//! session (so its CPU time and memory, children included, can be read) and
//! stopped so that it exports everything it holds.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::Ebpf;
use flowexport_tests::{tools, wait_until, Netns};

/// Which exporter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Nothing attached: the receive path alone.
    ReceiveOnly,
    /// A benchmark program on an ingress hook the agent uses, nothing
    /// else: what the hook itself, or a part of the agent's work there,
    /// costs the receive path (a floor of any program doing that work).
    Floor(Floor),
    /// `flowexport agent` with these extra flags.
    Agent(Vec<String>),
    Softflowd,
    Fprobe,
    Pmacctd,
}

/// A benchmark-object program for [`Kind::Floor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Floor {
    /// XDP_PASS in native (driver) XDP: the hook alone.
    XdpEmpty,
    /// TC_ACT_UNSPEC through TCX ingress: the hook alone.
    TcEmpty,
    /// TC ingress parsing each packet's headers as the agent does.
    TcParse,
    /// `TcParse` plus the packet's time through bpf_ktime_get_ns().
    TcParseClock,
}

impl Floor {
    /// The program's name in the benchmark object.
    fn program(self) -> &'static str {
        match self {
            Floor::XdpEmpty => "flowexport_bench_pass",
            Floor::TcEmpty => "flowexport_bench_tc_pass",
            Floor::TcParse => "flowexport_bench_tc_parse",
            Floor::TcParseClock => "flowexport_bench_tc_parse_clock",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Floor::XdpEmpty => "empty XDP program",
            Floor::TcEmpty => "empty TC program",
            Floor::TcParse => "TC program: parse only",
            Floor::TcParseClock => "TC program: parse + clock helper",
        }
    }
}

impl Kind {
    /// Whether this is a baseline of the receive path (nothing exports).
    pub(crate) fn is_baseline(&self) -> bool {
        matches!(self, Kind::ReceiveOnly | Kind::Floor(_))
    }

    pub(crate) fn name(&self) -> String {
        match self {
            Kind::ReceiveOnly => "receive-only".into(),
            Kind::Floor(f) => f.name().into(),
            Kind::Agent(a) if a.is_empty() => "flowexport".into(),
            Kind::Agent(a) => format!("flowexport {}", a.join(" ")),
            Kind::Softflowd => "softflowd".into(),
            Kind::Fprobe => "fprobe".into(),
            Kind::Pmacctd => "pmacctd".into(),
        }
    }
}

/// Where the exporter's flows go.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Output {
    /// The agent's JSON lines, into a file.
    Stdout,
    /// NetFlow (v9; fprobe: v5) to nfcapd on 127.0.0.1:port in the namespace.
    Nfcapd(u16),
}

/// CPU time and peak memory of a finished exporter (children included).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    pub cpu: Duration,
    pub max_rss: u64,
}

/// A running exporter.
pub(crate) struct Running {
    pub kind: Kind,
    pid: Option<u32>,
    pub dir: PathBuf,
    ns: String,
    /// [`Kind::Floor`]: the loaded object, whose link keeps the program
    /// attached until it is dropped.
    floor: Option<Ebpf>,
}

/// Loads the benchmark object's program for `floor` and attaches it to
/// `dev` in `ns` (native XDP, or TC ingress).
fn attach_floor(ns: &Netns, dev: &str, floor: Floor) -> Result<Ebpf> {
    let path = flowexport_benches::BENCH_OBJECT;
    let dev = dev.to_string();
    ns.run(move || -> Result<Ebpf> {
        let mut ebpf = Ebpf::load_file(path)
            .with_context(|| format!("loading {path} (`cargo xtask bench peers` builds it)"))?;
        let name = floor.program();
        let prog = ebpf
            .program_mut(name)
            .with_context(|| format!("no {name} in the benchmark object"))?;
        // Each kind's link id is dropped: the Ebpf object owns the link.
        let attached = match floor {
            Floor::XdpEmpty => {
                let p: &mut Xdp = prog.try_into()?;
                p.load()?;
                p.attach(&dev, XdpMode::Driver).map(drop)
            }
            Floor::TcEmpty | Floor::TcParse | Floor::TcParseClock => {
                let p: &mut SchedClassifier = prog.try_into()?;
                p.load()?;
                p.attach(&dev, TcAttachType::Ingress).map(drop)
            }
        };
        attached.with_context(|| format!("attaching {name} to {dev}"))?;
        Ok(ebpf)
    })?
}

fn wait_file_contains(path: &Path, what: &str, timeout: Duration) -> bool {
    wait_until(timeout, || {
        std::fs::read_to_string(path).is_ok_and(|s| s.contains(what))
    })
}

impl Running {
    /// Starts `kind` in `ns` on `dev` and waits until it captures. Files
    /// (output, logs, configuration) go to `dir`.
    pub(crate) fn start(
        kind: Kind,
        ns: &Netns,
        dev: &str,
        out: Output,
        dir: &Path,
    ) -> Result<Running> {
        std::fs::create_dir_all(dir)?;
        let mut r = Running {
            kind: kind.clone(),
            pid: None,
            dir: dir.to_path_buf(),
            ns: ns.name.clone(),
            floor: None,
        };
        let target = match out {
            Output::Nfcapd(p) => format!("127.0.0.1:{p}"),
            Output::Stdout => String::new(),
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]);
        match &kind {
            Kind::ReceiveOnly => return Ok(r),
            Kind::Floor(floor) => {
                r.floor = Some(attach_floor(ns, dev, *floor)?);
                return Ok(r);
            }
            Kind::Agent(extra) => {
                cmd.arg("env")
                    .arg("RUST_LOG=info,flowexport::drain=debug")
                    .arg(flowexport_benches::util::flowexport_bin()?)
                    .args(["agent", "--iface", dev])
                    // `ip netns exec` hides /sys/fs/bpf; nothing needs to
                    // outlive a benchmark run.
                    .args(["--pin-dir", "none"]);
                cmd.args(["--sampler-address", "192.0.2.10"]).args(extra);
                if let Output::Nfcapd(_) = out {
                    cmd.args(["--netflow9", &target]);
                }
            }
            Kind::Softflowd => {
                // Foreground, NetFlow v9, room for every flow (default 8192),
                // a control socket to flush it with.
                cmd.args(["softflowd", "-d", "-i", dev, "-n", &target, "-v", "9"])
                    .args(["-m", "4000000", "-c"])
                    .arg(dir.join("softflowd.ctl"))
                    .arg("-p")
                    .arg(dir.join("softflowd.pid"));
            }
            Kind::Fprobe => {
                // Foreground (`-l 2`), a pending queue long enough for max
                // rate (`-q`), NetFlow v5 (fprobe has no v9).
                cmd.args(["fprobe", "-l", "2", "-q", "100000", "-i", dev, "-f", "udp"])
                    .arg(&target);
            }
            Kind::Pmacctd => {
                let conf = dir.join("pmacctd.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "daemonize: false\npcap_interface: {dev}\npcap_filter: udp\n\
                         plugins: nfprobe\nnfprobe_receiver: {target}\nnfprobe_version: 9\n\
                         nfprobe_maxflows: 4000000\n\
                         plugin_pipe_size: 268435456\nplugin_buffer_size: 1048576\n\
                         pidfile: {}\n",
                        dir.join("pmacctd.pid").display()
                    ),
                )?;
                cmd.arg("pmacctd").arg("-f").arg(&conf);
            }
        }
        let stdout = std::fs::File::create(dir.join("stdout"))?;
        let stderr = std::fs::File::create(dir.join("stderr"))?;
        // SAFETY: setsid in the child before exec: its own session, so that
        // its processes can be found and summed.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", kind.name()))?;
        r.pid = Some(child.id());
        // The Child handle is dropped: the process is reaped with wait4 in
        // stop(), for its resource usage.
        std::mem::forget(child);
        let ready = match kind {
            Kind::Agent(_) => wait_file_contains(
                &dir.join("stderr"),
                "flowexport agent running",
                Duration::from_secs(60),
            ),
            _ => wait_until(Duration::from_secs(10), || {
                ns.exec(&["ss", "-H", "-0", "-a"])
                    .is_ok_and(|o| o.contains(dev))
            }),
        };
        if !ready {
            let err = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
            r.stop()?;
            bail!("{} did not start: {err}", kind.name());
        }
        Ok(r)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Stops the exporter so that it exports every flow it holds, waits for
    /// it (up to 5 minutes) and returns its resource usage.
    pub(crate) fn stop(&mut self) -> Result<Usage> {
        // Detaches a floor program.
        self.floor = None;
        let Some(pid) = self.pid.take() else {
            return Ok(Usage::default());
        };
        match self.kind {
            Kind::Softflowd => {
                let ctl = self.dir.join("softflowd.ctl");
                let _ = Netns::borrowed(&self.ns).exec(&[
                    "softflowctl",
                    "-c",
                    ctl.to_str().unwrap(),
                    "shutdown",
                ]);
            }
            // pmacctd's plugins export on SIGINT.
            Kind::Pmacctd => signal(pid, libc::SIGINT),
            _ => signal(pid, libc::SIGTERM),
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid; wait4 on our own child.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let rc = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut ru) };
            if rc == pid as i32 {
                let tv = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
                };
                return Ok(Usage {
                    cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
                    max_rss: ru.ru_maxrss as u64 * 1024,
                });
            }
            if rc < 0 {
                bail!(
                    "waiting for {}: {}",
                    self.kind.name(),
                    std::io::Error::last_os_error()
                );
            }
            if Instant::now() > deadline {
                signal(pid, libc::SIGKILL);
                bail!("{} did not exit within 5 minutes", self.kind.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, sig) };
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            signal(pid, libc::SIGKILL);
            let mut status = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        }
    }
}

/// nfcapd in `ns` on 127.0.0.1:`port`, its files in `dir`, with the largest
/// socket buffer the namespace allows (an exporter's final flush of a
/// million flows arrives in a burst).
pub(crate) fn nfcapd(ns: &Netns, dir: &Path, port: u16) -> Result<tools::Proc> {
    std::fs::create_dir_all(dir)?;
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nfcapd", "-w"])
        .arg(dir)
        .args(["-p", &port.to_string(), "-b", "127.0.0.1", "-B", "16777216"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("nfcapd (Debian package nfdump) must be installed: scripts/setup.sh --test")?;
    let p = tools::Proc(Some(child));
    if !wait_until(Duration::from_secs(10), || tools::udp_listening(ns, port)) {
        bail!("nfcapd not listening");
    }
    Ok(p)
}

/// UDP datagrams the namespace's sockets dropped for a full receive buffer
/// (`Udp: RcvbufErrors`).
pub(crate) fn udp_rcvbuf_errors(ns: &Netns) -> u64 {
    ns.snmp("Udp", "RcvbufErrors").unwrap_or(0)
}

/// Stops nfcapd once its socket has been empty for a moment (the last
/// datagrams processed) and returns nfdump's view of its files.
pub(crate) fn finish_nfcapd(
    ns: &Netns,
    mut p: tools::Proc,
    dir: &Path,
    port: u16,
) -> Result<tools::NfMap> {
    let mut quiet = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while quiet < 5 && Instant::now() < deadline {
        if tools::udp_recv_queue(ns, port) == Some(0) {
            quiet += 1;
        } else {
            quiet = 0;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    p.term();
    Ok(tools::nfdump(dir))
}
