"""The sandbox against hostile programs: each scores 0, returns within its time limit plus one
second, and leaves this process and the machine as they were. Real subprocesses throughout."""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from moetune.rewards import sandbox as sandbox_module
from moetune.rewards.code_tests import code_tests
from moetune.rewards.sandbox import CheckJob, Sandbox, SandboxError, SandboxLimits, ScriptJob
from moetune.rewards.sandbox_protocol import decode_value, encode_value

TIME_S = 2.0
FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def score_program(code: str, expected: str = "pwned") -> tuple[float, float]:
    """code_tests' reward for a program whose only case expects `expected`, and the wall time."""
    start = time.monotonic()
    [reward] = code_tests([""], [code], [{"inputs": [""], "outputs": [expected]}], time_s=TIME_S)
    return reward, time.monotonic() - start


def uid_processes(uid: int) -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        real_uid = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
        count += int(real_uid) == uid
    return count


@pytest.fixture
def sandbox_factory():
    """Sandbox(**kwargs) that is closed after the test."""
    made = []

    def make(**kwargs) -> Sandbox:
        made.append(Sandbox(**kwargs))
        return made[-1]

    yield make
    for sandbox in made:
        sandbox.close()


@pytest.fixture
def canary():
    """A world-writable directory outside the sandbox's /tmp, holding a world-writable file."""
    directory = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="moetune-canary-"))
    directory.chmod(0o777)
    (directory / "canary.txt").write_text("still here")
    (directory / "canary.txt").chmod(0o666)
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


@pytest.mark.integration
def test_isolation_report(sandbox_factory):
    # What this project's machines (root, CAP_SYS_ADMIN) give; elsewhere the report differs:
    # network "blocked" by the audit hook, no namespaces, or no uid of its own.
    assert sandbox_factory(concurrency=1).isolation() == {
        "namespaces": True,
        "network": "namespace",
        "filesystem": "private",
        "user": 61000,
    }


@pytest.mark.integration
def test_working_directory_is_fresh_and_limits_are_set(sandbox_factory):
    code = """
import os, resource
print(sorted(os.listdir(".")), os.getcwd())
open("left-behind.txt", "w").write("x")
print([resource.getrlimit(r)[0] for r in (resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE,
                                           resource.RLIMIT_CORE, resource.RLIMIT_FSIZE)])
print(os.getuid() != 0, sorted(os.environ))
"""
    limits = SandboxLimits(time_s=TIME_S, max_processes=7, max_open_files=33, max_file_bytes=4096)
    sandbox = sandbox_factory(concurrency=1)
    for _ in range(2):  # the second run must not see the first one's file
        run = sandbox.run(ScriptJob(code), limits)
        assert run.status == "ok" and run.exit_code == 0, run.stderr
        assert run.stdout.splitlines() == [
            "[] /tmp/work",
            "[7, 33, 0, 4096]",
            "True ['HOME', 'LANG', 'PATH', 'TMPDIR']",
        ]


@pytest.mark.integration
def test_a_run_never_silently_loses_its_namespaces():
    """Without CAP_SYS_ADMIN (a default container's root) unshare fails: a first run falls back
    and says so; a sandbox that found namespaces before refuses to run without them."""
    rewards = Path(sandbox_module.__file__).parent
    probe = (
        f"import sys; sys.path.insert(0, {str(rewards)!r}); import sandbox_kernel as k; "
        "print(k.enter_namespaces('auto', required=False)); "
        "k.enter_namespaces('auto', required=True)"
    )
    done = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin",
            "--inh-caps=-sys_admin",
            "--",
            sys.executable,
            "-I",
            "-S",
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.strip() == str(
        {"namespaces": False, "network": "blocked", "filesystem": "shared"}
    )
    assert "PermissionError: [Errno 1] unshare: Operation not permitted" in done.stderr


@pytest.mark.integration
def test_infinite_loop():
    reward, elapsed = score_program("while True:\n    pass\n")
    assert reward == 0.0 and elapsed < TIME_S + 1


@pytest.mark.integration
def test_fork_bomb_is_capped_by_the_sandbox_uid(sandbox_factory):
    sandbox = sandbox_factory(concurrency=1, uid_base=62000)
    limits = SandboxLimits(time_s=TIME_S, max_processes=8)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], uid_processes(62000))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        run = sandbox.run(ScriptJob(FORK_BOMB), limits)
        elapsed = time.monotonic() - start
    finally:
        done.set()
        watcher.join()
    assert run.status == "timeout" and elapsed < TIME_S + 1, (run, elapsed)
    # The bomb ran, and root's RLIMIT_NPROC exemption did not: an uncapped bomb reaches
    # hundreds. /proc sampling can catch up to two exiting, not yet reaped tasks on top.
    assert 2 <= peak[0] <= limits.max_processes + 2, peak
    assert uid_processes(62000) == 0  # nothing survives the run
    assert score_program(FORK_BOMB)[0] == 0.0


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(1 << 40)\nprint('pwned')",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 26))\n",
    ],
)
@pytest.mark.integration
def test_memory_bomb(code):
    reward, elapsed = score_program(code)
    assert reward == 0.0 and elapsed < TIME_S + 1


@pytest.mark.integration
def test_gigabytes_of_output(sandbox_factory):
    code = (
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.stdout.write(chunk)\n"
    )
    reward, elapsed = score_program(code, expected="x")
    assert reward == 0.0 and elapsed < TIME_S + 1
    run = sandbox_factory(concurrency=1).run(ScriptJob(code), SandboxLimits(time_s=TIME_S))
    assert run.status == "output_limit" and len(run.stdout) == SandboxLimits().max_output_bytes


@pytest.mark.integration
def test_writing_outside_the_working_directory(canary):
    escape = f"moetune-escape-{os.getpid()}"
    targets = [canary / "new.txt", f"/tmp/{escape}", f"../{escape}", Path(__file__).parent / escape]
    code = f"""
wrote = []
for target in {[str(t) for t in targets]!r}:
    try:
        with open(target, "w") as handle:
            handle.write("pwned")
        wrote.append(target)
    except OSError:
        pass
print("pwned" if {str(canary / "new.txt")!r} in wrote else "blocked")
"""
    reward, elapsed = score_program(code)
    assert reward == 0.0 and elapsed < TIME_S + 1
    assert not (canary / "new.txt").exists()
    assert not Path(f"/tmp/{escape}").exists()
    assert not (Path(__file__).parent / escape).exists()


@pytest.mark.integration
def test_deleting_files(canary):
    code = f"""
import os, shutil
for action in (lambda: os.remove({str(canary / "canary.txt")!r}),
               lambda: shutil.rmtree({str(canary)!r})):
    try:
        action()
    except OSError:
        pass
print("pwned" if not os.path.exists({str(canary / "canary.txt")!r}) else "blocked")
"""
    reward, elapsed = score_program(code)
    assert reward == 0.0 and elapsed < TIME_S + 1
    assert (canary / "canary.txt").read_text() == "still here"


@pytest.mark.integration
def test_reading_the_parent_environment(monkeypatch, sandbox_factory):
    secret = f"secret-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("MOETUNE_TEST_SECRET", secret)
    code = f"""
import os
found = [value for value in os.environ.values() if value.startswith("secret-")]
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["{os.getpid()}", "{os.getppid()}"]:
    try:
        found += [e for e in open(f"/proc/{{pid}}/environ", "rb").read().split(b"\\0")
                  if e.startswith(b"MOETUNE_TEST_SECRET")]
    except OSError:
        pass
print(found[0].split("=")[-1] if found and isinstance(found[0], str)
      else found[0].decode().split("=")[-1] if found else "nothing")
"""
    reward, elapsed = score_program(code, expected=secret)
    assert reward == 0.0 and elapsed < TIME_S + 1
    run = sandbox_factory(concurrency=1).run(ScriptJob(code), SandboxLimits(time_s=TIME_S))
    assert run.stdout == "nothing\n"


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def connect_program(port: int) -> str:
    return f"""
import socket
try:
    connection = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    connection.sendall(b"pwned")
    print("pwned")
except Exception as error:
    print(type(error).__name__, error)
"""


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


@pytest.mark.integration
def test_opening_a_socket(listener):
    code = connect_program(listener.getsockname()[1])
    reward, elapsed = score_program(code)
    assert reward == 0.0 and elapsed < TIME_S + 1
    assert_no_connection(listener)


@pytest.mark.integration
def test_opening_a_socket_without_a_network_namespace(listener, sandbox_factory):
    """The fallback: socket creation refused by an audit hook in the program's process."""
    sandbox = sandbox_factory(concurrency=1, network="block")
    assert sandbox.isolation()["network"] == "blocked"
    run = sandbox.run(
        ScriptJob(connect_program(listener.getsockname()[1])), SandboxLimits(time_s=TIME_S)
    )
    assert run.stdout.startswith("PermissionError sandbox: socket.") and "not allowed" in run.stdout
    assert_no_connection(listener)
    escape = sandbox.run(ScriptJob("import os\nos.system('echo pwned')\n"))
    assert "pwned" not in escape.stdout and "os.system is not allowed" in escape.stderr


@pytest.mark.integration
def test_killing_the_parent():
    code = f"""
import os
for pid in (os.getppid(), 1, -1, {os.getpid()}, {os.getppid()}):
    try:
        os.kill(pid, 9)
    except OSError:
        pass
print("pwned")
"""
    reward, elapsed = score_program(code, expected="survived")
    assert reward == 0.0 and elapsed < TIME_S + 1
    assert score_program("print('fine')", expected="fine")[0] == 1.0  # and we carry on


# Assert-style tests: the program tries to fake a pass instead of implementing add().
ADD_TEST = (
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
)
FORGERIES = {
    "exit 0 before the tests": "import sys\nsys.exit(0)\ndef add(a, b):\n    return 0\n",
    "hard exit 0": "import os\nprint('passed')\nos._exit(0)\n",
    "exit inside the function": "def add(a, b):\n    raise SystemExit(0)\n",
    "print passed": "def add(a, b):\n    print('All tests passed')\n    return 0\n",
    "replace AssertionError": (
        "import builtins\nbuiltins.AssertionError = type('AssertionError', (Exception,), {})\n"
        "def add(a, b):\n    return 0\n"
    ),
    "silence print and assert": (
        "import builtins\nbuiltins.print = lambda *a, **k: None\n"
        "import sys\nsys.settrace(lambda *a: None)\ndef add(a, b):\n    return 0\n"
    ),
    "always-equal result": (
        "class Equal:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Equal()\n"
    ),
    "int subclass result": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Int(0)\n"
    ),
    "kill the judge": (
        "import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\ndef add(a, b):\n    return 0\n"
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", FORGERIES)
def test_a_program_cannot_fake_a_pass(name):
    tests = {"test": ADD_TEST, "entry_point": "add"}
    start = time.monotonic()
    rewards = code_tests(
        ["", ""],
        [FORGERIES[name], "def add(a, b):\n    return a + b\n"],
        [tests, tests],
        time_s=TIME_S,
    )
    assert rewards == [0.0, 1.0]
    assert time.monotonic() - start < TIME_S + 1


@pytest.mark.integration
def test_the_program_never_holds_the_test(sandbox_factory):
    """The judge reads the test only after the program's process exists, so searching its own
    memory finds the program's marker but not the test's."""
    snoop = """
import gc
OWN = "OWN_" + "MARKER"
def add():
    dicts = [repr(o) for o in gc.get_objects() if type(o) is dict]
    return [any(needle in text for text in dicts) for needle in (OWN, "SECRET_" + "EXPECTATION")]
"""
    test = (
        "def check(candidate):\n    SECRET_EXPECTATION = 0\n"
        "    assert candidate() == [True, False]\n"
    )
    run = sandbox_factory(concurrency=1).run(
        CheckJob(snoop, test, "add"), SandboxLimits(time_s=TIME_S)
    )
    assert run.passed is True, run.detail


@pytest.mark.integration
def test_pool_runs_in_parallel_up_to_its_concurrency(sandbox_factory):
    sandbox = sandbox_factory(concurrency=2)
    start = time.monotonic()
    runs = sandbox.run_all([ScriptJob("import time\ntime.sleep(0.5)\nprint('done')")] * 4)
    elapsed = time.monotonic() - start
    assert [run.stdout for run in runs] == ["done\n"] * 4
    assert 1.0 <= elapsed < 2.0
    assert {run.isolation["user"] for run in runs} == {61000, 61001}  # one uid per slot


@pytest.mark.integration
def test_a_dead_launcher_is_reported_and_replaced(sandbox_factory):
    sandbox = sandbox_factory(concurrency=1)
    assert sandbox.run(ScriptJob("print(1)")).stdout == "1\n"
    os.kill(sandbox._launchers[0].process.pid, 9)  # white-box: the slot's launcher dies
    with pytest.raises(SandboxError, match="launcher died"):
        sandbox.run(ScriptJob("print(2)"))
    assert sandbox.run(ScriptJob("print(3)")).stdout == "3\n"


def test_value_codec():
    value = [
        None,
        True,
        3,
        2.5,
        "s",
        b"\x00",
        1j,
        (1, [2]),
        {"k": {3}},
        frozenset({4}),
        {(1, 2): 1},
    ]
    assert decode_value(encode_value(value)) == value
    assert [type(v) for v in decode_value(encode_value(value))] == [type(v) for v in value]

    class Int(int):
        pass

    for unsendable in (Int(1), object(), [lambda: 0]):
        with pytest.raises(TypeError):
            encode_value(unsendable)
    for malformed in ({"eval": "1"}, {"tuple": 1}, {"a": [], "b": []}):
        with pytest.raises(ValueError):
            decode_value(malformed)
