"""Remote rollout engines: `moetune rollout serve` in a subprocess, a RolloutPool with
remote=[address] over TCP, weights over a gloo group. Generation agrees with the trainer's
model, a sync lands (the engine's logprobs equal the trainer's), a restarted server is
reconnected and re-synced, a server that stays down or hangs is named in the error, the key
is required, and a GRPO run trains against a served engine."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_grpo import FRESH
from tiny_configs import save_biased_tiny_arith

from moetune.config.build import RecipeError
from moetune.model import DeepseekV3ForCausalLM
from moetune.model.lora import LoraSpec, apply_lora
from moetune.recipes.cli import main
from moetune.rl import weight_group
from moetune.rl.data_parallel import DataParallel
from moetune.rl.engine_weights import adapter_stream, weight_stream
from moetune.rl.grpo import remote_engines
from moetune.rl.pool_share import PoolShare
from moetune.rl.rollout import RolloutPool, SamplingSpec
from moetune.rl.rollout_worker import completion_logprobs

KEY = "remote-test-key"
PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [7, 1, 2], [60, 61]]
COMPLETIONS = [[11, 12, 13, 14], [40, 41], [90]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny_arith with seed-1 weights and a non-zero router bias: not what a fresh trainer has."""
    return save_biased_tiny_arith(tmp_path_factory.mktemp("remote") / "model", seed=1)


class Server:
    """A `moetune rollout serve` subprocess (output in folder/server.log); `start` (re)starts
    it on the same address."""

    def __init__(self, model: Path, folder: Path, backend: str = "native"):
        self.model, self.log, self.backend = model, folder / "server.log", backend
        self.process: subprocess.Popen | None = None
        self.address = "127.0.0.1:0"  # port 0 until the first start picks one

    def start(self) -> None:
        started = self.log.read_text().count("serving at") if self.log.exists() else 0
        with open(self.log, "a") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "moetune.recipes",
                    "rollout",
                    "serve",
                    "--model",
                    str(self.model),
                    "--backend",
                    self.backend,
                    "--dtype",
                    "float32",
                    "--max-model-len",
                    "256",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    self.address.rpartition(":")[2],
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, MOETUNE_ROLLOUT_KEY=KEY, OMP_NUM_THREADS="1"),
            )
        deadline = time.monotonic() + 120
        while (text := self.log.read_text()).count("serving at") == started:
            assert self.process.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.1)
        self.address = re.findall(r"serving at (\S+:\d+)", text)[-1]

    def running(self) -> str:
        """The address, after a (re)start if the server is not running."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self.address

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # it may have been stopped
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def native_server(checkpoint, tmp_path_factory):
    server = Server(checkpoint, tmp_path_factory.mktemp("native"))
    yield server
    server.stop()


@pytest.fixture
def served(native_server) -> str:
    """The native server's address ((re)started if an earlier test stopped it)."""
    return native_server.running()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("MOETUNE_ROLLOUT_KEY", KEY)


def stepped(checkpoint: Path) -> DeepseekV3ForCausalLM:
    """The checkpoint's model after one SGD step on random gradients."""
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model


def assert_scores_match(pool, model, atol):
    theirs = pool.score(PROMPTS, COMPLETIONS)
    ours = completion_logprobs(model, PROMPTS, COMPLETIONS)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=atol)
    return theirs


def test_weight_group_moves_mixed_tensors_in_several_buckets():
    """Two ranks in two threads: every dtype and shape arrives intact, bucket after bucket
    (at most 1 KiB each, a larger tensor alone)."""
    tensors = {
        "w": torch.randn(10, 7),
        "half": torch.randn(300).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(5),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "big": torch.randn(600),
    }
    store, cpu = weight_group.open_store(10), torch.device("cpu")
    received, names = {}, []
    with ThreadPoolExecutor(1) as thread:
        client = weight_group.connect_store("127.0.0.1", store.port, 10)
        engine = thread.submit(weight_group.join, client, "test", 1, "gloo", 10, "127.0.0.1")
        trainer = weight_group.join(store, "test", 0, "gloo", 10, "127.0.0.1")
        for bucket in weight_group.buckets(tensors.items(), 1024):  # each used before the next
            names.append([name for name, _, _ in bucket.specs])
            answer = thread.submit(weight_group.receive, engine.result(), bucket.specs, cpu)
            weight_group.push(trainer, bucket, cpu)
            received |= {name: t.clone() for name, t in answer.result().items()}
    assert names == [["w", "half", "scalar"], ["ids", "fp8"], ["big"]]  # 64-byte aligned
    assert list(received) == list(tensors)
    for name, tensor in tensors.items():
        assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape
        assert torch.equal(received[name].float(), tensor.float()), name


@pytest.mark.integration
def test_remote_pool_generates_and_a_gloo_sync_lands(checkpoint, served, key):
    with RolloutPool(checkpoint, remote=[served], timeout_s=30) as pool:
        original = DeepseekV3ForCausalLM.from_pretrained(checkpoint)
        sampling = SamplingSpec(temperature=0, max_new_tokens=6)
        rollouts = pool.generate(PROMPTS, n=2, sampling=sampling)
        expected = original.generate(PROMPTS, max_new_tokens=6)
        assert [[r.completion_ids for r in group] for group in rollouts] == [
            [ids, ids] for ids in expected.sequences
        ]
        before = assert_scores_match(pool, original, atol=1e-5)

        model = stepped(checkpoint)
        pool.bucket_bytes = 2**16  # many buckets per sync
        assert pool.sync(weight_stream(model)) > 0
        after = assert_scores_match(pool, model, atol=1e-5)
        assert max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y)) > 0.05
        model.requires_grad_(False)
        model.lm_head.weight.requires_grad_(True)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        pushed = dict(weight_stream(model, trained_only=True))
        assert set(pushed) == {"lm_head.weight"}
        pool.sync(pushed)
        assert_scores_match(pool, model, atol=1e-5)
        assert pool.restarts == 0 and pool.pids == [None]


@pytest.mark.integration
def test_the_key_is_required_and_checked(checkpoint, served, monkeypatch, capsys):
    monkeypatch.delenv("MOETUNE_ROLLOUT_KEY", raising=False)
    assert main(["rollout", "serve", "--model", str(checkpoint), "--backend", "native"]) == 2
    assert "set MOETUNE_ROLLOUT_KEY or pass --authkey-file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="set MOETUNE_ROLLOUT_KEY"):
        RolloutPool(checkpoint, remote=[served])
    with pytest.raises(RuntimeError, match=rf"\({served}\): the server rejected the key"):
        RolloutPool(checkpoint, remote=[served], authkey=b"wrong")


def test_each_rollout_pool_gets_its_own_engines():
    """A pool per process (rollout.processes_per_pool 1), or one per N processes: its
    leader takes every pools-th engine, its followers none."""
    engines = ["a:1", "b:2", "c:3"]

    def alone(rank: int, world: int) -> PoolShare:
        return PoolShare.of(DataParallel(rank, world), 1)

    assert remote_engines(engines, alone(0, 2)) == ["a:1", "c:3"]
    assert remote_engines(engines, alone(1, 2)) == ["b:2"]
    assert remote_engines([], alone(0, 1)) is None
    with pytest.raises(RecipeError, match="3 engine.* for 4 rollout pools"):
        remote_engines(engines, alone(0, 4))
    with pytest.raises(RecipeError, match="'b' is not host:port"):
        remote_engines(["a:1", "b"], alone(0, 1))
    # 8 processes in pools of 4: ranks 0 and 4 lead, with engines a, c and b
    assert remote_engines(engines, PoolShare(4, 0, 2, 0)) == ["a:1", "c:3"]
    assert remote_engines(engines, PoolShare(4, 1, 2, 0)) == ["b:2"]
    assert remote_engines(engines, PoolShare(4, 1, 2, 3)) is None
    with pytest.raises(RecipeError, match="processes_per_pool: 3 must be >= 1 and divide the 4"):
        PoolShare.of(DataParallel(0, 4), 3)


@pytest.mark.integration
@pytest.mark.parametrize(
    "asynchronous", [[], ["rollout.max_staleness=1", "rollout.partial_rollouts=true"]]
)
def test_grpo_trains_against_a_served_engine(served, key, tmp_path, asynchronous):
    """The engine serves other weights than the fresh trainer's: the push on connect makes
    step 1 sample from the trainer's policy, each step's sync keeps it so. Asynchronous, with
    partial rollouts: step 2 learns from samples generated while step 1 trained."""
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def length(prompts, completions, **columns):\n"
        "    return [len(c) / 8 for c in completions]\n"
    )
    out = tmp_path / "grpo"
    assert (
        main(
            [
                "run",
                "grpo/arith_tiny",
                *FRESH,
                f"rewards=[{{name: '{rewards}:length'}}]",
                f"rollout.remote=[{served}]",
                "algorithm.dynamic_sampling=false",
                "training.max_steps=2",
                f"training.output_dir={out}",
                *asynchronous,
            ]
        )
        == 0
    )
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert abs(logged[0]["mismatch_kl"]) < 1e-4 and logged[0]["grad_norm"] > 0
    assert all(r["sync_seconds"] > 0 for r in logged)
    assert logged[1]["staleness_max"] == (1 if asynchronous else 0)
    if not asynchronous:  # on-policy: the engine's logprobs are the trainer's
        assert abs(logged[1]["mismatch_kl"]) < 1e-4


@pytest.mark.integration
def test_a_native_server_takes_the_adapter_alone_also_after_a_restart(checkpoint, tmp_path, key):
    """Given the trainer's LoRA spec, a native server attaches the same adapters and syncs
    carry the LoRA tensors alone; restarted (base weights only), it is reconnected, attaches
    them again and gets the synced adapter."""
    spec = LoraSpec(rank=8, components=("attention", "routed_experts"))
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint)
    apply_lora(model, spec)
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.normal_(0, 0.05)
    server = Server(checkpoint, tmp_path)  # its own: the adapters stay on the served model
    try:
        server.start()
        with RolloutPool(
            checkpoint, remote=[server.address], timeout_s=30, start_timeout_s=60, adapter=spec
        ) as pool:
            assert pool.adapter == spec
            pool.weight_source = lambda: adapter_stream(model)
            pool.sync(adapter_stream(model, trained_only=True))
            assert pool.synced_bytes == sum(p.numel() * p.element_size() for p in trained)
            assert_scores_match(pool, model, atol=1e-5)
            server.stop()
            server.start()
            assert_scores_match(pool, model, atol=1e-5)
            assert pool.restarts == 1
    finally:
        server.stop()


@pytest.mark.integration
def test_a_restarted_server_is_reconnected_one_that_hangs_or_stays_down_is_named(
    checkpoint, native_server, served, key
):
    with RolloutPool(checkpoint, remote=[served], timeout_s=30, start_timeout_s=60) as pool:
        model = stepped(checkpoint)
        pool.weight_source = lambda: weight_stream(model)
        pool.sync(weight_stream(model))
        native_server.stop()
        native_server.start()  # on the same port, from the checkpoint's weights
        assert_scores_match(pool, model, atol=1e-5)  # reconnected and given the synced weights
        assert pool.restarts == 1

        pool.timeout_s = pool.start_timeout_s = 2
        native_server.process.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(
            RuntimeError,
            match=rf"rollout worker 0 \({served}\) could not be "
            rf"reached within 2 s: no handshake",
        ):
            pool.score(PROMPTS, COMPLETIONS)
        assert time.monotonic() - start < 15
        native_server.stop()
        with pytest.raises(
            RuntimeError,
            match=rf"rollout worker 0 \({served}\) could not be "
            rf"reached within 2 s: .*refused",
        ):
            pool.score(PROMPTS, COMPLETIONS)


@pytest.mark.integration
def test_vllm_server_takes_weights_over_gloo(checkpoint, tmp_path, key):
    pytest.importorskip("vllm", reason="vLLM is part of the cpu extra that `make test` installs")
    server = Server(checkpoint, tmp_path, backend="vllm")
    try:
        server.start()
        with RolloutPool(checkpoint, remote=[server.address], timeout_s=60) as pool:
            model = stepped(checkpoint)
            pool.sync(weight_stream(model))
            assert_scores_match(pool, model, atol=1e-3)
            sampling = SamplingSpec(temperature=0, max_new_tokens=6)
            rollouts = pool.generate(PROMPTS, n=1, sampling=sampling)
            assert [group[0].completion_ids for group in rollouts] == model.generate(
                PROMPTS, max_new_tokens=6
            ).sequences
    finally:
        server.stop()
