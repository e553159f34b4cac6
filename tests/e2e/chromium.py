"""A headless Debian Chromium driven over the Chrome DevTools Protocol (a websocket, asyncio).

Asyncio all the way, because the bridge under test runs on the same event loop as the test:
a blocking driver (selenium) would freeze the server the browser is talking to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import websockets

from tests.support import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",  # no crash reporter process, nothing written under ~/.config
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--window-size=1280,900",
)


class BrowserError(RuntimeError):
    pass


class Page:
    def __init__(self, browser: Chromium, session_id: str, target_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.target_id = target_id
        self.console: list[str] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session_id=self.session_id)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression[:80]!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str = "") -> Any:
        """Poll `expression` until it is truthy; the error shows the page's console."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what or expression} not true within {timeout}s; console: {self.console[-20:]}"
                )
            await asyncio.sleep(0.2)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete'", 10, f"load of {url}")

    async def reload(self) -> None:
        await self.evaluate("window.__reloading = true")
        await self.send("Page.reload", {"ignoreCache": True})
        await self.wait_for(
            "document.readyState === 'complete' && !window.__reloading", 10, "reload to complete"
        )

    async def screenshot(self, path: Path) -> Path:
        # A background tab does not render (animations stay on their first frame).
        await self.send("Page.bringToFront")
        reply = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        await asyncio.to_thread(_write, path, base64.b64decode(reply["data"]))
        return path


class Chromium:
    def __init__(self, process: asyncio.subprocess.Process, ws: Any, profile: Path) -> None:
        self.process = process
        self.ws = ws
        self.profile = profile
        self.pages: dict[str, Page] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, fake_audio: Path, log_path: Path) -> AsyncIterator[Chromium]:
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed (Debian package chromium; make system-deps)")
        port = free_port(socket.SOCK_STREAM)
        profile = Path(tempfile.mkdtemp(prefix="callscribe-chromium-"))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--use-file-for-fake-audio-capture={fake_audio}",
                f"--remote-debugging-port={port}",
                "about:blank",
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: renderers end with it
            )
        browser: Chromium | None = None
        try:
            ws_url = await _devtools_url(port, process)
            ws = await websockets.connect(ws_url, max_size=64 * 1024 * 1024)
            browser = cls(process, ws, profile)
            yield browser
        finally:
            if browser is not None:
                browser._reader.cancel()
                with contextlib.suppress(Exception):
                    await browser.ws.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            shutil.rmtree(profile, ignore_errors=True)

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        await self.ws.send(json.dumps(message))
        return await asyncio.wait_for(future, 30)

    async def new_page(self, url: str) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"], target["targetId"])
        self.pages[page.session_id] = page
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        await page.navigate(url)
        return page

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._waiting.pop(message["id"], None)
                if future is not None and not future.done():
                    if "error" in message:
                        future.set_exception(BrowserError(f"CDP error: {message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
                continue
            page = self.pages.get(message.get("sessionId", ""))
            if page is None:
                continue
            params = message.get("params", {})
            if message.get("method") == "Runtime.consoleAPICalled":
                page.console.append(
                    " ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"])
                )
            elif message.get("method") == "Runtime.exceptionThrown":
                page.console.append(f"exception: {params['exceptionDetails']}")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def _devtools_url(port: int, process: asyncio.subprocess.Process) -> str:
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise BrowserError(f"chromium exited with {process.returncode} before DevTools came up")
            with contextlib.suppress(httpx.HTTPError):
                reply = await client.get(f"http://127.0.0.1:{port}/json/version", timeout=1)
                return str(reply.json()["webSocketDebuggerUrl"])
            await asyncio.sleep(0.2)
    raise BrowserError(f"chromium DevTools did not answer on port {port} within 20s")
