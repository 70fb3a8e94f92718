"""What the sandbox needs from Linux that Python 3.11's os module lacks: unshare, mount and
prctl through libc, and the private filesystem view built with them.

Runs inside the sandbox's own interpreter, like `sandbox_supervisor`: standard library only.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

WORKDIR = "/tmp/work"
_MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


def _call(name: str, *args) -> None:
    if getattr(_libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, options: str | None = None
) -> None:
    encoded = [None if s is None else s.encode() for s in (source, target, fstype, options)]
    _call("mount", *encoded[:3], flags, encoded[3])


def prctl(option: int, value: int) -> None:
    _call("prctl", option, value, 0, 0, 0)


def enter_namespaces(network: str, required: bool) -> dict:
    """Unshare every namespace we use, or none; say which isolation the run gets. A sandbox
    that found namespaces before requires them: a failure then is an error, not a downgrade."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if network == "auto":
        flags |= CLONE_NEWNET
    for attempt in range(3 if required else 1):
        if _libc.unshare(flags) == 0:
            network_isolation = "namespace" if network == "auto" else "blocked"
            return {"namespaces": True, "network": network_isolation, "filesystem": "private"}
        time.sleep(0.05 * (attempt + 1))
    if required:
        raise OSError(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")
    return {"namespaces": False, "network": "blocked", "filesystem": "shared"}


def private_filesystem(disk_mb: int) -> None:
    """In a fresh mount namespace: every mount read-only, a fresh /proc (of our pid namespace),
    private tmpfs on /tmp (holding the working directory, WORKDIR) and /dev/shm, and the
    interpreter reachable for an unprivileged uid."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}:
        _make_reachable(prefix)
    for mount_point, flags in _mount_points():
        try:
            mount(None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            pass  # e.g. a mount shadowed by another; file permissions still apply
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in ("/tmp", "/dev/shm"):
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={disk_mb}m")


def _mount_points() -> list[tuple[str, int]]:
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
        mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=16k")
        os.mkdir(branch)
        mount(f"/proc/self/fd/{branch_fd}", branch, None, MS_BIND | MS_REC)
        os.close(branch_fd)
