"""Crash handler: echoes like app.py until a received chunk contains the
bytes `crash`, then raises an exception, which traps this connection's
instance (and only it)."""

from wit_world import exports
from wit_world.imports.streams import InputStream, OutputStream

from app import read_chunk, write_all


class Handler(exports.Handler):
    def handle(self, conn, input: InputStream, output: OutputStream) -> None:
        with conn, input, output:
            while (chunk := read_chunk(input)) is not None:
                if b"crash" in chunk:
                    raise RuntimeError("received `crash`")
                write_all(output, chunk)
