"""Use a :class:`~optimizers.LearnedOptimizer` inside ``higher.innerloop_ctx`` (optional; ``pip install higher``).

``higher`` is unmaintained, so the core library uses ``torch.func``; this module only teaches ``higher`` how to
step our optimizer differentiably. Importing it registers the differentiable version::

    import higher, optimizers.integrations.higher  # noqa: F401  (registers LearnedOptimizer)
    with higher.innerloop_ctx(model, learned_opt) as (fmodel, diffopt):
        diffopt.step(loss)          # gradients flow to learned_opt.rule's meta-parameters
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import higher
    from higher.optim import DifferentiableOptimizer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("optimizers.integrations.higher needs the `higher` package: pip install "
                      "'universal-neural-functionals[higher]'") from e

from ..optimizer import LearnedOptimizer
from ..rule import N_MOMENTA, RuleState

__all__ = ["DifferentiableLearnedOptimizer"]


class DifferentiableLearnedOptimizer(DifferentiableOptimizer):
    """A differentiable copy of a LearnedOptimizer: each step is :meth:`LearnedRule.update` on the tape."""

    def __init__(self, other: LearnedOptimizer, *args: Any, **kwargs: Any):
        self.rule = other.rule
        self._segments_of = other._segments
        super().__init__(other, *args, **kwargs)

    def _update(self, grouped_grads: list[list[torch.Tensor]], **kwargs: Any) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            params = group["params"]
            if all(g is None for g in grads):
                continue
            states = [self.state[group_idx][i] for i in range(len(params))]
            momenta = torch.cat([s["momenta"].reshape(N_MOMENTA, -1) if "momenta" in s
                                 else torch.zeros(N_MOMENTA, p.numel(), device=p.device)
                                 for s, p in zip(states, params)], dim=1)
            step = states[0].get("step", torch.zeros((), device=params[0].device))
            flat_p = torch.cat([p.reshape(-1) for p in params])
            flat_g = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                for g, p in zip(grads, params)])
            active = None
            if any(g is None for g in grads):
                active = torch.cat([torch.full((p.numel(),), g is not None, device=p.device)
                                    for g, p in zip(grads, params)])
            new_p, new_state, _ = self.rule.update(flat_p, flat_g, RuleState(momenta, step),
                                                   self._segments_of(list(params), flat_p.device),
                                                   lr=group["lr"], active=active)
            offset = 0
            for i, p in enumerate(params):
                n = p.numel()
                group["params"][i] = new_p[offset : offset + n].view_as(p)
                self.state[group_idx][i] = {"momenta": new_state.momenta[:, offset : offset + n].view(N_MOMENTA,
                                                                                                    *p.shape),
                                            "step": new_state.step}
                offset += n


higher.register_optim(LearnedOptimizer, DifferentiableLearnedOptimizer)
