"""Answer extraction / normalisation and the prompt-reply parsers."""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from strategies import prompts
from strategies.answers import AnswerBuckets, answer_key, extract_answer, normalize_number, normalize_text
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
     ("0.50", "0.5"), ("-2", "-2"), ("abc", None), ("1/0", None),
     (".5", "0.5"), ("1234567.5", "1234567.5"), ("12345.67", "12345.67"), ("\u22127", "-7"), ("9{,}500", "9500")],
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
     ("eleven", None), ("15", None), ("-1", None), ("", None),
     # chat-model forms (issue 12 §4)
     ("0-10 scale: 8", 0.8), ("3 errors. 4/10", 0.4), ("Rating (0-10): **8**", 0.8), ("**7**.", 0.7),
     ("I'd rate it 6 because it has 2 errors.", 0.6), ("On a scale of 0 to 10, I give it 9.", 0.9),
     (" 7\nIssues:\n- 2 errors in step 3/4", 0.7), ("4 out of 5", 0.8)],
)
def test_parse_score(text: str, expected: float | None) -> None:
    assert prompts.parse_score(text) == (pytest.approx(expected) if expected is not None else None)


def test_parse_score_custom_range() -> None:
    assert prompts.parse_score("3", low=1, high=5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "text, expected",
    [(" YES", True), ("yes.", True), ("**Yes**, it does", True), (" NO", False), ("no, it does not", False),
     ("Incorrect.", False), ("The answer is yes", True), ("maybe", None), ("", None),
     ("I cannot tell whether this is really yes", None),
     # chat-model forms (issue 12 §4)
     (" Not correct", False), ("It isn't right.", False), ("**Answer:** YES", True), ("Wrong.", False),
     ("Correct, it does.", True), ("No.", False)],
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


# -- answers by meaning (issue 12 §1): every listed input, with its right value ----------


def bucket_of(texts: list[str], fmt: str) -> list[str | None]:
    """The vote each sample casts: its bucket's representative, as the vote table counts it."""
    buckets = AnswerBuckets()
    return [None if (a := extract_answer(t, fmt)) is None else buckets.representative(a) for t in texts]


@pytest.mark.parametrize(
    "texts, fmt, votes",
    [
        ([r"\boxed{9{,}500}", "The answer is 9,500.", "The answer is 9500."], "numeric", ["9500"] * 3),
        ([r"\boxed{\frac12}", r"\boxed{\frac{1}{2}}", r"\boxed{\dfrac12}"], "numeric", ["1/2"] * 3),
        (["The answer is (B).\nA. Lyon is not the capital.\nC. Marseille is not either.",
          "Answer: B\nWhy not the others:\nA. wrong\nD. wrong"], "choice", ["B", "B"]),
        ([r"\boxed{A}", "The answer is A."], "choice", ["A", "A"]),
        ([r"\boxed{A}", "The answer is A."], "auto", ["A", "A"]),
        (["The answer is \u22127.", "\\boxed{\u22127}", "-7"], "numeric", ["-7"] * 3),
        (["The answer is .5", "So it is 0.5", r"\boxed{\frac{1}{2}}"], "numeric", ["0.5"] * 3),
        (["The answer is 12345.67", "The answer is 12345.66"], "numeric", ["12345.67", "12345.66"]),
        (["The answer is 1234567.5"], "numeric", ["1234567.5"]),
        (["5 + 2 = 7", "The answer is 5 + 2 = 7.", r"\boxed{5+2=7}", "#### 7"], "numeric", ["7"] * 4),
        ([r"\boxed{\text{18 dollars}}", r"\boxed{18\text{ dollars}}", r"\boxed{\$18}", "The answer is $18.",
          r"\boxed{\left(18\right)}", "The answer is 18 dollars."], "numeric", ["18"] * 6),
        ([r"\boxed{1\!000}", r"\boxed{1\,000}", "\\boxed{1\u2009000}", "The answer is 1,000."], "numeric",
         ["1000"] * 4),
        ([r"\boxed{90^\circ}", r"\boxed{90^{\circ}}", "90°"], "numeric", ["90"] * 3),
    ],
)
def test_issue_inputs_vote_by_meaning(texts: list[str], fmt: str, votes: list[str]) -> None:
    assert bucket_of(texts, fmt) == votes


def test_math_answers_merge_by_value_through_math_verify() -> None:
    texts = [r"\boxed{\sqrt{2}/2}", r"\boxed{\frac{1}{\sqrt{2}}}", r"\boxed{2^{10}}", "The answer is 1024.",
             r"\boxed{\pi}", "The answer is 3.14159.", r"\boxed{3 \times 4}", r"\boxed{12}"]
    assert bucket_of(texts, "numeric") == [r"\sqrt{2}/2", r"\sqrt{2}/2", "2^{10}", "2^{10}", r"\pi", "3.14159",
                                           r"3\times4", r"3\times4"]


def test_huge_powers_are_never_evaluated() -> None:
    """2^{10^{10}} would hang sympy (and nothing can interrupt it off the main thread):
    it is compared as text, at once."""
    assert answer_key(extract_answer(r"\boxed{2^{10^{10}}}")) == "text:2^{10^{10}}"
    assert bucket_of([r"\boxed{2^{10^{10}}}", r"\boxed{3}", r"\boxed{2^{10^{10}}}"], "numeric")[2] == "2^{10^{10}}"


async def test_math_verify_runs_off_the_main_thread() -> None:
    """Math-Verify's signal timeouts fail outside the main thread; ours are off, so a worker
    thread (as in a threaded server) buckets math answers the same."""
    texts = [r"\boxed{\sin(\pi/6)}", r"\boxed{\frac{1}{2}}", r"\boxed{\sqrt{8}}", r"\boxed{2\sqrt{2}}"]
    assert await asyncio.to_thread(bucket_of, texts, "numeric") == [r"\sin(\pi/6)"] * 2 + [r"\sqrt{8}"] * 2


def test_text_answers_are_not_parsed_as_math() -> None:
    assert answer_key("paris") == "paris" and answer_key("B") == "B"
    assert bucket_of(["The answer is pi.", "The answer is p i."], "text") == ["pi", "p i"]


_decimals = st.builds(lambda digits, places: Decimal(digits).scaleb(-places),
                      st.integers(-10**7, 10**7), st.integers(0, 4))


def renderings_of_fraction(value: Fraction) -> list[str]:
    p, q = value.numerator, value.denominator
    sign, a = ("-" if p < 0 else ""), abs(p)
    forms = [f"{p}/{q}", rf"{sign}\frac{{{a}}}{{{q}}}", rf"\dfrac{{{p}}}{{{q}}}", f"\u2212{a}/{q}" if p < 0 else f"{a}/{q}"]
    if a < 10 and q < 10:
        forms.append(rf"{sign}\frac{a}{q}")  # \frac12
    if q == 1:
        forms += [sign + f"{a:,}".replace(",", "{,}"), f"{sign}{a:,}", rf"{sign}{a}\text{{ apples}}"]
    return forms


def renderings_of_decimal(value: Decimal) -> list[str]:
    text = format(value, "f")
    forms = [text, f"\\${text}"]
    if text.startswith("0."):
        forms.append(text[1:])  # .5
    if text.startswith("-"):
        forms.append("\u2212" + text[1:])
    return forms


def wrap(rendering: str, how: int) -> str:
    return [f"The answer is {rendering}.", rf"So \boxed{{{rendering}}}", f"#### {rendering}",
            f"Adding it all up gives {rendering}"][how]


@settings(max_examples=150, deadline=None)
@given(st.fractions(max_denominator=999).filter(lambda f: abs(f) < 10**6), st.data())
def test_property_renderings_of_one_fraction_share_a_bucket(value: Fraction, data) -> None:
    forms = renderings_of_fraction(value)
    texts = [wrap(f, data.draw(st.integers(0, 3))) for f in forms]
    keys = {answer_key(extract_answer(t, "numeric")) for t in texts}
    assert keys == {str(value)}, (texts, keys)


@settings(max_examples=150, deadline=None)
@given(_decimals, st.data())
def test_property_renderings_of_one_decimal_share_a_bucket_with_its_fraction(value: Decimal, data) -> None:
    exact = Fraction(value)
    texts = [wrap(f, data.draw(st.integers(0, 3))) for f in renderings_of_decimal(value)]
    texts.append(wrap(rf"\frac{{{exact.numerator}}}{{{exact.denominator}}}", 1))
    assert {answer_key(extract_answer(t, "numeric")) for t in texts} == {str(exact)}, texts


@settings(max_examples=150, deadline=None)
@given(st.one_of(_decimals.map(Fraction), st.fractions(max_denominator=999)),
       st.one_of(_decimals.map(Fraction), st.fractions(max_denominator=999)), st.integers(0, 3), st.integers(0, 3))
def test_property_distinct_values_never_share_a_bucket(a: Fraction, b: Fraction, how_a: int, how_b: int) -> None:
    render = lambda v, how: wrap(renderings_of_fraction(v)[0] if v.denominator != 1 else str(v.numerator), how)
    votes = bucket_of([render(a, how_a), render(b, how_b)], "numeric")
    assert (votes[0] == votes[1]) == (a == b), (a, b, votes)


def test_the_first_seen_form_names_the_bucket() -> None:
    assert bucket_of(["The answer is 0.5", r"\boxed{\frac12}", "1/2"], "numeric") == ["0.5"] * 3
    assert bucket_of(["1/2", "The answer is 0.5"], "numeric") == ["1/2"] * 2


# -- checklists from chat models (issue 12 §4) --------------------------------------------


def test_parse_checklist_drops_a_chat_preamble() -> None:
    reply = "Here is a checklist:\n\n1. Is the poem about cats?\n2. Does it have four lines?"
    assert prompts.parse_checklist(reply, 8) == ["Is the poem about cats?", "Does it have four lines?"]


def test_parse_checklist_reads_markdown_bold_items() -> None:
    reply = ("**Checklist:**\n**1. Is the poem about cats?**\n2. **Tone:** Is the tone playful?\n"
             "- **Does it rhyme?**")
    assert prompts.parse_checklist(reply, 8) == [
        "Is the poem about cats?", "Tone: Is the tone playful?", "Does it rhyme?",
    ]


def test_parse_checklist_drops_the_line_cut_off_by_max_tokens() -> None:
    reply = " Is the poem about cats?\n2. Does it have four lines?\n3. Does the last line men"
    assert prompts.parse_checklist(reply, 8, truncated=True) == [
        "Is the poem about cats?", "Does it have four lines?",
    ]
    assert len(prompts.parse_checklist(reply, 8)) == 3  # a complete reply keeps its last item
    assert len(prompts.parse_checklist(reply + "?\n", 8, truncated=True)) == 3  # cut after a full line


@pytest.mark.parametrize("text, expected", [
    (r"The answer is $\sqrt{2}$.", r"\sqrt{2}"),                 # not the 2 inside it
    (r"The answer is $\frac{\sqrt{3}}{2}$.", r"\frac{\sqrt{3}}{2}"),
    (r"The answer is \(x = 5\) because it fits.", "5"),          # \( \) delimiters, right-hand side
    (r"The answer is \(\frac{1}{2}\).", "1/2"),
    ("The answer is below.\n42", "42"),                           # no number said: the last number
])
def test_answer_is_sentences_with_math(text: str, expected: str) -> None:
    assert extract_answer(text, "numeric") == expected
