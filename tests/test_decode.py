"""The absorbed-latent decode path and cached generation against the training path."""

import torch
from tiny_configs import v2_lite_config, v3_config, yarn_config

from moetune.model import DeepseekV3ForCausalLM
from moetune.model.generation import filter_logits
from moetune.model.kv_cache import LatentCache


def new_cache(model, batch, max_len):
    c = model.config
    return LatentCache(
        c.num_hidden_layers,
        batch,
        max_len,
        c.kv_lora_rank,
        c.qk_rope_head_dim,
        torch.float32,
        "cpu",
    )


def test_absorbed_decode_equals_training_path():
    for config in (v3_config(), v2_lite_config(), yarn_config()):
        model = DeepseekV3ForCausalLM(config).eval()
        ids = torch.randint(0, 128, (2, 50))
        with torch.no_grad():
            full = model(ids).logits
            cache = new_cache(model, 2, 50)
            prefill = model(ids[:, :30], cache=cache).logits
            steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(30, 50)]
        torch.testing.assert_close(prefill, full[:, :30], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 30:], rtol=1e-4, atol=1e-4)


def test_cache_stores_only_latent_and_rope_key():
    config = v3_config()
    cache = new_cache(DeepseekV3ForCausalLM(config), batch=1, max_len=8)
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    assert cache.bytes_per_token() == per_token


def test_cached_generation_equals_recomputing_the_sequence():
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 20, 30, 40]]  # different lengths
    out = model.generate(prompts, max_new_tokens=10)
    for prompt, generated in zip(prompts, out.sequences):
        seq = list(prompt)
        for _ in range(10):
            with torch.no_grad():
                seq.append(model(torch.tensor([seq])).logits[0, -1].argmax().item())
        assert generated == seq[len(prompt) :]


def test_generation_logprobs_are_the_models_logprobs():
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    prompt = [4, 8, 15, 16, 23]
    out = model.generate(
        [prompt],
        max_new_tokens=6,
        temperature=0.7,
        top_k=20,
        generator=torch.Generator().manual_seed(1),
    )
    seq = prompt + out.sequences[0]
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, len(prompt) - 1 : -1] / 0.7
    expected = filter_logits(logits, top_k=20, top_p=1.0).log_softmax(-1)
    expected = expected.gather(1, torch.tensor(out.sequences[0])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), expected, rtol=1e-4, atol=1e-4)


def test_stop_tokens_end_each_sequence_independently():
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    greedy = model.generate([[1, 2, 3], [9, 9]], max_new_tokens=8)
    stop = greedy.sequences[0][2]
    out = model.generate([[1, 2, 3], [9, 9]], max_new_tokens=8, stop_token_ids=[stop])
    first = greedy.sequences[0].index(stop) + 1
    assert out.sequences[0] == greedy.sequences[0][:first]
    assert out.finish_reasons[0] == "stop"
    if stop not in greedy.sequences[1]:
        assert out.sequences[1] == greedy.sequences[1]
        assert out.finish_reasons[1] == "length"


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [0, 1]
    assert kept(filter_logits(logits, top_k=0, top_p=0.45)) == [0]
    assert kept(filter_logits(logits, top_k=0, top_p=0.6)) == [0, 1]
    assert kept(filter_logits(logits, top_k=0, top_p=0.86)) == [0, 1, 2, 3]


def test_sampling_is_reproducible_with_a_generator():
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    runs = [
        model.generate(
            [[3, 4, 5]],
            max_new_tokens=8,
            temperature=1.0,
            top_p=0.9,
            generator=torch.Generator().manual_seed(7),
        ).sequences
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
