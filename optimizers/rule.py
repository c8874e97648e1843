"""The update rule of a learned optimizer as a pure ``init`` / ``update`` pair (optax style).

Rule (Harrison et al. 2022, as used by the UNF paper), per element::

    m^g  <- g * m^g + grad            for g in (gamma0, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
    W    <- W - lr * alpha * (m^gamma0 + beta * B * tanh(f(features) / B))

``alpha``, ``beta``, ``gamma0`` are meta-learned scalars (initial 0.1, 0.001, 0.9); ``lr`` is the torch.optim
param-group learning rate and multiplies ``alpha`` so LR schedulers work (``lr = 1`` by default). ``f`` is bounded
by ``B`` (smoothly, with tanh) so that one bad output cannot blow a run up. Elements whose gradient is NaN/Inf,
or whose update would be, are skipped: neither their momenta nor their value change.

:class:`LearnedRule` holds the meta-parameters (``f`` and the three scalars); :func:`init` and
:meth:`LearnedRule.update` are pure, so meta-training can differentiate through them with ``torch.func``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .features import MOMENTUM_DECAYS, Segments, compute_features

__all__ = ["LearnedRule", "RuleState", "init", "N_MOMENTA"]

N_MOMENTA = 1 + len(MOMENTUM_DECAYS)  # base momentum (gamma0) first, then the feature momenta


@dataclass
class RuleState:
    """Optimizer state of one flat parameter vector: momenta (7, N) fp32, step (0-d fp32)."""

    momenta: torch.Tensor
    step: torch.Tensor


def init(n: int, device: torch.device | str = "cpu") -> RuleState:
    return RuleState(torch.zeros(N_MOMENTA, n, device=device), torch.zeros((), device=device))


class LearnedRule(nn.Module):
    """Meta-parameters of a learned optimizer: the function ``f`` plus ``alpha``, ``beta``, ``gamma0``.

    The scalars are stored as they are (so ``beta = 0`` reproduces momentum SGD bit for bit) and clamped where
    used: ``alpha = |raw_alpha|`` (not a clamp: a clamp at 0 has zero gradient, so a meta-training run whose step
    size once crossed 0 would stay frozen there), ``0 <= gamma0 <= 0.9999``.
    """

    def __init__(self, f: nn.Module, alpha: float = 0.1, beta: float = 0.001, gamma0: float = 0.9,
                 bound: float = 10.0):
        super().__init__()
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
        return torch.cat([self.gamma0.reshape(1), fixed])

    def with_f(self, f: nn.Module) -> LearnedRule:
        """A rule with these scalars (copied) and another ``f`` (e.g. the same weights on another spec)."""
        new = LearnedRule(f, bound=self.bound).to(self.raw_alpha.device)
        with torch.no_grad():
            for name in ("raw_alpha", "beta", "raw_gamma0"):
                getattr(new, name).copy_(getattr(self, name))
        return new

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, RuleState, torch.Tensor]:
        """Same as :meth:`update` (so ``torch.func.functional_call(rule, meta_params, args)`` runs a step)."""
        return self.update(*args, **kwargs)

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: RuleState, segments: Segments,
               lr: float | torch.Tensor = 1.0, active: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, RuleState, torch.Tensor]:
        """One step on flat fp32 vectors. Returns ``(new_param, new_state, skipped)``.

        ``skipped`` (N,) bool marks elements left untouched because their gradient was not finite; ``active``
        (N,) bool, if given, marks the elements that have a gradient at all (the others are left untouched too).
        """
        finite = torch.isfinite(grad)
        ok = finite if active is None else finite & active
        g = torch.where(ok, grad, torch.zeros_like(grad))
        momenta = torch.where(ok, self.decays()[:, None] * state.momenta + g, state.momenta)
        features = compute_features(param, g, momenta[1:], state.step, segments)
        learned = self.bound * torch.tanh(self.f(features, segments) / self.bound)
        direction = momenta[0] + self.beta * learned
        # one fused multiply-add, as torch.optim.SGD does: beta = 0 reproduces it bit for bit
        new_param = torch.addcmul(param, direction, -(lr * self.alpha))
        new_param = torch.where(ok & torch.isfinite(new_param), new_param, param)
        skipped = ~finite if active is None else active & ~finite
        return new_param, RuleState(momenta, state.step + 1), skipped
