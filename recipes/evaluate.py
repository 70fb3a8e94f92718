"""`moetune eval`: pass@1 / pass@k, mean reward and mean length of a model on held-out
problems, scored with the training rewards (moetune.rl.evaluation).

    moetune eval --model DIR [--adapter DIR] --data SOURCE --reward math_accuracy --n 8 \
        [--backend vllm]
    moetune eval --model RUN_DIR --reward math_accuracy  # the run's own held-out split, greedy
    moetune eval RECIPE.yaml [key.sub=value ...]        # recipe: eval (moetune.config.schema)
    accelerate launch --num_processes 8 -m moetune.recipes eval --model DIR ... \
        --expert-parallel 8                             # each process holds 1/8 of the experts

Without --data, the problems are the held-out split of the run that trained --model, read
from the `recipe.yaml` it left in its output folder (the model's folder or its parent): the
same source, knobs, template, engine and token budget, one greedy sample per problem unless
--n / --temperature say otherwise (`moetune.recipes.held_out`). `moetune demo` reports its
accuracies this way.

A sample passes when its weighted reward reaches --pass-threshold (1.0: fully correct).
Writes `eval.json` (summary) and `samples.jsonl` (one row per problem) to --output.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moetune.config.build import RecipeError
from moetune.config.schema import DataSection, EvalRecipe, EvalSection, ModelSection, RewardSpec


def run(args) -> int:
    try:
        recipe = build_recipe(args)
    except ValueError as error:  # a section's own check, e.g. a negative --speculative-tokens
        if isinstance(error, RecipeError):
            raise
        raise RecipeError(str(error)) from None
    from moetune.recipes.run import leave_process_group

    result = run_recipe(recipe)
    leave_process_group()  # of a launch (--expert-parallel)
    return result


def build_recipe(args) -> EvalRecipe:
    flags = {
        key: value
        for key, value in (
            ("backend", args.backend),
            ("n", args.n),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("max_new_tokens", args.max_new_tokens),
            ("pass_threshold", args.pass_threshold),
            ("output_dir", args.output),
            ("speculative_tokens", args.speculative_tokens),
        )
        if value is not None
    }
    if args.recipe:
        from moetune.recipes.loader import load_recipe

        recipe = load_recipe(args.recipe, args.overrides, EvalRecipe)
    elif args.model and args.data is None and args.reward:
        from moetune.recipes.held_out import held_out_recipe, training_run

        recipe = held_out_recipe(
            training_run(args.model),
            args.model,
            rewards_of(args.reward),
            limit=args.limit,
            seed=args.seed,
            split=args.split,
            adapter=args.adapter,
            **flags,
        )
    else:
        missing = [flag for flag in ("model", "data", "reward") if getattr(args, flag) is None]
        if missing:
            raise SystemExit(f"moetune eval: give a recipe, or --{', --'.join(missing)}")
        recipe = EvalRecipe(
            recipe="eval",
            model=ModelSection(path=args.model, adapter=args.adapter),
            data=DataSection(
                source=args.data,
                subset=args.subset,
                split=args.split,
                revision=args.revision,
                columns=column_mapping(args.columns),
                prompt_format=args.prompt_format,
                answer_format=args.answer_format,
                limit=args.limit,
                seed=args.seed,
            ),
            rewards=rewards_of(args.reward),
            eval=EvalSection(**flags),
        )
    if args.expert_parallel is not None:
        recipe = replace(recipe, model=replace(recipe.model, expert_parallel=args.expert_parallel))
    return recipe


def column_mapping(text: str | None) -> dict[str, str]:
    """`question:prompt,solution:answer` -> {"question": "prompt", "solution": "answer"}."""
    pairs = [item.split(":") for item in (text or "").split(",") if item.strip()]
    if any(len(pair) != 2 or not all(part.strip() for part in pair) for pair in pairs):
        raise RecipeError(
            f"--columns {text}: expected THEIRS:OURS[,THEIRS:OURS...], e.g. question:prompt"
        )
    return {theirs.strip(): ours.strip() for theirs, ours in pairs}


def rewards_of(names: str) -> list[RewardSpec]:
    return [RewardSpec(name.strip()) for name in names.split(",") if name.strip()]


def run_recipe(recipe) -> int:
    """Run an EvalRecipe: sample, score, report, write eval.json and samples.jsonl."""
    from moetune.rl.evaluation import evaluate_recipe, format_summary, is_main_process

    report = evaluate_recipe(recipe)
    if is_main_process():
        print(format_summary(report))
        print(f"wrote {Path(recipe.eval.output_dir) / 'eval.json'} and samples.jsonl")
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="pass@k and mean reward of a model on held-out problems",
        description=__doc__.split("\n\n")[0] + " Completions come from moetune's native "
        "generate or a vLLM engine (--backend).",
    )
    parser.add_argument("recipe", nargs="?", help="an eval recipe (YAML); or use the flags below")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key.sub=value")
    parser.add_argument("--model", help="checkpoint folder (with tokenizer.json)")
    parser.add_argument("--adapter", help="LoRA adapter folder to apply")
    parser.add_argument(
        "--data",
        help="a hub data set id, a folder (hub layout or save_to_disk), a "
        ".jsonl/.json/.parquet/.csv/.arrow file, builtin:arithmetic or builtin:humaneval",
    )
    parser.add_argument("--subset", help="the data set's subset (hub config name), e.g. main")
    parser.add_argument("--revision", help="the hub data set's branch, tag or commit")
    parser.add_argument(
        "--columns",
        help="rename the data set's columns onto ours (prompt, answer, "
        "tests), e.g. question:prompt,solution:answer",
    )
    parser.add_argument(
        "--prompt-format",
        help="build each prompt from the row's columns, e.g. "
        "'{question} Give the answer after ####.'",
    )
    parser.add_argument(
        "--answer-format",
        default="none",
        help="how the gold `answer` is written: "
        "none, gsm8k (after ####), boxed (last \\boxed{}), or module:function",
    )
    parser.add_argument("--reward", help="reward name(s), comma separated")
    parser.add_argument(
        "--backend",
        choices=("native", "vllm"),
        help="sampler: moetune's generate, or a vLLM engine (default native; "
        "without --data, the run's rollout engine)",
    )
    parser.add_argument(
        "--speculative-tokens",
        type=int,
        help="draft this many tokens per round with the model's MTP modules and verify them "
        "in one forward (speculative decoding: the same samples' distribution, faster); "
        "default 0 (off); without --data, a GRPO run's rollout.speculative_tokens",
    )
    parser.add_argument(
        "--n", type=int, help="samples per problem = k (default 4; without --data, 1)"
    )
    parser.add_argument("--temperature", type=float, help="default 1.0; without --data, 0 (greedy)")
    parser.add_argument("--top-p", type=float, help="default 1.0")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="default 64; without --data, a GRPO run's rollout.max_new_tokens",
    )
    parser.add_argument("--limit", type=int, help="evaluate the first N problems")
    parser.add_argument(
        "--split",
        help="the data set's split (default test; without --data, the run's held-out split)",
    )
    parser.add_argument(
        "--pass-threshold",
        type=float,
        help="weighted reward at which a sample counts as passing (default 1.0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--expert-parallel",
        type=int,
        metavar="N",
        help="shard the routed experts over groups of N processes (native backend, under "
        "accelerate launch or torchrun); the problems are shared out over every process",
    )
    parser.add_argument(
        "--output", default="eval_out", help="folder for eval.json and samples.jsonl"
    )
    parser.set_defaults(func=run)
