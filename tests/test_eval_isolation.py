"""``ponder eval`` does not share cached work between settings: two identical
checklist-bon settings cost the same calls and tokens per task whatever their
order, in-process and against a running ponder (``--url``), so tokens/task and
``--match-budget`` measure the setting itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.evaluation import read_results

from tests.fake_openai import FakeOpenAI

SETTINGS = json.dumps([{"label": label, "strategy": "checklist-bon", "params": {"n": 2}} for label in ("a", "b")])


def per_label(out: Path) -> dict[str, list[tuple[int, int]]]:
    costs: dict[str, list[tuple[int, int]]] = {}
    for record in sorted(read_results(out / "results.jsonl"), key=lambda r: r["item_id"]):
        assert "error" not in record, record["error"]
        costs.setdefault(record["label"], []).append((record["calls"], record["total_tokens"]))
    return costs


def assert_same_cost(out: Path) -> None:
    costs = per_label(out)
    # checklist + candidates + 2 candidates x the checklist's items, for both settings.
    assert costs["a"] == costs["b"] and all(calls >= 4 for calls, _ in costs["b"])


@pytest.fixture
def fake(monkeypatch):
    with FakeOpenAI(name="eval-iso") as fake:
        monkeypatch.delenv("PONDER_REDIS_URL", raising=False)
        monkeypatch.setenv("PONDER_BACKEND_URLS", fake.url)
        monkeypatch.setenv("PONDER_MODEL", fake.model)
        yield fake


def test_in_process_eval_settings_do_not_share_cached_work(fake, tmp_path: Path) -> None:
    from service.cli import main

    out = tmp_path / "in-process"
    assert main(["eval", "--dataset", "arith:2:1", "--settings", SETTINGS, "--out", str(out),
                 "--concurrency", "1", "--no-plot"]) == 0
    assert_same_cost(out)


def test_url_eval_settings_do_not_share_the_servers_cache(fake, tmp_path: Path) -> None:
    from service.app import create_app
    from service.cli import main
    from service.config import Settings
    from tests.servers import ServedApp

    with ServedApp(create_app(Settings(api_keys="")), name="ponder-eval-iso") as served:
        out = tmp_path / "url"
        assert main(["eval", "--dataset", "arith:2:1", "--settings", SETTINGS, "--out", str(out),
                     "--concurrency", "1", "--no-plot", "--url", served.url]) == 0
    assert_same_cost(out)
