//! CPU time and resident memory of a process, and the machine's steal time, read from `/proc`
//! (proc(5)).

use std::time::Duration;

use serde::Serialize;

/// One reading.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ProcSample {
    /// User + system CPU time so far (threads included).
    #[serde(serialize_with = "as_secs")]
    pub cpu: Duration,
    /// The system (kernel) part of `cpu`: system calls, and for UDP on loopback most of the
    /// packet's path through the network stack.
    #[serde(serialize_with = "as_secs")]
    pub system: Duration,
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kib: u64,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Reads `/proc/<pid>/stat` (utime and stime, fields 14 and 15) and `/proc/<pid>/status`
/// (`VmRSS`). `None` when the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = Duration::from_nanos((utime + stime) * 1_000_000_000 / ticks);
    let system = Duration::from_nanos(stime * 1_000_000_000 / ticks);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample { cpu, system, rss_kib })
}

/// All CPUs' time and the part of it the hypervisor stole, in clock ticks (the `cpu` line of
/// `/proc/stat`): a VM's vCPUs are sometimes not running at all, and nothing inside it is on
/// time then. Read before and after a run; see [`steal_since`].
pub fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    Some((fields.iter().take(8).sum(), *fields.get(7)?))
}

/// All CPUs' time and the part of it spent running anything (user, nice, system, irq, softirq),
/// in clock ticks, from the `cpu` line of `/proc/stat`: with the CPU time of the processes one
/// measures, it tells what else ran on the machine meanwhile.
pub fn busy_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let total = fields.iter().take(8).sum();
    // Busy: all but idle (3), iowait (4) and steal (7).
    let busy = fields.iter().take(7).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    Some((total, busy))
}

/// The share (%) of all CPU time stolen since `before` (a [`cpu_times`] reading).
pub fn steal_since(before: Option<(u64, u64)>) -> Option<f64> {
    cpu_times().zip(before).map(|((total, steal), (total0, steal0))| {
        steal.saturating_sub(steal0) as f64 * 100.0 / total.saturating_sub(total0).max(1) as f64
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let before = super::sample(std::process::id()).expect("our own /proc entry");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(150) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = super::sample(std::process::id()).expect("our own /proc entry");
        assert!(after.cpu > before.cpu, "150 ms of spinning shows as CPU time");
        assert!(after.rss_kib > 0);
        assert!(super::sample(u32::MAX).is_none());
    }

    #[test]
    fn steal_is_a_share_of_cpu_time() {
        let before = super::cpu_times();
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Some(steal) = super::steal_since(before) {
            assert!((0.0..=100.0).contains(&steal));
        }
    }
}
