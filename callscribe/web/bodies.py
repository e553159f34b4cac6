"""Request bodies read within a size and a time limit, never buffered whole first.

`Request.body()` reads everything the client sends before the route can look at its size: a
200 MB POST costs 200 MB of RSS before the 413. `read_body` refuses a declared
Content-Length over the limit before reading a byte, counts the bytes of a chunked or lying
body as they arrive and stops at the limit, and gives a slow sender `timeout_sec` in all.
"""

from __future__ import annotations

import asyncio
import re

from starlette.requests import Request

# How long a client may take to send a body of an API route (a slow-body sender holds a task).
BODY_TIMEOUT_SEC = 10.0
_DIGITS = re.compile(r"^[0-9]{1,18}$")


class BodyError(Exception):
    """A body the route will not read; `status` is the HTTP answer (400, 408 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, max_bytes: int, timeout_sec: float = BODY_TIMEOUT_SEC) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _DIGITS.match(declared.strip()):
            raise BodyError(400, f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > max_bytes:
            raise BodyError(413, f"body of {int(declared)} bytes exceeds {max_bytes}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_sec):
            async for chunk in request.stream():
                if len(body) + len(chunk) > max_bytes:
                    raise BodyError(413, f"body exceeds {max_bytes} bytes")
                body += chunk
    except TimeoutError:
        raise BodyError(408, f"body not received within {timeout_sec:.0f} s") from None
    return bytes(body)
