"""Per-layer expert load over a run: coefficient of variation per step, and a PNG at the end.

The load of a step is the routers' token counts since the previous optimizer step,
[num_moe_layers, E]. Its coefficient of variation per layer (std / mean over experts,
population std) is 0 for a perfectly balanced layer and sqrt(E - 1) when one expert takes
every token.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_cv(load: torch.Tensor) -> torch.Tensor:
    """load [L, E] token counts -> [L] std / mean over experts (0 for an idle layer)."""
    load = load.double()
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.std(dim=-1, correction=0) / mean.clamp(min=1e-12), 0.0)


class ExpertLoadHistory:
    """Records each step's load; `metrics` of the last step; `plot` of the whole run."""

    def __init__(self, layer_ids: list[int]):
        self.layer_ids = layer_ids  # decoder layer index of each MoE layer
        self.steps: list[int] = []
        self.cv: list[list[float]] = []
        self.total: torch.Tensor | None = None  # [L, E] tokens over the run

    def record(self, step: int, load: torch.Tensor) -> dict[str, float]:
        """Add a step's load [L, E]; returns {expert_load_cv: mean, expert_load_cv/layer_i: ...}."""
        load = load.detach().double().cpu()
        cv = load_cv(load).tolist()
        self.steps.append(step)
        self.cv.append(cv)
        self.total = load if self.total is None else self.total + load
        metrics = {"expert_load_cv": sum(cv) / max(len(cv), 1)}
        metrics |= {f"expert_load_cv/layer_{i}": v for i, v in zip(self.layer_ids, cv)}
        return metrics

    def plot(self, path: str | Path) -> Path | None:
        """Two panels: CV per layer against the step, and each layer's share of tokens per
        expert over the run (heatmap). None when nothing was recorded."""
        if not self.steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (curves, heatmap) = plt.subplots(1, 2, figsize=(12, 4.5))
        cv = torch.tensor(self.cv)
        for column, layer in enumerate(self.layer_ids):
            curves.plot(self.steps, cv[:, column], label=f"layer {layer}")
        curves.set(
            xlabel="optimizer step",
            ylabel="expert load CV (std / mean)",
            title="Expert load imbalance per MoE layer",
        )
        curves.legend(fontsize="small")
        share = self.total / self.total.sum(dim=-1, keepdim=True).clamp(min=1)
        image = heatmap.imshow(share.numpy(), aspect="auto", cmap="viridis")
        heatmap.set(
            xlabel="routed expert",
            ylabel="MoE layer",
            title="Share of routed tokens",
            yticks=range(len(self.layer_ids)),
            yticklabels=self.layer_ids,
        )
        figure.colorbar(image, ax=heatmap)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
