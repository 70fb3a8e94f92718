"""The `moetune` command line: one subcommand per concept, each defined next to its code.

Each subcommand module exposes `add_subcommand(subparsers)`, which registers an
argparse parser whose `func(args) -> int` runs it. Heavy imports happen inside `func`,
so `moetune --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "moetune.recipes.run",
    "moetune.recipes.plan",
    "moetune.recipes.demo",
    "moetune.model.info",
    "moetune.training.merge",
    "moetune.training.expert_profile",
    "moetune.rewards.cli",
    "moetune.recipes.evaluate",
    "moetune.rl.rollout_server",
    "moetune.rl.rollouts_file",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetune",
        description="Fine-tune and RL-align DeepSeek-V3-family Mixture-of-Experts models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A RecipeError (a bad recipe or override) or a CheckpointError (an
    unreadable checkpoint file) prints one line naming what is wrong and where and exits with
    code 2; a RewardError (a reward function failed) prints its message, which names the
    function, and exits with code 1."""
    from moetune.config.build import RecipeError
    from moetune.model.checkpoint import CheckpointError
    from moetune.rewards import RewardError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (RecipeError, CheckpointError) as error:
        print(f"moetune {args.command}: {error}", file=sys.stderr)
        return 2
    except RewardError as error:
        print(f"moetune {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
