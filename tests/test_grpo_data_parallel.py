"""Data-parallel GRPO: two gloo ranks, each updating on its share of the groups, take the same
optimizer steps as one process holding them all, with the replicated engine (DDP), DeepSpeed
ZeRO-2/3 and FSDP2, and their checkpoints restore exactly; `accelerate launch --num_processes 2`
(zero3.yaml: the launcher's process group, DeepSpeed from its config) trains on remote
rollout engines, writes once and checkpoints every rank's prompt position and optimizer
shard. A resumed run repeating the uninterrupted one is tests/test_grpo.py's (the same code,
one process)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_rollout_remote import KEY, Server
from tiny_configs import save_biased_tiny_arith

from moetune.config.build import RecipeError
from moetune.model import DeepseekV3ForCausalLM
from moetune.model.gathering import gathered, whole
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rl.collector import Groups
from moetune.rl.data_parallel import DataParallel
from moetune.rl.engine_weights import weight_stream
from moetune.rl.grpo import GRPOTrainer, adapter_sync_everywhere
from moetune.rl.rollout import Rollout
from moetune.training.model_loading import attach_lora, load_model, load_tokenizer

pytestmark = pytest.mark.integration  # accelerate launches

ROOT = Path(__file__).parent.parent
TINY = [
    "model.path=null",
    "model.config=tiny_arith",
    "model.tokenizer=char",
    "rollout.backend=native",
    "rollout.max_new_tokens=8",
    "rollout.max_model_len=64",
    "training.prompts_per_step=4",
    "algorithm.group_size=4",
    "eval.every=0",
    "training.disable_tqdm=true",
    "training.learning_rate=1e-3",
    "training.report_to=[]",
]


def fixed_groups(count: int, n: int) -> Groups:
    """`count` groups of n random completions with random rewards (the same on every rank)."""
    generator = torch.Generator().manual_seed(7)
    rollouts = []
    for _ in range(count):
        prompt = torch.randint(3, 90, (5,), generator=generator).tolist()
        group = []
        for _ in range(n):
            length = int(torch.randint(2, 9, (1,), generator=generator))
            ids = torch.randint(3, 90, (length,), generator=generator).tolist()
            group.append(Rollout(prompt, ids, "", "length", [-1.0] * length))
        rollouts.append(group)
    rewards = torch.rand(count, n, generator=generator)
    return Groups([{}] * count, rollouts, rewards, {}, count, 0, 1)


def fresh_model(loss: str, *overrides: str):
    torch.manual_seed(0)
    recipe = load_recipe(
        resolve("grpo/arith_tiny"),
        [*TINY, f"algorithm.loss={loss}", "training.micro_batch_size=3", *overrides],
    )
    return recipe, load_model(recipe.model)


def new_trainer(parallel: DataParallel, loss: str, *overrides: str) -> GRPOTrainer:
    recipe, model = fresh_model(loss, *overrides)
    spec = attach_lora(model, recipe.lora, recipe.training.seed)
    return GRPOTrainer(recipe, model, load_tokenizer(recipe.model), spec, None, parallel)


def share_of(groups: Groups, rows: slice) -> Groups:
    return Groups(groups.problems[rows], groups.rollouts[rows], groups.rewards[rows], {}, 0, 0, 1)


def full_weights(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    model = trainer.model
    with gathered(model, list(model.modules())):  # ZeRO-3 and FSDP2 hold shards
        return {k: whole(v).clone() for k, v in model.state_dict(keep_vars=True).items()}


def updated_weights(
    groups: Groups, parallel: DataParallel, loss: str, *overrides: str
) -> tuple[dict, dict]:
    """(weights, metrics) after one update on every world_size-th group from the rank."""
    trainer = new_trainer(parallel, loss, *overrides)
    metrics = trainer.updater.update(
        share_of(groups, slice(parallel.rank, None, parallel.world_size))
    )
    return full_weights(trainer), metrics


REINFORCE_PP = "algorithm.advantage=reinforce_pp"
KL = "algorithm.beta=0.04"  # a frozen reference model (sharded too), which the second update feels


def two_updates(parallel: DataParallel, rows: slice, folder: Path, *overrides: str) -> dict:
    """Two dapo updates on this rank's `rows` of the groups with a checkpoint between them:
    {"weights", "metrics"} after the second, and "resumed": the weights after a fresh trainer
    restored from the checkpoint took the second update."""
    share = share_of(fixed_groups(4, 4), rows)
    trainer = new_trainer(parallel, "dapo", KL, *overrides)
    if "model.expert_parallel=2" in overrides:  # each rank holds half of every layer's experts
        moe = trainer.model.model.layers[1].mlp
        assert (moe.expert_parallel.first, moe.experts.num_experts) == (8 * parallel.rank, 8)
    trainer.updater.update(share)
    trainer.checkpointer.save(folder, 1)
    result = {"metrics": trainer.updater.update(share), "weights": full_weights(trainer)}
    # what a weight sync streams, one block gathered at a time from the shards
    result["stream"] = {n: t.clone() for n, t in weight_stream(trainer.model, trained_only=True)}
    restored = new_trainer(parallel, "dapo", KL, *overrides)
    restored.checkpointer.load(folder)
    restored.updater.update(share)
    return result | {"resumed": full_weights(restored)}


def assert_same_step(parallel: tuple[dict, dict], single: tuple[dict, dict]) -> None:
    (parallel_weights, parallel_metrics), (single_weights, single_metrics) = parallel, single
    assert abs(parallel_metrics["loss"] - single_metrics["loss"]) < 1e-6
    assert parallel_metrics["grad_norm"] == pytest.approx(single_metrics["grad_norm"], rel=1e-5)
    for name, tensor in single_weights.items():
        # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, a summation-order
        # difference in g moves a weight by ~1e-6; a wrong gradient moves it by ~lr = 1e-3.
        torch.testing.assert_close(parallel_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


# What `accelerate launch --config_file recipes/accelerate/<name>.yaml` tells the processes.
LAUNCHERS = {
    "ddp": {},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
}


# model.expert_parallel: 2 over the 2 ranks (DDP for the rest), full fine-tuning and LoRA, at
# the tiny recipe's own learning rate, where they must match one process to 1e-6
LORA = ("lora.rank=4", "lora.components=[attention, routed_experts]")
RECIPE_LR = "training.learning_rate=2e-5"  # grpo/arith_tiny's
EXPERT_PARALLEL = {
    "ep": ("model.expert_parallel=2", RECIPE_LR),
    "ep-lora": ("model.expert_parallel=2", RECIPE_LR, *LORA),
}


def rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        DS_ACCELERATOR="cpu",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29547",
    )
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    parallel = DataParallel(rank, 2)
    results = {"grpo": updated_weights(fixed_groups(4, 4), parallel, "grpo")}
    # REINFORCE++ normalises advantages over the whole batch: both ranks' groups
    results["reinforce_pp"] = updated_weights(fixed_groups(4, 4), parallel, "grpo", REINFORCE_PP)
    both, one, none = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    both.grad = torch.full((2,), rank + 1.0)
    one.grad = torch.ones(2) if rank == 0 else None  # an expert only rank 0's tokens reached
    parallel.sum_gradients([both, one, none])
    results["sums"] = (both.grad.tolist(), one.grad.tolist(), none.grad)
    # What each rank's pool streams (its `adapter`: the pool's decision, stood in for here):
    # the same kind everywhere, or a RecipeError on every rank (none left waiting).
    spec = object()
    agreed = adapter_sync_everywhere(parallel, SimpleNamespace(adapter=spec))
    follower = adapter_sync_everywhere(parallel, SimpleNamespace(adapter=spec) if rank else None)
    try:
        adapter_sync_everywhere(parallel, SimpleNamespace(adapter=spec if rank else None))
        mixed = None
    except RecipeError as error:
        mixed = str(error)
    results["sync_kinds"] = (agreed, follower, mixed)
    for name, launcher in LAUNCHERS.items():
        for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
            os.environ.pop(key, None)
        os.environ.update(launcher)
        # Rank 0 takes 3 groups, rank 1 one: 4 micro-batches against 2, so under sharding
        # rank 1 pads with idle passes to keep the collectives in step.
        results[name] = two_updates(
            parallel, slice(0, 3) if rank == 0 else slice(3, 4), Path(out).parent / name
        )
    for launcher in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(launcher, None)
    for name, overrides in EXPERT_PARALLEL.items():  # each rank runs half of the experts
        results[name] = two_updates(
            parallel, slice(0, 3) if rank == 0 else slice(3, 4), Path(out).parent / name, *overrides
        )
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_every_launcher_takes_the_single_process_steps_and_resumes_exactly(tmp_path):
    """Two ranks on unequal shares of the groups, under DDP, ZeRO-2, ZeRO-3, FSDP2 and expert
    parallelism (2 ranks sharing out the experts; full and LoRA), with a KL reference (LoRA:
    the adapter-disabled policy): the steps of one process holding every group (dapo divides
    by the tokens of all ranks; grpo, checked under DDP, by their sequences; under DDP too,
    reinforce_pp advantages normalised over both ranks' groups). Each launcher's checkpoint
    (trainer.pt; DeepSpeed's per-rank shards; torch.distributed.checkpoint; each
    expert-parallel rank's own experts and optimizer file) restores the weights and Adam
    moments: the next update lands on the same weights."""
    mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path / "ranks.pt")), nprocs=2)
    parallel = torch.load(tmp_path / "ranks.pt", weights_only=False)
    assert parallel["sums"] == ([3.0, 3.0], [1.0, 1.0], None)  # no gradient anywhere: still None
    agreed, follower, mixed = parallel["sync_kinds"]
    assert agreed and follower and "rollout.lora_sync: merged" in mixed
    assert_same_step(parallel["grpo"], updated_weights(fixed_groups(4, 4), DataParallel(), "grpo"))
    single = updated_weights(fixed_groups(4, 4), DataParallel(), "grpo", REINFORCE_PP)
    assert_same_step(parallel["reinforce_pp"], single)
    single = two_updates(DataParallel(), slice(0, 4), tmp_path / "single")
    assert single["metrics"]["kl"] > 1e-4  # the policy has moved off the reference
    initial = fresh_model("dapo")[1].state_dict()
    assert sum(not torch.equal(initial[k], v) for k, v in single["weights"].items()) > 10
    single_ep = two_updates(DataParallel(), slice(0, 4), tmp_path / "single-ep", RECIPE_LR)
    single_lora = two_updates(
        DataParallel(), slice(0, 4), tmp_path / "single-lora", RECIPE_LR, *LORA
    )
    baselines = {name: single for name in LAUNCHERS} | {"ep": single_ep, "ep-lora": single_lora}
    for name, baseline in baselines.items():
        assert_same_step(
            (parallel[name]["weights"], parallel[name]["metrics"]),
            (baseline["weights"], baseline["metrics"]),
        )
        if name in EXPERT_PARALLEL:  # (at lr 1e-3 Adam's first step amplifies float32 noise)
            for key, tensor in baseline["weights"].items():
                torch.testing.assert_close(
                    parallel[name]["weights"][key], tensor, rtol=0, atol=1e-6, msg=f"{name}: {key}"
                )
        for key, tensor in parallel[name]["weights"].items():
            torch.testing.assert_close(
                parallel[name]["resumed"][key], tensor, rtol=0, atol=1e-7, msg=f"{name}: {key}"
            )
        assert parallel[name]["stream"].keys() == baseline["stream"].keys()
        for key, tensor in baseline["stream"].items():
            torch.testing.assert_close(
                parallel[name]["stream"][key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}"
            )
    for baseline in (single, single_ep, single_lora):
        for key, tensor in baseline["weights"].items():
            torch.testing.assert_close(baseline["resumed"][key], tensor, rtol=0, atol=0, msg=key)
    # LoRA: the stream holds the merged attention and expert weights (the adapters' sources)
    assert any(".experts.5.down_proj" in key for key in single_lora["stream"])


def launch(out: Path, *overrides: str, config: str = "zero3") -> list[dict]:
    """`accelerate launch` of grpo/arith_tiny with recipes/accelerate/{config}.yaml on 2 CPU
    processes (zero3: no ACCELERATE_USE_CPU, the launcher's own DeepSpeed settings; ddp:
    ACCELERATE_USE_CPU, as that config's header says for CPU); the metrics."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MOETUNE_ROLLOUT_KEY=KEY)
    env.pop("ACCELERATE_USE_CPU", None)
    if config == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            f"recipes/accelerate/{config}.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            "29531",
            "-m",
            "moetune.recipes",
            "run",
            "grpo/arith_tiny",
            *TINY,
            "algorithm.dynamic_sampling=false",
            "training.max_steps=2",
            "training.save_steps=1",
            f"training.output_dir={out}",
            *overrides,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished step 2") == 1  # the main process reports, once
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def digits_reward(folder: Path) -> str:
    """A `rewards=` override: the share of digits in a completion (the tiny random model's
    completions vary in it, so groups have advantages)."""
    rewards = folder / "rewards.py"
    rewards.write_text(
        "def digits(prompts, completions, **columns):\n"
        "    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n"
    )
    return f"rewards=[{{name: '{rewards}:digits'}}]"


def test_zero3_trainers_train_on_remote_engines_and_checkpoint_every_rank(tmp_path):
    """Each of the 2 processes samples from a `moetune rollout serve` engine of its own, which
    starts from other weights: the gathered ZeRO-3 weights reach it over gloo on connect and
    after each step (the sampler's logprobs equal the trainer's)."""
    served = save_biased_tiny_arith(tmp_path / "served", seed=1)
    servers = [Server(served, tmp_path) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        out = tmp_path / "run"
        rows = launch(
            out,
            digits_reward(tmp_path),
            f"rollout.remote=[{','.join(server.address for server in servers)}]",
        )
    finally:
        for server in servers:
            server.stop()
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["groups_used"] == 4  # 2 prompts on each of the 2 ranks
    assert all(abs(r["mismatch_kl"]) < 1e-4 and r["grad_norm"] > 0 for r in rows)
    # the main process wrote every rank's samples to rollouts.jsonl, groups numbered over ranks;
    # the native engines' routes agree with the trainer's own routers (ZeRO-3, float32)
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rank"], r["group"]) for r in samples] == [
        (step, group // 2, group) for step in (1, 2) for group in range(4) for _ in range(4)
    ]
    assert [r["policy_version"] for r in samples] == [0] * 16 + [1] * 16
    assert all(r["router_agreement"] > 0.99 for r in samples)
    assert all(r["router_agreement"] > 0.99 for r in rows)
    state = torch.load(out / "checkpoint-1" / "trainer.pt", weights_only=False)
    assert [rank["stream"]["cursor"] for rank in state["ranks"]] == [2, 2]  # each rank's position
    # every rank's shard of the optimizer state, in DeepSpeed's ZeRO-3 layout: each rank's fp32
    # master weights are its half of the trained parameters (fewer than half of all: the
    # router and MTP stay frozen), which one rank could not hold unpartitioned
    shards = [
        torch.load(shard, weights_only=False)
        for shard in sorted((out / "checkpoint-1" / "deepspeed").glob("*optim_states.pt"))
    ]
    assert len(shards) == 2 and all(
        s["ds_config"]["zero_optimization"]["stage"] == 3 for s in shards
    )
    held = [sum(t.numel() for t in s["optimizer_state_dict"]["fp32_flat_groups"]) for s in shards]
    total = sum(p.numel() for p in DeepseekV3ForCausalLM.from_pretrained(out).parameters())
    assert held[0] == held[1] and 0 < held[0] <= total / 2, (held, total)
    assert (out / "model-00001-of-00001.safetensors").exists()


def test_expert_parallel_grpo_shares_one_pool_and_saves_every_expert(tmp_path):
    """`model.expert_parallel: 2` over 2 processes, LoRA on attention and routed experts, the
    two processes sharing one rollout pool (`rollout.processes_per_pool: 2`): each rank holds
    half of every layer's experts; rank 0's native engine, the only one, gets the whole
    adapter (the experts' part gathered over both ranks) and samples exactly from the
    trainer's policy, for both ranks, which each train on their share of the groups; the
    held-out eval runs on it; each rank writes its own optimizer file and the saved adapter
    holds every expert."""
    out = tmp_path / "run"
    rows = launch(
        out,
        "model.expert_parallel=2",
        "rollout.processes_per_pool=2",
        *LORA,
        digits_reward(tmp_path),
        "training.learning_rate=1e-2",
        "eval.every=2",
        "eval.limit=6",
        config="ddp",
    )
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["groups_used"] == 4 for r in rows)  # rank 0 sampled the 2 x 2 prompts
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert {(r["step"], r["rank"]) for r in samples} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert all(abs(r["mismatch_kl"]) < 1e-4 and r["grad_norm"] > 0 for r in rows)
    assert all(r["router_agreement"] > 0.99 for r in rows)
    assert all(r["sync_megabytes"] > 0 for r in rows)  # the adapter, each step
    assert 0 <= rows[1]["eval/accuracy"] <= 1
    checkpoint = out / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.glob("optimizer*.pt")) == [
        "optimizer.rank0-of-2.pt",
        "optimizer.rank1-of-2.pt",
    ]
    saved = load_file(out / "adapter_model.safetensors")
    experts = {int(k.split(".experts.")[1].split(".")[0]) for k in saved if ".experts." in k}
    assert experts == set(range(16))  # both ranks' experts, in one file


def test_async_grpo_with_dynamic_sampling_and_routing_replay_under_a_two_process_launch(
    tmp_path,
):
    """rollout.max_staleness 1 under `accelerate launch` (ZeRO-3, 2 processes, a local native
    engine each): step 2 learns from samples its engines generated while step 1 trained, with
    dynamic sampling and routing replay on; checkpoint-1 holds each rank's queued round."""
    out = tmp_path / "run"
    rows = launch(
        out,
        digits_reward(tmp_path),
        "rollout.max_staleness=1",
        "algorithm.dynamic_sampling=true",
        "algorithm.routing_replay=true",
    )
    assert [r["staleness_max"] for r in rows] == [0, 1]
    assert rows[0]["update_overlap_s"] > 0 and all(r["grad_norm"] > 0 for r in rows)
    state = torch.load(out / "checkpoint-1" / "trainer.pt", weights_only=False)
    queued = [rank["lookahead"] for rank in state["ranks"]]
    assert [[entry["step"] for entry in rank] for rank in queued] == [[2], [2]]
    assert all(len(rank[0]["rollouts"]) == 2 for rank in queued)  # each rank's 2 prompts
