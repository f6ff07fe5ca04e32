//! What the benchmark programs in `src/bin` share: their flags, the spread of repeated runs,
//! the conditions every table states, child processes with their stdout collected and their
//! stderr in a log file, the process tree and per-process CPU and memory from `/proc`,
//! percentiles, counters read from Redis and from this process's metrics, and the HTTP client
//! they send with.
//!
//! Every benchmark repeats its measurement (`--runs`, 3 by default) and prints the median with
//! the lowest and highest run, because on a shared machine one run says little. `--quick` (or
//! `SLLM_BENCH_QUICK=1`) makes each run small and does one, to check that a benchmark works.
//! Nothing here measures on its own; a benchmark reads CPU before and after a window and divides
//! by what the window completed.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A child process with its stdout lines collected and its stderr in a file; stopped with
/// SIGTERM (then SIGKILL) when dropped, so a worker ends its engines.
pub struct LoggedChild {
    name: String,
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
}

impl LoggedChild {
    /// Starts `cmd` and waits up to `within` for a stdout line containing `marker`.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        log: PathBuf,
        marker: &str,
        within: Duration,
    ) -> Result<LoggedChild> {
        let (c, rx) = Self::start(name, cmd, log, Some(marker))?;
        if rx.recv_timeout(within).is_err() {
            bail!("{name} printed no {marker:?} within {within:?}; its log:\n{}", c.log_tail(30));
        }
        Ok(c)
    }

    /// Starts `cmd` without waiting for anything (the caller polls it some other way).
    pub fn start_only(name: &str, cmd: &mut Command, log: PathBuf) -> Result<LoggedChild> {
        Ok(Self::start(name, cmd, log, None)?.0)
    }

    fn start(
        name: &str,
        cmd: &mut Command,
        log: PathBuf,
        marker: Option<&str>,
    ) -> Result<(LoggedChild, std::sync::mpsc::Receiver<()>)> {
        let err = std::fs::File::create(&log)?;
        cmd.stdout(Stdio::piped()).stderr(err).stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        let wanted = marker.map(str::to_string);
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let marked = !sent && wanted.as_ref().is_some_and(|w| line.contains(w.as_str()));
                // Kept before the waiter hears of it, so it finds the line.
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
                if marked {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
        Ok((LoggedChild { name: name.to_string(), child, lines, log }, rx))
    }

    /// Its name, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The first stdout line containing `s`.
    pub fn line(&self, s: &str) -> Option<String> {
        self.lines.lock().ok()?.iter().find(|l| l.contains(s)).cloned()
    }

    /// The last `n` lines of its stderr and then of its stdout.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
        if let Ok(l) = self.lines.lock()
            && !l.is_empty()
        {
            out.push_str("\n--- stdout:\n");
            out.push_str(&l[l.len().saturating_sub(n)..].join("\n"));
        }
        out
    }

    /// Its stderr lines at WARN or ERROR level.
    pub fn warnings(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(strip_ansi)
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
            .collect()
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `s` without ANSI colour sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every process (pid, parent pid, command name) in /proc.
pub fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..].split_whitespace().nth(1).and_then(|p| p.parse().ok());
        out.push((pid, ppid.unwrap_or(0), comm));
    }
    out
}

/// Every descendant of `root` (children, their children, …), not `root` itself.
pub fn descendants(root: u32) -> Vec<u32> {
    let procs = processes();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, _) in &procs {
            if *ppid == p {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

/// The first descendant of `root` whose command name is `comm`.
pub fn descendant(root: u32, comm: &str) -> Option<u32> {
    let procs = processes();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, c) in &procs {
            if *ppid == p {
                if c == comm {
                    return Some(*pid);
                }
                frontier.push(*pid);
            }
        }
    }
    None
}

/// A process's command line, its arguments split.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The redis-server listening on `socket`.
pub fn redis_pid(socket: &Path) -> Option<u32> {
    let s = socket.display().to_string();
    processes()
        .into_iter()
        .filter(|(_, _, c)| c.starts_with("redis-server"))
        .find(|(pid, _, _)| cmdline(*pid).iter().any(|a| a.contains(&s)))
        .map(|(pid, _, _)| pid)
}

/// User plus system CPU seconds of one process (its threads, not its children), from
/// `/proc/PID/stat`, which counts in USER_HZ ticks (100 per second on Linux). NaN when the
/// process is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    cpu_seconds(pid).unwrap_or(f64::NAN)
}

/// Whether process `pid` is running (exists and is not a zombie waiting to be reaped).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).map(str::to_string)
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Resident memory (VmRSS) of one process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The `p` quantile (0..=1) of `v` (sorted in place): the smallest value with at least that
/// share of `v` at or below it. NaN when `v` is empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The median of `v` (the lower one of an even count), NaN when `v` is empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    percentile(&mut v, 0.5)
}

/// The text after `prefix` in `line` (e.g. an address a process printed), trimmed.
pub fn after(line: Option<String>, prefix: &str) -> Result<String> {
    let line = line.with_context(|| format!("no line with {prefix:?}"))?;
    let i = line.find(prefix).context("prefix")? + prefix.len();
    Ok(line[i..].trim().to_string())
}

/// A free TCP port on 127.0.0.1 (free when asked; a process that binds it later may race
/// another, which nothing else on a benchmark's machine does).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The directory sllm caches downloads in: `$SLLM_CACHE_DIR`, else `~/.cache/sllm`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SLLM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sllm")))
        .unwrap_or_default()
}

/// The repository's root (this crate's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The environment variable `name` parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The HTTP client the benchmarks send with.
pub type Http = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client with TCP_NODELAY (hyper-util's connector leaves it off).
pub fn http_client() -> Http {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(c)
}

/// Prints a Markdown table: the first column left-aligned, the others right-aligned, each as
/// wide as its widest cell.
pub fn print_table(headers: &[String], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = w - c.chars().count();
                if i == 0 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(headers);
    let rule: Vec<String> = width
        .iter()
        .enumerate()
        .map(|(i, w)| if i == 0 { "-".repeat(w + 2) } else { format!("{}:", "-".repeat(w + 1)) })
        .collect();
    println!("|{}|", rule.join("|"));
    for r in rows {
        line(r);
    }
}

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
