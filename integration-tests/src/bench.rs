//! What the benchmark programs share: child processes with their stdout collected and their
//! stderr in a log file, the process tree and per-process CPU and memory from `/proc`,
//! percentiles, and the HTTP client they send with.
//!
//! Nothing here measures on its own; a benchmark reads CPU before and after a window and divides
//! by what the window completed.

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
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return f64::NAN };
    let fields: Vec<&str> =
        stat.rsplit(')').next().map(|r| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
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
