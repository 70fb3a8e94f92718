"""Assert-style tests judged outside the untrusted program's process.

The candidate process (untrusted) has executed `prefix + code`; `serve_calls` then answers
calls: a request names a function and carries plain-data arguments, a reply carries a
plain-data result or the name of the exception raised. The judge process (trusted: it runs
only the dataset's prefix and test) defines the prefix, puts a `RemoteFunction` in place of
the entry point and runs `check(candidate)`; the verdict is whether `check` returned.

So the program never runs the assertions: exiting early, printing "passed", patching its own
builtins or `AssertionError`, or returning objects whose `__eq__` always says yes (they cannot
be encoded) cannot make a test pass.
"""

from __future__ import annotations

import builtins
import json
import traceback
import types

import sandbox_protocol as protocol


class CandidateExited(RuntimeError):
    """The candidate process ended (or closed its channel) before answering a call."""


class RemoteFunction:
    """Calls a function of the candidate process, passing plain data both ways."""

    def __init__(self, name: str, requests_fd: int, replies_fd: int):
        self.__name__ = name
        self._requests_fd = requests_fd
        self._replies_fd = replies_fd

    def __call__(self, *args, **kwargs):
        request = {
            "name": self.__name__,
            "args": protocol.encode_value(list(args)),
            "kwargs": {key: protocol.encode_value(value) for key, value in kwargs.items()},
        }
        try:
            protocol.write_frame(self._requests_fd, json.dumps(request).encode())
            payload = protocol.read_frame(self._replies_fd)
        except BrokenPipeError:
            payload = None
        if payload is None:
            raise CandidateExited(f"the program exited before answering a call to {self.__name__}")
        reply = json.loads(payload)
        if "value" in reply:
            return protocol.decode_value(reply["value"])
        raise _remote_exception(reply.get("raised"), reply.get("message"))


def _remote_exception(name: object, message: object) -> Exception:
    """The builtin exception the candidate raised, or a RuntimeError naming a non-builtin one."""
    kind = getattr(builtins, name, None) if isinstance(name, str) else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(str(message))
    return RuntimeError(f"the program raised {name}: {message}")


def serve_calls(module: types.ModuleType, requests_fd: int, replies_fd: int) -> None:
    """Answer calls to the functions of `module` (the program) until the judge hangs up."""
    while (payload := protocol.read_frame(requests_fd)) is not None:
        request = json.loads(payload)
        try:
            function = getattr(module, request["name"])
            args = protocol.decode_value(request["args"])
            kwargs = {key: protocol.decode_value(value) for key, value in request["kwargs"].items()}
            reply = json.dumps({"value": protocol.encode_value(function(*args, **kwargs))})
        except Exception as error:  # noqa: BLE001 -- the program's failure goes to the judge
            reply = json.dumps({"raised": type(error).__name__, "message": str(error)[:500]})
        protocol.write_frame(replies_fd, reply.encode())


def run_check(
    prefix: str, test: str, entry_point: str, requests_fd: int, replies_fd: int
) -> tuple[bool, str]:
    """Run the dataset's `check(candidate)` against the remote entry point: (passed, detail)."""
    candidate = RemoteFunction(entry_point, requests_fd, replies_fd)
    namespace: dict = {"__name__": "__main__"}
    try:
        exec(compile(prefix, "<prefix>", "exec"), namespace)  # noqa: S102 -- the dataset's
        namespace[entry_point] = candidate
        exec(compile(test, "<test>", "exec"), namespace)  # noqa: S102 -- the dataset's
        namespace["check"](candidate)
    except BaseException:  # noqa: BLE001 -- any way the test stops short is a failure
        return False, traceback.format_exc(limit=-2)
    return True, ""
