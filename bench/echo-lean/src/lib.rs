//! The echo handler without std: every byte the client sends comes back
//! until the client half-closes. Same host calls as `guest/echo` (a
//! `blocking-read` of up to 64 KiB, then the SDK's `send`), but the component
//! imports only what it calls and its memory image is one page.

#![no_std]

extern crate alloc;

use alloc::string::String;

/// No std, so no system allocator: dlmalloc on `memory.grow`, as std itself
/// uses on `wasm32-unknown-unknown`.
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic traps: the host ends this connection and nothing else.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

wit_bindgen::generate!({
    path: "../../wit",
    world: "sockserver:handler/sockserver",
    generate_all,
});

use exports::sockserver::handler::handler::Guest;
use sockserver::handler::types::Connection;
use wasi::io::streams::{InputStream, OutputStream, StreamError};

/// The most `blocking-write-and-flush` takes in one call (wasi:io's limit).
const SMALL_WRITE: usize = 4096;

struct Echo;

impl Guest for Echo {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        loop {
            let chunk = match input.blocking_read(64 * 1024) {
                Ok(chunk) => chunk,
                Err(e) => return ended(e),
            };
            if let Err(e) = send(&output, &chunk) {
                return ended(e);
            }
        }
    }
}

/// Send `bytes` and wait until the host has handed them to the socket, as
/// the SDK's `send` does: one `blocking-write-and-flush` for a small chunk,
/// otherwise `check-write` + `write` until all is buffered, then one
/// `blocking-flush`.
fn send(output: &OutputStream, mut bytes: &[u8]) -> Result<(), StreamError> {
    if bytes.len() <= SMALL_WRITE {
        return output.blocking_write_and_flush(bytes);
    }
    while !bytes.is_empty() {
        let permit = output.check_write()?;
        if permit == 0 {
            output.subscribe().block();
            continue;
        }
        let n = bytes
            .len()
            .min(usize::try_from(permit).unwrap_or(usize::MAX));
        output.write(&bytes[..n])?;
        bytes = &bytes[n..];
    }
    output.blocking_flush()
}

/// The client closing its side ends the echo normally; a failed stream is
/// an error with the host's message.
fn ended(e: StreamError) -> Result<(), String> {
    match e {
        StreamError::Closed => Ok(()),
        StreamError::LastOperationFailed(e) => Err(e.to_debug_string()),
    }
}

export!(Echo);

/// The canonical ABI's allocation hook, through which the host hands the
/// guest a list (wasi-libc provides it in std builds).
#[unsafe(no_mangle)]
unsafe extern "C" fn cabi_realloc(
    old: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: the canonical ABI passes a power-of-two `align` and, for a
    // reallocation, the pointer, size and alignment of an earlier result.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}
