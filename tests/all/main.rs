//! The one integration-test binary (wasmtime is linked once). Every test
//! talks to a real server over real sockets on 127.0.0.1.

mod cli;
mod contract;
mod echo;
mod isolation;
mod util;
