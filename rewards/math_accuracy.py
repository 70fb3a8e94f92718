"""`math_accuracy`: 1.0 when the completion's final answer equals the gold answer, else 0.0.

The completion's answer is, in this order: its boxed answer (`\\boxed{...}` or `\\fbox{...}`:
the last box, read by math-verify, which also joins boxes that are close together or joined
by a comma, "and" or "or" into a set), the last `<answer>...</answer>`, the last GSM8K
`#### ...` line; without any of these, what math-verify's own extraction finds (its default
LaTeX and expression configs: `$\\frac{10}{9}$`, `\\(\\sqrt3\\)`, "the final answer is 7", a
number after a space or `=`); else the last number that stands alone (never one inside a word
or an identifier: `AZYUK2A` has no answer). The gold (column `answer`, or `solution`) takes the
same markers, else is taken whole. A tagged, `####` or whole answer is parsed by math-verify as
`\\boxed{...}` (LaTeX, numbers with thousands separators, percentages, sets, intervals,
matrices), or by its extraction if it has `$`, `\\(` or `\\[` math in it. The two are compared
with `verify(gold, predicted)`, gold first: math-verify's comparison is not symmetric. A gold
that math-verify cannot parse is reported with its row: it scores None when nothing of it
parses, and is compared as text when it parses as text only (as math-verify does).

Parsing and verifying run in `time_limit.WorkerPool` processes (`workers` of them, default:
the number of cores) under a hard wall-clock limit (`timeout_s`), so a pathological answer
(`9^{9^{9^{9}}}`) scores 0.0 in time, from any thread or process.
"""

from __future__ import annotations

import logging
import os
import re
import threading

from moetune.rewards.registry import register_reward
from moetune.rewards.scoring import completion_texts, report_timeout
from moetune.rewards.time_limit import CallFailed, TimeLimitExceeded, WorkerPool

logger = logging.getLogger(__name__)

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K = re.compile(r"####\s*(.+)")
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[")
_PLAIN_NUMBER = re.compile(
    r"(?<![\w.])(?<!\w-)(?:-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+)%?(?!\w|\.\w)"
)
WORKER_MEMORY_MB = 4096


@register_reward("math_accuracy")
def math_accuracy(
    prompts: list[str],
    completions: list,
    answer: list[str | None] | None = None,
    solution: list[str | None] | None = None,
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
) -> list[float | None]:
    """1.0 per completion whose answer matches the gold; None where the gold is None or has no
    parseable answer. `workers`: verification processes (default: the number of cores)."""
    golds = answer if answer is not None else solution
    if golds is None:
        raise ValueError("math_accuracy needs the gold answer in a column `answer` or `solution`")
    rows = [index for index, gold in enumerate(golds) if gold is not None]
    texts = completion_texts(completions)
    calls = [(str(golds[index]), texts[index]) for index in rows]
    outcomes = _pool(workers).map(verify_answer, calls, timeout_s)
    rewards: list[float | None] = [None] * len(golds)
    for index, call, outcome in zip(rows, calls, outcomes):
        rewards[index] = _reward(index, call, outcome)
    return rewards


def _reward(index: int, call: tuple[str, str], outcome) -> float | None:
    """The reward for row `index` from its WorkerPool outcome; failures and golds that do not
    parse as math are counted or logged."""
    if isinstance(outcome, TimeLimitExceeded):
        report_timeout()
        return 0.0
    if isinstance(outcome, CallFailed):
        logger.warning("math_accuracy: verifying row %d failed (%s): %r", index, outcome, call)
        return 0.0
    verdict, gold_is_math = outcome
    if not gold_is_math:
        logger.warning(
            "math_accuracy: math-verify cannot parse the gold answer of row %d, so "
            "the row %s; check the data: %r",
            index,
            "scores None" if verdict is None else "was compared as text",
            call[0],
        )
    return verdict


def verify_answer(gold: str, completion: str) -> tuple[float | None, bool]:
    """(math-verify's verdict on the completion's answer against the gold's, whether the gold
    parsed as math); the verdict is None when nothing of the gold parsed, and compares text
    when the gold parsed as text only. Runs inside a WorkerPool process."""
    from math_verify import verify

    # Our WorkerPool enforces the time limit; math-verify's signal-based one stays off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = parse_gold(gold)
    gold_is_math = any(not isinstance(value, str) for value in gold_parsed)
    if not gold_parsed:
        return None, False
    verdict = verify(gold_parsed, parse_completion(completion), timeout_seconds=None)
    return float(verdict), gold_is_math


def parse_gold(gold: str) -> list:
    """math-verify's parse of the gold's marked answer, else of the whole gold."""
    marked = parse_marked(gold)
    return parse_answer(gold) if marked is None else marked


def parse_completion(text: str) -> list:
    """math-verify's parse of the completion's marked answer, else of what its extraction
    finds, else of the last plain number; [] when there is none."""
    from math_verify import parse

    marked = parse_marked(text)
    if marked is not None:
        return marked
    found = parse(text, parsing_timeout=None)
    if found:
        return found
    number = last_plain_number(text)
    return [] if number is None else parse_answer(number)


def parse_marked(text: str) -> list | None:
    """math-verify's parse of the answer our markers mark; None without any. Boxed answers go
    through math-verify's boxed extraction (the last box; boxes joined by "and" or commas form
    a set), else ours (`\\fbox`, `\\boxed x`)."""
    from math_verify import parse

    boxed = _last_boxed(text)
    if boxed is not None:
        return parse(text, _boxed_extraction(), parsing_timeout=None) or parse_answer(boxed)
    for pattern in (_ANSWER_TAG, _GSM8K):
        matches = pattern.findall(text)
        if matches and matches[-1].strip():
            return parse_answer(matches[-1].strip())
    return None


def _boxed_extraction() -> tuple:
    """math-verify's extraction config for boxed answers first, and no unanchored LaTeX."""
    from math_verify import LatexExtractionConfig

    return (LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0),)


def parse_answer(answer: str) -> list:
    """math-verify's parse of a bare answer: as `\\boxed{answer}`, or by its extraction when
    the answer holds `$`, `\\(` or `\\[` math."""
    from math_verify import parse

    if _MATH_DELIMITER.search(answer):
        return parse(answer, parsing_timeout=None)
    return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def last_plain_number(text: str) -> str | None:
    """The last number that stands alone: not part of a word, an identifier or a version."""
    numbers = _PLAIN_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces) or `\\boxed x`."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if not starts:
        return None
    rest = text[starts[-1] :].lstrip()
    if not rest.startswith("{"):
        word = rest.split(maxsplit=1)
        return word[0].rstrip("$.") if word else None
    depth = 0
    for position, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:position].strip()
    return None  # unbalanced: the model ran out of tokens inside the box


_pools: dict[tuple[int, int | None], WorkerPool] = {}
_pools_lock = threading.Lock()


def _pool(workers: int | None) -> WorkerPool:
    """This process's verification workers (a forked child gets its own)."""
    key = (os.getpid(), workers)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = WorkerPool(workers, preload=("math_verify",), memory_mb=WORKER_MEMORY_MB)
        return _pools[key]
