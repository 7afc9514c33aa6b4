//! The one integration-test binary (wasmtime is linked once). Every test
//! talks to a real server over real sockets on 127.0.0.1.

mod cli;
mod contract;
mod echo;
mod hostile;
mod isolation;
mod languages;
mod limits;
mod logging;
mod metrics;
mod reload;
mod start;
mod streams;
mod util;
