"""The update rule of a learned optimizer as a pure ``init`` / ``update`` pair (optax style).

Rule (Harrison et al. 2022, as used by the UNF paper), per element::

    m^g  <- g * m^g + grad            for g in (gamma0, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
    W    <- W - lr * alpha * (m^gamma0 + beta * B * tanh(f(features) / B) [* S])

``alpha``, ``beta``, ``gamma0`` are meta-learned scalars (initial 0.1, 0.001, 0.9); ``lr`` is the torch.optim
param-group learning rate and multiplies ``alpha`` so LR schedulers work (``lr = 1`` by default). ``f`` is bounded
by ``B`` (smoothly, with tanh) so that one bad output cannot blow a run up. Elements whose gradient is NaN/Inf,
or whose update would be, are skipped: neither their momenta nor their value change.

Optional *relative* steps (``scale_floor``, off by default): the learned term is multiplied by ``S``, its
segment's parameter scale ``max(std(W), scale_floor)`` (:func:`param_scale`). ``f`` sees features normalised per
segment, so without ``S`` its term moves every model by the same absolute amount; with it, by a fraction of the
weights' spread, which carries over between models initialised at different scales (an MLP at 1/sqrt(fan_in), a
GPT-2 at 0.02).

:class:`LearnedRule` holds the meta-parameters (``f`` and the three scalars); :func:`init` and
:meth:`LearnedRule.update` are pure, so meta-training can differentiate through them with ``torch.func``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .features import (
    MOMENTUM_DECAYS,
    Segments,
    compute_features,
    segment_mean,
    segment_mean_square,
    segment_mul,
    step_encoding,
    tensor_features,
)

__all__ = ["LearnedRule", "RuleState", "init", "param_scale", "scale_from_moments", "N_MOMENTA"]

N_MOMENTA = 1 + len(MOMENTUM_DECAYS)  # base momentum (gamma0) first, then the feature momenta


@dataclass
class RuleState:
    """Optimizer state of one flat parameter vector: momenta (7, N) fp32, step (0-d fp32) (or of a population:
    (P, 7, N) and (P,))."""

    momenta: torch.Tensor
    step: torch.Tensor


def init(n: int, device: torch.device | str = "cpu") -> RuleState:
    return RuleState(torch.zeros(N_MOMENTA, n, device=device), torch.zeros((), device=device))


def param_scale(param: torch.Tensor, segments: Segments, floor: float) -> torch.Tensor:
    """Per-segment scale ``max(std(W), floor)`` of flat parameters ``(..., N)`` -> ``(..., T)``: the standard
    deviation over each segment's elements."""
    return scale_from_moments(segment_mean(param, segments, dim=-1), segment_mean_square(param, segments, dim=-1),
                              floor)


def scale_from_moments(mean: torch.Tensor, mean_square: torch.Tensor, floor: float) -> torch.Tensor:
    """:func:`param_scale` from each segment's mean and mean square (``sqrt(E[W^2] - E[W]^2)``: the CPU paths have
    both from the feature statistics)."""
    return (mean_square - mean * mean).clamp_min(0).sqrt().clamp_min(floor)


def _isfinite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(x)`` as ``|x| < inf`` (False for NaN too): two vectorised kernels, where ``isfinite``
    runs four and is several times slower on CPU."""
    return x.abs() < math.inf


class LearnedRule(nn.Module):
    """Meta-parameters of a learned optimizer: the function ``f`` plus ``alpha``, ``beta``, ``gamma0``.

    The scalars are stored as they are (so ``beta = 0`` reproduces momentum SGD bit for bit) and clamped where
    used: ``alpha = |raw_alpha|`` (not a clamp: a clamp at 0 has zero gradient, so a meta-training run whose step
    size once crossed 0 would stay frozen there), ``0 <= gamma0 <= 0.9999``. ``scale_floor`` (a float > 0, or
    None: off) turns relative steps on (module docstring); it is part of the rule, saved with its weights.
    """

    def __init__(self, f: nn.Module, alpha: float = 0.1, beta: float = 0.001, gamma0: float = 0.9,
                 bound: float = 10.0, scale_floor: float | None = None):
        super().__init__()
        if scale_floor is not None and not scale_floor > 0:
            raise ValueError(f"scale_floor must be positive (or None: absolute steps), got {scale_floor}")
        self.scale_floor = None if scale_floor is None else float(scale_floor)
        self.f = f
        self.raw_alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))
        self.raw_gamma0 = nn.Parameter(torch.tensor(float(gamma0)))
        self.bound = float(bound)
        self._fixed_decays = torch.tensor(MOMENTUM_DECAYS, dtype=torch.float32)

    @property
    def alpha(self) -> torch.Tensor:
        return self.raw_alpha.abs()

    @property
    def gamma0(self) -> torch.Tensor:
        return self.raw_gamma0.clamp(0.0, 0.9999)

    def decays(self) -> torch.Tensor:
        fixed = self._fixed_decays
        if fixed.device != self.raw_gamma0.device or fixed.dtype != self.raw_gamma0.dtype:
            fixed = self._fixed_decays = fixed.to(self.raw_gamma0.device, self.raw_gamma0.dtype)
        gamma0 = self.gamma0  # (...): a population of rules has one per rule
        return torch.cat([gamma0.unsqueeze(-1), fixed.expand(*gamma0.shape, fixed.shape[0])], -1)  # (..., 7)

    def with_f(self, f: nn.Module) -> LearnedRule:
        """A rule with these scalars (copied) and another ``f`` (e.g. the same weights on another spec)."""
        new = LearnedRule(f, bound=self.bound, scale_floor=self.scale_floor).to(self.raw_alpha.device)
        with torch.no_grad():
            for name in ("raw_alpha", "beta", "raw_gamma0"):
                getattr(new, name).copy_(getattr(self, name))
        return new

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, RuleState, torch.Tensor]:
        """Same as :meth:`update` (so ``torch.func.functional_call(rule, meta_params, args)`` runs a step)."""
        return self.update(*args, **kwargs)

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: RuleState, segments: Segments,
               lr: float | torch.Tensor = 1.0, active: torch.Tensor | None = None,
               factored: Callable[[torch.Tensor, torch.Tensor, Segments], torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, RuleState, torch.Tensor]:
        """One step on flat fp32 vectors. Returns ``(new_param, new_state, skipped)``.

        ``skipped`` (N,) bool marks elements left untouched because their gradient was not finite; ``active``
        (N,) bool, if given, marks the elements that have a gradient at all (the others are left untouched too).

        If ``f`` has ``forward_factored`` (:mod:`optimizers.families`), the step also runs on a population: leading
        axes on ``param``, ``grad`` (P, N), the state (P, 7, N) and (P,), and on the meta-parameters substituted by
        ``torch.func.functional_call`` (P, ...); any of them may be unbatched, shared by all.
        """
        finite = _isfinite(grad)
        ok = finite if active is None else finite & active
        g = torch.where(ok, grad, 0.0)
        # as SGD: multiply, then add (in place into the fresh product: autograd keeps mul's inputs, not its output).
        # Skipped elements keep their momenta: lerp with weight 0 or 1 selects, like ``where`` but as a vectorised
        # kernel (3x faster on CPU); the values are exact while updated - momenta is finite (|momenta| < 1.7e38)
        updated = (self.decays().unsqueeze(-1) * state.momenta).add_(g.unsqueeze(-2))
        momenta = torch.lerp(state.momenta, updated, ok.unsqueeze(-2).to(updated.dtype))
        feature_momenta = momenta[..., 1:, :]
        if factored is None:
            factored = getattr(self.f, "forward_factored", None)
        if factored is not None:  # the step channels are the same for every element: not materialised (N, 11)
            out = factored(tensor_features(param, g, feature_momenta, segments), step_encoding(state.step), segments)
        else:
            out = self.f(compute_features(param, g, feature_momenta, state.step, segments), segments)
        learned = torch.tanh(out / self.bound)
        if self.scale_floor is not None:
            learned = segment_mul(learned, param_scale(param, segments, self.scale_floor), segments, dim=-1)
        # momenta[0] + beta * (B tanh(f / B)), with the two scalars multiplied first (as the fast path does)
        direction = torch.addcmul(momenta[..., 0, :], learned, (self.bound * self.beta).unsqueeze(-1))
        # one fused multiply-add, as torch.optim.SGD does: beta = 0 reproduces it bit for bit
        new_param = torch.addcmul(param, direction, (-(lr * self.alpha)).unsqueeze(-1))
        new_param = torch.where(ok & _isfinite(new_param), new_param, param)
        skipped = ~finite if active is None else active & ~finite
        return new_param, RuleState(momenta, state.step + 1), skipped
