"""Run an ASGI app under uvicorn on a free loopback port, in a thread with its own loop.

A separate loop keeps the server's timing independent of the test's loop, and lets
synchronous clients (the official ``openai`` SDK) call it from the test.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn


class ServedApp:
    def __init__(self, app: Any, *, name: str = "app", lifespan: str = "on", port: int = 0) -> None:
        """``port=0`` picks a free port; a fixed one lets a restarted server come back at its address."""
        self.app, self.name, self.lifespan = app, name, lifespan
        self.port = port
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ServedApp":
        # proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted connections
        # (with proto 0 it skips it, and Nagle + delayed ACK add ~40 ms per response).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, loop="asyncio", http="h11", lifespan=self.lifespan, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)

        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self._server.serve(sockets=[sock])

        self._thread = threading.Thread(target=lambda: asyncio.run(serve()), name=f"served-{self.name}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def __enter__(self) -> "ServedApp":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response has ``status`` and an OpenAI error body (naming ``param`` when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error
