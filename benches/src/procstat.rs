//! What a run costs, read from /proc: CPU time and peak memory of a process
//! tree (an exporter and the processes it forks), and the system's softirq
//! time (where XDP programs and the receive path run).

use std::time::Duration;

/// Clock ticks per second of /proc's CPU times.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Processes of the session led by `leader` (exporters are started with
/// `setsid`, so the session is the exporter and everything it forks).
fn session(leader: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            // Field 6 of stat (index 3 after the name): the session id.
            stat_fields(pid)
                .and_then(|f| f.get(3)?.parse::<u32>().ok())
                .is_some_and(|sid| sid == leader)
        })
        .collect()
}

/// User + system CPU time of the live processes of `leader`'s session.
pub(crate) fn tree_cpu(leader: u32) -> Duration {
    let ticks: u64 = session(leader)
        .into_iter()
        .filter_map(|pid| {
            let f = stat_fields(pid)?;
            // utime and stime: fields 14 and 15 (indices 11, 12 here).
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    Duration::from_secs_f64(ticks as f64 / ticks_per_sec())
}

/// A field of /proc/PID/status in kB (VmHWM, RssAnon, ...).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Anonymous resident memory (RssAnon: the process's own heap, not shared
/// mappings) of `leader`'s session, summed, in bytes.
pub(crate) fn tree_rss_anon(leader: u32) -> u64 {
    session(leader)
        .into_iter()
        .filter_map(|pid| status_kb(pid, "RssAnon:"))
        .sum::<u64>()
        * 1024
}

/// Softirq time of all CPUs since boot (/proc/stat).
pub(crate) fn softirq() -> Duration {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks = s
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(7)?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / ticks_per_sec())
}

/// Quantile `q` (0..1) of `xs` (sorted copy), or 0 for none.
pub(crate) fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i]
}

/// "lo–hi" of a set of repeated measurements (one value: just it).
pub(crate) fn range(xs: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() {
        "–".into()
    } else if fmt(lo) == fmt(hi) {
        fmt(lo)
    } else {
        format!("{}–{}", fmt(lo), fmt(hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_ranges() {
        let xs = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&xs, 0.5), 3.0);
        assert_eq!(quantile(&xs, 0.99), 5.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(range(&xs, |x| format!("{x:.0}")), "1–5");
        assert_eq!(range(&[2.0, 2.0], |x| format!("{x:.0}")), "2");
    }

    #[test]
    fn own_process_is_its_session_or_not() {
        // Our own CPU time is readable (we may not lead a session).
        let me = std::process::id();
        assert!(stat_fields(me).is_some());
        assert!(status_kb(me, "VmHWM:").is_some_and(|kb| kb > 0));
        assert!(softirq() >= Duration::ZERO);
    }
}
