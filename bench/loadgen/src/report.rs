//! `loadgen report`: turn the JSON lines of one bench/run.sh run into the
//! Markdown report (BENCHMARKS.md): conditions, then one table per test with
//! native, wasm-sockserver and the ratio wasm/native.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::sys;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The JSON lines written by the tests (and `loadgen note`).
    #[arg(long)]
    pub results: PathBuf,
    /// Where to write the Markdown.
    #[arg(long)]
    pub out: PathBuf,
    /// full, quick or smoke.
    #[arg(long, default_value = "full")]
    pub mode: String,
    /// When the run started.
    #[arg(long, default_value = "")]
    pub started: String,
    /// /proc/loadavg at the start of the run.
    #[arg(long, default_value = "")]
    pub loadavg: String,
    /// `nproc` of the machine.
    #[arg(long, default_value = "")]
    pub nproc: String,
    /// How the server and the load generator were pinned.
    #[arg(long, default_value = "")]
    pub pinning: String,
    /// The durations and counts of this mode, in words.
    #[arg(long, default_value = "")]
    pub durations: String,
    /// The two servers and their settings, in words.
    #[arg(long, default_value = "")]
    pub servers: String,
    /// How long the run took, in words.
    #[arg(long, default_value = "")]
    pub elapsed: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
    /// Shown without a ratio (counts, fairness).
    NoRatio,
}

/// One row: a JSON key (or two, shown `a / b`), a label and which way is
/// better.
struct Metric {
    key: &'static str,
    key2: Option<&'static str>,
    label: &'static str,
    better: Better,
}

const fn m(key: &'static str, label: &'static str, better: Better) -> Metric {
    Metric {
        key,
        key2: None,
        label,
        better,
    }
}

const fn pair(key: &'static str, key2: &'static str, label: &'static str) -> Metric {
    Metric {
        key,
        key2: Some(key2),
        label,
        better: Better::NoRatio,
    }
}

use Better::{Higher, Lower, NoRatio};

const ERRORS: Metric = m("errors", "client errors", NoRatio);
const SERVER_BUSY: Metric = m("server_cpu_pct", "server CPU busy (% of one core)", NoRatio);
const LOADGEN_BUSY: Metric = m(
    "loadgen_cpu_pct",
    "load generator CPU busy (% of one core)",
    NoRatio,
);
const PROGRESS: Metric = m("all_progressed", "every connection progressed", NoRatio);

const CHURN: &[Metric] = &[
    m("conns_per_s", "connections/s", Higher),
    m("p50_us", "latency p50 (µs)", Lower),
    m("p99_us", "latency p99 (µs)", Lower),
    m("cpu_us_per_op", "server CPU per connection (µs)", Lower),
    pair(
        "per_worker_min",
        "per_worker_max",
        "connections per client, min / max",
    ),
    SERVER_BUSY,
    LOADGEN_BUSY,
    PROGRESS,
    ERRORS,
];

const PINGPONG: &[Metric] = &[
    m("rt_per_s", "round trips/s", Higher),
    m("mb_per_s", "payload MB/s (one way)", Higher),
    m("p50_us", "latency p50 (µs)", Lower),
    m("p99_us", "latency p99 (µs)", Lower),
    m("p999_us", "latency p99.9 (µs)", Lower),
    m("cpu_us_per_op", "server CPU per round trip (µs)", Lower),
    pair(
        "per_worker_min",
        "per_worker_max",
        "round trips per connection, min / max",
    ),
    SERVER_BUSY,
    LOADGEN_BUSY,
    PROGRESS,
    ERRORS,
];

const BULK: &[Metric] = &[
    m("mb_per_s", "MB/s echoed (10^6 B, each way)", Higher),
    m("cpu_us_per_mb", "server CPU per MB (µs)", Lower),
    m("p50_us", "chunk echo latency p50 (µs)", Lower),
    m("p99_us", "chunk echo latency p99 (µs)", Lower),
    m("p999_us", "chunk echo latency p99.9 (µs)", Lower),
    pair(
        "per_conn_mb_min",
        "per_conn_mb_max",
        "MB per connection, min / max",
    ),
    SERVER_BUSY,
    LOADGEN_BUSY,
    PROGRESS,
    ERRORS,
];

const IDLE: &[Metric] = &[
    pair("conns", "alive", "connections held / still answering"),
    m("rss_per_conn_kb", "server RSS per connection (KiB)", Lower),
    m("rss_before_kb", "server RSS before (KiB)", Lower),
    m("rss_after_kb", "server RSS with all held (KiB)", Lower),
    m(
        "pte_per_conn_kb",
        "server page tables per connection (KiB; VmPTE, not in RSS)",
        Lower,
    ),
    m(
        "mem_per_conn_kb",
        "RSS + page tables per connection (KiB)",
        Lower,
    ),
    m("maps_per_conn", "memory mappings per connection", NoRatio),
    m("conns_per_s", "connections/s while opening", Higher),
    m("p50_us", "connect + echo p50 (µs)", Lower),
    m("p99_us", "connect + echo p99 (µs)", Lower),
    m(
        "cpu_us_per_op",
        "server CPU per connection opened (µs)",
        Lower,
    ),
    PROGRESS,
    ERRORS,
];

const STARTUP: &[Metric] = &[
    m(
        "first_echo_ms_p50",
        "start to first echo, median (ms)",
        Lower,
    ),
    m(
        "first_echo_ms_p99",
        "start to first echo, worst (ms)",
        Lower,
    ),
    m(
        "listening_ms_p50",
        "start to `listening on`, median (ms)",
        Lower,
    ),
    m("cpu_ms_p50", "server CPU to first echo, median (ms)", Lower),
    m("runs", "runs", NoRatio),
    ERRORS,
];

const INSTANTIATE: &[Metric] = &[
    m("median_us", "median (µs)", Lower),
    m(
        "socket_teardown_us",
        "of which socket half-close + close, as native pays (µs)",
        NoRatio,
    ),
    m(
        "wasm_part_us",
        "wasm part: the above minus the socket teardown (µs)",
        Lower,
    ),
    m(
        "sandbox_median_us",
        "sandbox alone, median: Store, instantiate, empty `handle` on in-memory streams, drop (µs)",
        Lower,
    ),
    m("sandbox_p90_us", "sandbox alone, p90 (µs)", Lower),
    m(
        "sandbox_loop_median_us",
        "sandbox alone back to back (warm caches, as criterion times it), median (µs)",
        Lower,
    ),
    m(
        "sandbox_loop_p90_us",
        "sandbox alone back to back, p90 (µs)",
        Lower,
    ),
    m("p90_us", "p90 (µs)", Lower),
    m("min_us", "min (µs)", Lower),
    m("iters", "iterations", NoRatio),
    ERRORS,
];

struct Section {
    title: String,
    what: String,
    metrics: &'static [Metric],
}

fn section(test: &str) -> Section {
    let (title, what, metrics): (String, String, _) = match test {
        "churn" => (
            "Churn".into(),
            "Concurrent clients each loop: connect, 64 B echo, half-close, wait for the \
             server's close. Latency is the whole connection."
                .into(),
            CHURN,
        ),
        "bulk" => (
            "Bulk stream".into(),
            "10 connections, each writing 64 KiB chunks and reading the echo at the same \
             time (full duplex). Latency: from the start of a chunk's write to its last byte \
             echoed back, mostly time queued in socket and server buffers (wasm-sockserver \
             buffers at most 64 KiB per direction, so less queues there)."
                .into(),
            BULK,
        ),
        "startup" => (
            "Start-up".into(),
            "Spawn the server binary (pinned like the rest), read `listening on IP:PORT`, \
             connect, one 64 B echo. When the server keeps compiled code on disk, it runs \
             with a private cache directory warmed by one unmeasured start."
                .into(),
            STARTUP,
        ),
        "startup-compile" => (
            "Start-up, compiling the component".into(),
            "As above, but wasm-sockserver runs with `--no-cache`, so it compiles the \
             component with Cranelift at every start (the first start on a machine, or after \
             the component or the server changed). The native row is the same measurement \
             as above, repeated."
                .into(),
            STARTUP,
        ),
        "instantiate" => (
            "Micro: instantiate + empty handle".into(),
            "`cargo bench --bench instantiate`: `serve_stream` on a loopback socket whose \
             client already half-closed, so echo's `handle` returns at once: a Store, \
             instantiation from the pool, the call, and teardown. The same socket teardown \
             without wasm is timed too and subtracted; and `run_handler` on in-memory \
             streams (input already closed, output a sink) times the sandbox alone, once \
             between those sockets (cold caches) and once back to back. No native \
             counterpart."
                .into(),
            INSTANTIATE,
        ),
        t if t.starts_with("pingpong-") => {
            let size = &t["pingpong-".len()..];
            let shown = match size {
                "16384" => "16 KiB".to_string(),
                s => format!("{s} B"),
            };
            (
                format!("Ping-pong, {shown}"),
                format!(
                    "100 connections, each sending one {shown} message and waiting for its \
                     echo, in a loop."
                ),
                PINGPONG,
            )
        }
        t if t.starts_with("idle-") => {
            let n = &t["idle-".len()..];
            (
                format!("Idle, {n} connections"),
                format!(
                    "Open {n} connections (one 64 B echo each, from several 127.0.0.x source \
                     addresses), hold them, read the server's VmRSS; RSS per connection is the \
                     VmRSS delta / N; page tables (VmPTE) are \
                     counted the same way. Then every held connection must echo once more."
                ),
                IDLE,
            )
        }
        t => (t.to_string(), String::new(), PINGPONG),
    };
    Section {
        title,
        what,
        metrics,
    }
}

/// Where a test goes in the report.
fn order(test: &str) -> (u32, u64) {
    let n = |prefix: &str| test[prefix.len()..].parse::<u64>().unwrap_or(0);
    match test {
        "churn" => (0, 0),
        t if t.starts_with("pingpong-") => (1, n("pingpong-")),
        "bulk" => (2, 0),
        t if t.starts_with("idle-") => (3, n("idle-")),
        "instantiate" => (4, 0),
        "startup" => (5, 0),
        "startup-compile" => (5, 1),
        _ => (6, 0),
    }
}

/// 1234567 → "1,234,567"; 123.4 → "123"; 12.34 → "12.3"; 1.234 → "1.23".
fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let digits = format!("{:.0}", a);
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(result: Option<&Value>, metric: &Metric) -> String {
    let Some(result) = result else {
        return "—".into();
    };
    if result.get("skipped").is_some() {
        return "skipped".into();
    }
    if result.get("failed").is_some() {
        return "failed".into();
    }
    let show = |v: Option<&Value>| match v {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(count) if count < 1000 => count.to_string(),
            _ => n.as_f64().map(number).unwrap_or_default(),
        },
        Some(Value::Bool(b)) => if *b { "yes" } else { "**no**" }.into(),
        Some(Value::String(s)) => s.clone(),
        _ => "—".into(),
    };
    let first = show(result.get(metric.key));
    let text = match metric.key2 {
        Some(k2) => format!("{first} / {}", show(result.get(k2))),
        None => first,
    };
    if metric.key == "errors" && result.get("errors").and_then(Value::as_u64).unwrap_or(0) > 0 {
        format!("**{text}**")
    } else {
        text
    }
}

fn ratio(native: Option<&Value>, wasm: Option<&Value>, metric: &Metric) -> String {
    if metric.better == NoRatio {
        return String::new();
    }
    let get = |r: Option<&Value>| r.and_then(|r| r.get(metric.key)).and_then(Value::as_f64);
    match (get(native), get(wasm)) {
        (Some(n), Some(w)) if n > 0.0 => format!("{:.2}×", w / n),
        _ => "—".into(),
    }
}

pub fn report(args: ReportArgs) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("cannot read {}", args.results.display()))?;
    // test → server → result (the last one wins).
    let mut tests: BTreeMap<(u32, u64, String), BTreeMap<String, Value>> = BTreeMap::new();
    let mut notes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", args.results.display(), i + 1))?;
        if value.get("kind").and_then(Value::as_str) == Some("note") {
            if let Some(t) = value.get("text").and_then(Value::as_str) {
                notes.push(t.to_string());
            }
            continue;
        }
        let test = value
            .get("test")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let server = value
            .get("server")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let (a, b) = order(&test);
        tests.entry((a, b, test)).or_default().insert(server, value);
    }

    let mut errors = 0u64;
    let mut failed = 0u64;
    let mut md = String::new();
    let title = match args.mode.as_str() {
        "full" => "Benchmarks".to_string(),
        mode => format!("Benchmarks ({mode} run)"),
    };
    let _ = writeln!(md, "# {title}\n");
    let _ = writeln!(
        md,
        "wasm-sockserver (one fresh WebAssembly component instance per connection, running \
         the echo handler) against a plain tokio echo server \
         (`bench/native-echo`), both over loopback, measured by `bench/loadgen`. \
         Regenerate with `bash bench/run.sh` (`--quick` for a shorter run).\n"
    );
    if args.mode == "smoke" {
        let _ = writeln!(
            md,
            "**Smoke run**: about a second per test and tiny counts, to prove the harness \
             works. The figures mean nothing.\n"
        );
    }
    let _ = writeln!(md, "## Conditions\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let rows = [
        ("date", args.started.clone()),
        ("mode", args.mode.clone()),
        ("CPUs (`nproc`)", args.nproc.clone()),
        ("CPU model", sys::cpu_model()),
        ("kernel", sys::kernel()),
        ("pinning", args.pinning.clone()),
        ("durations", args.durations.clone()),
        (
            "load average at start (`/proc/loadavg`)",
            args.loadavg.clone(),
        ),
        ("run took", args.elapsed.clone()),
        ("servers", args.servers.clone()),
        (
            "server CPU",
            "utime + stime of the server process from `/proc/PID/stat` over the measured \
             window (10 ms ticks); for start-up, the sum of `/proc/PID/task/*/schedstat` (ns)"
                .into(),
        ),
    ];
    for (k, v) in rows {
        if !v.is_empty() {
            let _ = writeln!(md, "| {k} | {} |", v.replace('|', "\\|"));
        }
    }
    let load: Option<f64> = args
        .loadavg
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok());
    let cpus: Option<f64> = args.nproc.trim().parse().ok();
    if let (Some(load), Some(cpus)) = (load, cpus)
        && load > 0.25 * cpus
    {
        let _ = writeln!(
            md,
            "\n**The machine was busy**: a 1-minute load average of {load} on {cpus} CPUs \
             when the run started, so these figures are noisy. Rerun on a quiet machine."
        );
    }
    let _ = writeln!(
        md,
        "\nEvery ratio is **wasm-sockserver / native**. Throughput (*better: higher*): a \
         ratio below 1 is what the sandbox costs. Latency, CPU and memory (*better: lower*): \
         a ratio above 1 is what the sandbox costs.\n"
    );

    for ((_, _, test), by_server) in &tests {
        let s = section(test);
        let native = by_server.get("native");
        let wasm = by_server.get("wasm");
        let _ = writeln!(md, "## {}\n", s.title);
        if !s.what.is_empty() {
            let _ = writeln!(md, "{}\n", s.what);
        }
        let measured = |r: Option<&Value>| {
            r.is_some_and(|r| r.get("skipped").is_none() && r.get("failed").is_none())
        };
        let has_table = measured(native) || measured(wasm);
        if has_table {
            let _ = writeln!(
                md,
                "| metric | better | native | wasm-sockserver | wasm/native |"
            );
            let _ = writeln!(md, "|---|---|--:|--:|--:|");
        }
        for metric in s.metrics.iter().filter(|_| has_table) {
            let better = match metric.better {
                Higher => "higher",
                Lower => "lower",
                NoRatio => "",
            };
            let _ = writeln!(
                md,
                "| {} | {better} | {} | {} | {} |",
                metric.label,
                if test == "instantiate" {
                    "n/a".into()
                } else {
                    cell(native, metric)
                },
                cell(wasm, metric),
                ratio(native, wasm, metric)
            );
        }
        // (text, servers it applies to), in order.
        let mut remarks: Vec<(String, Vec<&str>)> = Vec::new();
        let mut remark =
            |name: &'static str, text: String| match remarks.iter_mut().find(|(t, _)| *t == text) {
                Some((_, names)) => names.push(name),
                None => remarks.push((text, vec![name])),
            };
        for (server, result) in by_server {
            let name = match server.as_str() {
                "wasm" => "wasm-sockserver",
                "native" => "native",
                _ => "?",
            };
            if let Some(reason) = result.get("skipped").and_then(Value::as_str) {
                remark(name, format!("skipped: {reason}"));
            }
            if let Some(reason) = result.get("failed").and_then(Value::as_str) {
                failed += 1;
                remark(name, format!("**failed**: {reason}"));
            }
            let e = result.get("errors").and_then(Value::as_u64).unwrap_or(0);
            errors += e;
            if e > 0 {
                let first = result
                    .get("first_error")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                remark(name, format!("{e} client errors, the first: {first}"));
            }
            if result.get("all_progressed") == Some(&Value::Bool(false)) {
                remark(name, "**not every connection made progress**".into());
            }
            if let Some(busy) = result.get("server_cpu_pct").and_then(Value::as_f64)
                && busy < 80.0
            {
                remark(
                    name,
                    format!(
                        "the server was busy only {busy:.0}% of its core: this throughput was \
                         limited by the load generator or by other load on the machine, not by \
                         the server (compare the CPU per operation instead)"
                    ),
                );
            }
            if let Some(hint) = result.get("hint").and_then(Value::as_str) {
                remark(name, hint.to_string());
            }
        }
        if !remarks.is_empty() {
            if has_table {
                let _ = writeln!(md);
            }
            for (text, names) in remarks {
                let who = if names.len() > 1 {
                    "both servers".to_string()
                } else {
                    names[0].to_string()
                };
                let _ = writeln!(md, "- {who}: {text}");
            }
        }
        let _ = writeln!(md);
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "## Notes\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        let _ = writeln!(md);
    }
    std::fs::write(&args.out, md)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok((errors, failed))
}
