"""A model scored on the held-out split of the run that trained it.

A training run leaves its resolved recipe beside its checkpoint (`recipe.yaml`, written by
`moetune run`). `held_out_recipe` turns that recipe into an EvalRecipe: the run's held-out
problems (GRPO: its periodic-eval source and count; SFT: `data.eval_source`, else a builtin
set's test split) with its data knobs and prompt template, its rollout engine, dtype and token
budget (GRPO), one greedy sample per problem. `moetune eval --model RUN_DIR` and `moetune demo`
both go through it, so they report the same figure.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

from moetune.config.build import RecipeError
from moetune.config.schema import DataSection, DatasetSpec, EvalRecipe, EvalSection, ModelSection
from moetune.data.sources import with_split
from moetune.recipes.loader import RUN_RECIPE, load_recipe
from moetune.rewards import RewardSpec

SETTINGS = ("limit", "seed", "split", "adapter", *asdict(EvalSection()))  # what `given` may set


def dataset_fields(spec: DatasetSpec) -> dict:
    """The DatasetSpec fields of a section (which may have more)."""
    return {f.name: getattr(spec, f.name) for f in fields(DatasetSpec)}


def training_run(model_dir: str):
    """The recipe of the run that wrote `model_dir` (its recipe.yaml, or its parent's for a
    checkpoint-N folder)."""
    for folder in (Path(model_dir), Path(model_dir).parent):
        if (folder / RUN_RECIPE).is_file():
            return load_recipe(folder / RUN_RECIPE, [])
    raise RecipeError(
        f"--model {model_dir}: no {RUN_RECIPE} of the run that trained it (in the "
        "folder or its parent); name the problems with --data"
    )


def held_out_recipe(run, model_dir: str, rewards: list[RewardSpec], **given) -> EvalRecipe:
    """An EvalRecipe scoring `model_dir` on the held-out split of the training run `run` (an
    SFT or GRPO recipe). `given` overrides any of SETTINGS (EvalSection's fields, limit, seed,
    split, adapter; None leaves the run's). A folder holding only a LoRA adapter is scored on
    the run's base model."""
    given = {key: value for key, value in given.items() if value is not None}
    unknown = set(given) - set(SETTINGS)
    if unknown:
        raise TypeError(f"held_out_recipe: unknown settings {sorted(unknown)}")
    if run.recipe == "grpo":
        if run.eval.every == 0 and run.eval.source != run.data.source:
            raise RecipeError(
                f"--model {model_dir}: its run held out no problems (eval.every: "
                "0, and its prompts are not a builtin set's train split); give --data"
            )
        problems, dtype = dataset_fields(run.eval), run.rollout.dtype
        from_run = dict(
            limit=run.eval.limit,
            pass_threshold=run.eval.pass_threshold,
            backend=run.rollout.backend,
            max_new_tokens=run.rollout.max_new_tokens,
            speculative_tokens=run.rollout.speculative_tokens,
        )
    else:
        data, dtype, from_run = run.data, run.model.dtype, {}
        if data.eval_source:
            problems = dataset_fields(data) | {
                "source": data.eval_source,
                "subset": None,
                "split": None,
                "revision": None,
            }
        elif data.eval_split or (
            isinstance(data.source, str) and data.source.startswith("builtin:")
        ):
            problems = dataset_fields(with_split(data, data.eval_split))
        else:
            raise RecipeError(
                f"--model {model_dir}: its run held out "
                f"{'a random share' if data.eval_fraction else 'nothing'} of "
                f"{data.source}, not a split eval can name; give --data"
            )
    if "split" in given:
        problems = dataset_fields(with_split(DatasetSpec(**problems), given["split"]))
    settings = asdict(EvalSection()) | {"n": 1, "temperature": 0.0} | from_run | given
    path, adapter = str(model_dir), settings.get("adapter")
    if (Path(path) / "adapter_config.json").exists() and not (Path(path) / "config.json").exists():
        if not run.model.path:
            raise RecipeError(
                f"--model {model_dir}: an adapter on a base built from model.config "
                f"{run.model.config}, not a checkpoint folder eval can load"
            )
        path, adapter = run.model.path, adapter or path  # as the run named it (its working folder)
    return EvalRecipe(
        recipe="eval",
        model=ModelSection(path=path, adapter=adapter, dtype=dtype),
        data=DataSection(
            **problems,
            limit=settings.get("limit"),
            seed=settings.get("seed", 0),
            arithmetic=run.data.arithmetic,
        ),
        rewards=rewards,
        template=run.template,
        eval=EvalSection(**{key: settings[key] for key in asdict(EvalSection())}),
    )
