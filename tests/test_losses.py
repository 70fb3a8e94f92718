"""The training loss: LM + lambda * MTP + alpha * sequence-wise balance loss."""

import torch
import torch.nn.functional as F
from tiny_configs import v3_config

from moetune.model import DeepseekV3ForCausalLM


def test_lm_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0)).eval()
    ids = torch.randint(0, 128, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.mtp_loss is None and out.aux_loss is None


def test_mtp_loss_predicts_the_token_after_next():
    model = DeepseekV3ForCausalLM(v3_config(mtp_loss_weight=0.25)).eval()
    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, labels=ids)
    # MTP depth 1 by hand: position i sees h_i and Emb(t_{i+1}) and predicts t_{i+2}.
    mtp = model.model.mtp[0]
    embeds = model.model.embed_tokens(ids[:, 1:])
    positions = torch.arange(11)[None].expand(2, -1)
    cos, sin = model.model.rotary(positions)
    _, normed = mtp(out.hidden_states[:, :-1], embeds, cos, sin, None)
    logits = model.lm_head(normed)[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, 128), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.25 * out.mtp_loss)


def test_balance_loss_enters_only_in_training_with_alpha():
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0, aux_loss_alpha=0.01))
    ids = torch.randint(0, 128, (2, 10))
    model.train()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss)
    out.loss.backward()
    assert model.routers()[0].weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids, labels=ids).aux_loss is None


def test_gradient_checkpointing_gives_the_same_gradients():
    model = DeepseekV3ForCausalLM(v3_config()).train()
    ids = torch.randint(0, 128, (2, 10))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    plain_load = model.expert_load().clone()
    model.zero_grad()
    model.update_expert_bias(0.0)  # resets the counts
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    assert torch.equal(model.expert_load(), plain_load)  # recomputation is not counted twice
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_packed_row_equals_its_sequences_run_apart():
    """TRL's padding-free packing: one row, position_ids restarting at 0, labels -100 at
    each start. Logits and LM + MTP losses equal those of the sequences run one by one."""
    model = DeepseekV3ForCausalLM(v3_config(mtp_loss_weight=0.5)).eval()
    first, second = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 5))
    packed = torch.cat((first, second), dim=1)
    positions = torch.cat((torch.arange(7), torch.arange(5)))[None]
    labels = packed.clone()
    labels[0, [0, 7]] = -100
    out = model(packed, position_ids=positions, labels=labels)
    apart = [model(ids, labels=ids) for ids in (first, second)]
    torch.testing.assert_close(
        out.logits, torch.cat([a.logits for a in apart], dim=1), rtol=1e-5, atol=1e-5
    )
    # The packed loss is a token-weighted mean: 6 + 4 LM targets, 5 + 3 MTP targets.
    lm = (6 * apart[0].lm_loss + 4 * apart[1].lm_loss) / 10
    mtp = (5 * apart[0].mtp_loss + 3 * apart[1].mtp_loss) / 8
    torch.testing.assert_close(out.lm_loss, lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mtp_loss, mtp, rtol=1e-5, atol=1e-5)
