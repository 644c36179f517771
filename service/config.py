"""All settings, from ``PONDER_*`` environment variables (see README, Configuration)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .model_prep import DEFAULT_MODEL, RECIPES, ModelRecipe, recipe_for
from strategies.base import Budget, Limits, StrategyError

from .backends import header_value


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PONDER_", env_file=None, extra="ignore", hide_input_in_errors=True)

    # -- serving
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    api_keys: str = Field("", description="Comma-separated bearer keys; empty = no auth.")
    metrics_public: bool = Field(False, description="Serve /metrics without the API key (when keys are set).")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413).")
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    max_concurrent_runs: int = Field(16, ge=1, description="Strategy runs in flight per process (429 beyond).")
    max_concurrent_runs_per_key: int = Field(8, ge=1, description="Strategy runs in flight per API key (429).")
    admission_retry_after_s: int = Field(2, ge=1, description="Retry-After sent with a 429.")
    run_max_events: int = Field(256, ge=1, description="Progress events kept per async run.")
    run_max_event_bytes: int = Field(8192, ge=256, description="Larger event payloads are replaced by a stub.")
    run_max_record_bytes: int = Field(1024 * 1024, ge=4096, description="Larger run results lose their trace.")
    run_save_interval_s: float = Field(1.0, gt=0, description="Least time between two saves of a run record.")

    # -- backends
    backend_urls: str = Field("", description="Comma-separated vLLM/OpenAI base URLs; empty = embedded engine.")
    backend_api_key: str | None = None
    model: str | None = Field(None, description="Default model id; empty = the backend's first model.")
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0
    backend_max_retries: int = 3
    backend_max_concurrency: int = 256
    backend_supports_seed: bool = True
    backend_structured_outputs: bool = Field(
        True, description="Constrain verdicts and ratings with vLLM structured_outputs; false for backends without it.")
    backend_passthrough_reserve: float = Field(0.125, ge=0, lt=1)
    backend_queue_timeout_s: float = Field(30.0, gt=0)
    backend_max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    backend_retry_budget_ratio: float = Field(0.2, ge=0)
    backend_retry_budget_window_s: float = Field(10.0, gt=0)
    backend_retry_budget_min: int = Field(100, ge=0)
    backend_connections_per_host: int = Field(0, ge=0)
    backend_keepalive_s: float = Field(4.0, gt=0)
    backend_dns_ttl_s: float = Field(10.0, ge=0)
    backend_ca_bundle: Path | None = None
    backend_client_cert: Path | None = None
    backend_client_key: Path | None = None

    # -- embedded engine (used when backend_urls is empty)
    embedded_model: str = Field(DEFAULT_MODEL, description=f"Embedded model recipe: one of {sorted(RECIPES)}.")
    model_cache_dir: Path | None = None
    engine_port: int = 0
    engine_max_model_len: int = 2048
    engine_startup_timeout_s: float = 600.0
    engine_extra_args: str = ""
    served_model_name: str | None = Field(None, description="Model id of the embedded engine; empty = embedded_model.")

    # -- cache
    redis_url: str | None = Field(None, description="redis://host:port/db; empty = in-process cache.")
    cache_max_entries: int = 10_000
    cache_ttl_checklist_s: float = 7 * 24 * 3600
    cache_ttl_critique_s: float = 24 * 3600
    cache_ttl_judgment_s: float = 24 * 3600
    cache_ttl_run_s: float = 3600
    cache_ttl_verdict_s: float = 24 * 3600
    redis_socket_timeout_s: float = 0.25
    redis_lock_ms: int = 30_000
    redis_lock_wait_s: float = 5.0
    redis_breaker_failures: int = 5
    redis_breaker_reset_s: float = 10.0

    # -- limits on amplification, per request
    max_n: int = 8
    max_samples: int = 64
    max_rounds: int = 8
    max_depth: int = 8
    max_simulations: int = 64
    max_branching: int = 8
    max_total_tokens: int = 200_000
    max_backend_calls: int = 512
    default_deadline_s: float = 300.0
    max_deadline_s: float = 1800.0
    max_tokens_per_sample_default: int = 512
    default_temperature: float | None = Field(None, ge=0, le=2, description=(
        "Temperature of a strategy request that sets none; unset: the embedded model's recommended one "
        "(SmolLM2: 0.2) on the embedded engine, else each strategy's own default."))
    max_tokens_per_sample: int = 4096
    max_checklist_items: int = 32

    # -- verifiers (a request's `verify` list)
    allow_code_execution: bool = Field(False, description="Allow python_tests verifiers to run answer code.")
    webhook_allowlist: str = Field("", description="Comma-separated URL prefixes webhook verifiers may call.")
    verifier_workers: int = Field(2, ge=1, description="Check processes and concurrent python_tests runs.")
    verifier_timeout_s: float = Field(10.0, gt=0, description="Limit per json_schema/regex/ifeval check.")

    @field_validator("backend_api_key")
    @classmethod
    def _header_safe(cls, value: str | None) -> str | None:
        """A key read from a file keeps its trailing newline: strip it; refuse what no header can carry."""
        return None if value is None else header_value("PONDER_BACKEND_API_KEY", value) or None

    @field_validator("embedded_model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        recipe_for(value)
        return value

    @property
    def embedded_recipe(self) -> ModelRecipe:
        return recipe_for(self.embedded_model)

    @property
    def request_temperature(self) -> float | None:
        """The temperature of a strategy request that sets none: ``default_temperature``,
        else, on the embedded engine, its model's recommended one, else None (each
        strategy's own default)."""
        if self.default_temperature is not None:
            return self.default_temperature
        return None if self.backend_url_list else self.embedded_recipe.temperature

    @property
    def engine_model_name(self) -> str:
        """The model id the embedded engine serves."""
        return self.served_model_name or self.embedded_model

    @cached_property
    def backend_url_list(self) -> list[str]:
        return _split(self.backend_urls)

    @cached_property
    def webhook_allowlist_list(self) -> list[str]:
        return _split(self.webhook_allowlist)

    @cached_property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(_split(self.api_keys))

    def exposure_warning(self, host: str) -> str | None:
        """A warning when ``host`` is reachable from other machines and no API key is set."""
        if self.api_key_set or host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
            return None
        return (f"ponder is binding {host} with NO API key: anyone who can reach this port can run strategies "
                f"on your backends. Set PONDER_API_KEYS, or bind 127.0.0.1.")

    @property
    def limits(self) -> Limits:
        return Limits(
            samples=self.max_samples,
            rounds=self.max_rounds,
            depth=self.max_depth,
            simulations=self.max_simulations,
            branching=self.max_branching,
            tokens=self.max_tokens_per_sample,
            checklist_items=self.max_checklist_items,
        )

    def budget(
        self, *, max_calls: int | None = None, max_tokens: int | None = None, deadline_s: float | None = None
    ) -> Budget:
        """The caller's budget; unset fields get this server's ceilings, larger ones are refused."""
        for name, value, cap in (("budget.max_calls", max_calls, self.max_backend_calls),
                                 ("budget.max_tokens", max_tokens, self.max_total_tokens),
                                 ("budget.deadline_s", deadline_s, self.max_deadline_s)):
            if value is not None and value > cap:
                raise StrategyError(f"{name}={value} exceeds this server's cap of {cap}", field=name)
        return Budget(
            max_calls=max_calls or self.max_backend_calls,
            max_tokens=max_tokens or self.max_total_tokens,
            deadline_s=deadline_s or min(self.default_deadline_s, self.max_deadline_s),
        )

    def cache_ttls(self) -> dict[str, float]:
        return {
            "checklist": self.cache_ttl_checklist_s,
            "critique": self.cache_ttl_critique_s,
            "judgment": self.cache_ttl_judgment_s,
            "run": self.cache_ttl_run_s,
            "verdict": self.cache_ttl_verdict_s,
        }
