//! Load generator for wasm-sockserver and the native baseline, over
//! loopback only. Each test subcommand prints one JSON line of results on
//! stdout; `report` turns a file of them into the Markdown report.
//!
//! The server's CPU time (utime + stime) and RSS come from /proc/PID of the
//! `--pid` given. At start the open-file soft limit is raised to the hard
//! limit.

mod common;
mod exact;
mod report;
mod startup;
mod sys;
mod tests;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

#[derive(Parser)]
#[command(about = "Loopback load generator for bench/run.sh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect, echo 64 B, close, with many concurrent clients.
    Churn(tests::ChurnArgs),
    /// Round trips of one message size on many connections.
    Pingpong(tests::PingPongArgs),
    /// Full-duplex streaming on a few connections.
    Bulk(tests::BulkArgs),
    /// Open and hold many connections; server RSS per connection.
    Idle(tests::IdleArgs),
    /// Time from spawning the server to its first echo.
    Startup(startup::StartupArgs),
    /// Exactly N churn connections or round trips, untimed (bench/instr.sh).
    Exact(exact::ExactArgs),
    /// Print a JSON line that records a skipped or failed test, or a note.
    Note(NoteArgs),
    /// Write the Markdown report from the JSON lines of a run. Exits 3 when
    /// a test failed or clients saw errors.
    Report(report::ReportArgs),
}

#[derive(clap::Args)]
struct NoteArgs {
    #[arg(long)]
    test: Option<String>,
    #[arg(long)]
    server: Option<String>,
    /// Why the test did not run.
    #[arg(long)]
    skipped: Option<String>,
    /// Why the test failed.
    #[arg(long)]
    failed: Option<String>,
    /// What a user must change to run it.
    #[arg(long)]
    hint: Option<String>,
    /// A free-form note for the report.
    #[arg(long)]
    text: Option<String>,
}

fn note(args: NoteArgs) -> Value {
    let mut out = Map::new();
    if let Some(text) = args.text {
        out.insert("kind".into(), json!("note"));
        out.insert("text".into(), json!(text));
        return Value::Object(out);
    }
    out.insert("test".into(), json!(args.test));
    out.insert("server".into(), json!(args.server));
    for (key, value) in [
        ("skipped", args.skipped),
        ("failed", args.failed),
        ("hint", args.hint),
    ] {
        if let Some(v) = value {
            out.insert(key.into(), json!(v));
        }
    }
    Value::Object(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    sys::raise_nofile();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> Result<ExitCode> {
    // Pinned to one CPU (bench/run.sh), a current-thread runtime avoids
    // hand-offs between the main thread and a lone worker.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Runtime::new()?
    };
    let value = match command {
        Cmd::Churn(args) => runtime.block_on(tests::churn(args))?,
        Cmd::Pingpong(args) => runtime.block_on(tests::pingpong(args))?,
        Cmd::Bulk(args) => runtime.block_on(tests::bulk(args))?,
        Cmd::Idle(args) => runtime.block_on(tests::idle(args))?,
        Cmd::Startup(args) => runtime.block_on(startup::startup(args))?,
        Cmd::Exact(args) => runtime.block_on(exact::exact(args))?,
        Cmd::Note(args) => note(args),
        Cmd::Report(args) => {
            let out = args.out.clone();
            let (errors, failed) = report::report(args)?;
            eprintln!(
                "loadgen: wrote {}: {failed} failed tests, {errors} client errors",
                out.display()
            );
            return Ok(if errors > 0 || failed > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    println!("{value}");
    Ok(ExitCode::SUCCESS)
}
