"""`builtin:arithmetic`: generated arithmetic problems with difficulty knobs and a held-out split.

Each problem is {"prompt": "Compute: 12+7*3\nAnswer:", "answer": "33", "completion": " 33"}:
`answer` is the gold the rewards compare against, `completion` what SFT trains on. With
style "think" the completion works the problem step by step in DeepSeek-R1's layout:
  prompt "Compute: 12+7*3-5\n",
  completion "<think>7*3=21 12+21=33 33-5=28</think><answer>28</answer>"
(products first, then left to right), which the `format` and `math_accuracy` rewards read.
A problem's split is fixed by a hash of its expression, so the train and test splits never
share a problem whatever the seed or the number drawn.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

OPERATIONS = "+-*"
SPLITS = ("train", "test")
STYLES = ("plain", "think")


@dataclass(frozen=True)
class ArithmeticSpec:
    """digits: max digits per operand; terms: operands per problem; operations: a subset of
    "+-*" (usual precedence); test_fraction: share of all problems held out for `test`;
    style: "plain" (the answer) or "think" (worked steps, then the answer, in tags).
    sign_slip: share of train-split completions with a negative answer that write the final
    answer without its minus sign: a flawed demonstrator for SFT, which a verifier reward
    (GRPO with math_accuracy) can correct. `answer` (the gold) is always right."""

    digits: int = 2
    terms: int = 2
    operations: str = "+-"
    test_fraction: float = 0.1
    style: str = "plain"
    sign_slip: float = 0.0

    def __post_init__(self):
        if self.digits < 1 or self.terms < 2:
            raise ValueError(
                f"arithmetic: digits >= 1 and terms >= 2 (got {self.digits}, {self.terms})"
            )
        if not self.operations or set(self.operations) - set(OPERATIONS):
            raise ValueError(
                f"arithmetic.operations: {self.operations!r} must use only {OPERATIONS!r}"
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"arithmetic.test_fraction: {self.test_fraction} must be in (0, 1)")
        if not 0 <= self.sign_slip <= 1:
            raise ValueError(f"arithmetic.sign_slip: {self.sign_slip} must be in [0, 1]")
        if self.style not in STYLES:
            raise ValueError(f"arithmetic.style: {self.style!r} must be one of {STYLES}")


def split_of(expression: str, test_fraction: float) -> str:
    return "test" if zlib.crc32(expression.encode()) % 10_000 < test_fraction * 10_000 else "train"


def worked_steps(operands: list[int], ops: list[str]) -> list[tuple[str, int]]:
    """The steps that evaluate operands[0] ops[0] operands[1] ...: every product first, then
    sums and differences left to right. [(step text, value), ...]; the last value is the answer."""
    steps = []
    values, pending = [operands[0]], []
    for op, value in zip(ops, operands[1:]):
        if op == "*":
            product = values[-1] * value
            steps.append((f"{values[-1]}*{value}={product}", product))
            values[-1] = product
        else:
            pending.append(op)
            values.append(value)
    total = values[0]
    for op, value in zip(pending, values[1:]):
        result = total + value if op == "+" else total - value
        steps.append((f"{total}{op}{value}={result}", result))
        total = result
    return steps or [(str(total), total)]


def problem(
    operands: list[int], ops: list[str], style: str = "plain"
) -> tuple[str, dict[str, str]]:
    expression = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:]))
    steps = worked_steps(operands, ops)
    answer = str(steps[-1][1])
    if style == "think":
        work = " ".join(text for text, _ in steps)
        return expression, {
            "prompt": f"Compute: {expression}\n",
            "answer": answer,
            "completion": f"<think>{work}</think><answer>{answer}</answer>",
        }
    return expression, {
        "prompt": f"Compute: {expression}\nAnswer:",
        "answer": answer,
        "completion": f" {answer}",
    }


def arithmetic_problems(
    count: int, spec: ArithmeticSpec = ArithmeticSpec(), split: str = "train", seed: int = 0
) -> list[dict[str, str]]:
    """`count` distinct problems of `split`, the same for the same arguments."""
    if split not in SPLITS:
        raise ValueError(f"arithmetic split must be one of {SPLITS}, not {split!r}")
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    problems = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(
                f"arithmetic: cannot draw {count} distinct {split} problems with {spec}"
            )
        operands = [rng.randint(0, 10**spec.digits - 1) for _ in range(spec.terms)]
        ops = [rng.choice(spec.operations) for _ in range(spec.terms - 1)]
        expression, item = problem(operands, ops, spec.style)
        if expression in seen or split_of(expression, spec.test_fraction) != split:
            continue
        if (
            spec.sign_slip
            and split == "train"
            and item["answer"].startswith("-")
            and rng.random() < spec.sign_slip
        ):
            slipped = item["answer"][1:]
            item["completion"] = item["completion"][::-1].replace(
                item["answer"][::-1], slipped[::-1], 1
            )[::-1]  # the last occurrence: the answer
        seen.add(expression)
        problems.append(item)
    return problems


def arithmetic_spec(section) -> ArithmeticSpec:
    """The ArithmeticSpec of a recipe's `arithmetic` knobs (config.schema.ArithmeticSection)."""
    return ArithmeticSpec(
        section.digits,
        section.terms,
        section.operations,
        section.test_fraction,
        section.style,
        section.sign_slip,
    )
