//! The load tests: churn, ping-pong, bulk and idle. Each returns one JSON
//! object; every loop is bounded by time and by count.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::common::{
    Budget, Merged, Target, Window, Worker, connect, cpu_in_window, cpu_json, header, join_workers,
    parse_duration, per_op_us, round3, timed,
};
use crate::sys;

/// Close a connection politely: half-close, then wait (briefly) for the
/// server's EOF, so the server sees a normal end rather than a reset.
async fn close(mut stream: TcpStream, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// One echo of `payload` on `stream`, checking the bytes that come back.
pub(crate) async fn echo_once(
    stream: &mut TcpStream,
    payload: &[u8],
    buf: &mut [u8],
    limit: Duration,
) -> Result<(), String> {
    timed(limit, "write", stream.write_all(payload)).await?;
    let buf = &mut buf[..payload.len()];
    timed(limit, "read", stream.read_exact(buf)).await?;
    if buf != payload {
        return Err("echoed bytes differ from the bytes sent".into());
    }
    Ok(())
}

// ---------------------------------------------------------------- churn

#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub target: Target,
    /// Concurrent clients, each looping connect / echo / close.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Bytes echoed per connection.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many connections in total (warm-up included).
    #[arg(long, default_value_t = 20_000_000)]
    pub max_conns: u64,
}

/// connect, `size` bytes echoed, half-close, server's EOF, close.
pub(crate) async fn churn_once(
    target: &Target,
    source: Option<std::net::Ipv4Addr>,
    payload: &[u8],
    buf: &mut [u8],
) -> Result<(), String> {
    let limit = target.op_timeout;
    let mut stream = timed(limit, "connect", connect(target.addr, source)).await?;
    echo_once(&mut stream, payload, buf, limit).await?;
    timed(limit, "shutdown", stream.shutdown()).await?;
    let n = timed(limit, "read EOF", stream.read(buf)).await?;
    if n != 0 {
        return Err(format!("expected EOF after half-close, got {n} bytes"));
    }
    Ok(())
}

pub async fn churn(args: ChurnArgs) -> Result<Value> {
    args.target.check()?;
    let target = Arc::new(args.target.clone());
    let sources = Arc::new(target.sources());
    let budget = Arc::new(Budget::new(args.max_conns));
    let window = Window::new(args.warmup, args.duration);
    let mut handles = Vec::new();
    for client in 0..args.clients {
        let (target, sources, budget) = (target.clone(), sources.clone(), budget.clone());
        let size = args.size;
        handles.push(tokio::spawn(async move {
            let mut w = Worker::default();
            let mut payload = vec![0u8; size];
            let mut buf = vec![0u8; size.max(1)];
            let mut k = client;
            while Instant::now() < window.end && budget.take(1) {
                k = k.wrapping_add(1);
                payload
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (i + k) as u8);
                let t0 = Instant::now();
                match churn_once(&target, sources.next(), &payload, &mut buf).await {
                    Ok(()) => {
                        let t1 = Instant::now();
                        if window.contains(t1) {
                            w.ops += 1;
                            w.record(t1 - t0);
                        }
                    }
                    Err(e) => {
                        w.error(e);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            w
        }));
    }
    let (cpu, loadgen_cpu) = cpu_in_window(target.pid, window).await?;
    let merged = join_workers(handles).await;

    let mut out = header(&target, "churn");
    let ops = merged.ops as f64;
    out.insert("clients".into(), json!(args.clients));
    out.insert("size".into(), json!(args.size));
    out.insert("duration_s".into(), json!(window.seconds()));
    out.insert("conns".into(), json!(merged.ops));
    out.insert("conns_per_s".into(), json!(round3(ops / window.seconds())));
    cpu_json(&mut out, &window, (cpu, loadgen_cpu));
    out.insert("cpu_us_per_op".into(), per_op_us(cpu, ops));
    fairness(&mut out, &merged, "client");
    merged.latency_json(&mut out);
    Ok(Value::Object(out))
}

/// Per-worker minimum and maximum of operations (and bytes), and whether
/// every worker made progress in the window.
fn fairness(out: &mut serde_json::Map<String, Value>, merged: &Merged, unit: &str) {
    let min = merged.per_worker_ops.iter().min().copied().unwrap_or(0);
    let max = merged.per_worker_ops.iter().max().copied().unwrap_or(0);
    out.insert("fairness_unit".into(), json!(unit));
    out.insert("per_worker_min".into(), json!(min));
    out.insert("per_worker_max".into(), json!(max));
    out.insert(
        "all_progressed".into(),
        json!(!merged.per_worker_ops.is_empty() && min > 0),
    );
}

// ------------------------------------------------------------ ping-pong

#[derive(clap::Args, Debug)]
pub struct PingPongArgs {
    #[command(flatten)]
    pub target: Target,
    /// Connections, each doing one round trip at a time.
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many round trips in total (warm-up included).
    #[arg(long, default_value_t = 100_000_000)]
    pub max_round_trips: u64,
}

/// Open `n` connections, at most 64 connects in flight; failures are
/// counted as errors and leave fewer connections.
async fn open_many(target: &Target, n: usize, merged: &mut Merged) -> Vec<TcpStream> {
    let sources = Arc::new(target.sources());
    let gate = Arc::new(Semaphore::new(64));
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let (sources, gate) = (sources.clone(), gate.clone());
        let (addr, limit) = (target.addr, target.op_timeout);
        handles.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            timed(limit, "connect", connect(addr, sources.next())).await
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for handle in handles {
        match handle.await {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(e)) => merged.error(e),
            Err(e) => merged.error(format!("connect task failed: {e}")),
        }
    }
    streams
}

pub async fn pingpong(args: PingPongArgs) -> Result<Value> {
    args.target.check()?;
    if args.size == 0 {
        bail!("--size must be at least 1");
    }
    let target = Arc::new(args.target.clone());
    let mut setup = Merged::of(Vec::new());
    let streams = open_many(&target, args.conns, &mut setup).await;
    let budget = Arc::new(Budget::new(args.max_round_trips));
    let window = Window::new(args.warmup, args.duration);
    let mut handles = Vec::new();
    for (c, mut stream) in streams.into_iter().enumerate() {
        let (target, budget) = (target.clone(), budget.clone());
        let size = args.size;
        handles.push(tokio::spawn(async move {
            let mut w = Worker::default();
            let mut payload = vec![0u8; size];
            let mut buf = vec![0u8; size];
            let mut k = c;
            while Instant::now() < window.end && budget.take(1) {
                k = k.wrapping_add(1);
                payload[0] = k as u8;
                payload[size - 1] = (k >> 8) as u8;
                let t0 = Instant::now();
                match echo_once(&mut stream, &payload, &mut buf, target.op_timeout).await {
                    Ok(()) => {
                        let t1 = Instant::now();
                        if window.contains(t1) {
                            w.ops += 1;
                            w.record(t1 - t0);
                        }
                    }
                    Err(e) => {
                        // The stream is in an unknown state: stop this one.
                        w.error(e);
                        break;
                    }
                }
            }
            close(stream, Duration::from_secs(2)).await;
            w
        }));
    }
    let (cpu, loadgen_cpu) = cpu_in_window(target.pid, window).await?;
    let mut merged = join_workers(handles).await;
    merged.errors += setup.errors;
    merged.first_error = setup.first_error.or(merged.first_error);

    let mut out = header(&target, &format!("pingpong-{}", args.size));
    let ops = merged.ops as f64;
    out.insert("conns".into(), json!(args.conns));
    out.insert("size".into(), json!(args.size));
    out.insert("duration_s".into(), json!(window.seconds()));
    out.insert("round_trips".into(), json!(merged.ops));
    out.insert("rt_per_s".into(), json!(round3(ops / window.seconds())));
    out.insert(
        "mb_per_s".into(),
        json!(round3(ops * args.size as f64 / 1e6 / window.seconds())),
    );
    cpu_json(&mut out, &window, (cpu, loadgen_cpu));
    out.insert("cpu_us_per_op".into(), per_op_us(cpu, ops));
    fairness(&mut out, &merged, "connection");
    if merged.per_worker_ops.len() < args.conns {
        out.insert("all_progressed".into(), json!(false));
    }
    merged.latency_json(&mut out);
    Ok(Value::Object(out))
}

// ----------------------------------------------------------------- bulk

#[derive(clap::Args, Debug)]
pub struct BulkArgs {
    #[command(flatten)]
    pub target: Target,
    /// Connections, each writing and reading at the same time.
    #[arg(long, default_value_t = 10)]
    pub conns: usize,
    /// Bytes per write call.
    #[arg(long, default_value_t = 65536)]
    pub chunk: usize,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop writing after this many bytes in total (warm-up included).
    #[arg(long, default_value_t = 1 << 40)]
    pub max_bytes: u64,
}

/// Bytes i of the stream is `i % 251`: the pattern buffer is long enough to
/// slice any read or write of up to `max` bytes at any offset.
fn pattern(max: usize) -> Arc<Vec<u8>> {
    Arc::new((0..max + 251).map(|i| (i % 251) as u8).collect())
}

pub async fn bulk(args: BulkArgs) -> Result<Value> {
    args.target.check()?;
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    const READ_BUFFER: usize = 64 * 1024;
    let target = Arc::new(args.target.clone());
    let mut setup = Merged::of(Vec::new());
    let streams = open_many(&target, args.conns, &mut setup).await;
    let pattern = pattern(args.chunk.max(READ_BUFFER));
    let budget = Arc::new(Budget::new(args.max_bytes));
    let window = Window::new(args.warmup, args.duration);
    let chunk = args.chunk;
    let mut handles = Vec::new();
    for stream in streams {
        let (mut rd, mut wr) = stream.into_split();
        let (target, budget) = (target.clone(), budget.clone());
        let (wpattern, rpattern) = (pattern.clone(), pattern.clone());
        let limit = target.op_timeout;
        // Send time of every chunk, for the chunk echo latency.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let writer = tokio::spawn(async move {
            let mut sent = 0u64;
            let mut error = None;
            while Instant::now() < window.end && budget.take(chunk as u64) {
                let at = (sent % 251) as usize;
                let _ = tx.send(Instant::now());
                if let Err(e) = timed(limit, "write", wr.write_all(&wpattern[at..at + chunk])).await
                {
                    error = Some(e);
                    break;
                }
                sent += chunk as u64;
            }
            let _ = timed(limit, "shutdown", wr.shutdown()).await;
            (sent, error)
        });
        let reader = tokio::spawn(async move {
            let mut w = Worker::default();
            let mut buf = vec![0u8; READ_BUFFER];
            let mut received = 0u64;
            let mut next_chunk_end = chunk as u64;
            loop {
                let n = match timed(limit, "read", rd.read(&mut buf)).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        w.error(e);
                        break;
                    }
                };
                let at = (received % 251) as usize;
                if buf[..n] != rpattern[at..at + n] {
                    w.error(format!("corrupted echo at byte {received}"));
                    break;
                }
                received += n as u64;
                let now = Instant::now();
                let counted = window.contains(now);
                if counted {
                    w.bytes += n as u64;
                }
                while received >= next_chunk_end {
                    next_chunk_end += chunk as u64;
                    if let Ok(sent_at) = rx.try_recv()
                        && counted
                    {
                        w.ops += 1;
                        w.record(now - sent_at);
                    }
                }
            }
            (w, received)
        });
        handles.push(tokio::spawn(async move {
            let (mut w, received) = reader
                .await
                .unwrap_or_else(|e| (worker_failed(format!("reader task failed: {e}")), 0));
            match writer.await {
                Ok((sent, error)) => {
                    if let Some(e) = error {
                        w.error(e);
                    } else if sent != received && w.errors == 0 {
                        w.error(format!("sent {sent} bytes but {received} came back"));
                    }
                }
                Err(e) => w.error(format!("writer task failed: {e}")),
            }
            w
        }));
    }
    let (cpu, loadgen_cpu) = cpu_in_window(target.pid, window).await?;
    let mut merged = join_workers(handles).await;
    merged.errors += setup.errors;
    merged.first_error = setup.first_error.or(merged.first_error);

    let mut out = header(&target, "bulk");
    let mb = merged.bytes as f64 / 1e6;
    let per_conn_mb = |v: Option<&u64>| v.map(|b| round3(*b as f64 / 1e6));
    out.insert("conns".into(), json!(args.conns));
    out.insert("chunk".into(), json!(args.chunk));
    out.insert("duration_s".into(), json!(window.seconds()));
    out.insert("mb_echoed".into(), json!(round3(mb)));
    out.insert("mb_per_s".into(), json!(round3(mb / window.seconds())));
    cpu_json(&mut out, &window, (cpu, loadgen_cpu));
    out.insert("cpu_us_per_mb".into(), per_op_us(cpu, mb));
    out.insert(
        "per_conn_mb_min".into(),
        json!(per_conn_mb(merged.per_worker_bytes.iter().min())),
    );
    out.insert(
        "per_conn_mb_max".into(),
        json!(per_conn_mb(merged.per_worker_bytes.iter().max())),
    );
    out.insert(
        "all_progressed".into(),
        json!(
            merged.per_worker_bytes.len() == args.conns
                && merged.per_worker_bytes.iter().all(|b| *b > 0)
        ),
    );
    out.insert(
        "latency_of".into(),
        json!("one chunk, write start to last byte echoed"),
    );
    merged.latency_json(&mut out);
    Ok(Value::Object(out))
}

fn worker_failed(e: String) -> Worker {
    let mut w = Worker::default();
    w.error(e);
    w
}

// ----------------------------------------------------------------- idle

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: Target,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Connects (each followed by one echo) in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Wait this long after the last connection before reading RSS.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Stop opening connections after this many errors.
    #[arg(long, default_value_t = 100)]
    pub max_errors: u64,
}

/// How to raise the open-file limit, for a message.
fn nofile_hint(needed: u64) -> String {
    format!(
        "raise the open-file limit to at least {needed} for both processes: as root, \
         `ulimit -Hn 1048576 && ulimit -n 1048576` in the shell that runs bench/run.sh \
         (or LimitNOFILE= / /etc/security/limits.conf), with `sysctl -w fs.nr_open=1048576` \
         if fs.nr_open is lower"
    )
}

pub async fn idle(args: IdleArgs) -> Result<Value> {
    args.target.check()?;
    let target = Arc::new(args.target.clone());
    let n = args.conns as u64;
    let mut out = header(&target, &format!("idle-{}", args.conns));
    out.insert("conns_requested".into(), json!(n));

    // Will the limits let it happen at all?
    let (soft, _) = sys::raise_nofile();
    let needed = n + 256;
    let mut refused = Vec::new();
    if soft < needed {
        refused.push(format!("the load generator's open-file limit is {soft}"));
    }
    if let Some(server_soft) = target.pid.and_then(sys::nofile_limit_of)
        && server_soft < needed
    {
        refused.push(format!("the server's open-file limit is {server_soft}"));
    }
    if !refused.is_empty() {
        out.insert(
            "skipped".into(),
            json!(format!("{} < {needed} needed", refused.join(" and "))),
        );
        out.insert("hint".into(), json!(nofile_hint(needed)));
        return Ok(Value::Object(out));
    }
    let max_map_count = sys::sysctl("vm/max_map_count");
    out.insert("max_map_count".into(), json!(max_map_count));

    let pid = target.pid;
    let rss_before = pid.map(sys::rss_kb).transpose()?;
    let maps_before = pid.map(sys::map_count).transpose()?;
    let pte_before = pid.map(sys::page_tables_kb).transpose()?;
    let cpu_before = pid.map(sys::cpu_seconds).transpose()?;
    let started = Instant::now();

    // Open: connect, one echo, hold.
    let sources = Arc::new(target.sources());
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let errors = Arc::new(AtomicU64::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let (target, sources, gate) = (target.clone(), sources.clone(), gate.clone());
        let (errors, abort) = (errors.clone(), abort.clone());
        let max_errors = args.max_errors;
        handles.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            if abort.load(Ordering::Relaxed) {
                return Err(None);
            }
            let t0 = Instant::now();
            let result = async {
                let mut stream = timed(
                    target.op_timeout,
                    "connect",
                    connect(target.addr, sources.next()),
                )
                .await?;
                let payload: Vec<u8> = (0..64).map(|b| (b + i) as u8).collect();
                let mut buf = [0u8; 64];
                echo_once(&mut stream, &payload, &mut buf, target.op_timeout).await?;
                Ok::<_, String>(stream)
            }
            .await;
            match result {
                Ok(stream) => Ok((stream, t0.elapsed())),
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) + 1 >= max_errors {
                        abort.store(true, Ordering::Relaxed);
                    }
                    Err(Some(e))
                }
            }
        }));
    }
    let mut merged = Merged::of(Vec::new());
    let mut w = Worker::default();
    let mut streams = Vec::with_capacity(args.conns);
    let mut not_attempted = 0u64;
    for handle in handles {
        match handle.await {
            Ok(Ok((stream, latency))) => {
                w.ops += 1;
                w.record(latency);
                streams.push(stream);
            }
            Ok(Err(Some(e))) => w.error(e),
            Ok(Err(None)) => not_attempted += 1,
            Err(e) => w.error(format!("connect task failed: {e}")),
        }
    }
    let setup = started.elapsed();
    let cpu_after_setup = pid.map(sys::cpu_seconds).transpose()?;
    let established = streams.len() as u64;

    tokio::time::sleep(args.settle).await;
    let rss_after = pid.map(sys::rss_kb).transpose()?;
    let maps_after = pid.map(sys::map_count).transpose()?;
    let pte_after = pid.map(sys::page_tables_kb).transpose()?;

    // Every held connection must still answer.
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut checks = Vec::with_capacity(streams.len());
    for mut stream in streams {
        let (gate, limit) = (gate.clone(), target.op_timeout);
        checks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let payload = [0xa5u8; 64];
            let mut buf = [0u8; 64];
            let result = echo_once(&mut stream, &payload, &mut buf, limit).await;
            drop(permit);
            (stream, result)
        }));
    }
    let mut alive = 0u64;
    let mut held = Vec::with_capacity(checks.len());
    for check in checks {
        match check.await {
            Ok((stream, Ok(()))) => {
                alive += 1;
                held.push(stream);
            }
            Ok((_, Err(e))) => w.error(format!("held connection: {e}")),
            Err(e) => w.error(format!("check task failed: {e}")),
        }
    }
    // Close them all (bounded), so the server is idle again for the next test.
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let closes: Vec<_> = held
        .into_iter()
        .map(|stream| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                close(stream, Duration::from_secs(2)).await;
            })
        })
        .collect();
    for c in closes {
        let _ = c.await;
    }
    merged.add(w);

    let cpu_setup = cpu_before.zip(cpu_after_setup).map(|(b, a)| a - b);
    out.insert("conns".into(), json!(established));
    out.insert("not_attempted".into(), json!(not_attempted));
    out.insert("alive".into(), json!(alive));
    out.insert(
        "all_progressed".into(),
        json!(established == n && alive == n),
    );
    out.insert("sources".into(), json!(sources.len()));
    out.insert("setup_s".into(), json!(round3(setup.as_secs_f64())));
    out.insert(
        "conns_per_s".into(),
        json!(round3(established as f64 / setup.as_secs_f64())),
    );
    // Growth per established connection, when both readings exist.
    let per_conn = |growth: Option<f64>| match growth {
        Some(g) if established > 0 => json!(round3(g / established as f64)),
        _ => Value::Null,
    };
    let growth = |before: Option<u64>, after: Option<u64>| {
        before.zip(after).map(|(b, a)| a as f64 - b as f64)
    };
    let delta_kb = growth(rss_before, rss_after);
    let pte_delta_kb = growth(pte_before, pte_after);
    out.insert("rss_before_kb".into(), json!(rss_before));
    out.insert("rss_after_kb".into(), json!(rss_after));
    out.insert("rss_per_conn_kb".into(), per_conn(delta_kb));
    out.insert("pte_before_kb".into(), json!(pte_before));
    out.insert("pte_after_kb".into(), json!(pte_after));
    out.insert("pte_per_conn_kb".into(), per_conn(pte_delta_kb));
    out.insert(
        "mem_per_conn_kb".into(),
        per_conn(delta_kb.zip(pte_delta_kb).map(|(r, p)| r + p)),
    );
    out.insert("maps_before".into(), json!(maps_before));
    out.insert("maps_after".into(), json!(maps_after));
    out.insert(
        "maps_per_conn".into(),
        per_conn(growth(maps_before, maps_after)),
    );
    out.insert("cpu_s".into(), json!(cpu_setup.map(round3)));
    out.insert(
        "cpu_us_per_op".into(),
        per_op_us(cpu_setup, established as f64),
    );
    if let (Some(limit), Some(maps)) = (max_map_count, maps_after)
        && maps * 10 >= limit * 8
    {
        out.insert(
            "hint".into(),
            json!(format!(
                "the server held {maps} memory mappings, near vm.max_map_count = {limit}; \
                 for more connections: `sysctl -w vm.max_map_count=1048576`"
            )),
        );
    }
    out.insert("latency_of".into(), json!("connect + first 64 B echo"));
    merged.latency_json(&mut out);
    Ok(Value::Object(out))
}
