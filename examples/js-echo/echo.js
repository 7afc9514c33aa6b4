// Echo handler for wasm-sockserver, built with componentize-js.
//
// The world `sockserver:handler/sockserver` exports the interface `handler`,
// so the module exports an object `handler` with a `handle` function. It gets
// the connection resource and the two wasi:io streams. Returning ends the
// connection with `ok`; throwing a string ends it with `err` (the string is
// logged); throwing an Error object traps the instance.

// Read at most 64 KiB per call (the host's per-direction buffer).
const READ_MAX = 65536n;

// Read one chunk; `null` at end of stream (the client half-closed).
// A failed stream operation throws an error whose `payload` is the
// wasi:io `stream-error` variant: `{tag: "closed"}` or
// `{tag: "last-operation-failed", val: error}`.
export function readChunk(input) {
  try {
    return input.blockingRead(READ_MAX);
  } catch (e) {
    if (e && e.payload && e.payload.tag === "closed") return null;
    throw e;
  }
}

// Write every byte of `bytes` and flush: write as much as `checkWrite`
// allows, and when the host's buffer is full, wait for it to drain.
export function writeAll(output, bytes) {
  let offset = 0;
  while (offset < bytes.length) {
    const permit = Number(output.checkWrite());
    if (permit === 0) {
      output.blockingFlush();
      continue;
    }
    const n = Math.min(permit, bytes.length - offset);
    output.write(bytes.subarray(offset, offset + n));
    offset += n;
  }
  output.blockingFlush();
}

// Drop the handles the host gave us (own handles are not garbage collected
// in time otherwise); `output` last, which half-closes the socket.
export function dropAll(...resources) {
  for (const r of resources) {
    if (r && typeof r[Symbol.dispose] === "function") r[Symbol.dispose]();
  }
}

export const handler = {
  handle(conn, input, output) {
    try {
      for (;;) {
        const chunk = readChunk(input);
        if (chunk === null) break;
        if (chunk.length > 0) writeAll(output, chunk);
      }
    } catch (e) {
      // A stream failure (the client reset the connection): end with `err`.
      if (e && e.payload) throw `stream error: ${e.payload.tag}`;
      throw e;
    } finally {
      dropAll(conn, input, output);
    }
  },
};
