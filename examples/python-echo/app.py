"""Echo handler for wasm-sockserver, built with componentize-py.

The world `sockserver:handler/sockserver` exports the interface `handler`,
so the app defines `class Handler(exports.Handler)`. Returning ends the
connection with `ok`; raising `Err("message")` ends it with `err` (the
message is logged); any other exception traps the instance.
"""

from typing import Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.streams import InputStream, OutputStream, StreamError_Closed

# Read at most 64 KiB per call (the host's per-direction buffer).
READ_MAX = 65536


def read_chunk(input: InputStream) -> Optional[bytes]:
    """One chunk from the client, or None at end of stream (half-close).

    A failed stream operation raises `Err(StreamError_Closed())` or
    `Err(StreamError_LastOperationFailed(error))`.
    """
    try:
        return input.blocking_read(READ_MAX)
    except Err as e:
        if isinstance(e.value, StreamError_Closed):
            return None
        raise


def write_all(output: OutputStream, data: bytes) -> None:
    """Write every byte and flush: as much as `check_write` allows at a
    time, waiting for the host's buffer to drain when it is full."""
    view = memoryview(data)
    while view:
        permit = output.check_write()
        if permit == 0:
            output.blocking_flush()
            continue
        n = min(permit, len(view))
        output.write(bytes(view[:n]))
        view = view[n:]
    output.blocking_flush()


class Handler(exports.Handler):
    def handle(self, conn, input: InputStream, output: OutputStream) -> None:
        # `with` drops the three handles the host passed us when we return.
        with conn, input, output:
            while (chunk := read_chunk(input)) is not None:
                if chunk:
                    write_all(output, chunk)
