"""builtin:arithmetic problems and the character tokenizer."""

import re

import pytest

from moetune.data.arithmetic import ArithmeticSpec, arithmetic_problems, worked_steps
from moetune.model.char_tokenizer import char_tokenizer
from moetune.rewards import RewardSpec, score


def test_answers_follow_operator_precedence():
    assert worked_steps([2, 3, 4], ["+", "*"])[-1][1] == 14
    assert worked_steps([2, 3, 4, 5], ["*", "-", "*"]) == [
        ("2*3=6", 6),
        ("4*5=20", 20),
        ("6-20=-14", -14),
    ]
    assert worked_steps([10, 3, 2], ["-", "-"]) == [("10-3=7", 7), ("7-2=5", 5)]
    for item in arithmetic_problems(200, ArithmeticSpec(digits=2, terms=4, operations="+-*")):
        expression = re.match(r"Compute: (.*)\nAnswer:", item["prompt"]).group(1)
        assert int(item["answer"]) == eval(expression, {"__builtins__": {}})
        assert item["completion"] == " " + item["answer"]


def test_difficulty_knobs_shape_the_problems():
    spec = ArithmeticSpec(digits=3, terms=3, operations="*")
    for item in arithmetic_problems(50, spec):
        operands = re.findall(r"\d+", item["prompt"].split("\n")[0])
        assert len(operands) == 3 and all(len(x) <= 3 for x in operands)
        assert "+" not in item["prompt"] and "-" not in item["prompt"].split(":")[1]


def test_splits_are_disjoint_and_draws_reproducible():
    spec = ArithmeticSpec(digits=2)
    train = arithmetic_problems(500, spec, "train", seed=1)
    test = arithmetic_problems(60, spec, "test", seed=1)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert arithmetic_problems(500, spec, "train", seed=1) == train
    assert arithmetic_problems(500, spec, "train", seed=2) != train
    assert len({p["prompt"] for p in train}) == 500


def test_bad_knobs_fail_clearly():
    with pytest.raises(ValueError, match="operations"):
        ArithmeticSpec(operations="+/")
    with pytest.raises(ValueError, match="cannot draw"):
        arithmetic_problems(50, ArithmeticSpec(digits=1, terms=2, operations="+"), "test")


def test_char_tokenizer_round_trips_every_problem():
    tokenizer = char_tokenizer()
    assert tokenizer.get_vocab_size() <= 128
    assert [tokenizer.token_to_id(t) for t in ("<|begin|>", "<|end|>", "<|pad|>")] == [0, 1, 2]
    for item in arithmetic_problems(100, ArithmeticSpec(operations="+-*")):
        text = item["prompt"] + item["completion"]
        ids = tokenizer.encode(text).ids
        assert len(ids) == len(text) and tokenizer.decode(ids) == text


def test_think_style_works_the_steps_and_passes_the_rewards():
    spec = ArithmeticSpec(digits=2, terms=3, operations="+-*", style="think")
    items = arithmetic_problems(50, spec)
    for item in items:
        expression = re.match(r"Compute: (.*)\n$", item["prompt"]).group(1)
        assert int(item["answer"]) == eval(expression, {"__builtins__": {}})
        assert item["completion"].endswith(f"</think><answer>{item['answer']}</answer>")
    result = score(
        [RewardSpec("math_accuracy"), RewardSpec("format")],
        [i["prompt"] for i in items],
        [i["completion"] for i in items],
        {"answer": [i["answer"] for i in items]},
    )
    assert result.totals == [2.0] * 50
