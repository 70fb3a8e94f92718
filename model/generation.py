"""Batched sampling with the MLA latent cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts of different lengths are left-padded; each step feeds only the new token and the
cache supplies the past. Returns token ids, the logprob of each generated token under the
distribution it was sampled from, and why each sequence stopped. `speculative_tokens=k`
drafts k tokens per round with the MTP modules and verifies them in one forward
(moetune.model.speculative): the same distribution, fewer sequential forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from moetune.model.expert_parallel import everyone_done, expert_parallel_groups_of_model
from moetune.model.kv_cache import LatentCache
from moetune.model.routing_replay import recording_routes
from moetune.model.speculative import SpeculativeDecoder, check_speculative_tokens


@dataclass
class GenerationOutput:
    """Per prompt: generated token ids (stop token included), their logprobs, and
    finish_reason "stop" (a stop token) or "length" (max_new_tokens). With record_routes,
    routed_experts[i] [num_moe_layers, prompt + generated tokens, top_k] int16 holds the
    experts each token was routed to (-1 for the last generated token, never fed back)."""

    sequences: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    routed_experts: list[torch.Tensor] | None = None
    # speculative decoding: drafts proposed to rows still generating, and how many were kept
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [B, V] outside the top-k and outside the smallest top-p nucleus."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # keeps the token crossing top_p
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: list[list[int]] | torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
    record_routes: bool = False,
    speculative_tokens: int = 0,
    between_steps: Callable[[], None] | None = None,
) -> GenerationOutput:
    """Sample up to `max_new_tokens` per prompt. temperature 0 means greedy. Logprobs are
    of the distribution actually sampled from (temperature, top-k and top-p applied).
    record_routes: also return the experts every token was routed to (routing replay).
    speculative_tokens: k > 0 drafts k tokens per round with the model's MTP modules and
    verifies them in one forward (moetune.model.speculative); the tokens are distributed as
    without it (greedy: the same tokens).
    between_steps: called before each decoding forward after the prefill (before the forward
    that samples token j, j >= 1): a rollout engine may swap the weights in place there (the
    cache keeps what earlier weights wrote). Not with speculative decoding."""
    prompts = input_ids.tolist() if torch.is_tensor(input_ids) else [list(p) for p in input_ids]
    check_speculative_tokens(speculative_tokens, model.config)
    if speculative_tokens and between_steps is not None:
        raise ValueError("between_steps: speculative decoding has no pause between tokens")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    if speculative_tokens:
        out = GenerationOutput([[] for _ in prompts], [[] for _ in prompts])
        out.finish_reasons = ["length"] * len(prompts)
        if max_new_tokens <= 0:
            return out
        was_training = model.training
        model.eval()
        try:
            decoder = SpeculativeDecoder(
                model,
                prompts,
                speculative_tokens,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                set(stop_token_ids or []),
                generator,
                pad_token_id,
            )
            return decoder.run(out, record_routes)
        finally:
            model.train(was_training)
    device = next(model.parameters()).device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, longest + max_new_tokens, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[i, longest - len(prompt) : longest] = 1
    config = model.config
    dtype = next(model.parameters()).dtype
    cache = LatentCache(
        config.num_hidden_layers,
        batch,
        longest + max_new_tokens,
        config.kv_lora_rank,
        config.qk_rope_head_dim,
        dtype,
        device,
    )
    stop = set(stop_token_ids or [])
    out = GenerationOutput([[] for _ in prompts], [[] for _ in prompts], ["length"] * batch)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    step_input = tokens
    lockstep = expert_parallel_groups_of_model(model)  # ranks that decode in step (or None)
    with recording_routes(model) if record_routes else nullcontext() as recorded:
        for step in range(max_new_tokens):
            if step and between_steps is not None:
                between_steps()
            visible = mask[:, : cache.length + step_input.shape[1]]
            logits = model(step_input, attention_mask=visible, cache=cache, logits_to_keep=1)
            logits = logits.logits[:, -1].float()
            if temperature > 0:
                logits = filter_logits(logits / temperature, top_k, top_p)
                logprobs = logits.log_softmax(dim=-1)
                next_ids = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
            else:
                logprobs = logits.log_softmax(dim=-1)
                next_ids = logits.argmax(dim=-1)
            chosen = logprobs.gather(1, next_ids[:, None]).squeeze(1)
            for i in (~done).nonzero().flatten().tolist():
                token = next_ids[i].item()
                out.sequences[i].append(token)
                out.logprobs[i].append(chosen[i].item())
                if token in stop:
                    out.finish_reasons[i] = "stop"
                    done[i] = True
            if everyone_done(lockstep, bool(done.all())):
                break
            mask[:, cache.length] = 1
            step_input = next_ids[:, None]
    model.train(was_training)
    if record_routes:
        out.routed_experts = sequence_routes(
            recorded, [len(p) for p in prompts], longest, [len(s) for s in out.sequences]
        )
    return out


def sequence_routes(
    recorded: list[list[torch.Tensor]],
    prompt_lengths: list[int],
    longest: int,
    generated: list[int],
) -> list[torch.Tensor]:
    """Per-layer lists of forward chunks ([B * tokens, k]: the left-padded prefill, then one
    token per row per step) -> per sequence [num_moe_layers, prompt + generated, k]."""
    batch = len(prompt_lengths)
    layers = torch.stack(
        [torch.cat([c.view(batch, -1, c.shape[-1]) for c in chunks], 1) for chunks in recorded]
    ).to(torch.int16)  # [L, B, fed, k]
    routes = []
    for i, (prompt, completion) in enumerate(zip(prompt_lengths, generated)):
        start = longest - prompt
        route = torch.full(
            (layers.shape[0], prompt + completion, layers.shape[-1]), -1, dtype=torch.int16
        )
        fed = layers[:, i, start : start + prompt + completion]
        route[:, : fed.shape[1]] = fed
        routes.append(route)
    return routes
