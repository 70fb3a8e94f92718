"""The MLA decode cache: compressed latents and rotary keys, preallocated per layer."""

from __future__ import annotations

import torch


class LatentCache:
    """Holds latent [L, B, T, kv_lora_rank] and k_rope [L, B, T, rope_dim] for `max_len`
        positions. Layers append in order; `advance(n)` moves the shared write position after
        all layers of a step have appended n tokens. `first_layer`: the index of the first layer it
    holds (a cache of an MTP module's block, whose layer index follows the decoder's)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        first_layer: int = 0,
    ):
        self.latent = torch.zeros(
            num_layers, batch, max_len, kv_lora_rank, dtype=dtype, device=device
        )
        self.k_rope = torch.zeros(num_layers, batch, max_len, rope_dim, dtype=dtype, device=device)
        self.length = 0
        self.first_layer = first_layer

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]

    def append(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor):
        """Store [B, S, ...] new entries at the write position; return all entries so far."""
        layer -= self.first_layer
        end = self.length + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"LatentCache holds {self.max_len} positions; {end} requested")
        self.latent[layer, :, self.length : end] = latent
        self.k_rope[layer, :, self.length : end] = k_rope
        return self.latent[layer, :, :end], self.k_rope[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Drop the positions where keep [B, length] (bool) is False: each row's kept entries
        move, in order, to the end of [0, n) (n = the most any row keeps), as left padding
        does. Returns the new keep mask [B, n]; the write position becomes n."""
        n = int(keep.sum(1).max())
        order = torch.argsort(keep.int(), dim=1, stable=True)[:, keep.shape[1] - n :]
        for store in (self.latent, self.k_rope):
            index = order[None, :, :, None].expand(store.shape[0], -1, -1, store.shape[-1])
            store[:, :, :n] = store[:, :, : keep.shape[1]].gather(2, index)
        self.length = n
        return keep.gather(1, order)

    def bytes_per_token(self) -> int:
        """Cache bytes per token across layers (latent + rope key)."""
        layers = self.latent.shape[0]
        width = self.latent.shape[-1] + self.k_rope.shape[-1]
        return layers * width * self.latent.element_size()
