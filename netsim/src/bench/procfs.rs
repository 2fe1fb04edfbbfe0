//! What the benchmark reads from `/proc`: the machine (CPU model, cores, memory, kernel), the
//! machine's CPU time by state (`/proc/stat`), and per process its CPU time (`/proc/PID/stat`)
//! and peak resident set (`/proc/PID/status`).
//! The parsers are pure functions of the file's text, so they are tested on samples.

use serde::Serialize;

/// `AT_CLKTCK` in the auxiliary vector: the unit of utime and stime in `/proc/PID/stat`.
const AT_CLKTCK: u64 = 17;
const AT_NULL: u64 = 0;

/// The machine a benchmark ran on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    /// Logical CPUs listed in /proc/cpuinfo.
    pub cores: usize,
    pub memory_bytes: u64,
    /// /proc/sys/kernel/osrelease.
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let (cpu_model, cores) = parse_cpuinfo(&cpuinfo);
        Self {
            cpu_model: cpu_model.unwrap_or_else(|| "unknown".to_string()),
            cores: if cores > 0 {
                cores
            } else {
                std::thread::available_parallelism().map_or(0, |n| n.get())
            },
            memory_bytes: parse_kib_field(&meminfo, "MemTotal").unwrap_or(0) * 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|k| k.trim().to_string())
                .unwrap_or_else(|_| "unknown".to_string()),
        }
    }
}

/// The first `model name` and the number of `processor` entries of /proc/cpuinfo.
pub fn parse_cpuinfo(text: &str) -> (Option<String>, usize) {
    let mut model = None;
    let mut cores = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "processor" => cores += 1,
            "model name" if model.is_none() => model = Some(value.trim().to_string()),
            _ => {}
        }
    }
    (model, cores)
}

/// A `Key:   1234 kB` field of /proc/meminfo or /proc/PID/status, in KiB.
pub fn parse_kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

/// utime + stime, in clock ticks, from the text of /proc/PID/stat. The command name (field
/// 2) is in parentheses and may itself hold spaces and parentheses, so fields are counted
/// from the last `)`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The machine's CPU time by state since boot, summed over all CPUs, in clock ticks: the
/// `cpu` line of /proc/stat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// Waiting for nothing (idle).
    pub idle: u64,
    /// Idle with disk I/O outstanding.
    pub iowait: u64,
    /// Everything else: user, nice, system, irq, softirq, steal.
    pub busy: u64,
}

impl MachineTicks {
    /// Ticks spent in each state since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            busy: self.busy.saturating_sub(earlier.busy),
        }
    }

    pub fn total(&self) -> u64 {
        self.idle + self.iowait + self.busy
    }

    /// Fractions of all ticks (busy, iowait, idle); zeros when no tick passed.
    pub fn fractions(&self) -> (f64, f64, f64) {
        let total = self.total() as f64;
        if total == 0.0 {
            return (0.0, 0.0, 0.0);
        }
        (
            self.busy as f64 / total,
            self.iowait as f64 / total,
            self.idle as f64 / total,
        )
    }

    pub fn read() -> std::io::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat")?;
        parse_proc_stat(&text).ok_or_else(|| std::io::Error::other("cannot parse /proc/stat"))
    }
}

/// The `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal (guest time
/// is already inside user and nice, so it is not added again).
pub fn parse_proc_stat(text: &str) -> Option<MachineTicks> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, rest @ ..] = fields.as_slice() else {
        return None;
    };
    Some(MachineTicks {
        idle: *idle,
        iowait: *iowait,
        busy: user + nice + system + rest.iter().sum::<u64>(),
    })
}

/// The value of `AT_CLKTCK` in an auxiliary vector (/proc/self/auxv of a 64-bit process:
/// pairs of native-endian u64 key and value, ending with `AT_NULL`).
pub fn parse_auxv_clock_ticks(auxv: &[u8]) -> Option<u64> {
    let word = |b: &[u8]| -> Option<u64> { Some(u64::from_ne_bytes(b.try_into().ok()?)) };
    for pair in auxv.chunks_exact(16) {
        let key = word(&pair[..8])?;
        if key == AT_NULL {
            return None;
        }
        if key == AT_CLKTCK {
            return word(&pair[8..]).filter(|&t| t > 0);
        }
    }
    None
}

/// Clock ticks per second for /proc/PID/stat times (the kernel's USER_HZ; 100 when the
/// auxiliary vector cannot be read).
pub fn clock_ticks() -> u64 {
    std::fs::read("/proc/self/auxv")
        .ok()
        .and_then(|a| parse_auxv_clock_ticks(&a))
        .unwrap_or(100)
}

/// CPU time (user + system) of a process so far, in ticks.
pub fn cpu_ticks(pid: u32) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_ticks(&text)
        .ok_or_else(|| std::io::Error::other(format!("cannot parse /proc/{pid}/stat")))
}

/// Peak resident set size of a process (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_kib_field(&text, "VmHWM")
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other(format!("no VmHWM in /proc/{pid}/status")))
}

/// Resets a process's peak RSS to its current RSS (writing 5 to /proc/PID/clear_refs, which
/// needs to own the process or be root), so the next reading covers one phase only.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_count_from_the_last_parenthesis() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime ...
        let stat = "4242 (mesh d) (x)) S 1 4242 4242 0 -1 4194560 5000 0 3 0 1234 567 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_stat_ticks("4242 (meshd) S 1 2"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn kib_fields() {
        let status = "Name:\tmeshd\nVmPeak:\t 2000000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t   100 kB\nThreads:\t12\n";
        assert_eq!(parse_kib_field(status, "VmHWM"), Some(123_456));
        assert_eq!(parse_kib_field(status, "VmRSS"), Some(100));
        assert_eq!(parse_kib_field(status, "Threads"), Some(12));
        assert_eq!(parse_kib_field(status, "VmSwap"), None);
        assert_eq!(
            parse_kib_field("MemTotal:       24596412 kB\n", "MemTotal"),
            Some(24_596_412)
        );
        assert_eq!(parse_kib_field("VmHWM: 12 MB\n", "VmHWM"), None);
    }

    #[test]
    fn cpuinfo_model_and_cores() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n\
                    processor\t: 1\nmodel name\t: AMD EPYC 7B13\n\n";
        assert_eq!(parse_cpuinfo(text), (Some("AMD EPYC 7B13".to_string()), 2));
        assert_eq!(parse_cpuinfo(""), (None, 0));
    }

    #[test]
    fn auxv_clock_ticks() {
        let mut auxv = Vec::new();
        for (k, v) in [(6u64, 4096u64), (AT_CLKTCK, 250), (AT_NULL, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv_clock_ticks(&auxv), Some(250));
        assert_eq!(parse_auxv_clock_ticks(&auxv[16..]), Some(250));
        assert_eq!(parse_auxv_clock_ticks(&auxv[32..]), None, "AT_NULL ends it");
        assert_eq!(parse_auxv_clock_ticks(&auxv[..16]), None);
    }

    #[test]
    fn machine_ticks_from_proc_stat() {
        let text = "cpu  100 5 50 1000 20 3 2 1 7 0\ncpu0 50 2 25 500 10 1 1 0 3 0\nintr 1 2\n";
        let t = parse_proc_stat(text).expect("cpu line");
        assert_eq!(
            t,
            MachineTicks {
                idle: 1000,
                iowait: 20,
                busy: 100 + 5 + 50 + 3 + 2 + 1
            }
        );
        let later = MachineTicks {
            idle: 1100,
            iowait: 70,
            busy: t.busy + 350,
        };
        let d = later.since(&t);
        assert_eq!(d.total(), 500);
        assert_eq!(d.fractions(), (0.7, 0.1, 0.2));
        assert_eq!(MachineTicks::default().fractions(), (0.0, 0.0, 0.0));
        // Older kernels print fewer fields; a line cut short of iowait is not a cpu line.
        assert_eq!(parse_proc_stat("cpu 1 2 3 4 5\n").map(|t| t.busy), Some(6));
        assert_eq!(parse_proc_stat("cpu 1 2 3\n"), None);
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert!(MachineTicks::read().is_ok());
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(peak_rss(pid).expect("VmHWM") > 0);
        assert!(clock_ticks() > 0);
        let m = Machine::read();
        assert!(m.cores > 0 && m.memory_bytes > 0, "{m:?}");
    }
}
