"""math_accuracy against real math-verify: a table of gold/prediction pairs, agreement with
Math-Verify's own test cases, no reward for junk around the right digits, golds that do not
parse, and the hard time limit from a thread and from a (daemonic) worker process."""

import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from moetune.rewards.math_accuracy import last_plain_number, math_accuracy

MATH_VERIFY_CASES = Path(__file__).parent / "data" / "math_verify_cases.jsonl"

GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
MATRIX = r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"
PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"

# (gold, completion, expected reward)
TABLE = [
    # fractions
    (r"\frac{1}{2}", r"\boxed{\frac{1}{2}}", 1.0),
    (r"\frac{1}{2}", r"\boxed{0.5}", 1.0),
    ("0.5", r"The answer is $\boxed{\frac12}$.", 1.0),
    (r"\frac{3}{4}", r"\boxed{\dfrac{3}{4}}", 1.0),
    (r"\frac{3}{4}", r"\boxed{3/4}", 1.0),
    (r"\frac{3}{4}", r"\boxed{\frac{4}{3}}", 0.0),
    (r"-\frac{2}{3}", r"\boxed{-\frac{2}{3}}", 1.0),
    (r"-\frac{2}{3}", r"\boxed{\frac{2}{3}}", 0.0),
    (r"\frac{6}{8}", r"\boxed{\frac{3}{4}}", 1.0),
    ("3", r"\boxed{\frac{9}{3}}", 1.0),
    # decimals
    ("3.14", r"\boxed{3.14}", 1.0),
    ("3.14", r"\boxed{3.140}", 1.0),
    ("3.14", r"\boxed{3.15}", 0.0),
    ("0.333", r"\boxed{\frac{1}{3}}", 0.0),
    ("2.5", "The final answer is 2.5", 1.0),
    ("6", r"\boxed{6.5}", 0.0),
    # percentages
    (r"50\%", r"\boxed{50\%}", 1.0),
    ("50", r"\boxed{50\%}", 1.0),
    ("0.5", r"\boxed{50\%}", 1.0),
    (r"25\%", "The discount is 25%.", 1.0),
    (r"25\%", r"\boxed{20\%}", 0.0),
    # thousands separators
    ("1000", r"\boxed{1,000}", 1.0),
    ("1000", r"\boxed{1{,}000}", 1.0),
    ("1234567", "So the total is 1,234,567.", 1.0),
    ("1000", "#### 1,000", 1.0),
    ("1000", r"\boxed{1,001}", 0.0),
    ("1,000", r"\boxed{1000}", 1.0),
    ("1000000", r"\boxed{10^6}", 1.0),
    ("1000000", r"\boxed{10^5}", 0.0),
    # roots and pi
    (r"\sqrt{2}", r"\boxed{\sqrt{2}}", 1.0),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", 1.0),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", 1.0),
    (r"\sqrt{2}", r"\boxed{1.41421356}", 1.0),
    (r"\sqrt{3}", r"\boxed{\sqrt{2}}", 0.0),
    (r"2\pi", r"\boxed{2\pi}", 1.0),
    (r"2\pi", r"\boxed{6.28}", 0.0),
    (r"\frac{\pi}{2}", r"\boxed{\frac{\pi}{2}}", 1.0),
    (r"\pi r^2", r"\boxed{\pi r^{2}}", 1.0),
    (r"\frac{\pi}{3}", r"\boxed{\frac{\pi}{6}}", 0.0),
    # intervals
    ("(0, 1]", r"\boxed{(0,1]}", 1.0),
    ("(0, 1]", r"\boxed{[0,1]}", 0.0),
    (r"(-\infty, 3)", r"\boxed{(-\infty,3)}", 1.0),
    ("[2, 5)", r"\boxed{[2, 5]}", 0.0),
    (r"(-\infty, 0) \cup (1, \infty)", r"\boxed{(-\infty,0)\cup(1,\infty)}", 1.0),
    # sets
    (r"\{1, 2, 3\}", r"\boxed{\{3, 2, 1\}}", 1.0),
    (r"\{1, 2\}", r"\boxed{\{1, 2, 3\}}", 0.0),
    ("1, 2", r"\boxed{2, 1}", 1.0),
    (r"\{-1, 1\}", r"The solutions are $x = \pm 1$, so \boxed{-1, 1}", 1.0),
    # matrices and vectors
    (MATRIX, r"\boxed{\begin{pmatrix}1&2\\3&4\end{pmatrix}}", 1.0),
    (MATRIX, r"\boxed{\begin{bmatrix}1&2\\3&4\end{bmatrix}}", 1.0),
    (MATRIX, r"\boxed{\begin{pmatrix}1&3\\2&4\end{pmatrix}}", 0.0),
    (
        r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}",
        r"\boxed{\begin{pmatrix} 1 \\ -2 \end{pmatrix}}",
        1.0,
    ),
    # units and text around the answer
    ("5", r"\boxed{5 \text{ cm}}", 1.0),
    ("5", r"\boxed{5\text{ apples}}", 1.0),
    ("5", r"\boxed{5 \mbox{ meters}}", 1.0),
    ("90", r"\boxed{90^\circ}", 1.0),
    ("18", r"The answer is \$18.", 1.0),
    ("18", r"\boxed{\$18.00}", 1.0),
    ("12", "She has 12 apples left.", 1.0),
    ("12", "After eating 3, she has 12 apples left, not 15.", 0.0),  # the last number counts
    ("5", "I don't know.", 0.0),
    ("1234.5", "The answer is 1,234.5 dollars.", 1.0),
    ("15%", "It grew by 15%.", 1.0),
    ("-3", "Temperature fell to -3.", 1.0),
    # LaTeX answers without a marker
    ("10/9", r"So the ratio is $\frac{10}{9}$.", 1.0),
    (r"\frac{1}{3}", r"We get $\dfrac{1}{3}$", 1.0),
    (r"\sqrt{3}", r"The side is $\sqrt3$.", 1.0),
    (r"\sqrt{3}", r"The side is $\sqrt2$.", 0.0),
    ("x > 2", r"So the solution set is $x > 2$.", 1.0),
    ("(0, 1]", r"The range is the interval $(0,1]$.", 1.0),
    (r"\{1, 2\}", r"The roots are $\{1, 2\}$.", 1.0),
    (r"\{1, 2\}", r"The roots are $\{1, 3\}$.", 0.0),
    # multiple boxed answers: the last one counts
    ("4", r"First \boxed{3}. That is wrong. The answer is \boxed{4}", 1.0),
    ("3", r"First \boxed{3}. That is wrong. The answer is \boxed{4}", 0.0),
    ("3", r"\boxed{\frac{1}{2} and \boxed{3}", 1.0),
    ("72", r"\boxed{} so 72", 0.0),  # an empty box is the answer: nothing
    # as in math-verify, boxes close together or joined by a comma, "and" or "or" form a set
    (r"\{3, 4\}", r"First \boxed{3}, but correcting: \boxed{4}", 1.0),
    ("4", r"First \boxed{3}, but correcting: \boxed{4}", 0.0),
    (r"\{1, 2\}", r"The roots are \boxed{1} and \boxed{2}.", 1.0),
    (r"\{1, 2\}", r"The roots are \boxed{2}.", 0.0),
    (r"Hence $n = \boxed{1,-2}.$", r"\boxed{-2}, \boxed{1}", 1.0),
    ("7", r"\boxed 7", 1.0),
    ("7", r"\fbox{7}", 1.0),
    # <answer> tags, GSM8K answers, MATH solutions as gold
    ("42", "<think>6*7</think><answer>42</answer>", 1.0),
    ("42", "<think>the answer is 42</think><answer>24</answer>", 0.0),
    ("12", "<answer>\n 12 \n</answer>", 1.0),
    (r"\frac{1}{2}", r"<answer>\frac{1}{2}</answer>", 1.0),
    (GSM8K_GOLD, "48 + 24 = 72\n#### 72", 1.0),
    (GSM8K_GOLD, "So she sold 72 clips.", 1.0),
    (GSM8K_GOLD, "She sold 72 clips... wait, I recount: 70", 0.0),
    (r"So the answer is $\boxed{\frac{7}{2}}$.", r"\boxed{3.5}", 1.0),
    # expressions and equations
    ("x^2 + 2x + 1", r"\boxed{(x+1)^2}", 1.0),
    ("x = 5", r"\boxed{5}", 1.0),
    ("5", r"\boxed{x = 5}", 1.0),
    ("2x+1", r"\boxed{1+2x}", 1.0),
    ("2x+1", r"\boxed{2x-1}", 0.0),
    # wrong answers that look right
    ("1/2", r"\boxed{1/3}", 0.0),
    ("10", r"\boxed{100}", 0.0),
    ("-3", r"\boxed{3}", 0.0),
    (r"\text{(B)}", r"\boxed{\text{(B)}}", 1.0),
    ("B", r"\boxed{C}", 0.0),
]


@pytest.fixture(scope="module")
def table_rewards():
    return math_accuracy(
        [""] * len(TABLE), [c for _, c, _ in TABLE], answer=[g for g, _, _ in TABLE]
    )


def test_table_is_large_enough():
    assert len(TABLE) >= 60
    assert {expected for *_, expected in TABLE} == {0.0, 1.0}


@pytest.mark.parametrize("row", range(len(TABLE)), ids=lambda i: f"{i}:{TABLE[i][1][:30]}")
def test_table(table_rewards, row):
    gold, completion, expected = TABLE[row]
    assert table_rewards[row] == expected, (gold, completion)


def test_gold_goes_first():
    # math-verify's verify is not symmetric: an inequality as gold accepts the interval it
    # describes, but an inequality from the model does not match a gold interval.
    completions = [r"\boxed{(1,2)}", r"\boxed{(1,\infty)}", r"\boxed{1<x<2}"]
    golds = ["1<x<2", "x>1", "(1,2)"]
    assert math_accuracy([""] * 3, completions, answer=golds) == [1.0, 1.0, 0.0]


def test_solution_column_and_missing_gold():
    assert math_accuracy([""] * 2, [r"\boxed{2}", r"\boxed{2}"], solution=["2", None]) == [
        1.0,
        None,
    ]
    with pytest.raises(ValueError, match="`answer` or `solution`"):
        math_accuracy([""], ["1"])


def test_agrees_with_math_verify_test_cases():
    cases = [json.loads(line) for line in MATH_VERIFY_CASES.read_text().splitlines()]
    rewards = math_accuracy(
        [""] * len(cases), [case["pred"] for case in cases], answer=[case["gold"] for case in cases]
    )
    disagreements = [case for case, reward in zip(cases, rewards) if reward != case["expected"]]
    agreed = len(cases) - len(disagreements)
    print(f"Math-Verify test cases: math_accuracy agrees on {agreed}/{len(cases)}")
    assert len(cases) == 135
    assert agreed >= 0.95 * len(cases), disagreements


JUNK = [
    "AZYUK2A",
    "x2y",
    "v2.0 release",
    "abc2",
    "item_2",
    "item-2",
    "B2B",
    "see section 4.2.1",
    "id=x2",
    "user_2 wrote",
    "H2O",
    "<answer>x2y</answer>",
    "#### item_2",
    r"\boxed{abc2}",
]
RIGHT = ["The answer is 2.", "... = 2", "2", "x = 2", "So we get $2$", "Result: (2)"]


def test_no_reward_for_junk_around_the_right_digits():
    completions = JUNK + RIGHT
    rewards = math_accuracy([""] * len(completions), completions, answer=["2"] * len(completions))
    assert rewards == [0.0] * len(JUNK) + [1.0] * len(RIGHT)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234.5 dollars.", "1,234.5"),
        ("It grew by 15%.", "15%"),
        ("Temperature fell to -3.", "-3"),
        ("Result: (2/3)", "2/3"),
        ("x2y and v2.0, abc2, item_2 or item-2", None),
        ("no digits here", None),
    ],
)
def test_last_plain_number(text, expected):
    assert last_plain_number(text) == expected


def test_gold_that_does_not_parse_is_reported_with_its_row(caplog):
    golds = ["2", "", r"\frac{"]
    with caplog.at_level(logging.WARNING, logger="moetune.rewards.math_accuracy"):
        rewards = math_accuracy([""] * 3, ["2"] * 3, answer=golds)
    assert rewards == [1.0, None, 0.0]  # "\frac{" parses as text only: compared as text
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "gold answer of row 1" in messages[0] and "scores None" in messages[0]
    assert "gold answer of row 2" in messages[1] and "compared as text" in messages[1]


def _timed_pathological(timeout_s: float) -> tuple[list, float]:
    math_accuracy([""], [r"\boxed{1}"], answer=["1"])  # warm the worker pool first
    start = time.monotonic()
    rewards = math_accuracy([""], [PATHOLOGICAL], answer=["1"], timeout_s=timeout_s)
    return rewards, time.monotonic() - start


def test_pathological_answer_times_out_off_the_main_thread():
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_timed_pathological(1.0)))
    thread.start()
    thread.join(timeout=60)
    rewards, elapsed = outcome[0]
    assert rewards == [0.0]
    assert elapsed < 1.0 + 1.0


def test_pathological_answer_times_out_in_a_daemonic_worker_process():
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # Pool workers are daemonic
        rewards, elapsed = pool.apply(_timed_pathological, (1.0,))
    assert rewards == [0.0]
    assert elapsed < 1.0 + 1.0
