//! Hot reload: a new build of the handler serves new connections while
//! open ones finish on the old one, and a bad file changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::TcpStream;

use crate::util::{
    Binary, PATIENCE, TestServer, config_for, guest, install, install_bytes, pattern, ping,
    roundtrip, stage,
};

/// Ensure SIGHUP makes the binary load `--module` again: a connection
/// opened before it is still served by the old component, new connections
/// get the new one, a broken file is refused with one log line and the
/// last good component stays in service, and the process survives it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_module_for_new_connections() {
    let (dir, module) = stage(&guest("echo"));
    let mut server = Binary::start(&[
        "--module",
        module.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;

    let mut old = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(ping(&mut old, b"before").await, b"before");

    install(&guest("connid"), &module);
    server.signal(libc::SIGHUP);
    let reloaded = server.log_line(&["module reloaded"]).await;
    assert!(reloaded.contains("generation=2"), "{reloaded}");

    // connid answers with the connection id, the peer and the local address.
    let fresh = TcpStream::connect(server.addr).await.unwrap();
    let reply = String::from_utf8(roundtrip(fresh, b"").await).unwrap();
    assert!(reply.starts_with("2 127.0.0.1:"), "{reply:?}");
    assert_eq!(
        ping(&mut old, b"after the reload").await,
        b"after the reload"
    );

    install_bytes(b"not wasm at all", &module);
    server.signal(libc::SIGHUP);
    let failed = server.log_line(&["reload failed"]).await;
    assert!(failed.contains("is not a WebAssembly binary"), "{failed}");
    assert!(failed.contains("generation=2"), "{failed}");
    let fresh = TcpStream::connect(server.addr).await.unwrap();
    let reply = String::from_utf8(roundtrip(fresh, b"").await).unwrap();
    assert!(reply.starts_with("3 127.0.0.1:"), "{reply:?}");

    // The old connection ends on the module it started with.
    assert_eq!(ping(&mut old, b"still echoing").await, b"still echoing");
    drop(old);
    let closed = server.log_line(&["connection closed", "conn=1 "]).await;
    assert!(closed.contains("generation=1"), "{closed}");

    server.stop_cleanly().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Ensure reloads in the middle of steady churn cost no client a single
/// error, that a connection held across them stays on its generation, and
/// that the old generation's compiled code is freed once its last
/// connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_churn_lose_nothing() {
    let (dir, module) = stage(&guest("echo"));
    let server = TestServer::start(config_for(module.clone())).await;
    let first = Arc::downgrade(&server.reloader.current());
    assert_eq!(server.stats.loaded_generations(), 1);

    let mut held = server.connect().await;
    assert_eq!(ping(&mut held, b"held").await, b"held");

    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4u64)
        .map(|client| {
            let (stop, exchanges, addr) = (stop.clone(), exchanges.clone(), server.addr);
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut stream = TcpStream::connect(addr).await.expect("connect");
                    let msg = pattern(64, client << 32 | round);
                    assert_eq!(ping(&mut stream, &msg).await, msg);
                    exchanges.fetch_add(1, Ordering::Relaxed);
                    round += 1;
                }
            })
        })
        .collect();

    // Every exchange closes a connection, which wakes the stats' waiters.
    let progress = async |what: &str| {
        let target = exchanges.load(Ordering::Relaxed) + 50;
        tokio::time::timeout(
            PATIENCE,
            server
                .stats
                .wait_for(|_| exchanges.load(Ordering::Relaxed) >= target),
        )
        .await
        .unwrap_or_else(|_| panic!("clients make no progress {what}"));
    };
    for generation in 2..=4 {
        progress("before a reload").await;
        assert_eq!(server.reloader.reload().await.unwrap(), generation);
    }
    install_bytes(b"\0asm\x0d\0\x01\0", &module);
    let error = format!("{:#}", server.reloader.reload().await.unwrap_err());
    assert!(error.contains("handler.wasm"), "{error}");
    assert_eq!(server.reloader.current().generation(), 4);

    progress("after the reloads").await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("a client saw an error");
    }

    // The held connection still runs generation 1, which is still loaded.
    assert_eq!(ping(&mut held, b"still here").await, b"still here");
    assert!(first.upgrade().is_some());
    assert!(server.stats.loaded_generations() >= 2);
    drop(held);
    server
        .wait_for("every connection closed", |s| s.open_connections() == 0)
        .await;
    server
        .wait_for("generation 1 unloaded", |s| s.loaded_generations() == 1)
        .await;
    assert!(first.upgrade().is_none(), "generation 1 still in memory");

    assert_eq!(server.stats.reloads(), 3);
    assert_eq!(server.stats.failed_reloads(), 1);
    for kind in [
        wasm_sockserver::OutcomeKind::Failed,
        wasm_sockserver::OutcomeKind::Trap,
    ] {
        assert_eq!(server.stats.outcomes(kind), 0, "{kind:?}");
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
