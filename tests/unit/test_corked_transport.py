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


# ------------------------------------------------ the protocol on a real socket


async def _serve_once(request: bytes, half_close: bool, answers: int) -> bytes:
    """One connection to XksHttpToolsProtocol on a real loopback socket (uvloop, like
    the workers), answering 200 "{}" in the same step it reads the request."""
    import socket

    import uvicorn
    import uvloop
    from uvicorn.server import ServerState

    from xks_proxy.server.protocol import XksHttpToolsProtocol

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    config = uvicorn.Config(app, http=XksHttpToolsProtocol, lifespan="off", log_config=None)
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: XksHttpToolsProtocol(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    try:
        await loop.sock_sendall(client, request)
        if half_close:
            client.shutdown(socket.SHUT_WR)
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < answers or not received.endswith(b"{}"):
            chunk = await asyncio.wait_for(loop.sock_recv(client, 4096), 5)
            if not chunk:
                break
            received += chunk
        return received
    finally:
        client.close()
        server.close()


def _run_uvloop(request: bytes, half_close: bool, answers: int = 1) -> bytes:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve_once(request, half_close, answers))


REQUEST = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_pipelined_requests_are_all_answered_whole() -> None:
    answers = _run_uvloop(REQUEST * 3, half_close=False, answers=3)
    one = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    assert answers == one * 3


def test_answer_still_sent_when_the_client_half_closes() -> None:
    # A client that sends its request and shuts down its side (nc, some health
    # checkers) must still get the answer made in that same loop step.
    answer = _run_uvloop(REQUEST, half_close=True)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"{}")
