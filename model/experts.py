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


def swiglu(h: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """h [N, 2I] = [gate | up] -> row_weight * silu(gate) * up [N, I]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up).mul_(row_weight[:, None])


class RoutedExpertsFunction(torch.autograd.Function):
    """out[t] = sum over token t's k rows r of down_e(row_weight[r] * silu(gate_e(x_t)) * up_e(x_t)).

    Rows are the (token, expert) pairs sorted by expert: row r holds token `row_token[r]`,
    and `token_rows[t]` lists token t's k rows, so both the dispatch and the combine are
    gathers (`index_select`), never scattered atomic adds. Saves x's rows and the gate/up
    activations only; the SwiGLU output is recomputed in the backward, which writes every
    gradient with one grouped GEMM each, and skips the weight gradients of a frozen base.
    """

    @staticmethod
    def forward(ctx, x, gate_up, down, offsets, row_token, token_rows, row_weight):
        """x [T, hidden]; gate_up [E, 2I, hidden]; down [E, hidden, I]; offsets [E] int32
        (cumulative rows per expert); row_token [N]; token_rows [T, k]; row_weight [N].
        -> [T, hidden]."""
        row_weight = row_weight.to(x.dtype)
        rows = x.index_select(0, row_token)
        h = grouped_mm(rows, gate_up.transpose(-2, -1), offsets)
        out_rows = grouped_mm(swiglu(h, row_weight), down.transpose(-2, -1), offsets)
        ctx.save_for_backward(rows, gate_up, down, offsets, row_token, token_rows, row_weight, h)
        return combine(out_rows, token_rows)

    @staticmethod
    def backward(ctx, grad_out):
        rows, gate_up, down, offsets, row_token, token_rows, row_weight, h = ctx.saved_tensors
        grad_rows_out = grad_out.index_select(0, row_token)
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        act = silu * up  # unweighted SwiGLU output [N, I]
        needs_x, needs_gate_up, needs_down = ctx.needs_input_grad[:3]
        grad_act = grouped_mm(grad_rows_out, down, offsets)  # d out / d (weighted act)
        grad_row_weight = (grad_act * act).sum(-1)
        grad_down = (grouped_mm(grad_rows_out.t(), act.mul_(row_weight[:, None]), offsets)
                     if needs_down else None)
        grad_act.mul_(row_weight[:, None])
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_act, silu, out=grad_up)
        torch.mul(grad_act, up, out=grad_gate)
        # d silu(g)/dg = sig * (1 + g * (1 - sig)); h is not needed after this
        grad_gate.mul_(gate.mul_(1 - sig).add_(1).mul_(sig))
        grad_x = combine(grouped_mm(grad_h, gate_up, offsets), token_rows) if needs_x else None
        grad_gate_up = grouped_mm(grad_h.t(), rows, offsets) if needs_gate_up else None
        return grad_x, grad_gate_up, grad_down, None, None, None, grad_row_weight


def combine(rows: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
    """Sum each token's k rows: rows [N, d], token_rows [T, k] -> [T, d]."""
    return rows.index_select(0, token_rows.flatten()).unflatten(0, token_rows.shape).sum(1)


class RoutedExperts(nn.Module):
    """E gated-MLP experts applied to the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.lora = None  # an ExpertLora once adapters are attached (moetune.model.lora)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], expert_ids [T, k], weights [T, k] -> sum_k weights * expert(x) [T, hidden]."""
        if self.lora is not None:
            return self.lora(self, x, expert_ids, weights)
        flat_ids = expert_ids.flatten()
        order = flat_ids.argsort(stable=True)  # row r <- (token, slot) pair order[r]
        token_rows = order.argsort().view_as(expert_ids)
        offsets = torch.bincount(flat_ids, minlength=self.num_experts).cumsum(0).to(torch.int32)
        return RoutedExpertsFunction.apply(
            x, self.gate_up_proj, self.down_proj, offsets, order // expert_ids.shape[-1],
            token_rows, weights.flatten().index_select(0, order),
        )
