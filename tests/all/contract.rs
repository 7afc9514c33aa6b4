//! The WIT contract as a handler sees it: the connection resource, guest
//! stdout/stderr in the host log, `err` results, and the binary's address
//! line and signal handling.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::util::{Binary, TestServer, config, read_to_close, roundtrip};

/// Ensure `connection` reports the id and both addresses as the client
/// sees them, formatted like Rust's SocketAddr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resource() {
    let server = TestServer::start(config("connid")).await;
    for expected_id in 1..=2u64 {
        let stream = server.connect().await;
        let client = stream.local_addr().unwrap();
        let got = String::from_utf8(roundtrip(stream, b"").await).unwrap();
        assert_eq!(got, format!("{expected_id} {client} {}\n", server.addr));
    }
    server.stop().await;
}

/// Ensure `--listen 127.0.0.1:0` prints the real address, that address
/// serves, guest stdout/stderr become log lines tagged with the connection
/// id, the outcome is logged once per connection, and SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_logs_and_stops() {
    let mut server = Binary::fixture("connid", &[]).await;
    assert_ne!(server.addr.port(), 0);

    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"fail").await.unwrap();
    let (reply, _) = read_to_close(&mut stream).await;
    assert!(
        String::from_utf8(reply)
            .unwrap()
            .starts_with("1 127.0.0.1:")
    );

    let stdout = server
        .log_line(&["conn=1", "stream=\"stdout\"", "hello from connection 1"])
        .await;
    assert!(stdout.contains("INFO"), "{stdout}");
    server
        .log_line(&["conn=1", "stream=\"stderr\"", "stderr line one"])
        .await;
    server.log_line(&["conn=1", "stderr line two"]).await;
    let closed = server.log_line(&["connection closed", "conn=1"]).await;
    assert!(closed.contains("outcome=err"), "{closed}");
    assert!(closed.contains("client asked for failure"), "{closed}");
    assert!(closed.contains("bytes_in=4"), "{closed}");

    server.stop_cleanly().await;
}

/// Ensure shutdown waits for a live connection to finish: after SIGTERM
/// the server stops accepting, the live client can still complete its
/// exchange, and the process then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_live_connections() {
    let mut server = Binary::fixture("echo", &[]).await;
    let mut live = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(crate::util::ping(&mut live, b"one").await, b"one");

    server.signal(libc::SIGINT);
    server.log_line(&["draining connections", "live=1"]).await;
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "still accepting after the signal"
    );
    assert_eq!(crate::util::ping(&mut live, b"two").await, b"two");
    live.shutdown().await.unwrap();
    let (rest, reset) = read_to_close(&mut live).await;
    assert!(rest.is_empty() && !reset);
    let status = tokio::time::timeout(crate::util::PATIENCE, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Ensure `--reuse-port` lets two servers listen on one port: the kernel
/// spreads connections over both, a server without the flag cannot join,
/// and once one of the two stops the other serves alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_port_shares_the_port() {
    let mut first = Binary::fixture("echo", &["--reuse-port"]).await;
    let addr = first.addr.to_string();
    let module = crate::util::guest("echo");
    let module = module.to_str().unwrap();

    let (code, stderr) = crate::util::run_binary(&["--module", module, "--listen", &addr]).await;
    assert_ne!(code, 0, "a server without --reuse-port joined: {stderr}");
    assert!(stderr.contains("in use"), "{stderr}");

    let mut second = Binary::start(&["--module", module, "--listen", &addr, "--reuse-port"]).await;
    assert_eq!(second.addr, first.addr);
    // Each connection comes from a new source port, so the kernel's hash
    // sends about half to each server: all 32 to one has odds of 2^-31.
    const CONNS: usize = 32;
    for i in 0..CONNS {
        let stream = tokio::net::TcpStream::connect(first.addr).await.unwrap();
        let message = format!("hello {i}");
        assert_eq!(
            roundtrip(stream, message.as_bytes()).await,
            message.as_bytes()
        );
    }
    let (mut by_first, mut by_second) = (0, 0);
    while by_first + by_second < CONNS {
        tokio::select! {
            _ = first.log_line(&["connection closed", "outcome=ok"]) => by_first += 1,
            _ = second.log_line(&["connection closed", "outcome=ok"]) => by_second += 1,
        }
    }
    assert!(
        by_first > 0 && by_second > 0,
        "connections served: {by_first} by the first server, {by_second} by the second"
    );

    first.stop().await;
    for i in 0..4 {
        let stream = tokio::net::TcpStream::connect(second.addr).await.unwrap();
        let message = format!("after {i}");
        assert_eq!(
            roundtrip(stream, message.as_bytes()).await,
            message.as_bytes()
        );
        second.log_line(&["connection closed", "outcome=ok"]).await;
    }
    second.stop().await;
}

/// Start the echo binary with its open-file limit set to `soft`/`hard`
/// before exec, and `extra` flags.
async fn echo_with_nofile(soft: u64, hard: u64, extra: &[&str]) -> Binary {
    // SAFETY: the setup only calls setrlimit, which is async-signal-safe.
    unsafe { Binary::fixture_with("echo", extra, crate::util::set_nofile(soft, hard)) }.await
}

/// The soft and hard open-file limits of a running process.
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let row = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = row
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// Ensure the binary raises its soft open-file limit to the hard one, and
/// warns (once, before serving) only when that is still too low for
/// `--max-connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_file_limit_is_raised() {
    // Room for 1000 connections once raised: no warning.
    let mut roomy = echo_with_nofile(200, 2000, &["--max-connections", "1000"]).await;
    assert_eq!(nofile_of(roomy.pid()), (2000, 2000));
    loop {
        let line = tokio::time::timeout(crate::util::PATIENCE, roomy.stderr.recv())
            .await
            .expect("a log line in time")
            .expect("stderr open");
        assert!(
            !line.contains("open-file limit"),
            "unexpected warning: {line}"
        );
        if line.contains("server started") {
            break;
        }
    }
    let stream = tokio::net::TcpStream::connect(roomy.addr).await.unwrap();
    assert_eq!(roundtrip(stream, b"fine").await, b"fine");
    roomy.stop().await;

    // The default --max-connections (10000) cannot fit under 2000.
    let mut tight = echo_with_nofile(200, 2000, &[]).await;
    assert_eq!(nofile_of(tight.pid()), (2000, 2000));
    tight
        .log_line(&["WARN", "open-file limit", "limit=2000", "needed=10064"])
        .await;
    tight.stop().await;
}

/// Ensure the Rust SDK's `std::io` adapters carry an ordinary `BufReader`
/// line protocol: commands split across packets, several per packet, are
/// answered in order, and QUIT ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_line_protocol() {
    let server = TestServer::start(config("linecmd")).await;
    let mut stream = server.connect().await;
    stream
        .write_all(b"SET greeting hello world\nGET gree")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let mut first = [0u8; 3];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut first)
        .await
        .unwrap();
    assert_eq!(&first, b"OK\n");
    stream
        .write_all(b"ting\nUPPER shout\nGET nothing\nTIME\nbogus\nQUIT\nGET greeting\n")
        .await
        .unwrap();
    let (rest, reset) = read_to_close(&mut stream).await;
    assert!(!reset);
    let text = String::from_utf8(rest).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["hello world", "SHOUT", "(nil)"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest_time: u64 = lines[3].parse().unwrap();
    assert!(
        guest_time.abs_diff(now) < 60,
        "guest clock says {guest_time}, host {now}"
    );
    assert_eq!(lines[4..], ["ERR unknown command BOGUS", "BYE"]);
    server
        .wait_for("the connection to close", |s| s.closed() == 1)
        .await;
    server.stop().await;
}

/// Ensure the compiled-code cache is used on the second start, survives a
/// corrupt entry (recompiles instead of failing) and an unusable one
/// (serves uncached), cleans up temporary files, keeps quiet about itself
/// and stores nothing for a module that fails its checks, and
/// `--no-cache` skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_code_cache() {
    let dir = crate::util::root().join(format!("target/cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = ["--cache-dir", dir.to_str().unwrap()];

    let mut first = Binary::fixture("echo", &args).await;
    first.log_line(&["compiled component"]).await;
    first.stop().await;
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");

    let mut second = Binary::fixture("echo", &args).await;
    second
        .log_line(&["loaded compiled component from cache"])
        .await;
    let mut canary = crate::util::Canary::connect(second.addr).await;
    canary.check().await;
    drop(canary);
    second.stop().await;

    // Left-over temporary files: one from a write cut short an hour ago,
    // one that could be another process's write in progress.
    let stale = dir.join(".tmp-1-0-stale.cwasm");
    let fresh = dir.join(".tmp-2-0-fresh.cwasm");
    for tmp in [&stale, &fresh] {
        std::fs::write(tmp, b"half an entry").unwrap();
    }
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(an_hour_ago)
        .unwrap();

    std::fs::write(&entries[0], b"not compiled code").unwrap();
    let mut third = Binary::fixture("echo", &args).await;
    third.log_line(&["ignoring unusable cache entry"]).await;
    crate::util::Canary::connect(third.addr).await;
    third.stop().await;
    assert!(
        std::fs::read(&entries[0]).unwrap().len() > 1000,
        "the corrupt entry was not replaced"
    );
    assert!(!stale.exists(), "the stale temporary file was kept");
    assert!(fresh.exists(), "a recent temporary file was removed");

    // An entry that cannot be read or replaced (a directory in its place):
    // the server warns, serves, and leaves no temporary file behind.
    std::fs::remove_file(&entries[0]).unwrap();
    std::fs::create_dir(&entries[0]).unwrap();
    let mut fourth = Binary::fixture("echo", &args).await;
    fourth.log_line(&["cannot read cache entry"]).await;
    fourth.log_line(&["cannot write cache entry"]).await;
    crate::util::Canary::connect(fourth.addr).await;
    fourth.stop().await;
    let temporary = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".tmp-"))
            .collect()
    };
    assert_eq!(temporary(&dir), [".tmp-2-0-fresh.cwasm"]);
    std::fs::remove_dir(&entries[0]).unwrap();

    // A module that fails its checks gets its one-line error, no cache
    // warning before it, and leaves no entry.
    let before = std::fs::read_dir(&dir).unwrap().count();
    let bad = crate::util::guest("wrongexport");
    let (code, stderr) = crate::util::run_binary(&[
        "--module",
        bad.to_str().unwrap(),
        "--cache-dir",
        dir.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), before);

    let mut uncached = Binary::fixture("echo", &["--no-cache"]).await;
    uncached.log_line(&["compiled component"]).await;
    uncached.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ensure cached code is loaded only from where no one else could have
/// planted it, since it runs as native code in the server: a directory
/// that others may write to is not used at all, and an entry that is a
/// symbolic link or belongs to another user is ignored. Each time the
/// server warns, compiles and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_cache_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::util::root().join(format!("target/cache-shared-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let args = ["--cache-dir", dir.to_str().unwrap()];
    let start_warned = async |why: &str| {
        let mut server = Binary::fixture("echo", &args).await;
        // Compiled first; the warning comes once the module has loaded.
        server.log_line(&["compiled component"]).await;
        let warning = server.log_line(&["cache"]).await;
        assert!(warning.contains(why), "{warning}");
        crate::util::Canary::connect(server.addr).await;
        server.stop().await;
    };
    for _ in 0..2 {
        start_warned("writable by group or others").await;
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // Private again: the next start writes an entry.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut server = Binary::fixture("echo", &args).await;
    server.log_line(&["compiled component"]).await;
    server.stop().await;
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();

    // The entry replaced by a link to a copy of itself.
    let copy = dir.with_extension("copy");
    std::fs::rename(&entry, &copy).unwrap();
    std::os::unix::fs::symlink(&copy, &entry).unwrap();
    start_warned("cannot read cache entry").await;
    assert!(!entry.is_symlink(), "the link was not replaced");
    std::fs::remove_file(&copy).unwrap();

    // The entry handed to another user (needs root, as CI runs).
    // SAFETY: chown reads the path only.
    let path = std::ffi::CString::new(entry.to_str().unwrap()).unwrap();
    if unsafe { libc::chown(path.as_ptr(), 65534, 65534) } == 0 {
        start_warned("owned by uid 65534").await;
    } else {
        println!("not root: the foreign-owner case is not checked");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ensure timeouts too large to represent as instants mean "never" rather
/// than a panic in every connection task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_timeouts_are_no_deadline() {
    let mut config = config("echo");
    config.idle_timeout = std::time::Duration::from_secs(u64::MAX / 4);
    config.max_lifetime = Some(std::time::Duration::from_secs(u64::MAX / 4));
    let server = TestServer::start(config).await;
    let mut stream = server.connect().await;
    assert_eq!(
        crate::util::ping(&mut stream, b"still here").await,
        b"still here"
    );
    drop(stream);
    server
        .wait_for("the connection to close", |s| s.closed() == 1)
        .await;
    assert_eq!(server.stats.outcomes(wasm_sockserver::OutcomeKind::Ok), 1);
    server.stop().await;
}

/// Ensure the host's direct socket calls serve only the connection's own
/// streams: a guest that drops its input and takes `wasi:cli/stdin`, whose
/// handle then sits in the input's old table slot, reads the (empty) stdin,
/// never the client's bytes. Fails if the fast path keyed on the slot alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_input_slot_is_not_the_socket() {
    let server = TestServer::start(config("stdinswap")).await;
    let mut stream = server.connect().await;
    stream.write_all(b"secret").await.unwrap();
    let (reply, reset) = read_to_close(&mut stream).await;
    assert_eq!(String::from_utf8_lossy(&reply), "stdin closed\n");
    assert!(!reset);
    server.stop().await;
}
