//! The metrics endpoint: the server's counters in Prometheus text format,
//! served over plain HTTP on a listener of its own (`--metrics ADDR`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::limits::LimitKind;
use crate::reload::Reloader;
use crate::stats::{OutcomeKind, Stats};

/// Scrapes served at once. A flood of connections to the metrics port then
/// waits in its backlog instead of taking descriptors from the server.
const MAX_SCRAPES: usize = 8;

/// How long a scraper may take to send its request: a scraper sends it at
/// once, so a client that connects and stalls gives its slot back soon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a whole exchange may take, reading the answer included.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most request bytes read: a request line and a few headers.
const MAX_REQUEST: usize = 8 * 1024;

/// Back-off after a failed accept (descriptors exhausted), as the main
/// acceptor does.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serve `GET /metrics` on `listener` until the future is dropped.
///
/// The endpoint is separate from the handler's port so that it can be
/// bound to a private address, and so that scrapes never compete with
/// clients for connection permits.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, handler: Reloader) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return; // The semaphore is never closed.
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (stats, handler) = (stats.clone(), handler.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let scrape = answer(stream, &stats, &handler);
            if tokio::time::timeout(SCRAPE_TIMEOUT, scrape).await.is_err() {
                tracing::debug!("metrics client too slow; closed");
            }
        });
    }
}

/// Read one request and answer it; any I/O error just ends the exchange.
async fn answer(mut stream: TcpStream, stats: &Stats, handler: &Reloader) {
    let Ok(Some(request)) = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await
    else {
        return;
    };
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = line
        .split(|&b| b == b' ' || b == b'\r')
        .filter(|w| !w.is_empty());
    let method = words.next();
    // Prometheus appends a query string when a scrape config sets `params`.
    let path = words
        .next()
        .and_then(|target| target.split(|&b| b == b'?').next());
    let reply = match (method, path) {
        _ if request.len() > MAX_REQUEST => response("431 Request Header Fields Too Large", ""),
        (Some(b"GET"), Some(b"/metrics")) => response("200 OK", &render(stats, handler)),
        (Some(b"GET"), Some(_)) => response("404 Not Found", "try /metrics\n"),
        _ => response("405 Method Not Allowed", "only GET /metrics\n"),
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}

/// The request up to its blank line, or up to just past [`MAX_REQUEST`]
/// bytes; `None` if the client closed or failed first.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n")
        && !request.ends_with(b"\n\n")
        && request.len() <= MAX_REQUEST
    {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    Some(request)
}

fn response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The counters in Prometheus text exposition format (version 0.0.4).
pub fn render(stats: &Stats, handler: &Reloader) -> String {
    let current = handler.current();
    let one = |value: u64| vec![(String::new(), value)];
    let by = |label: &str, values: Vec<(&str, u64)>| {
        values
            .into_iter()
            .map(|(name, value)| (format!("{{{label}=\"{name}\"}}"), value))
            .collect::<Vec<_>>()
    };
    let families = [
        (
            "connections_accepted_total",
            "counter",
            "Connections accepted since start.",
            one(stats.accepted()),
        ),
        (
            "connections_open",
            "gauge",
            "Connections open now.",
            one(stats.open_connections()),
        ),
        (
            "connections_open_peak",
            "gauge",
            "The most connections open at once since start.",
            one(stats.peak_open_connections()),
        ),
        (
            "connections_closed_total",
            "counter",
            "Connections closed, by how they ended.",
            by(
                "outcome",
                OutcomeKind::ALL
                    .iter()
                    .map(|kind| (kind.name(), stats.outcomes(*kind)))
                    .collect(),
            ),
        ),
        (
            "limit_hits_total",
            "counter",
            "Connections ended by a limit, by limit.",
            by(
                "limit",
                LimitKind::ALL
                    .iter()
                    .map(|kind| (kind.name(), stats.limit_hits(*kind)))
                    .collect(),
            ),
        ),
        (
            "stores_live",
            "gauge",
            "Wasm Stores alive now (one per connection being served).",
            one(stats.live_stores()),
        ),
        (
            "accept_errors_total",
            "counter",
            "Failed accept calls, each retried or backed off.",
            one(stats.accept_errors()),
        ),
        (
            "module_generation",
            "gauge",
            "The load of the handler new connections get: 1 at start, one more per reload.",
            one(current.generation()),
        ),
        (
            "module_generations_loaded",
            "gauge",
            "Handler generations in memory: the one in service plus earlier ones that open connections still run.",
            one(stats.loaded_generations()),
        ),
        (
            "reloads_total",
            "counter",
            "Reloads that put a new handler in service.",
            one(stats.reloads()),
        ),
        (
            "reload_failures_total",
            "counter",
            "Reloads refused, leaving the previous handler in service.",
            one(stats.failed_reloads()),
        ),
        (
            "log_lines_dropped_total",
            "counter",
            "Log lines dropped because stderr did not keep up.",
            one(stats.dropped_log_lines()),
        ),
        (
            "epoch_checkins_total",
            "counter",
            "Times a running guest stopped at an epoch tick (CPU check, yield) since start.",
            one(current.epoch_checkins()),
        ),
    ];
    let mut out = String::with_capacity(2048);
    for (name, kind, help, samples) in families {
        let _ = writeln!(out, "# HELP wasm_sockserver_{name} {help}");
        let _ = writeln!(out, "# TYPE wasm_sockserver_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "wasm_sockserver_{name}{labels} {value}");
        }
    }
    out
}
