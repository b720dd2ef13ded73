//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock time.

/// `wall_ns - mono_ns`, sampled at one instant; add it to a monotonic time to
/// get the wall-clock time of the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClockOffset {
    offset_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out-pointer.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(
        rc, 0,
        "clock_gettime cannot fail for CLOCK_MONOTONIC/REALTIME"
    );
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Current CLOCK_MONOTONIC in nanoseconds: the kernel programs' clock.
pub(crate) fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

/// Current wall-clock time in nanoseconds since the epoch.
pub(crate) fn wall_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME) as u64
}

impl ClockOffset {
    /// Samples both clocks now. The monotonic clock is read on both sides of
    /// the wall clock and averaged, which bounds the error by half the time
    /// between the reads (well under a microsecond).
    pub(crate) fn now() -> ClockOffset {
        let m1 = clock_ns(libc::CLOCK_MONOTONIC);
        let w = clock_ns(libc::CLOCK_REALTIME);
        let m2 = clock_ns(libc::CLOCK_MONOTONIC);
        ClockOffset {
            offset_ns: w - (m1 + m2) / 2,
        }
    }

    /// The offset for one simultaneous pair of readings.
    #[cfg(test)]
    pub(crate) fn from_pair(mono_ns: u64, wall_ns: u64) -> ClockOffset {
        ClockOffset {
            offset_ns: wall_ns as i128 - mono_ns as i128,
        }
    }

    /// Wall-clock nanoseconds for a monotonic timestamp; 0 stays 0 (unknown),
    /// and a result before the epoch clamps to 0.
    pub(crate) fn to_wall_ns(self, mono_ns: u64) -> u64 {
        if mono_ns == 0 {
            return 0;
        }
        (mono_ns as i128 + self.offset_ns).clamp(0, u64::MAX as i128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_offset_converts_exactly() {
        let c = ClockOffset::from_pair(5_000_000_000, 1_763_800_000_123_456_789);
        assert_eq!(c.to_wall_ns(5_000_000_000), 1_763_800_000_123_456_789);
        assert_eq!(c.to_wall_ns(6_000_000_001), 1_763_800_001_123_456_790);
        assert_eq!(c.to_wall_ns(4_000_000_000), 1_763_799_999_123_456_789);
        assert_eq!(c.to_wall_ns(0), 0);
    }

    #[test]
    fn clamps_before_epoch() {
        let c = ClockOffset::from_pair(10_000, 5_000);
        assert_eq!(c.to_wall_ns(1_000), 0);
    }

    #[test]
    fn live_offset_matches_clocks() {
        let c = ClockOffset::now();
        let mono = monotonic_ns();
        let wall = wall_ns();
        let est = c.to_wall_ns(mono);
        // Both readings are microseconds apart; allow 50 ms for a loaded CI box.
        assert!(est.abs_diff(wall) < 50_000_000, "est {est} wall {wall}");
    }
}
