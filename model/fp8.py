"""FP8 layers: frozen FP8 bases held as DeepSeek ships them (float8_e4m3fn + 128x128
`weight_scale_inv`), and linears that train through FP8 GEMMs.

`FrozenFP8Linear` replaces an `nn.Linear` (the base under LoRA): the forward quantises
activations per 1x128 tile and runs the block-scaled FP8 GEMM; the backward returns the
input gradient through the FP8 GEMM too (the gradient quantised per 1x128 tile) and no
weight gradient. `FP8Linear` trains in FP8 as DeepSeek-V3 did: high-precision master
weights, quantised per step (128x128) for the forward and the input-gradient GEMMs, output
gradients quantised per 1x128 tile, and the weight gradient in the master dtype (or FP8, as
an option). Routed experts follow both schemes through the grouped FP8 GEMM
(`FP8ExpertGemms`): `FP8RoutedExperts` holds frozen FP8 projections as stored, one
[E, out, in] tensor per projection, and `FP8TrainingExperts` quantises its master weights
per step (its weight gradients stay in the master dtype). `to_frozen_fp8` and
`to_fp8_training` convert a model in place; `from_pretrained(path, fp8="frozen" | "train")`
builds either straight from a checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetune.kernels import (
    dequantize_act,
    dequantize_weight,
    fp8_gemm,
    fp8_grouped_gemm,
    quantize_act,
    quantize_weight,
    transpose_fp8,
)
from moetune.model.experts import ExpertGemms, RoutedExperts, route

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def pad_k(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of 128 (float8 padded through a uint8 view)."""
    extra = -t.shape[-1] % 128
    if not extra:
        return t
    if t.dtype == torch.float8_e4m3fn:
        return F.pad(t.view(torch.uint8), (0, extra)).view(torch.float8_e4m3fn)
    return F.pad(t, (0, extra))


class KeepsFP8Buffers:
    """Mixin: `model.to(dtype)` casts every floating buffer; cast the FP8 ones back (exact:
    bfloat16 and float32 represent every float8_e4m3fn value) and keep scales in float32."""

    def _apply(self, fn, recurse=True):
        fp8 = [n for n, b in self.named_buffers(recurse=False) if b.dtype == torch.float8_e4m3fn]
        super()._apply(fn, recurse)
        for name, buffer in list(self.named_buffers(recurse=False)):
            if name in fp8:
                setattr(self, name, buffer.to(torch.float8_e4m3fn))
            elif name.endswith("scale_inv"):
                setattr(self, name, buffer.float())
        return self


def block_linears(model: nn.Module):
    """(parent, name, linear) for every bias-free linear inside the decoder blocks (attention,
    dense MLPs, shared experts). Embeddings, the head, norms, the router and MTP's eh_proj
    are left out: they stay in high precision, as in DeepSeek-V3's recipe."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear
                and child.bias is None
                and name not in ("lm_head", "eh_proj")
            ):
                yield parent, name, child


def to_frozen_fp8(model: nn.Module) -> nn.Module:
    """Hold the decoder blocks' linears and routed experts as frozen FP8 (in place)."""
    for parent, name, linear in block_linears(model):
        setattr(parent, name, FrozenFP8Linear.from_linear(linear))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedExperts):
                setattr(parent, name, FP8RoutedExperts(child))
    model.config.quantization_config = dict(QUANTIZATION_CONFIG)
    return model


def to_fp8_training(model: nn.Module, fp8_wgrad: bool = False) -> nn.Module:
    """Train the decoder blocks' linears and routed experts through FP8 GEMMs (in place; the
    master weights stay). `fp8_wgrad` applies to the linears."""
    for parent, name, linear in block_linears(model):
        setattr(parent, name, FP8Linear.from_linear(linear, fp8_wgrad))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RoutedExperts:
                setattr(parent, name, FP8TrainingExperts.from_experts(child))
    return model


def fp8_input_grad(
    grad_out: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor
) -> torch.Tensor:
    """grad_out [..., out] @ W [out, in] -> [..., in] via the FP8 GEMM: the gradient quantised
    per 1x128 tile, W (float8 with 128x128 scales) as its blocks transposed (no re-quantisation)."""
    g_q, g_scale = quantize_act(pad_k(grad_out.reshape(-1, grad_out.shape[-1])))
    weight_t, scale_t = transposed((weight, scale_inv))
    grad_x = fp8_gemm(g_q, g_scale, pad_k(weight_t), scale_t, out_dtype=grad_out.dtype)
    return grad_x.view(*grad_out.shape[:-1], weight.shape[1])


class FrozenFP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale_inv):
        """x [..., in] -> x W^T [..., out] in x's dtype, via the FP8 GEMM."""
        x_q, x_scale = quantize_act(pad_k(x.reshape(-1, x.shape[-1])))
        out = fp8_gemm(x_q, x_scale, pad_k(weight), scale_inv, out_dtype=x.dtype)
        ctx.save_for_backward(weight, scale_inv)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        return fp8_input_grad(grad_out, *ctx.saved_tensors), None, None


class FrozenFP8Linear(KeepsFP8Buffers, nn.Module):
    """A bias-free linear layer with a frozen FP8 weight [out, in] and its block scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device=None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer(
            "weight",
            torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device),
        )
        self.register_buffer(
            "weight_scale_inv",
            torch.empty(math.ceil(out_features / 128), math.ceil(in_features / 128), device=device),
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FrozenFP8Linear:
        if linear.bias is not None:
            raise ValueError("FrozenFP8Linear holds bias-free layers only")
        module = cls(
            linear.in_features,
            linear.out_features,
            device=linear.weight.device,
            compute_dtype=linear.weight.dtype,
        )
        if linear.weight.device.type != "meta":
            module.weight, module.weight_scale_inv = quantize_weight(linear.weight.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale_inv, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenFP8LinearFunction.apply(x, self.weight, self.weight_scale_inv)


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, fp8_wgrad: bool):
        """x [..., in], master weight [out, in] -> [..., out] in x's dtype."""
        x_q, x_scale = quantize_act(pad_k(x.reshape(-1, x.shape[-1])))
        w_q, w_scale = quantize_weight(weight.detach())
        out = fp8_gemm(x_q, x_scale, pad_k(w_q), w_scale, out_dtype=x.dtype)
        ctx.save_for_backward(x_q, x_scale, w_q, w_scale)  # activations kept in FP8
        ctx.in_features, ctx.weight_dtype, ctx.fp8_wgrad = x.shape[-1], weight.dtype, fp8_wgrad
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_q, x_scale, w_q, w_scale = ctx.saved_tensors
        grad_x = fp8_input_grad(grad_out, w_q, w_scale)
        if not ctx.needs_input_grad[1]:  # a frozen master (e.g. under LoRA)
            return grad_x, None, None
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        x = dequantize_act(x_q, x_scale)[:, : ctx.in_features]
        if ctx.fp8_wgrad:
            gt_q, gt_scale = quantize_act(pad_k(grad.t().float()))
            xt_q, xt_scale = quantize_weight(x.t())
            grad_w = fp8_gemm(gt_q, gt_scale, pad_k(xt_q), xt_scale, out_dtype=torch.float32)
        else:
            grad_w = grad.t().float() @ x
        return grad_x, grad_w.to(ctx.weight_dtype), None


class FP8Linear(nn.Linear):
    """A bias-free linear layer trained through FP8 GEMMs on its high-precision master weight."""

    def __init__(self, in_features: int, out_features: int, fp8_wgrad: bool = False, **like):
        super().__init__(in_features, out_features, bias=False, **like)
        self.fp8_wgrad = fp8_wgrad

    @classmethod
    def from_linear(cls, linear: nn.Linear, fp8_wgrad: bool = False) -> FP8Linear:
        if linear.bias is not None:
            raise ValueError("FP8Linear holds bias-free layers only")
        module = cls(linear.in_features, linear.out_features, fp8_wgrad, device="meta")
        module.weight = linear.weight  # the same master parameter
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.fp8_wgrad)


FP8Tensor = tuple[torch.Tensor, torch.Tensor]  # float8_e4m3fn values, their float32 block scales


class FP8ExpertGemms(ExpertGemms):
    """The expert products through block-scaled FP8 grouped GEMMs: the rows (or gradients)
    quantised per 1x128 tile, the weights FP8 with 128x128 block scales, float32
    accumulation, outputs in the rows' dtype. The input-gradient products use the weights'
    blocks transposed (no re-quantisation). gate_up comes in parts, each its own GEMM so its
    scale blocks stay its own: gate and up as checkpoints store them, or one [E, 2I, hidden]
    part quantised from a master weight."""

    def __init__(self, gate_up_parts: list[FP8Tensor], down: FP8Tensor):
        self.gate_up_parts, self.down_weight = gate_up_parts, down

    @classmethod
    def quantized(cls, gate_up: torch.Tensor, down: torch.Tensor) -> FP8ExpertGemms:
        """From master weights gate_up [E, 2I, hidden] and down [E, hidden, I]."""
        return cls([quantize_weight(gate_up.detach())], quantize_weight(down.detach()))

    def gate_up(self, rows, offsets):
        quantized = quantize_rows(rows)  # once for every part
        return torch.cat(
            [grouped_fp8(quantized, part, offsets, rows.dtype) for part in self.gate_up_parts], 1
        )

    def down(self, act, offsets):
        return grouped_fp8(quantize_rows(act), self.down_weight, offsets, act.dtype)

    def down_input_grad(self, grad, offsets):
        return grouped_fp8(quantize_rows(grad), transposed(self.down_weight), offsets, grad.dtype)

    def gate_up_input_grad(self, grad_h, offsets):
        widths = [weight.shape[1] for weight, _ in self.gate_up_parts]
        grads = zip(grad_h.split(widths, dim=1), self.gate_up_parts)
        return sum(
            grouped_fp8(quantize_rows(grad), transposed(part), offsets, grad_h.dtype)
            for grad, part in grads
        )


def quantize_rows(rows: torch.Tensor) -> FP8Tensor:
    """rows [N, K] -> float8 rows [N, K padded to 128] and their 1x128 tile scales."""
    return quantize_act(pad_k(rows.contiguous()))


def grouped_fp8(
    rows: FP8Tensor, weight: FP8Tensor, offsets: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Quantised expert-sorted rows [N, in] times each row's expert weight [E, out, in]
    transposed -> [N, out] in out_dtype, via the grouped FP8 GEMM."""
    (rows_q, rows_scale), (w, scale) = rows, weight
    return fp8_grouped_gemm(rows_q, rows_scale, pad_k(w), scale, offsets, out_dtype=out_dtype)


def transposed(weight: FP8Tensor) -> FP8Tensor:
    """W^T [E, in, out] with its block scales: the 128x128 blocks of W transposed."""
    w, scale = weight
    return transpose_fp8(w), scale.transpose(-2, -1).contiguous()


class FP8TrainingExperts(RoutedExperts):
    """Routed experts trained through the grouped FP8 GEMM on their high-precision master
    weights (the same parameters, quantised per 128x128 block at every forward)."""

    @classmethod
    def from_experts(cls, experts: RoutedExperts) -> FP8TrainingExperts:
        with torch.device("meta"):
            module = cls(experts.num_experts, experts.down_proj.shape[1], experts.intermediate_size)
        module.gate_up_proj, module.down_proj = experts.gate_up_proj, experts.down_proj
        module.lora = experts.lora
        return module

    def gemms(self) -> FP8ExpertGemms:
        return FP8ExpertGemms.quantized(self.gate_up_proj, self.down_proj)


class FP8RoutedExperts(KeepsFP8Buffers, nn.Module):
    """Routed experts with frozen FP8 projections gate/up [E, I, hidden], down [E, hidden, I]
    (each with `<name>_scale_inv` [E, blocks, blocks])."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.num_experts, self.intermediate_size = experts.num_experts, experts.intermediate_size
        self.compute_dtype = experts.down_proj.dtype
        inter = experts.intermediate_size
        device = experts.down_proj.device
        weights = {
            "gate_proj": experts.gate_up_proj[:, :inter],
            "up_proj": experts.gate_up_proj[:, inter:],
            "down_proj": experts.down_proj,
        }
        for name, w in weights.items():
            rows, cols = w.shape[1:]
            self.register_buffer(
                name, torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=device)
            )
            self.register_buffer(
                f"{name}_scale_inv",
                torch.empty(
                    self.num_experts, math.ceil(rows / 128), math.ceil(cols / 128), device=device
                ),
            )
            if device.type != "meta":
                q, s = quantize_weight(w.detach())
                getattr(self, name).copy_(q)
                getattr(self, f"{name}_scale_inv").copy_(s)
        self.lora = None

    def stored(self, name: str) -> FP8Tensor:
        return getattr(self, name), getattr(self, f"{name}_scale_inv")

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """As RoutedExperts.forward, through the grouped FP8 GEMM on the stored weights."""
        gemms = FP8ExpertGemms(
            [self.stored("gate_proj"), self.stored("up_proj")], self.stored("down_proj")
        )
        return route(self, x, expert_ids, weights, gemms)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a (possibly FP8-stored) linear or experts module computes in."""
    return getattr(module, "compute_dtype", None) or next(t.dtype for t in module.parameters())


def dense_weight(linear: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A linear layer's weight as a dense tensor, whatever holds it (plain, FP8 or LoRA)."""
    if hasattr(linear, "dense_weight"):
        weight = linear.dense_weight()
    elif isinstance(linear, FrozenFP8Linear):
        weight = linear.dequantized_weight(linear.compute_dtype)
    else:
        weight = linear.weight
    return weight if dtype is None else weight.to(dtype)
