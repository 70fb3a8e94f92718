"""One local rollout engine process and the pipe to it.

Each engine runs in its own process (and process group, so that killing it takes its
tensor-parallel workers too), forked by a multiprocessing "forkserver" that has imported torch
and moetune already, so a start or restart does not import them again; it never touches CUDA,
and each worker takes the pool's environment. Weights reach it over a gloo group of its own
with the pool (moetune.rl.weight_group, over loopback), as they reach remote engines.
`receive` raises WorkerFailure when the engine dies or falls silent; the pool restarts it
(moetune.rl.rollout). Several requests may be in flight: the engine answers them in order,
except that a weight sync's answers overtake a partial rollout's.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing.connection import wait

import torch

from moetune.rl import weight_group
from moetune.rl.rollout_worker import LOOPBACK, Answer, EngineLink, EngineSpec, WorkerFailure, serve


class WorkerProcess(EngineLink):
    """One engine process (its own process group) and the pipe to it. timeout_s: the longest
    a weight bucket waits for the engine to take it. `early`: answers read before their turn
    (while a bucket waited), which `receive` gives first."""

    def __init__(self, index: int, spec: EngineSpec, timeout_s: float = 300.0):
        self.index, self.spec, self.timeout_s = index, spec, timeout_s
        self.process = self.conn = self.group = self.failure = None
        self.joins = 0
        self.early: list[Answer] = []

    @property
    def label(self) -> str:
        return self.spec.backend

    @property
    def down(self) -> bool:
        return self.process is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        context = worker_context()
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=serve,
            args=(child, self.spec, dict(os.environ)),
            name=f"rollout-worker-{self.index}",
        )
        self.process.start()
        child.close()

    def join(self, store, timeout_s: float) -> None:
        """Form this worker's weight group with the pool (gloo over loopback, pool rank 0),
        once it is ready. WorkerFailure if the worker does not take part."""
        self.joins += 1
        prefix = f"{self.index}/{self.joins}"
        self.send("join_group", store.port, prefix, "gloo", timeout_s)
        try:
            self.group = weight_group.join(store, prefix, 0, "gloo", timeout_s, LOOPBACK)
        except RuntimeError as error:  # torch.distributed's timeout
            raise WorkerFailure(f"formed no weight group ({error})") from None
        self.receive(timeout_s)

    def send(self, method: str, *args) -> None:
        try:
            if method == "receive":  # a bucket of weights over the group
                self.send_bucket(*args, torch.device("cpu"))
            else:
                self.conn.send((method, args))
        except (OSError, RuntimeError):
            pass  # a dead worker: receive() reports it
        except WorkerFailure as failure:
            self.failure = f"{failure} during {method!r}"

    def read(self, timeout: float) -> Answer:
        """The next answer on the pipe, whatever its status. WorkerFailure if the worker dies
        or is silent for `timeout` seconds."""
        ready = wait([self.conn, self.process.sentinel], timeout)
        if self.conn in ready:
            try:
                return Answer(*self.conn.recv())
            except (EOFError, OSError):
                pass
        if ready:
            self.process.join(1)
            raise WorkerFailure(f"died (exit code {self.process.exitcode})")
        raise WorkerFailure(f"did not answer within {timeout:.1f} s")

    def kill(self) -> None:
        """SIGKILL the worker's process group (its own tensor-parallel workers included)."""
        if self.process is None:
            return
        try:  # before join(): the unreaped pid cannot name anyone else's group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # no group: gone, or it had not made it yet
            self.process.kill()
        self.process.join()
        self.conn.close()
        self.process = self.group = self.failure = None
        self.early = []

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it has not within `timeout` seconds."""
        if self.process is not None and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout)
        self.kill()


def worker_context() -> multiprocessing.context.BaseContext:
    """The forkserver context whose server preloads the worker module (torch, moetune.model)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["moetune.rl.rollout_worker"])
    return context


def visible_devices(worker: int, workers: int, tensor_parallel_size: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for a worker: its own block of tensor_parallel_size GPUs, taken in
    turn from those this process sees (wrapping round when the workers outnumber them). Under a
    multi-process launcher the blocks of local rank r's `workers` come after those of ranks
    0..r-1, so with one engine per rank each shares its trainer's GPU (cuda:LOCAL_RANK)."""
    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    first = (int(os.environ.get("LOCAL_RANK", "0")) * workers + worker) * tensor_parallel_size
    return ",".join(ids[(first + k) % len(ids)] for k in range(tensor_parallel_size))
