"""Batched weight-space features: ``entry name -> (batch, channels, *entry_shape)``, built from models or
state dicts through a spec, and mapped back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..spec import WeightSpaceSpec
from .linear import Features

__all__ = ["features_from_state_dicts", "features_from_models", "features_to_state_dicts", "random_features",
           "permute_features"]


def features_from_state_dicts(spec: WeightSpaceSpec, state_dicts: Sequence[Mapping[str, torch.Tensor]],
                              dtype: torch.dtype | None = None) -> Features:
    """Stack many models' weights: one channel, batch = number of state dicts."""
    if not state_dicts:
        raise ValueError("need at least one state dict")
    views = [spec.to_views(sd) for sd in state_dicts]
    out = {}
    for e in spec.entries:
        t = torch.stack([v[e.name].detach() for v in views])[:, None]
        out[e.name] = t.to(dtype) if dtype is not None else t.contiguous()
    return out


def features_from_models(spec: WeightSpaceSpec, models: Iterable[nn.Module], dtype: torch.dtype | None = None
                         ) -> Features:
    return features_from_state_dicts(spec, [m.state_dict() for m in models], dtype)


def features_to_state_dicts(spec: WeightSpaceSpec, features: Mapping[str, torch.Tensor],
                            like: Mapping[str, torch.Tensor], channel: int = 0) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`features_from_state_dicts` for one channel: a state dict per batch element."""
    batch = next(iter(features.values())).shape[0]
    return [spec.from_views({k: v[b, channel] for k, v in features.items()}, like=like) for b in range(batch)]


def random_features(spec: WeightSpaceSpec, batch: int, channels: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> Features:
    return {e.name: torch.randn(batch, channels, *e.shape, generator=generator, dtype=dtype) for e in spec.entries}


def permute_features(spec: WeightSpaceSpec, features: Mapping[str, torch.Tensor], perm: Mapping[str, torch.Tensor]
                     ) -> Features:
    """Apply a spec permutation to batched features (the two leading axes are kept)."""
    return spec.permute_views(features, dict(perm), batch_dims=2)
