"""Warm start by imitation: fit a learned rule to a hand-designed *teacher* optimizer before meta-training it.

PES started from a random rule spends its CPU budget finding what a simple optimizer already does (the shipped
rules trained that way stayed close to SGD with momentum). A learned rule can represent more than a constant step
size: its features carry the step count, so it can follow a step-size *schedule*, which is where much of an
optimizer's edge over constant-rate Adam lies on a fixed budget. So before PES, the rule is regressed onto
:class:`ScheduledNormalizedMomentum`, a teacher that every family can represent with its own features:

    m <- momentum * m + grad          (the rule's feature momentum at that decay)
    W <- W - lr / (1 + t / tau) * m / rms_segment(m)

i.e. momentum normalised per segment (tensor or spec entry, as the features are) with an inverse-time decay.

Protocol (:func:`imitate`): the teacher trains the task from a few initialisations; snapshots of the rule's
inputs (parameters, gradient, the rule's seven momenta, step) are kept at log-spaced and regular steps; then the
rule's own :meth:`~optimizers.LearnedRule.update` on those snapshots is fitted to the teacher's update by Adam on
the squared error relative to the teacher's step size (so late, small steps count as much as early ones). The
rule's step size ``alpha`` and momentum ``gamma0`` are held fixed meanwhile (``gamma0`` at the teacher's momentum, so
the snapshots' momenta are the rule's own state; ``alpha`` small, so the bounded learned term carries the update
and ``beta`` sets its scale). Everything is drawn from one generator: the same seed gives the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, vmap
from tqdm import tqdm

import optimizers as O
from optimizers.features import _EPS, MOMENTUM_DECAYS, Segments, segment_mean_square, segment_mul
from optimizers.rule import N_MOMENTA, RuleState

from .estimators import FlatProblem
from .tasks import Task

__all__ = ["ScheduledNormalizedMomentum", "Snapshots", "record_steps", "teacher_snapshots", "imitate"]


@dataclass(frozen=True)
class ScheduledNormalizedMomentum:
    """The teacher (module docstring): per-segment normalised momentum with step size ``lr / (1 + t / tau)``."""

    lr: float = 0.03
    tau: float = 300.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.momentum not in MOMENTUM_DECAYS:
            raise ValueError(f"the teacher's momentum must be one of the rule's feature decays {MOMENTUM_DECAYS} "
                             f"(the rule must see it), got {self.momentum}")
        if not (self.lr > 0 and self.tau > 0):
            raise ValueError(f"lr and tau must be positive, got lr={self.lr}, tau={self.tau}")

    @property
    def momentum_row(self) -> int:
        """Row of the rule's momenta (base momentum first, then ``MOMENTUM_DECAYS``) that is the teacher's."""
        return 1 + MOMENTUM_DECAYS.index(self.momentum)

    def step_size(self, step: torch.Tensor) -> torch.Tensor:
        """Step size of the update taken at ``step`` (0-based, like the rule's step count)."""
        return self.lr / (1 + (step + 1) / self.tau)

    def update(self, momentum: torch.Tensor, step: torch.Tensor, segments: Segments) -> torch.Tensor:
        """The teacher's change of the parameters given its updated momentum ``(..., N)`` and ``step`` ``(...)``."""
        rms_inv = (segment_mean_square(momentum, segments, dim=-1) + _EPS).rsqrt()
        return segment_mul(momentum, rms_inv, segments, dim=-1) * -self.step_size(step).unsqueeze(-1)


@dataclass
class Snapshots:
    """The rule's inputs along teacher runs: ``w``, ``grad`` (S, N), ``momenta`` (S, 7, N) before the step,
    ``step`` (S,)."""

    w: torch.Tensor
    grad: torch.Tensor
    momenta: torch.Tensor
    step: torch.Tensor

    def __len__(self) -> int:
        return self.w.shape[0]


def record_steps(horizon: int, count: int = 160) -> list[int]:
    """Steps to snapshot in a ``horizon``-step run: ``count`` log-spaced ones (early steps change fastest) plus
    every ``horizon // 40``-th."""
    logs = torch.logspace(0, math.log10(max(horizon, 1)), count).floor().long() - 1
    return sorted(set(logs.clamp(0, horizon - 1).tolist()) | set(range(0, horizon, max(1, horizon // 40))))


@torch.no_grad()
def teacher_snapshots(task: Task, problem: FlatProblem, teacher: ScheduledNormalizedMomentum, runs: int,
                      horizon: int, generator: torch.Generator, progress: bool = True,
                      gamma0: float | None = None, max_bytes: int = 2**31) -> Snapshots:
    """Train ``task`` with the teacher ``runs`` times (``horizon`` steps from fresh initialisations) and snapshot
    the rule's inputs at :func:`record_steps`. Momenta are kept at the rule's decays, with ``gamma0`` (default: the
    teacher's momentum) for the rule's base momentum; :func:`imitate` must hold the rule at the same ``gamma0``.
    Snapshots stay in memory: more than ``max_bytes`` of them is refused up front (a ValueError that says how
    much)."""
    gamma0 = teacher.momentum if gamma0 is None else gamma0
    decays = torch.tensor((gamma0, *MOMENTUM_DECAYS), device=task.device).unsqueeze(-1)
    keep = set(record_steps(horizon))
    size = runs * len(keep) * (2 + N_MOMENTA) * task.num_params * 4  # fp32 w, grad and momenta per snapshot
    if size > max_bytes:
        raise ValueError(f"{runs} teacher runs of {horizon} steps on {task.name} ({task.num_params:,} parameters) "
                         f"would keep {size / 2**30:.1f} GiB of snapshots (limit {max_bytes / 2**30:.1f} GiB): "
                         f"use fewer runs (imitate_runs) or a shorter horizon (imitate_horizon), or raise max_bytes")
    grad_fn = grad_and_value(problem.loss)
    out: list[tuple] = []
    bar = tqdm(total=runs * horizon, desc=f"{task.name} teacher runs", disable=not progress, leave=False,
               mininterval=1.0)
    for _ in range(runs):
        params = task.init(generator)
        w = torch.cat([p.reshape(-1) for p in params.values()])
        momenta = torch.zeros(N_MOMENTA, w.numel(), device=w.device)
        for t in range(horizon):
            g, _ = grad_fn(w, task.sample_batch(generator))
            step = torch.tensor(float(t), device=w.device)
            if t in keep:
                out.append((w.clone(), g.clone(), momenta.clone(), step))
            momenta = decays * momenta + g
            w = w + teacher.update(momenta[teacher.momentum_row], step, problem.segments)
            bar.update()
    bar.close()
    w, g, m, s = (torch.stack(x) for x in zip(*out))
    return Snapshots(w, g, m, s)


def imitate(rule: O.LearnedRule, problem: FlatProblem, snapshots: Snapshots, teacher: ScheduledNormalizedMomentum,
            steps: int, generator: torch.Generator, batch: int = 16, lr: float = 1e-3, alpha: float = 1e-3,
            beta: float = 30.0, gamma0: float | None = None, progress: bool = True) -> list[float]:
    """Fit ``rule`` (in place) to ``teacher``'s updates on ``snapshots``; returns the loss of every step.

    The loss is ``mean(((rule's change - teacher's change) / teacher's step size) ** 2)`` over a batch of
    snapshots, minimised by Adam (``lr``, cosine-annealed over ``steps``). ``alpha`` and ``gamma0`` (default: the
    teacher's momentum; the snapshots' must be the same) are set and held fixed (module docstring); ``beta`` starts
    at ``beta``. ``problem`` gives the layout the rule reads (for
    a UNF rule, its spec's segments: :func:`meta_train.build.build_rule`).
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    with torch.no_grad():
        rule.raw_alpha.fill_(alpha)
        rule.raw_gamma0.fill_(teacher.momentum if gamma0 is None else gamma0)
        rule.beta.fill_(beta)
    trained = {k: v for k, v in rule.named_parameters() if k not in ("raw_alpha", "raw_gamma0")}
    fixed = {k: v.detach() for k, v in rule.named_parameters() if k in ("raw_alpha", "raw_gamma0")}
    opt = torch.optim.Adam(trained.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    segments = problem.segments

    def new_w(theta, w, g, m, s):
        return functional_call(rule, theta, (w, g, RuleState(m, s), segments))[0]

    step_all = vmap(new_w, in_dims=(None, 0, 0, 0, 0))
    losses = []
    for _ in tqdm(range(steps), desc="imitation", disable=not progress, leave=False, mininterval=1.0):
        idx = torch.randint(0, len(snapshots), (min(batch, len(snapshots)),), generator=generator)
        w, g, m, s = snapshots.w[idx], snapshots.grad[idx], snapshots.momenta[idx], snapshots.step[idx]
        change = step_all({**trained, **fixed}, w, g, m, s) - w
        target = teacher.update(teacher.momentum * m[:, teacher.momentum_row] + g, s, segments)
        loss = ((change - target) / teacher.step_size(s).unsqueeze(-1)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
