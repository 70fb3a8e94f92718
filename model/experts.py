"""Routed experts on expert-sorted tokens, with grouped GEMMs (`torch._grouped_mm`).

Weights are stacked like transformers 5: `gate_up_proj` [E, 2I, hidden] (gate rows, then
up rows) and `down_proj` [E, hidden, I]. Tokens are sorted by expert once; one grouped
GEMM per projection covers all experts, in the forward and in the hand-written backward
(which avoids the copies autograd's generic grouped-GEMM backward makes on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of a [N, K] in groups ending at offsets [E] times b [E, K, M] -> [N, M];
    or, with 2-D a [K, N] and b [N, M], per-group a_g @ b_g -> [E, K, M]."""
    return torch._grouped_mm(a, b, offs=offsets)


class RoutedExpertsFunction(torch.autograd.Function):
    """y = row_weight * down(silu(gate(x)) * up(x)) per expert group, rows pre-sorted."""

    @staticmethod
    def forward(ctx, x, gate_up, down, offsets, row_weight):
        """x [N, hidden] sorted by expert; gate_up [E, 2I, hidden]; down [E, hidden, I];
        offsets [E] int32 (cumulative row counts); row_weight [N]. -> [N, hidden]."""
        h = grouped_mm(x, gate_up.transpose(-2, -1), offsets)
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        out = grouped_mm(act, down.transpose(-2, -1), offsets)
        ctx.save_for_backward(x, gate_up, down, offsets, row_weight, h)
        return out * row_weight[:, None].to(out.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up, down, offsets, row_weight, h = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        grad_out = grad_out.contiguous()
        grad_act_unweighted = grouped_mm(grad_out, down, offsets)  # [N, I]
        grad_row_weight = (grad_act_unweighted * act).sum(-1).to(row_weight.dtype)
        weighted = row_weight[:, None].to(grad_out.dtype)
        grad_act = grad_act_unweighted * weighted
        grad_down = grouped_mm((grad_out * weighted).t(), act, offsets)  # [E, hidden, I]
        grad_gate = grad_act * up * (sig * (1 + gate * (1 - sig)))
        grad_h = torch.cat((grad_gate, grad_act * silu), dim=-1)
        grad_x = grouped_mm(grad_h, gate_up, offsets)
        grad_gate_up = grouped_mm(grad_h.t(), x, offsets)  # [E, 2I, hidden]
        return grad_x, grad_gate_up, grad_down, None, grad_row_weight


class RoutedExperts(nn.Module):
    """E gated-MLP experts applied to the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], expert_ids [T, k], weights [T, k] -> sum_k weights * expert(x) [T, hidden]."""
        top_k = expert_ids.shape[-1]
        order = expert_ids.flatten().argsort(stable=True)
        token_of_row = order // top_k
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts)
        offsets = counts.cumsum(0).to(torch.int32)
        rows = RoutedExpertsFunction.apply(
            x[token_of_row], self.gate_up_proj, self.down_proj, offsets, weights.flatten()[order]
        )
        return torch.zeros_like(x).index_add_(0, token_of_row, rows.to(x.dtype))
