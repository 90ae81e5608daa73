"""CorkedTransport: the writes of one loop step leave as one write, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from xks_proxy.server.protocol import CorkedTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.events.append("write")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.events.append("close")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def corked() -> tuple[CorkedTransport, RecordingTransport]:
    real = RecordingTransport()
    return CorkedTransport(real, asyncio.get_running_loop()), real  # type: ignore[arg-type]


def test_writes_of_one_step_are_one_write() -> None:
    asyncio.run(_test_writes_of_one_step_are_one_write())


async def _test_writes_of_one_step_are_one_write() -> None:
    transport, real = corked()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert real.writes == []  # nothing sent before the step ends
    assert transport.get_write_buffer_size() == 40
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert real.writes[1:] == [b"next"]


def test_close_sends_pending_first_and_abort_drops_it() -> None:
    asyncio.run(_test_close_sends_pending_first_and_abort_drops_it())


async def _test_close_sends_pending_first_and_abort_drops_it() -> None:
    transport, real = corked()
    transport.write(b"answer")
    transport.close()
    assert real.events == ["write", "close"] and real.writes == [b"answer"]
    await asyncio.sleep(0)
    assert real.writes == [b"answer"]  # the scheduled flush finds nothing left

    transport, real = corked()
    transport.write(b"dropped")
    transport.abort()
    await asyncio.sleep(0)
    assert real.writes == [] and real.events == ["abort"]


def test_nothing_is_written_to_a_closing_transport_and_the_rest_is_delegated() -> None:
    asyncio.run(_test_nothing_is_written_to_a_closing_transport_and_the_rest_is_delegated())


async def _test_nothing_is_written_to_a_closing_transport_and_the_rest_is_delegated() -> None:
    transport, real = corked()
    transport.write(b"late")
    real.closing = True
    await asyncio.sleep(0)
    assert real.writes == []
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
    assert transport.is_closing()
