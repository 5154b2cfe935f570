//! What the benchmark reads off the machine: a process's CPU time and peak memory, the whole
//! host's busy time, free ports and wall-clock milliseconds.

use std::time::SystemTime;

use anyhow::{Context, Result};

/// USER_HZ, the unit of /proc's CPU times; 100 on every Linux this runs on.
const TICKS_PER_SEC: f64 = 100.0;

/// User + system CPU seconds of a process (/proc/PID/stat fields 14 and 15).
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit(')').next().context("stat format")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / TICKS_PER_SEC)
}

pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("VmHWM")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// The whole machine's CPU time so far, all cores together (the first line of /proc/stat).
#[derive(Clone, Copy)]
pub struct HostCpu {
    busy: u64,
    total: u64,
}

impl HostCpu {
    pub fn now() -> Result<HostCpu> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("/proc/stat is empty")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let total: u64 = ticks.iter().sum();
        // idle and iowait: a core waiting for the disk is not doing work either.
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        Ok(HostCpu {
            busy: total - idle,
            total,
        })
    }

    /// (busy CPU seconds, busy share of all cores) since `earlier`.
    pub fn since(self, earlier: HostCpu) -> (f64, f64) {
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        (busy / TICKS_PER_SEC, busy / total)
    }
}

pub fn free_port() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

pub fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}
