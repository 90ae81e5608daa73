"""uvicorn's httptools protocol, with each response leaving in one write.

uvicorn writes a response's status line and headers, then its body, with two
``transport.write`` calls. uvloop sends each at once: two system calls and, with
TCP_NODELAY, two TCP segments per answer, which the client has to read separately.
:class:`CorkedTransport` gathers the writes made during one event-loop step and sends
them together at the end of it (a user-space TCP_CORK), so a response costs one
``send()`` and usually one segment. Measured with ``bench/run`` (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CorkedTransport:
    """A transport proxy whose writes in one loop step go out as one ``write``.

    Everything but writing (flow control, extra info, closing) is the real
    transport's. ``close`` and ``write_eof`` send what is pending first; ``abort``
    drops it, as the real transport's abort drops its buffer.
    """

    __slots__ = ("_flush_scheduled", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what was written since the last flush (no-op if nothing is pending)."""
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class XksHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each response with one ``send()``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        corked: Any = CorkedTransport(transport, self.loop)
        super().connection_made(corked)

    def eof_received(self) -> None:
        # The peer half-closed. uvicorn returns None here, so the transport closes
        # right after: send an answer made in this step first (curl, nc and health
        # checkers may send a request and then shut down their side).
        flush = getattr(self.transport, "flush", None)
        if flush is not None:
            flush()
        super().eof_received()
