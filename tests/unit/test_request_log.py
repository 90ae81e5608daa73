"""The request log: whole JSON lines, batched per event-loop step, never split."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from xks_proxy.observability import logging as request_logging


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    counting = CountingStream()
    request_logging.configure_logging("info", counting)
    yield counting
    request_logging.flush_request_log()
    request_logging._request_log.stream = None
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_lines_of_one_loop_step_are_one_write(stream: CountingStream) -> None:
    async def step() -> None:
        for index in range(3):
            request_logging.log_request({"kmsRequestId": f"r{index}", "status": 200})
        assert stream.writes == []  # pending until the step ends
        await asyncio.sleep(0)
        assert len(stream.writes) == 1

    asyncio.run(step())
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["kmsRequestId"] for line in lines] == ["r0", "r1", "r2"]
    assert all(line["logger"] == "xks_proxy.request" for line in lines)


def test_writes_hold_whole_lines_within_pipe_buf(stream: CountingStream) -> None:
    async def step() -> None:
        for index in range(40):  # ~200 bytes each: several writes
            request_logging.log_request({"kmsRequestId": f"{index:03d}" + "x" * 120})
        request_logging.log_request({"kmsRequestId": "y" * 6000})  # longer than PIPE_BUF
        await asyncio.sleep(0)

    asyncio.run(step())
    assert len(stream.writes) >= 3
    for text in stream.writes:
        assert text.endswith("\n")
        assert len(text.encode()) <= request_logging.PIPE_BUF or text.count("\n") == 1
    ids = [json.loads(line)["kmsRequestId"][:3] for line in stream.getvalue().splitlines()]
    assert ids == [f"{index:03d}" for index in range(40)] + ["yyy"]


def test_outside_a_loop_a_line_is_written_at_once(stream: CountingStream) -> None:
    request_logging.log_request({"kmsRequestId": "now"})
    assert len(stream.writes) == 1 and '"now"' in stream.writes[0]


def test_pending_lines_are_flushed_at_shutdown(stream: CountingStream) -> None:
    async def step() -> None:
        request_logging.log_request({"kmsRequestId": "last"})
        request_logging.flush_request_log()
        assert len(stream.writes) == 1

    asyncio.run(step())


def test_nothing_below_info(stream: CountingStream) -> None:
    logging.getLogger(request_logging.REQUEST_LOGGER_NAME).setLevel(logging.WARNING)
    try:
        request_logging.log_request({"kmsRequestId": "quiet"})
    finally:
        logging.getLogger(request_logging.REQUEST_LOGGER_NAME).setLevel(logging.NOTSET)
    assert stream.writes == []


def test_lines_left_by_a_loop_that_stopped_are_written_next_time(stream: CountingStream) -> None:
    loop = asyncio.new_event_loop()

    def last_callback() -> None:
        request_logging.log_request({"kmsRequestId": "before-stop"})
        loop.stop()  # the scheduled flush never runs on this loop

    loop.call_soon(last_callback)
    loop.run_forever()
    loop.close()
    assert stream.writes == []
    request_logging.log_request({"kmsRequestId": "after"})  # outside any loop
    ids = [json.loads(line)["kmsRequestId"] for line in stream.getvalue().splitlines()]
    assert ids == ["before-stop", "after"]
