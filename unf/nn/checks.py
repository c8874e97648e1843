"""Equivariance checks for users' own weight-space networks (the same checks our tests use)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..spec import WeightSpaceSpec

__all__ = ["assert_equivariant", "assert_invariant"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def _permute(spec: WeightSpaceSpec, features: Mapping[str, torch.Tensor], perm: dict) -> dict:
    return spec.permute_views(dict(features), perm, batch_dims=2)


@torch.no_grad()
def assert_equivariant(fn: Callable, spec: WeightSpaceSpec, features: Mapping[str, torch.Tensor], trials: int = 10,
                       rtol: float = 1e-10, generator: torch.Generator | None = None) -> float:
    """Check ``fn(permute(x)) == permute(fn(x))`` for ``trials`` random spec permutations; return the worst error.

    ``features``: ``entry -> (batch, channels, *shape)``; ``fn`` maps such features to such features.
    """
    generator = generator or torch.Generator().manual_seed(0)
    y = dict(fn(features))
    worst = 0.0
    for _ in range(trials):
        perm = spec.random_permutation(generator)
        lhs = dict(fn(_permute(spec, features, perm)))
        rhs = _permute(spec, y, perm)
        worst = max(worst, max(_rel(lhs[k], rhs[k]) for k in rhs))
    if worst > rtol:
        raise AssertionError(f"not equivariant: relative error {worst:.3g} > {rtol:g}")
    return worst


@torch.no_grad()
def assert_invariant(fn: Callable, spec: WeightSpaceSpec, features: Mapping[str, torch.Tensor], trials: int = 10,
                     rtol: float = 1e-10, generator: torch.Generator | None = None) -> float:
    """Check ``fn(permute(x)) == fn(x)`` for ``trials`` random spec permutations; return the worst error."""
    generator = generator or torch.Generator().manual_seed(0)
    y = fn(features)
    worst = max(_rel(fn(_permute(spec, features, spec.random_permutation(generator))), y) for _ in range(trials))
    if worst > rtol:
        raise AssertionError(f"not invariant: relative error {worst:.3g} > {rtol:g}")
    return worst
