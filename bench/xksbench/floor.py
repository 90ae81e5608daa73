"""The architecture floor: bare HTTP plus one real HSM call per request, nothing else.

    python -m xksbench.floor --port P --workers N --hsm-calls thread|inline \
        --module LIB --token-label L --pin-file F --conf SOFTHSM2_CONF [--key foo]

The proxy's server stack and options (uvicorn, its httptools protocol, uvloop), each worker
opening the proxy's own PKCS#11 adapter (``Pkcs11KeyManager``) after it starts. Every
request (whatever it carries: the bench sends its signed Encrypt pool) is answered
with a real AES-256-GCM encryption of 32 bytes with 40 bytes of AAD, as base64 JSON.
No SigV4, no JSON validation, no request log, audit log or metrics.

``thread``: the HSM call goes through the proxy's ``HsmCalls`` hand-off (a dedicated
thread, a future, a deadline timer), as the proxy must, so that a hung HSM never
stops the event loop. This is the most the proxy's architecture can serve: what
the proxy does on top of it is what separates the two.

``inline``: the HSM call runs on the event loop. For comparison only: a proxy built
this way stops answering everything while one HSM call hangs.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import orjson

from .echo import read_body, serve, server_arguments
from .hsm import open_key_manager
from .workloads import AAD_BYTES, PLAINTEXT_BYTES

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CONTENT_TYPE = (b"content-type", b"application/json")
DEADLINE_SECONDS = 0.15  # the proxy's default request_timeout_ms
OPTIONS_ENV = "XKSBENCH_FLOOR"


class FloorApp:
    """ASGI app: lifespan opens the HSM in the worker; each request encrypts once."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = orjson.loads(os.environ[OPTIONS_ENV])
        self.key_manager: Any = None
        self.hsm_calls: Any = None
        self.plaintext = os.urandom(PLAINTEXT_BYTES)
        self.aad = os.urandom(AAD_BYTES)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.hsm_calls is not None:
                    self.hsm_calls.shutdown()
                if self.key_manager is not None:
                    self.key_manager.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _open(self) -> None:
        from xks_proxy.hsmcalls import HsmCalls

        options = self.options
        with open(options["pin_file"], encoding="utf-8") as handle:
            pin = handle.read().strip()
        self.key_manager = open_key_manager(
            options["module"], options["token_label"], pin, options["conf"]
        )
        if options["hsm_calls"] == "thread":
            self.hsm_calls = HsmCalls(1, name="floor-hsm")

    async def _http(self, receive: Receive, send: Send) -> None:
        if not await read_body(receive):
            return
        key = self.options["key"]
        if self.hsm_calls is None:
            output = self.key_manager.encrypt(key, self.plaintext, self.aad)
        else:
            output = await self.hsm_calls.call(
                time.monotonic() + DEADLINE_SECONDS,
                "the HSM did not answer in time",
                self.key_manager.encrypt,
                key,
                self.plaintext,
                self.aad,
            )
        body = orjson.dumps(
            {
                "authenticationTag": base64.b64encode(output.tag).decode("ascii"),
                "ciphertext": base64.b64encode(output.ciphertext).decode("ascii"),
                "initializationVector": base64.b64encode(output.iv).decode("ascii"),
            }
        )
        headers = [CONTENT_TYPE, (b"content-length", str(len(body)).encode("ascii"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def app_factory() -> FloorApp:
    return FloorApp()


def main(argv: Sequence[str] | None = None) -> int:
    from xks_proxy.server.protocol import XksHttpToolsProtocol

    parser = server_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--hsm-calls", choices=("thread", "inline"), default="thread")
    parser.add_argument("--module", required=True)
    parser.add_argument("--token-label", required=True)
    parser.add_argument("--pin-file", required=True)
    parser.add_argument("--conf", required=True, help="SOFTHSM2_CONF")
    parser.add_argument("--key", default="foo")
    args = parser.parse_args(argv)
    # Handed to the spawned workers through their environment (uvicorn imports the
    # app factory by name in each worker); the PIN stays in its file.
    os.environ[OPTIONS_ENV] = orjson.dumps(
        {
            "hsm_calls": args.hsm_calls,
            "module": args.module,
            "token_label": args.token_label,
            "pin_file": args.pin_file,
            "conf": args.conf,
            "key": args.key,
        }
    ).decode("ascii")
    os.environ["SOFTHSM2_CONF"] = args.conf
    serve(
        "xksbench.floor:app_factory",
        args,
        factory=True,
        http=XksHttpToolsProtocol,  # the proxy's HTTP protocol and server options
        proxy_headers=False,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
