"""Shared test fixtures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def start_redis_server(port: int) -> subprocess.Popen[bytes]:
    """A throwaway, non-persistent ``redis-server`` on ``port``, ready when returned."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not redis_answers(f"redis://127.0.0.1:{port}/0"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.02)
    return proc


def stop_redis_server(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: the local one on 6379 when it answers, else a private server for the session."""
    if redis_answers(LOCAL_REDIS_URL):
        yield LOCAL_REDIS_URL
        return
    port = free_port()
    proc = start_redis_server(port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis_server(proc)


# -- the real vLLM CPU engine, started once per test session ----------------------

ENGINE_LOG = "/tmp/ponder-test-engine.log"


@pytest.fixture(scope="session")
async def engine():
    """The embedded vLLM CPU engine serving PONDER_EMBEDDED_MODEL (default SmolLM2-135M-Instruct,
    prepared and cached by `make setup`); tests read its model id from ``engine.model_name``."""
    from service.config import Settings
    from service.engine import EmbeddedEngine

    started = time.monotonic()
    eng = EmbeddedEngine(Settings(), log_path=Path(ENGINE_LOG))
    await eng.start()
    print(f"\n[engine] ready in {time.monotonic() - started:.0f}s at {eng.url}")
    try:
        yield eng
    finally:
        await eng.stop()


@pytest.fixture(scope="session")
async def engine_backend(engine):
    """HTTPBackend in front of the real engine, configured as `ponder serve` configures it."""
    from service.backends import BackendConfig, HTTPBackend

    backend = HTTPBackend(BackendConfig(urls=[engine.url], supports_seed=False, default_model=engine.model_name))
    try:
        yield backend
    finally:
        await backend.aclose()
