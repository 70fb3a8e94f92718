"""Sharded safetensors checkpoints in the layout transformers, vLLM and DeepSeek use.

On disk (HF names): routed experts one tensor per expert
(`mlp.experts.{e}.gate_proj.weight` [I, hidden], ...), MTP modules as
`model.layers.{num_hidden_layers + k}.*` with their own copies of the embedding and head,
FP8 weights with `weight_scale_inv`. In memory (moetune names): experts stacked as
`mlp.experts.gate_up_proj` [E, 2I, hidden] / `down_proj` [E, hidden, I], MTP modules under
`model.mtp.{k}`. `checkpoint_layout` maps every in-memory tensor to its disk slices.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moetune.kernels import dequantize_weight, quantize_weight
from moetune.model.config import DeepseekV3Config, load_config
from moetune.model.expert_parallel import shard_experts, stacked_tensors
from moetune.model.fp8 import to_fp8_training, to_frozen_fp8
from moetune.model.gathering import full_shapes, gathered, whole
from moetune.model.safetensors_stream import SafetensorsStream, TensorEntry

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file."""


@contextmanager
def open_shard(file: Path, device: str = "cpu"):
    """safe_open, with a truncated or foreign file reported as a CheckpointError naming it."""
    try:
        shard = safe_open(file, framework="pt", device=device)
    except SafetensorError as error:
        raise CheckpointError(
            f"{file}: invalid header (truncated or not a safetensors file): {error}"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{file}: listed in the checkpoint's index but missing") from None
    with shard:
        yield shard


FP8_EXPERT_TENSOR = re.compile(r"\.experts\.(gate_proj|up_proj|down_proj)(_scale_inv)?$")
FP8_MODES = (None, "frozen", "train")


@dataclass(frozen=True)
class Slot:
    """Where one disk tensor lives in memory: `param[index]` (index None = whole tensor)."""

    param: str
    index: tuple | None = None


def checkpoint_layout(model: torch.nn.Module, config: DeepseekV3Config) -> dict[str, Slot]:
    """Map every HF tensor name of the checkpoint to its in-memory slot. The shapes are the
    whole tensors' (a model sharded by ZeRO-3, FSDP2 or expert parallelism maps as a whole)."""
    layout: dict[str, Slot] = {}
    for name, shape in full_shapes(model).items():
        disk = to_disk_name(name, config.num_hidden_layers)
        if name.endswith("experts.gate_up_proj"):
            half = shape[1] // 2
            for e in range(shape[0]):
                layout[f"{disk[: -len('gate_up_proj')]}{e}.gate_proj.weight"] = Slot(
                    name, (e, slice(0, half))
                )
                layout[f"{disk[: -len('gate_up_proj')]}{e}.up_proj.weight"] = Slot(
                    name, (e, slice(half, None))
                )
        elif name.endswith("experts.down_proj"):
            for e in range(shape[0]):
                layout[f"{disk[: -len('down_proj')]}{e}.down_proj.weight"] = Slot(name, (e,))
        elif match := FP8_EXPERT_TENSOR.search(disk):  # FP8RoutedExperts: one tensor per projection
            prefix, proj, scale = disk[: match.start()], match.group(1), match.group(2) or ""
            for e in range(shape[0]):
                layout[f"{prefix}.experts.{e}.{proj}.weight{scale}"] = Slot(name, (e,))
        else:
            layout[disk] = Slot(name)
    return layout


def to_disk_name(name: str, num_layers: int) -> str:
    """`model.mtp.{k}.block.X` -> `model.layers.{N+k}.X`;
    `shared_head_norm` -> `shared_head.norm`."""
    match = re.match(r"model\.mtp\.(\d+)\.(.*)", name)
    if not match:
        return name
    rest = match.group(2).removeprefix("block.").replace("shared_head_norm", "shared_head.norm")
    return f"model.layers.{num_layers + int(match.group(1))}.{rest}"


def mtp_shared_copies(config: DeepseekV3Config) -> dict[str, str]:
    """Disk names of the embedding/head copies each MTP layer carries -> the shared tensor."""
    copies = {}
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}"
        copies[f"{prefix}.embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[f"{prefix}.shared_head.head.weight"] = "lm_head.weight"
    return copies


def load_pretrained(
    cls, path, dtype=torch.float32, device="cpu", config=None, fp8=None, expert_parallel=None
):
    """Build `cls` from a checkpoint folder, reading one tensor at a time (peak memory:
    the model plus the largest tensor). Every model tensor must come from the checkpoint and
    every checkpoint tensor must fit one. `expert_parallel` (ExpertParallelGroups): the
    routed experts are sharded before any is read, and each rank reads its own.

    fp8=None: FP8 weights are dequantised to `dtype`. fp8="frozen": the decoder's linears
    and routed experts hold FP8 weights as stored (a bf16 checkpoint is quantised on load).
    fp8="train": dense master weights, trained through FP8 GEMMs (FP8Linear)."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, not {fp8!r}")
    path = Path(path)
    config = config or load_config(path)
    config.name_or_path = str(path)  # errors name the checkpoint (not written to config.json)
    if fp8 != "frozen":
        config.quantization_config = None  # the weights are held dense
    weight_map = locate_tensors(path)
    first_mtp = f"model.layers.{config.num_hidden_layers}."
    if config.num_nextn_predict_layers and not any(n.startswith(first_mtp) for n in weight_map):
        # transformers saves DeepSeek models without their MTP modules.
        warnings.warn(
            f"{path} holds no MTP weights ({first_mtp}*): loading without MTP "
            f"(num_nextn_predict_layers {config.num_nextn_predict_layers} -> 0)"
        )
        config.num_nextn_predict_layers = 0
    with torch.device("meta"):
        model = cls(config).to(dtype)
        if fp8 == "frozen":
            to_frozen_fp8(model)
        elif fp8 == "train":
            to_fp8_training(model)
        if expert_parallel is not None:  # (shapes only: nothing to broadcast yet)
            shard_experts(model, expert_parallel, broadcast=False)
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    fill_from_checkpoint(model, path, weight_map)
    model.eval()
    return model


@torch.no_grad()
def load_weights(model: torch.nn.Module, path) -> None:
    """Copy a checkpoint folder's weights into `model` in place (resuming), one tensor at a
    time, under the checkpoint_layout that `save_pretrained` writes. A model whose experts
    are sharded by expert parallelism reads only the experts it holds (no collective)."""
    path = Path(path)
    fill_from_checkpoint(model, path, locate_tensors(path))


def fill_from_checkpoint(model: torch.nn.Module, path: Path, weight_map: dict[str, str]) -> None:
    """Copy every checkpoint tensor into its slot of the model (FP8 quantised or dequantised
    to the slot's dtype). Every model tensor must come from the checkpoint and every
    checkpoint tensor must fit one; expert-parallel ranks fill their own experts' rows."""
    config = model.config
    params = model.state_dict()
    layout = checkpoint_layout(model, config)
    copies = mtp_shared_copies(config)
    shards = own_expert_rows(model)
    names_of_param: dict[str, list[str]] = {}
    for disk_name, slot in layout.items():
        names_of_param.setdefault(slot.param, []).append(disk_name)
    filled: set[str] = set()
    problems: list[str] = []

    def target_of(slot: Slot) -> torch.Tensor | None:
        """The slot's tensor in this model (None: an expert another rank holds)."""
        rows = shards.get(slot.param)
        if rows is None:
            return slot_tensor(params, slot)
        if slot.index is None:  # transformers' stacked experts: this rank's rows
            return params[slot.param]
        expert, *rest = slot.index
        if not rows.start <= expert < rows.stop:
            return None
        return params[slot.param][(expert - rows.start, *rest)]

    device = str(next(iter(params.values())).device)
    for file in sorted(set(weight_map.values())):
        with open_shard(path / file, device=device) as shard:
            for disk_name in shard.keys():
                if disk_name in copies or (
                    disk_name.endswith("_scale_inv") and disk_name not in layout
                ):
                    continue  # shared copies; scales of weights that are dequantised on load
                if disk_name in layout:
                    slot, covers = layout[disk_name], [disk_name]
                elif disk_name in names_of_param:  # transformers' stacked-expert tensors
                    slot, covers = Slot(disk_name), names_of_param[disk_name]
                else:
                    problems.append(f"unexpected tensor {disk_name!r} in {file}")
                    continue
                target = target_of(slot)
                if target is None:
                    filled.update(covers)
                    continue
                if slot.index is None and slot.param in shards:
                    tensor = shard.get_slice(disk_name)[shards[slot.param]]
                else:
                    tensor = shard.get_tensor(disk_name)
                scale_name = disk_name + "_scale_inv"
                if target.dtype == torch.float8_e4m3fn and tensor.dtype != torch.float8_e4m3fn:
                    tensor, scale = quantize_weight(tensor)  # bf16 checkpoint, FP8 model
                    target_of(layout[scale_name]).copy_(scale)
                    filled.add(scale_name)
                elif target.dtype != torch.float8_e4m3fn and tensor.dtype == torch.float8_e4m3fn:
                    if scale_name not in weight_map:
                        problems.append(f"FP8 tensor {disk_name!r} has no {scale_name!r}")
                        continue
                    scale = read_scale(path, weight_map, shard, file, disk_name)
                    tensor = dequantize_weight(tensor, scale, dtype=target.dtype)
                if tuple(target.shape) != tuple(tensor.shape):
                    problems.append(
                        f"shape mismatch for {disk_name!r}: checkpoint "
                        f"{tuple(tensor.shape)}, model {tuple(target.shape)}"
                    )
                    continue
                target.copy_(tensor)
                filled.update(covers)
    shapes = full_shapes(model)
    for name in sorted(set(layout) - filled):
        slot = layout[name]
        shape = torch.empty(shapes[slot.param], device="meta")[slot.index or ()].shape
        problems.append(f"missing tensor {name!r} (model shape {tuple(shape)})")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"checkpoint {path} does not match the model:\n  {shown}{more}")


def own_expert_rows(model: torch.nn.Module) -> dict[str, slice]:
    """State-dict name of every expert-parallel stacked expert tensor -> the global expert
    rows this rank holds."""
    rows = {}
    for name, moe in model.named_modules():
        shard = getattr(moe, "expert_parallel", None)
        if shard is not None:
            for tensor_name, _ in stacked_tensors(moe.experts):
                rows[f"{name}.experts.{tensor_name}"] = slice(
                    shard.first, shard.first + shard.count
                )
    return rows


def slot_tensor(params, slot: Slot) -> torch.Tensor:
    tensor = params[slot.param]
    return tensor if slot.index is None else tensor[slot.index]


def locate_tensors(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single model.safetensors."""
    index = path / INDEX_FILE
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: neither {INDEX_FILE} nor model.safetensors found")
    with open_shard(single) as shard:
        return dict.fromkeys(shard.keys(), single.name)


def read_tensor(path: Path, file: str, name: str) -> torch.Tensor:
    with open_shard(path / file) as shard:
        return shard.get_tensor(name)


def read_tensors(
    path, names, weight_map: dict[str, str] | None = None, dequantize_to: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the named tensors of a checkpoint folder, one shard open at a time.
    With `dequantize_to`, FP8 weights come dequantised to that dtype through their
    `weight_scale_inv` (read from whichever shard holds it)."""
    path = Path(path)
    weight_map = weight_map or locate_tensors(path)
    by_file = defaultdict(list)
    for name in names:
        by_file[weight_map[name]].append(name)
    for file, group in by_file.items():
        with open_shard(path / file) as shard:
            for name in group:
                tensor = shard.get_tensor(name)
                if dequantize_to is not None and tensor.dtype == torch.float8_e4m3fn:
                    if name + "_scale_inv" not in weight_map:
                        raise ValueError(f"{path}: FP8 tensor {name!r} has no {name}_scale_inv")
                    scale = read_scale(path, weight_map, shard, file, name)
                    tensor = dequantize_weight(tensor, scale, dtype=dequantize_to)
                yield name, tensor


def read_scale(path: Path, weight_map: dict[str, str], shard, file: str, name: str) -> torch.Tensor:
    """FP8 tensor `name`'s `weight_scale_inv`, from the open `shard` (file `file`) if it is
    there."""
    scale_name, scale_file = name + "_scale_inv", weight_map[name + "_scale_inv"]
    return (
        shard.get_tensor(scale_name)
        if scale_file == file
        else read_tensor(path, scale_file, scale_name)
    )


def disk_tensors(model: torch.nn.Module, config: DeepseekV3Config):
    """Yield (HF name, tensor) for every tensor of the checkpoint, experts split per expert
    and MTP layers with their embedding/head copies."""
    params = model.state_dict()
    for disk_name, slot in checkpoint_layout(model, config).items():
        tensor = params[slot.param]
        yield disk_name, (tensor if slot.index is None else tensor[slot.index])
    for disk_name, shared in mtp_shared_copies(config).items():
        yield disk_name, params[shared].clone()  # safetensors refuses shared storage


def save_pretrained(
    model: torch.nn.Module, path, max_shard_bytes: int = 5 * 2**30, write: bool = True
) -> None:
    """Write config.json, safetensors shards and the index atomically: files are written to
    a temporary folder beside `path` and moved in only when all of them are complete.

    Layer by layer: the tensors are read one block at a time (the embedding, norm and head;
    then each decoder layer; then each MTP module) and streamed into the shards, so no more
    than one block is ever held whole. A model sharded over ranks (DeepSpeed ZeRO-3, FSDP2,
    expert parallelism) is saved the same way: every rank calls this (each block is gathered
    collectively) and only the rank with `write` writes files."""
    config: DeepseekV3Config = model.config
    if any("lora" in name for name, _ in model.named_modules()):
        raise ValueError(
            "the model carries LoRA adapters: save them with "
            "moetune.model.adapters.save_adapter, or merge_lora() before save_pretrained"
        )
    tensors = model.state_dict(keep_vars=True)
    blocks = save_blocks(model, config)
    layout = checkpoint_layout(model, config)
    shapes = full_shapes(model)
    block_of = {param: i for i, (_, params) in enumerate(blocks) for param in params}
    planned: list[list[tuple[TensorEntry, Slot]]] = [[] for _ in blocks]
    for disk_name, slot in [
        *layout.items(),
        *((n, Slot(p)) for n, p in mtp_shared_copies(config).items()),
    ]:
        shape = torch.empty(shapes[slot.param], device="meta")[slot.index or ()].shape
        entry = TensorEntry(disk_name, tensors[slot.param].dtype, tuple(shape))
        planned[block_of[slot.param]].append((entry, slot))
    shards = pack_shards([entry for block in planned for entry, _ in block], max_shard_bytes)
    path = Path(path)
    staging = None
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        streams = ShardStreams(staging, shards) if write else None
        for (modules, _), block in zip(blocks, planned):
            with gathered(model, modules):
                for entry, slot in block:
                    tensor = whole(tensors[slot.param])
                    if streams:
                        streams.write(
                            entry.name, tensor if slot.index is None else tensor[slot.index]
                        )
        if streams:
            streams.close()
            finish_folder(model, config, staging, path, streams)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def save_blocks(
    model: torch.nn.Module, config: DeepseekV3Config
) -> list[tuple[list[torch.nn.Module], set[str]]]:
    """The blocks a save walks, in order, as (modules, names of the state_dict tensors they
    hold): the tensors outside the decoder layers and MTP modules, then each of those."""
    prefixes = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    prefixes += [f"model.mtp.{k}" for k in range(len(model.model.mtp))]
    names = list(model.state_dict(keep_vars=True))
    modules = dict(model.named_modules())

    def inside(name: str, prefix: str) -> bool:
        return name.startswith(prefix + ".")

    rest = [n for n in names if not any(inside(n, p) for p in prefixes)]
    owners = {n.rpartition(".")[0] for n in rest}
    blocks = [([modules[o] for o in sorted(owners)], set(rest))]
    for prefix in prefixes:
        blocks.append(
            (
                [m for n, m in modules.items() if n == prefix or inside(n, prefix)],
                {n for n in names if inside(n, prefix)},
            )
        )
    return blocks


def pack_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive entries grouped into shards of at most max_shard_bytes (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


class ShardStreams:
    """The shard files of a save, each opened when its first tensor comes."""

    def __init__(self, folder: Path, shards: list[list[TensorEntry]]):
        self.folder, self.shards, self.index = folder, shards, -1
        self.stream: SafetensorsStream | None = None
        self.remaining = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(e.nbytes for shard in shards for e in shard)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self.remaining:
            self.close()
            self.index += 1
            file = f"model-{self.index + 1:05d}-of-{len(self.shards):05d}.safetensors"
            entries = self.shards[self.index]
            self.stream = SafetensorsStream(self.folder / file, entries, {"format": "pt"})
            self.weight_map.update(dict.fromkeys((e.name for e in entries), file))
            self.remaining = len(entries)
        self.stream.write(name, tensor)
        self.remaining -= 1

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def finish_folder(
    model, config: DeepseekV3Config, staging: Path, path: Path, streams: ShardStreams
) -> None:
    """Write the index and config.json into `staging`, then move its files into `path`
    (shards first, the index and config last) and remove shards of an older save."""
    weight_map = streams.weight_map
    index = {"metadata": {"total_size": streams.total_size}, "weight_map": weight_map}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    config_dict = config.to_dict()
    config_dict["architectures"] = [
        type(model).__name__.replace(
            "DeepseekV3", "DeepseekV2" if config.model_type == "deepseek_v2" else "DeepseekV3"
        )
    ]
    config_dict["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    path.mkdir(exist_ok=True)
    for stale in path.glob("model*.safetensors"):
        if stale.name not in weight_map.values():
            stale.unlink()
    for file in sorted(staging.iterdir(), key=lambda f: f.suffix != ".safetensors"):
        os.replace(file, path / file.name)
