"""DeepSeekMoE layer: router, routed experts and always-on shared experts."""

from __future__ import annotations

import torch
from torch import nn

from moetune.model.config import DeepseekV3Config
from moetune.model.experts import RoutedExperts
from moetune.model.layers import GatedMLP
from moetune.model.router import Router, sequence_balance_loss


class MoE(nn.Module):
    """DeepSeekMoE: the router picks top-k routed experts per token (group-limited); their
    weighted outputs (one grouped GEMM per projection, or all_to_all across expert-parallel
    ranks) are added to the shared experts' output."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = (
            GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.compute_balance_loss = config.aux_loss_alpha > 0
        self.balance_loss: torch.Tensor | None = None
        # An ExpertShard once the routed experts are sharded over ranks (model.expert_parallel)
        self.expert_parallel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, hidden] -> [B, S, hidden]. Leaves `balance_loss` set in training when
        the config's aux_loss_alpha > 0."""
        flat = x.flatten(0, 1)
        expert_ids, weights, scores = self.gate(flat)
        if self.training and self.compute_balance_loss:
            self.balance_loss = sequence_balance_loss(scores, expert_ids, x.shape[0])
        if self.expert_parallel is not None:
            out = self.expert_parallel.dispatch(self.experts, flat, expert_ids, weights)
        else:
            out = self.experts(flat, expert_ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)
