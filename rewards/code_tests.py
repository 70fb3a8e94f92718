"""`code_tests`: the fraction of a completion's test cases its program passes in the sandbox.

The program is the last fenced ```python block of the completion, else the whole text. The
`tests` column holds, per sample, a dict (or its JSON text), one of:

- stdin/stdout cases `{"inputs": [...], "outputs": [...]}`: each input is fed on stdin; a case
  passes when the program exits 0 and prints the expected output, compared token by token
  (so spacing and line breaks do not matter). An input or output given as a list of lines is
  joined with newlines.
- an assert-style test `{"test": "<code defining check(candidate)>", "entry_point": "f",
  "prefix": "<code placed before the completion, e.g. a HumanEval prompt>"}`: one case, passed
  when `check(f)` returns. It runs in a judge process apart from the program (see
  `sandbox_judge`), so the program cannot fake a pass.

`binary=True` gives 1.0 only when every case passes, else 0.0. The first call checks that
the sandbox can run programs at all (SandboxError otherwise, rather than scoring everything
0). A sample whose `tests` is None scores None. Options: `time_s` and `memory_mb` per
program run, `concurrency` of the sandbox pool (default: the number of cores).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

from moetune.rewards.registry import register_reward
from moetune.rewards.sandbox import (
    CheckJob,
    RunResult,
    SandboxError,
    SandboxLimits,
    ScriptJob,
    default_sandbox,
)
from moetune.rewards.scoring import completion_texts, report_timeout

_PYTHON_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@register_reward("code_tests")
def code_tests(
    prompts: list[str],
    completions: list,
    tests: list[dict | str | None],
    *,
    binary: bool = False,
    time_s: float = 5.0,
    memory_mb: int = 1024,
    concurrency: int | None = None,
) -> list[float | None]:
    """The fraction of each sample's cases its program passes; see the module docstring."""
    cases = []  # (sample index, job, expected stdout; None for an assert-style test)
    for index, (completion, spec) in enumerate(zip(completion_texts(completions), tests)):
        if spec is not None:
            code = extract_code(completion)
            cases += [(index, job, expected) for job, expected in build_cases(code, spec)]
    limits = SandboxLimits(time_s=time_s, memory_mb=memory_mb)
    sandbox = default_sandbox(concurrency)
    sandbox.isolation()  # once per sandbox: fails loudly if programs cannot run here at all
    runs = sandbox.run_all([job for _, job, _ in cases], limits)
    passed: dict[int, list[bool]] = defaultdict(list)
    timed_out = set()
    for (index, _, expected), run in zip(cases, runs):
        if run.status == "error":
            raise SandboxError(f"the sandbox failed on sample {index}: {run.detail}")
        if run.status == "timeout":
            timed_out.add(index)
        passed[index].append(_passed(run, expected))
    report_timeout(len(timed_out))
    rewards: list[float | None] = []
    for index, spec in enumerate(tests):
        fraction = sum(passed[index]) / len(passed[index]) if spec is not None else None
        rewards.append(float(fraction == 1.0) if binary and fraction is not None else fraction)
    return rewards


def extract_code(completion: str) -> str:
    """The last fenced ```python block, else the whole completion."""
    blocks = _PYTHON_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def build_cases(code: str, spec: dict | str) -> list[tuple[ScriptJob | CheckJob, str | None]]:
    """The sandbox jobs for one sample, each with its expected stdout (None: assert-style)."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    if "inputs" in spec and "outputs" in spec:
        inputs, outputs = spec["inputs"], spec["outputs"]
        if not inputs or len(inputs) != len(outputs):
            raise ValueError(
                f"tests have {len(inputs)} inputs and {len(outputs)} outputs; "
                "they need at least one of each, as many inputs as outputs"
            )
        return [(ScriptJob(code, _text(i)), _text(o)) for i, o in zip(inputs, outputs)]
    if "test" in spec and "entry_point" in spec:
        job = CheckJob(code, spec["test"], spec["entry_point"], spec.get("prefix") or "")
        return [(job, None)]
    raise ValueError(
        "tests must hold 'inputs' and 'outputs', or 'test' and 'entry_point'; "
        f"got keys {sorted(spec)}"
    )


def _text(value: str | list) -> str:
    return "\n".join(map(str, value)) + "\n" if isinstance(value, list) else str(value)


def _passed(run: RunResult, expected: str | None) -> bool:
    if run.status != "ok":
        return False
    if expected is None:
        return run.passed is True
    return run.exit_code == 0 and run.stdout.split() == expected.split()
