//! CPU time by process over a stretch of a run: named processes (the ingress, the
//! bench itself) and the servers of the local services, each found as the process
//! listening on its port with every process under it (PostgreSQL's backends), against
//! the whole machine's.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::stats::{ProcStat, machine_busy, proc_stat, ticks};

/// Processes counted together.
pub(crate) struct Group {
    pub(crate) key: &'static str,
    pub(crate) label: &'static str,
    roots: Vec<u32>,
    /// Whether the processes under the roots count too: a server's, yes; not the
    /// bench process's, whose child is the ingress.
    tree: bool,
}

impl Group {
    /// One process, all its threads.
    pub(crate) fn process(key: &'static str, label: &'static str, pid: u32) -> Self {
        Self {
            key,
            label,
            roots: vec![pid],
            tree: false,
        }
    }

    /// The server listening on TCP `port` here and every process under it; `None`
    /// when no process of this machine listens there.
    pub(crate) fn server(key: &'static str, label: &'static str, port: u16) -> Option<Self> {
        let roots = listeners(port);
        (!roots.is_empty()).then_some(Self {
            key,
            label,
            roots,
            tree: true,
        })
    }

    /// The group's processes in `procs`.
    fn members(&self, procs: &HashMap<u32, ProcStat>) -> Vec<u32> {
        let mut members: Vec<u32> = self
            .roots
            .iter()
            .copied()
            .filter(|p| procs.contains_key(p))
            .collect();
        if self.tree {
            let mut seen: HashSet<u32> = members.iter().copied().collect();
            let mut i = 0;
            while let Some(&parent) = members.get(i) {
                for (&pid, stat) in procs {
                    if stat.ppid == parent && seen.insert(pid) {
                        members.push(pid);
                    }
                }
                i += 1;
            }
        }
        members
    }

    /// Own and reaped children's ticks of the members: a member that ends between two
    /// snapshots moves its time into its parent's children's ticks, so the difference
    /// of two sums is what the group used in between, even as backends come and go.
    fn ticks(&self, procs: &HashMap<u32, ProcStat>) -> u64 {
        self.members(procs)
            .iter()
            .filter_map(|p| procs.get(p))
            .map(|s| s.own + s.children)
            .sum()
    }
}

/// The counters at the start of a measured stretch.
pub(crate) struct Started {
    groups: Vec<Group>,
    at: Instant,
    procs: HashMap<u32, ProcStat>,
    busy: Option<Duration>,
}

/// What a stretch used: each group's CPU, the machine's busy CPU, the wall time.
pub(crate) struct Used {
    pub(crate) groups: Vec<(Group, Duration)>,
    pub(crate) busy: Option<Duration>,
    pub(crate) wall: Duration,
}

pub(crate) fn start(groups: Vec<Group>) -> Started {
    Started {
        groups,
        at: Instant::now(),
        procs: processes(),
        busy: machine_busy(),
    }
}

impl Started {
    pub(crate) fn finish(self) -> Used {
        let wall = self.at.elapsed();
        let procs = processes();
        let busy = match (self.busy, machine_busy()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let groups = self
            .groups
            .into_iter()
            .map(|g| {
                let used = g.ticks(&procs).saturating_sub(g.ticks(&self.procs));
                (g, ticks(used))
            })
            .collect();
        Used { groups, busy, wall }
    }
}

/// Every process of the machine now.
fn processes() -> HashMap<u32, ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .collect()
}

/// The processes holding a socket listening on TCP `port` (IPv4 or IPv6).
fn listeners(port: u16) -> Vec<u32> {
    let inodes: HashSet<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| listening_inode(line, port))
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut pids: Vec<u32> = processes()
        .into_keys()
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .any(|target| {
                        target
                            .to_str()
                            .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']'))
                            .is_some_and(|inode| inodes.contains(inode))
                    })
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The socket inode of a /proc/net/tcp line when it listens (state 0A) on `port`.
fn listening_inode(line: &str, port: u16) -> Option<String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local_port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
    let inode = fields.get(9)?;
    (local_port == port && *fields.get(3)? == "0A").then(|| (*inode).to_owned())
}

/// The port of a service URL (`postgres://user@host:5432/db`); `None` without one.
pub(crate) fn port_of(url: &str) -> Option<u16> {
    reqwest::Url::parse(url).ok()?.port()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_port(url: &str, expected: Option<u16>) {
        assert_eq!(port_of(url), expected, "{url}");
    }

    #[test]
    fn the_port_of_a_service_url() {
        check_port("postgres://postgres@127.0.0.1:5432/refreshd", Some(5432));
        check_port("redis://127.0.0.1:6379/0", Some(6379));
        check_port("amqp://guest:guest@127.0.0.1:5672/%2f", Some(5672));
        check_port("amqp://guest:guest@[::1]:5673", Some(5673));
        check_port("postgres://localhost/refreshd", None);
        check_port("not a url", None);
    }

    fn check_line(line: &str, port: u16, expected: Option<&str>) {
        assert_eq!(listening_inode(line, port).as_deref(), expected, "{line}");
    }

    #[test]
    fn a_listening_socket_in_proc_net_tcp() {
        let listening = "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 24513 1 0000000000000000 100 0 0 10 0";
        let connected = "   3: 0100007F:18EB 0100007F:C35A 01 00000000:00000000 00:00000000 00000000     0        0 99812 1 0000000000000000 20 4 30 10 -1";
        check_line(listening, 6379, Some("24513"));
        check_line(listening, 5432, None);
        check_line(connected, 6379, None);
        check_line("  sl  local_address rem_address   st", 6379, None);
    }
}
