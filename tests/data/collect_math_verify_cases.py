"""Write Math-Verify's plain (gold, pred, expected) test cases as JSON lines to stdout.

    python tests/data/collect_math_verify_cases.py MATH_VERIFY_CHECKOUT/tests \
        > tests/data/math_verify_cases.jsonl

Plain: a `pytest.mark.parametrize("gold, pred, expected", [...])` case whose test compares
with math-verify's default extraction targets and verify settings, that is
`compare_strings(gold, pred)` or `compare_strings(gold, pred, match_types=["latex", "expr"])`
(no precision, strict or set-relation override), or `verify(parse(gold), parse(pred))`.
"""

import ast
import json
import sys
from pathlib import Path

PLAIN_COMPARE_KEYWORDS = ({}, {"match_types": "['latex', 'expr']"})


def is_plain(test: ast.FunctionDef) -> bool:
    """Whether the test compares gold and pred with default configs."""
    for node in ast.walk(test):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id == "compare_strings":
            keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
            return keywords in PLAIN_COMPARE_KEYWORDS
        if node.func.id == "verify":
            return not node.keywords and all(
                ast.unparse(arg) in ("parse(gold)", "parse(pred)") for arg in node.args
            )
    return False


def plain_cases(path: Path):
    """The plain cases of one test file, as dicts."""
    for test in ast.parse(path.read_text()).body:
        if not isinstance(test, ast.FunctionDef) or not is_plain(test):
            continue
        for decorator in test.decorator_list:
            if isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith(
                "parametrize"
            ):
                names = ast.literal_eval(decorator.args[0]).replace(" ", "").split(",")
                if names[:2] == ["gold", "pred"] and len(names) == 3:
                    for gold, pred, expected in ast.literal_eval(decorator.args[1]):
                        yield {
                            "source": f"tests/{path.name}::{test.name}",
                            "gold": gold,
                            "pred": pred,
                            "expected": int(expected),
                        }


if __name__ == "__main__":
    for test_file in sorted(Path(sys.argv[1]).glob("test_*.py")):
        for case in plain_cases(test_file):
            print(json.dumps(case, ensure_ascii=False))
