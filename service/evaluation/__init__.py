"""Evaluation harness: accuracy vs compute per strategy setting (``ponder eval``).

- ``data``: datasets as ``EvalItem`` lists — GSM8K-style and IFEval-style JSONL files, and a
  built-in generator of few-shot arithmetic completion problems;
- ``scoring``: an answer's score for an item (numeric match; IFEval via ``if-verifiable``);
- ``runner``: settings, solvers (in-process over any ``Generator``, or a ponder URL), the
  resumable JSONL runner with bounded concurrency and a progress line, the CLI entry;
- ``report``: the summary table (Wilson 95% intervals, tokens, calls, latency) and the plot.

Optional dependencies (``pip install 'ponder[eval]'``): ``if-verifiable`` for IFEval scoring,
``matplotlib`` for the plot. Both are imported only when needed.
"""

from .data import EvalItem, arithmetic_items, gsm8k_items, ifeval_items, load_dataset, parse_dataset_spec
from .report import summarize, wilson_interval, write_plot, write_summary
from .runner import (
    DEFAULT_SETTINGS,
    EvalSetting,
    HTTPSolver,
    InProcessSolver,
    Outcome,
    Progress,
    load_settings,
    read_results,
    run_eval,
)
from .scoring import Score, score_answer

__all__ = [
    "DEFAULT_SETTINGS", "EvalItem", "EvalSetting", "HTTPSolver", "InProcessSolver", "Outcome", "Progress",
    "Score", "arithmetic_items", "gsm8k_items", "ifeval_items", "load_dataset", "load_settings",
    "parse_dataset_spec", "read_results", "run_eval", "score_answer", "summarize", "wilson_interval",
    "write_plot", "write_summary",
]
