//! The `--metrics` endpoint: Prometheus text that follows the server's
//! counters, and a metrics port that a stalled or strange client cannot
//! block.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{Binary, PATIENCE, read_to_close, roundtrip};

/// Send `request` to the metrics port and return the status line and body.
async fn get(addr: SocketAddr, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut reply))
        .await
        .expect("a metrics reply in time")
        .unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head.lines().next().unwrap().to_string();
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    (status, body.to_string())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    // Every sample line is `name{labels} value` with a whole number.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("name and value");
        assert!(name.starts_with("wasm_sockserver_"), "{line}");
        assert!(value.parse::<u64>().is_ok(), "{line}");
    }
    body
}

fn sample(body: &str, name: &str) -> u64 {
    let prefix = format!("wasm_sockserver_{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no sample {name} in\n{body}"))
        .parse()
        .unwrap()
}

/// Ensure the endpoint reports connections by outcome, reloads, the
/// handler's generation and the generations still loaded as they happen, answers only GET /metrics, and
/// keeps answering while another client holds a connection to it open
/// without sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_server() {
    let mut server = Binary::fixture("connid", &["--metrics", "127.0.0.1:0"]).await;
    let line = server.log_line(&["metrics at http://"]).await;
    let addr: SocketAddr = line
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the metrics address in the log line")
        .parse()
        .unwrap();

    let body = scrape(addr).await;
    assert_eq!(sample(&body, "connections_accepted_total"), 0);
    assert_eq!(sample(&body, "module_generation"), 1);
    assert_eq!(sample(&body, "log_lines_dropped_total"), 0);

    // One connection that ends ok, one that ends with the handler's err.
    let ok = TcpStream::connect(server.addr).await.unwrap();
    roundtrip(ok, b"").await;
    let mut failing = TcpStream::connect(server.addr).await.unwrap();
    failing.write_all(b"fail").await.unwrap();
    failing.shutdown().await.unwrap();
    read_to_close(&mut failing).await;
    // The two connections' tasks may log in either order.
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let line = server.log_line(&["connection closed"]).await;
        outcomes.push(line.split("outcome=").nth(1).unwrap()[..2].to_string());
    }
    outcomes.sort();
    assert_eq!(outcomes, ["er", "ok"]);

    // A client that connects to the metrics port and says nothing.
    let _stalled = TcpStream::connect(addr).await.unwrap();

    // Answered while that client stalls: in under the 1 s the server gives
    // a stalled client to send its request, so not by waiting it out (a
    // scrape takes about a millisecond).
    let body = tokio::time::timeout(std::time::Duration::from_millis(900), scrape(addr))
        .await
        .expect("a scrape is not queued behind a stalled client");
    assert_eq!(sample(&body, "connections_accepted_total"), 2);
    assert_eq!(sample(&body, "connections_closed_total{outcome=\"ok\"}"), 1);
    assert_eq!(
        sample(&body, "connections_closed_total{outcome=\"err\"}"),
        1
    );
    assert_eq!(
        sample(&body, "connections_closed_total{outcome=\"trap\"}"),
        0
    );
    assert_eq!(sample(&body, "limit_hits_total{limit=\"memory\"}"), 0);
    assert_eq!(sample(&body, "connections_open"), 0);
    // The first connection may still be closing when the second opens.
    assert!((1..=2).contains(&sample(&body, "connections_open_peak")));
    assert_eq!(sample(&body, "stores_live"), 0);
    assert!(body.contains("# TYPE wasm_sockserver_connections_closed_total counter"));

    // A connection held across a reload keeps generation 1 loaded.
    let mut held = TcpStream::connect(server.addr).await.unwrap();
    let mut first_line = Vec::new();
    while !first_line.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        held.read_exact(&mut byte).await.unwrap();
        first_line.push(byte[0]);
    }
    assert_eq!(sample(&scrape(addr).await, "module_generations_loaded"), 1);
    server.signal(libc::SIGHUP);
    server.log_line(&["module reloaded"]).await;
    let body = scrape(addr).await;
    assert_eq!(sample(&body, "module_generation"), 2);
    assert_eq!(sample(&body, "module_generations_loaded"), 2);
    assert_eq!(sample(&body, "reloads_total"), 1);
    assert_eq!(sample(&body, "reload_failures_total"), 0);
    held.shutdown().await.unwrap();
    read_to_close(&mut held).await;
    let unloaded = server.log_line(&["previous module unloaded"]).await;
    assert!(unloaded.contains("generation=1"), "{unloaded}");
    assert_eq!(sample(&scrape(addr).await, "module_generations_loaded"), 1);

    // Prometheus adds a query string when a scrape config sets `params`.
    let (status, _) = get(addr, "GET /metrics?module=x HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (status, _) = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

    // Eight silent clients hold every scrape slot; the server gives each
    // its second to send a request, closes it, and answers scrapes again.
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    for stream in &mut silent {
        let (reply, _) = read_to_close(stream).await;
        assert!(reply.is_empty(), "a silent client got a reply");
    }
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900),
        "silent clients closed after {waited:?}, before their second"
    );
    let body = scrape(addr).await;
    assert_eq!(sample(&body, "module_generation"), 2);

    server.stop_cleanly().await;
}
