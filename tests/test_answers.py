"""Answer extraction / normalisation and the prompt-reply parsers."""

from __future__ import annotations

import math

import pytest

from strategies import prompts
from strategies.answers import extract_answer, normalize_number, normalize_text
from strategies.self_consistency import prob_leader_ahead

# -- numeric ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 boxes of 400 and 34 more.\n#### 1,234", "1234"),
        ("#### $1,234.50", "1234.5"),
        ("####-7", "-7"),
        (r"So the total is \boxed{3/4}.", "3/4"),
        (r"\boxed{\frac{3}{4}}", "3/4"),
        (r"\boxed{-\dfrac{3}{5}}", "-3/5"),
        (r"first \boxed{1} then \boxed{12}", "12"),
        (r"\boxed{18 \text{ dollars}}", "18"),
        ("3 pens cost $6, so 9 pens cost 18 dollars. The answer is $18.", "18"),
        ("The answer is: 19.0", "19"),
        ("We get 3, then 4.5, and finally 19.0", "19"),
        ("It costs $1,000.50 in total", "1000.5"),
        ("no number at all", None),
    ],
)
def test_numeric(text: str, expected: str | None) -> None:
    assert extract_answer(text, "numeric") == expected


def test_hashes_beat_a_later_number() -> None:
    assert extract_answer("#### 72\nThat took 5 steps.", "numeric") == "72"


def test_answer_is_beats_the_last_number() -> None:
    assert extract_answer("The answer is 18. I checked it 2 times.", "numeric") == "18"


def test_boxed_fractions_stay_distinct() -> None:
    """Different fractions must not collapse into one vote."""
    assert extract_answer(r"\boxed{\frac{3}{4}}") != extract_answer(r"\boxed{\frac{3}{5}}")


def test_first_number() -> None:
    assert extract_answer(" 42\n\nQ: Tom has 7 apples", "first_number") == "42"
    assert extract_answer("nothing", "first_number") is None


@pytest.mark.parametrize(
    "raw, expected",
    [("1,234.50", "1234.5"), ("$7", "7"), ("3/4", "3/4"), ("6/8", "3/4"), ("19.0", "19"), ("18.", "18"),
     ("0.50", "0.5"), ("-2", "-2"), ("abc", None), ("1/0", None)],
)
def test_normalize_number(raw: str, expected: str | None) -> None:
    assert normalize_number(raw) == expected


# -- multiple choice ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(B)", "B"),
        ("The answer is C", "C"),
        ("the answer is (d).", "D"),
        ("Answer: (D).", "D"),
        ("Let me think.\nOption A is wrong.\nB\n", "B"),
        ("The answer is (B) because option A fails", "B"),
        ("I would go with E", "E"),
        ("I think B is correct.", "B"),              # the pronoun "I" is not choice I
        ("The answer is B.\nI am confident.", "B"),
        ("A good choice would be C.", "C"),          # the article "A" is not choice A
        ("no letter here", None),
    ],
)
def test_choice(text: str, expected: str | None) -> None:
    assert extract_answer(text, "choice") == expected


def test_auto_reads_choice_after_answer_marker() -> None:
    assert extract_answer("The answer is C") == "C"
    assert extract_answer("The answer is (B).") == "B"


# -- text ------------------------------------------------------------------------


def test_text_normalisation() -> None:
    assert normalize_text("  Paris,   FRANCE!! ") == "paris france"
    assert extract_answer("The answer is: Paris!", "text") == "paris"
    assert extract_answer("\n  Paris, France. \nsome reasoning", "text") == "paris france"
    assert extract_answer("The ANSWER is  new-york", "text") == extract_answer("answer: New York", "text")
    assert extract_answer("   \n", "text") is None


def test_auto_falls_back_to_text() -> None:
    assert extract_answer("Blue whales.") == "blue whales"
    assert extract_answer("The answer is Blue Whales.") == "blue whales"


# -- reply parsers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [(" 7", 0.7), ("Score: 7/10", 0.7), ("8 out of 10", 0.8), (" 10\nIssues:", 1.0), ("0", 0.0), (" 7.5", 0.75),
     ("eleven", None), ("15", None), ("-1", None), ("", None)],
)
def test_parse_score(text: str, expected: float | None) -> None:
    assert prompts.parse_score(text) == (pytest.approx(expected) if expected is not None else None)


def test_parse_score_custom_range() -> None:
    assert prompts.parse_score("3", low=1, high=5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "text, expected",
    [(" YES", True), ("yes.", True), ("**Yes**, it does", True), (" NO", False), ("no, it does not", False),
     ("Incorrect.", False), ("The answer is yes", True), ("maybe", None), ("", None),
     ("I cannot tell whether this is really yes", None)],
)
def test_parse_yes_no(text: str, expected: bool | None) -> None:
    assert prompts.parse_yes_no(text) is expected


def test_parse_choice_number() -> None:
    assert prompts.parse_choice_number(" 3", 4) == 2
    assert prompts.parse_choice_number("Response 1.", 4) == 0
    assert prompts.parse_choice_number(" 5", 4) is None
    assert prompts.parse_choice_number("none", 4) is None


def test_parse_checklist_messy() -> None:
    # The prompt's cue already wrote "1.", so the reply starts mid-item.
    reply = (" Does the poem mention cats\n"
             "2) Is it at most four lines?\n"
             "\n"
             "- Does the poem mention cats?\n"   # duplicate, differs only by "?"
             "* ok\n"                             # too short
             "some stray commentary\n"
             "3. DOES THE POEM RHYME?\n"
             "4. Does the poem rhyme?\n")        # duplicate, differs only by case
    assert prompts.parse_checklist(reply, 8) == [
        "Does the poem mention cats?", "Is it at most four lines?", "DOES THE POEM RHYME?",
    ]


def test_parse_checklist_cap_and_numbering() -> None:
    reply = "1. Is the tone formal?\n2. Does it cite sources?\n3. Is it under 200 words?"
    assert prompts.parse_checklist(reply, 2) == ["Is the tone formal?", "Does it cite sources?"]
    assert prompts.parse_checklist("", 3) == []


def test_parse_feedback_revise() -> None:
    fb = prompts.parse_feedback(" 7\nIssues:\n- too long\n- none\n* missing units\nVerdict: revise")
    assert fb.score == pytest.approx(0.7)
    assert fb.issues == ["too long", "missing units"]
    assert fb.done is False


def test_parse_feedback_done() -> None:
    fb = prompts.parse_feedback(" 10/10\nIssues:\n- None\nVerdict:DONE\n")
    assert fb.score == pytest.approx(1.0)
    assert fb.issues == []
    assert fb.done is True
    assert fb.text == "10/10\nIssues:\n- None\nVerdict:DONE"


def test_parse_feedback_without_structure() -> None:
    fb = prompts.parse_feedback("looks fine to me")
    assert fb.score is None and fb.issues == [] and fb.done is False


# -- adaptive stopping probability ---------------------------------------------------


def beta_tail_numeric(a: float, b: float, x0: float = 0.5, steps: int = 20_000) -> float:
    """P(X > x0) for X ~ Beta(a, b), by composite Simpson integration of the density."""
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)

    def pdf(x: float) -> float:
        return math.exp(log_norm) * x ** (a - 1) * (1 - x) ** (b - 1)  # 0 ** 0 == 1 at the ends

    h = (1 - x0) / steps
    total = pdf(x0) + pdf(1.0)
    for i in range(1, steps):
        total += (4 if i % 2 else 2) * pdf(x0 + i * h)
    return total * h / 3


@pytest.mark.parametrize("leader, runner_up", [(0, 0), (1, 0), (2, 2), (4, 0), (5, 1), (7, 3), (10, 9), (12, 2)])
def test_prob_leader_ahead_matches_beta_integral(leader: int, runner_up: int) -> None:
    assert prob_leader_ahead(leader, runner_up) == pytest.approx(
        beta_tail_numeric(leader + 1, runner_up + 1), abs=1e-6
    )


def test_prob_leader_ahead_values() -> None:
    assert prob_leader_ahead(3, 3) == pytest.approx(0.5)
    assert prob_leader_ahead(4, 0) == pytest.approx(31 / 32)
    assert prob_leader_ahead(5, 1) > prob_leader_ahead(4, 1) > prob_leader_ahead(4, 2)
