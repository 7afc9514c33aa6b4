//! Exact-count runs for `bench/instr.sh`: a fixed number of churn
//! connections or 64 B round trips, with no clock and no CPU window, so a
//! profiler that counts instructions (callgrind) can divide by the exact
//! number of operations the server served.

use std::sync::Arc;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::common::{Target, connect, timed};
use crate::tests::{churn_once, echo_once};

#[derive(clap::Args, Debug)]
pub struct ExactArgs {
    #[command(flatten)]
    pub target: Target,
    /// `churn` (connect, echo, close) or `pingpong` (round trips on open
    /// connections).
    #[arg(long)]
    pub kind: String,
    /// Operations in total: connections for churn, round trips for
    /// ping-pong.
    #[arg(long)]
    pub ops: u64,
    /// Concurrent clients (connections, for ping-pong).
    #[arg(long, default_value_t = 8)]
    pub clients: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
}

pub async fn exact(args: ExactArgs) -> Result<Value> {
    args.target.check()?;
    if args.clients == 0 || !args.ops.is_multiple_of(args.clients) {
        bail!("--ops must be a multiple of --clients (and --clients at least 1)");
    }
    let churn = match args.kind.as_str() {
        "churn" => true,
        "pingpong" => false,
        other => bail!("unknown --kind {other} (churn or pingpong)"),
    };
    let target = Arc::new(args.target.clone());
    let per_client = args.ops / args.clients;
    let mut handles = Vec::new();
    for client in 0..args.clients {
        let target = target.clone();
        let size = args.size;
        handles.push(tokio::spawn(async move {
            let payload: Vec<u8> = (0..size).map(|i| (i as u64 + client) as u8).collect();
            let mut buf = vec![0u8; size.max(1)];
            let limit = target.op_timeout;
            if churn {
                for _ in 0..per_client {
                    churn_once(&target, None, &payload, &mut buf).await?;
                }
                return Ok(());
            }
            let mut stream: TcpStream = timed(limit, "connect", connect(target.addr, None)).await?;
            for _ in 0..per_client {
                echo_once(&mut stream, &payload, &mut buf, limit).await?;
            }
            Ok::<(), String>(())
        }));
    }
    let mut errors = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("client task failed: {e}")),
        }
    }
    if let Some(first) = errors.first() {
        bail!(
            "{} of {} clients failed; first: {first}",
            errors.len(),
            args.clients
        );
    }
    Ok(json!({ "kind": args.kind, "ops": args.ops, "clients": args.clients }))
}
