//! The hot `wasi:io/streams` calls served straight from the connection's
//! [`Socket`] when the guest calls them on its own connection streams,
//! shadowing wasmtime-wasi's generic versions of the same functions.
//!
//! wasmtime-wasi serves every stream call through its resource table: a
//! downcast to `Box<dyn InputStream>`, an allocated future per `async` trait
//! call, a tracing span, and a copy of every written list into a host
//! `Vec`. For a 64 B request/response that was about 10 allocations per
//! round trip. Here a call on the connection's own input or output goes to
//! the socket directly, and a write reads the guest's bytes in place
//! ([`WasmList`]) and hands them to the kernel with no copy. Calls on any
//! other stream (stdout, stderr, stdin, streams of an embedder's own
//! [`run_handler`](crate::run_handler)) go to wasmtime-wasi unchanged. Both
//! paths share the state in [`Socket`], so the semantics are the same
//! whichever serves a call (the stream tests exercise them through the
//! trait implementations in [`crate::streams`]).

use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceTable, WasmList};
use wasmtime_wasi::p2::bindings::io::streams::{self as wit, HostInputStream, HostOutputStream};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, StreamResult};

use crate::connection::HostState;
use crate::streams::Socket;

/// The interface whose functions are shadowed.
const STREAMS: &str = "wasi:io/streams@0.2.12";

/// wasmtime-wasi's limit for `blocking-write-and-flush`, kept identical.
const BLOCKING_WRITE_MAX: usize = 4096;

/// The connection's socket and the resource-table slots of the input and
/// output streams the guest was handed for it.
pub struct SocketStreams {
    pub socket: Arc<Socket>,
    pub input: u32,
    pub output: u32,
}

impl SocketStreams {
    /// The socket, if `stream` is the connection's input. A slot is only
    /// reused after its stream was dropped, which the socket records, so a
    /// later stream in the same slot (say `get-stdin`'s) is never mistaken
    /// for the connection's.
    fn input(&self, stream: &Resource<DynInputStream>) -> Option<Arc<Socket>> {
        (stream.rep() == self.input && self.socket.input_live()).then(|| self.socket.clone())
    }

    fn output(&self, stream: &Resource<DynOutputStream>) -> Option<Arc<Socket>> {
        (stream.rep() == self.output && self.socket.output_live()).then(|| self.socket.clone())
    }
}

fn socket_input(
    store: &StoreContextMut<'_, HostState>,
    stream: &Resource<DynInputStream>,
) -> Option<Arc<Socket>> {
    store.data().socket.as_ref()?.input(stream)
}

fn socket_output(
    store: &StoreContextMut<'_, HostState>,
    stream: &Resource<DynOutputStream>,
) -> Option<Arc<Socket>> {
    store.data().socket.as_ref()?.output(stream)
}

/// A stream result as the guest sees it: `closed`, or an error resource for
/// `last-operation-failed`; a trap ends the call.
fn lower<T>(
    table: &mut ResourceTable,
    result: StreamResult<T>,
) -> wasmtime::Result<(Result<T, wit::StreamError>,)> {
    match result {
        Ok(value) => Ok((Ok(value),)),
        Err(error) => Ok((Err(wit::Host::convert_stream_error(table, error)?),)),
    }
}

/// The guest's bytes for a stream that is not the socket: copied into a
/// `Vec`, as wasmtime-wasi would, but never more than its host-call fuel
/// allows, which the in-place list would otherwise bypass.
fn copy_list(
    store: &StoreContextMut<'_, HostState>,
    list: &WasmList<u8>,
) -> wasmtime::Result<Vec<u8>> {
    if list.len() > crate::limits::HOSTCALL_FUEL {
        return Err(wasmtime::format_err!(
            "a write of {} bytes exceeds the host-call limit of {} bytes",
            list.len(),
            crate::limits::HOSTCALL_FUEL
        ));
    }
    Ok(list.as_le_slice(store).to_vec())
}

/// Shadow the hot stream functions in `linker`, which must already hold
/// wasmtime-wasi's.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> Result<()> {
    linker.allow_shadowing(true);
    let result = define(linker);
    linker.allow_shadowing(false);
    result
        .map_err(anyhow::Error::from)
        .context("failed to add the socket stream calls")
}

fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut streams = linker.instance(STREAMS)?;

    streams.func_wrap(
        "[method]input-stream.read",
        |mut store, (stream, len): (Resource<DynInputStream>, u64)| {
            let result = match socket_input(&store, &stream) {
                Some(socket) => socket.read(clamp(len)),
                None => HostInputStream::read(&mut store.data_mut().table, stream, len),
            };
            lower(&mut store.data_mut().table, result)
        },
    )?;

    streams.func_wrap_async(
        "[method]input-stream.blocking-read",
        |mut store, (stream, len): (Resource<DynInputStream>, u64)| {
            Box::new(async move {
                let poll = store.data().cpu.poll_id();
                let result = match socket_input(&store, &stream) {
                    Some(socket) => socket.blocking_read(clamp(len)).await,
                    None => {
                        HostInputStream::blocking_read(&mut store.data_mut().table, stream, len)
                            .await
                    }
                };
                rearm_if_waited(poll, &mut store);
                lower(&mut store.data_mut().table, result)
            })
        },
    )?;

    streams.func_wrap(
        "[method]output-stream.check-write",
        |mut store, (stream,): (Resource<DynOutputStream>,)| {
            let result = match socket_output(&store, &stream) {
                Some(socket) => socket.check_write().map(|n| n as u64),
                None => HostOutputStream::check_write(&mut store.data_mut().table, stream),
            };
            lower(&mut store.data_mut().table, result)
        },
    )?;

    streams.func_wrap(
        "[method]output-stream.write",
        |mut store, (stream, list): (Resource<DynOutputStream>, WasmList<u8>)| {
            let result = match socket_output(&store, &stream) {
                Some(socket) => socket.write(list.as_le_slice(&store)),
                None => {
                    let bytes = copy_list(&store, &list)?;
                    HostOutputStream::write(&mut store.data_mut().table, stream, bytes)
                }
            };
            lower(&mut store.data_mut().table, result)
        },
    )?;

    streams.func_wrap_async(
        "[method]output-stream.blocking-write-and-flush",
        |mut store, (stream, list): (Resource<DynOutputStream>, WasmList<u8>)| {
            Box::new(async move {
                let poll = store.data().cpu.poll_id();
                let result = match socket_output(&store, &stream) {
                    Some(socket) => {
                        if list.len() > BLOCKING_WRITE_MAX {
                            return Err(too_large());
                        }
                        // The guest is suspended while we wait, so its
                        // bytes cannot change before they are read here.
                        // (The store is borrowed only between the awaits:
                        // a borrow held across one would need it `Sync`.)
                        let written = socket
                            .wait_for_permit(list.len())
                            .await
                            .and_then(|()| socket.write(list.as_le_slice(&store)));
                        match written {
                            Ok(()) => socket.finish_write_and_flush().await,
                            Err(e) => Err(e),
                        }
                    }
                    None => {
                        let bytes = copy_list(&store, &list)?;
                        HostOutputStream::blocking_write_and_flush(
                            &mut store.data_mut().table,
                            stream,
                            bytes,
                        )
                        .await
                    }
                };
                rearm_if_waited(poll, &mut store);
                lower(&mut store.data_mut().table, result)
            })
        },
    )?;

    streams.func_wrap_async(
        "[method]output-stream.blocking-flush",
        |mut store, (stream,): (Resource<DynOutputStream>,)| {
            Box::new(async move {
                let poll = store.data().cpu.poll_id();
                let result = match socket_output(&store, &stream) {
                    Some(socket) => socket.blocking_flush().await,
                    None => {
                        HostOutputStream::blocking_flush(&mut store.data_mut().table, stream).await
                    }
                };
                rearm_if_waited(poll, &mut store);
                lower(&mut store.data_mut().table, result)
            })
        },
    )?;
    Ok(())
}

/// Push the guest's epoch deadline to the tick after this one, after a call
/// that waited.
///
/// The deadline is relative to the epoch when it was set, so a guest that
/// waited across a tick would otherwise take the epoch callback (a libcall,
/// the closure, a clock read) at its very next wasm instruction after every
/// wait: with a 1ms tick, that was about once per 64 B round trip at 100
/// busy connections. Re-armed, the callback fires only when a tick lands
/// while the guest runs, which is exactly when there is something to check
/// (a guest running on past `YIELD_AFTER`, or out of CPU), and never later
/// than the first tick after this call.
///
/// Only after a call that waited: the guest then gave its thread back, and
/// the time it waited is not its CPU. A call that returned at once (a
/// `blocking-flush` with nothing to flush) must leave the deadline alone.
/// Wasm checks the epoch only at function entries and loop back-edges, not
/// when a host call returns, so a tick that lands inside such a call is
/// seen at the guest's next check; re-arming there instead pushed the
/// deadline past it, and a guest making nothing but such calls could miss
/// every tick: no CPU limit, no yield, no idle or shutdown cut-off.
///
/// `poll` is [`CpuMeter::poll_id`](crate::limits::CpuMeter::poll_id) from
/// before the call: a call that suspended the guest returns in a later poll.
fn rearm_if_waited(poll: u64, store: &mut StoreContextMut<'_, HostState>) {
    if store.data().cpu.poll_id() != poll {
        store.set_epoch_deadline(1);
    }
}

/// The guest passes read sizes as `u64`; the socket bounds them anyway.
fn clamp(len: u64) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

fn too_large() -> wasmtime::Error {
    // The same words as wasmtime-wasi's, so a guest sees one behaviour.
    wasmtime::format_err!("Buffer too large for blocking-write-and-flush (expected at most 4096)")
}
