//! Start-up: spawn the server, read its `listening on IP:PORT` line, connect
//! and complete one echo; time each step from the spawn.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{connect, parse_duration, round3};
use crate::sys;

#[derive(clap::Args, Debug)]
pub struct StartupArgs {
    /// Times to start the server.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Unmeasured starts first (to warm a compiled-code cache).
    #[arg(long, default_value_t = 0)]
    pub warmup_runs: usize,
    /// Give up on one start after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Label put in the JSON line.
    #[arg(long, default_value = "server")]
    pub server: String,
    /// Name of the test in the JSON line.
    #[arg(long, default_value = "startup")]
    pub test: String,
    /// The server command line (after `--`); it must print
    /// `listening on IP:PORT` on stdout, with a loopback IP.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

struct Run {
    listening: Duration,
    first_echo: Duration,
    cpu_s: Option<f64>,
}

async fn stop(mut child: Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn one_run(args: &StartupArgs) -> Result<Run> {
    let start = Instant::now();
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", args.command[0]))?;
    let pid = child.id().context("the server exited at once")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let result = tokio::time::timeout(args.timeout, async {
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next_line()
            .await?
            .context("the server closed stdout before printing `listening on`")?;
        let listening = start.elapsed();
        let addr: SocketAddr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .trim()
            .parse()
            .with_context(|| format!("bad address in {line:?}"))?;
        if !addr.ip().is_loopback() {
            bail!("the server listens on {addr}, not a loopback address");
        }
        let mut stream = connect(addr, None).await?;
        let payload = *b"startup-probe-0123456789abcdef-0123456789abcdef-0123456789abcdef";
        stream.write_all(&payload).await?;
        let mut buf = [0u8; 64];
        stream.read_exact(&mut buf).await?;
        if buf != payload {
            bail!("the echo differs from what was sent");
        }
        let first_echo = start.elapsed();
        let cpu_s = sys::cpu_seconds_precise(pid).ok();
        let _ = stream.shutdown().await;
        // Keep stdout open until the server is stopped.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Run {
            listening,
            first_echo,
            cpu_s,
        })
    })
    .await;
    stop(child).await;
    match result {
        Ok(run) => run,
        Err(_) => bail!("no echo within {:?}", args.timeout),
    }
}

pub async fn startup(args: StartupArgs) -> Result<Value> {
    let mut runs = Vec::new();
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    for _ in 0..args.warmup_runs {
        if let Err(e) = one_run(&args).await {
            errors += 1;
            first_error.get_or_insert_with(|| format!("warm-up start: {e:#}"));
        }
    }
    for _ in 0..args.runs.max(1) {
        match one_run(&args).await {
            Ok(run) => runs.push(run),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut first: Vec<f64> = runs.iter().map(|r| ms(r.first_echo)).collect();
    let mut listen: Vec<f64> = runs.iter().map(|r| ms(r.listening)).collect();
    let mut cpu: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.cpu_s)
        .map(|c| c * 1000.0)
        .collect();
    let mut out = Map::new();
    out.insert("test".into(), json!(args.test));
    out.insert("server".into(), json!(args.server));
    out.insert("runs".into(), json!(runs.len()));
    out.insert("first_echo_ms_p50".into(), json!(quantile(&mut first, 0.5)));
    out.insert(
        "first_echo_ms_p99".into(),
        json!(quantile(&mut first, 0.99)),
    );
    out.insert("first_echo_ms_min".into(), json!(quantile(&mut first, 0.0)));
    out.insert("listening_ms_p50".into(), json!(quantile(&mut listen, 0.5)));
    out.insert("cpu_ms_p50".into(), json!(quantile(&mut cpu, 0.5)));
    out.insert("all_progressed".into(), json!(errors == 0));
    out.insert("errors".into(), json!(errors));
    out.insert("first_error".into(), json!(first_error));
    Ok(Value::Object(out))
}

/// Nearest-rank quantile (q = 0: minimum, q = 1: maximum), rounded.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(round3(values[rank - 1]))
}
