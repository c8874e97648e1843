"""Meta-gradient estimators for learned optimizers: truncated BPTT, antithetic ES and PES (Vicol et al. 2021).

All three share one pure inner loop, :func:`unroll`: ``K`` steps of the learned rule on a flat parameter vector,
with the meta-parameters ``theta`` (a dict of tensors, a subset of the rule's parameters is fine) substituted by
``torch.func.functional_call``. The meta-loss of a truncation is a reduction of its per-step inner training losses,
:func:`reduce_losses`: their mean (the default), the last one, or the mean of their logs.

- :func:`bptt` differentiates through the unroll (second order: gradients of inner gradients).
- :func:`es` perturbs ``theta`` antithetically with ``N(0, sigma^2)`` noise for every particle and weights the loss
  differences by the noise; particles run vectorised (one batched population, see below).
- :class:`PES` keeps, for every particle, its own + and - inner runs across truncations and the *sum* of all
  perturbations used since that run started; weighting by that sum makes the sum of truncation estimates unbiased
  for the whole unroll (reset it when an inner run restarts).

ES and PES can run a *slice* of a population: pass that slice's ``noise`` (drawn for the whole population with
:func:`draw_noise`) and the whole ``population`` size, and the estimates and losses of the slices sum to the whole
population's (the distributed loop all-reduces them, :mod:`meta_train.distributed`).

Both run the + and the - perturbations as one population of ``2 * particles``: batched tensors through the rule
when its family takes them (:func:`batches_populations`), else ``vmap`` over particles. On a CPU, populations
run about a third faster once :func:`keep_freed_memory` is applied; a process-wide setting, so the library never
applies it by itself: the command-line entry points (``unf ...``, ``python -m meta_train``) do.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, vmap

from optimizers.features import Segments
from optimizers.rule import LearnedRule, RuleState

__all__ = ["FlatProblem", "unroll", "bptt", "es", "PES", "META_LOSSES", "reduce_losses", "draw_noise",
           "keep_freed_memory", "batches_populations"]

Theta = dict[str, torch.Tensor]

#: the meta-loss reductions :func:`reduce_losses` knows
META_LOSSES = ("mean", "final", "log_mean")


def reduce_losses(losses: torch.Tensor, meta_loss: str = "mean") -> torch.Tensor:
    """The meta-loss of one truncation from its per-step inner losses ``(K,)`` (or ``(..., K)``: the last axis).

    ``"mean"``: the mean training loss over the truncation; ``"final"``: the loss at its last step; ``"log_mean"``:
    the mean of the log losses (the losses must be positive; it weighs late, small losses as much as early ones).
    """
    if meta_loss == "mean":
        return losses.mean(-1)
    if meta_loss == "final":
        return losses[..., -1]
    if meta_loss == "log_mean":
        return losses.log().mean(-1)
    raise ValueError(f"meta_loss must be one of {', '.join(META_LOSSES)}; got {meta_loss!r}")


@dataclass(frozen=True)
class FlatProblem:
    """An inner problem on a flat parameter vector: ``loss(w, batch)`` and the segments the rule pools over."""

    loss: Callable[[torch.Tensor, object], torch.Tensor]
    segments: Segments

    @classmethod
    def from_task(cls, task, example_params: Mapping[str, torch.Tensor]) -> FlatProblem:
        """Wrap a ``meta_train.tasks.Task``: flat vectors are its parameters concatenated in dict order."""
        names = list(example_params)
        shapes = [tuple(example_params[n].shape) for n in names]
        sizes = [int(example_params[n].numel()) for n in names]

        def loss(w: torch.Tensor, batch: object) -> torch.Tensor:
            parts = torch.split(w, sizes)
            return task.loss({n: p.view(s) for n, p, s in zip(names, parts, shapes)}, batch)

        return cls(loss, Segments.from_sizes(sizes))


def flatten_params(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unroll(rule: LearnedRule, theta: Theta, problem: FlatProblem, w: torch.Tensor, momenta: torch.Tensor,
           step: torch.Tensor, batches: list, *, batched: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``len(batches)`` inner steps; returns ``(w, momenta, step, losses)`` (losses before each update).

    ``batched``: run a population of P inner runs at once, ``w`` (P, N), ``momenta`` (P, 7, N), ``step`` (P,) and
    ``theta``'s tensors (P, ...) (or shared, unbatched), for a rule that takes batched inputs
    (:func:`batches_populations`); the rule runs batched and losses are (P, K). This is for ES and PES, which do
    not differentiate the unroll: the inner gradients are one backward pass of the population's summed (vmapped)
    losses, which gives every particle its own gradient with less overhead than a vmapped ``grad``, but no
    gradient with respect to ``theta``.
    """
    inner_grad = _population_grad(problem.loss) if batched else grad_and_value(problem.loss)
    losses = []
    for batch in batches:
        g, loss = inner_grad(w, batch)
        w, state, _ = functional_call(rule, theta, (w, g, RuleState(momenta, step), problem.segments))
        momenta, step = state.momenta, state.step
        losses.append(loss)
    return w, momenta, step, torch.stack(losses, -1)


def _population_grad(loss: Callable[[torch.Tensor, object], torch.Tensor]
                     ) -> Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]:
    """``(w, batch) -> (grads, losses)`` for a population ``w`` (P, N): the particles' losses do not interact, so the
    gradient of their sum holds each particle's gradient of its own loss."""
    batched_loss = vmap(loss, in_dims=(0, None))

    def grad_and_loss(w: torch.Tensor, batch: object) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            w = w.detach().requires_grad_()
            losses = batched_loss(w, batch)
            (g,) = torch.autograd.grad(losses.sum(), w)
        return g, losses.detach()

    return grad_and_loss


def batches_populations(rule: LearnedRule) -> bool:
    """Whether ES and PES run ``rule``'s population as batched tensors (``f`` has ``forward_factored``, which takes
    leading batch axes, :mod:`optimizers.families`) rather than by ``vmap`` over particles. Both compute the same;
    batching skips vmap's per-op overhead (5-10% of a PES step for a small DeepSet on CPU)."""
    return hasattr(rule.f, "forward_factored")


def _run_population(rule: LearnedRule, theta: Theta, problem: FlatProblem, w: torch.Tensor, momenta: torch.Tensor,
                    step: torch.Tensor, batches: list, meta_loss: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`unroll` for every particle of ``theta`` (P, ...) from its own ``w`` (P, N), ``momenta`` (P, 7, N),
    ``step`` (P,); returns the new states and the meta-losses (P,)."""
    if batches_populations(rule):
        w, momenta, step, losses = unroll(rule, theta, problem, w, momenta, step, batches, batched=True)
        return w, momenta, step, reduce_losses(losses, meta_loss)

    def run(th: Theta, w: torch.Tensor, m: torch.Tensor, s: torch.Tensor):
        w2, m2, s2, losses = unroll(rule, th, problem, w, m, s, batches)
        return w2, m2, s2, reduce_losses(losses, meta_loss)

    return vmap(run)(theta, w, momenta, step)


def bptt(rule: LearnedRule, theta: Theta, problem: FlatProblem, w: torch.Tensor, momenta: torch.Tensor,
         step: torch.Tensor, batches: list, meta_loss: str = "mean") -> tuple[Theta, torch.Tensor, tuple]:
    """Truncated backprop through ``len(batches)`` steps. Returns ``(grads, meta_loss, (w, momenta, step))``.

    ``meta_loss`` picks the truncation's objective (:func:`reduce_losses`)."""
    _check_meta_loss(meta_loss)

    def objective(th: Theta):
        w2, m2, s2, losses = unroll(rule, th, problem, w, momenta, step, batches)
        return reduce_losses(losses, meta_loss), (w2, m2, s2)

    grads, (loss, state) = grad_and_value(objective, has_aux=True)(theta)
    # parameters of the rule outside ``theta`` are constants here: return plain tensors
    return {k: v.detach() for k, v in grads.items()}, loss.detach(), tuple(t.detach() for t in state)


def _check_meta_loss(meta_loss: str) -> None:
    if meta_loss not in META_LOSSES:
        raise ValueError(f"meta_loss must be one of {', '.join(META_LOSSES)}; got {meta_loss!r}")


def draw_noise(theta: Theta, particles: int, sigma: float, generator: torch.Generator | None = None) -> Theta:
    """``N(0, sigma^2)`` perturbations ``{name: (particles, *shape)}`` of ``theta``, drawn only from ``generator``.

    The draw happens on the generator's device and is then moved to each tensor's, so a CPU generator gives the
    same random stream whatever device the meta-parameters live on."""
    device = generator.device if generator is not None else None
    return {k: (torch.randn((particles, *v.shape), generator=generator, dtype=v.dtype,
                            device=device if device is not None else v.device) * sigma).to(v.device)
            for k, v in theta.items()}


_noise = draw_noise  # the old private name


def _weighted(noise: Theta, diffs: torch.Tensor, sigma: float, population: int | None = None) -> Theta:
    """sum_i diffs_i * noise_i / (2 sigma^2 P): the antithetic estimator (P = ``population``, default all of diffs)."""
    scale = diffs.detach() / (2 * sigma**2 * (diffs.shape[0] if population is None else population))
    return {k: torch.einsum("p,p...->...", scale.to(v.dtype), v) for k, v in noise.items()}


def _slice_noise(noise: Theta | None, theta: Theta, particles: int, sigma: float,
                 generator: torch.Generator | None) -> Theta:
    if noise is None:
        return draw_noise(theta, particles, sigma, generator)
    if set(noise) != set(theta):
        raise ValueError(f"noise must have exactly theta's keys {sorted(theta)}; got {sorted(noise)}")
    sizes = {int(v.shape[0]) for v in noise.values()}
    if len(sizes) != 1:
        raise ValueError(f"every noise tensor needs the same number of particles (leading axis); got {sorted(sizes)}")
    for k, v in noise.items():
        if tuple(v.shape[1:]) != tuple(theta[k].shape):
            raise ValueError(f"noise[{k!r}] has shape {tuple(v.shape)}; expected (particles, "
                             f"{', '.join(map(str, theta[k].shape))})")
    return noise


def _antithetic(theta: Theta, eps: Theta) -> Theta:
    """``theta + eps`` for every particle, then ``theta - eps``: ``{name: (2n, *shape)}``.

    Both signs run as one population of ``2n``: half the batched calls (each carries a fixed per-op overhead) and
    twice the work per op. ``theta + (-1.0) * e`` is ``theta - e`` exactly, so nothing changes numerically."""
    return {k: torch.cat([theta[k] + eps[k], theta[k] - eps[k]]) for k in theta}


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for reuse; process-wide. Returns whether it applied.

    A population allocates batched temporaries of a few MB in every inner step (``2 * particles`` runs x 8 channels
    x N elements each). glibc's defaults hand such blocks back to the OS as soon as they are freed (an mmapped block
    is unmapped; free space at the top of the heap beyond about twice the largest block freed so far is trimmed),
    so every step faults the same memory in again: on ``mlp-digits`` with 16 particles, ~17 thousand page faults
    and a third of a PES step (92 vs 60 ms). With blocks up to ``mmap_threshold`` taken from the heap and up to
    ``trim_threshold`` bytes of free heap kept, that memory is reused. A Python loop over particles allocates
    blocks below glibc's defaults and is unaffected. A no-op (returns False) where the C library is not glibc.

    Process-wide, so the library never calls it on its own; the command-line entry points do, and a program that
    runs populations (``meta_train.meta_train``, ``meta_train.compare``) on a CPU can call it once at start.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt is absent or a no-op
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
                    and libc.mallopt(m_trim_threshold, trim_threshold) == 1)
    except (OSError, AttributeError):
        return False


def _mean_loss(losses: torch.Tensor, population: int | None) -> torch.Tensor:
    return losses.mean() if population is None else losses.sum() / population


def es(rule: LearnedRule, theta: Theta, problem: FlatProblem, w: torch.Tensor, momenta: torch.Tensor,
       step: torch.Tensor, batches: list, particles: int = 64, sigma: float = 0.01,
       generator: torch.Generator | None = None, *, noise: Theta | None = None, population: int | None = None,
       meta_loss: str = "mean") -> tuple[Theta, torch.Tensor]:
    """Antithetic ES gradient of the truncation's meta-loss from one shared inner state. Returns ``(grads, loss)``.

    Args:
        particles, sigma, generator: the population's size and noise scale, and where its noise is drawn from.
        noise: use these perturbations ``{name: (n, *shape)}`` instead of drawing ``particles`` of them (a slice of
            a population drawn with :func:`draw_noise`; ``particles`` is then ignored).
        population: divide the estimate and the loss by this rather than by the number of particles run, so that
            the results of a population's slices sum to the whole population's.
        meta_loss: the truncation's objective (:func:`reduce_losses`).
    """
    _check_meta_loss(meta_loss)
    eps = _slice_noise(noise, theta, particles, sigma, generator)

    th = _antithetic(theta, eps)  # the + particles, then the - ones
    n = next(iter(th.values())).shape[0]
    losses = _run_population(rule, th, problem, w.expand(n, *w.shape), momenta.expand(n, *momenta.shape),
                             step.expand(n, *step.shape), batches, meta_loss)[3]
    plus, minus = losses.split(n // 2)
    total = (plus + minus).detach()
    loss = total.mean() / 2 if population is None else total.sum() / (2 * population)
    return _weighted(eps, plus - minus, sigma, population), loss


class PES:
    """Persistent Evolution Strategies: unbiased over truncations of the same inner runs.

    Each particle keeps two inner runs (+ and -) and the sum ``xi`` of all perturbations used since they started.
    Call :meth:`step` once per truncation with that truncation's batches; call :meth:`reset` (all or some
    particles) when their inner runs restart from a fresh initialisation.
    """

    def __init__(self, rule: LearnedRule, problem: FlatProblem, particles: int = 16, sigma: float = 0.01,
                 meta_loss: str = "mean"):
        _check_meta_loss(meta_loss)
        self.rule, self.problem, self.particles, self.sigma = rule, problem, particles, sigma
        self.meta_loss = meta_loss
        self.w = self.momenta = self.step_count = None
        self.xi: Theta = {}

    def reset(self, w0: torch.Tensor, momenta0: torch.Tensor, theta: Theta,
              which: torch.Tensor | None = None) -> None:
        """(Re)start inner runs from ``w0`` for all particles, or those where ``which`` (P,) bool is True."""
        p = self.particles
        fresh_w = w0.expand(2, p, *w0.shape).clone()
        fresh_m = momenta0.expand(2, p, *momenta0.shape).clone()
        fresh_s = torch.zeros(2, p, dtype=momenta0.dtype, device=momenta0.device)
        fresh_xi = {k: torch.zeros((p, *v.shape), dtype=v.dtype, device=v.device) for k, v in theta.items()}
        if which is None or self.w is None:
            self.w, self.momenta, self.step_count, self.xi = fresh_w, fresh_m, fresh_s, fresh_xi
            return
        sel = which.view(1, p)
        self.w = torch.where(sel.view(1, p, *[1] * w0.dim()), fresh_w, self.w)
        self.momenta = torch.where(sel.view(1, p, *[1] * momenta0.dim()), fresh_m, self.momenta)
        self.step_count = torch.where(sel, fresh_s, self.step_count)
        self.xi = {k: torch.where(which.view(p, *[1] * v.dim()), fresh_xi[k], self.xi[k]) for k, v in theta.items()}

    def step(self, theta: Theta, batches: list, generator: torch.Generator | None = None, *,
             noise: Theta | None = None, population: int | None = None) -> tuple[Theta, torch.Tensor]:
        """One truncation: advance every particle's + and - runs; returns ``(grads, mean meta-loss)``.

        Args:
            theta: the current meta-parameters.
            batches: this truncation's inner batches, one per inner step.
            generator: where this step's noise is drawn from (``particles`` perturbations), unless ``noise`` is given.
            noise: this step's perturbations ``{name: (particles, *shape)}``, e.g. this process's slice of a larger
                population's noise drawn with :func:`draw_noise`.
            population: divide the estimate and the loss by this rather than ``particles`` (the whole population's
                size when this object runs a slice of it), so that the slices' results sum to the population's.
        """
        if self.w is None:
            raise RuntimeError("call reset(w0, momenta0, theta) before the first PES step")
        eps = _slice_noise(noise, theta, self.particles, self.sigma, generator)
        n = next(iter(eps.values())).shape[0] if eps else self.particles
        if n != self.particles:
            raise ValueError(f"noise has {n} particles but this PES runs {self.particles}")
        meta_loss = self.meta_loss

        # the + runs, then the - runs, as one population of 2n (see _antithetic)
        p = self.particles
        w, m, s, losses = _run_population(self.rule, _antithetic(theta, eps), self.problem, self.w.flatten(0, 1),
                                          self.momenta.flatten(0, 1), self.step_count.flatten(0, 1), batches,
                                          meta_loss)
        self.w = w.detach().unflatten(0, (2, p))
        self.momenta = m.detach().unflatten(0, (2, p))
        self.step_count = s.detach().unflatten(0, (2, p))
        self.xi = {k: self.xi[k] + eps[k] for k in theta}
        plus, minus = losses.split(p)
        diffs = plus - minus
        loss = _mean_loss((plus + minus) / 2, population).detach()
        return _weighted(self.xi, diffs, self.sigma, population), loss
