//! The log sink: a reader of stderr that stalls never stalls the server;
//! the lines it could not take are dropped, counted and reported.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{Binary, PATIENCE, field, fixture_command};

/// Connections served while nothing reads stderr. Each logs four lines
/// (the handler's three and the close line), 12,000 in all: more than the
/// queue (`logging::QUEUE_LINES`) and a pipe's 64 KiB hold together.
const CONNECTIONS: usize = 3000;

/// Clients at once.
const CLIENTS: usize = 8;

/// Longest any one connection may take. With log lines written from the
/// serving threads, the server stops answering once the pipe is full (after
/// about 400 lines), so a connection then waits forever.
const PER_CONNECTION: Duration = Duration::from_secs(10);

/// Ensure every connection is served while stderr is not read at all, and
/// that once it is read again the server reports how many lines it dropped
/// (a warning, and the shutdown summary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_stalls_nothing() {
    let (mut server, unstall) = Binary::start_stalled(&mut fixture_command("connid", &[])).await;
    let addr = server.addr;

    serve_all(addr).await;

    unstall.send(()).unwrap();
    let warning = server
        .log_line(&["log lines dropped: stderr did not keep up"])
        .await;
    let reported = field(&warning, "total");
    assert!(reported >= 1.0, "{warning}");
    // The server keeps logging normally afterwards.
    one_connection(addr).await;
    server.log_line(&["connection closed"]).await;
    let summary = server.stop().await;
    assert!(
        field(&summary, "log_lines_dropped") >= reported,
        "{summary}"
    );
}

/// Ensure a stderr that the parent left non-blocking (`O_NONBLOCK` on the
/// pipe, as some process managers do) is waited on like a blocking one:
/// every line that reaches the reader is whole, none cut short and glued to
/// the next, and the server still serves while nothing reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_blocking_stderr_gets_whole_lines() {
    let mut cmd = fixture_command("connid", &[]);
    // SAFETY: fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let flags = libc::fcntl(2, libc::F_GETFL);
            if flags < 0 || libc::fcntl(2, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let (mut server, unstall) = Binary::start_stalled(&mut cmd).await;
    serve_all(server.addr).await;
    unstall.send(()).unwrap();
    let (lines, summary) = lines_to_summary(&mut server).await;
    for line in &lines {
        assert!(
            line.starts_with("20") && timestamps(line) == 1,
            "a line cut short or glued to another: {line}"
        );
    }
    let closed = count(&lines, "connection closed");
    assert!(closed > 0, "no close line at all");
    assert!(field(&summary, "log_lines_dropped") >= 1.0, "{summary}");
    let status = tokio::time::timeout(PATIENCE, server.child.wait())
        .await
        .expect("the server exits")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Connections that each print 1000 lines (the guest output cap) while
/// nothing reads stderr: 20,000 guest lines, more than twice the queue.
const FLOODERS: usize = 20;

/// Ensure guests that print while stderr is stalled cannot crowd the host's
/// own lines out of the log queue: once stderr is read again, every
/// flooding connection's limit warning and close line is there, though
/// guest lines were dropped. (With one queue for all, the queue filled with
/// guest lines after eight connections and the later ones' lines were
/// lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_output_cannot_crowd_out_host_lines() {
    let (mut server, unstall) = Binary::start_stalled(&mut fixture_command("logflood", &[])).await;
    for _ in 0..FLOODERS {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"lines").await.unwrap();
        let mut reply = [0u8; 5];
        tokio::time::timeout(PER_CONNECTION, stream.read_exact(&mut reply))
            .await
            .expect("logflood answers")
            .unwrap();
        assert_eq!(&reply, b"done\n");
    }
    unstall.send(()).unwrap();
    let (lines, summary) = lines_to_summary(&mut server).await;
    assert!(field(&summary, "log_lines_dropped") >= 1.0, "{summary}");
    assert_eq!(count(&lines, "guest output limit reached"), FLOODERS);
    assert_eq!(count(&lines, "connection closed"), FLOODERS);
}

/// SIGTERM the server and read its stderr up to the shutdown summary:
/// the lines before it, and the summary.
async fn lines_to_summary(server: &mut Binary) -> (Vec<String>, String) {
    server.signal(libc::SIGTERM);
    let read_all = async {
        let mut lines = Vec::new();
        while let Some(line) = server.stderr.recv().await {
            if line.contains("shutdown complete") {
                return (lines, line);
            }
            lines.push(line);
        }
        panic!("stderr closed before the shutdown summary");
    };
    tokio::time::timeout(PATIENCE, read_all)
        .await
        .expect("the shutdown summary in time")
}

/// How many of `lines` contain `needle`.
fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|line| line.contains(needle)).count()
}

/// How many log-line heads (a timestamp and a level) `line` holds.
fn timestamps(line: &str) -> usize {
    ["Z TRACE ", "Z DEBUG ", "Z  INFO ", "Z  WARN ", "Z ERROR "]
        .iter()
        .map(|head| line.matches(head).count())
        .sum()
}

/// [`CONNECTIONS`] connections from [`CLIENTS`] clients at once, each
/// served within [`PER_CONNECTION`].
async fn serve_all(addr: std::net::SocketAddr) {
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        clients.push(tokio::spawn(async move {
            for n in (client..CONNECTIONS).step_by(CLIENTS) {
                tokio::time::timeout(PER_CONNECTION, one_connection(addr))
                    .await
                    .unwrap_or_else(|_| panic!("connection {n} not served in time"));
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
}

/// Connect, read the handler's first line, half-close, read to its close.
async fn one_connection(addr: std::net::SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    assert!(reply.ends_with(b"\n"), "{reply:?}");
}
