"""``ponder serve`` with the fixes suggested in docs/performance.md applied in-process, to
measure them before they are made in ``service/`` (nothing in ``service/`` is changed):

* ``aiohttp``: the backend client on ``aiohttp`` (one ``ClientSession``, ``TCPConnector`` with
  ``limit = PONDER_BACKEND_MAX_CONCURRENCY``) instead of one ``httpx.AsyncClient`` whose
  connection pool scans every pooled connection (a ``select()`` per idle connection) each time a
  request takes or returns a connection; same request bodies, same response parsing, same
  endpoint choice. Retries are left out (the mock does not fail).
* ``httpx2``: the same ``HTTPBackend`` code on pydantic's ``httpx2`` fork (``service.backends``'s
  ``httpx`` module swapped for ``httpx2``, same API), whose pool bookkeeping no longer rescans
  every connection per request (pydantic/httpx2 #974, #1075, #1076; the upstream fix,
  encode/httpcore #1035, is not merged). ``httpx2`` is in the venv already (``openai`` needs it).
* ``async-auth``: the bearer-key dependency as ``async def`` (FastAPI runs a plain ``def``
  dependency in its thread pool: a thread hop on every request).

    python -m loadtests.ponder_whatif [--fix aiohttp --fix async-auth] --port 8000

The load scripts start it with ``--ponder-variant fixed`` (aiohttp + async-auth) or
``--ponder-variant fixed-httpx2`` (httpx2 + async-auth).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import aiohttp

from service.backends import BackendError, HTTPBackend, UpstreamError


class AiohttpBackend(HTTPBackend):
    """``HTTPBackend`` whose JSON requests go through aiohttp."""

    _session: aiohttp.ClientSession | None = None

    def _aio(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = dict(self.config.extra_headers)
            if self.config.api_key:
                headers["Authorization"] = f"Bearer {self.config.api_key}"
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.max_concurrency, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout,
                                              sock_read=self.config.read_timeout),
                headers=headers, json_serialize=json.dumps)
        return self._session

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                      decode: bool = True) -> Any:
        async with self._semaphore:
            endpoint = self._pick(set())
            endpoint.in_flight += 1
            try:
                async with self._aio().request(method, endpoint.url + path, json=body) as response:
                    data = await response.read()
                    status = response.status
            except aiohttp.ClientError as exc:
                raise BackendError(f"backend unreachable: {exc!r}") from exc
            finally:
                endpoint.in_flight -= 1
            if status >= 400:
                raise UpstreamError(status, json.loads(data) if data else None)
            endpoint.mark_up()
            return json.loads(data) if decode else data

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        await super().aclose()


def apply(fixes: list[str]) -> None:
    if "aiohttp" in fixes:
        import service.runtime

        service.runtime.HTTPBackend = AiohttpBackend  # what Runtime.start builds
    if "httpx2" in fixes:
        import httpx2

        import service.backends

        service.backends.httpx = httpx2  # the module's every httpx.* lookup, exceptions included
    # "async-auth" is kept as a choice for old command lines: service.api.auth is async now.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="append", choices=["aiohttp", "httpx2", "async-auth"], default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    apply(args.fix if args.fix is not None else ["aiohttp", "async-auth"])
    from service.cli import main as ponder_main

    return ponder_main(["serve"] + (["--host", args.host] if args.host else []) +
                       (["--port", str(args.port)] if args.port else []))


if __name__ == "__main__":
    raise SystemExit(main())
