//! A handler that traps ends its own connection and nothing else.

use wasm_sockserver::OutcomeKind;

use crate::util::{TestServer, config, crash_ends_only_its_connection};

/// Ensure that while B crashes its instance, A keeps echoing on its own,
/// B is reset with nothing echoed, and a new connection C is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_ends_only_its_connection() {
    let server = TestServer::start(config("crash")).await;
    crash_ends_only_its_connection(&server, "crash", OutcomeKind::Trap, true).await;
    server.stop().await;
}
