"""Rollout engines on machines of their own (`moetune rollout serve`), seen from the trainer.

A `RemoteWorker` stands where a local worker process would in a RolloutPool: the same
requests and answers (moetune.rl.rollout_worker) travel over a TCP connection authenticated
as multiprocessing's Listener/Client do (HMAC challenge on a shared key), with every read
and write of the handshake bounded in time so that a hung or foreign peer cannot stall
either side. Weights travel over a two-rank process group of their own
(moetune.rl.weight_group). Whoever holds the key can make the engine run code (requests are
pickles): serve on a network you trust.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import time
from multiprocessing.connection import (
    AuthenticationError,
    Connection,
    answer_challenge,
    deliver_challenge,
    wait,
)

import torch

from moetune.rl import weight_group
from moetune.rl.rollout_worker import Answer, EngineLink, WorkerFailure

logger = logging.getLogger(__name__)

KEY_VARIABLE = "MOETUNE_ROLLOUT_KEY"


def authkey_from_environment() -> bytes:
    key = os.environ.get(KEY_VARIABLE, "")
    if not key:
        raise ValueError(
            f"remote rollout engines: set {KEY_VARIABLE} to the key the servers "
            f"were started with (`moetune rollout serve` reads the same variable)"
        )
    return key.encode()


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"rollout.remote: {address!r} is not host:port")
    return host, int(port)


def limit_io(sock: socket.socket, seconds: float) -> None:
    """Make each blocking read or write on `sock` fail after `seconds` (0: wait forever)."""
    value = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class TCPConnection(Connection):
    """A Connection that sends plain pickles: tensors travel by value. (multiprocessing's
    pickler, which torch extends, would send them as shared-memory handles, which only
    processes of the same machine can open.)"""

    def send(self, obj) -> None:
        self.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self):
        return pickle.loads(self.recv_bytes())


def authenticated(
    sock: socket.socket, authkey: bytes, server: bool, handshake_s: float, io_s: float
) -> TCPConnection:
    """A Connection over a connected socket after the mutual HMAC handshake (what
    multiprocessing's Listener.accept / Client do), which must finish within handshake_s.
    Raises AuthenticationError on a wrong key, OSError or EOFError on a silent or closed peer."""
    with sock:
        sock.settimeout(None)  # blocking: Connection reads the raw descriptor
        limit_io(sock, handshake_s)
        conn = TCPConnection(os.dup(sock.fileno()))
        try:
            if server:
                deliver_challenge(conn, authkey)
                answer_challenge(conn, authkey)
            else:
                answer_challenge(conn, authkey)
                deliver_challenge(conn, authkey)
        except AssertionError as error:  # answer_challenge's check of the greeting
            conn.close()
            raise AuthenticationError(f"not a moetune rollout peer: {error}") from None
        except BlockingIOError:  # what a read or write past SO_RCVTIMEO / SO_SNDTIMEO raises
            conn.close()
            raise TimeoutError(f"no handshake within {handshake_s:.1f} s") from None
        except BaseException:
            conn.close()
            raise
        limit_io(sock, io_s)
    return conn


class RemoteWorker(EngineLink):
    """One `moetune rollout serve` engine at `address` ("host:port") and the connection to it.

    On `connect` the trainer (this process, rank 0) and the engine (rank 1) join a fresh
    weight group through `store` (gloo; NCCL when both sides have GPUs). A request
    ("receive", tensors) sends the tensors' names, shapes and dtypes over the connection and
    their data over the group."""

    def __init__(
        self,
        index: int,
        address: str,
        authkey: bytes,
        store: torch.distributed.TCPStore,
        timeout_s: float,
    ):
        self.index, self.address, self.authkey = index, address, authkey
        self.host, self.port = parse_address(address)
        self.store, self.timeout_s = store, timeout_s
        self.conn = self.group = self.failure = None
        self.device = torch.device("cpu")
        self.info: dict = {}  # the engine's ready message: backend, dtype, max_model_len, ...
        self.local_host = ""  # this machine's address on the connection (gloo binds to it)
        self.connections = 0
        self.early: list[Answer] = []  # answers read before their turn (see push_bucket)

    @property
    def label(self) -> str:
        return self.address

    @property
    def down(self) -> bool:
        return self.conn is None

    @property
    def pid(self) -> None:
        return None  # its process is on another machine

    def connect(self, within_s: float) -> None:
        """Connect (retrying while the server is unreachable or busy), read its ready message
        and join a new weight group. RuntimeError naming the address if that fails, or takes
        longer than within_s."""
        deadline = time.monotonic() + within_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = socket.create_connection((self.host, self.port), timeout=max(remaining, 0.1))
                self.local_host = sock.getsockname()[0]
                self.conn = authenticated(
                    sock,
                    self.authkey,
                    server=False,
                    handshake_s=max(min(remaining, self.timeout_s), 0.1),
                    io_s=self.timeout_s,
                )
                self.info = self.receive(max(remaining, 0.1)).value
                break
            except AuthenticationError as error:
                self.kill()
                raise RuntimeError(
                    f"rollout worker {self.index} ({self.address}): the server "
                    f"rejected the key ({error}); {KEY_VARIABLE} must match "
                    f"the server's"
                ) from None
            except (OSError, EOFError, WorkerFailure) as error:
                self.kill()
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"rollout worker {self.index} ({self.address}) could not "
                        f"be reached within {within_s:.0f} s: {error}"
                    ) from error
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        self.join()

    def join(self) -> None:
        """Form the weight group: NCCL when both sides have GPUs, else gloo."""
        backend = "nccl" if torch.cuda.is_available() and self.info["cuda"] else "gloo"
        self.connections += 1
        prefix = f"{self.index}/{self.connections}"
        try:
            self.conn.send(("join_group", (self.store.port, prefix, backend, self.timeout_s)))
            self.group = weight_group.join(
                self.store, prefix, 0, backend, self.timeout_s, self.local_host
            )
            self.receive(self.timeout_s)
        except (OSError, RuntimeError, WorkerFailure) as error:
            self.kill()
            raise RuntimeError(
                f"rollout worker {self.index} ({self.address}): no {backend} "
                f"weight group with the engine ({error}); it connects back to "
                f"this machine's port {self.store.port}"
            ) from error
        self.device = weight_group.device_of(backend)

    def send(self, method: str, *args) -> None:
        try:
            if method == "receive":
                self.send_bucket(*args, self.device)
            else:
                self.conn.send((method, args))
        except (OSError, RuntimeError) as error:  # torch.distributed's errors are RuntimeErrors
            self.failure = f"failed during {method!r} ({error})"
        except WorkerFailure as failure:
            self.failure = f"{failure} during {method!r}"

    def read(self, timeout: float) -> Answer:
        """The next answer on the connection, whatever its status. WorkerFailure if the
        connection dropped or nothing came within `timeout` seconds. Its `started` is put on
        this machine's clock (the engine's is another's): the answer is placed to end when it
        was read."""
        if not wait([self.conn], timeout):
            raise WorkerFailure(f"did not answer within {timeout:.1f} s")
        try:
            reply = Answer(*self.conn.recv())
        except (EOFError, OSError) as error:
            raise WorkerFailure(f"dropped the connection ({error or 'end of file'})") from None
        return reply._replace(started=time.monotonic() - reply.seconds)

    def kill(self) -> None:
        """Drop the connection and the group (the server then waits for the next trainer)."""
        if self.conn is not None:
            self.conn.close()
        self.conn = self.group = self.failure = None
        self.early = []

    def stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.kill()
