//! Percentiles, and what /proc tells about a process (CPU, memory, open files).

use std::time::Duration;

/// The `p` quantile (0..=1) of `samples` in milliseconds, nearest rank; `None` if empty.
pub(crate) fn percentile(samples: &mut [f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    Some(samples[rank - 1])
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time (user + system) a process used so far, from /proc/{pid}/stat: all its
/// threads, those that ended too.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    proc_stat(pid).map(|s| ticks(s.own))
}

/// What /proc/{pid}/stat tells of a process's CPU, in clock ticks (see [`ticks`]).
pub(crate) struct ProcStat {
    pub(crate) ppid: u32,
    /// utime + stime: the process's threads.
    pub(crate) own: u64,
    /// cutime + cstime: its children that ended and were waited for.
    pub(crate) children: u64,
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 4 (ppid) and 14 to 17 (utime, stime, cutime, cstime) of the whole line
    // are 1 and 11 to 14 here (0-based).
    let field = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(ProcStat {
        ppid: u32::try_from(field(1)?).ok()?,
        own: field(11)? + field(12)?,
        children: field(13)? + field(14)?,
    })
}

/// Clock ticks as time. The kernel's USER_HZ (`sysconf(_SC_CLK_TCK)`) is 100 on every
/// Linux this runs on; asking would take the `libc` crate, which the bench does not use.
pub(crate) fn ticks(n: u64) -> Duration {
    Duration::from_millis(n * 10)
}

/// Peak resident set size (VmHWM) of a process, in MiB.
pub(crate) fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) of a process, in MiB.
pub(crate) fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// A `kB` field of /proc/{pid}/status, in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// File descriptors a process has open (the entries of /proc/{pid}/fd).
pub(crate) fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// CPU time of the whole machine (all cores, busy), from /proc/stat.
pub(crate) fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = values
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| *v)
        .sum();
    Some(ticks(busy))
}
