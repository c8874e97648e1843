"""Networks over weight spaces: the equivariant ``UNF`` stack, invariant pooling and an invariant model,
plus DeepSet and StatNN baselines with the same feature API (``entry -> (batch, channels, *shape)``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..spec import WeightSpaceSpec
from .linear import Features, UNFLinear

__all__ = ["UNF", "InvariantPool", "UNFInvariant", "DeepSetWeightLayer", "DeepSetWeightNet", "StatNN",
           "ChannelNorm"]


class ChannelNorm(nn.Module):
    """Per-entry normalisation over channels (LayerNorm on the channel axis at every position): equivariant."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, features: Mapping[str, torch.Tensor]) -> Features:
        out = {}
        for k, x in features.items():
            mean = x.mean(1, keepdim=True)
            var = x.var(1, keepdim=True, unbiased=False)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out[k] = (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return out


class UNF(nn.Module):
    """UNFLinear layers with a pointwise nonlinearity (and optional channel norm) between them.

    ``channels=(1, 16, 16, 1)`` gives three layers 1->16->16->1; no nonlinearity after the last.
    """

    def __init__(self, spec: WeightSpaceSpec, channels: Sequence[int], act: type[nn.Module] = nn.ReLU,
                 norm: bool = False, fixed: str = "relax", positional: bool = False):
        super().__init__()
        if len(channels) < 2:
            raise ValueError("channels needs at least (in, out)")
        self.layers = nn.ModuleList(
            UNFLinear(spec, a, b, fixed=fixed, positional=positional and i == 0)
            for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])))
        self.norms = nn.ModuleList(ChannelNorm(b) if norm else nn.Identity() for b in channels[1:-1])
        self.act = act()

    def forward(self, features: Mapping[str, torch.Tensor]) -> Features:
        x = dict(features)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = {k: self.act(v) for k, v in self.norms[i](x).items()}
        return x


class InvariantPool(nn.Module):
    """Pool each entry over its permuted axes (mean, sum or max); fixed axes stay as features. Output (batch, D)."""

    def __init__(self, spec: WeightSpaceSpec, mode: str = "mean"):
        super().__init__()
        if mode not in ("mean", "sum", "max"):
            raise ValueError(f"mode must be mean, sum or max, got {mode!r}")
        self.spec, self.mode = spec, mode

    def out_features(self, channels: int) -> int:
        total = 0
        for e in self.spec.entries:
            fixed = 1
            for g, n in zip(e.axes, e.shape):
                if g is None:
                    fixed *= n
            total += channels * fixed
        return total

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for e in self.spec.entries:
            x = features[e.name]
            dims = [2 + i for i, g in enumerate(e.axes) if g is not None]
            if dims:
                if self.mode == "mean":
                    x = x.mean(dims)
                elif self.mode == "sum":
                    x = x.sum(dims)
                else:
                    x = x.amax(dims)
            pooled.append(x.flatten(1))
        return torch.cat(pooled, dim=1)


class UNFInvariant(nn.Module):
    """Invariant model: UNF backbone -> InvariantPool -> MLP head (predicts properties of weights)."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, hidden: int = 16, layers: int = 2,
                 out_features: int = 1, head_hidden: int = 64, pool: str = "mean", fixed: str = "relax",
                 norm: bool = False):
        super().__init__()
        self.backbone = UNF(spec, [in_channels] + [hidden] * layers, fixed=fixed, norm=norm)
        self.pool = InvariantPool(spec, pool)
        width = self.pool.out_features(hidden)
        self.head = nn.Sequential(nn.Linear(width, head_hidden), nn.ReLU(), nn.Linear(head_hidden, out_features))

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.pool(self.backbone(features)))


class DeepSetWeightLayer(nn.Module):
    """Baseline: per-element linear map plus, per entry, the mean over the whole entry as context.

    Equivariant to any permutation of each entry's elements (a much larger group than the spec's), so it
    cannot see how entries connect; the UNF paper's "DeepSet" optimizer uses these.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int):
        super().__init__()
        self.spec = spec
        self.elem = nn.Linear(in_channels, out_channels)
        self.pool = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, features: Mapping[str, torch.Tensor]) -> Features:
        out = {}
        for k, x in features.items():
            flat = x.flatten(2)  # (b, c, n)
            y = torch.einsum("oc,bcn->bon", self.elem.weight, flat) + self.elem.bias[None, :, None]
            y = y + self.pool(flat.mean(2))[:, :, None]
            out[k] = y.view(x.shape[0], -1, *x.shape[2:])
        return out


class DeepSetWeightNet(nn.Module):
    """Stack of :class:`DeepSetWeightLayer` with ReLU between layers."""

    def __init__(self, spec: WeightSpaceSpec, channels: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(DeepSetWeightLayer(spec, a, b) for a, b in zip(channels[:-1], channels[1:]))

    def forward(self, features: Mapping[str, torch.Tensor]) -> Features:
        x = dict(features)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = {k: torch.relu(v) for k, v in x.items()}
        return x


class StatNN(nn.Module):
    """Baseline invariant model (Unterthiner et al. 2020): per-entry statistics -> MLP.

    Statistics per entry and channel: mean, variance and the 0/25/50/75/100% quantiles of all its elements.
    """

    QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, hidden: int = 64, out_features: int = 1):
        super().__init__()
        self.spec = spec
        width = len(spec.entries) * in_channels * (2 + len(self.QUANTILES))
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, out_features))

    def statistics(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stats = []
        for e in self.spec.entries:
            flat = features[e.name].flatten(2)
            q = torch.quantile(flat, torch.tensor(self.QUANTILES, dtype=flat.dtype, device=flat.device), dim=2)
            stats += [flat.mean(2), flat.var(2, unbiased=False), *q]
        return torch.cat(stats, dim=1)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.statistics(features))
