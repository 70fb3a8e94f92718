"""A fresh model built for ZeRO-3 or FSDP2 (`load_model(..., sharded=True)`): on two gloo
ranks no rank ever holds the whole model while it is built, and once sharded (DeepSpeed's
partitions; `fully_shard` + `fill_shards`) it holds exactly the weights of the unsharded
build on the same seed."""

import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetune.config.schema import ModelSection
from moetune.model import sharded_build
from moetune.model.gathering import gathered, whole
from moetune.training.model_loading import load_model

pytestmark = pytest.mark.integration  # two processes

SECTION = ModelSection(config="tiny_arith", tokenizer="char", seed=3)
LAUNCHERS = {
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
}


class HeldBytes:
    """Peak bytes of parameter values this rank holds (parameters' own storage, ZeRO-3
    partitions, a ChunkedBuild's chunks), sampled each time a parameter or module is
    registered while the block runs."""

    def __init__(self):
        self.params: dict[int, weakref.ref] = {}
        self.peak = 0

    def __enter__(self):
        register = torch.nn.modules.module
        self.hooks = [
            register.register_module_parameter_registration_hook(self.on_parameter),
            register.register_module_module_registration_hook(lambda *_: self.sample()),
        ]
        return self

    def __exit__(self, *exc):
        self.sample()
        for hook in self.hooks:
            hook.remove()

    def on_parameter(self, module, name, param):
        if param is not None:
            self.params[id(param)] = weakref.ref(param)
        self.sample()

    def sample(self) -> None:
        live = [ref() for ref in self.params.values() if ref() is not None]
        held = sum(stored_bytes(p) + stored_bytes(getattr(p, "ds_tensor", None)) for p in live)
        build = sharded_build._active_build
        if build is not None:
            held += sum(stored_bytes(chunk) for _, chunk in build.chunks.values())
        self.peak = max(self.peak, held)


def stored_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None or tensor.device.type == "meta":
        return 0
    return tensor.numel() * tensor.element_size()


def whole_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole value, gathered one module at a time."""
    weights = {}
    for prefix, module in model.named_modules():
        with gathered(model, [module]):
            for name, param in module.named_parameters(recurse=False):
                weights[f"{prefix}.{name}".lstrip(".")] = whole(param).clone()
    return weights


def rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        DS_ACCELERATOR="cpu",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29561",
    )
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    for name, launcher in LAUNCHERS.items():
        for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
            os.environ.pop(key, None)
        os.environ.update(launcher)
        with HeldBytes() as held:
            model = load_model(SECTION, sharded=True)
        if name == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in [*model.model.layers, *model.model.mtp]:
                fully_shard(layer)
            fully_shard(model)
            sharded_build.fill_shards(model, model.__dict__.pop("rank_shares"))
        results[name] = {"peak": held.peak, "weights": whole_weights(model)}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_sharded_builds_never_hold_the_model_and_give_the_unsharded_weights(tmp_path):
    """ZeRO-3 (`deepspeed.zero.Init`) and FSDP2 (ChunkedBuild): rank 0 peaks below 0.7x the
    model's bytes while building (its half plus the module being drawn), and every weight
    equals the unsharded build's exactly."""
    mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path / "ranks.pt")), nprocs=2)
    results = torch.load(tmp_path / "ranks.pt", weights_only=False)
    expected = dict(load_model(SECTION).named_parameters())
    full = sum(stored_bytes(p) for p in expected.values())
    for name, result in results.items():
        assert result["peak"] < 0.7 * full, (name, result["peak"], full)
        assert result["weights"].keys() == expected.keys(), name
        for key, tensor in result["weights"].items():
            torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=f"{name}: {key}")
