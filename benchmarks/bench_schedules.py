"""Benchmark: how much of a learned optimizer's edge a hand-set step-size schedule already gives.

    python benchmarks/bench_schedules.py [--task mlp-mnist1d] [--steps 2000 10000] [--seeds 5]
        [--adam LR:TAU ...] [--teacher LR:TAU ...] [--snr-decay 0.99] [--snr-power 1] [--softness 0.1]
        [--scale-floor 0.05]

Runs, with ``unf compare``'s protocol (same initialisations and batches per seed, final loss = mean minibatch loss
over the last 50 steps, mean +- standard error over seeds), two schedules that the compare table's constant-rate
baselines do not have:

- Adam (betas 0.9, 0.999) with an inverse-time decay ``lr / (1 + t / tau)``;
- the imitation teacher :class:`meta_train.imitate.ScheduledNormalizedMomentum` (momentum normalised per tensor,
  step size ``lr / (1 + t / tau)``), which the shipped imitation rules were fitted to; ``--snr-decay`` /
  ``--snr-power`` / ``--softness`` / ``--scale-floor`` turn on its self-annealing, soft-sign and relative-step
  refinements (for every teacher row).

Each ``LR:TAU`` pair is one run per seed; all runs of one kind step together as one population. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import platform

import torch

from meta_train.compare import _adam, _inits, _population, _stats, final_loss
from meta_train.estimators import FlatProblem
from meta_train.imitate import ScheduledNormalizedMomentum
from meta_train.tasks import get_task
from optimizers.features import segment_mul
from optimizers.rule import param_scale


def _pairs(values: list[str]) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in (v.split(":") for v in values)]


def adam_inverse_time(pairs: list[tuple[float, float]], seeds: int):
    lr = torch.tensor([p[0] for p in pairs]).repeat(seeds)
    tau = torch.tensor([p[1] for p in pairs]).repeat(seeds)[:, None]
    return _adam(lr, schedule=lambda t: 1 / (1 + t / tau))


def teacher(pairs: list[tuple[float, float]], seeds: int, problem: FlatProblem, precondition: float | None = None,
            **options):
    """The teacher at every ``(lr, tau)`` pair; ``options``: its other fields (``snr_decay``, ...), shared.

    ``precondition`` (a decay ``beta2``, e.g. 0.999): the teacher reads Adam-preconditioned gradients
    ``g / (sqrt(v_hat) + 1e-8)`` (``v`` Adam's bias-corrected second moment) instead of ``g``, everywhere (its
    momenta and its self-annealing cosine): a diagnostic of whether per-element second moments, which the rule's
    features lack, would help a teacher (and so a rule that imitates it)."""
    unit = ScheduledNormalizedMomentum(lr=1.0, tau=1e30, **options)  # its direction at step size 1
    lr = torch.tensor([p[0] for p in pairs]).repeat(seeds)[:, None]
    tau = torch.tensor([p[1] for p in pairs]).repeat(seeds)[:, None]
    decays = unit.decays()  # the rule's momenta, which the teacher reads

    def init(w):
        return torch.zeros(w.shape[0], len(decays), w.shape[1]), torch.zeros_like(w), 0

    def update(w, g, state):
        momenta, v, t = state
        if precondition is not None:
            v = precondition * v + (1 - precondition) * g * g
            g = g / ((v / (1 - precondition ** (t + 1))).sqrt() + 1e-8)
        momenta = decays * momenta + g[:, None]
        # the teacher's step size at step t (0-based): lr / (1 + (t + 1) / tau)
        change = unit.update(momenta, g, torch.zeros(g.shape[0]), problem.segments, param=w)
        change = change * (lr / (1 + (t + 1) / tau))
        return w + change, (momenta, v, t + 1)

    return init, update


def adam_relative(pairs: list[tuple[float, float]], seeds: int, problem: FlatProblem, scale_floor: float):
    """Adam (betas 0.9, 0.999, eps 1e-8) with *relative* steps: each segment's step is multiplied by its parameter
    scale ``max(std(W), scale_floor)`` (as the relative teacher's and rule's are), with step size
    ``lr / (1 + t / tau)`` per ``(lr, tau)`` pair. A diagnostic: Adam's own per-element rule, with a step size
    that is a fraction of the weights' spread, as a teacher a rule with second-moment features could imitate."""
    lr = torch.tensor([p[0] for p in pairs]).repeat(seeds)[:, None]
    tau = torch.tensor([p[1] for p in pairs]).repeat(seeds)[:, None]

    def init(w):
        return torch.zeros_like(w), torch.zeros_like(w), 0

    def update(w, g, state):
        m, v, t = state
        t += 1
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        direction = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        direction = segment_mul(direction, param_scale(w, problem.segments, scale_floor), problem.segments, dim=-1)
        return w - direction * (lr / (1 + t / tau)), (m, v, t)

    return init, update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="mlp-mnist1d")
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--adam", nargs="*", default=["0.03:100", "0.1:300", "0.3:300"], metavar="LR:TAU")
    parser.add_argument("--teacher", nargs="*", default=["0.02:300", "0.03:150", "0.03:300", "0.03:500", "0.05:150"],
                        metavar="LR:TAU")
    parser.add_argument("--snr-decay", type=float, default=None, help="the teacher's snr_decay (default: off)")
    parser.add_argument("--snr-power", type=float, default=1.0)
    parser.add_argument("--softness", type=float, default=None, help="the teacher's softness (default: off)")
    parser.add_argument("--scale-floor", type=float, default=None,
                        help="the teacher's scale_floor: relative steps (default: off)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    seeds = list(range(args.seeds))
    horizon = max(args.steps)
    _, _, example = _inits(task, seeds[:1])
    problem = FlatProblem.from_task(task, example)
    rows = []
    options = dict(snr_decay=args.snr_decay, snr_power=args.snr_power, softness=args.softness,
                   scale_floor=args.scale_floor)
    name = "normalised momentum" + "".join(f", {k} {v:g}" for k, v in options.items()
                                           if v is not None and (k != "snr_power" or args.snr_decay))
    for kind, pairs in (("Adam, lr / (1 + t / tau)", _pairs(args.adam)),
                        (f"teacher ({name}), lr / (1 + t / tau)", _pairs(args.teacher))):
        if not pairs:
            continue
        init, update = adam_inverse_time(pairs, len(seeds)) if kind.startswith("Adam") else \
            teacher(pairs, len(seeds), problem, **options)
        losses = _population(task, problem, seeds, len(pairs), horizon, init, update, kind, True)
        losses = losses.view(len(seeds), len(pairs), horizon)
        for j, (lr, tau) in enumerate(pairs):
            cells = []
            for t in sorted(args.steps):
                mean, se = _stats(final_loss(losses[:, j], t))
                cells.append(f"{mean:.3g} ± {se:.2g}")
            rows.append(f"| {kind} | {lr:g} | {tau:g} | " + " | ".join(cells) + " |")
    print(f"task {task.name}, seeds 0-{args.seeds - 1}, {platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s)\n")
    print("| schedule | lr | tau | " + " | ".join(f"T = {t}" for t in sorted(args.steps)) + " |")
    print("|---|---|---|" + "---|" * len(args.steps))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
