"""DeepSeekMoE routing: scores, group-limited top-k, weights, and load-balance statistics.

Per token t with router logits z = W_g x_t (float32):
  s = sigmoid(z) (V3) or softmax(z) (V2)
  selection scores s + b, where b is `e_score_correction_bias` (noaux_tc only; it steers
  which experts are chosen but never the weights)
  group-limited: keep the `topk_group` best of `n_group` groups (a group scores the sum of
  its top-2 selection scores under noaux_tc, its max under group_limited_greedy)
  weights g = s at the chosen top-k, normalised to sum 1 if norm_topk_prob, times
  routed_scaling_factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetune.model.config import DeepseekV3Config


class Router(nn.Module):
    """Scores tokens against experts (sigmoid for V3, softmax for V2) and picks top-k within
    the best `topk_group` groups. The aux-free bias `e_score_correction_bias` shifts
    selection only, never the weights; `load` counts tokens per expert for its update."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or self.n_group
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))
        else:
            self.e_score_correction_bias = None
        # Tokens routed to each expert since the last bias update (training forwards only).
        self.register_buffer("load", torch.zeros(self.num_experts), persistent=False)
        # Routing replay (moetune.model.routing_replay): expert ids [T, k] to use instead of
        # this router's own choice (rows of -1: choose), and a list collecting each choice.
        self.replay: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] | None = None
        # A list collecting this router's own top-k before any replay overrides it (router
        # agreement with a rollout engine: moetune.model.routing_replay.recording_choices).
        self.own_choices: list[torch.Tensor] | None = None

    def reset_buffers(self) -> None:
        self.load.zero_()

    def _apply(self, fn, recurse=True):
        """Keep the bias and load counts in float32 whatever dtype the model moves to."""
        super()._apply(fn, recurse)
        for name in ("e_score_correction_bias", "load"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).float())
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> affinity scores s [T, E] in float32."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [T, E] -> chosen expert ids [T, top_k]."""
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        return choice.topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (expert ids [T, k], weights [T, k] float32, scores [T, E])."""
        scores = self.scores(x)
        with torch.no_grad():
            expert_ids = self.select(scores)
            if self.own_choices is not None:
                self.own_choices.append(expert_ids)
            if self.replay is not None:
                expert_ids = self.replayed(expert_ids)
        if self.recorded is not None:
            self.recorded.append(expert_ids)
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        # Count training forwards once: not again when activation checkpointing recomputes
        # this forward inside the backward pass.
        if self.training and torch._C._current_graph_task_id() == -1:
            self.load += torch.bincount(expert_ids.flatten(), minlength=self.num_experts)
        return expert_ids, weights, scores

    def replayed(self, chosen: torch.Tensor) -> torch.Tensor:
        """The replayed expert ids where given (>= 0), this router's choice elsewhere."""
        if self.replay.shape != chosen.shape:
            raise ValueError(
                f"routing replay: routes of shape {tuple(self.replay.shape)} for "
                f"{tuple(chosen.shape)} routed tokens [tokens, top_k]"
            )
        replay = self.replay.to(chosen.device, chosen.dtype)
        return torch.where(replay >= 0, replay, chosen)

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i); reset load."""
        if self.e_score_correction_bias is None:
            raise ValueError(f"update_bias needs topk_method noaux_tc, not {self.topk_method!r}")
        self.e_score_correction_bias += gamma * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


def sequence_balance_loss(
    scores: torch.Tensor, expert_ids: torch.Tensor, batch: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    scores [B*S, E] (unnormalised affinities), expert_ids [B*S, k]. Per sequence:
    f_i = E / (k S) * #tokens routed to i, P_i = mean_t s_{i,t} / sum_j s_{j,t}.
    """
    num_experts, top_k = scores.shape[-1], expert_ids.shape[-1]
    scores = scores.unflatten(0, (batch, -1))
    seq_len = scores.shape[1]
    counts = torch.zeros_like(scores[:, 0]).scatter_add_(
        1,
        expert_ids.unflatten(0, (batch, -1)).flatten(1),
        torch.ones(batch, seq_len * top_k, device=scores.device, dtype=scores.dtype),
    )
    f = counts * num_experts / (top_k * seq_len)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum(dim=-1).mean()
