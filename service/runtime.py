"""Process-wide runtime: the backend (remote vLLM or the embedded engine) and the cache.

Shared by the web app and the CLI so both start and stop things the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strategies.protocol import Cache

from .backends import BackendConfig, HTTPBackend
from .cache import build_cache
from .config import Settings
from .engine import EmbeddedEngine
from .verifiers import VerifierRegistry

log = logging.getLogger("ponder")


@dataclass
class Runtime:
    settings: Settings
    backend: HTTPBackend
    cache: Cache
    verifiers: VerifierRegistry = field(default_factory=VerifierRegistry)
    """Builds a request's ``verify`` checks (default: code execution off, no webhooks)."""
    engine: EmbeddedEngine | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(cls, settings: Settings, *, engine_log: Path | None = None) -> "Runtime":
        engine = None
        urls = settings.backend_url_list
        supports_seed = settings.backend_supports_seed
        model = settings.model
        if not urls:
            engine = EmbeddedEngine(settings, log_path=engine_log)
            await engine.start()
            urls = [engine.url]
            # The vLLM CPU engine crashes on per-request seeds in a batch.
            supports_seed = False
            model = model or engine.model_name
        backend = HTTPBackend(
            BackendConfig(
                urls=urls,
                api_key=settings.backend_api_key,
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                max_retries=settings.backend_max_retries,
                max_concurrency=settings.backend_max_concurrency,
                passthrough_reserve=settings.backend_passthrough_reserve,
                queue_timeout=settings.backend_queue_timeout_s,
                max_response_bytes=settings.backend_max_response_bytes,
                retry_budget_ratio=settings.backend_retry_budget_ratio,
                retry_budget_window_s=settings.backend_retry_budget_window_s,
                retry_budget_min=settings.backend_retry_budget_min,
                connections_per_host=settings.backend_connections_per_host,
                keepalive_s=settings.backend_keepalive_s,
                dns_ttl_s=settings.backend_dns_ttl_s,
                ca_bundle=_path(settings.backend_ca_bundle),
                client_cert=_path(settings.backend_client_cert),
                client_key=_path(settings.backend_client_key),
                supports_seed=supports_seed,
                supports_structured_outputs=settings.backend_structured_outputs,
                default_model=model,
            )
        )
        return cls(settings=settings, backend=backend, cache=build_cache(settings),
                   verifiers=VerifierRegistry.from_settings(settings), engine=engine)

    async def stop(self) -> None:
        await self.backend.aclose()
        await self.cache.aclose()
        await self.verifiers.aclose()
        if self.engine is not None:
            await self.engine.stop()


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)
