/* Crash handler: echoes like echo.c until a received chunk contains the
 * bytes `crash`, then calls abort(), which traps this connection's instance
 * (and only it). */
#include <string.h>

#include "streams.h"

static bool contains_crash(const uint8_t *data, size_t len) {
  static const char needle[] = "crash";
  const size_t n = sizeof needle - 1;
  for (size_t i = 0; i + n <= len; i++)
    if (memcmp(data + i, needle, n) == 0)
      return true;
  return false;
}

bool exports_sockserver_handler_handler_handle(
    exports_sockserver_handler_handler_own_connection_t conn,
    exports_sockserver_handler_handler_own_input_stream_t input,
    exports_sockserver_handler_handler_own_output_stream_t output,
    sockserver_string_t *err) {
  input_t in = wasi_io_streams_borrow_input_stream(input);
  output_t out = wasi_io_streams_borrow_output_stream(output);
  const char *failure = NULL;
  for (;;) {
    sockserver_list_u8_t chunk;
    enum read_status status = read_chunk(in, &chunk);
    if (status == READ_CLOSED)
      break;
    if (status == READ_FAILED) {
      failure = "read failed";
      break;
    }
    if (contains_crash(chunk.ptr, chunk.len))
      abort();
    bool wrote = write_all(out, chunk.ptr, chunk.len);
    sockserver_list_u8_free(&chunk);
    if (!wrote) {
      failure = "write failed";
      break;
    }
  }
  drop_all(conn, input, output);
  return failure ? fail_with(err, failure) : true;
}
