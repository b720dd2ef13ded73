//! Exporter clocks to wall-clock time: sysUptime-relative (v5, v9,
//! IPFIX flowStart/EndSysUpTime) and NTP timestamps.

use super::NTP_UNIX_OFFSET;

/// Wall-clock ms of a sysUptime-relative timestamp `t`, given the export
/// time and the sysUptime in the same header. The age `uptime - t` is taken
/// modulo 2^32 as a signed value, so a flow that started before sysUptime
/// wrapped (every 49.7 days), or that an exporter stamped a little after its
/// header's uptime, still lands next to the export time instead of 49.7
/// days away.
pub(super) fn uptime_to_wall_ms(export_ms: u64, uptime: u32, t: u32) -> u64 {
    let age = uptime.wrapping_sub(t) as i32 as i64;
    (export_ms as i64 - age).max(0) as u64
}

/// IPFIX flowStart/EndSysUpTime (`t`, ms since systemInitTimeMilliseconds
/// `init`) as wall-clock ms. The counter is 32 bits, so of `init + t` and
/// its neighbours 2^32 ms away, the one nearest the export time is taken:
/// right after the counter wraps, and for softflowd reading a pcap file,
/// whose flows predate its own init time.
pub(super) fn sysuptime_to_wall_ms(export_ms: u64, init: u64, t: u64) -> u64 {
    // i128: both inputs are arbitrary 64-bit field values from the wire.
    let a = init as i128 + t as i128;
    let e = export_ms as i128;
    [a - (1 << 32), a, a + (1 << 32)]
        .into_iter()
        .min_by_key(|x| (x - e).abs())
        .expect("three candidates")
        .clamp(0, u64::MAX as i128) as u64
}

pub(super) fn ntp_to_unix_ns(v: u64) -> u64 {
    let secs = (v >> 32).saturating_sub(NTP_UNIX_OFFSET);
    let frac = ((v & 0xffff_ffff) * 1_000_000_000) >> 32;
    secs * 1_000_000_000 + frac
}
