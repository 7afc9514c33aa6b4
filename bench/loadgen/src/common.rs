//! Shared by every test: the command-line target, loopback connections from
//! rotating 127.0.0.x source addresses, the measurement window, the CPU
//! sampler, per-worker results and their summary as JSON.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use tokio::net::{TcpSocket, TcpStream};

use crate::sys;

/// Parse `500ms`, `3s`, `2m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (use 500ms, 3s, 2m)"))?;
    if !(0.0..=86_400.0).contains(&(value * scale)) {
        return Err(format!("duration {text:?} out of range"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// Where to send load, and what to watch.
#[derive(clap::Args, Clone, Debug)]
pub struct Target {
    /// Server address; must be a loopback address (127.0.0.0/8 or ::1).
    #[arg(long)]
    pub addr: SocketAddr,
    /// PID of the server process, for its CPU time and RSS from /proc.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Label put in the JSON line (`native`, `wasm`).
    #[arg(long, default_value = "server")]
    pub server: String,
    /// Spread client sockets over this many source addresses 127.0.0.2,
    /// 127.0.0.3, ... (bound before connect). 0: let the kernel pick
    /// 127.0.0.1.
    #[arg(long, default_value_t = 0)]
    pub sources: u8,
    /// Give up on one operation (connect, one echo) after this long; it
    /// counts as an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub op_timeout: Duration,
    /// Name of the test in the JSON line (default: the subcommand).
    #[arg(long)]
    pub test: Option<String>,
}

impl Target {
    pub fn check(&self) -> Result<()> {
        if !self.addr.ip().is_loopback() {
            bail!(
                "{} is not a loopback address: the load generator only targets 127.0.0.x / ::1",
                self.addr
            );
        }
        if self.sources > 0 && !self.addr.is_ipv4() {
            bail!("--sources needs an IPv4 server address");
        }
        Ok(())
    }

    pub fn sources(&self) -> Sources {
        Sources::new(self.sources)
    }
}

/// Round-robin source addresses for client sockets.
pub struct Sources {
    ips: Vec<Ipv4Addr>,
    next: AtomicUsize,
}

impl Sources {
    pub fn new(count: u8) -> Sources {
        let count = count.min(250);
        Sources {
            ips: (0..count)
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn next(&self) -> Option<Ipv4Addr> {
        if self.ips.is_empty() {
            None
        } else {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            Some(self.ips[i % self.ips.len()])
        }
    }

    pub fn len(&self) -> usize {
        self.ips.len()
    }
}

/// Connect to `addr` with `TCP_NODELAY`, from `source` if given. The source
/// is bound with `IP_BIND_ADDRESS_NO_PORT`, so the port is chosen at
/// connect time per 4-tuple and every source address has its own
/// ephemeral-port range.
pub async fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd and a pointer to a c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Run `op` with a timeout; a timeout is an error like any other.
pub async fn timed<T>(
    limit: Duration,
    what: &str,
    op: impl Future<Output = io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, op).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out after {limit:?}")),
    }
}

/// The measured part of a test: after a warm-up, for a fixed duration.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn new(warmup: Duration, duration: Duration) -> Window {
        let start = Instant::now() + warmup;
        Window {
            start,
            end: start + duration,
        }
    }

    pub fn contains(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }

    pub fn seconds(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// CPU seconds spent inside `window` by the server (None without a PID) and
/// by this load generator. Call it before the window starts; it sleeps
/// until the window ends.
pub async fn cpu_in_window(pid: Option<u32>, window: Window) -> Result<(Option<f64>, f64)> {
    let me = std::process::id();
    tokio::time::sleep_until(window.start.into()).await;
    let before = pid.map(sys::cpu_seconds).transpose()?;
    let me_before = sys::cpu_seconds(me)?;
    tokio::time::sleep_until(window.end.into()).await;
    let after = pid.map(sys::cpu_seconds).transpose()?;
    let me_after = sys::cpu_seconds(me)?;
    Ok((before.zip(after).map(|(b, a)| a - b), me_after - me_before))
}

/// Server and load-generator CPU over the window: seconds, and busy as a
/// percentage of one core. A server well below 100% was not the
/// bottleneck.
pub fn cpu_json(out: &mut Map<String, Value>, window: &Window, cpu: (Option<f64>, f64)) {
    let (server, loadgen) = cpu;
    let pct = |s: f64| round3(100.0 * s / window.seconds());
    out.insert("cpu_s".into(), json!(server.map(round3)));
    out.insert("server_cpu_pct".into(), json!(server.map(pct)));
    out.insert("loadgen_cpu_pct".into(), json!(pct(loadgen)));
}

/// A shared cap on the number of operations (or bytes) a test may do, so
/// every loop is bounded by count as well as by time.
pub struct Budget(AtomicU64);

impl Budget {
    pub fn new(total: u64) -> Budget {
        Budget(AtomicU64::new(total))
    }

    /// Take `n` from the budget; false once it is spent.
    pub fn take(&self, n: u64) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }
}

pub fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// What one worker (a client loop or a connection) measured.
pub struct Worker {
    pub latency: Histogram<u64>,
    /// Operations completed inside the window.
    pub ops: u64,
    /// Bytes received inside the window (bulk).
    pub bytes: u64,
    /// Errors, wherever they happened (warm-up included).
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Default for Worker {
    fn default() -> Self {
        Worker {
            latency: histogram(),
            ops: 0,
            bytes: 0,
            errors: 0,
            first_error: None,
        }
    }
}

impl Worker {
    pub fn record(&mut self, latency: Duration) {
        let ns = (latency.as_nanos() as u64).clamp(1, 600_000_000_000);
        let _ = self.latency.record(ns);
    }

    pub fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// All workers of one test, merged.
pub struct Merged {
    pub latency: Histogram<u64>,
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub per_worker_ops: Vec<u64>,
    pub per_worker_bytes: Vec<u64>,
}

impl Merged {
    pub fn of(workers: Vec<Worker>) -> Merged {
        let mut merged = Merged {
            latency: histogram(),
            ops: 0,
            bytes: 0,
            errors: 0,
            first_error: None,
            per_worker_ops: Vec::new(),
            per_worker_bytes: Vec::new(),
        };
        for w in workers {
            merged.add(w);
        }
        merged
    }

    pub fn add(&mut self, w: Worker) {
        let _ = self.latency.add(&w.latency);
        self.ops += w.ops;
        self.bytes += w.bytes;
        self.errors += w.errors;
        if self.first_error.is_none() {
            self.first_error = w.first_error;
        }
        self.per_worker_ops.push(w.ops);
        self.per_worker_bytes.push(w.bytes);
    }

    /// An error that is not the workers' own (a task panicked, a connection
    /// could not be set up).
    pub fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    /// p50/p99/p999/max/mean in µs, errors and the first error.
    pub fn latency_json(&self, out: &mut Map<String, Value>) {
        let us = |ns: u64| round3(ns as f64 / 1000.0);
        let h = &self.latency;
        if h.is_empty() {
            for key in ["p50_us", "p99_us", "p999_us", "max_us", "mean_us"] {
                out.insert(key.into(), Value::Null);
            }
        } else {
            out.insert("p50_us".into(), json!(us(h.value_at_quantile(0.50))));
            out.insert("p99_us".into(), json!(us(h.value_at_quantile(0.99))));
            out.insert("p999_us".into(), json!(us(h.value_at_quantile(0.999))));
            out.insert("max_us".into(), json!(us(h.max())));
            out.insert("mean_us".into(), json!(round3(h.mean() / 1000.0)));
        }
        out.insert("latency_samples".into(), json!(h.len()));
        out.insert("errors".into(), json!(self.errors));
        out.insert("first_error".into(), json!(self.first_error));
    }
}

pub fn round3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        x
    }
}

/// The start of every JSON line: test name, server label, address.
pub fn header(target: &Target, default_test: &str) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert(
        "test".into(),
        json!(target.test.clone().unwrap_or_else(|| default_test.into())),
    );
    out.insert("server".into(), json!(target.server));
    out.insert("addr".into(), json!(target.addr.to_string()));
    out.insert("pid".into(), json!(target.pid));
    out
}

/// `cpu_s × 1e6 / ops`, or null.
pub fn per_op_us(cpu_s: Option<f64>, ops: f64) -> Value {
    match cpu_s {
        Some(cpu) if ops > 0.0 => json!(round3(cpu * 1e6 / ops)),
        _ => Value::Null,
    }
}

/// Join spawned workers, turning a panicked task into an error.
pub async fn join_workers(handles: Vec<tokio::task::JoinHandle<Worker>>) -> Merged {
    let mut merged = Merged::of(Vec::new());
    for handle in handles {
        match handle.await {
            Ok(w) => merged.add(w),
            Err(e) => merged.error(format!("worker task failed: {e}")),
        }
    }
    merged
}
