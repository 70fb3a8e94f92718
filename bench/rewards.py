"""Reward throughput: math_accuracy vs calling math-verify directly, and sandboxed programs vs
unsandboxed subprocesses; math_accuracy's agreement with Math-Verify's own test cases.

- Math: verifications/s through `math_accuracy` (answer extraction, a worker process under a
  hard time limit, IPC) against `verify(parse(gold), parse(completion))` in this process
  (math-verify's own signal-based timeout, main thread). Same distinct items for both, after a
  warm-up on other items. Target: our overhead <= 20% with one worker.
- Code: trivial programs/s through `code_tests` (a fresh sandbox per program: namespaces,
  rlimits, uid drop, forked from a warm launcher) against `subprocess.run([python, "-c",
  code])`, a fresh interpreter with no isolation at all, both at the same concurrency.
  Target: >= 25 programs/s on 2 cores.
- Agreement: verdicts on the plain (gold, pred, expected) cases of Math-Verify's test suite
  (tests/data/math_verify_cases.jsonl) from `math_accuracy` and from `verify(parse(gold),
  parse(pred))`. Target: math_accuracy >= 95%.

    python bench/rewards.py [--math-items 300] [--programs 300] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moetune.rewards.code_tests import code_tests
from moetune.rewards.math_accuracy import math_accuracy
from moetune.rewards.sandbox import default_sandbox

MATH_VERIFY_CASES = Path(__file__).parents[1] / "tests" / "data" / "math_verify_cases.jsonl"


def math_items(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct (gold, completion) pairs, all correct, so no cache serves a repeat."""
    rng = random.Random(seed)
    golds, completions = [], []
    for i in range(count):
        a, b, k = rng.randint(1, 999), rng.randint(1000, 9999), rng.randint(2, 9)
        kind = i % 4
        if kind == 0:
            golds.append(f"\\frac{{{a}}}{{{b}}}")
            completions.append(f"Reducing, we get $\\boxed{{\\frac{{{a * k}}}{{{b * k}}}}}$.")
        elif kind == 1:
            golds.append(str(a * b * k))
            completions.append(f"Adding everything up, the total is {a * b * k:,}.")
        elif kind == 2:
            golds.append(f"{a}.{b}")
            completions.append(f"So $x = \\boxed{{{a}.{b}0}}$.")
        else:
            golds.append(f"{a}\\sqrt{{{k}}}")
            completions.append(f"Hence the length is $\\boxed{{\\sqrt{{{a * a * k}}}}}$.")
    return golds, completions


def bench_math(count: int) -> None:
    from math_verify import parse, verify

    golds, completions = math_items(count, seed=1)
    warm_golds, warm_completions = math_items(40, seed=2)

    def direct(golds: list[str], completions: list[str]) -> list[float]:
        return [float(verify(parse(f"${g}$"), parse(c))) for g, c in zip(golds, completions)]

    def ours(workers: int | None):
        return lambda g, c: math_accuracy([""] * len(c), c, answer=g, workers=workers)

    rows = []
    for name, run in (
        ("math-verify direct, in-process", direct),
        ("math_accuracy, 1 worker", ours(1)),
        (f"math_accuracy, {os.cpu_count()} workers", ours(None)),
    ):
        run(warm_golds, warm_completions)
        start = time.perf_counter()
        rewards = run(golds, completions)
        rows.append((name, count / (time.perf_counter() - start), sum(rewards)))
    base = rows[0][1]
    print(f"math: {count} distinct verifications")
    for name, rate, correct in rows:
        print(
            f"  {name:34s} {rate:8.1f} /s  ratio {rate / base:.2f}  correct {correct:.0f}/{count}"
        )


def bench_agreement() -> None:
    from math_verify import parse, verify

    cases = [json.loads(line) for line in MATH_VERIFY_CASES.read_text().splitlines()]
    golds, preds = [case["gold"] for case in cases], [case["pred"] for case in cases]
    ours = math_accuracy([""] * len(cases), preds, answer=golds)
    plain = [float(verify(parse(gold), parse(pred))) for gold, pred in zip(golds, preds)]

    def agreed(rewards: list) -> int:
        return sum(reward == case["expected"] for reward, case in zip(rewards, cases))

    print(
        f"Math-Verify suite cases: math_accuracy {agreed(ours)}/{len(cases)} "
        f"({100 * agreed(ours) / len(cases):.1f}%), "
        f"math_verify.parse+verify {agreed(plain)}/{len(cases)}"
    )


def bench_code(count: int, concurrency: int) -> None:
    programs = [f"print({i} * 2)" for i in range(count)]
    tests = [{"inputs": [""], "outputs": [str(i * 2)]} for i in range(count)]
    code_tests([""] * 4, programs[:4], tests[:4], concurrency=concurrency)  # warm-up
    start = time.perf_counter()
    rewards = code_tests([""] * count, programs, tests, concurrency=concurrency)
    sandboxed = count / (time.perf_counter() - start)

    def bare(code: str) -> bool:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
        return done.stdout.strip() != b""

    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        assert all(pool.map(bare, programs))
        unsandboxed = count / (time.perf_counter() - start)
    print(
        f"code: {count} trivial programs, concurrency {concurrency}, "
        f"isolation {default_sandbox(concurrency).isolation()}"
    )
    print(
        f"  {'code_tests, sandboxed':40s} {sandboxed:8.1f} programs/s  "
        f"passed {sum(rewards):.0f}/{count}"
    )
    print(f"  {'subprocess.run(python -c), no isolation':40s} {unsandboxed:8.1f} programs/s")
    print(f"  ratio sandboxed / unsandboxed {sandboxed / unsandboxed:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--math-items", type=int, default=300)
    parser.add_argument("--programs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count())
    args = parser.parse_args()
    bench_math(args.math_items)
    bench_agreement()
    bench_code(args.programs, args.concurrency)


if __name__ == "__main__":
    main()
