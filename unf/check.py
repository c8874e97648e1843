"""Numerical proof of a spec: permuting a model's weights by the spec must not change what it computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compiler.trace import as_input_tuple, eval_mode, flatten_outputs
from .spec import WeightSpaceSpec

__all__ = ["SpecCheckReport", "check_spec", "randomize_"]


@dataclass(frozen=True)
class SpecCheckReport:
    """Result of :func:`check_spec`: ``max_rel_error`` over all trials and outputs, and whether it is ``ok``."""

    max_rel_error: float
    rtol: float
    trials: int
    errors: tuple[float, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.rtol

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"spec check {verdict}: max relative output change {self.max_rel_error:.3g} over {self.trials} "
                f"random permutations (tolerance {self.rtol:g})")


def _rel_error(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        denom = max(float(x.norm()), 1e-30)
        worst = max(worst, float((x - y).norm()) / denom)
    return worst


@torch.no_grad()
def check_spec(model: nn.Module, spec: WeightSpaceSpec, example_inputs: Any, trials: int = 10,
               rtol: float | None = None, generator: torch.Generator | None = None) -> SpecCheckReport:
    """Permute ``model`` by ``trials`` random permutations of ``spec`` and compare outputs (eval mode).

    The relative error of a trial is ``||y_perm - y|| / ||y||`` (Frobenius), maximised over the model's output
    tensors. ``rtol`` defaults to 1e-5 for float64 models and 1e-4 otherwise. The model is left exactly as
    it was. Use random (not freshly initialised) weights: constant LayerNorm gains or zero BatchNorm
    statistics hide mistakes; :func:`randomize_` fills every floating tensor with random values.
    """
    inputs = as_input_tuple(example_inputs)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rtol is None:
        dtypes = {v.dtype for v in original.values() if v.is_floating_point()}
        rtol = 1e-5 if dtypes == {torch.float64} else 1e-4
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    errors = []
    with eval_mode(model):
        try:
            reference = flatten_outputs(model(*inputs))
            if not reference:
                raise ValueError(f"{type(model).__name__} returned no tensors; check_spec compares outputs")
            for _ in range(trials):
                perm = spec.random_permutation(generator)
                model.load_state_dict(spec.permute_state_dict(original, perm))
                errors.append(_rel_error(reference, flatten_outputs(model(*inputs))))
        finally:
            model.load_state_dict(original)
    return SpecCheckReport(max(errors, default=0.0), rtol, trials, tuple(errors))


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator | None = None, scale: float = 0.5) -> nn.Module:
    """Fill every floating parameter and buffer with random values (variances stay positive), in place.

    Makes symmetry checks sensitive: freshly initialised models have constant gains and statistics.
    """
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=generator, dtype=t.dtype) * scale
        if name.endswith("running_var"):
            noise = noise.abs() + 0.5
        t.data.copy_(noise)
    return model
