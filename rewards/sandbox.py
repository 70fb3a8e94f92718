"""Run untrusted programs in sandboxed subprocesses, a bounded number at a time.

    sandbox = Sandbox()  # concurrency defaults to the number of cores
    run = sandbox.run(ScriptJob("print(input()[::-1])", stdin="abc\\n"), SandboxLimits(time_s=2))
    run.status, run.exit_code, run.stdout  # ("ok", 0, "cba\\n")
    sandbox.run_all([CheckJob(code, test, "add"), ...])  # parallel, results in order

Each slot keeps a warm launcher process (`python -I -S`, in its own session; programs see
the standard library only) that forks a fresh `sandbox_supervisor` for every job; see that
module's docstring for the isolation. `Sandbox.isolation()` says what this machine gives:
network "namespace" (a new, empty network namespace) or "blocked" (socket creation refused
by an audit hook), whether pid/mount namespaces were available, and the sandbox uid. As root,
each slot runs programs as its own uid (`uid_base + slot`), so RLIMIT_NPROC caps a fork bomb
per slot without touching the other slots. A Sandbox must not be shared across a fork;
`default_sandbox()` gives each process its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import marshal
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

from moetune.rewards.sandbox_protocol import encode_frame, read_frame

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_LAUNCHER = (
    f"import sys; sys.path.insert(0, {str(_HERE)!r}); import sandbox_supervisor; "
    "sandbox_supervisor.serve()"
)
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
# Time a run gets beyond the program's limit before the trainer kills its launcher outright.
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
    """What became of one sandboxed job: how it ended, its output and the isolation it had."""

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
        self._launchers: list[_Launcher | None] = [None] * self.concurrency
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
            # colorsys: a module nothing preloads, so the program must read it from disk
            probe = self.run(ScriptJob("import colorsys"), SandboxLimits(time_s=10))
            if probe.status != "ok" or probe.exit_code != 0:
                raise SandboxError(
                    f"the sandbox cannot run `import colorsys` here (status {probe.status}, exit "
                    f"{probe.exit_code}, isolation {probe.isolation}): {probe.detail}"
                    f"{probe.stderr} -- without a mount namespace the sandbox uid must be able "
                    "to read the Python installation"
                )
            self._isolation = probe.isolation
            logger.info("sandbox isolation: %s", self._isolation)
        return self._isolation

    def close(self) -> None:
        """Stop the slots' launchers (they also stop by themselves when this process ends)."""
        for launcher in self._launchers:
            if launcher:
                launcher.close()
        self._executor.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self, job: ScriptJob | CheckJob, limits: SandboxLimits, slot: int) -> RunResult:
        header = {
            "limits": dataclasses.asdict(limits),
            "uid": self.uid_base + slot if os.geteuid() == 0 else None,
            "network": self.network,
            # Once the probe saw namespaces, a run without them would be a silent downgrade.
            "namespaces_required": bool(self._isolation and self._isolation["namespaces"]),
        }
        if isinstance(job, CheckJob):
            prefix = (
                job.prefix if not job.prefix or job.prefix.endswith("\n") else job.prefix + "\n"
            )
            header |= {"mode": "check", "code": prefix + job.code}
            test = {"prefix": job.prefix, "test": job.test, "entry_point": job.entry_point}
            frames = encode_frame(marshal.dumps(header)) + encode_frame(marshal.dumps(test))
        else:
            header |= {"mode": "script", "code": job.code, "stdin": job.stdin}
            frames = encode_frame(marshal.dumps(header))
        if self._launchers[slot] is None:
            self._launchers[slot] = _Launcher()
        launcher = self._launchers[slot]
        try:
            payload = launcher.run(frames, limits.time_s + _SUPERVISOR_GRACE_S)
        finally:
            if launcher.process.returncode is not None:  # killed or dead: start afresh next time
                self._launchers[slot] = None
        if payload is None:
            return RunResult("timeout", detail="the sandbox supervisor did not finish in time")
        result = marshal.loads(payload)
        for stream in ("stdout", "stderr"):
            result[stream] = result.get(stream, b"").decode("utf-8", "replace")
        return RunResult(**result)


class _Launcher:
    """A warm `sandbox_supervisor.serve()` process (one per slot): it forks a fresh supervisor
    for each job, so runs skip the interpreter's start-up."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_ENV,
            start_new_session=True,
        )

    def run(self, frames: bytes, timeout_s: float) -> bytes | None:
        """The result frame of the job in `frames`, or None after `timeout_s` (the launcher is
        then killed); SandboxError if the launcher died."""
        results = self.process.stdout.fileno()
        with contextlib.suppress(BrokenPipeError):  # a dead launcher shows as end of file
            self.process.stdin.write(frames)
            self.process.stdin.flush()
        if not select.select([results], [], [], timeout_s)[0]:
            self.close(kill=True)
            return None
        payload = read_frame(results)
        if payload is None:
            self.close(kill=True)
            raise SandboxError(f"the sandbox launcher died (exit {self.process.returncode})")
        return payload

    def close(self, kill: bool = False) -> None:
        if kill:
            with contextlib.suppress(ProcessLookupError):  # our unreaped child: pid still ours
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()


_default_sandboxes: dict[tuple[int, int | None], Sandbox] = {}
_default_lock = threading.Lock()


def default_sandbox(concurrency: int | None = None) -> Sandbox:
    """The process-wide Sandbox for `concurrency` (a forked child gets its own)."""
    key = (os.getpid(), concurrency)
    with _default_lock:
        if key not in _default_sandboxes:
            _default_sandboxes[key] = Sandbox(concurrency)
        return _default_sandboxes[key]
