//! The echo handler returns exactly what it is sent.

use crate::util::{TestServer, config, pattern, ping, roundtrip};

/// Ensure a single byte comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte() {
    let server = TestServer::start(config("echo")).await;
    let got = roundtrip(server.connect().await, b"x").await;
    assert_eq!(got, b"x");
    server.stop().await;
}

/// Ensure 1 MiB of pseudo-random bytes comes back exact, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte() {
    let server = TestServer::start(config("echo")).await;
    let data = pattern(1 << 20, 1);
    let got = roundtrip(server.connect().await, &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    server.stop().await;
}

/// Ensure 64 concurrent clients × 100 round trips each all get their own
/// bytes back, and every Store is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients() {
    let server = TestServer::start(config("echo")).await;
    let mut clients = Vec::new();
    for client in 0..64u64 {
        let mut stream = server.connect().await;
        clients.push(tokio::spawn(async move {
            for round in 0..100u64 {
                let msg = pattern(
                    1 + ((client * 37 + round * 11) % 300) as usize,
                    client * 1000 + round,
                );
                assert_eq!(
                    ping(&mut stream, &msg).await,
                    msg,
                    "client {client} round {round}"
                );
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    server
        .wait_for("all 64 connections to close", |s| {
            s.closed() == 64 && s.live_stores() == 0
        })
        .await;
    assert_eq!(server.stats.outcomes(wasm_sockserver::OutcomeKind::Ok), 64);
    server.stop().await;
}

/// Ensure a client that writes 100 KB and half-closes gets every byte back
/// and then EOF: FIN makes `input` report closed while the handler still
/// writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close() {
    let server = TestServer::start(config("echo")).await;
    let data = pattern(100_000, 7);
    let got = roundtrip(server.connect().await, &data).await;
    assert!(
        got == data,
        "got {} bytes back, expected {}",
        got.len(),
        data.len()
    );
    server
        .wait_for("the connection to close", |s| s.closed() == 1)
        .await;
    assert_eq!(server.stats.outcomes(wasm_sockserver::OutcomeKind::Ok), 1);
    server.stop().await;
}

/// Ensure the state every connection's task keeps for its whole life stays
/// small: idle connections are held by the ten thousand, and a buffer
/// inside the future (a 4 KiB drain array once made it 4.9 KB) would cost
/// that much per connection even while it sleeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_future_is_small() {
    let runtime = wasm_sockserver::Runtime::load(
        &crate::util::guest("echo"),
        &wasm_sockserver::Limits::default(),
        4,
    )
    .unwrap();
    let stats = wasm_sockserver::Stats::default();
    let cancel = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_client, tcp, peer) = crate::util::connect_pair(&listener).await;
    let future = wasm_sockserver::serve_stream(&runtime, &stats, tcp, peer, 1, &cancel);
    let size = std::mem::size_of_val(&future);
    assert!(size <= 2048, "serve_stream's future is {size} bytes");
}
