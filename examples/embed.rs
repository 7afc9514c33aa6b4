//! Embedding wasm-sockserver as a library: load a handler, bind (port 0 by
//! default), serve until Ctrl-C, and report the counters on the way out.
//!
//! ```text
//! bash scripts/build-guests.sh
//! cargo run --example embed -- guest/target/wasm32-wasip2/release/echo.wasm [ADDR]
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use wasm_sockserver::{Config, OutcomeKind, Server};

#[tokio::main]
async fn main() -> Result<()> {
    // The binary's log sink: a stalled reader of stderr never stalls the
    // server.
    wasm_sockserver::logging::init();
    let mut args = std::env::args().skip(1);
    let module = args.next().context("usage: embed MODULE.wasm [ADDR]")?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());

    let mut config = Config::new(module);
    config.max_connections = 1000;
    config.idle_timeout = Duration::from_secs(60);
    let server = Server::new(&config)?;
    let stats = server.stats();
    tokio::spawn(wasm_sockserver::logging::report_drops());
    let listener = wasm_sockserver::bind(addr.parse().context("invalid address")?)?;
    println!("listening on {}", listener.local_addr()?);

    server
        .run(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;

    println!("served {} connections:", stats.accepted());
    for kind in OutcomeKind::ALL {
        println!("  {:>12}: {}", kind.name(), stats.outcomes(kind));
    }
    wasm_sockserver::logging::flush();
    Ok(())
}
