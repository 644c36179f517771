"""Summary of an eval run: a table per setting and a plot of accuracy vs compute.

Accuracy is over *scored* items (IFEval prompts that could not be scored are counted apart)
with a Wilson score 95% interval; compute is the mean prompt + completion tokens per task over
every internal call of the strategy. Failed pairs (errors) are counted, never scored.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (None when n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def latest_records(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """One record per (item, label): the last successful one, else the last error."""
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        key = (str(record.get("item_id")), str(record.get("label")))
        previous = chosen.get(key)
        if previous is not None and not previous.get("error") and record.get("error"):
            continue
        chosen[key] = record
    return chosen


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rate(values: Sequence[bool | None]) -> dict[str, Any]:
    scored = [v for v in values if v is not None]
    return {"correct": sum(1 for v in scored if v), "scored": len(scored),
            "accuracy": (sum(1 for v in scored if v) / len(scored)) if scored else None}


def summarize_setting(label: str, records: Sequence[dict[str, Any]], setting: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = [r for r in records if not r.get("error")]
    verdicts = [r.get("correct") for r in ok]
    correct = sum(1 for v in verdicts if v is True)
    scored = sum(1 for v in verdicts if v is not None)
    interval = wilson_interval(correct, scored)
    first = setting or (records[0] if records else {})
    row: dict[str, Any] = {
        "label": label,
        "strategy": first.get("strategy"),
        "params": first.get("params", {}),
        "n": len(records),
        "scored": scored,
        "correct": correct,
        "unscored": len(ok) - scored,
        "errors": len(records) - len(ok),
        "accuracy": correct / scored if scored else None,
        "ci_low": interval[0] if interval else None,
        "ci_high": interval[1] if interval else None,
        "mean_prompt_tokens": _mean([r.get("prompt_tokens", 0) for r in ok]),
        "mean_completion_tokens": _mean([r.get("completion_tokens", 0) for r in ok]),
        "mean_total_tokens": _mean([r.get("total_tokens", 0) for r in ok]),
        "mean_calls": _mean([r.get("calls", 0) for r in ok]),
        "latency_p50_s": statistics.median([r["latency_s"] for r in ok]) if ok else None,
        "budget_limited": sum(1 for r in ok if r.get("budget_limited")),
    }
    oracle = [r["oracle_pass"] for r in ok if r.get("oracle_pass") is not None]
    if oracle:  # share of items where one of the first N samples (verified-bon) or k samples (SC) was right
        row["oracle"] = sum(oracle) / len(oracle)
    ifeval = [r["scores"] for r in ok if isinstance(r.get("scores"), dict) and "instructions" in r["scores"]]
    if ifeval:
        strict = _rate([s.get("prompt_strict") for s in ifeval])
        loose = _rate([s.get("prompt_loose") for s in ifeval])
        instructions = [i for s in ifeval for i in s["instructions"]]
        inst_strict = _rate([i.get("strict") for i in instructions])
        inst_loose = _rate([i.get("loose") for i in instructions])
        row["ifeval"] = {
            "prompt_strict": strict["accuracy"],
            "prompt_loose": loose["accuracy"],
            "prompt_loose_scored": loose["scored"],
            "instruction_strict": inst_strict["accuracy"],
            "instruction_loose": inst_loose["accuracy"],
            "instructions_scored": inst_strict["scored"],
            "instructions_unscored": len(instructions) - inst_strict["scored"],
        }
    return row


def summarize(
    records: Iterable[dict[str, Any]],
    *,
    settings: Sequence[dict[str, Any]] | None = None,
    item_ids: Iterable[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rows per setting label (in ``settings`` order, then first-seen), over ``item_ids`` when given."""
    wanted = set(item_ids) if item_ids is not None else None
    by_label: dict[str, list[dict[str, Any]]] = {}
    for (item_id, label), record in latest_records(list(records)).items():
        if wanted is not None and item_id not in wanted:
            continue
        by_label.setdefault(label, []).append(record)
    declared = {s["label"]: s for s in settings or ()}
    order = [s["label"] for s in settings or ()] if settings is not None else []
    order += [label for label in by_label if label not in declared]
    rows = [summarize_setting(label, by_label[label], declared.get(label)) for label in order if label in by_label]
    items = {record.get("item_id") for label in order if label in by_label for record in by_label[label]}
    return {**(meta or {}), "items": len(items), "rows": rows}


# -- output -------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    ifeval = any("ifeval" in r for r in rows)
    header = ["setting", "strategy", "n", "accuracy", "95% CI", "prompt tok", "completion tok", "total tok",
              "calls", "p50 latency (s)", "budget-limited", "unscored", "errors"]
    if ifeval:
        header += ["prompt loose", "instr strict", "instr loose", "instr unscored"]
    oracle = any("oracle" in r for r in rows)
    if oracle:
        header += ["oracle (one of the samples passes)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        ci = "—" if r["ci_low"] is None else f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}%"
        cells = [r["label"], str(r["strategy"]), str(r["n"]), _pct(r["accuracy"]), ci,
                 _num(r["mean_prompt_tokens"]), _num(r["mean_completion_tokens"]), _num(r["mean_total_tokens"]),
                 _num(r["mean_calls"], 1), _num(r["latency_p50_s"], 2), str(r["budget_limited"]),
                 str(r["unscored"]), str(r["errors"])]
        if ifeval:
            x = r.get("ifeval") or {}
            cells += [_pct(x.get("prompt_loose")), _pct(x.get("instruction_strict")),
                      _pct(x.get("instruction_loose")), str(x.get("instructions_unscored", "—"))]
        if oracle:
            cells.append(_pct(r.get("oracle")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    title = f"# ponder eval: {summary.get('dataset', '')}".rstrip(": ")
    facts = [f"items: {summary.get('items')}"]
    if summary.get("match_budget"):
        facts.append(f"matched budget: {summary['match_budget']} tokens per task")
    if summary.get("mode"):
        facts.append(f"mode: {summary['mode']}")
    notes = ["", "Accuracy over scored items with a Wilson 95% interval; tokens and calls are means per task over "
             "every internal call; latency is the median wall time per task."]
    if any("ifeval" in r for r in summary["rows"]):
        notes.append("IFEval: accuracy = prompt-level strict; unscored = prompts whose checks need missing nltk "
                     "data (and no scored instruction failed) — excluded, not counted as wrong.")
    return "\n".join([title, "", ", ".join(facts), "", format_table(summary), *notes, ""])


def write_summary(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    md, js = out_dir / "summary.md", out_dir / "summary.json"
    md.write_text(format_markdown(summary), encoding="utf-8")
    js.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return md, js


def write_plot(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy (95% CI bars) vs mean tokens per task, one labelled point per setting.

    Raises ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["accuracy"] is not None and r["mean_total_tokens"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    try:
        for r in rows:
            x = max(float(r["mean_total_tokens"]), 1.0)
            y = r["accuracy"]
            err = [[max(0.0, y - r["ci_low"])], [max(0.0, r["ci_high"] - y)]]
            baseline = r["strategy"] == "none"
            ax.errorbar([x], [y], yerr=err, fmt="s" if baseline else "o", capsize=4, markersize=7,
                        color="black" if baseline else None, label=r["label"])
            ax.annotate(r["label"] + (" (baseline)" if baseline else ""), (x, y), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
        if rows:
            ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("mean tokens per task (prompt + completion, all calls; log scale)")
        ax.set_ylabel("accuracy (95% Wilson CI)")
        title = f"{summary.get('dataset', 'eval')}: accuracy vs compute"
        if summary.get("match_budget"):
            title += f" (budget {summary['match_budget']} tokens/task)"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if rows:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
