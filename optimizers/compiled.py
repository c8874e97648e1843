"""The whole-buffer rule step compiled with ``torch.compile`` (``LearnedOptimizer(..., compile=True)``).

The eager step (:meth:`LearnedRule.update`) writes every intermediate to memory: for a 1M-parameter model each
(32, N) activation is 128 MB, and the DeepSet and UNF layers run hundreds of kernels. Inductor fuses the
element-wise work and the reductions into a few dozen generated kernels (Triton on a GPU, C++ on a CPU). On a GPU
it is the fastest path (with :mod:`optimizers.graphs` replaying it); on a CPU the built-in small and chunked
kernels (:mod:`optimizers.small`, :mod:`optimizers.fast`) are faster, so ``compile=True`` there is for rules
they do not cover.

Compiling takes time once per optimizer group (seconds for an MLP, ~40 s on a CPU for the UNF rule of a
1M-parameter CNN); the results equal the eager step's to float rounding (generated kernels may order sums
differently). If compilation fails (no C++ compiler or Triton, an unsupported op), the optimizer warns and steps
without compiling.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Callable

import torch

from .features import Segments
from .rule import LearnedRule, RuleState

__all__ = ["reference_step", "StepFn"]

#: ``(param, grad, lr) -> (new_param, new_momenta, new_step, skipped)`` for one group whose state is bound in
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def summary(err: BaseException) -> str:
    """``Type: first line of the message``, for a warning about a fallback."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def fallback_after_failure(primary: Callable, fallback: Callable, message: Callable[..., str],
                           stacklevel: int) -> Callable:
    """``primary``, unless its first call raises: then a warning (``message(err, *args)``) and ``fallback`` for
    that call and every later one. For a pure ``primary`` whose first call compiles (a failed one changed
    nothing), so a step is never lost to a compiler that does not work here."""
    chosen: list[Callable] = []

    def call(*args):
        if chosen:
            return chosen[0](*args)
        try:
            out = primary(*args)
        except Exception as err:  # no compiler, an unsupported op, a GPU the kernels do not build for, ...
            warnings.warn(message(err, *args), RuntimeWarning, stacklevel=stacklevel)
            chosen.append(fallback)
            return fallback(*args)
        chosen.append(primary)
        return out

    return call


def reference_step(rule: LearnedRule, momenta: torch.Tensor, step: torch.Tensor, segments: Segments,
                   compile: bool = False, factored: Callable | None = None) -> StepFn:
    """:meth:`LearnedRule.update` on a group's state, every gradient present, ``lr`` a 0-d tensor; compiled with
    ``torch.compile`` (static shapes) if ``compile``; ``f`` computed by ``factored`` if given (the fused kernels,
    :func:`optimizers.fused.fused_forward`)."""
    if compile:
        segments = dataclasses.replace(segments, gather_broadcasts=True)  # (see Segments)

    def update(param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new_param, new, skipped = rule.update(param, grad, RuleState(momenta, step), segments, lr=lr,
                                              factored=factored)
        return new_param, new.momenta, new.step, skipped

    if not compile:
        return update
    # one eager call first, on scratch inputs: the rule and the segments fill lazy caches (device copies of
    # constants and index maps) on first use; filled while tracing, each would fail a guard and recompile
    n = momenta.shape[-1]
    with torch.no_grad():
        update(momenta.new_zeros(n), momenta.new_zeros(n), torch.ones((), device=momenta.device))
    # Dynamo keeps compiled variants per code object, 8 by default; every group of every optimizer binds other
    # state, so each gets a copy of the code and its own cache (not one shared cache that runs out)
    code = update.__code__.replace()
    fresh = types.FunctionType(code, update.__globals__, update.__name__, update.__defaults__, update.__closure__)
    compiled = torch.compile(fresh, dynamic=False)
    # the first call compiles; on failure the eager step, never a failed step
    return fallback_after_failure(compiled, update, lambda err, *_: f"torch.compile of the learned optimizer's "
                                  f"step failed ({summary(err)}); stepping without compiling", stacklevel=4)
