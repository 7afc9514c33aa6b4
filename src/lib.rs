//! wasm-sockserver: serve TCP with a fresh, sandboxed WebAssembly component
//! instance per connection.
//!
//! The host owns the listener, the acceptor and the supervision of
//! connections; the handler component owns the business logic and sees
//! nothing but its own connection, as in Erlang's generic socket server and
//! ranch. A trap, a runaway loop or a memory blow-up ends one connection and
//! nothing else.
//!
//! Layout, one module per role:
//! - [`config`]: command-line options and their validation;
//! - [`server`]: `bind`, the acceptor loop, back-off and shutdown drain;
//! - [`connection`]: one connection's Store, `handle` call and outcome;
//! - [`runtime`]: the engine, component loading and checks, the epoch ticker;
//! - [`reload`]: a new build of the handler for new connections (SIGHUP);
//! - [`streams`]: the socket as `wasi:io` input and output streams;
//! - [`hostcalls`]: the hot stream calls served straight from the socket;
//! - [`limits`]: per-connection limits, the memory limiter and CPU meter;
//! - [`guest_log`]: guest stdout/stderr as tagged log lines;
//! - [`stats`]: counters and gauges for embedders and tests;
//! - [`logging`]: log lines to stderr off the serving threads;
//! - [`metrics`]: those counters over HTTP for Prometheus (`--metrics`);
//! - [`trim`]: the host heap given back after a burst of connections;
//! - [`cache`]: compiled components kept on disk between runs;
//! - [`bindings`]: the host bindings generated from `wit/`.
//!
//! Embedding:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let config = wasm_sockserver::Config::new("echo.wasm");
//! let server = wasm_sockserver::Server::new(&config)?;
//! let listener = wasm_sockserver::bind("127.0.0.1:0".parse()?)?;
//! println!("listening on {}", listener.local_addr()?);
//! server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod bindings;
pub mod cache;
pub mod config;
pub mod connection;
pub mod guest_log;
pub mod hostcalls;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod streams;
pub mod trim;

pub use config::Config;
pub use connection::{ConnectionInfo, LocalAddr, Outcome, Served, run_handler, serve_stream};
pub use limits::{LimitKind, Limits};
pub use reload::Reloader;
pub use runtime::Runtime;
pub use server::{Server, bind, bind_reuse_port, run};
pub use stats::{OutcomeKind, Stats};
