"""Warm start by imitation: fit a learned rule to a hand-designed *teacher* optimizer before meta-training it.

PES started from a random rule spends its CPU budget finding what a simple optimizer already does (the shipped
rules trained that way stayed close to SGD with momentum). A learned rule can represent more than a constant step
size: its features carry the step count, so it can follow a step-size *schedule*, which is where much of an
optimizer's edge over constant-rate Adam lies on a fixed budget. So before PES, the rule is regressed onto
:class:`ScheduledNormalizedMomentum`, a teacher that every family can represent with its own features:

    m <- momentum * m + grad          (the rule's feature momentum at that decay)
    W <- W - lr / (1 + t / tau) * m / rms_segment(m)

i.e. momentum normalised per segment (tensor or spec entry, as the features are) with an inverse-time decay.
Optionally the teacher anneals itself: each segment's step is scaled by the cosine between the gradient and a
slower momentum (``snr_decay``), which is high while successive gradients agree and falls as they turn to noise
around a minimum, so the effective step size adapts to the task and the tensor instead of following a schedule
tuned on one task. The rule can infer that cosine through its pooled (DeepSet) context.

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, vmap
from tqdm import tqdm

import optimizers as O
from optimizers.features import _EPS, MOMENTUM_DECAYS, Segments, segment_mean_square, segment_mul, segment_sum
from optimizers.rule import N_MOMENTA, RuleState, param_scale
from unf.nn import RoleUNFLinear

from .estimators import FlatProblem
from .tasks import Task

__all__ = ["ScheduledNormalizedMomentum", "Snapshots", "ImitationSource", "record_steps", "teacher_snapshots",
           "imitate"]


def _row(decay: float) -> int:
    """Row of the rule's momenta (base momentum first, then ``MOMENTUM_DECAYS``) kept at feature decay ``decay``."""
    return 1 + MOMENTUM_DECAYS.index(decay)


@dataclass(frozen=True)
class ScheduledNormalizedMomentum:
    """The teacher (module docstring): per-segment normalised momentum with step size ``lr / (1 + t / tau)``.

    Two optional refinements, both computed from what the rule itself sees (its features), so a rule can imitate
    them; off by default:

    - ``snr_decay`` (one of the rule's momentum decays, e.g. 0.99): each segment's step is scaled by
      ``max(0, cos(grad, m_snr)) ** snr_power``, the cosine between the gradient and the slower momentum over the
      segment. It is near 1 while gradients agree from step to step and falls towards 0 when they are noise around
      a minimum, so the step anneals itself on each task and tensor (as Adam's ``m / sqrt(v)`` does per element);
    - ``softness`` ``s``: the normalised direction ``d`` becomes the soft sign ``d (1 + s) / (|d| + s)``, moving
      every element by about the same amount (Lion-like, for tensors whose elements see gradients of very
      different sizes); ``s -> inf`` is the plain normalised momentum;
    - ``scale_floor`` ``f``: *relative* steps. Each segment's step is multiplied by the scale of its parameters,
      ``max(std(W), f)`` over the segment (:func:`optimizers.rule.param_scale`), so ``lr`` is a fraction of the
      weights' spread rather than an absolute amount: a model initialised at 0.02 (a GPT-2) gets ~8x smaller
      steps than one at 1/sqrt(fan_in), as tuned Adam's rates differ between such models. The floor moves
      tensors whose elements are all equal (zero biases, unit norm gains). A rule imitates it with the same
      ``LearnedRule(scale_floor=f)``.
    """

    lr: float = 0.03
    tau: float = 300.0
    momentum: float = 0.9
    snr_decay: float | None = None
    snr_power: float = 1.0
    softness: float | None = None
    scale_floor: float | None = None

    def __post_init__(self) -> None:
        for name in ("momentum", "snr_decay"):
            value = getattr(self, name)
            if value is not None and value not in MOMENTUM_DECAYS:
                raise ValueError(f"the teacher's {name} must be one of the rule's feature decays {MOMENTUM_DECAYS} "
                                 f"(the rule must see it), got {value}")
        if not (self.lr > 0 and self.tau > 0):
            raise ValueError(f"lr and tau must be positive, got lr={self.lr}, tau={self.tau}")
        if not self.snr_power > 0 or any(v is not None and not v > 0 for v in (self.softness, self.scale_floor)):
            raise ValueError(f"snr_power, softness and scale_floor must be positive, got snr_power={self.snr_power}, "
                             f"softness={self.softness}, scale_floor={self.scale_floor}")

    @property
    def momentum_row(self) -> int:
        """Row of the rule's momenta (base momentum first, then ``MOMENTUM_DECAYS``) that is the teacher's."""
        return _row(self.momentum)

    def decays(self, gamma0: float | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """(7, 1) decays of the rule's momenta as the teacher's runs keep them: ``gamma0`` (default: the teacher's
        momentum) for the base row, then the feature decays."""
        base = self.momentum if gamma0 is None else gamma0
        return torch.tensor((base, *MOMENTUM_DECAYS), device=device).unsqueeze(-1)

    def step_size(self, step: torch.Tensor) -> torch.Tensor:
        """Step size of the update taken at ``step`` (0-based, like the rule's step count): the RMS of the plain
        teacher's update (the SNR scaling only shrinks it; the imitation measures its error against this)."""
        return self.lr / (1 + (step + 1) / self.tau)

    def step_sizes(self, step: torch.Tensor, param: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Per-element step size ``(..., N)`` (or ``(..., 1)`` without relative steps): :meth:`step_size` times
        each segment's parameter scale."""
        size = self.step_size(step).unsqueeze(-1)
        if self.scale_floor is None:
            return size
        return segment_mul(size.expand_as(param), param_scale(param, segments, self.scale_floor), segments, dim=-1)

    def update(self, momenta: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, segments: Segments,
               param: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's change of the parameters given the rule's *updated* momenta ``(..., 7, N)`` (base row
        first), the gradient ``(..., N)`` and ``step`` ``(...)``; ``param`` ``(..., N)`` (before the step) is needed
        for relative steps (``scale_floor``)."""
        scale = None
        if self.scale_floor is not None:
            if param is None:
                raise ValueError("a teacher with relative steps (scale_floor) needs the parameters: pass param=")
            scale = param_scale(param, segments, self.scale_floor)  # (..., T)
        momentum = momenta[..., self.momentum_row, :]
        rms_inv = (segment_mean_square(momentum, segments, dim=-1) + _EPS).rsqrt()
        direction = segment_mul(momentum, rms_inv, segments, dim=-1)
        if self.softness is not None:
            direction = direction * (1 + self.softness) / (direction.abs() + self.softness)
        change = direction * -self.step_size(step).unsqueeze(-1)
        if self.snr_decay is not None:
            slow = momenta[..., _row(self.snr_decay), :]
            dot = segment_sum(grad * slow, segments, dim=-1)
            norms = segment_sum(grad * grad, segments, dim=-1) * segment_sum(slow * slow, segments, dim=-1)
            cosine = (dot * (norms + _EPS).rsqrt()).clamp_min(0) ** self.snr_power
            scale = cosine if scale is None else scale * cosine
        return change if scale is None else segment_mul(change, scale, segments, dim=-1)

    def describe(self) -> str:
        """The settings that differ from the defaults' (for run metadata)."""
        extra = "".join(f", {k}={getattr(self, k):g}" for k in ("snr_decay", "softness", "scale_floor")
                        if getattr(self, k) is not None)
        if self.snr_decay is not None and self.snr_power != 1:
            extra += f", snr_power={self.snr_power:g}"
        return f"ScheduledNormalizedMomentum(lr={self.lr:g}, tau={self.tau:g}{extra})"


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
    decays = teacher.decays(gamma0, task.device)
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
            w = w + teacher.update(momenta, g, step, problem.segments, param=w)
            bar.update()
    bar.close()
    w, g, m, s = (torch.stack(x) for x in zip(*out))
    return Snapshots(w, g, m, s)


def role_tables(rule: O.LearnedRule) -> list[str]:
    """Names of ``rule``'s parameters that are tables over role keys (one row per key): the coefficient and
    constant tables of its :class:`unf.nn.RoleUNFLinear` layers."""
    names = []
    for prefix, module in rule.named_modules():
        if isinstance(module, RoleUNFLinear):
            names += [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False) if n in ("coef", "bias_coef")]
    return names


@dataclass
class ImitationSource:
    """Snapshots of one more task for :func:`imitate`, with the rule that runs the fitted rule's parameters on that
    task's layout (:func:`meta_train.build.bind_rule`; the fitted rule itself for per-element families) and its
    :class:`FlatProblem`."""

    rule: O.LearnedRule
    problem: FlatProblem
    snapshots: Snapshots


def imitate(rule: O.LearnedRule, problem: FlatProblem, snapshots: Snapshots, teacher: ScheduledNormalizedMomentum,
            steps: int, generator: torch.Generator, batch: int = 16, lr: float = 1e-3, alpha: float = 1e-3,
            beta: float = 30.0, gamma0: float | None = None, progress: bool = True,
            more: Sequence[ImitationSource] = (), key_dropout: float = 0.0) -> list[float]:
    """Fit ``rule`` (in place) to ``teacher``'s updates on ``snapshots``; returns the loss of every step.

    The loss is ``mean(((rule's change - teacher's change) / teacher's step size) ** 2)`` over a batch of
    snapshots, minimised by Adam (``lr``, cosine-annealed over ``steps``). ``alpha`` and ``gamma0`` (default: the
    teacher's momentum; the snapshots' must be the same) are set and held fixed (module docstring); ``beta`` starts
    at ``beta``. ``problem`` gives the layout the rule reads (for
    a UNF rule, its spec's segments: :func:`meta_train.build.build_rule`). ``more``: snapshots of other tasks; the
    steps then take their batches from each source in turn (``rule``'s own first).

    ``key_dropout``: for a rule whose UNF read-out is shared by role key (:class:`unf.nn.RoleUNFLinear`), the
    probability that a key's coefficients are left out (read as zero) at a step, drawn per key and step. A model
    whose spec lacks some of the fitted keys gets zero for their terms (the transfer rule), so a rule fitted with
    every key present leans on terms it will not have there; with dropout, the rest of the rule learns to imitate
    the teacher without them too. 0 (default) draws nothing, so fits without it are unchanged.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if not 0.0 <= key_dropout < 1.0:
        raise ValueError(f"key_dropout must be in [0, 1), got {key_dropout}")
    tables = role_tables(rule) if key_dropout else []
    if key_dropout and not tables:
        raise ValueError("key_dropout needs a rule whose UNF read-out is shared by role key (family 'unf')")
    with torch.no_grad():
        rule.raw_alpha.fill_(alpha)
        rule.raw_gamma0.fill_(teacher.momentum if gamma0 is None else gamma0)
        rule.beta.fill_(beta)
    trained = {k: v for k, v in rule.named_parameters() if k not in ("raw_alpha", "raw_gamma0")}
    fixed = {k: v.detach() for k, v in rule.named_parameters() if k in ("raw_alpha", "raw_gamma0")}
    opt = torch.optim.Adam(trained.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    # the snapshots' momenta are from before the step: the teacher reads them updated
    decays = teacher.decays(gamma0, snapshots.w.device)

    def stepper(source: ImitationSource):
        def new_w(theta, w, g, m, s):
            return functional_call(source.rule, theta, (w, g, RuleState(m, s), source.problem.segments))[0]

        return vmap(new_w, in_dims=(None, 0, 0, 0, 0))

    sources = [(source, stepper(source)) for source in (ImitationSource(rule, problem, snapshots), *more)]
    losses = []
    for i in tqdm(range(steps), desc="imitation", disable=not progress, leave=False, mininterval=1.0):
        source, step_all = sources[i % len(sources)]
        snaps = source.snapshots
        idx = torch.randint(0, len(snaps), (min(batch, len(snaps)),), generator=generator)
        w, g, m, s = snaps.w[idx], snaps.grad[idx], snaps.momenta[idx], snaps.step[idx]
        theta = {**trained, **fixed}
        for name in tables:  # leave each role key out with probability key_dropout
            keep = (torch.rand(theta[name].shape[0], generator=generator) >= key_dropout).to(theta[name])
            theta[name] = theta[name] * keep.view(-1, *(1,) * (theta[name].dim() - 1))
        change = step_all(theta, w, g, m, s) - w
        segments = source.problem.segments
        target = teacher.update(decays * m + g.unsqueeze(1), g, s, segments, param=w)
        loss = ((change - target) / teacher.step_sizes(s, w, segments)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
