"""Routing replay: record the experts each token was routed to, and force them later.

In RL the sampler (a rollout engine) and the trainer compute the same tokens with different
kernels; in an MoE a tiny difference in router scores flips a token's top-k experts, and the
trainer's logprobs then come from a different sub-network than the one that sampled. Replaying
the sampler's routes in the trainer's forward removes that source of mismatch (the "R3"
routing replay of Ma et al., 2025).

Routes are int tensors [num_moe_layers, ..., top_k] over the decoder's MoE layers (the MTP
modules are not replayed); -1 rows let the router choose (padding, tokens the sampler never
fed back, such as the last one it sampled).

Router agreement measures that mismatch without removing it: `recording_choices` collects
the experts each router picks itself (before a replay overrides them), and `route_overlap`
compares them with the sampler's, |engine set & trainer set| / top_k per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def recording_routes(model) -> Iterator[list[list[torch.Tensor]]]:
    """Collect every forward's expert ids: yields one list per MoE layer of [tokens, top_k]
    tensors, in call order (for `generate`: the prefill, then each decode step)."""
    routers = model.routers()
    for router in routers:
        router.recorded = []
    try:
        yield [router.recorded for router in routers]
    finally:
        for router in routers:
            router.recorded = None


@contextmanager
def replaying_routes(model, routes: torch.Tensor | None) -> Iterator[None]:
    """Forwards inside use `routes` [num_moe_layers, B, S, top_k] for a [B, S] input (None:
    no replay). Activation-checkpoint recomputation inside the block replays them too."""
    routers = model.routers()
    if routes is not None and routes.shape[0] != len(routers):
        raise ValueError(
            f"routing replay: routes for {routes.shape[0]} MoE layers, the model has {len(routers)}"
        )
    for i, router in enumerate(routers):
        router.replay = None if routes is None else routes[i].flatten(0, 1)
    try:
        yield
    finally:
        for router in routers:
            router.replay = None


@contextmanager
def recording_choices(model) -> Iterator[list[list[torch.Tensor]]]:
    """Collect every forward's own top-k, before a replay overrides it: yields one list per
    MoE layer of [tokens, top_k] tensors, in call order."""
    routers = model.routers()
    for router in routers:
        router.own_choices = []
    try:
        yield [router.own_choices for router in routers]
    finally:
        for router in routers:
            router.own_choices = None


def route_overlap(engine: torch.Tensor, trainer: torch.Tensor) -> torch.Tensor:
    """Per token, the share of the engine's top-k experts the trainer also chose:
    |engine set & trainer set| / top_k for routes [..., top_k] (float32, same shape less
    top_k). The ids of a token are distinct (a top-k); rows of the engine's with a -1 are
    not meaningful (mask them)."""
    engine, trainer = engine.long(), trainer.long().to(engine.device)
    shared = (engine[..., :, None] == trainer[..., None, :]).any(-1).sum(-1)
    return shared.float() / engine.shape[-1]
