"""Data-parallel GRPO: two gloo ranks, each updating on half of the groups, take the same
optimizer step as one process holding them all; `accelerate launch --num_processes 2` trains,
writes once, checkpoints every rank's position and resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetune.finetune.model_loading import load_model, load_tokenizer
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rl.data_parallel import DataParallel
from moetune.rl.grpo import Groups, GRPOTrainer
from moetune.rl.rollout import Rollout

ROOT = Path(__file__).parent.parent
LOSSES = ("dapo", "grpo")
TINY = ["model.path=null", "model.config=tiny_arith", "model.tokenizer=char",
        "rollout.backend=native", "rollout.max_new_tokens=8", "rollout.max_model_len=64",
        "training.prompts_per_step=4", "algorithm.group_size=4", "eval.every=0",
        "training.disable_tqdm=true", "training.learning_rate=1e-3", "training.report_to=[]"]


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


def fresh_model(loss: str):
    torch.manual_seed(0)
    recipe = load_recipe(resolve("grpo/arith_tiny"), [*TINY, f"algorithm.loss={loss}",
                                                      "training.micro_batch_size=3"])
    return recipe, load_model(recipe.model)


def updated_weights(groups: Groups, parallel: DataParallel, loss: str) -> tuple[dict, float]:
    recipe, model = fresh_model(loss)
    trainer = GRPOTrainer(recipe, model, load_tokenizer(recipe.model), None, None, parallel)
    share = Groups(parallel.shard(groups.problems), parallel.shard(groups.rollouts),
                   groups.rewards[parallel.rank::parallel.world_size], {}, 0, 0, 1)
    metrics = trainer.update(share)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics["loss"]


def rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {loss: updated_weights(fixed_groups(4, 4), DataParallel(rank, 2), loss) for loss in LOSSES}
    both, one, none = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    both.grad = torch.full((2,), rank + 1.0)
    one.grad = torch.ones(2) if rank == 0 else None  # an expert only rank 0's tokens reached
    DataParallel(rank, 2).sum_gradients([both, one, none])
    results["sums"] = (both.grad.tolist(), one.grad.tolist(), none.grad)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_two_ranks_take_the_single_process_step(tmp_path):
    """dapo divides by the batch's tokens, grpo by its sequences: both counted over all ranks."""
    mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path / "ranks.pt")), nprocs=2)
    parallel = torch.load(tmp_path / "ranks.pt")
    assert parallel["sums"] == ([3.0, 3.0], [1.0, 1.0], None)  # no gradient anywhere: still None
    for loss in LOSSES:
        parallel_weights, parallel_loss = parallel[loss]
        single_weights, single_loss = updated_weights(fixed_groups(4, 4), DataParallel(), loss)
        assert abs(parallel_loss - single_loss) < 1e-6, (loss, parallel_loss, single_loss)
        for name, tensor in single_weights.items():
            # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, a summation-order
            # difference in g moves a weight by ~1e-6; a wrong gradient moves it by ~lr = 1e-3.
            torch.testing.assert_close(parallel_weights[name], tensor, rtol=1e-4, atol=1e-5)
        initial = fresh_model(loss)[1].state_dict()
        assert sum(not torch.equal(initial[k], v) for k, v in single_weights.items()) > 10


def launch(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    accelerate = Path(sys.executable).parent / "accelerate"
    return subprocess.run(
        [str(accelerate), "launch", "--config_file", "recipes/accelerate/ddp.yaml",
         "--num_processes", "2", "--main_process_port", "29531",
         "-m", "moetune.recipes", "run", "grpo/arith_tiny", *TINY,
         "rewards=[{name: format}, {name: math_accuracy}]", "algorithm.dynamic_sampling=false",
         "training.save_steps=2", f"training.output_dir={out}", *overrides],
        check=False, capture_output=True, text=True, timeout=500, env=env, cwd=ROOT)


def test_accelerate_launch_two_processes_trains_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "dp"
    done = launch(out, "training.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished step 2") == 1  # the main process reports, once
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["groups_used"] == 4  # 2 prompts on each of the 2 ranks
    state = torch.load(out / "checkpoint-2" / "trainer.pt", weights_only=False)
    assert [rank["stream"]["cursor"] for rank in state["ranks"]] == [4, 4]  # each rank's position
    resumed = launch(out, "training.max_steps=3", "training.resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
