"""Run untrusted programs in sandboxed subprocesses, a bounded number at a time.

    sandbox = Sandbox()  # concurrency defaults to the number of cores
    run = sandbox.run(ScriptJob("print(input()[::-1])", stdin="abc\\n"), SandboxLimits(time_s=2))
    run.status, run.exit_code, run.stdout  # ("ok", 0, "cba\\n")
    sandbox.run_all([CheckJob(code, test, "add"), ...])  # parallel, results in order

Every run is a fresh `sandbox_supervisor` process (`python -I -S`; programs see the standard
library only), in its own session, fed the job on stdin; its docstring describes the
isolation. `Sandbox.isolation()` says which isolation this machine gives: network
"namespace" (a new, empty network namespace) or "blocked" (socket creation refused by an
audit hook), and whether pid/mount namespaces and a separate uid were available. As root,
each concurrent slot runs programs as its own uid (`uid_base + slot`), so RLIMIT_NPROC caps a
fork bomb per slot without touching the other slots.
"""

from __future__ import annotations

import dataclasses
import logging
import marshal
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moetune.rewards.sandbox_protocol import encode_frame

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_BOOTSTRAP = (
    f"import sys; sys.path.insert(0, {str(_HERE)!r}); import sandbox_supervisor; "
    "sandbox_supervisor.main()"
)
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
# Time the supervisor gets beyond the program's limit before the trainer kills it outright.
_SUPERVISOR_GRACE_S = 10.0


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `time_s` is wall-clock time; CPU time is capped at int(time_s) + 1."""

    time_s: float = 5.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    disk_mb: int = 64  # size of the private /tmp (which holds the working directory)


@dataclass(frozen=True)
class ScriptJob:
    """A whole program, run as __main__ with `stdin`; the caller judges its stdout."""

    code: str
    stdin: str = ""


@dataclass(frozen=True)
class CheckJob:
    """`prefix + code` runs in the program's process; `test` (defining `check(candidate)`) runs
    in a separate judge process against `entry_point`, called across the boundary."""

    code: str
    test: str
    entry_point: str
    prefix: str = ""


@dataclass
class RunResult:
    status: Literal["ok", "timeout", "output_limit", "error"]
    exit_code: int | None = None  # ScriptJob: the program's (negative: killed by that signal)
    passed: bool | None = None  # CheckJob: check(candidate) returned
    detail: str = ""  # why a check failed, or what went wrong in the sandbox
    stdout: str = ""
    stderr: str = ""
    elapsed_s: float = 0.0
    isolation: dict = field(default_factory=dict)


class Sandbox:
    """A bounded pool of sandbox slots; `run` blocks while all slots are busy."""

    def __init__(
        self,
        concurrency: int | None = None,
        network: Literal["auto", "block"] = "auto",
        uid_base: int = 61000,
    ):
        if network not in ("auto", "block"):
            raise ValueError(f"network must be 'auto' or 'block', got {network!r}")
        self.concurrency = concurrency or os.cpu_count() or 1
        self.network = network
        self.uid_base = uid_base
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.concurrency):
            self._slots.put(slot)
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sandbox")
        self._isolation: dict | None = None

    def run(self, job: ScriptJob | CheckJob, limits: SandboxLimits = SandboxLimits()) -> RunResult:
        slot = self._slots.get()
        try:
            return self._run(job, limits, slot)
        finally:
            self._slots.put(slot)

    def run_all(
        self, jobs: list[ScriptJob | CheckJob], limits: SandboxLimits = SandboxLimits()
    ) -> list[RunResult]:
        return list(self._executor.map(lambda job: self.run(job, limits), jobs))

    def isolation(self) -> dict:
        """What this machine gave a trivial program (probed once); SandboxError if it fails."""
        if self._isolation is None:
            probe = self.run(ScriptJob("import json"), SandboxLimits(time_s=10))
            if probe.status != "ok" or probe.exit_code != 0:
                raise SandboxError(f"the sandbox cannot run programs here: {probe.detail}"
                                   f"{probe.stderr}")
            self._isolation = probe.isolation
            logger.info("sandbox isolation: %s", self._isolation)
        return self._isolation

    def _run(self, job: ScriptJob | CheckJob, limits: SandboxLimits, slot: int) -> RunResult:
        header = {
            "limits": dataclasses.asdict(limits),
            "uid": self.uid_base + slot if os.geteuid() == 0 else None,
            "network": self.network,
        }
        if isinstance(job, CheckJob):
            prefix = job.prefix if not job.prefix or job.prefix.endswith("\n") else job.prefix + "\n"
            header |= {"mode": "check", "code": prefix + job.code}
            test = {"prefix": job.prefix, "test": job.test, "entry_point": job.entry_point}
            frames = encode_frame(marshal.dumps(header)) + encode_frame(marshal.dumps(test))
        else:
            header |= {"mode": "script", "code": job.code, "stdin": job.stdin}
            frames = encode_frame(marshal.dumps(header))
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _BOOTSTRAP],
                input=frames,
                capture_output=True,
                env=_ENV,
                start_new_session=True,
                timeout=limits.time_s + _SUPERVISOR_GRACE_S,
            )
        except subprocess.TimeoutExpired:
            return RunResult("timeout", detail="the sandbox supervisor did not finish in time")
        payload = done.stdout.partition(b"\n")[2]
        if done.returncode != 0 or not payload:
            raise SandboxError(
                f"sandbox supervisor failed (exit {done.returncode}): "
                f"{done.stderr.decode(errors='replace')[-2000:]}"
            )
        result = marshal.loads(payload)
        for stream in ("stdout", "stderr"):
            result[stream] = result[stream].decode("utf-8", "replace")
        return RunResult(**result)


_default_sandboxes: dict[tuple[int, int | None], Sandbox] = {}
_default_lock = threading.Lock()


def default_sandbox(concurrency: int | None = None) -> Sandbox:
    """The process-wide Sandbox for `concurrency` (a forked child gets its own)."""
    key = (os.getpid(), concurrency)
    with _default_lock:
        if key not in _default_sandboxes:
            _default_sandboxes[key] = Sandbox(concurrency)
        return _default_sandboxes[key]
