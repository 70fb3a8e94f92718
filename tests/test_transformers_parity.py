"""Same weights, float32: moetune's logits and loss equal transformers' (max abs <= 1e-4).

Each model is saved by moetune and loaded by transformers from that folder, so the
checkpoint layout is exercised too. Routers get a non-zero e_score_correction_bias.
"""

import pytest
import torch
import transformers
from tiny_configs import deep_dense_config, v2_lite_config, v3_config, yarn_config

from moetune.model import DeepseekV3ForCausalLM


def randomize_bias(model):
    with torch.no_grad():
        for router in model.routers():
            if router.e_score_correction_bias is not None:
                router.e_score_correction_bias.normal_(0, 0.5)


def hf_twin(model, tmp_path):
    model.save_pretrained(tmp_path)
    hf_class = (
        transformers.DeepseekV2ForCausalLM
        if model.config.model_type == "deepseek_v2"
        else transformers.DeepseekV3ForCausalLM
    )
    hf = hf_class.from_pretrained(tmp_path, dtype=torch.float32)
    return hf.eval()


CASES = {
    "v3": (v3_config, 40),
    "v2_lite": (v2_lite_config, 40),
    "yarn_long": (yarn_config, 100),  # 100 > original_max_position_embeddings 32
    "first_k_dense_2": (deep_dense_config, 40),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_transformers(case, tmp_path):
    make_config, seq_len = CASES[case]
    model = DeepseekV3ForCausalLM(make_config(num_nextn_predict_layers=0)).eval()
    randomize_bias(model)
    hf = hf_twin(model, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len))
    with torch.no_grad():
        ours = model(ids, labels=ids)
        theirs = hf(ids, labels=ids)
    assert (ours.logits - theirs.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)


def test_padded_batch_matches_transformers(tmp_path):
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0)).eval()
    randomize_bias(model)
    hf = hf_twin(model, tmp_path)
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(tmp_path):
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0)).eval()
    randomize_bias(model)
    hf = hf_twin(model, tmp_path)
    prompt = torch.randint(0, 128, (1, 7))
    ours = model.generate(prompt, max_new_tokens=12).sequences[0]
    theirs = hf.generate(
        prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, 7:].tolist()
    assert ours == theirs


def test_v2_normalised_topk_follows_deepseek_not_transformers(tmp_path):
    """transformers' DeepseekV2 ignores norm_topk_prob; DeepSeek's V2 code (and vLLM)
    renormalise the top-k weights. moetune follows DeepSeek: with norm_topk_prob=True it
    differs from transformers, and equals transformers run with normalised weights."""
    model = DeepseekV3ForCausalLM(v2_lite_config(norm_topk_prob=True)).eval()
    hf = hf_twin(model, tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ours = model(ids).logits
        assert (ours - hf(ids).logits).abs().max() > 1e-3

        def normalised(router_forward):
            def forward(hidden):
                logits, weights, ids_ = router_forward(hidden)
                return logits, weights / weights.sum(-1, keepdim=True), ids_

            return forward

        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.forward = normalised(layer.mlp.gate.forward)
        assert (ours - hf(ids).logits).abs().max().item() <= 1e-4


def test_checkpoint_saved_by_transformers_loads_in_moetune(tmp_path):
    """transformers saves without MTP weights: moetune loads it (MTP off, with a warning)
    and gives the same logits."""
    config = v3_config(num_nextn_predict_layers=0).to_dict()
    hf_config = transformers.DeepseekV3Config(
        **{
            k: v
            for k, v in config.items()
            if k in transformers.DeepseekV3Config.__dataclass_fields__
        }
    )
    hf = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["v3", "v2_lite"])
def test_gradients_match_transformers(case, tmp_path):
    """Training needs the backward pass right too: every parameter's gradient of the loss
    on a right-padded batch equals transformers' (same in-memory names, fused experts too)."""
    make_config, _ = CASES[case]
    model = DeepseekV3ForCausalLM(make_config(num_nextn_predict_layers=0)).train()
    randomize_bias(model)
    hf = hf_twin(model, tmp_path).train()
    ids = torch.randint(0, 128, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    hf(ids, attention_mask=mask, labels=labels).loss.backward()
    ours = {name: param.grad for name, param in model.named_parameters()}
    theirs = {name: param.grad for name, param in hf.named_parameters()}
    missing = sorted(set(ours) - set(theirs))
    assert not missing, missing
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-3, atol=1e-6, msg=name)
