//! A handler that traps ends its own connection and nothing else.

use wasm_sockserver::OutcomeKind;

use crate::util::{TestServer, config, ping, read_to_close};

/// Ensure that while B crashes its instance, A keeps echoing on its own,
/// and a new connection C is served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_ends_only_its_connection() {
    let server = TestServer::start(config("crash")).await;
    let mut a = server.connect().await;
    assert_eq!(ping(&mut a, b"before").await, b"before");

    let mut b = server.connect().await;
    assert_eq!(ping(&mut b, b"hello").await, b"hello");
    tokio::io::AsyncWriteExt::write_all(&mut b, b"crash")
        .await
        .unwrap();
    let (rest, reset) = read_to_close(&mut b).await;
    assert!(rest.is_empty(), "the crashing connection echoed {rest:?}");
    assert!(
        reset,
        "a trapped connection must be reset, not closed like a finished one"
    );
    server
        .wait_for("B's trap to be counted", |s| {
            s.outcomes(OutcomeKind::Trap) == 1
        })
        .await;

    assert_eq!(ping(&mut a, b"during").await, b"during");
    let mut c = server.connect().await;
    assert_eq!(ping(&mut c, b"after").await, b"after");
    assert_eq!(ping(&mut a, b"still here").await, b"still here");
    drop((a, c));
    server
        .wait_for("all connections to close", |s| {
            s.closed() == 3 && s.live_stores() == 0
        })
        .await;
    assert_eq!(server.stats.outcomes(OutcomeKind::Trap), 1);
    assert_eq!(server.stats.outcomes(OutcomeKind::Ok), 2);
    server.stop().await;
}
