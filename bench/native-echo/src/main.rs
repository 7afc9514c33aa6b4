//! The native baseline: a plain tokio echo server, shaped like
//! wasm-sockserver's host (multi-thread runtime, `TcpSocket::listen` with a
//! large backlog, `TCP_NODELAY`, a 64 KiB read buffer) minus the wasm.
//!
//! Prints `listening on IP:PORT` once bound, like the real server. Stops on
//! SIGTERM/SIGINT (the default action).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Plain tokio echo server (the native baseline of bench/run.sh).
#[derive(Parser)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Set SO_REUSEPORT, like wasm-sockserver's `--reuse-port`, so several
    /// processes can share the port (`bench/hold.sh`).
    #[arg(long)]
    reuse_port: bool,
}

const BACKLOG: u32 = 65_535;
const BUFFER: usize = 64 * 1024;

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().context("failed to start the tokio runtime")?;
    runtime.block_on(serve(args.listen, args.reuse_port))
}

async fn serve(addr: SocketAddr, reuse_port: bool) -> Result<()> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a socket")?;
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let listener = socket
        .listen(BACKLOG)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {local}")?;
    stdout.flush()?;
    drop(stdout);

    loop {
        match listener.accept().await {
            Ok((tcp, _peer)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(echo(tcp));
            }
            Err(e) => {
                // Connection aborted before accept: retry at once. Anything
                // else (EMFILE, ENOBUFS...): back off like the real server.
                if e.kind() != std::io::ErrorKind::ConnectionAborted {
                    eprintln!("accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn echo(mut tcp: TcpStream) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tcp.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tcp.shutdown().await;
}
