//! What the load generator reads from /proc about the server process (CPU
//! time, RSS, memory mappings, open-file limit) and about the machine, and
//! the one limit it changes on itself (RLIMIT_NOFILE soft → hard).

use std::fs;

use anyhow::{Context, Result, bail};

/// Clock ticks per second, the unit of utime/stime in /proc/PID/stat.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime of process `pid` (all its threads), in seconds. The
/// resolution is one clock tick (usually 10 ms).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (is the server running?)"))?;
    // The command name (field 2) is in parentheses and may contain spaces:
    // count fields after the last ')'. Field 3 (state) is index 0 there.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.len() < 13 {
        bail!("malformed /proc/{pid}/stat");
    }
    let utime: u64 = fields[11].parse().context("bad utime")?;
    let stime: u64 = fields[12].parse().context("bad stime")?;
    Ok((utime + stime) as f64 / clock_ticks_per_second())
}

/// CPU time of `pid` in seconds with nanosecond resolution: the sum of the
/// first field of /proc/PID/task/*/schedstat over its live threads. Threads
/// that already exited are missing, so use it only for short spans (start-up).
pub fn cpu_seconds_precise(pid: u32) -> Result<f64> {
    let mut total_ns = 0u64;
    let dir = fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot read /proc/{pid}/task"))?;
    for task in dir.flatten() {
        if let Ok(text) = fs::read_to_string(task.path().join("schedstat"))
            && let Some(ns) = text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        {
            total_ns += ns;
        }
    }
    if total_ns == 0 {
        return cpu_seconds(pid);
    }
    Ok(total_ns as f64 / 1e9)
}

/// A `Name:   1234 kB` line of /proc/PID/status, in kB.
fn status_kb(pid: u32, name: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(value) = line.strip_prefix(name).and_then(|v| v.strip_prefix(':')) {
            let number = value.trim().trim_end_matches("kB").trim();
            return number.parse().with_context(|| format!("bad {name} line"));
        }
    }
    bail!("no {name} in /proc/{pid}/status")
}

/// Resident set size of `pid`, in kB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    status_kb(pid, "VmRSS")
}

/// Size of `pid`'s page tables, in kB. Not part of RSS, but memory the
/// kernel spends on the process all the same: a sandbox's slots are spread
/// over the address space, so each touches page-table pages of its own.
pub fn page_tables_kb(pid: u32) -> Result<u64> {
    status_kb(pid, "VmPTE")
}

/// Number of memory mappings of `pid` (what vm.max_map_count bounds).
pub fn map_count(pid: u32) -> Result<u64> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
    Ok(maps.lines().count() as u64)
}

/// The soft open-file limit of `pid`, from /proc/PID/limits.
pub fn nofile_limit_of(pid: u32) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

/// A number from /proc/sys (for example `vm/max_map_count`).
pub fn sysctl(name: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/sys/{name}"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raise this process's RLIMIT_NOFILE soft limit to the hard limit.
/// Returns (soft, hard) after the change.
pub fn raise_nofile() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; soft ≤ hard.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// The CPU model line of /proc/cpuinfo.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The kernel release (`uname -r`).
pub fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
