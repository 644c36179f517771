"""Wire models: the OpenAI-compatible requests ponder accepts and its own REST task API.

OpenAI requests allow unknown fields: anything ponder does not interpret (tools,
response_format, logit_bias, ...) is passed to the backend verbatim.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from strategies.base import StrategyError


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_calls: int | None = Field(None, ge=1, description="Backend requests, over all internal calls.")
    max_tokens: int | None = Field(None, ge=16, description="Prompt + completion tokens, over all internal calls.")
    deadline_s: float | None = Field(None, ge=1, description="Wall-clock seconds (at least 1: a shorter deadline "
                                     "could only end in a timeout); the best answer so far is returned.")


FORWARDED_FIELDS = frozenset({
    # OpenAI, both endpoints
    "model", "n", "stream", "stream_options", "temperature", "top_p", "max_tokens", "stop", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "user", "response_format",
    # OpenAI chat completions
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "reasoning_effort", "metadata", "store", "service_tier",
    "prompt_cache_key", "safety_identifier", "verbosity",
    # OpenAI completions
    "prompt", "best_of", "echo", "suffix",
    # vLLM's extra sampling and request parameters
    "top_k", "min_p", "repetition_penalty", "length_penalty", "use_beam_search", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids",
    "bad_words", "add_generation_prompt", "continue_final_message", "add_special_tokens", "documents",
    "chat_template", "chat_template_kwargs", "mm_processor_kwargs", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
    "structural_tag", "structured_outputs", "priority", "request_id", "return_tokens_as_token_ids",
    "return_token_ids", "cache_salt", "include_reasoning", "prompt_embeds", "kv_transfer_params",
    "vllm_xargs",
})
"""The request fields forwarded to the backend: OpenAI's (chat and completions) and vLLM's
extra parameters (``vllm/entrypoints/openai/protocol.py``). Any other field is refused with a
400 naming it, as OpenAI does ("Unrecognized request argument"), rather than sent upstream."""


class StrategyFields(BaseModel):
    """ponder's extension fields, sent by the openai SDK through ``extra_body``."""

    strategy: str | None = None
    strategy_params: dict[str, Any] | None = None
    budget: BudgetIn | None = None
    cache: bool = True
    verify: list[Any] | None = None
    """Outside checks on candidates (``strategies.verification``); validated by the verifier registry."""


class OpenAIRequest(StrategyFields):
    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def passthrough_fields(self) -> dict[str, Any]:
        """The caller's fields for the backend: everything sent except ponder's own extension
        fields. StrategyError (400) naming the first field not in ``FORWARDED_FIELDS``."""
        for name in self.model_extra or {}:
            if name not in FORWARDED_FIELDS:
                raise StrategyError(f"unrecognized request argument: {name}", field=name)
        return self.model_dump(exclude=set(StrategyFields.model_fields), exclude_unset=True)


class ChatCompletionRequest(OpenAIRequest):
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _roles(self) -> "ChatCompletionRequest":
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"messages[{i}] needs a 'role'")
        return self


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    """As vLLM accepts it; strategies need one text prompt."""

    @property
    def text_prompt(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) == 1 and isinstance(self.prompt[0], str):
            return self.prompt[0]
        raise StrategyError("strategies take exactly one text prompt", field="prompt")


# -- REST task API ---------------------------------------------------------------


class TaskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    prompt: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> "TaskIn":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of task.messages or task.prompt")
        return self


class SamplingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=8)


class SolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskIn
    strategy: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None
    budget: BudgetIn = Field(default_factory=BudgetIn)
    sampling: SamplingIn = Field(default_factory=SamplingIn)
    cache: bool = Field(True, description="false: neither read nor write cached critiques/checklists.")
    verify: list[Any] | None = Field(None, description="Verifiers every candidate is checked with "
                                     "(json_schema, regex, ifeval, python_tests, webhook).")


class SolveResponse(BaseModel):
    id: str
    answer: str
    strategy: str
    model: str
    budget_limited: bool
    stop_reason: str
    usage: dict[str, Any]
    trace: dict[str, Any]


RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class RunOut(BaseModel):
    id: str
    status: RunStatus
    strategy: str
    created: float
    result: SolveResponse | None = None
    error: dict[str, Any] | None = None


# -- checks every request passes before any work ----------------------------------


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Path (``messages.0.content``) of the first string holding a lone UTF-16 surrogate
    (JSON ``"\\ud800"``: not Unicode text, it cannot be encoded to UTF-8), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, BaseModel):
        items = [(name, getattr(value, name)) for name in type(value).model_fields]
        items += list((value.model_extra or {}).items())
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return None
    for key, item in items:
        name = str(key).encode("utf-8", "backslashreplace").decode()  # a path is always printable
        where = f"{path}.{name}" if path else name
        if name != str(key):
            return where
        found = lone_surrogate_at(item, where)
        if found is not None:
            return found
    return None


def check_request(body: BaseModel, settings: Any) -> None:
    """Refuse (400 naming the field) text that is not Unicode and more chat messages
    than ``PONDER_MAX_MESSAGES``; both would otherwise fail deep inside a run."""
    where = lone_surrogate_at(body)
    if where is not None:
        raise StrategyError(f"{where}: text holds a lone UTF-16 surrogate, which is not valid Unicode", field=where)
    if isinstance(body, SolveRequest):
        messages, field = body.task.messages, "task.messages"
    else:
        messages, field = getattr(body, "messages", None), "messages"
    if messages is not None and len(messages) > settings.max_messages:
        raise StrategyError(f"{field} holds {len(messages)} messages; this server's cap is {settings.max_messages}",
                            field=field)
