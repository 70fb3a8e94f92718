"""The DeepSeek-V3 decoder: embedding, MLA + (dense | MoE) blocks, final norm, head, MTP.

`DeepseekV3ForCausalLM` subclasses `transformers.PreTrainedModel` so TRL, PEFT, accelerate
and DeepSpeed treat it as a regular HF model; every hot path (MLA, routing, grouped
experts, the decode cache) is moetune's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from moetune.model.attention import MultiheadLatentAttention
from moetune.model.config import DeepseekV3Config
from moetune.model.kv_cache import LatentCache
from moetune.model.layers import GatedMLP, RMSNorm
from moetune.model.moe import MoE
from moetune.model.rope import RotaryEmbedding
from moetune.model.sharded_build import whole_for_init


class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + MLP(norm(x)); the MLP is a MoE where
    `config.is_moe_layer(layer_idx)` (DeepSeek's rule), else a dense gated MLP."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiheadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            MoE(config)
            if config.is_moe_layer(layer_idx)
            else GatedMLP(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """Multi-Token-Prediction depth k: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]),
    one decoder block, then `shared_head.norm` before the shared output head.
    (The concatenation order and the use of the main model's normed output follow vLLM's
    DeepSeek MTP, which serves DeepSeek's released MTP weights.)"""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.shared_head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, next_embeds, cos, sin, mask, cache=None):
        """hidden, next_embeds [B, S, hidden] -> (block output, normed output for the head).
        cache: a LatentCache holding this block's layer (speculative drafting)."""
        h = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        h = self.block(h, cos, sin, mask, cache)
        return h, self.shared_head_norm(h)


@dataclass
class CausalLMOutput(ModelOutput):
    """logits [B, S, V]; loss = lm_loss + mtp_weight * mtp_loss + alpha * aux_loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class DeepseekV3PreTrainedModel(PreTrainedModel):
    """What transformers needs of a model class: the config type, weight init (normal(0,
    initializer_range); RMSNorm weights 1, router bias 0) and the unsplittable block."""

    config_class = DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        with whole_for_init(module):  # a sharded build (ZeRO-3, FSDP2): this module alone
            self._draw_weights(module)

    def _draw_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif hasattr(module, "gate_up_proj"):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif hasattr(module, "e_score_correction_bias"):
            module.weight.normal_(0.0, std)
            if module.e_score_correction_bias is not None:
                module.e_score_correction_bias.zero_()


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    """The decoder without its head: token embedding, `num_hidden_layers` DecoderLayers, the
    final RMSNorm, YaRN rotary tables, and the MTP modules (run by the causal LM's loss)."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        rope = config.rope_parameters or {}
        self.rotary = RotaryEmbedding(
            config.qk_rope_head_dim, rope.get("rope_theta", 10000.0), config.yarn
        )
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k)
            for k in range(config.num_nextn_predict_layers)
        )
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """input_ids [B, S] -> (final normed hidden [B, S, hidden], cos, sin, mask,
        documents). attention_mask [B, T] marks real tokens (T = cache length + S).

        Packed rows (no attention_mask, position_ids restarting at 0 where a sequence
        starts, as TRL's padding-free collator makes them) attend within their own
        sequence only; `documents` [B, S] then numbers those sequences, else it is None."""
        x = self.embed_tokens(input_ids)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]
                position_ids = position_ids.expand(x.shape[0], -1)
        cos, sin = self.rotary(position_ids)
        documents = (
            packed_documents(position_ids) if attention_mask is None and cache is None else None
        )
        if documents is not None:
            mask = build_document_mask(documents)
        else:
            mask = build_attention_mask(
                attention_mask, x.shape[1], past, x.device, cache is not None
            )
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x), cos, sin, mask, documents


def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, S] sequence number of each token when a row packs several sequences, else None."""
    if position_ids.shape[1] < 2 or not bool((position_ids[:, 1:] == 0).any()):
        return None
    return (position_ids == 0).long().cumsum(-1)


def build_document_mask(documents: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] mask: causal, and within the same packed sequence."""
    positions = torch.arange(documents.shape[1], device=documents.device)
    causal = positions[None, :] <= positions[:, None]
    same = documents[:, :, None] == documents[:, None, :]
    return (causal & same)[:, None]


def build_attention_mask(attention_mask, query_len, past, device, force=False):
    """Boolean [B, 1, S, T] mask (True = attend): causal and over real key tokens. A query
    always sees itself, so padded rows give no NaN. None when plain causal attention does."""
    if attention_mask is None and not force:
        return None
    total = past + query_len
    query_pos = torch.arange(past, total, device=device)[:, None]
    causal = torch.arange(total, device=device)[None, :] <= query_pos
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :total]
        mask = mask | (torch.arange(total, device=device)[None, :] == query_pos)
    return mask


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel):
    """DeepSeek-V3 (and V2, Kimi-K2, Moonlight) for causal LM: the decoder and its output head.

    `forward(input_ids [B, S], labels=)` returns logits [B, S, V] and, with labels, the loss
    lm + mtp_loss_weight * MTP + aux_loss_alpha * sequence balance. Load balancing: routers
    count tokens per expert in training forwards; after an optimizer step call
    `sync_expert_load()` (data parallel) and `update_expert_bias(gamma)`. Checkpoints are HF
    folders that transformers and vLLM load (`from_pretrained`/`save_pretrained`, FP8
    included: moetune.model.checkpoint); `generate` decodes over a cache of MLA's latent.
    """

    _tied_weights_keys = {}

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # HF trainers (TRL) read and write token ids here, as on any causal LM.
        self.generation_config = GenerationConfig.from_model_config(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        labels=None,
        cache: LatentCache | None = None,
        logits_to_keep: int = 0,
        mtp_only: bool = False,
        **hf_kwargs,
    ):
        """input_ids [B, S]; labels [B, S] (unshifted, -100 ignored) -> CausalLMOutput.
        mtp_only: the MTP loss trains the MTP modules only (the trunk's hidden states, the
        embedding and the head enter it detached), as RL keeps its drafter up to date.

        Flags that HF trainers pass (use_cache, return_dict, num_items_in_batch, ...) are
        accepted and ignored; inputs that would change the result are refused."""
        unsupported = [
            k for k in ("inputs_embeds", "past_key_values") if hf_kwargs.get(k) is not None
        ]
        if unsupported:
            raise ValueError(
                f"DeepseekV3ForCausalLM.forward does not take {unsupported}; pass "
                "input_ids (and a LatentCache as `cache` for decoding)"
            )
        hidden, cos, sin, mask, documents = self.model(
            input_ids, attention_mask, position_ids, cache
        )
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        out = CausalLMOutput(logits=logits, hidden_states=hidden)
        if labels is None:
            return out
        out.lm_loss = next_token_loss(logits, labels, shift=1, documents=documents)
        out.loss = out.lm_loss
        if len(self.model.mtp) and self.config.mtp_loss_weight:
            out.mtp_loss = self.mtp_loss(
                hidden, input_ids, labels, cos, sin, mask, documents, detached=mtp_only
            )
            out.loss = out.loss + self.config.mtp_loss_weight * out.mtp_loss
        balance = [
            m.mlp.balance_loss
            for m in self.model.layers
            if isinstance(m.mlp, MoE) and m.mlp.balance_loss is not None
        ]
        if balance and self.training:
            out.aux_loss = torch.stack(balance).sum()
            out.loss = out.loss + self.config.aux_loss_alpha * out.aux_loss
        return out

    def mtp_loss(
        self, hidden, input_ids, labels, cos, sin, mask, documents=None, detached=False
    ) -> torch.Tensor:
        """Mean over depths k of the loss of predicting token i+k+1 at position i. detached:
        no gradient reaches the trunk, the embedding or the head (the MTP modules only)."""
        embed, head = self.model.embed_tokens, self.lm_head
        if detached:
            hidden = hidden.detach()
            weight = embed.weight.detach()
            embed = lambda ids: F.embedding(ids, weight)
            head = lambda x: F.linear(x, self.lm_head.weight.detach())
        losses = []
        for k, module in enumerate(self.model.mtp, start=1):
            next_ids = torch.roll(input_ids, shifts=-k, dims=1)  # t_{i+k}; tail is masked below
            hidden, normed = module(hidden, embed(next_ids), cos, sin, mask)
            losses.append(next_token_loss(head(normed), labels, k + 1, documents))
        return torch.stack(losses).mean()

    # Expert load balancing -------------------------------------------------------------
    def routers(self):
        return [layer.mlp.gate for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last bias update: [num_moe_layers, E]."""
        return torch.stack([router.load for router in self.routers()])

    @torch.no_grad()
    def sync_expert_load(self) -> None:
        """Sum the routers' token counts over all data-parallel ranks (no-op alone), so that
        every rank logs the same load and moves its bias the same way."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        load = self.expert_load()
        torch.distributed.all_reduce(load)
        for router, counts in zip(self.routers(), load):
            router.load.copy_(counts)

    def update_expert_bias(self, gamma: float) -> None:
        """b_i += gamma * sign(mean_load - load_i) in every MoE layer; resets the counts."""
        for router in self.routers():
            router.update_bias(gamma)

    def reset_expert_load(self) -> None:
        for router in self.routers():
            router.reset_buffers()

    # Checkpoints and generation live in their own modules ------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        fp8: str | None = None,
        config=None,
        expert_parallel=None,
    ):
        """Load a checkpoint folder. fp8="frozen" keeps (or makes) the decoder's linears and
        routed experts FP8, for a frozen base under LoRA; fp8="train" trains the decoder's
        linears through FP8 GEMMs; `expert_parallel` (ExpertParallelGroups): each rank reads
        and holds its own share of the routed experts; see moetune.model.checkpoint."""
        from moetune.model.checkpoint import load_pretrained

        return load_pretrained(
            cls, path, dtype, device, config=config, fp8=fp8, expert_parallel=expert_parallel
        )

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30, write: bool = True, **_):
        from moetune.model.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, write=write)

    def generate(self, input_ids, **kwargs):
        from moetune.model.generation import generate

        return generate(self, input_ids, **kwargs)


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, shift: int, documents: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits[:, i] against labels[:, i + shift] over non -100 labels
    (and, for packed rows, over targets in the same sequence as position i)."""
    logits = logits[:, : logits.shape[1] - shift]
    targets = labels[:, shift:]
    if documents is not None:
        targets = targets.masked_fill(documents[:, shift:] != documents[:, :-shift], -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
