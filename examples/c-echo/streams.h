/* Stream helpers shared by echo.c and crash.c, over the bindings that
 * `wit-bindgen c` generates for the world sockserver:handler/sockserver
 * (gen/sockserver.h). */
#ifndef SOCKSERVER_EXAMPLE_STREAMS_H
#define SOCKSERVER_EXAMPLE_STREAMS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include "sockserver.h"

typedef wasi_io_streams_borrow_input_stream_t input_t;
typedef wasi_io_streams_borrow_output_stream_t output_t;
typedef wasi_io_streams_stream_error_t stream_error_t;

/* Read at most 64 KiB per call (the host's per-direction buffer). */
#define READ_MAX 65536

enum read_status { READ_DATA, READ_CLOSED, READ_FAILED };

/* Read one chunk into `chunk` (malloc'd by the bindings: free it with
 * sockserver_list_u8_free). READ_CLOSED once the client half-closed. */
static enum read_status read_chunk(input_t in, sockserver_list_u8_t *chunk) {
  stream_error_t err;
  if (wasi_io_streams_method_input_stream_blocking_read(in, READ_MAX, chunk, &err))
    return READ_DATA;
  bool closed = err.tag == WASI_IO_STREAMS_STREAM_ERROR_CLOSED;
  wasi_io_streams_stream_error_free(&err); /* drops the `error` resource */
  return closed ? READ_CLOSED : READ_FAILED;
}

/* Write all `len` bytes and flush: as much as check-write allows at a time,
 * waiting for the host's buffer to drain when it is full. */
static bool write_all(output_t out, uint8_t *data, size_t len) {
  stream_error_t err;
  while (len > 0) {
    uint64_t permit;
    if (!wasi_io_streams_method_output_stream_check_write(out, &permit, &err))
      goto fail;
    if (permit == 0) {
      if (!wasi_io_streams_method_output_stream_blocking_flush(out, &err))
        goto fail;
      continue;
    }
    size_t n = permit < len ? (size_t)permit : len;
    sockserver_list_u8_t piece = {data, n};
    if (!wasi_io_streams_method_output_stream_write(out, &piece, &err))
      goto fail;
    data += n;
    len -= n;
  }
  if (!wasi_io_streams_method_output_stream_blocking_flush(out, &err))
    goto fail;
  return true;
fail:
  wasi_io_streams_stream_error_free(&err);
  return false;
}

/* The handler owns the three handles it is given and must drop them:
 * `output` first (half-closes the socket's write side), then `input`, then
 * the connection. */
static void drop_all(exports_sockserver_handler_handler_own_connection_t conn,
                     exports_sockserver_handler_handler_own_input_stream_t input,
                     exports_sockserver_handler_handler_own_output_stream_t output) {
  wasi_io_streams_output_stream_drop_own(output);
  wasi_io_streams_input_stream_drop_own(input);
  sockserver_handler_types_connection_drop_own(conn);
}

/* Return `err(message)` from handle: the bindings free the string after the
 * host has copied it. */
static bool fail_with(sockserver_string_t *ret, const char *message) {
  sockserver_string_dup(ret, message);
  return false;
}

#endif
