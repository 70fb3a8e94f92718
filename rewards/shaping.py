"""Shaping rewards on the form of a completion rather than its correctness.

- `format`: 1.0 when the completion is exactly `<think>...</think>` then `<answer>...</answer>`
  (whitespace around the blocks allowed, no tag nested or repeated), else 0.0.
- `tag_count`: 0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that appears
  exactly once, so a model learning the format gets partial credit on the way.
- `soft_overlong`: DAPO's soft overlong punishment on the token length L (column
  `completion_ids`): 0 while L <= max_length - cache_length, then falling linearly to -1 at
  max_length, and -1 beyond.
- `repetition_penalty`: max_penalty * (1 - distinct n-grams / n-grams) over lower-cased words
  (as in open-r1), 0.0 for text shorter than one n-gram.
"""

from __future__ import annotations

import re

from moetune.rewards.registry import register_reward
from moetune.rewards.scoring import completion_texts

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LAYOUT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


@register_reward("format")
def think_answer_format(prompts: list, completions: list) -> list[float]:
    return [1.0 if _has_layout(completion) else 0.0 for completion in completion_texts(completions)]


def _has_layout(completion: str) -> bool:
    match = _LAYOUT.fullmatch(completion)
    return match is not None and not any(tag in body for body in match.groups() for tag in _TAGS)


@register_reward("tag_count")
def tag_count(prompts: list, completions: list) -> list[float]:
    return [
        sum(0.25 for tag in _TAGS if completion.count(tag) == 1)
        for completion in completion_texts(completions)
    ]


@register_reward("soft_overlong")
def soft_overlong(
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None = None,
    *,
    max_length: int,
    cache_length: int,
) -> list[float]:
    if not 0 < cache_length < max_length:
        raise ValueError(
            f"soft_overlong needs 0 < cache_length < max_length, got "
            f"cache_length={cache_length}, max_length={max_length}"
        )
    if completion_ids is None:
        raise ValueError(
            "soft_overlong needs the token ids of each completion "
            "(`completion_ids`, passed by the GRPO trainer or a column of that name)"
        )
    safe_length = max_length - cache_length
    return [
        0.0
        if len(ids) <= safe_length
        else -1.0
        if len(ids) > max_length
        else (safe_length - len(ids)) / cache_length
        for ids in completion_ids
    ]


@register_reward("repetition_penalty")
def repetition_penalty(
    prompts: list, completions: list, *, ngram_size: int = 3, max_penalty: float = -1.0
) -> list[float]:
    if max_penalty > 0 or ngram_size < 1:
        raise ValueError(
            f"repetition_penalty needs max_penalty <= 0 and ngram_size >= 1, got "
            f"max_penalty={max_penalty}, ngram_size={ngram_size}"
        )
    return [
        _repetition(completion, ngram_size) * max_penalty
        for completion in completion_texts(completions)
    ]


def _repetition(text: str, n: int) -> float:
    words = text.lower().split()
    if len(words) < n:
        return 0.0
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams)
