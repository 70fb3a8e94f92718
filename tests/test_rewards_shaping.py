"""format, tag_count, soft_overlong and repetition_penalty on hand-computed cases."""

import pytest

from moetune.rewards.shaping import (
    repetition_penalty,
    soft_overlong,
    tag_count,
    think_answer_format,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>\nadd them\n</think>\n<answer>\n4\n</answer>", 1.0),
        ("<think>a</think><answer>4</answer>", 1.0),
        ("  <think>a</think>\n\n<answer>4</answer>\n", 1.0),
        ("<answer>4</answer>", 0.0),  # no thinking
        ("<think>a</think>", 0.0),  # no answer
        ("<answer>4</answer><think>a</think>", 0.0),  # wrong order
        ("Sure! <think>a</think><answer>4</answer>", 0.0),  # text outside the blocks
        ("<think>a</think><answer>4</answer> done", 0.0),
        ("<think>a<think>b</think><answer>4</answer>", 0.0),  # nested tag
        ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),  # repeated block
    ],
)
def test_format(completion, expected):
    assert think_answer_format([""], [completion]) == [expected]


def test_tag_count():
    completions = [
        "<think>a</think><answer>4</answer>",
        "<think>a</think> 4",
        "<think>a</think><think>b</think><answer>4</answer>",
        "plain",
    ]
    assert tag_count([""] * 4, completions) == [1.0, 0.5, 0.5, 0.0]


def test_soft_overlong_follows_dapo():
    lengths = [10, 12, 13, 14, 16, 17, 40]  # max_length 16, cache 4: safe up to 12
    ids = [[0] * n for n in lengths]
    rewards = soft_overlong([""] * 7, [""] * 7, ids, max_length=16, cache_length=4)
    assert rewards == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="completion_ids"):
        soft_overlong([""], [""], None, max_length=16, cache_length=4)
    with pytest.raises(ValueError, match="0 < cache_length < max_length"):
        soft_overlong([""], [""], [[0]], max_length=4, cache_length=4)


def test_repetition_penalty():
    completions = [
        "the cat sat on the mat",  # 4 trigrams, all distinct
        "a b a b a b",  # 4 trigrams, 2 distinct: 1 - 2/4
        "go go go go go",  # 3 trigrams, 1 distinct: 1 - 1/3
        "too short",
    ]
    rewards = repetition_penalty([""] * 4, completions, ngram_size=3, max_penalty=-2.0)
    assert rewards == pytest.approx([0.0, -1.0, -4 / 3, 0.0])
    with pytest.raises(ValueError, match="max_penalty <= 0"):
        repetition_penalty([""], ["x"], max_penalty=0.5)
