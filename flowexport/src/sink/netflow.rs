//! IPFIX and NetFlow v9 export over UDP to one collector per sink.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};

use super::{Sink, SinkError};
use crate::codec::export::{ExportProtocol, ExportStream};
use crate::record::FlowRecord;
use crate::timeconv::wall_ns;

/// Settings shared by every IPFIX / NetFlow v9 export stream.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    pub observation_domain: u32,
    pub max_packet: usize,
    pub template_interval_ms: u64,
    pub template_packets: u32,
}

pub struct FlowExportSink {
    name: &'static str,
    stream: ExportStream,
    socket: UdpSocket,
    target: SocketAddr,
}

/// Resolves `HOST:PORT` once, at start.
pub fn resolve(target: &str) -> Result<SocketAddr, String> {
    target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve collector {target:?}: {e} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| format!("collector {target:?} resolves to no address"))
}

impl FlowExportSink {
    pub fn new(
        protocol: ExportProtocol,
        target: SocketAddr,
        s: &ExportSettings,
    ) -> Result<FlowExportSink, String> {
        let boot_ms = wall_ns() / 1_000_000;
        let stream = ExportStream::new(
            protocol,
            s.observation_domain,
            s.max_packet,
            s.template_interval_ms,
            s.template_packets,
            boot_ms,
        )
        .map_err(|e| format!("--export-packet-size: {e}"))?;
        let bind: SocketAddr = if target.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let socket = UdpSocket::bind(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        Ok(FlowExportSink {
            name: match protocol {
                ExportProtocol::Ipfix => "ipfix",
                ExportProtocol::NetflowV9 => "netflow9",
            },
            stream,
            socket,
            target,
        })
    }
}

impl Sink for FlowExportSink {
    fn name(&self) -> &'static str {
        self.name
    }

    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        let now_ms = wall_ns() / 1_000_000;
        let mut first_err = None;
        for pkt in self.stream.encode(records, now_ms) {
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
