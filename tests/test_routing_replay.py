"""Routing replay: generate records each token's experts; the trainer's forward replays them;
in bfloat16 that lowers the sampler/trainer logprob mismatch; GRPO runs with it on."""

import pytest
import torch
from tiny_configs import v3_config

from moetune.model import DeepseekV3ForCausalLM
from moetune.model.routing_replay import recording_routes, replaying_routes
from moetune.rl.algorithms import mismatch_kl
from moetune.rl.policy_batch import build_batch, token_logprobs
from moetune.rl.rollout import Rollout


def tiny_model(dtype=torch.float32) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(v3_config())
    return model.to(dtype).eval()


def own_routes(model, ids: torch.Tensor) -> torch.Tensor:
    """[num_moe_layers, B, S, k] experts a full (training-path) forward routes ids [B, S] to."""
    with torch.no_grad(), recording_routes(model) as recorded:
        model(ids)
    return torch.stack([layer[0].view(*ids.shape, -1) for layer in recorded])


def test_generate_records_the_routes_of_every_fed_token_of_each_sequence():
    model = tiny_model()
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (3, 7, 5)]  # left-padded batch
    out = model.generate(
        prompts,
        max_new_tokens=6,
        temperature=1.0,
        record_routes=True,
        generator=torch.Generator().manual_seed(0),
    )
    for prompt, completion, routes in zip(prompts, out.sequences, out.routed_experts):
        ids = torch.tensor([prompt + completion])
        expected = own_routes(model, ids)[:, 0]  # [L, P + C, k]
        assert routes.shape == expected.shape and routes.dtype == torch.int16
        assert (routes[:, -1] == -1).all()  # the last sampled token is never fed back
        fed = routes[:, :-1].long().sort(-1).values
        assert torch.equal(fed, expected[:, :-1].sort(-1).values)


def test_replay_forces_the_given_experts_and_minus_one_rows_choose_for_themselves():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 9))
    mine = own_routes(model, ids)
    with torch.no_grad(), replaying_routes(model, mine):
        same = model(ids).logits
    torch.testing.assert_close(same, model(ids).logits.detach(), rtol=0, atol=0)

    forced = torch.stack([torch.randperm(16)[:4] for _ in range(mine.numel() // 4)]).view_as(mine)
    forced[:, 1, 4:] = -1  # second row, from position 4: the router's own choice
    with torch.no_grad(), replaying_routes(model, forced), recording_routes(model) as recorded:
        model(ids)
    used = torch.stack([layer[0].view(*ids.shape, -1) for layer in recorded])
    assert torch.equal(used[:, 0], forced[:, 0])
    assert torch.equal(used[:, 1, :4], forced[:, 1, :4])
    assert torch.equal(used[:, 1, 4:], mine[:, 1, 4:])
    assert all(router.replay is None for router in model.routers())  # the context cleans up


def test_replay_of_the_wrong_shape_names_both_shapes():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 9))
    wrong_tokens = replaying_routes(model, torch.zeros(2, 2, 7, 4, dtype=torch.long))
    with (
        pytest.raises(ValueError, match=r"routing replay: routes of shape \(14, 4\) for \(18, 4\)"),
        wrong_tokens,
    ):
        model(ids)
    with (
        pytest.raises(ValueError, match="routes for 3 MoE layers, the model has 2"),
        replaying_routes(model, torch.zeros(3, 2, 9, 4, dtype=torch.long)),
    ):
        pass


def rollouts_of(model, prompts, n=4, max_new_tokens=12):
    rollouts = []
    for seed, prompt in enumerate(prompts):
        out = model.generate(
            [prompt] * n,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            record_routes=True,
            generator=torch.Generator().manual_seed(seed),
        )
        rollouts += [
            Rollout(prompt, ids, "", "length", logprobs, routes)
            for ids, logprobs, routes in zip(out.sequences, out.logprobs, out.routed_experts)
        ]
    return rollouts


def test_replay_lowers_the_bfloat16_mismatch_between_sampler_and_trainer():
    """In bfloat16 the sampler's decode path (absorbed MLA over the latent cache) and the
    trainer's path round differently; some tokens flip experts. Replaying the sampler's
    routes removes that part of the mismatch."""
    model = tiny_model(torch.bfloat16)
    prompts = [torch.randint(1, 128, (6,)).tolist() for _ in range(6)]
    rollouts = rollouts_of(model, prompts)
    mismatch = {}
    for replay in (False, True):
        batch = build_batch(rollouts, pad_id=0, with_routes=replay)
        with torch.no_grad():
            logprobs, _ = token_logprobs(model, batch)
        mismatch[replay] = mismatch_kl(logprobs, batch.sampler_logprobs, batch.completion_mask)
    assert mismatch[True] < 0.5 * mismatch[False], mismatch


def test_a_batch_without_routes_cannot_replay():
    rollout = Rollout([1, 2], [3], "", "length", [-0.1])
    with pytest.raises(ValueError, match="did not report routed experts"):
        build_batch([rollout], pad_id=0, with_routes=True)
