"""Speculative sampling with the model's own Multi-Token-Prediction modules as the drafter.

Each round the MTP modules draft k tokens, one forward of the main model over the latent
cache scores them all, and the standard rejection rule (Leviathan et al. 2023; Chen et al.
2023) decides how many to keep: draft d_s ~ q_s is accepted with probability
min(1, p_s(d_s) / q_s(d_s)); at the first rejection the token is drawn from
norm(max(0, p_s - q_s)); when all k are accepted a bonus token is drawn from p_{k+1}.
p and q are the distributions plain sampling draws from (temperature, top-k, top-p applied to
both the same way), so every emitted token is distributed exactly as plain sampling's; greedy
(temperature 0) keeps the drafts that equal the main model's argmax and emits its argmax
where they stop, so its tokens are plain greedy's. Reported logprobs are the main model's,
as plain sampling reports them.

Batches: every row keeps its own acceptance length. A round writes k + 1 cache positions
for every row; the positions a row rejected become holes in its attention mask (as left
padding is), and the rotary positions, computed from the mask, skip them; so each row
continues exactly as plain decoding would. When the preallocated cache fills up, the holes
are squeezed out (`LatentCache.compact`).

The drafter: the first MTP module sees (main model's hidden h_i, embedding of t_{i+1}) at
every accepted position i, in a latent cache of its own laid out like the main one, and
predicts t_{i+2}: draft 1 comes from the last accepted position. Draft s > 1 comes from
module min(s, depth) at the next position, fed the previous draft step's block output and
the previous draft (for k > depth the last module is chained, as vLLM chains DeepSeek's MTP).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from moetune.model.expert_parallel import everyone_done, expert_parallel_groups_of_model
from moetune.model.kv_cache import LatentCache
from moetune.model.routing_replay import recording_routes
from moetune.model.transformer import build_attention_mask

RECIPE_KEY = "rollout.speculative_tokens"


def check_speculative_tokens(
    k: int, config, checkpoint: str | None = None, key: str = RECIPE_KEY
) -> None:
    """Raise ValueError, naming the recipe key and the checkpoint, unless k speculative tokens
    can be drafted: k >= 0, and k > 0 only with MTP modules (num_nextn_predict_layers)."""
    name = checkpoint or getattr(config, "_name_or_path", "") or "the model"
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"{key}={k!r}: must be an integer >= 0 (0 turns speculation off)")
    depth = getattr(config, "num_nextn_predict_layers", 0) or 0
    if k > 0 and depth == 0:
        raise ValueError(
            f"{key}={k}: checkpoint {name} has no MTP module "
            "(num_nextn_predict_layers=0) to draft with; set it to 0"
        )


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """logits [..., V] -> log-probabilities of the distribution plain sampling draws from
    (for temperature 0: of the raw logits, which is what greedy reports)."""
    from moetune.model.generation import filter_logits

    logits = logits.float()
    if temperature > 0:
        shape = logits.shape
        logits = filter_logits(logits.reshape(-1, shape[-1]) / temperature, top_k, top_p)
        logits = logits.view(shape)
    return logits.log_softmax(dim=-1)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor):
    """min(1, p(d) / q(d)) for drafts d [...] drawn from q; p, q [..., V]."""
    p_d = p.gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    return torch.where(q_d > 0, (p_d / q_d.clamp(min=1e-30)).clamp(max=1.0), torch.ones_like(p_d))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim; p itself where that is all zeros (p == q, where
    no rejection can happen)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


def leading_accepts(accepted: torch.Tensor) -> torch.Tensor:
    """accepted [B, k] bool -> [B] how many drafts are kept: those before the first rejection."""
    return accepted.long().cumprod(dim=1).sum(dim=1)


class SpeculativeDecoder:
    """One batched `generate` call with k speculative tokens per round (see the module doc)."""

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        k: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: set[int] | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int = 0,
    ):
        check_speculative_tokens(k, model.config)
        self.model, self.k, self.max_new_tokens = model, k, max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop, self.generator = stop or set(), generator
        self.modules = list(model.model.mtp)[: min(k, len(model.model.mtp))]
        config = model.config
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        batch, longest = len(prompts), max(len(p) for p in prompts)
        self.batch, self.longest = batch, longest
        self.prompt_lengths = [len(p) for p in prompts]
        self.capacity = longest + 2 * max_new_tokens + 2 * k + 2
        self.tokens = torch.full((batch, longest), pad_token_id, dtype=torch.long)
        self.mask = torch.zeros(batch, self.capacity, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            self.tokens[i, longest - len(prompt) :] = torch.tensor(prompt)
            self.mask[i, longest - len(prompt) : longest] = 1
        self.tokens = self.tokens.to(self.device)

        def cache(layers, first=0):
            return LatentCache(
                layers,
                batch,
                self.capacity,
                config.kv_lora_rank,
                config.qk_rope_head_dim,
                dtype,
                self.device,
                first_layer=first,
            )

        self.cache = cache(config.num_hidden_layers)
        self.mtp_caches = [cache(1, module.block.self_attn.layer_idx) for module in self.modules]
        self.lockstep = expert_parallel_groups_of_model(model)  # ranks decoding in step
        self.squeezes = 0  # times the caches were compacted
        self.proposed = 0  # drafts proposed to rows still generating
        self.accepted = 0  # of those, kept

    # -- distributions ------------------------------------------------------------------
    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_logprobs(logits, self.temperature, self.top_k, self.top_p)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, V] -> [B] token ids: drawn from probs, or their argmax when greedy."""
        if self.temperature > 0:
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        return probs.argmax(dim=-1)

    # -- the drafter ----------------------------------------------------------------------
    def mtp_forward(self, u, hidden, tokens, positions, visible, start):
        """Module u over [B, S] new positions written at cache slot `start` (attending to
        `visible` [B, start + S]) -> (block output, normed output for the head), [B, S, H]."""
        module, cache = self.modules[u], self.mtp_caches[u]
        cache.length = start
        cos, sin = self.model.model.rotary(positions)
        mask = build_attention_mask(visible, tokens.shape[1], start, self.device, True)
        embeds = self.model.model.embed_tokens(tokens)
        return module(hidden, embeds, cos, sin, mask, cache)

    def draft(self, hidden, fed, last, correction, start):
        """Draft k tokens after a round that fed `fed` [B, n] at slots [start, start + n),
        whose main hidden states are `hidden` [B, n, H], whose last kept slot per row is
        `last` [B] (offset in the round) and whose new token is `correction` [B].
        -> (drafts [B, k], their distributions q [B, k, V])."""
        end = start + fed.shape[1]
        rows = torch.arange(self.batch, device=self.device)
        next_tokens = torch.cat((fed[:, 1:], fed[:, :1]), dim=1)
        next_tokens[rows, last] = correction
        visible = self.mask[:, :end]
        positions = (visible.cumsum(-1) - 1).clamp(min=0)
        for u in reversed(range(len(self.modules))):  # each keeps its context of true entries
            h, normed = self.mtp_forward(
                u, hidden, next_tokens, positions[:, start:end], visible, start
            )
        h_prev = h[rows, last]  # module 0's, the last to run
        q = self.logprobs(self.model.lm_head(normed[rows, last])).exp()  # the head at one slot
        drafts, dists = [self.sample(q)], [q]
        position = positions[rows, start + last]
        chained = torch.zeros(len(self.modules), self.batch, self.k, dtype=torch.long)
        chained = chained.to(self.device)
        for s in range(2, self.k + 1):
            u = min(s, len(self.modules)) - 1
            chained[u, :, s - 2] = 1
            h_prev, normed = self.mtp_forward(
                u,
                h_prev[:, None],
                drafts[-1][:, None],
                (position + s - 1)[:, None],
                torch.cat((visible, chained[u, :, : s - 1]), dim=1),
                end + s - 2,
            )
            h_prev = h_prev[:, 0]
            q = self.logprobs(self.model.lm_head(normed[:, 0])).exp()
            drafts.append(self.sample(q))
            dists.append(q)
        return torch.stack(drafts, 1), torch.stack(dists, 1)

    # -- verification -------------------------------------------------------------------
    def verify(self, logits, drafts, q):
        """Main logits [B, k+1, V] against drafts [B, k] from q [B, k, V] -> (kept drafts a
        [B], new token [B], the main model's logprobs of the k + 1 candidate emissions
        [B, k+1], those candidates [B, k+1]: the drafts, the new token at index a)."""
        logp = self.logprobs(logits)
        rows = torch.arange(self.batch, device=self.device)
        if self.temperature > 0:
            p = logp.exp()
            u = torch.rand(drafts.shape, generator=self.generator, device=self.device)
            keep = u < acceptance_probability(p[:, :-1], q, drafts)
            a = leading_accepts(keep)
            q_pad = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)  # all kept: bonus from p
            new = self.sample(residual(p[rows, a], q_pad[rows, a]))
        else:
            a = leading_accepts(drafts == logp[:, :-1].argmax(-1))
            new = logp[rows, a].argmax(-1)
        emitted = torch.cat((drafts, drafts[:, :1]), dim=1)
        emitted[rows, a] = new
        return a, new, logp.gather(2, emitted[:, :, None]).squeeze(2), emitted

    # -- the loop -----------------------------------------------------------------------
    def run(self, out, record_routes: bool):
        model, k = self.model, self.k
        self.out = out
        done = torch.zeros(self.batch, dtype=torch.bool)
        chunks_keep = []
        fed, start, drafts, q = self.tokens, 0, None, None
        with recording_routes(model) if record_routes else nullcontext() as recorded:
            while True:
                n = fed.shape[1]
                if drafts is not None:
                    if start + n + k - 1 > self.capacity:
                        self.squeeze(start)
                        start = self.cache.length
                    self.mask[:, start : start + n] = 1
                self.cache.length = start
                result = model(fed, attention_mask=self.mask[:, : start + n], cache=self.cache)
                hidden = result.hidden_states
                if drafts is None:  # the prefill: the first token is sampled plainly
                    logp = self.logprobs(result.logits[:, -1])
                    new = self.sample(logp.exp())
                    a = torch.zeros(self.batch, dtype=torch.long, device=self.device)
                    last = torch.full_like(a, n - 1)
                    emitted = new[:, None]
                    logps = logp.gather(1, new[:, None])
                else:
                    a, new, logps, emitted = self.verify(result.logits, drafts, q)
                    last = a
                    active = int((~done).sum())
                    self.proposed += active * k
                    self.accepted += int(a.cpu()[~done].sum())
                    slots = torch.arange(n, device=self.device)[None]
                    self.mask[:, start : start + n] *= (slots <= a[:, None]).long()
                    self.mask[done.to(self.device), start : start + n] = 0  # finished rows
                if record_routes:
                    chunks_keep.append(self.mask[:, start : start + n].bool().cpu())
                self.emit(out, done, emitted.cpu(), logps.cpu(), (a + 1).cpu())
                if everyone_done(self.lockstep, bool(done.all())):
                    break
                drafts, q = self.draft(hidden, fed, last, new, start)
                start += n
                fed = torch.cat((new[:, None], drafts), dim=1)
        if record_routes:
            out.routed_experts = routes_from_chunks(
                recorded,
                chunks_keep,
                self.prompt_lengths,
                [len(s) for s in out.sequences],
            )
        out.draft_tokens, out.accepted_draft_tokens = self.proposed, self.accepted
        return out

    def emit(self, out, done, emitted, logps, counts):
        """Append each live row's first counts[i] candidates, up to a stop token or the
        length limit."""
        for i in (~done).nonzero().flatten().tolist():
            for token, logprob in zip(emitted[i, : counts[i]].tolist(), logps[i].tolist()):
                out.sequences[i].append(token)
                out.logprobs[i].append(logprob)
                if token in self.stop:
                    out.finish_reasons[i] = "stop"
                    done[i] = True
                    break
                if len(out.sequences[i]) >= self.max_new_tokens:
                    done[i] = True
                    break

    def squeeze(self, end: int) -> None:
        """Squeeze the rejected positions out of the caches (the drafter's share the layout)."""
        keep = self.mask[:, :end].bool()
        self.squeezes += 1
        new_keep = self.cache.compact(keep)
        for cache in self.mtp_caches:
            cache.compact(keep)
        self.mask.zero_()
        self.mask[:, : new_keep.shape[1]] = new_keep.long()


def routes_from_chunks(recorded, keeps, prompt_lengths, generated) -> list[torch.Tensor]:
    """Per-layer lists of forward chunks [B * n, top_k] and, per chunk, which of its [B, n]
    positions a row kept -> per sequence [num_moe_layers, prompt + generated, top_k] int16
    (-1 for tokens never fed back)."""
    batch = len(prompt_lengths)
    per_row = [[] for _ in range(batch)]
    for c, keep in enumerate(keeps):
        layers = torch.stack([chunks[c].view(batch, keep.shape[1], -1) for chunks in recorded])
        for i in range(batch):
            per_row[i].append(layers[:, i, keep[i]])
    routes = []
    for i, (prompt, completion) in enumerate(zip(prompt_lengths, generated)):
        fed = torch.cat(per_row[i], dim=1).to(torch.int16)[:, : prompt + completion]
        route = torch.full(
            (fed.shape[0], prompt + completion, fed.shape[-1]), -1, dtype=torch.int16
        )
        route[:, : fed.shape[1]] = fed
        routes.append(route)
    return routes
