"""`moetune rollout serve`: one rollout engine on a machine of its own, for GRPO trainers
elsewhere (vLLM tensor parallel over this machine's GPUs, or moetune's native model).

    MOETUNE_ROLLOUT_KEY=secret moetune rollout serve --model DIR --tensor-parallel-size 8

Trainers use it with `rollout.remote: [host:port]` and the same key in their environment.
It answers one trainer at a time, with the requests and the engine code of a local rollout
worker (moetune.rl.rollout_worker); a new connection replaces the current one (a trainer
reconnecting after a timeout). Weights arrive over the torch.distributed group the trainer
forms on connect (moetune.rl.weight_group): the trainer pushes every weight it has synced,
so the engine may start from any checkpoint of the same architecture.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import time
from multiprocessing.connection import AuthenticationError, wait
from pathlib import Path

import torch

from moetune.rl.rollout_remote import KEY_VARIABLE, TCPConnection, authenticated
from moetune.rl.rollout_worker import EngineSpec, Requests, answer, build_engine, respond

logger = logging.getLogger(__name__)

DEFAULT_PORT = 51200
SERVED_GPU_MEMORY_UTILIZATION = 0.9  # a served engine's GPUs are its own
HANDSHAKE_S = 30.0  # a connecting peer must authenticate within this
IO_S = 600.0  # the longest a single read or write to the trainer may block


def read_authkey(file: str | None) -> bytes:
    """The key from --authkey-file, else $MOETUNE_ROLLOUT_KEY; ValueError when there is none."""
    if file:
        key = Path(file).read_bytes().strip()
        if not key:
            raise ValueError(f"--authkey-file {file} is empty")
        return key
    key = os.environ.get(KEY_VARIABLE, "").encode()
    if not key:
        raise ValueError(
            f"no authkey: set {KEY_VARIABLE} or pass --authkey-file (trainers "
            f"connect with the same key in {KEY_VARIABLE})"
        )
    return key


class EngineServer:
    """Serves `engine` to one authenticated trainer at a time over `listener`."""

    def __init__(self, engine, info: dict, listener: socket.socket, authkey: bytes):
        self.engine, self.info, self.listener, self.authkey = engine, info, listener, authkey

    def serve_forever(self) -> None:
        conn = requests = None
        while True:
            waiting = [self.listener] if conn is None else [self.listener, conn]
            # requests held back by a partial rollout are answered before any new connection
            if (requests is None or not requests.backlog) and self.listener in wait(waiting):
                accepted = self.accept()
                if accepted is not None:
                    if conn is not None:
                        logger.warning("a new trainer connection replaces the current one")
                        conn.close()
                    conn, requests = accepted
                continue
            try:
                request = requests.next_request()
                if request is not None:
                    respond(conn, requests, request)
                    continue
                logger.info("the trainer closed the connection")
            except (EOFError, OSError) as error:
                logger.warning("lost the trainer (%s)", error or "end of file")
            conn.close()
            conn = requests = None

    def accept(self) -> tuple[TCPConnection, Requests] | None:
        sock, (host, port, *_) = self.listener.accept()
        local_host, conn = sock.getsockname()[0], None
        try:
            conn = authenticated(
                sock, self.authkey, server=True, handshake_s=HANDSHAKE_S, io_s=IO_S
            )
            conn.send(answer("ok", self.info, "connect", time.monotonic()))
        except (AuthenticationError, OSError, EOFError) as error:
            if conn is not None:
                conn.close()
            logger.warning("refused a connection from %s:%d: %s", host, port, error)
            return None
        logger.info("trainer connected from %s:%d", host, port)
        return conn, Requests(self.engine, host, local_host, conn)


def run(args) -> int:
    try:
        authkey = read_authkey(args.authkey_file)
        if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "--backend vllm needs vLLM (pip install 'moetune[gpu]' or "
                "'moetune[cpu]'); or use --backend native"
            )
    except (OSError, ValueError) as error:
        print(f"moetune rollout serve: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    spec = EngineSpec(
        args.model,
        args.backend,
        args.dtype,
        args.max_model_len,
        args.tensor_parallel_size,
        args.gpu_memory_utilization,
        args.seed,
        return_routed_experts=args.return_routed_experts,
        speculative_tokens=args.speculative_tokens,
        enable_expert_parallel=args.enable_expert_parallel,
        max_lora_rank=args.max_lora_rank if args.backend == "vllm" else 0,
    )
    engine = build_engine(spec)
    info = {
        "backend": args.backend,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size,
        "cuda": torch.cuda.is_available(),
        "max_lora_rank": spec.max_lora_rank,  # vLLM: the LoRA ranks it can apply (0: none)
        "speculative_tokens": args.speculative_tokens,
        "seconds": time.perf_counter() - start,
    }
    with socket.create_server((args.host, args.port)) as listener:
        host, port = listener.getsockname()[:2]
        print(
            f"moetune rollout: {args.backend} engine on {args.model} ready in "
            f"{info['seconds']:.1f} s, serving at {host}:{port}",
            flush=True,
        )
        try:
            EngineServer(engine, info, listener, authkey).serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser("rollout", help="rollout engines on machines of their own")
    commands = parser.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve one rollout engine to GRPO trainers over TCP",
        description=__doc__.split("\n\n")[0],
    )
    serve.add_argument(
        "--model",
        required=True,
        help="checkpoint folder (config.json + weights) the engine starts from",
    )
    serve.add_argument("--backend", choices=("vllm", "native"), default="vllm")
    serve.add_argument(
        "--speculative-tokens",
        type=int,
        default=0,
        help="tokens drafted per round by the checkpoint's MTP modules (0: off)",
    )
    serve.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="GPUs of this machine the vLLM engine spans (default 1)",
    )
    serve.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help=(
            "vLLM shards the routed experts over the tensor-parallel GPUs instead of splitting "
            "each expert (its enable_expert_parallel; GPUs, not tested on CPU)"
        ),
    )
    serve.add_argument(
        "--max-lora-rank",
        type=int,
        default=0,
        help=(
            "vLLM applies the trainers' LoRA adapter itself, up to this rank (one of vLLM's "
            "max_lora_rank values: 8, 16, 32, ...), so a sync sends the adapter alone; see "
            "rollout.lora_sync (default 0: LoRA off, merged weights)"
        ),
    )
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    serve.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="longest prompt + completion in tokens (default 4096)",
    )
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=SERVED_GPU_MEMORY_UTILIZATION,
        help="vLLM's share of each GPU (default 0.9: the GPUs are its own)",
    )
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument(
        "--return-routed-experts",
        action="store_true",
        help="report each token's experts (routing replay; vLLM on GPU)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0: any free port, printed)",
    )
    serve.add_argument(
        "--authkey-file",
        help=f"file holding the shared key (default: ${KEY_VARIABLE}; one of them is required)",
    )
    serve.set_defaults(func=run)
