"""Inference-time strategies over a small generation protocol.

Public surface: ``run_strategy``, ``strategies``, ``get_strategy``, ``Task``,
``Budget``, ``Limits``, ``StrategyResult``, ``StrategyError``. Adding a strategy
means one new module here and one line below.
"""

from .base import (
    Budget,
    Limits,
    StrategyError,
    StrategyResult,
    Task,
    get_strategy,
    run_strategy,
    strategies,
)
from .protocol import Cache, Choice, Generation, GenerationRequest, Generator, Usage

# Registration: importing a strategy module registers it.
from . import passthrough, self_consistency, self_refine, mcts, checklist_bon, best_of_n, verified_bon, auto  # noqa: E402,F401

__all__ = [
    "Budget", "Cache", "Choice", "Generation", "GenerationRequest", "Generator", "Limits",
    "StrategyError", "StrategyResult", "Task", "Usage", "get_strategy", "run_strategy", "strategies",
]
