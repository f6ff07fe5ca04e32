//! What the benchmark programs in `src/bin` share: their flags, the spread of repeated runs,
//! the conditions every table states, and counters read from Redis, from this process's
//! metrics and from `/proc`.
//!
//! Every benchmark repeats its measurement (`--runs`, 3 by default) and prints the median with
//! the lowest and highest run, because on a shared machine one run says little. `--quick` (or
//! `SLLM_BENCH_QUICK=1`) makes each run small and does one, to check that a benchmark works.

use std::collections::HashMap;

use anyhow::{Context, Result};

/// The value following `name` on the command line, or `default`.
pub fn arg(name: &str, default: u64) -> Result<u64> {
    match std::env::args().skip_while(|a| a != name).nth(1) {
        Some(v) => v.parse().with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

/// Whether `--quick` was given (or `SLLM_BENCH_QUICK` is set to anything but 0): small runs.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
        || std::env::var("SLLM_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `full` normally, `small` in a quick run; `--name N` overrides either.
pub fn size(name: &str, full: u64, small: u64) -> Result<u64> {
    arg(name, if quick() { small } else { full })
}

/// How many times to repeat the measurement: `--runs N`; 3, or 1 in a quick run.
pub fn runs() -> Result<usize> {
    Ok(size("--runs", 3, 1)?.max(1) as usize)
}

/// The median of repeated runs with the lowest and highest.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// The middle run (the mean of the two middle ones for an even count).
    pub median: f64,
    /// The lowest run.
    pub min: f64,
    /// The highest run.
    pub max: f64,
    /// How many runs.
    pub runs: usize,
}

impl Spread {
    /// The spread of `values` (NaN everywhere for none).
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if !n.is_multiple_of(2) => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            runs: n,
        }
    }

    /// "12.3 (11.0–14.2)" with `decimals` places: the median, then the lowest and highest run
    /// (only the median when there was one run).
    pub fn show(&self, decimals: usize) -> String {
        if self.runs <= 1 {
            return format!("{:.*}", decimals, self.median);
        }
        format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, self.median, decimals, self.min, decimals, self.max
        )
    }

    /// Like [`Spread::show`], each number followed by `unit`.
    pub fn show_unit(&self, decimals: usize, unit: &str) -> String {
        if self.runs <= 1 {
            return format!("{:.*}{unit}", decimals, self.median);
        }
        format!(
            "{:.*}{unit} ({:.*}–{:.*}{unit})",
            decimals, self.median, decimals, self.min, decimals, self.max
        )
    }
}

/// The conditions of a run, for the head of a table: date (UTC), cores, load average when the
/// benchmark started, and how many runs the figures summarise.
pub fn conditions(runs: usize) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let spread = if runs > 1 {
        format!("{runs} runs, each figure their median (lowest–highest)")
    } else {
        "1 run".to_string()
    };
    format!("{}, {cores} cores, load average {load} at the start; {spread}", today())
}

/// Today's date (UTC) as yyyy-mm-dd.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// CPU seconds (user + system) process `pid` has used, from /proc (in USER_HZ ticks, which
/// Linux fixes at 100 per second).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds this process has used.
pub fn own_cpu_seconds() -> Result<f64> {
    stat_cpu_seconds("/proc/self/stat")
}

/// User plus system CPU seconds from a `/proc` `stat` file (a process's or a thread's).
pub fn stat_cpu_seconds(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        fields.get(i).context("short /proc stat")?.parse::<f64>().context("odd /proc stat")
    };
    Ok((tick(11)? + tick(12)?) / 100.0)
}

/// The soft limit on open files of this process (children inherit it).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Calls and server-side microseconds per command name, from `INFO commandstats` (commands run
/// inside scripts included, under their own names).
pub async fn command_times(
    raw: &mut redis::aio::MultiplexedConnection,
) -> Result<HashMap<String, (u64, f64)>> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(raw).await?;
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some((name, stats)) = line.strip_prefix("cmdstat_").and_then(|r| r.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| stats.split(',').find_map(|kv| kv.strip_prefix(key));
        let calls: u64 = field("calls=").and_then(|v| v.parse().ok()).unwrap_or(0);
        let usec: f64 = field("usec=").and_then(|v| v.parse().ok()).unwrap_or(0.0);
        out.insert(name.to_string(), (calls, usec));
    }
    Ok(out)
}

/// Commands Redis has run (all kinds, including those run inside scripts), less INFO.
pub async fn total_commands(raw: &mut redis::aio::MultiplexedConnection) -> Result<u64> {
    let calls = crate::commandstats(raw).await?;
    Ok(calls.iter().filter(|(k, _)| k.as_str() != "info").map(|(_, v)| v).sum())
}

/// Round trips to Redis this process's kvstore has made so far: every script run, read and
/// pipeline is timed once in its latency histogram, so the histogram's counts add up to them.
pub fn kvstore_round_trips() -> u64 {
    let name = format!("{}_count", telemetry::metrics::REDIS_COMMAND_DURATION_SECONDS);
    telemetry::metrics::gather()
        .lines()
        .filter(|l| l.starts_with(&name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_the_middle_run_with_the_extremes() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        assert_eq!(s.show(1), "2.0 (1.0–3.0)");
        assert_eq!(Spread::of(&[1.0, 4.0]).median, 2.5);
        assert_eq!(Spread::of(&[7.0]).show_unit(0, "ms"), "7ms");
        assert!(Spread::of(&[]).median.is_nan());
    }

    #[test]
    fn today_is_a_calendar_date() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"), "{d}");
    }
}
