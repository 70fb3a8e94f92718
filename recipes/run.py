"""`moetune run RECIPE [key.sub=value ...] [--dry-run]` and `moetune recipes`.

A recipe is a YAML path or the name of a shipped one (`sft/arith_tiny.yaml`, or without
the suffix). The whole recipe is checked before any work: keys, types, and every file it
names. `--dry-run` builds the model on the meta device and prints what `moetune plan`
does (parameters, the trainable ones, memory per device, devices needed), then exits.

    moetune run sft/arith_tiny.yaml training.max_steps=50
    accelerate launch --config_file recipes/accelerate/ddp.yaml \
        -m moetune.recipes run sft/arith_tiny.yaml
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from moetune.config.build import RecipeError
from moetune.data.sources import local_sources, names_a_missing_path
from moetune.recipes.loader import load_recipe, save_recipe

SHIPPED = Path(__file__).resolve().parent
RECIPE_FOLDERS = ("sft", "grpo", "eval")
RUNNERS = {
    "sft": "moetune.finetune.sft:run_sft",
    "grpo": "moetune.rl.grpo:run_grpo",
    "eval": "moetune.recipes.evaluate:run_recipe",
}


def resolve(name: str) -> Path:
    """A recipe path as given, else a shipped recipe by name."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (SHIPPED / name, SHIPPED / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"recipe {name}: no such file, and not a shipped recipe (`moetune recipes` lists them)"
    )


def shipped_recipes() -> list[tuple[str, str]]:
    """(name, first comment line) of every shipped recipe."""
    found = []
    for folder in RECIPE_FOLDERS:
        for path in sorted((SHIPPED / folder).glob("*.yaml")):
            first = path.read_text().splitlines()[0] if path.stat().st_size else ""
            found.append((f"{folder}/{path.name}", first.lstrip("# ").strip()))
    return found


def check_files(recipe, dry_run: bool) -> None:
    """Every file or folder the run will read must exist. A dry run reads only the model's
    config (model.config, else the checkpoint's) and an expert profile."""
    model, data, lora = recipe.model, recipe.data, getattr(recipe, "lora", None)
    named = []
    if not dry_run:
        named += [
            ("model.path", model.path),
            ("model.adapter", model.adapter),
            ("model.tokenizer", model.tokenizer if model.tokenizer != "char" else None),
        ]
        sources = [("data.source", source) for source in local_sources(data)]
        if getattr(data, "eval_source", None):
            sources.append(("data.eval_source", data.eval_source))
        for key, source in sources:
            if names_a_missing_path(source):
                raise RecipeError(f"{key}: {source}: no such file or folder")
    elif not model.config:
        named.append(("model.path", model.path))
    if lora is not None and lora.experts != "all":
        named.append(("lora.experts.profile", lora.experts.profile))
    for key, value in named:
        if value and not value.startswith("builtin:") and not Path(value).exists():
            raise RecipeError(f"{key}: {value}: no such file or folder")


def check_rewards(recipe) -> None:
    """Every reward resolves (found, imported, its options right) before any work."""
    from moetune.rewards import RewardSpecError, resolve_rewards

    try:
        resolve_rewards(getattr(recipe, "rewards", ()))
    except RewardSpecError as error:
        raise RecipeError(str(error)) from None


def dry_run(recipe, name: str) -> int:
    """Print `moetune plan`'s report: parameters, memory per device, devices needed."""
    from moetune.recipes.plan import format_plan, plan_recipe

    print(format_plan(plan_recipe(recipe), name))
    return 0


def run(args) -> int:
    recipe = load_recipe(resolve(args.recipe), args.overrides)
    check_files(recipe, args.dry_run)
    check_rewards(recipe)
    if args.dry_run:
        if recipe.recipe == "eval":
            raise RecipeError("--dry-run plans training recipes (sft, grpo), not eval")
        return dry_run(recipe, args.recipe)
    result = execute(recipe)
    leave_process_group()
    return result if isinstance(result, int) else 0


def execute(recipe):
    """Run a checked recipe. A training run first leaves its resolved recipe in its output
    folder (`recipe.yaml`), which `moetune eval --model` reads for the run's held-out split."""
    if recipe.recipe != "eval":  # a launch config training cannot run under fails before any write
        from moetune.training.launcher import check_launch
        from moetune.training.model_loading import check_expert_parallel, resolve_config

        check_launch(recipe.model.expert_parallel)
        if recipe.model.expert_parallel != 1:
            check_expert_parallel(recipe.model.expert_parallel, resolve_config(recipe.model))
    if recipe.recipe != "eval" and int(os.environ.get("RANK", "0")) == 0:
        save_recipe(recipe, recipe.training.output_dir)
    module, function = RUNNERS[recipe.recipe].split(":")
    return getattr(importlib.import_module(module), function)(recipe)


def leave_process_group() -> None:
    """After a run that finished on every rank: tear down the launch's process group. Left to
    interpreter exit, gloo's worker threads can abort the process ("terminate called without
    an active exception"), failing a run that succeeded. (Not after an error: a rank still
    inside a collective would wait forever.)"""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def list_recipes(args) -> int:
    recipes = shipped_recipes()
    width = max(len(name) for name, _ in recipes)
    for name, description in recipes:
        print(f"  {name:<{width}}  {description}")
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run a recipe (sft, grpo, eval)", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("recipe", help="a recipe YAML file, or a shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (values parsed as YAML)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build on the meta device, print parameters and memory, exit",
    )
    parser.set_defaults(func=run)
    listing = subparsers.add_parser("recipes", help="list the shipped recipes")
    listing.set_defaults(func=list_recipes)
