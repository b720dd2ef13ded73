//! IPFIX and NetFlow v9 export over UDP to one collector per sink.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use super::{Sink, SinkError};
use crate::codec::netflow::encode::{ExportError, ExportProtocol, ExportStream};
use crate::record::FlowRecord;
use crate::timeconv::wall_ns;

/// Settings shared by every IPFIX / NetFlow v9 export stream.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    pub observation_domain: u32,
    pub max_packet: usize,
    pub template_interval_ms: u64,
    pub template_packets: u32,
    /// Most records per second to the collector (0: no limit).
    pub max_rate: u64,
    /// 1-in-N packet sampling the records' counts come from (1: none).
    pub sampling: u32,
    /// Records may come out of tunnels (AF_XDP, `--decap inner`): IPFIX
    /// carries their layer2SegmentId.
    pub segment_ids: bool,
}

pub struct IpfixSink {
    name: &'static str,
    stream: ExportStream,
    socket: UdpSocket,
    target: SocketAddr,
    pacer: Option<Pacer>,
}

/// A token bucket over records: at most `rate` a second, in bursts of up to
/// 10 ms worth (at least 1000 records), so that a large export reaches the
/// collector at a pace its socket buffer absorbs.
///
/// Beyond the burst the sender sleeps off its debt once it reaches
/// [`PACER_MIN_WAIT`] worth of records, not before every packet: each sleep
/// is a timer and a wake-up (at the default 250,000 records a second, a
/// sleep per 30-record packet would be 8,000 a second, `perf` put ~8% of
/// the drain thread's time at a million flows there).
struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// The shortest sleep of a [`Pacer`]: 2 ms (500 records at the default
/// rate, well within the burst a collector's socket buffer takes).
const PACER_MIN_WAIT: Duration = Duration::from_millis(2);

impl Pacer {
    fn new(rate: u64, now: Instant) -> Pacer {
        let burst = (rate as f64 / 100.0).max(1000.0);
        Pacer {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// How long to wait, at `now`, before sending `records` more.
    fn delay(&mut self, records: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= records;
        if self.tokens >= -self.rate * PACER_MIN_WAIT.as_secs_f64() {
            Duration::ZERO
        } else {
            // The debt is paid by the wait (tokens refill meanwhile).
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Why an IPFIX/NetFlow v9 sink could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IpfixSetupError {
    #[error("cannot resolve collector {target:?}: {source} (expected HOST:PORT)")]
    Resolve {
        target: String,
        source: std::io::Error,
    },
    #[error("collector {0:?} resolves to no address")]
    NoAddress(String),
    #[error("--export-packet-size: {0}")]
    PacketSize(#[from] ExportError),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
}

/// Resolves `HOST:PORT` once, at start.
pub fn resolve(target: &str) -> Result<SocketAddr, IpfixSetupError> {
    target
        .to_socket_addrs()
        .map_err(|source| IpfixSetupError::Resolve {
            target: target.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| IpfixSetupError::NoAddress(target.to_string()))
}

impl IpfixSink {
    pub fn new(
        protocol: ExportProtocol,
        target: SocketAddr,
        s: &ExportSettings,
    ) -> Result<IpfixSink, IpfixSetupError> {
        let boot_ms = wall_ns() / 1_000_000;
        let stream = ExportStream::new(
            protocol,
            s.observation_domain,
            s.max_packet,
            s.template_interval_ms,
            s.template_packets,
            boot_ms,
        )
        .and_then(|st| st.with_sampling(s.sampling))
        .and_then(|st| {
            if s.segment_ids {
                st.with_segment_ids()
            } else {
                Ok(st)
            }
        })?;
        let bind: SocketAddr = if target.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let socket = UdpSocket::bind(bind).map_err(IpfixSetupError::Socket)?;
        Ok(IpfixSink {
            name: match protocol {
                ExportProtocol::Ipfix => "ipfix",
                ExportProtocol::NetflowV9 => "netflow9",
            },
            stream,
            socket,
            target,
            pacer: (s.max_rate > 0).then(|| Pacer::new(s.max_rate, Instant::now())),
        })
    }
}

impl Sink for IpfixSink {
    fn name(&self) -> &'static str {
        self.name
    }

    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        let now_ms = wall_ns() / 1_000_000;
        let mut first_err = None;
        let packets = self.stream.encode(records, now_ms);
        let per_packet = records.len() as f64 / packets.len().max(1) as f64;
        for pkt in packets {
            if let Some(p) = self.pacer.as_mut() {
                let wait = p.delay(per_packet, Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
            if let Err(e) = self.socket.send_to(&pkt, self.target) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            None => Ok(()),
            Some(source) => Err(SinkError::Io {
                sink: self.name,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        // 100k records/s: bursts of 1000 (10 ms).
        let mut p = Pacer::new(100_000, t0);
        assert_eq!(p.delay(1000.0, t0), Duration::ZERO);
        // Up to 2 ms of debt (200 records) is let stand...
        assert_eq!(p.delay(150.0, t0), Duration::ZERO);
        // ...then the debt is slept off whole: 150 + 350 records owe 5 ms.
        let d = p.delay(350.0, t0);
        assert!((d.as_secs_f64() - 0.005).abs() < 1e-9, "{d:?}");
        // After waiting it out, 10 ms later a full burst is back.
        let t1 = t0 + Duration::from_millis(5);
        assert_eq!(p.delay(0.0, t1), Duration::ZERO);
        let t2 = t1 + Duration::from_millis(50);
        assert_eq!(p.delay(1000.0, t2), Duration::ZERO);
        assert!(p.delay(201.0, t2) > Duration::ZERO);
        // A million records at 100k/s take 10 s in all.
        let mut p = Pacer::new(100_000, t0);
        let mut t = t0;
        for _ in 0..(1_000_000 / 28) {
            t += p.delay(28.0, t);
        }
        let took = (t - t0).as_secs_f64();
        assert!((9.9..10.0).contains(&took), "{took}");
    }
}
