//! Start functions: guest code that runs while a connection's instance is
//! created, before `handle`. It must meet the same limits as `handle` and
//! be reported as the guest's doing. Rust's toolchain emits no start
//! functions, so these handlers are written by hand in the component text
//! format.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::util::{
    Binary, Canary, field, guest, install, install_bytes, module_command, pin_to_first_cpu, stage,
    tempdir,
};

/// A handler component whose one core module runs `start` (core wasm
/// instructions) as its start function. Its `handle` returns `ok` at once.
/// The module may call `$drop-connection`, the canonical `resource.drop`
/// of the host's `connection` type, to misuse a handle.
fn with_start(start: &str) -> Vec<u8> {
    let text = format!(
        r#"(component
  (import "wasi:io/streams@0.2.12" (instance $streams
    (export "input-stream" (type (sub resource)))
    (export "output-stream" (type (sub resource)))))
  (alias export $streams "input-stream" (type $input-stream))
  (alias export $streams "output-stream" (type $output-stream))
  (import "sockserver:handler/types@0.1.0" (instance $types
    (export "connection" (type (sub resource)))))
  (alias export $types "connection" (type $connection))
  (core func $drop-connection (canon resource.drop $connection))
  (core instance $host (export "drop-connection" (func $drop-connection)))
  (core module $handler
    (import "host" "drop-connection" (func $drop-connection (param i32)))
    (memory (export "memory") 1)
    (func $start {start})
    (start $start)
    ;; The result lives at offset 16 of zeroed memory: `ok`.
    (func (export "handle") (param i32 i32 i32) (result i32)
      i32.const 16))
  (core instance $instance (instantiate $handler (with "host" (instance $host))))
  (func $handle
    (param "conn" (own $connection))
    (param "input" (own $input-stream))
    (param "output" (own $output-stream))
    (result (result (error string)))
    (canon lift (core func $instance "handle") (memory (core memory $instance "memory"))))
  (instance $exports (export "handle" (func $handle)))
  (export "sockserver:handler/handler@0.1.0" (instance $exports)))"#
    );
    wat::parse_str(text).expect("a valid component")
}

/// Put `component` in service with SIGHUP and open a connection to it;
/// returns that connection's close line once the server has closed it.
async fn serve_once(server: &mut Binary, module: &std::path::Path, component: &[u8]) -> String {
    install_bytes(component, module);
    server.signal(libc::SIGHUP);
    server.log_line(&["module reloaded"]).await;
    // A reset can come before `connect` returns: the instance may fail
    // before the client's side of the handshake is polled.
    if let Ok(mut stream) = TcpStream::connect(server.addr).await {
        let (rest, _) = crate::util::read_to_close(&mut stream).await;
        assert!(rest.is_empty(), "got {} bytes", rest.len());
    }
    server.log_line(&["connection closed"]).await
}

/// Ensure a start function is held to `--max-cpu` and `--max-memory` and
/// that its trap or its misuse of a handle is reported as the guest's
/// (`trap`), never as the host's (`failed`); and that while a start
/// function spins on the server's only CPU, a connection on the previous
/// handler keeps being served: the spinner yields like any guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_functions_meet_the_limits() {
    let (_dir, module) = stage(&guest("echo"));
    let mut cmd = module_command(&module, &["--max-cpu", "1s", "--max-memory", "4MiB"]);
    // SAFETY: the setup only calls sched_setaffinity.
    unsafe { cmd.pre_exec(pin_to_first_cpu) };
    let mut server = Binary::start_with(&mut cmd).await;
    let mut canary = Canary::connect(server.addr).await;

    // The control: a start function that returns, and a clean close.
    let line = serve_once(&mut server, &module, &with_start("nop")).await;
    assert!(line.contains("outcome=ok"), "{line}");

    let line = serve_once(&mut server, &module, &with_start("unreachable")).await;
    assert!(
        line.contains("outcome=trap") && line.contains("while instantiating"),
        "{line}"
    );

    let line = serve_once(
        &mut server,
        &module,
        &with_start("(call $drop-connection (i32.const 77))"),
    )
    .await;
    assert!(
        line.contains("outcome=trap") && line.contains("while instantiating"),
        "{line}"
    );

    let grow = "(loop $more
        (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
      unreachable";
    let line = serve_once(&mut server, &module, &with_start(grow)).await;
    assert!(
        line.contains("outcome=limit") && line.contains("limit=memory"),
        "{line}"
    );

    // The canary round-trips all through the spin. Were the spinner not
    // to yield, the one CPU's runtime would serve nothing else until the
    // CPU limit (1s) ended it.
    let spin = with_start("(loop $forever (br $forever))");
    let (mut rounds, mut worst) = (0, Duration::ZERO);
    let line = {
        let spinning = serve_once(&mut server, &module, &spin);
        tokio::pin!(spinning);
        loop {
            tokio::select! {
                line = &mut spinning => break line,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {
                    worst = worst.max(canary.check().await);
                    rounds += 1;
                }
            }
        }
    };
    println!("start spin: canary worst round trip {worst:?} over {rounds} rounds");
    assert!(
        line.contains("outcome=limit") && line.contains("limit=cpu"),
        "{line}"
    );
    assert!(
        field(&line, "duration_ms") >= 950.0,
        "cut off before its budget: {line}"
    );
    assert!(rounds >= 20, "the canary made only {rounds} round trips");
    assert!(
        worst < Duration::from_millis(250),
        "canary stalled for {worst:?}"
    );

    // The echo again, for new connections; the canary never left it.
    install(&guest("echo"), &module);
    server.signal(libc::SIGHUP);
    server.log_line(&["module reloaded"]).await;
    Canary::connect(server.addr).await;
    canary.check().await;
    drop(canary);
    server.stop_cleanly().await;
}

/// Ensure the debug line with a guest error's whole chain is escaped like
/// any guest text: its wasm backtrace names functions as the guest's name
/// section does, and a name holding a newline, a terminal escape, a line
/// separator or a right-to-left override must not forge a line, reach a
/// terminal raw or reorder what the line shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_function_names_are_escaped_in_error_details() {
    let module = tempdir().join("named.wasm");
    let named =
        with_start(r#"(@name "evil\1b[2J\nFORGED outcome=ok\u{2028}\u{202e}kart") unreachable"#);
    install_bytes(&named, &module);
    let mut cmd = module_command(&module, &[]);
    cmd.env("RUST_LOG", "info,wasm_sockserver::connection=debug");
    let mut server = Binary::start_with(&mut cmd).await;
    if let Ok(mut stream) = TcpStream::connect(server.addr).await {
        crate::util::read_to_close(&mut stream).await;
    }
    let details = server.log_line(&["guest error details"]).await;
    assert!(details.contains("evil"), "no name in {details:?}");
    assert!(
        details.contains(r"evil\u{1b}[2J\nFORGED outcome=ok\u{2028}\u{202e}kart"),
        "{details:?}"
    );
    let closed = server.log_line(&["connection closed"]).await;
    assert!(closed.contains("outcome=trap"), "{closed}");
    server.stop_cleanly().await;
}
