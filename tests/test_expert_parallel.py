"""Expert parallelism on 2 CPU processes (gloo) against the single-process model.

Every rank builds the same full model (same seed), keeps a copy as the reference and shards
the other. Rank r feeds its own tokens (rows r of a shared batch); the reference sees both
ranks' tokens at once with loss = the mean of the ranks' losses, so: outputs match row for
row, replicated gradients averaged over ranks match (what DDP does), expert gradients match
the reference's slice directly, input gradients match times the world size.

One spawn runs every distributed check (imports cost seconds per process); each test reads
its check's outcome on both ranks.
"""

from __future__ import annotations

import copy
import json
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_configs import v2_lite_config, v3_config

from moetune.config.build import RecipeError
from moetune.config.schema import ModelSection
from moetune.model import DeepseekV3ForCausalLM, expert_parallel
from moetune.model.adapters import load_adapter_weights, save_adapter
from moetune.model.char_tokenizer import char_tokenizer
from moetune.model.expert_parallel import (
    ExpertParallelGroups,
    clip_grad_norm_,
    expert_parallel_groups,
    full_experts,
    group_ranks,
    shard_experts,
)
from moetune.model.fp8 import to_frozen_fp8
from moetune.model.lora import LoraSpec, apply_lora
from moetune.model.moe import MoE
from moetune.recipes.cli import build_parser, main
from moetune.recipes.evaluate import build_recipe
from moetune.recipes.evaluate import run as run_eval
from moetune.recipes.loader import load_recipe
from moetune.rl.evaluation import evaluate_recipe
from moetune.training.model_loading import load_model

WORLD = 2
RECIPES = Path(__file__).parent.parent / "recipes"
TOL = dict(rtol=1e-5, atol=1e-6)


def randomize(module: torch.nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
        for m in module.modules():
            if isinstance(m, MoE) and m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.normal_(0, 0.1)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / WORLD


def local_slice(sharded_moe: MoE) -> slice:
    shard = sharded_moe.expert_parallel
    return slice(shard.first, shard.first + shard.count)


class Mismatches(list):
    """Comparisons noted rather than raised, so that a rank that finds a difference still
    joins the collectives of the others; `check` raises at the end."""

    def close(self, actual, expected, what: str) -> None:
        try:
            torch.testing.assert_close(actual, expected, **TOL)
        except AssertionError as error:
            self.append(f"{what}: {error}")

    def check(self) -> None:
        assert not self, "\n".join(self)


def compare_grads(sharded: torch.nn.Module, full: torch.nn.Module, found: Mismatches) -> None:
    """Replicated parameters: the ranks' mean; routed experts and their adapters: this rank's
    slice of the full model's."""
    full_params = dict(full.named_parameters())
    experts = {}
    for name, m in sharded.named_modules():
        if isinstance(m, MoE) and m.expert_parallel is not None:
            prefix = f"{name}.experts." if name else "experts."
            experts[prefix] = (local_slice(m), m)
    for name, p in sharded.named_parameters():
        if not p.requires_grad:
            continue
        ref = full_params[name].grad
        owner = next((v for k, v in experts.items() if name.startswith(k)), None)
        if owner is None:
            found.close(mean_over_ranks(p.grad), ref, name)
        elif ".lora." in name:
            full_lora = dict(full.named_modules())[name.rsplit(".", 1)[0]]
            rows = owner[1].expert_parallel.first + owner[1].experts.lora.expert_ids
            slots = [full_lora.expert_ids.tolist().index(e) for e in rows.tolist()]
            found.close(p.grad, ref[slots], name)
        else:
            found.close(p.grad, ref[owner[0]], name)


# Checks run on every rank -------------------------------------------------------------
def check_moe_layer(rank: int, groups: ExpertParallelGroups) -> None:
    found = Mismatches()
    v3 = v3_config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2)
    for config, skewed in ((v3, False), (v3, True), (v2_lite_config(hidden_size=32), False)):
        torch.manual_seed(0)
        full = MoE(config)
        randomize(full)
        if skewed:  # every token picks experts 0-3: rank 1 receives no rows at all
            full.gate.e_score_correction_bias[:4] += 10.0
        sharded = shard_experts(copy.deepcopy(full), groups)
        x = torch.randn(WORLD, 5, config.hidden_size, requires_grad=True)
        probe = torch.randn(WORLD, 5, config.hidden_size)
        ref = full(x)
        (ref * probe).sum().div(WORLD).backward()
        mine_x = x.detach()[rank : rank + 1].clone().requires_grad_()
        out = sharded(mine_x)
        (out * probe[rank]).sum().backward()
        found.close(out[0], ref[rank].detach(), f"{config.model_type} output")
        found.close(mine_x.grad[0], x.grad[rank] * WORLD, f"{config.model_type} input grad")
        compare_grads(sharded, full, found)
    found.check()


def compare_losses_and_grads(rank: int, full, sharded, ids: torch.Tensor) -> Mismatches:
    """The full model's LM loss and gradients on all `ids` [2 * WORLD, S] against the
    sharded model's on this rank's two rows (losses averaged over ranks, as DDP would)."""
    ref = full(ids, labels=ids).loss
    ref.backward()
    mine = ids[2 * rank : 2 * rank + 2]
    loss = sharded(mine, labels=mine).loss
    loss.backward()
    found = Mismatches()
    found.close(mean_over_ranks(loss.detach()), ref.detach(), "loss")
    compare_grads(sharded, full, found)
    return found


def check_causal_lm(rank: int, groups: ExpertParallelGroups) -> None:
    config = v3_config(aux_loss_alpha=0.01)
    torch.manual_seed(0)
    full = DeepseekV3ForCausalLM(config).train()
    sharded = shard_experts(copy.deepcopy(full), groups)
    assert sharded.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8
    ids = torch.randint(0, config.vocab_size, (2 * WORLD, 7))
    found = compare_losses_and_grads(rank, full, sharded, ids)
    # clipping counts every expert once: the same norm and factor on every rank
    for name, p in sharded.named_parameters():
        if ".mlp.experts." not in name:
            p.grad = mean_over_ranks(p.grad)  # what DDP would leave
    ref_norm = torch.nn.utils.clip_grad_norm_(full.parameters(), 1e-3)
    norm = clip_grad_norm_(sharded, 1e-3)
    found.close(norm, ref_norm, "clipped gradient norm")
    compare_grads(sharded, full, found)  # clipped alike
    found.check()


def check_lora(rank: int, groups: ExpertParallelGroups, folder: str) -> None:
    """Adapters attached to the shards (each rank keeps its experts' share of adapters drawn
    for all), on an expert subset that leaves rank 1 without adapters in layer 1; loaded and
    saved from the shards, reading each rank's own rows and gathering the expert adapters
    alone (never the experts), from and into the same file as the full model's."""
    config = v3_config()
    spec = LoraSpec(rank=8, alpha=16.0, experts={1: [0, 2, 5], 2: [3, 9, 12, 15]})
    torch.manual_seed(0)
    full = DeepseekV3ForCausalLM(config)
    sharded = shard_experts(copy.deepcopy(full), groups)
    for model in (full, sharded):
        torch.manual_seed(1)
        apply_lora(model, spec)
    assert sharded.model.layers[1].mlp.experts.lora.expert_ids.tolist() == (
        [0, 2, 5] if rank == 0 else []
    )
    assert sharded.model.layers[2].mlp.experts.lora.expert_ids.tolist() == (
        [3] if rank == 0 else [1, 4, 7]
    )
    drawn = full.model.layers[2].mlp.experts.lora.down_A  # slots of experts 3, 9, 12, 15
    own = sharded.model.layers[2].mlp.experts.lora.down_A
    assert torch.equal(own, drawn[:1] if rank == 0 else drawn[1:])
    with torch.no_grad():
        for p in full.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    gather_slices = expert_parallel.gather_slices
    expert_parallel.gather_slices = None  # a load or save that gathered experts would call it
    try:
        if rank == 0:
            save_adapter(full, spec, f"{folder}/full_adapter")
        dist.barrier()
        load_adapter_weights(sharded, f"{folder}/full_adapter")
        save_adapter(sharded, spec, f"{folder}/sharded_adapter", write=rank == 0)
    finally:
        expert_parallel.gather_slices = gather_slices
    ids = torch.randint(0, config.vocab_size, (2 * WORLD, 6))
    full(ids, labels=ids).loss.backward()
    mine = ids[2 * rank : 2 * rank + 2]
    sharded(mine, labels=mine).loss.backward()
    found = Mismatches()
    compare_grads(sharded, full, found)
    found.check()
    if rank == 0:
        ours = load_file(f"{folder}/sharded_adapter/adapter_model.safetensors")
        theirs = load_file(f"{folder}/full_adapter/adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), key


def check_full_experts(rank: int, groups: ExpertParallelGroups, folder: str) -> None:
    torch.manual_seed(0)
    full = DeepseekV3ForCausalLM(v3_config())
    sharded = shard_experts(copy.deepcopy(full), groups)
    param = sharded.model.layers[1].mlp.experts.gate_up_proj
    with full_experts(sharded):
        gathered = sharded.state_dict()
        for name, tensor in full.state_dict().items():
            assert torch.equal(gathered[name], tensor), name
    # save_pretrained gathers one MoE layer at a time itself: every rank calls it, one writes
    sharded.save_pretrained(f"{folder}/saved", write=rank == 0)
    assert sharded.model.layers[1].mlp.experts.gate_up_proj is param
    assert param.shape[0] == 8 and sharded.model.layers[1].mlp.expert_parallel is not None
    dist.barrier()
    loaded = DeepseekV3ForCausalLM.from_pretrained(f"{folder}/saved")
    for name, tensor in full.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def check_fp8_frozen(rank: int, groups: ExpertParallelGroups) -> None:
    """Frozen FP8 experts (buffers, float8) shard and gather like dense ones."""
    torch.manual_seed(0)
    full = to_frozen_fp8(DeepseekV3ForCausalLM(v3_config()))
    sharded = shard_experts(copy.deepcopy(full), groups)
    assert sharded.model.layers[1].mlp.experts.gate_proj.shape[0] == 8
    found = compare_losses_and_grads(rank, full, sharded, torch.randint(0, 128, (2 * WORLD, 6)))
    with full_experts(sharded):
        gathered = sharded.state_dict()
    for name, tensor in full.state_dict().items():
        if not torch.equal(gathered[name].view(torch.uint8), tensor.view(torch.uint8)):
            found.append(f"{name} differs after gathering")
    found.check()


def check_data_parallel(rank: int, _: ExpertParallelGroups) -> None:
    """expert_parallel 1 with 2 ranks: every rank holds all experts, and the expert
    gradients are averaged over the data-parallel group; replicas start equal."""
    groups = expert_parallel_groups(1)
    assert (groups.ep_size, groups.dp_size, groups.ep_rank) == (1, WORLD, 0)
    torch.manual_seed(0)
    full = MoE(v3_config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2))
    randomize(full)
    sharded = copy.deepcopy(full)
    if rank == 1:  # a replica that differs: shard_experts broadcasts the DP group's first
        with torch.no_grad():
            sharded.experts.down_proj.add_(1.0)
    shard_experts(sharded, groups)
    x = torch.randn(WORLD, 5, 32)
    probe = torch.randn(WORLD, 5, 32)
    (full(x) * probe).sum().div(WORLD).backward()
    (sharded(x[rank : rank + 1])[0] * probe[rank]).sum().backward()
    found = Mismatches()
    compare_grads(sharded, full, found)
    found.check()


def check_load_model(rank: int, groups: ExpertParallelGroups, folder: str) -> None:
    path = f"{folder}/config.json"
    if rank == 0:
        v3_config().to_json_file(path)
    dist.barrier()
    full = load_model(ModelSection(config=path))
    sharded = load_model(ModelSection(config=path, expert_parallel=2))
    experts = sharded.model.layers[1].mlp.experts
    assert experts.num_experts == 8
    torch.testing.assert_close(
        experts.down_proj, full.model.layers[1].mlp.experts.down_proj[8 * rank : 8 * rank + 8]
    )
    with pytest.raises(RecipeError, match=r"model.expert_parallel.*4.*world size 2"):
        load_model(ModelSection(config=path, expert_parallel=4))
    with pytest.raises(RecipeError, match=r"model.expert_parallel: .* 3 must divide .* 16"):
        load_model(ModelSection(config=path, expert_parallel=3))
    # from a checkpoint, each rank reads its own experts (nothing gathered or broadcast)
    if rank == 0:
        full.save_pretrained(f"{folder}/checkpoint")
    dist.barrier()
    broadcast = expert_parallel.from_rank0
    expert_parallel.from_rank0 = None
    try:
        loaded = load_model(ModelSection(path=f"{folder}/checkpoint", expert_parallel=2))
    finally:
        expert_parallel.from_rank0 = broadcast
    state = loaded.state_dict()
    for name, tensor in full.state_dict().items():
        expected = tensor[8 * rank : 8 * rank + 8] if ".experts." in name else tensor
        assert torch.equal(state[name], expected), name
    assert loaded.model.layers[1].mlp.expert_parallel.first == 8 * rank


def check_generate(rank: int, groups: ExpertParallelGroups) -> None:
    """Greedy decoding on the shards equals the full model's, plain and speculative, with the
    ranks' prompts apart and rank 0 stopping early: its forwards go on, in step, until rank 1
    is done too."""
    torch.manual_seed(0)
    full = DeepseekV3ForCausalLM(v3_config()).eval()
    randomize(full)
    sharded = shard_experts(copy.deepcopy(full), groups)
    prompts = [[3, 9, 4], [5]] if rank else [[3, 9]]
    first = full.generate(prompts, max_new_tokens=3).sequences
    stop = [] if rank else [first[0][1]]  # rank 0 stops at its 2nd token
    for k in (0, 1, 2):
        options = dict(max_new_tokens=10, stop_token_ids=stop, speculative_tokens=k)
        expected = full.generate(prompts, **options)
        got = sharded.generate(prompts, **options)
        assert got.sequences == expected.sequences, (k, got.sequences, expected.sequences)
        for row, expected_row in zip(got.logprobs, expected.logprobs):
            torch.testing.assert_close(torch.tensor(row), torch.tensor(expected_row), **TOL)
    assert [len(s) for s in got.sequences] == ([10, 10] if rank else [2])


def check_eval(rank: int, groups: ExpertParallelGroups, folder: str) -> None:
    """`moetune eval` with model.expert_parallel 2 (the problems shared out over the ranks,
    one padded share) reports what one process reports: greedy, plain and speculative."""
    model_dir = f"{folder}/eval_model"
    if rank == 0:
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(v3_config(vocab_size=128, eos_token_id=1))
        randomize(model)
        model.save_pretrained(model_dir)
        char_tokenizer().save(f"{model_dir}/tokenizer.json")
    dist.barrier()
    for k in (0, 1):
        args = ["eval", "--model", model_dir, "--data", "builtin:arithmetic", "--reward"]
        args += ["math_accuracy", "--limit", "5", "--max-new-tokens", "6", "--temperature"]
        args += ["0", "--n", "1", "--speculative-tokens", str(k), "--expert-parallel"]
        reports = []
        for size in (1, 2):  # 1: the reference, every expert on each rank
            output = f"{folder}/eval_ep{size}_k{k}_rank{rank}"
            recipe = build_recipe(build_parser().parse_args([*args, str(size), "--output", output]))
            assert recipe.model.expert_parallel == size
            reports.append(evaluate_recipe(recipe))
        assert reports[1].rows == reports[0].rows, k
        assert reports[1].summary() == reports[0].summary() and reports[0].problems == 5
        assert Path(f"{folder}/eval_ep2_k{k}_rank{rank}/eval.json").exists() == (rank == 0)


CHECKS = {
    "moe_layer": check_moe_layer,
    "causal_lm": check_causal_lm,
    "lora": check_lora,
    "full_experts": check_full_experts,
    "fp8_frozen": check_fp8_frozen,
    "data_parallel": check_data_parallel,
    "load_model": check_load_model,
    "generate": check_generate,
    "eval": check_eval,
}


def worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(f"{folder}/store", WORLD),
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),
    )
    groups = expert_parallel_groups(WORLD)
    results = {}
    for name, check in CHECKS.items():
        try:
            if name in ("lora", "full_experts", "load_model", "eval"):
                check(rank, groups, folder)
            else:
                check(rank, groups)
            results[name] = "ok"
        except BaseException:  # noqa: BLE001 - pytest.fail too: every failure goes to the parent
            results[name] = traceback.format_exc()
        try:
            dist.barrier()
        except RuntimeError:  # a check left the ranks out of step: the rest cannot run
            results[name] += "\n(the ranks fell out of step here; later checks skipped)"
            break
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[str]]:
    folder = tmp_path_factory.mktemp("expert_parallel")
    mp.spawn(worker, args=(str(folder),), nprocs=WORLD)
    per_rank = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [ranks.get(name, "not run") for ranks in per_rank] for name in CHECKS}


@pytest.mark.integration
@pytest.mark.parametrize("check", list(CHECKS))
def test_two_processes_match_one(outcomes, check):
    failures = [f"rank {r}:\n{text}" for r, text in enumerate(outcomes[check]) if text != "ok"]
    assert not failures, "\n".join(failures)


# Single process ------------------------------------------------------------------------
def test_group_ranks_split_world_into_expert_and_data_parallel_groups():
    ep, dp = group_ranks(8, 2)
    assert ep == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="expert parallel size 3 .* world size 4"):
        group_ranks(4, 3)


def test_experts_not_divisible_by_expert_parallel_size():
    model = DeepseekV3ForCausalLM(v3_config())  # 16 routed experts
    groups = ExpertParallelGroups(None, None, ep_size=3, ep_rank=0, dp_size=1, world_size=3)
    with pytest.raises(ValueError, match="expert parallel size 3 must divide n_routed_experts 16"):
        shard_experts(model, groups)
    assert model.model.layers[1].mlp.experts.num_experts == 16  # left untouched


def test_expert_parallel_needs_an_initialised_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        expert_parallel_groups(2)
    with pytest.raises(RecipeError, match="model.expert_parallel"):
        load_model(ModelSection(config="tiny_arith", expert_parallel=2))
    with pytest.raises(RecipeError, match="model.expert_parallel: 0"):
        load_model(ModelSection(config="tiny_arith", expert_parallel=0))


def test_expert_parallel_is_a_training_recipe_key():
    for recipe in ("sft/arith_tiny.yaml", "grpo/arith_tiny.yaml"):
        loaded = load_recipe(RECIPES / recipe, ["model.expert_parallel=2"])
        assert loaded.model.expert_parallel == 2


def test_eval_shards_experts_with_the_native_backend_only(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "recipe: eval\nmodel: {path: m}\ndata: {source: 'builtin:arithmetic'}\n"
        "rewards: [{name: math_accuracy}]\n"
    )
    assert load_recipe(recipe, ["model.expert_parallel=2"]).model.expert_parallel == 2
    with pytest.raises(RecipeError, match="model.expert_parallel: 2 with eval.backend: vllm"):
        load_recipe(recipe, ["model.expert_parallel=2", "eval.backend=vllm"])
    flags = ["eval", "--model", "m", "--data", "builtin:arithmetic", "--reward", "math_accuracy"]
    with pytest.raises(RecipeError, match="model.expert_parallel: 4 with eval.backend: vllm"):
        run_eval(build_parser().parse_args([*flags, "--backend", "vllm", "--expert-parallel", "4"]))


@pytest.mark.parametrize(
    "size,env,error",
    [
        (2, {"ACCELERATE_USE_DEEPSPEED": "true"}, "sharded experts train under DDP"),
        (3, {"WORLD_SIZE": "3"}, "expert parallel size 3 must divide n_routed_experts 16"),
        (4, {"WORLD_SIZE": "6"}, "expert parallel size 4 must divide the world size 6"),
    ],
    ids=["deepspeed", "experts", "world"],
)
@pytest.mark.parametrize("recipe", ["sft/arith_tiny", "grpo/arith_tiny"])
def test_expert_parallel_that_cannot_run_stops_before_any_work(
    tmp_path, monkeypatch, capsys, recipe, size, env, error
):
    """A DeepSpeed (or FSDP) launch, or an EP size that does not divide the experts or the
    processes: the run stops naming the key before it writes anything."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    overrides = [
        "model.path=null",
        "model.config=tiny_arith",
        "model.tokenizer=char",
        f"model.expert_parallel={size}",
        f"training.output_dir={out}",
    ]
    assert main(["run", recipe, *overrides]) == 2
    assert f"model.expert_parallel: {error}" in capsys.readouterr().err
    assert not out.exists()
