"""Routed experts on expert-sorted tokens, with grouped GEMMs (`torch._grouped_mm`).

Weights are stacked like transformers 5: `gate_up_proj` [E, 2I, hidden] (gate rows, then
up rows) and `down_proj` [E, hidden, I]. Tokens are sorted by expert once; one grouped
GEMM per projection covers all experts, in the forward and in the hand-written backward
(which avoids the copies autograd's generic grouped-GEMM backward makes on CPU). The four
products through the weights go through an `ExpertGemms` object, so FP8 experts
(`moetune.model.fp8`) reuse the same function with block-scaled FP8 GEMMs.
"""

from __future__ import annotations

import torch
from torch import nn

from moetune.kernels.expert_rows import combine, swiglu, swiglu_backward


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of a [N, K] in groups ending at offsets [E] times b [E, K, M] -> [N, M];
    or, with 2-D a [K, N] and b [N, M], per-group a_g @ b_g -> [E, K, M]."""
    return torch._grouped_mm(a, b, offs=offsets)


class ExpertGemms:
    """The products of expert-sorted rows with the stacked expert weights, in their dtype:
    gate_up [E, 2I, hidden], down [E, hidden, I]; rows in groups ending at offsets [E]."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up_weight, self.down_weight = gate_up, down

    def gate_up(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """rows [N, hidden] -> rows W_gate_up^T [N, 2I]."""
        return grouped_mm(rows, self.gate_up_weight.transpose(-2, -1), offsets)

    def down(self, act: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """act [N, I] -> act W_down^T [N, hidden]."""
        return grouped_mm(act, self.down_weight.transpose(-2, -1), offsets)

    def down_input_grad(self, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """grad [N, hidden] -> grad W_down [N, I]."""
        return grouped_mm(grad, self.down_weight, offsets)

    def gate_up_input_grad(self, grad_h: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """grad_h [N, 2I] -> grad_h W_gate_up [N, hidden]."""
        return grouped_mm(grad_h, self.gate_up_weight, offsets)


def select_rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t.index_select(0, index)


def add_rows(target: torch.Tensor, index: torch.Tensor | None, delta: torch.Tensor) -> None:
    """target[index] += delta in place (index None: all rows)."""
    if index is None:
        target.add_(delta)
    else:
        target.index_add_(0, index, delta)


class RoutedExpertsFunction(torch.autograd.Function):
    """out[t] = sum over token t's k rows r of
    down_e(row_weight[r] * silu(gate_e(x_t)) * up_e(x_t)), optionally with LoRA on the
    selected experts: W_e x + s B_e (A_e x) per projection.

    Rows are the (token, expert) pairs sorted by expert: row r holds token `row_token[r]`,
    and `token_rows[t]` lists token t's k rows, so both the dispatch and the combine are
    gathers (`index_select`), never scattered atomic adds. `gemms` computes the products
    through the base weights (dense or FP8); `gate_up` and `down` are the weights that receive
    gradients (None for a frozen FP8 base). Saves x's rows, the gate/up activations and the
    adapters' rank-r activations; the SwiGLU output is recomputed in the backward, which
    writes every gradient with one grouped GEMM each and skips the weight gradients of a
    frozen base (the weight gradients stay in the rows' dtype, also under FP8). Adapters are
    stacked per selected expert: gate/up A
    [S, r, hidden], B [S, I, r]; down A [S, r, I], B [S, hidden, r]; `lora_rows` are the
    rows of selected experts (None: all experts), `lora_offsets` their cumulative counts.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        gate_up,
        down,
        gemms: ExpertGemms,
        offsets,
        row_token,
        token_rows,
        row_weight,
        gate_A=None,
        up_A=None,
        down_A=None,
        gate_B=None,
        up_B=None,
        down_B=None,
        lora_rows=None,
        lora_offsets=None,
        scaling=1.0,
    ):
        """x [T, hidden]; gate_up [E, 2I, hidden] or None; down [E, hidden, I] or None;
        offsets [E] int32 (cumulative rows per expert); row_token [N]; token_rows [T, k];
        row_weight [N]. -> [T, hidden]."""
        lora = gate_A is not None
        row_weight = row_weight.to(x.dtype)
        rows = x.index_select(0, row_token)
        h = gemms.gate_up(rows, offsets)
        u_in = u_out = None
        if lora:
            rank = gate_A.shape[1]
            u_in = grouped_mm(
                select_rows(rows, lora_rows),
                torch.cat((gate_A, up_A), 1).transpose(-2, -1),
                lora_offsets,
            )
            delta = torch.cat(
                (
                    grouped_mm(u_in[:, :rank], gate_B.transpose(-2, -1), lora_offsets),
                    grouped_mm(u_in[:, rank:], up_B.transpose(-2, -1), lora_offsets),
                ),
                1,
            )
            add_rows(h, lora_rows, delta.mul_(scaling))
        act = swiglu(h, row_weight)
        out_rows = gemms.down(act, offsets)
        if lora:
            u_out = grouped_mm(select_rows(act, lora_rows), down_A.transpose(-2, -1), lora_offsets)
            delta = grouped_mm(u_out, down_B.transpose(-2, -1), lora_offsets)
            add_rows(out_rows, lora_rows, delta.mul_(scaling))
        ctx.save_for_backward(
            rows,
            offsets,
            row_token,
            token_rows,
            row_weight,
            h,
            gate_A,
            up_A,
            down_A,
            gate_B,
            up_B,
            down_B,
            lora_rows,
            lora_offsets,
            u_in,
            u_out,
        )
        ctx.gemms, ctx.scaling = gemms, scaling
        return combine(out_rows, token_rows)

    @staticmethod
    def backward(ctx, grad_out):
        (
            rows,
            offsets,
            row_token,
            token_rows,
            row_weight,
            h,
            gate_A,
            up_A,
            down_A,
            gate_B,
            up_B,
            down_B,
            lora_rows,
            lora_offsets,
            u_in,
            u_out,
        ) = ctx.saved_tensors
        lora, s, gemms = gate_A is not None, ctx.scaling, ctx.gemms
        needs_x, needs_gate_up, needs_down = ctx.needs_input_grad[:3]
        grad_rows_out = grad_out.index_select(0, row_token)
        act_weighted = swiglu(h, row_weight) if (lora or needs_down) else None  # recomputed
        grad_act = gemms.down_input_grad(grad_rows_out, offsets)  # d out / d (weighted act)
        lora_grads = [None] * 6
        if lora:
            grad_sel = select_rows(grad_rows_out, lora_rows)
            grad_u_out = grouped_mm(grad_sel, down_B, lora_offsets).mul_(s)
            lora_grads[5] = grouped_mm(grad_sel.t(), u_out, lora_offsets).mul_(s)  # down_B
            lora_grads[2] = grouped_mm(
                grad_u_out.t(), select_rows(act_weighted, lora_rows), lora_offsets
            )  # down_A
            add_rows(grad_act, lora_rows, grouped_mm(grad_u_out, down_A, lora_offsets))
        grad_down = grouped_mm(grad_rows_out.t(), act_weighted, offsets) if needs_down else None
        grad_h, grad_row_weight = swiglu_backward(h, row_weight, grad_act)
        grad_rows = gemms.gate_up_input_grad(grad_h, offsets) if (needs_x or lora) else None
        if lora:
            rank, inter = gate_A.shape[1], gate_B.shape[1]
            grad_h_sel = select_rows(grad_h, lora_rows)
            g_gate, g_up = grad_h_sel[:, :inter], grad_h_sel[:, inter:]
            lora_grads[3] = grouped_mm(g_gate.t(), u_in[:, :rank], lora_offsets).mul_(s)  # gate_B
            lora_grads[4] = grouped_mm(g_up.t(), u_in[:, rank:], lora_offsets).mul_(s)  # up_B
            grad_u_in = torch.cat(
                (grouped_mm(g_gate, gate_B, lora_offsets), grouped_mm(g_up, up_B, lora_offsets)), 1
            ).mul_(s)
            grad_a = grouped_mm(grad_u_in.t(), select_rows(rows, lora_rows), lora_offsets)
            lora_grads[0], lora_grads[1] = grad_a[:, :rank], grad_a[:, rank:]  # gate_A, up_A
            add_rows(
                grad_rows,
                lora_rows,
                grouped_mm(grad_u_in, torch.cat((gate_A, up_A), 1), lora_offsets),
            )
        grad_x = combine(grad_rows, token_rows) if needs_x else None
        grad_gate_up = grouped_mm(grad_h.t(), rows, offsets) if needs_gate_up else None
        return (
            grad_x,
            grad_gate_up,
            grad_down,
            None,
            None,
            None,
            None,
            grad_row_weight,
            *lora_grads,
            None,
            None,
            None,
        )


class RoutedExperts(nn.Module):
    """E gated-MLP experts applied to the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.lora = None  # an ExpertLora once adapters are attached (moetune.model.lora)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, hidden], expert_ids [T, k], weights [T, k]
        -> sum_k weights * expert(x) [T, hidden]."""
        return route(self, x, expert_ids, weights, self.gemms(), self.gate_up_proj, self.down_proj)

    def gemms(self) -> ExpertGemms:
        return ExpertGemms(self.gate_up_proj, self.down_proj)


def route(
    experts: nn.Module,
    x,
    expert_ids,
    weights,
    gemms: ExpertGemms,
    gate_up: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sort the (token, expert) pairs by expert and run the grouped-expert function through
    `gemms` (and the adapters in `experts.lora`, if any); gate_up and down, when given, get
    weight gradients. Shared by RoutedExperts and the FP8 experts, which differ only in how
    they hold and multiply the weights."""
    flat_ids = expert_ids.flatten()
    order = flat_ids.argsort(stable=True)  # row r <- (token, slot) pair order[r]
    token_rows = order.argsort().view_as(expert_ids)
    counts = torch.bincount(flat_ids, minlength=experts.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    adapters = ()
    if experts.lora is not None:
        adapters = experts.lora.arguments(counts, flat_ids.index_select(0, order))
    return RoutedExpertsFunction.apply(
        x,
        gate_up,
        down,
        gemms,
        offsets,
        order // expert_ids.shape[-1],
        token_rows,
        weights.flatten().index_select(0, order),
        *adapters,
    )
