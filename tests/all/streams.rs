//! Property tests of the host stream layer (`wasm_sockserver::streams`) on
//! real loopback sockets: any chunking of reads, writes, flushes and closes
//! delivers the exact bytes, and a client reset surfaces as a stream error,
//! never a panic or a trap.
//!
//! More cases: `PROPTEST_CASES=2000 cargo test --test all streams::`.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasm_sockserver::streams::{BUFFER_LIMIT, Socket, SocketInput, SocketOutput};
use wasmtime_wasi::p2::{InputStream, OutputStream, StreamError};

use crate::util::pattern;

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Write `data` to the guest-facing output in pieces of `sizes` (cycled,
/// capped by the permit), flushing every `flush_every` writes.
async fn write_in_pieces(
    output: &mut SocketOutput,
    data: &[u8],
    sizes: &[usize],
    flush_every: usize,
) -> Result<(), StreamError> {
    let mut pos = 0;
    let mut i = 0;
    while pos < data.len() {
        let permit = output.write_ready().await?;
        assert!(permit <= BUFFER_LIMIT);
        let n = permit.min(sizes[i % sizes.len()]).min(data.len() - pos);
        output.write(Bytes::copy_from_slice(&data[pos..pos + n]))?;
        pos += n;
        i += 1;
        if i % flush_every == 0 {
            output.flush()?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Ensure bytes cross the stream layer exactly, in both directions,
    /// whatever the client's chunking and the guest's read/write sizes, and
    /// that FIN reads as `closed` and dropping the output sends FIN.
    #[test]
    fn exact_bytes_whatever_the_chunking(
        client_chunks in vec(1usize..70_000, 0..10),
        read_sizes in vec(0usize..100_000, 1..6),
        write_sizes in vec(1usize..100_000, 1..6),
        flush_every in 1usize..4,
    ) {
        runtime().block_on(async {
            let (client, server) = pair().await;
            let socket = Socket::new(server);
            let mut input = SocketInput::new(socket.clone());
            let mut output = SocketOutput::new(socket.clone());
            let total: usize = client_chunks.iter().sum();
            let data = pattern(total, total as u64);

            let (mut rd, mut wr) = client.into_split();
            let to_send = data.clone();
            let writer = tokio::spawn(async move {
                let mut pos = 0;
                for chunk in client_chunks {
                    wr.write_all(&to_send[pos..pos + chunk]).await.unwrap();
                    pos += chunk;
                }
                wr.shutdown().await.unwrap();
            });
            let reader = tokio::spawn(async move {
                let mut back = Vec::new();
                rd.read_to_end(&mut back).await.unwrap();
                back
            });

            let mut received = Vec::new();
            let mut i = 0;
            loop {
                let size = read_sizes[i % read_sizes.len()];
                i += 1;
                match input.blocking_read(size).await {
                    Ok(bytes) => {
                        assert!(bytes.len() <= size.min(BUFFER_LIMIT));
                        received.extend_from_slice(&bytes);
                    }
                    Err(StreamError::Closed) => break,
                    Err(e) => panic!("read failed: {e}"),
                }
            }
            assert!(matches!(input.read(10), Err(StreamError::Closed)));
            writer.await.unwrap();
            assert!(received == data, "host read {} of {} bytes", received.len(), data.len());

            write_in_pieces(&mut output, &data, &write_sizes, flush_every).await.unwrap();
            output.cancel().await;
            let back = reader.await.unwrap();
            assert!(back == data, "client read {} of {} bytes", back.len(), data.len());
            assert_eq!(socket.activity().bytes_in(), total as u64);
            assert_eq!(socket.activity().bytes_out(), total as u64);
        });
    }

    /// Ensure a client that resets after reading some of the output makes
    /// the guest's writes fail with a stream error, not a panic or a trap.
    #[test]
    fn reset_mid_write_is_a_stream_error(
        read_before_reset in 0usize..300_000,
        write_sizes in vec(1usize..100_000, 1..6),
    ) {
        runtime().block_on(async {
            let (mut client, server) = pair().await;
            let socket = Socket::new(server);
            let mut output = SocketOutput::new(socket.clone());
            let reader = tokio::spawn(async move {
                let mut sink = vec![0u8; read_before_reset];
                client.read_exact(&mut sink).await.unwrap();
                socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO)).unwrap();
            });
            let data = pattern(64 << 20, 5);
            let result = write_in_pieces(&mut output, &data, &write_sizes, 2).await;
            reader.await.unwrap();
            match result {
                Err(StreamError::LastOperationFailed(_) | StreamError::Closed) => {}
                Err(StreamError::Trap(e)) => panic!("trap: {e}"),
                Ok(()) => panic!("64 MiB written to a client that reset"),
            }
            assert!(socket.was_reset());
            // Afterwards the stream stays closed.
            assert!(matches!(output.check_write(), Err(StreamError::Closed)));
        });
    }
}

/// Ensure a write larger than the permit traps (the guest broke the
/// `check-write` contract) instead of growing the host buffer.
#[test]
fn write_beyond_permit_traps() {
    runtime().block_on(async {
        let (_client, server) = pair().await;
        let mut output = SocketOutput::new(Socket::new(server));
        assert_eq!(output.check_write().unwrap(), BUFFER_LIMIT);
        let too_big = Bytes::from(vec![0u8; BUFFER_LIMIT + 1]);
        assert!(matches!(output.write(too_big), Err(StreamError::Trap(_))));
    });
}

/// Ensure `blocking-read` of 0 bytes waits until input arrives, as
/// wasmtime-wasi's does, instead of returning at once (which would make a
/// guest's "wait for input" a busy loop), and consumes nothing.
#[test]
fn blocking_read_of_nothing_waits_for_input() {
    runtime().block_on(async {
        let (mut client, server) = pair().await;
        let mut input = SocketInput::new(Socket::new(server));
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            input.blocking_read(0),
        )
        .await;
        assert!(
            early.is_err(),
            "blocking-read(0) returned with no input: {early:?}"
        );
        client.write_all(b"x").await.unwrap();
        let woke = tokio::time::timeout(crate::util::PATIENCE, input.blocking_read(0))
            .await
            .expect("blocking-read(0) wakes when input arrives")
            .unwrap();
        assert!(woke.is_empty());
        assert_eq!(&input.read(1).unwrap()[..], b"x");
        // At the end of input it reports `closed` at once.
        client.shutdown().await.unwrap();
        let end = tokio::time::timeout(crate::util::PATIENCE, input.blocking_read(0))
            .await
            .expect("blocking-read(0) wakes at the end of input");
        assert!(matches!(end, Err(StreamError::Closed)), "{end:?}");
    });
}

/// Ensure `blocking-write-and-flush` waits while the client is not reading
/// (kernel buffers and the host's buffer full) instead of failing or
/// buffering without bound, returns only once its bytes are with the
/// kernel, and delivers every byte in order once the client reads.
#[test]
fn blocking_write_and_flush_waits_for_a_slow_reader() {
    runtime().block_on(async {
        let (mut client, server) = pair().await;
        let socket = Socket::new(server);
        let mut output = SocketOutput::new(socket.clone());
        let data = pattern(16 << 20, 7);
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in data.chunks(4096) {
                output
                    .blocking_write_and_flush(Bytes::copy_from_slice(chunk))
                    .await
                    .unwrap();
            }
            // Every call returned after a complete flush, so nothing may be
            // left in the host's buffer.
            assert_eq!(output.check_write().unwrap(), BUFFER_LIMIT);
        });
        // Not reading: the writer must block once the buffers are full.
        let stalled = tokio::time::timeout(std::time::Duration::from_millis(300), async {
            while !writer.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(
            stalled.is_err(),
            "16 MiB flushed to a client that never read"
        );
        let mut received = vec![0u8; expected.len()];
        client.read_exact(&mut received).await.unwrap();
        writer.await.unwrap();
        assert!(received == expected, "bytes differ");
        assert!(!socket.was_reset());
    });
}

/// Ensure output the guest wrote without flushing still reaches a client
/// that reads slowly while the guest waits for the client's next request:
/// the host keeps handing its buffer to the socket during the wait, so the
/// response cannot get stuck behind a guest that forgot to flush.
#[test]
fn unflushed_output_drains_while_waiting_for_input() {
    runtime().block_on(async {
        let (mut client, server) = pair().await;
        let socket = Socket::new(server);
        let mut output = SocketOutput::new(socket.clone());
        let mut input = SocketInput::new(socket.clone());
        // Write until the kernel buffers are full and the host holds a full
        // buffer of its own, never flushing.
        let data = pattern(64 << 20, 9);
        let mut written = 0;
        loop {
            let permit = output.check_write().unwrap();
            if permit == 0 {
                break;
            }
            let n = permit.min(data.len() - written);
            assert!(n > 0, "64 MiB fitted in the buffers");
            output
                .write(Bytes::copy_from_slice(&data[written..written + n]))
                .unwrap();
            written += n;
        }
        // The guest now waits for the next request.
        let waiter = tokio::spawn(async move { input.blocking_read(100).await.unwrap() });
        let mut received = vec![0u8; written];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut received),
        )
        .await
        .expect("the unflushed output did not arrive")
        .unwrap();
        assert!(received[..] == data[..written], "bytes differ");
        client.write_all(b"next").await.unwrap();
        assert_eq!(&waiter.await.unwrap()[..], b"next");
    });
}

/// Ensure short reads never lose a wake-up: a client on another thread
/// streams small pieces as fast as it can while the guest drains them with
/// large reads, so data keeps landing between a read and the next wait. A
/// lost wake-up would leave the reader waiting for bytes that already
/// arrived, and the timeout would fire. Most reads here are short and
/// small, so they clear tokio's readiness; `short_bulk_read_looks_again`
/// checks that bulk reads do not.
#[test]
fn short_reads_never_lose_a_wake_up() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..50 {
        runtime.block_on(stream_small_pieces(round));
    }
}

async fn stream_small_pieces(round: u64) {
    let (client, server) = pair().await;
    let socket = Socket::new(server);
    let mut input = SocketInput::new(socket.clone());
    let data = pattern(4 << 20, round);
    let expected = data.clone();
    let (_rd, mut wr) = client.into_split();
    let writer = tokio::spawn(async move {
        let mut pos = 0;
        let mut piece = 1;
        while pos < data.len() {
            let n = piece.min(data.len() - pos);
            wr.write_all(&data[pos..pos + n]).await.unwrap();
            pos += n;
            piece = piece % 997 + 1;
        }
        wr
    });
    let mut received = Vec::with_capacity(expected.len());
    let mut reads = 0u64;
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while received.len() < expected.len() {
            let bytes = input.blocking_read(BUFFER_LIMIT).await.unwrap();
            received.extend_from_slice(&bytes);
            reads += 1;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "round {round}: reader stalled after {reads} reads, {} of {} bytes, with the rest sent",
            received.len(),
            expected.len()
        )
    });
    let _wr = writer.await.unwrap();
    assert!(received == expected, "round {round}: bytes differ");
}

/// Ensure a short *bulk* read leaves the socket readable in tokio's eyes, so
/// the next read looks again instead of waiting for the next epoll round.
/// The second batch lands while the runtime does not turn (no `.await`
/// between the two reads), as when other guests keep the thread busy: a
/// read that had cleared the readiness would see nothing. That is the
/// slow-down which kept up to 6 of 10 bulk connections at one receive window
/// per epoll round (see `Socket::read`).
#[test]
fn short_bulk_read_looks_again() {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 30_000;
    runtime().block_on(async {
        let (client, server) = pair().await;
        let server_fd = server.as_raw_fd();
        let socket = Socket::new(server);
        let mut input = SocketInput::new(socket.clone());
        let queued = || {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int; `socket` keeps the fd open.
            assert_eq!(unsafe { libc::ioctl(server_fd, libc::FIONREAD, &mut n) }, 0);
            n as usize
        };
        // Write without awaiting and wait for the kernel to queue it all,
        // so the runtime never polls epoll in between.
        let send = |byte: u8| {
            let batch = vec![byte; BATCH];
            let mut sent = 0;
            while sent < BATCH {
                match client.try_write(&batch[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::yield_now()
                    }
                    Err(e) => panic!("client write failed: {e}"),
                }
            }
            while queued() < BATCH {
                std::thread::yield_now();
            }
        };
        send(1);
        let first = input.blocking_read(BUFFER_LIMIT).await.unwrap();
        assert_eq!(first.len(), BATCH, "the first batch in one short read");
        send(2);
        let second = input.read(BUFFER_LIMIT).unwrap();
        assert_eq!(
            second.len(),
            BATCH,
            "the read after a short bulk read did not look at the socket"
        );
        assert!(second.iter().all(|&b| b == 2));
    });
}
