"""Sandboxed runs of untrusted programs, started by `moetune.rewards.sandbox`.

This runs in its own interpreter (`python -I -S`, this folder on sys.path) and imports the
standard library and its sibling modules only (`sandbox_kernel` for namespaces and mounts,
`sandbox_judge` for assert-style tests, `sandbox_protocol` for frames). Four kinds of process:

- launcher (`serve`, one per sandbox slot, the trainer's uid): reads job frames (marshal) from
  the trainer and forks a supervisor per job, so a run skips the interpreter's start-up.
- supervisor (`run_job`): reads an assert-style job's test frame into a memfd, enters new
  namespaces where the kernel permits, enforces the wall clock and the output caps, kills and
  reaps everything at the end, and writes the result frame to the trainer.
- init (its child, pid 1 of the new pid namespace): builds the filesystem view, drops to the
  sandbox uid, starts the program, then waits for it or, for an assert-style test, reads the
  test (only now, so the program's memory never held it) and judges the program through
  `sandbox_judge`. It reports to the supervisor on a pipe the program does not hold.
- program (init's child): sets its rlimits and no_new_privs, then runs the code as __main__.

With namespaces (root with CAP_SYS_ADMIN): new pid, mount, network, IPC and UTS namespaces;
every mount read-only; a fresh /proc; private tmpfs on /tmp (the working directory is
/tmp/work) and /dev/shm; a directory that would hide the interpreter from the sandbox uid
(such as a 0700 /root) is covered by an empty tmpfs with only the interpreter's branch bound
back. When init exits, the kernel kills every process left in the namespace.
Without namespaces: a fresh working directory under a private parent, socket creation (and
ctypes and exec) blocked by an audit hook, cleanup by process group, by sandbox uid and by
reaping orphans as subreaper. Then /tmp stays writable for the program.
As root the program always runs as the sandbox uid, so RLIMIT_NPROC holds.
"""

from __future__ import annotations

import functools
import marshal
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
from typing import NoReturn

import sandbox_judge
import sandbox_kernel as kernel
import sandbox_protocol as protocol

HERE = os.path.dirname(os.path.abspath(__file__))
STDERR_CAP = 64 << 10
REPORT_CAP = 1 << 20
STARTED = b"+"  # init's mark on the report pipe: setup is done, the program starts now
# Audit events refused to the program when it shares the host's network namespace.
BLOCKED_EVENTS = (
    "socket.",
    "ctypes.",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.system",
    "subprocess.",
)
BLOCKED_MODULES = ("_posixsubprocess",)  # starts programs without raising an audit event


# ----------------------------------------------------------------------------- supervisor


def serve() -> None:
    """The launcher: run jobs from stdin one after another, each under a fresh supervisor
    process forked from this warm interpreter, which writes the job's result to stdout."""
    while (frame := protocol.read_frame(0)) is not None:
        supervisor = os.fork()
        if supervisor == 0:
            try:
                result = run_job(marshal.loads(frame))
            except BaseException:  # noqa: BLE001 -- a supervisor failure is the job's result
                result = {"status": "error", "detail": traceback.format_exc()}
            try:
                protocol.write_frame(1, marshal.dumps(result))
            finally:
                os._exit(0)
        os.waitpid(supervisor, 0)


def run_job(job: dict) -> dict:
    """Supervise one run; an assert-style job's test frame is read from stdin first."""
    limits = job["limits"]
    test_fd = _read_frame_into_memfd(0) if job["mode"] == "check" else None
    isolation = kernel.enter_namespaces(job["network"], job["namespaces_required"])
    isolation["user"] = job["uid"]
    scratch = None
    if not isolation["namespaces"]:
        scratch = tempfile.mkdtemp(prefix="moetune-sandbox-")
    stdin_fd = os.memfd_create("stdin")
    os.write(stdin_fd, job.get("stdin", "").encode())
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    report_r, report_w = os.pipe()
    started = time.monotonic()
    kernel.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us to be reaped
    supervisor_fd = os.pidfd_open(os.getpid())
    init_pid = os.fork()
    if init_pid == 0:
        for fd in (out_r, err_r, report_r):
            os.close(fd)
        _init(job, isolation, supervisor_fd, (out_w, err_w, report_w, stdin_fd, test_fd), scratch)
    for fd in (out_w, err_w, report_w, supervisor_fd, stdin_fd, test_fd):
        if fd is not None:
            os.close(fd)
    caps = {out_r: limits["max_output_bytes"], err_r: STDERR_CAP, report_r: REPORT_CAP}
    kill = functools.partial(_kill_everything, init_pid, isolation, job["uid"])
    status, data = _supervise(init_pid, caps, started + limits["time_s"], kill)
    _reap_everything(init_pid, isolation, kill)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    report = _read_report(bytes(data[report_r]), status)
    return {
        "status": "error" if "error" in report else status,
        "exit_code": report.get("exit_code"),
        "passed": report.get("passed"),
        "detail": report.get("error") or report.get("detail") or "",
        "stdout": bytes(data[out_r][: caps[out_r]]),
        "stderr": bytes(data[err_r][:STDERR_CAP]),
        "elapsed_s": time.monotonic() - started,
        "isolation": isolation,
    }


def _read_frame_into_memfd(fd: int) -> int:
    """Move one frame from `fd` into a memfd, wiping our copy: the processes forked from us
    later (the program among them) must not find it in their memory."""
    buffer = bytearray(protocol.read_frame_size(fd) or 0)
    with memoryview(buffer) as view:
        done = 0
        while done < len(buffer):
            read = os.readv(fd, [view[done:]])
            if read == 0:
                raise EOFError("truncated test frame")
            done += read
    memfd = os.memfd_create("test")
    os.write(memfd, buffer)
    buffer[:] = bytes(len(buffer))
    return memfd


def _read_report(raw: bytes, status: str) -> dict:
    """Init's report: the STARTED mark, then one marshal frame (if init lived to write it)."""
    if status != "ok":
        return {}
    started = raw.startswith(STARTED)
    try:
        return marshal.loads(raw[len(STARTED) if started else 0 :].partition(b"\n")[2])
    except (EOFError, ValueError, TypeError):
        pass
    # Once the program runs, it may kill init (it can without a pid namespace): its loss.
    if started:
        return {"detail": "the program killed the sandbox's init process"}
    return {"error": "the sandbox init process died during setup"}


def _supervise(init_pid: int, caps: dict[int, int], deadline: float, kill) -> tuple[str, dict]:
    """Collect the pipes in `caps` until they close, the deadline passes or one overflows."""
    data = {fd: bytearray() for fd in caps}
    pidfd = os.pidfd_open(init_pid)
    poller = select.poll()
    for fd in (*caps, pidfd):
        poller.register(fd, select.POLLIN)
    open_fds = {*caps, pidfd}
    status = "ok"
    while status == "ok" and open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = "timeout"
            break
        for fd, _ in poller.poll(remaining * 1000):
            if fd == pidfd:  # init is done: whatever it left behind goes too
                kill()
                chunk = b""
            else:
                chunk = os.read(fd, 1 << 16)
                data[fd] += chunk
                if len(data[fd]) > caps[fd]:
                    status = "output_limit"
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
    kill()
    for fd in (*caps, pidfd):
        os.close(fd)
    return status, data


def _kill_everything(init_pid: int, isolation: dict, uid: int | None) -> None:
    """Kill init (in a pid namespace the kernel then kills the rest), its group and its uid.
    Call it only while init is unreaped, so that its pid and group still name it."""
    for kill, target in ((os.kill, init_pid), (os.killpg, init_pid)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if not isolation["namespaces"] and uid is not None:
        _kill_uid(uid)


def _reap_everything(init_pid: int, isolation: dict, kill) -> None:
    """Kill and wait for every process below us, so none outlives the run or counts against
    the next run's RLIMIT_NPROC."""
    kill()
    os.waitpid(init_pid, 0)
    if isolation["namespaces"]:
        return  # the kernel killed the rest of the pid namespace before init could be reaped
    while True:  # orphans come to us as their subreaper
        try:
            if os.waitpid(-1, os.WNOHANG)[0] != 0:
                continue
        except ChildProcessError:
            return
        with open(f"/proc/self/task/{os.getpid()}/children") as children:
            for child in children.read().split():
                try:
                    os.kill(int(child), signal.SIGKILL)  # unreaped children keep their pids: safe
                except ProcessLookupError:
                    pass
        time.sleep(0.002)


def _kill_uid(uid: int) -> None:
    """Kill every process of `uid`: kill(-1) from a helper that runs as that uid."""
    helper = os.fork()
    if helper == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(100):  # repeat: a fork bomb may add processes during a sweep
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


# ----------------------------------------------------------------------------------- init


def _init(job: dict, isolation: dict, supervisor_fd: int, fds: tuple, scratch: str | None):
    out_w, err_w, report_w, stdin_fd, test_fd = fds
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (out_w, 1), (err_w, 2)):  # off the launcher's pipes
        os.dup2(source, target)
        os.close(source)
    started = False
    try:
        kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([supervisor_fd], [], [], 0)[0]:  # the supervisor died before prctl
            os._exit(1)
        os.close(supervisor_fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as pid 1, only handled signals reach us
        os.setpgid(0, 0)  # init and the program: a process group of their own
        if isolation["namespaces"]:
            kernel.private_filesystem(job["limits"]["disk_mb"])
            workdir = kernel.WORKDIR
        else:
            workdir = os.path.join(scratch, "work")
        os.mkdir(workdir, 0o700)
        if job["uid"] is not None:
            os.chown(workdir, job["uid"], job["uid"])
        os.chdir(workdir)
        _drop_privileges(job["uid"])
        os.write(report_w, STARTED)
        started = True
        if job["mode"] == "check":
            report = _judge(job, isolation, test_fd)
        else:
            report = _run_script(job, isolation, stdin_fd)
    except BaseException:  # noqa: BLE001 -- reported; the supervisor decides what it means
        # Before the program starts a failure is the sandbox's; after, the program's doing.
        report = {"detail" if started else "error": traceback.format_exc(limit=-3)}
    try:
        protocol.write_frame(report_w, marshal.dumps(report))
    finally:
        os._exit(0)  # a forked child never returns into the supervisor's code


def _drop_privileges(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _run_script(job: dict, isolation: dict, stdin_fd: int) -> dict:
    program = os.fork()
    if program == 0:
        _program(job, isolation, stdin_fd, keep=(), serve=None)
    _, wait_status = os.waitpid(program, 0)
    return {"exit_code": os.waitstatus_to_exitcode(wait_status)}


def _judge(job: dict, isolation: dict, test_fd: int) -> dict:
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    program = os.fork()
    if program == 0:
        _program(
            job,
            isolation,
            0,
            keep=(requests_r, replies_w),  # stdin: init's /dev/null
            serve=lambda module: sandbox_judge.serve_calls(module, requests_r, replies_w),
        )
    os.close(requests_r)
    os.close(replies_w)
    test = marshal.loads(os.pread(test_fd, os.fstat(test_fd).st_size, 0))  # only now
    os.close(test_fd)
    passed, detail = sandbox_judge.run_check(
        test["prefix"], test["test"], test["entry_point"], requests_w, replies_r
    )
    return {"passed": passed, "detail": detail}


# -------------------------------------------------------------------------------- program


def _program(job: dict, isolation: dict, stdin_fd: int, keep: tuple, serve) -> None:
    """The untrusted program's process (a fresh child of init); never returns."""
    exit_code = 1
    try:
        _confine(job["limits"], isolation, stdin_fd, keep)
        module = _execute_or_exit(job["code"])
        if serve:
            serve(module)
        exit_code = 0
    except BaseException:  # noqa: BLE001 -- whatever the program raised, it exits with 1
        traceback.print_exc()
    finally:
        _exit(exit_code)


def _confine(limits: dict, isolation: dict, stdin_fd: int, keep: tuple) -> None:
    """Keep only stdio and `keep` open, set the rlimits, forbid privilege gains."""
    os.dup2(stdin_fd, 0)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    sys.path[:] = [entry for entry in sys.path if entry != HERE]
    cpu_s = int(limits["time_s"]) + 1
    for kind, soft, hard in (
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_AS, limits["memory_mb"] << 20, limits["memory_mb"] << 20),
        (resource.RLIMIT_NPROC, limits["max_processes"], limits["max_processes"]),
        (resource.RLIMIT_FSIZE, limits["max_file_bytes"], limits["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, limits["max_open_files"], limits["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(kind, (soft, hard))
    kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)
    if isolation["network"] == "blocked":
        sys.addaudithook(_refuse_blocked_events)


def _refuse_blocked_events(event: str, args: tuple) -> None:
    if event.startswith(BLOCKED_EVENTS) or (event == "import" and args[0] in BLOCKED_MODULES):
        raise PermissionError(f"sandbox: {event} is not allowed (no network namespace here)")


def _execute_or_exit(source: str) -> types.ModuleType:
    """Run `source` as a fresh __main__ module; exit the way Python would if it stops early."""
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    try:
        exec(compile(source, "<program>", "exec"), module.__dict__)  # noqa: S102 -- sandboxed
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            _exit((stop.code or 0) & 0xFF)
        print(stop.code, file=sys.stderr)
        _exit(1)
    except BaseException:  # noqa: BLE001 -- whatever the program raised, it exits with 1
        traceback.print_exc()
        _exit(1)
    return module


def _exit(code: int) -> NoReturn:
    """Flush what the program printed, whatever it did to sys.stdout, and end the process."""
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code)
