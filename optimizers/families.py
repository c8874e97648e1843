"""The learned function ``f``: per-element features (N, 19) -> one update direction per element (N,).

Families share one call signature, ``f(features, segments) -> (N,)``:

- :class:`PerParamMLP` — the same small MLP on every element independently (small_fc_lopt style).
- :class:`DeepSet` — per-element layers plus, in every layer, the mean over the element's segment (a tensor or a
  spec entry) as context: permutation invariant within a segment, the "standard choice" of the UNF paper.
- The UNF family (DeepSet layers, then an equivariant UNF layer across the whole spec) lives in ``optimizers.unf``.

Weights are shared across all segments, so any ``f`` works for any model ("by role" sharing: every element and
every segment plays the same role).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .features import N_FEATURES, Segments, segment_mean

__all__ = ["PerParamMLP", "DeepSet", "DeepSetLayer", "FAMILIES"]


class PerParamMLP(nn.Module):
    """Per-element MLP ``19 -> hidden -> ... -> 1`` with ReLU (no interaction between elements)."""

    def __init__(self, hidden: int = 32, layers: int = 2, in_features: int = N_FEATURES):
        super().__init__()
        self.config = {"hidden": hidden, "layers": layers, "in_features": in_features}  # to save and rebuild
        dims = [in_features] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        blocks.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*blocks)
        # the read-out starts random, as in the paper (beta = 0.001 keeps the learned term small at first): a zero
        # read-out would give ES/PES almost no signal, since the effect of perturbing either beta or the read-out is
        # proportional to the other

    def forward(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class DeepSetLayer(nn.Module):
    """``y = x A + mean_segment(x) B + b``: equivariant to permutations within each segment."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.elem = nn.Linear(in_features, out_features)
        self.pool = nn.Linear(in_features, out_features, bias=False)
        bound = 1 / math.sqrt(2 * in_features)  # fan-in counts both terms
        nn.init.uniform_(self.elem.weight, -bound, bound)
        nn.init.uniform_(self.pool.weight, -bound, bound)

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        return self.elem(x) + self.pool(segment_mean(x, segments))[segments.ids]


class DeepSet(nn.Module):
    """DS[hidden] -> ReLU -> ... -> DS[1] (the UNF paper's DeepSet optimizer uses three DS[32] layers)."""

    def __init__(self, hidden: int = 32, layers: int = 3, in_features: int = N_FEATURES):
        super().__init__()
        self.config = {"hidden": hidden, "layers": layers, "in_features": in_features}  # to save and rebuild
        dims = [in_features] + [hidden] * layers
        self.layers = nn.ModuleList(DeepSetLayer(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = DeepSetLayer(dims[-1], 1)  # random, as in the paper (see PerParamMLP)

    def hidden(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = features
        for layer in self.layers:
            x = torch.relu(layer(x, segments))
        return x

    def forward(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        return self.out(self.hidden(features, segments), segments).squeeze(-1)


FAMILIES: dict[str, type[nn.Module]] = {"mlp": PerParamMLP, "deepset": DeepSet}
