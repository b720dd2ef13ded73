//! trafgen (Debian's netsniff-ng) as a many-flow traffic source: 64-byte
//! UDP frames whose IPv4 source address cycles through N consecutive
//! addresses, one flow each, at the veth's full rate or a set rate. Only
//! ever sent out of a veth end the caller created inside its namespace.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::Netns;

/// UDP payload of the 64-byte frames (14 Ethernet + 20 IPv4 + 8 UDP + 22).
pub const PAYLOAD: usize = 22;
/// IP-layer bytes of one frame (what the agent counts per packet).
pub const IP_BYTES: u64 = 20 + 8 + PAYLOAD as u64;
/// The destination MAC of every frame: not the receiving veth's, so the
/// receiving stack drops the frames at once (XDP still sees them).
pub const FOREIGN_MAC: &str = "02:00:00:00:00:02";

/// N flows: sources `first_src` .. `first_src + flows - 1`, one destination,
/// UDP 40000 -> 5001.
#[derive(Clone, Copy, Debug)]
pub struct Flows {
    pub first_src: Ipv4Addr,
    pub flows: u32,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

impl Flows {
    pub fn new(first_src: Ipv4Addr, flows: u32, dst: Ipv4Addr) -> Flows {
        assert!(flows >= 1);
        Flows {
            first_src,
            flows,
            dst,
            sport: 40000,
            dport: 5001,
        }
    }

    /// The i-th flow's source address.
    pub fn src(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first_src) + i)
    }

    /// trafgen's packet configuration: `dinc` steps the source address once
    /// per packet and wraps after the last flow, so with one sending process
    /// (`-P 1`) packet k belongs to flow k mod N.
    pub fn config(&self) -> String {
        let lo = u32::from(self.first_src);
        let hi = lo + (self.flows - 1);
        // One flow: a fixed address (trafgen rejects an empty range).
        let saddr = if self.flows == 1 {
            self.first_src.to_string()
        } else {
            format!("dinc({lo}, {hi})")
        };
        format!(
            "{{ eth(da={FOREIGN_MAC}, sa=02:00:00:00:00:01), \
             ipv4(saddr={saddr}, daddr={}), \
             udp(sport={}, dport={}), fill(0x00, {PAYLOAD}) }}\n",
            self.dst, self.sport, self.dport
        )
    }
}

/// Sends `packets` frames of `flows` out of `dev` in `ns` with one trafgen
/// process through the qdisc path (`-q`; without it, a full veth ring fails
/// trafgen with EAGAIN); `rate_pps` limits the rate (None: as fast as it can). trafgen
/// leaves the system's socket-memory settings and IRQ affinities alone
/// (`--no-sock-mem -Q`). Returns when trafgen exits.
pub fn send(
    ns: &Netns,
    dev: &str,
    flows: &Flows,
    packets: u64,
    rate_pps: Option<u64>,
) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "fe-trafgen-{}-{}",
        std::process::id(),
        crate::unique("c")
    ));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("flows.cfg");
    std::fs::write(&cfg, flows.config())?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "trafgen", "--dev", dev, "--conf"])
        .arg(&cfg)
        .args([
            "-n",
            &packets.to_string(),
            "-P",
            "1",
            "-q",
            "--no-sock-mem",
            "-Q",
        ]);
    if let Some(r) = rate_pps {
        cmd.args(["-b", &format!("{r}pps")]);
    }
    let out = cmd
        .output()
        .context("running trafgen (Debian package netsniff-ng: scripts/setup.sh --test)")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "trafgen failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_cycles_the_source_over_the_flows() {
        let f = Flows::new(
            "10.0.0.0".parse().unwrap(),
            100_000,
            "10.201.200.1".parse().unwrap(),
        );
        assert_eq!(
            f.config(),
            "{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), \
             ipv4(saddr=dinc(167772160, 167872159), daddr=10.201.200.1), \
             udp(sport=40000, dport=5001), fill(0x00, 22) }\n"
        );
        assert_eq!(f.src(99_999).to_string(), "10.1.134.159");
    }
}
