"""math_accuracy against real math-verify: a table of gold/prediction pairs, the extraction
rules, and the hard time limit from a thread and from a (daemonic) worker process."""

import multiprocessing
import threading
import time

import pytest

from moetune.rewards.math_accuracy import extract_answer, math_accuracy

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
    (r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 1 \\ -2 \end{pmatrix}}", 1.0),
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
    # multiple boxed answers: the last one counts
    ("4", r"First \boxed{3}, but correcting: \boxed{4}", 1.0),
    ("3", r"First \boxed{3}, but correcting: \boxed{4}", 0.0),
    ("7", r"\boxed 7", 1.0),
    ("7", r"\fbox{7}", 1.0),
    # <answer> tags, GSM8K answers, MATH solutions as gold
    ("42", "<think>6*7</think><answer>42</answer>", 1.0),
    ("42", "<think>the answer is 42</think><answer>24</answer>", 0.0),
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
    return math_accuracy([""] * len(TABLE), [c for _, c, _ in TABLE], answer=[g for g, _, _ in TABLE])


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
    assert math_accuracy([""] * 2, [r"\boxed{2}", r"\boxed{2}"], solution=["2", None]) == [1.0, None]
    with pytest.raises(ValueError, match="`answer` or `solution`"):
        math_accuracy([""], ["1"])


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{a}{\sqrt{b}}} then \boxed{x^{2}}", "x^{2}"),
        (r"\boxed{\frac{1}{2} and \boxed{3}", "3"),
        (r"unbalanced \boxed{\frac{1}{2}", "2"),  # falls through to the last number
        ("<answer>\n 12 \n</answer>", "12"),
        ("The answer is 1,234.5 dollars.", "1,234.5"),
        ("It grew by 15%.", "15%"),
        ("Temperature fell to -3.", "-3"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text, fallback="last_number") == expected


def test_gold_without_marker_is_taken_whole():
    assert extract_answer(r"\frac{1}{2}", fallback="whole") == r"\frac{1}{2}"


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
