/* Echo handler for wasm-sockserver in C (wit-bindgen c + wasi-libc). */
#include "streams.h"

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
