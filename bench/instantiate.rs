//! Micro benchmark: what one connection costs wasm-sockserver before any
//! byte moves. `serve_stream` on a loopback socket whose client side has
//! already shut down its write half, so the echo handler's `handle` returns
//! at once: a Store, instantiation from the pooling allocator, the empty
//! call, flush, close and teardown. Socket setup is not timed. Each
//! iteration also times the same socket teardown without wasm (what a
//! native server pays too) and `run_handler` on in-memory streams (input
//! already closed, output a sink): the sandbox alone. Then the sandbox alone
//! runs back to back, as criterion would time it, with warm caches.
//!
//! `cargo bench --bench instantiate [-- --iters N --module PATH]` (cargo
//! passes `--bench`) measures 20 000 iterations and prints the median and
//! p90, then one JSON line for bench/run.sh. Without `--bench` (as under
//! `cargo test --all-targets`) it is a 50-iteration smoke run, which also
//! passes when the echo component has not been built.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wasm_sockserver::{
    ConnectionInfo, Limits, LocalAddr, Outcome, Runtime, Stats, run_handler, serve_stream,
};
use wasmtime_wasi::p2::pipe::{ClosedInputStream, SinkOutputStream};

const BENCH_ITERS: usize = 20_000;
const SMOKE_ITERS: usize = 50;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let iters = flag(&args, "--iters")
        .and_then(|n| n.parse().ok())
        .unwrap_or(if bench { BENCH_ITERS } else { SMOKE_ITERS })
        .max(1);
    let echo = flag(&args, "--module").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("guest/target/wasm32-wasip2/release/echo.wasm")
        },
        PathBuf::from,
    );
    if !echo.exists() {
        eprintln!(
            "instantiate: {} not found: build it with `bash scripts/build-guests.sh`",
            echo.display()
        );
        if bench {
            std::process::exit(1);
        }
        eprintln!("instantiate: smoke run skipped");
        return;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let measured = runtime.block_on(measure(&echo, iters));
    report(&measured, bench);
    if measured.failures.count > 0 {
        std::process::exit(1);
    }
}

/// The value after `name` on the command line.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
}

/// Sorted durations of each measurement.
struct Measured {
    /// `serve_stream` on a half-closed socket.
    samples: Vec<Duration>,
    /// The same socket teardown without wasm (the part a native server pays
    /// too).
    baseline: Vec<Duration>,
    /// The sandbox alone (the handler on in-memory streams: input already
    /// closed, output a sink) between those sockets.
    sandbox: Vec<Duration>,
    /// The sandbox alone back to back (how criterion would time it: warm
    /// caches).
    back_to_back: Vec<Duration>,
    failures: Failures,
}

/// Runs that did not end `ok`; the first is reported.
#[derive(Default)]
struct Failures {
    count: u64,
}

impl Failures {
    fn check(&mut self, what: &str, outcome: &Outcome) {
        if *outcome != Outcome::Ok {
            self.count += 1;
            if self.count == 1 {
                eprintln!("instantiate: {what} ended {outcome:?}");
            }
        }
    }
}

/// Time `iters` connections, and the sandbox alone, after a short warm-up.
async fn measure(echo: &std::path::Path, iters: usize) -> Measured {
    let wasm = Runtime::load(echo, &Limits::default(), 64).expect("load the echo component");
    let stats = Stats::default();
    let cancel = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");

    let warmup = (iters / 10).clamp(5, 500);
    let mut samples = Vec::with_capacity(iters);
    let mut baseline = Vec::with_capacity(iters);
    let mut sandbox = Vec::with_capacity(iters);
    let mut failures = Failures::default();
    for i in 0..warmup + iters {
        // A connection whose client has already sent FIN.
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut client = client.expect("connect");
        let (server, peer) = server.expect("accept");
        client.shutdown().await.expect("half-close");

        let started = Instant::now();
        let served = serve_stream(&wasm, &stats, server, peer, i as u64, &cancel).await;
        let elapsed = started.elapsed();
        failures.check("connection", &served.outcome);
        drop(client);

        // The same connection life with no wasm: half-close and close, as a
        // native echo server does when its client has half-closed.
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut client = client.expect("connect");
        let (mut server, _) = server.expect("accept");
        client.shutdown().await.expect("half-close");
        let started = Instant::now();
        let _ = server.shutdown().await;
        drop(server);
        let teardown = started.elapsed();
        drop(client);

        let alone = sandbox_alone(&wasm, &stats, i as u64, addr, &mut failures).await;

        if i >= warmup {
            samples.push(elapsed);
            baseline.push(teardown);
            sandbox.push(alone);
        }
    }
    let mut back_to_back = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let alone = sandbox_alone(&wasm, &stats, i as u64, addr, &mut failures).await;
        if i >= warmup {
            back_to_back.push(alone);
        }
    }
    for sorted in [&mut samples, &mut baseline, &mut sandbox, &mut back_to_back] {
        sorted.sort();
    }
    Measured {
        samples,
        baseline,
        sandbox,
        back_to_back,
        failures,
    }
}

/// One run of the handler on in-memory streams (input already closed,
/// output a sink): Store, instantiation, the empty `handle`, teardown.
/// Returns its duration.
async fn sandbox_alone(
    wasm: &Runtime,
    stats: &Stats,
    id: u64,
    addr: SocketAddr,
    failures: &mut Failures,
) -> Duration {
    // Any address will do: echo never asks.
    let info = ConnectionInfo {
        id,
        peer: addr,
        local: LocalAddr::Known(addr),
    };
    let started = Instant::now();
    let outcome = run_handler(
        wasm,
        stats,
        info,
        Box::new(ClosedInputStream),
        Box::new(SinkOutputStream),
    )
    .await;
    let alone = started.elapsed();
    failures.check("in-memory run", &outcome);
    alone
}

/// The duration at quantile `q` of `sorted`, in µs.
fn at(sorted: &[Duration], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

fn report(measured: &Measured, bench: bool) {
    let Measured {
        samples,
        baseline,
        sandbox,
        back_to_back,
        failures,
    } = measured;
    let failures = failures.count;
    let (min, median, p90, p99) = (
        at(samples, 0.0),
        at(samples, 0.5),
        at(samples, 0.9),
        at(samples, 0.99),
    );
    let teardown = at(baseline, 0.5);
    let wasm_part = median - teardown;
    let (alone, alone_p90) = (at(sandbox, 0.5), at(sandbox, 0.9));
    let (looped, looped_p90) = (at(back_to_back, 0.5), at(back_to_back, 0.9));
    println!(
        "instantiate + empty handle ({} iterations{}): median {median:.1} µs, p90 {p90:.1} µs, \
         p99 {p99:.1} µs, min {min:.1} µs, failures {failures}; socket teardown alone {teardown:.1} µs, \
         so the wasm part is {wasm_part:.1} µs; the sandbox alone on in-memory streams: median \
         {alone:.1} µs, p90 {alone_p90:.1} µs; back to back: median {looped:.1} µs, p90 \
         {looped_p90:.1} µs",
        samples.len(),
        if bench { "" } else { ", smoke run" },
    );
    println!(
        "{{\"test\":\"instantiate\",\"server\":\"wasm\",\"iters\":{},\"median_us\":{median:.3},\
         \"p90_us\":{p90:.3},\"p99_us\":{p99:.3},\"min_us\":{min:.3},\"socket_teardown_us\":{teardown:.3},\
         \"wasm_part_us\":{wasm_part:.3},\"sandbox_median_us\":{alone:.3},\"sandbox_p90_us\":{alone_p90:.3},\
         \"sandbox_loop_median_us\":{looped:.3},\"sandbox_loop_p90_us\":{looped_p90:.3},\
         \"errors\":{failures}}}",
        samples.len()
    );
}
