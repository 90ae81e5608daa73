"""The bare-HTTP ceiling: a minimal ASGI app answering every request with fixed JSON.

    python -m xksbench.echo --port P --workers N

Same server stack and options as the proxy's workers (uvicorn, httptools, uvloop, no
access log, no server header, same keep-alive), with uvicorn's own ``--workers``
supervisor sharing one listening socket. It reads the whole request body, as the
proxy does, and answers with a body the size of an Encrypt answer. Whatever the
proxy does beyond this (SigV4, JSON, validation, the HSM call, logging, metrics) is
what separates its throughput from this one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Message = MutableMapping[str, Any]

BODY = (
    b'{"authenticationTag":"qJq+rDyh1NKvTu2X4e9dFQ==",'
    b'"ciphertext":"Ng5Uw1OUxj0CwOwFfr7Dq+NUHhWMDOp9xrPqSCqnOt0=",'
    b'"initializationVector":"Xy6V1s2ZcZxpNGdF"}'
)
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode("ascii")),
]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = bool(message.get("more_body", False))
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep-alive", type=int, default=60)
    args = parser.parse_args(argv)
    uvicorn.run(
        "xksbench.echo:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        access_log=False,
        server_header=False,
        timeout_keep_alive=args.keep_alive,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
