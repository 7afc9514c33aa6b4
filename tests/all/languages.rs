//! Handlers written in JavaScript (componentize-js), Python
//! (componentize-py) and C (wit-bindgen c + wasi-libc), built from source by
//! `scripts/build-examples.sh`, served by the real server. One server per
//! component: the big JS and Python components take seconds to compile.

use std::path::PathBuf;
use std::sync::OnceLock;

use wasm_sockserver::{Config, OutcomeKind};

use crate::util::{TestServer, guest, install, pattern, ping, root, roundtrip, tempdir};

/// The path of `examples/build/NAME.wasm`, building every example (once per
/// test run) with the same script a developer uses.
fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = std::process::Command::new("bash")
            .arg(root().join("scripts/build-examples.sh"))
            .status()
            .expect("run scripts/build-examples.sh");
        assert!(status.success(), "building the examples failed");
    });
    let path = root().join("examples/build").join(format!("{name}.wasm"));
    assert!(path.exists(), "no example component {}", path.display());
    path
}

fn config(name: &str) -> Config {
    crate::util::config_for(example(name))
}

/// One byte, 1 MiB, then 16 concurrent clients, all on one server.
async fn echoes_exactly(name: &str) {
    let server = TestServer::start(config(name)).await;

    assert_eq!(roundtrip(server.connect().await, b"x").await, b"x");

    let data = pattern(1 << 20, 1);
    let got = roundtrip(server.connect().await, &data).await;
    assert_eq!(got.len(), data.len(), "{name}: 1 MiB echo length");
    assert!(got == data, "{name}: 1 MiB echoed bytes differ");

    let mut clients = Vec::new();
    for client in 0..16u64 {
        let mut stream = server.connect().await;
        clients.push(tokio::spawn(async move {
            for round in 0..20u64 {
                let msg = pattern(
                    1 + ((client * 37 + round * 11) % 3000) as usize,
                    client * 1000 + round,
                );
                assert_eq!(
                    ping(&mut stream, &msg).await,
                    msg,
                    "client {client} round {round}"
                );
            }
            let tail = pattern(100_000, client);
            assert!(
                roundtrip(stream, &tail).await == tail,
                "client {client} tail"
            );
        }));
    }
    for client in clients {
        client.await.unwrap();
    }

    server
        .wait_for("all 18 connections to close", |s| {
            s.closed() == 18 && s.live_stores() == 0
        })
        .await;
    assert_eq!(server.stats.outcomes(OutcomeKind::Ok), 18, "{name}");
    server.stop().await;
}

/// A sends and receives around B's crash; C connects after it.
async fn crash_is_isolated(name: &str, crash_outcome: OutcomeKind) {
    let server = TestServer::start(config(name)).await;
    crate::util::crash_ends_only_its_connection(&server, name, crash_outcome, false).await;
    server.stop().await;
}

/// Ensure the JavaScript echo handler returns exact bytes for 1 byte, 1 MiB
/// and 16 concurrent clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_echo() {
    echoes_exactly("js-echo").await;
}

/// Ensure a JavaScript handler that throws an Error ends only its own
/// connection (outcome `trap`: only a thrown string becomes `err`), while
/// other connections keep echoing and new ones are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_crash() {
    crash_is_isolated("js-crash", OutcomeKind::Trap).await;
}

/// Ensure the Python echo handler returns exact bytes for 1 byte, 1 MiB and
/// 16 concurrent clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_echo() {
    echoes_exactly("python-echo").await;
}

/// Ensure a Python handler that raises ends only its own connection
/// (outcome `trap`), while other connections keep echoing and new ones are
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_crash() {
    crash_is_isolated("python-crash", OutcomeKind::Trap).await;
}

/// Ensure the C echo handler returns exact bytes for 1 byte, 1 MiB and 16
/// concurrent clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_echo() {
    echoes_exactly("c-echo").await;
}

/// Ensure a C handler that calls abort() ends only its own connection
/// (outcome `trap`), while other connections keep echoing and new ones are
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_crash() {
    crash_is_isolated("c-crash", OutcomeKind::Trap).await;
}

/// Ensure a reload may change the handler's language, whatever the new
/// toolchain's count of core instances per connection: the C echo has 4, a
/// Rust handler 3, the Python echo 14, and the pool was sized at start from
/// the first. Each new connection gets the component of the last reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_across_languages() {
    let dir = tempdir();
    let module = dir.join("handler.wasm");
    install(&example("c-echo"), &module);
    let server = TestServer::start(crate::util::config_for(module.clone())).await;
    assert_eq!(
        roundtrip(server.connect().await, b"from C").await,
        b"from C"
    );

    install(&guest("connid"), &module);
    assert_eq!(server.reloader.reload().await.unwrap(), 2);
    let reply = String::from_utf8(roundtrip(server.connect().await, b"").await).unwrap();
    assert!(reply.starts_with("2 127.0.0.1:"), "{reply:?}");

    install(&example("python-echo"), &module);
    assert_eq!(server.reloader.reload().await.unwrap(), 3);
    let data = pattern(100_000, 3);
    assert!(roundtrip(server.connect().await, &data).await == data);

    server
        .wait_for("three connections closed", |s| s.closed() == 3)
        .await;
    assert_eq!(server.stats.outcomes(OutcomeKind::Ok), 3);
    assert_eq!(server.stats.reloads(), 2);
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
