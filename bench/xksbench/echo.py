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


async def read_body(receive: Callable[[], Awaitable[Message]]) -> bool:
    """Read (and drop) the whole request body; False if the client went away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        if not message.get("more_body", False):
            return True


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http" or not await read_body(receive):
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def server_arguments(description: str) -> argparse.ArgumentParser:
    """The command-line options every bench server takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep-alive", type=int, default=60)
    return parser


def serve(app: str, args: argparse.Namespace, **options: Any) -> None:
    """uvicorn with the bench servers' common options (``options`` add or override)."""
    import uvicorn

    settings: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "http": "httptools",
        "loop": "uvloop",
        "lifespan": "off",
        "access_log": False,
        "server_header": False,
        "timeout_keep_alive": args.keep_alive,
        "log_level": "warning",
    }
    settings.update(options)
    uvicorn.run(app, **settings)


def main(argv: Sequence[str] | None = None) -> int:
    serve("xksbench.echo:app", server_arguments(__doc__.split("\n\n")[0]).parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
