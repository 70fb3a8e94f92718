"""Evaluation: sample k completions per problem, score them with the training rewards,
report pass@1 / pass@k (unbiased estimator), mean reward and mean length.

`evaluate_recipe(EvalRecipe)` loads the problems and the model and writes `eval.json`
(summary) and `samples.jsonl` (one row per problem) to `eval.output_dir`; the `moetune eval`
command (moetune.recipes.evaluate) composes that recipe from flags, a YAML file or a training
run. A sample passes when its weighted reward reaches `pass_threshold` (1.0: fully correct).
Completions come from a sampler `(prompts, n) -> [[completion] * n per prompt]`: moetune's own
`generate` (native) or a vLLM RolloutPool engine, the one GRPO samples with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from moetune.data.problems import load_problems
from moetune.data.prompt_template import warn_on_mismatch
from moetune.rewards import RewardSpec, score
from moetune.rl.pass_at_k import pass_at_k

if TYPE_CHECKING:
    from moetune.model.expert_parallel import ExpertParallelGroups

EVAL_KEY = "eval.speculative_tokens (--speculative-tokens)"

Sampler = Callable[[list[str], int], list[list[str]]]


@dataclass
class EvalReport:
    k: int
    problems: int
    pass_at_1: float
    pass_at_k: float
    mean_reward: float
    mean_length: float  # characters per completion
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def of_rows(cls, rows: list[dict], k: int) -> EvalReport:
        """The report of per-problem rows (as `evaluate` makes them) of k samples each."""
        count = max(len(rows), 1)
        lengths = [len(c) for r in rows for c in r["completions"]]
        return cls(
            k=k,
            problems=len(rows),
            pass_at_1=sum(r["pass@1"] for r in rows) / count,
            pass_at_k=sum(r[f"pass@{k}"] for r in rows) / count,
            mean_reward=sum(sum(r["rewards"]) for r in rows) / max(len(lengths), 1),
            mean_length=sum(lengths) / max(len(lengths), 1),
            rows=rows,
        )

    def summary(self) -> dict:
        return {
            "pass@1": self.pass_at_1,
            "pass@k": self.pass_at_k,
            "k": self.k,
            "mean_reward": self.mean_reward,
            "mean_length": self.mean_length,
            "problems": self.problems,
        }


def evaluate(
    problems: list[dict],
    sampler: Sampler,
    rewards: list[RewardSpec],
    n: int,
    pass_threshold: float = 1.0,
    batch_size: int = 16,
    show: Callable[[str], str] = str,
    progress: bool = True,
) -> EvalReport:
    """Score n samples of every problem; pass@k uses k = n. `show` turns a problem's prompt
    into the text the model sees (the recipe's template); rewards get the plain prompt."""
    rows = []
    batches = range(0, len(problems), batch_size)
    for start in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        batch = problems[start : start + batch_size]
        samples = sampler([show(p["prompt"]) for p in batch], n)
        prompts = [p["prompt"] for p, group in zip(batch, samples) for _ in group]
        completions = [c for group in samples for c in group]
        columns = {
            key: [p.get(key) for p, group in zip(batch, samples) for _ in group]
            for key in sorted({k for p in batch for k in p} - {"prompt"})
        }
        result = score(rewards, prompts, completions, columns)
        for i, (problem, group) in enumerate(zip(batch, samples)):
            totals = result.totals[i * n : (i + 1) * n]
            correct = sum(t >= pass_threshold for t in totals)
            rows.append(
                {
                    "prompt": problem["prompt"],
                    "completions": group,
                    "rewards": totals,
                    "correct": correct,
                    "pass@1": pass_at_k(n, correct, 1),
                    f"pass@{n}": pass_at_k(n, correct, n),
                }
            )
    return EvalReport.of_rows(rows, n)


def evaluate_share(
    problems: list[dict],
    sampler: Sampler,
    rewards: list[RewardSpec],
    n: int,
    pass_threshold: float = 1.0,
    show: Callable[[str], str] = str,
) -> EvalReport:
    """`evaluate` over the ranks of a launch (expert parallelism): of W ranks, rank r samples
    and scores problems r, r + W, ...; a share is padded with repeats of the first problem to
    ceil(N / W), so that every rank runs as many batches (each forward is collective), and the
    repeats are dropped. Every rank returns the report of all N problems, rows in order."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    share = problems[rank::world]
    padded = share + problems[:1] * (-(-len(problems) // world) - len(share))
    report = evaluate(padded, sampler, rewards, n, pass_threshold, show=show, progress=rank == 0)
    shares: list[list[dict]] = [[] for _ in range(world)]
    dist.all_gather_object(shares, report.rows[: len(share)])
    return EvalReport.of_rows([shares[i % world][i // world] for i in range(len(problems))], n)


def pool_sampler(pool, sampling) -> Sampler:
    """Sample through a RolloutPool's engines (vLLM or native) with a SamplingSpec."""

    def sample(prompts: list[str], n: int) -> list[list[str]]:
        ids = [pool.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        return [[r.text for r in group] for group in pool.generate(ids, n, sampling)]

    return sample


def native_sampler(
    model_dir: str,
    adapter: str | None,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    dtype: str = "float32",
    speculative_tokens: int = 0,
    expert_parallel: ExpertParallelGroups | None = None,
) -> Sampler:
    """Sample with moetune's own generate; the tokenizer is the model folder's tokenizer.json.
    speculative_tokens: MTP drafts per round (speculative decoding; the same distribution).
    expert_parallel: this rank holds its share of the routed experts, and samples with seed
    `seed` + its global rank (a launch's ranks draw apart)."""
    import torch
    from tokenizers import Tokenizer

    from moetune.model import DeepseekV3ForCausalLM

    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if not tokenizer_file.exists():
        raise FileNotFoundError(f"--model {model_dir}: no tokenizer.json to encode prompts with")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = DeepseekV3ForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), expert_parallel=expert_parallel
    )
    if adapter:
        from moetune.model.adapters import load_adapter

        load_adapter(model, adapter)
    from moetune.model.speculative import check_speculative_tokens

    check_speculative_tokens(speculative_tokens, model.config, model_dir, EVAL_KEY)
    eos = model.config.eos_token_id
    stop = eos if isinstance(eos, list) else [eos]
    rank = torch.distributed.get_rank() if expert_parallel is not None else 0
    generator = torch.Generator().manual_seed(seed + rank)

    def sample(prompts: list[str], n: int) -> list[list[str]]:
        ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts for _ in range(n)]
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=stop,
            generator=generator,
            speculative_tokens=speculative_tokens,
        )
        texts = [tokenizer.decode([t for t in seq if t not in stop]) for seq in out.sequences]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    return sample


def evaluate_with_pool(recipe, problems: list[dict], show: Callable[[str], str]) -> EvalReport:
    """Sample with a vLLM RolloutPool engine; an adapter is merged into a temporary
    checkpoint first (vLLM on CPU cannot apply LoRA)."""
    import tempfile

    from moetune.model import load_config
    from moetune.model.speculative import check_speculative_tokens
    from moetune.rl.rollout import RolloutPool, SamplingSpec
    from moetune.training.merge import merge

    settings = recipe.eval
    config = load_config(recipe.model.path)
    check_speculative_tokens(settings.speculative_tokens, config, recipe.model.path, EVAL_KEY)
    eos = config.eos_token_id
    sampling = SamplingSpec(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        stop_token_ids=eos if isinstance(eos, list) else [eos],
        seed=recipe.data.seed,
    )
    with tempfile.TemporaryDirectory(prefix="moetune-eval-") as merged:
        model_dir = recipe.model.path
        if recipe.model.adapter:
            merge(recipe.model.path, recipe.model.adapter, merged, recipe.model.dtype)
            model_dir = merged
        with RolloutPool(
            model_dir,
            backend="vllm",
            dtype=recipe.model.dtype,
            max_model_len=min(config.max_position_embeddings, 4096),
            seed=recipe.data.seed,
            speculative_tokens=settings.speculative_tokens,
        ) as pool:
            return evaluate(
                problems,
                pool_sampler(pool, sampling),
                recipe.rewards,
                settings.n,
                settings.pass_threshold,
                batch_size=64,
                show=show,
            )


def template_renderer(
    template, model_dir: str, source: str, arithmetic=None
) -> Callable[[str], str]:
    """prompt -> the text the model sees under `template` (the checkpoint's tokenizer;
    builtin:arithmetic's few-shot examples drawn with the ArithmeticSpec `arithmetic`)."""
    from moetune.data.prompt_template import few_shot_examples, render

    tokenizer = None
    if template.chat:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shots = few_shot_examples(template, source, arithmetic)
    return lambda prompt: render(prompt, template, tokenizer, shots)


def write_report(report: EvalReport, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(report.summary(), indent=2))
    with open(output / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in report.rows)


def format_summary(report: EvalReport) -> str:
    s = report.summary()
    width = max(len(key) for key in s)
    return "\n".join(
        f"  {key:<{width}}  {value:.4f}"
        if isinstance(value, float)
        else f"  {key:<{width}}  {value}"
        for key, value in s.items()
    )


def evaluate_recipe(recipe) -> EvalReport:
    """Sample and score an EvalRecipe's problems; write eval.json and samples.jsonl. With
    `model.expert_parallel` N (native backend, under accelerate launch / torchrun), every rank
    holds its share of the routed experts and samples its share of the problems
    (`evaluate_share`); rank 0 writes."""
    from moetune.config.build import RecipeError
    from moetune.data.arithmetic import arithmetic_spec

    if not recipe.model.path:
        raise RecipeError("model.path: an eval needs a checkpoint folder")
    for key, folder in (("model.path", recipe.model.path), ("model.adapter", recipe.model.adapter)):
        if folder and not Path(folder).is_dir():
            raise RecipeError(f"{key}: {folder}: no such folder")
    if not (Path(recipe.model.path) / "config.json").exists():
        raise RecipeError(
            f"model.path: {recipe.model.path}: no config.json (not a checkpoint folder)"
        )
    data, settings = recipe.data, recipe.eval
    arithmetic = arithmetic_spec(data.arithmetic)
    problems = load_problems(data, "data", "test", data.limit, data.seed, data.arithmetic)
    for folder in (recipe.model.adapter, recipe.model.path):
        if folder and warn_on_mismatch(folder, recipe.template):
            print(f"warning: {folder} was trained with another prompt template (see the log)")
            break
    show = template_renderer(recipe.template, recipe.model.path, data.source, arithmetic)
    if settings.backend == "vllm":
        try:
            report = evaluate_with_pool(recipe, problems, show)
        except ValueError as error:
            if EVAL_KEY not in str(error):
                raise
            raise RecipeError(str(error)) from None
    else:
        from moetune.model import load_config
        from moetune.training.model_loading import expert_parallel_groups_of

        size = recipe.model.expert_parallel
        groups = expert_parallel_groups_of(size, load_config(recipe.model.path))
        try:
            sampler = native_sampler(
                recipe.model.path,
                recipe.model.adapter,
                settings.temperature,
                settings.top_p,
                settings.max_new_tokens,
                data.seed,
                recipe.model.dtype,
                settings.speculative_tokens,
                groups,
            )
        except (FileNotFoundError, ValueError) as error:  # no tokenizer.json; no MTP module
            raise RecipeError(str(error)) from None
        scoring = (recipe.rewards, settings.n, settings.pass_threshold)
        if groups is None:
            report = evaluate(problems, sampler, *scoring, show=show)
        else:
            report = evaluate_share(problems, sampler, *scoring, show=show)
    if is_main_process():
        write_report(report, Path(settings.output_dir))
    return report


def is_main_process() -> bool:
    """Rank 0 of a launch (or no launch): the one that writes and prints."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
