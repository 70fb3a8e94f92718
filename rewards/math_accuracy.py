"""`math_accuracy`: 1.0 when the completion's final answer equals the gold answer, else 0.0.

The answer is taken from the completion in this order: the last `\\boxed{...}` (or
`\\fbox{...}`), the last `<answer>...</answer>`, the last GSM8K `#### ...` line, else the
last number in the text. The gold answer (column `answer`, or `solution`) goes through the
same steps, except that a gold without any marker is taken whole. Both are parsed by
math-verify (as `\\boxed{...}`, so LaTeX, plain numbers with thousands separators,
percentages, sets, intervals and matrices all parse) and compared with `verify(gold,
predicted)`, gold first: math-verify's comparison is not symmetric.

Parsing and verifying run in `time_limit.WorkerPool` processes (`workers` of them, default:
the number of cores) under a hard wall-clock limit (`timeout_s`), so a pathological answer (`9^{9^{9^{9}}}`) scores 0.0 in time, from any thread
or process.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Literal

from moetune.rewards.registry import register_reward
from moetune.rewards.scoring import completion_texts, report_timeout
from moetune.rewards.time_limit import CallFailed, TimeLimitExceeded, WorkerPool

logger = logging.getLogger(__name__)

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K = re.compile(r"####\s*(.+)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|-?\.\d+%?")
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
    """1.0 per completion whose answer matches the gold; None where the gold is None.
    `workers`: verification processes (default: the number of cores)."""
    golds = answer if answer is not None else solution
    if golds is None:
        raise ValueError("math_accuracy needs the gold answer in a column `answer` or `solution`")
    rewards: list[float | None] = [None if gold is None else 0.0 for gold in golds]
    pending = []
    for index, (gold, completion) in enumerate(zip(golds, completion_texts(completions))):
        gold_answer = None if gold is None else extract_answer(str(gold), fallback="whole")
        predicted = extract_answer(completion, fallback="last_number")
        if gold_answer is not None and predicted is not None:
            pending.append((index, (gold_answer, predicted)))
    outcomes = _pool(workers).map(verify_answer, [pair for _, pair in pending], timeout_s)
    for (index, pair), outcome in zip(pending, outcomes):
        if isinstance(outcome, TimeLimitExceeded):
            report_timeout()
        elif isinstance(outcome, CallFailed):
            logger.warning("math_accuracy: verifying sample %d failed (%s): %r", index, outcome, pair)
        rewards[index] = 0.0 if isinstance(outcome, CallFailed) else outcome
    return rewards


def extract_answer(text: str, fallback: Literal["last_number", "whole"]) -> str | None:
    """The final answer in `text`: last boxed, last <answer> tag, last `####`, else `fallback`."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_ANSWER_TAG, _GSM8K):
        matches = pattern.findall(text)
        if matches and matches[-1].strip():
            return matches[-1].strip()
    if fallback == "whole":
        return text.strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces) or `\\boxed x`."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if not starts:
        return None
    rest = text[starts[-1]:].lstrip()
    if not rest.startswith("{"):
        word = rest.split(maxsplit=1)
        return word[0].rstrip("$.") if word else None
    depth = 0
    for position, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:position].strip()
    return None  # unbalanced: the model ran out of tokens inside the box


def verify_answer(gold: str, predicted: str) -> float:
    """math-verify's verdict on two extracted answers; runs inside a WorkerPool process."""
    from math_verify import parse, verify

    # Our WorkerPool enforces the time limit; math-verify's signal-based one stays off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    return float(verify(gold_parsed, predicted_parsed, timeout_seconds=None))


_pools: dict[tuple[int, int | None], WorkerPool] = {}
_pools_lock = threading.Lock()


def _pool(workers: int | None) -> WorkerPool:
    """This process's verification workers (a forked child gets its own)."""
    key = (os.getpid(), workers)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = WorkerPool(workers, preload=("math_verify",), memory_mb=WORKER_MEMORY_MB)
        return _pools[key]
