"""One sandboxed run of one untrusted program, started by `moetune.rewards.sandbox`.

This runs in its own interpreter (`python -I -S`, this folder on sys.path) and imports the
standard library and its sibling modules only, few of them, since imports are most of a run's
start-up time. The trainer writes the job as a marshal frame on stdin (for an assert-style
test a second frame with the test follows) and reads one marshal frame of results from
stdout. Three processes:

- supervisor (this process, the trainer's uid): enters new namespaces where the kernel
  permits, enforces the wall clock and the output caps, kills everything at the end.
- init (its child, pid 1 of the new pid namespace): builds the filesystem view, drops to the
  sandbox uid, starts the program, then waits for it or, for an assert-style test, reads the
  test frame (only now, so the program's memory never held it) and judges the program
  through `sandbox_judge`. It reports to the supervisor on a pipe the program does not hold.
- program (init's child): sets its rlimits and no_new_privs, then runs the code as __main__.

With namespaces (root with CAP_SYS_ADMIN): new pid, mount, network, IPC and UTS namespaces;
every mount read-only; a fresh /proc; private tmpfs on /tmp (the working directory is
/tmp/work) and /dev/shm; a directory that would hide the interpreter from the sandbox uid
(such as a 0700 /root) is covered by an empty tmpfs with only the interpreter's branch bound
back. When init exits, the kernel kills every process left in the namespace.
Without namespaces: a fresh working directory under a private parent, socket creation (and
ctypes and exec) blocked by an audit hook, cleanup by process group and by sandbox uid.
As root the program always runs as the sandbox uid, so RLIMIT_NPROC holds.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import select
import stat
import sys
import time
import types

import sandbox_protocol as protocol

HERE = os.path.dirname(os.path.abspath(__file__))
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIGINT, SIG_IGN = 2, 1
SIGKILL = 9  # as in `signal`, whose import (it loads enum) would slow every start

WORKDIR = "/tmp/work"
STDERR_CAP = 64 << 10
REPORT_CAP = 1 << 20
STARTED = b"+"  # init's mark on the report pipe: setup is done, the program starts now
# Audit events refused to the program when it shares the host's network namespace.
BLOCKED_EVENTS = ("socket.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                  "subprocess.")
BLOCKED_MODULES = ("_posixsubprocess",)  # starts programs without raising an audit event
_MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.signal.restype = ctypes.c_void_p


def _libc_call(name: str, *args) -> None:
    if getattr(_libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           options: str | None = None) -> None:
    encoded = [None if s is None else s.encode() for s in (source, target, fstype, options)]
    _libc_call("mount", *encoded[:3], flags, encoded[3])


# ----------------------------------------------------------------------------- supervisor


def main() -> None:
    job = marshal.loads(protocol.read_frame(0))
    limits = job["limits"]
    isolation = _enter_namespaces(job["network"])
    isolation["user"] = job["uid"]
    scratch = None
    if not isolation["namespaces"]:
        import tempfile

        scratch = tempfile.mkdtemp(prefix="moetune-sandbox-")
    stdin_fd = os.memfd_create("stdin")
    os.write(stdin_fd, job.get("stdin", "").encode())
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    report_r, report_w = os.pipe()
    started = time.monotonic()
    supervisor_fd = os.pidfd_open(os.getpid())
    init_pid = os.fork()
    if init_pid == 0:
        for fd in (out_r, err_r, report_r):
            os.close(fd)
        _init(job, isolation, supervisor_fd, (out_w, err_w, report_w, stdin_fd), scratch)
    for fd in (out_w, err_w, report_w, supervisor_fd, stdin_fd):
        os.close(fd)
    caps = {out_r: limits["max_output_bytes"], err_r: STDERR_CAP, report_r: REPORT_CAP}
    status, data = _supervise(init_pid, caps, started + limits["time_s"],
                              lambda: _kill_everything(init_pid, isolation, job["uid"]))
    os.waitpid(init_pid, 0)
    if scratch:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    report = _read_report(bytes(data[report_r]), status)
    result = {
        "status": "error" if "error" in report else status,
        "exit_code": report.get("exit_code"),
        "passed": report.get("passed"),
        "detail": report.get("error") or report.get("detail") or "",
        "stdout": bytes(data[out_r][: caps[out_r]]),
        "stderr": bytes(data[err_r][:STDERR_CAP]),
        "elapsed_s": time.monotonic() - started,
        "isolation": isolation,
    }
    protocol.write_frame(1, marshal.dumps(result))


def _read_report(raw: bytes, status: str) -> dict:
    """Init's report: the STARTED mark, then one marshal frame (if init lived to write it)."""
    if status != "ok":
        return {}
    started = raw.startswith(STARTED)
    try:
        return marshal.loads(raw[len(STARTED) if started else 0:].partition(b"\n")[2])
    except (EOFError, ValueError, TypeError):
        pass
    # Once the program runs, it may kill init (it can without a pid namespace): its loss.
    if started:
        return {"detail": "the program killed the sandbox's init process"}
    return {"error": "the sandbox init process died during setup"}


def _enter_namespaces(network: str) -> dict:
    """Unshare every namespace we use, or none; say which isolation the run gets."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if network == "auto":
        flags |= CLONE_NEWNET
    if _libc.unshare(flags) != 0:
        return {"namespaces": False, "network": "blocked", "filesystem": "shared"}
    network_isolation = "namespace" if network == "auto" else "blocked"
    return {"namespaces": True, "network": network_isolation, "filesystem": "private"}


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
    """Kill init (in a pid namespace the kernel then kills the rest), its group and its uid."""
    for kill, target in ((os.kill, init_pid), (os.killpg, init_pid)):
        try:
            kill(target, SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if not isolation["namespaces"] and uid is not None:
        _kill_uid(uid)


def _kill_uid(uid: int) -> None:
    """Kill every process of `uid`: kill(-1) from a helper that runs as that uid."""
    helper = os.fork()
    if helper == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(100):  # repeat: a fork bomb may add processes during a sweep
                os.kill(-1, SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


# ----------------------------------------------------------------------------------- init


def _init(job: dict, isolation: dict, supervisor_fd: int, fds: tuple, scratch: str | None):
    out_w, err_w, report_w, stdin_fd = fds
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    started = False
    try:
        _libc_call("prctl", PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        if select.select([supervisor_fd], [], [], 0)[0]:  # the supervisor died before prctl
            os._exit(1)
        os.close(supervisor_fd)
        _libc.signal(SIGINT, SIG_IGN)  # as pid 1, only signals we handle reach us; none then
        if isolation["namespaces"]:
            _private_filesystem(job["limits"]["disk_mb"])
            workdir = WORKDIR
        else:
            os.setpgid(0, 0)
            workdir = os.path.join(scratch, "work")
        os.mkdir(workdir, 0o700)
        if job["uid"] is not None:
            os.chown(workdir, job["uid"], job["uid"])
        os.chdir(workdir)
        _drop_privileges(job["uid"])
        os.write(report_w, STARTED)
        started = True
        if job["mode"] == "check":
            report = _judge(job, isolation)
        else:
            report = _run_script(job, isolation, stdin_fd)
    except BaseException:
        import traceback

        # Before the program starts a failure is the sandbox's; after, the program's doing.
        report = {"detail" if started else "error": traceback.format_exc(limit=-3)}
    protocol.write_frame(report_w, marshal.dumps(report))
    os._exit(0)


def _private_filesystem(disk_mb: int) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}:
        _make_reachable(prefix)
    for mount_point, flags in _mounts():
        try:
            _mount(None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            pass  # e.g. a mount shadowed by another; file permissions still apply
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in ("/tmp", "/dev/shm"):
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={disk_mb}m")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, nosuid/nodev/noexec flags to keep) for every mount we can see."""
    mounts = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            options = fields[5].split(",")
            flags = sum(flag for name, flag in _MOUNT_OPTION_FLAGS.items() if name in options)
            mounts.append((fields[4].encode().decode("unicode_escape"), flags))
    return mounts


def _make_reachable(path: str) -> None:
    """Cover each ancestor of `path` that others cannot traverse (such as a 0700 /root) with an
    empty tmpfs, and bind just the branch towards `path` back into it."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        if os.stat(ancestor).st_mode & stat.S_IXOTH:
            continue
        branch = "/" + "/".join(parts[: depth + 1])
        branch_fd = os.open(branch, os.O_PATH | os.O_DIRECTORY)
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=16k")
        os.mkdir(branch)
        _mount(f"/proc/self/fd/{branch_fd}", branch, None, MS_BIND | MS_REC)
        os.close(branch_fd)


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


def _judge(job: dict, isolation: dict) -> dict:
    import sandbox_judge  # check mode only: it brings json, which script runs need not load

    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    program = os.fork()
    if program == 0:
        _program(job, isolation, os.open(os.devnull, os.O_RDONLY), keep=(requests_r, replies_w),
                 serve=lambda module: sandbox_judge.serve_calls(module, requests_r, replies_w))
    os.close(requests_r)
    os.close(replies_w)
    test = marshal.loads(protocol.read_frame(0))
    os.close(0)
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
    except BaseException:
        _print_exception()
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
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
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
        exec(compile(source, "<program>", "exec"), module.__dict__)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            _exit((stop.code or 0) & 0xFF)
        print(stop.code, file=sys.stderr)
        _exit(1)
    except BaseException:
        _print_exception()
        _exit(1)
    return module


def _print_exception() -> None:
    import traceback  # only on failure: it costs a run several milliseconds

    traceback.print_exc()


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
