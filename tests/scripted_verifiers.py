"""A scripted ``Verifier`` for strategy tests: ``ScriptedVerifier(judge)`` answers each text
with ``judge(text)`` (a ``Verdict``, or a bool for pass/fail with score 1/0) and counts calls."""

from __future__ import annotations

from typing import Callable

from strategies.verification import RegexSpec, Verdict, Verification


class ScriptedVerifier:
    def __init__(self, judge: Callable[[str], "Verdict | bool"], *, name: str = "check") -> None:
        # Any spec will do for the label and the cache identity; the judge decides.
        self.spec = RegexSpec(type="regex", pattern=f"scripted:{name}:{id(judge)}", name=name)
        self.judge = judge
        self.calls: list[str] = []

    async def verify(self, text: str) -> Verdict:
        self.calls.append(text)
        out = self.judge(text)
        if isinstance(out, Verdict):
            return out
        return Verdict(out, 1.0 if out else 0.0, "" if out else f"{self.spec.label} fails")


def verification(*judges: Callable[[str], "Verdict | bool"]) -> Verification:
    return Verification([ScriptedVerifier(j, name=f"check{i}") for i, j in enumerate(judges)])
