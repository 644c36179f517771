"""The README stays true: every setting documented, the test command is what CI runs."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [f"PONDER_{name.upper()}" for name in Settings.model_fields if f"`PONDER_{name.upper()}`" not in readme]
    assert not missing, f"undocumented settings: {missing}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
