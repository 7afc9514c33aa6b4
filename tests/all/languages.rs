//! Handlers written in JavaScript (componentize-js), Python
//! (componentize-py) and C (wit-bindgen c + wasi-libc), built from source by
//! `scripts/build-examples.sh`, and one written by hand in the component
//! text format, served by the real server. One server per
//! component: the big JS and Python components take seconds to compile.

use std::path::PathBuf;
use std::sync::OnceLock;

use wasm_sockserver::{Config, OutcomeKind};

use crate::util::{Binary, TestServer, guest, install, pattern, ping, root, roundtrip, stage};

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
    echoes_exactly_from(name, config(name)).await;
}

async fn echoes_exactly_from(name: &str, config: Config) {
    let server = TestServer::start(config).await;

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
/// the first. Each new connection gets the component of the last reload,
/// and a full server of the Python echo fits the pool sized for the C one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_across_languages() {
    const MAX: usize = 4;
    let (dir, module) = stage(&example("c-echo"));
    let mut config = crate::util::config_for(module.clone());
    config.max_connections = MAX as u32;
    let server = TestServer::start(config).await;
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
    server
        .wait_for("the first two connections closed", |s| s.closed() == 2)
        .await;
    // --max-connections instances of the Python echo at once: 56 core
    // instances, where a pool sized from the C echo's own count had 40.
    let mut held = Vec::new();
    for client in 0..MAX as u64 {
        let mut stream = server.connect().await;
        let msg = pattern(1000, client);
        assert_eq!(ping(&mut stream, &msg).await, msg);
        held.push(stream);
    }
    assert_eq!(server.stats.live_stores(), MAX as u64);
    drop(held);

    server
        .wait_for("every connection closed", |s| s.closed() == 2 + MAX as u64)
        .await;
    assert_eq!(server.stats.outcomes(OutcomeKind::Ok), 2 + MAX as u64);
    assert_eq!(server.stats.reloads(), 2);
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Ensure SIGTERM during a slow reload (the Python echo compiles for
/// seconds) stops the server at once instead of waiting for the compile to
/// finish, and that the abandoned reload never goes into service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_off_a_slow_reload() {
    let (dir, module) = stage(&guest("echo"));
    let path = module.to_str().unwrap();
    let mut server =
        Binary::start(&["--module", path, "--listen", "127.0.0.1:0", "--no-cache"]).await;
    install(&example("python-echo"), &module);
    server.signal(libc::SIGHUP);
    server.log_line(&["reloading module"]).await;
    let stopped = std::time::Instant::now();
    server.stop_cleanly().await;
    // Compiling the Python echo takes 10–25 s on the 2-core machine.
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(5),
        "exit took {:?}: it waited for the compile",
        stopped.elapsed()
    );
    let mut rest = Vec::new();
    while let Some(line) = server.stderr.recv().await {
        rest.push(line);
    }
    assert!(
        !rest.iter().any(|line| line.contains("module reloaded")),
        "{rest:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Ensure the echo handler written by hand in the component text format
/// (`examples/wat-echo/echo.wat`, loaded as text) returns exact bytes for
/// 1 byte, 1 MiB and 16 concurrent clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wat_echo() {
    let module = root().join("examples/wat-echo/echo.wat");
    echoes_exactly_from("wat-echo", crate::util::config_for(module)).await;
}
