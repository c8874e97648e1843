"""Select an imitation teacher's settings on meta-training tasks only (never on the held-out tasks).

    python benchmarks/select_teacher.py [--seeds 5] [--steps 2000 10000] [--tasks TASK ...]
        [--candidates ... | --relative] [--precondition BETA2 | --adam-relative FLOOR] [--cache DIR]

The selection tasks are the meta-training task ``mlp-mnist1d`` and three members of the ``mlp-mnist1d-relu`` family
(ReLU MLPs of width <= 64 on mnist1d, which the held-out tasks - width 128, tanh, depth 3, digits, the LM - are
not): width 64 / batch 64, 16-16 / batch 256, 32-64 / batch 128. On each, Adam is tuned over ``unf compare``'s
7-point grid per horizon, and every candidate teacher (:class:`meta_train.imitate.ScheduledNormalizedMomentum`
settings ``lr:tau:snr_decay:snr_power:softness``, optionally ``:scale_floor`` for relative steps; 0 for off) runs
with the same protocol (same initialisations and batches per seed; final loss = mean minibatch loss over the last 50
steps, averaged over seeds). A candidate's score is the geometric mean, over tasks and horizons, of its loss over
tuned Adam's; the lowest score wins. Prints every ratio, the scores, and the winner.

Two diagnostics run other teachers with the same protocol (neither can be imitated by the rule's current features,
which have no per-element second moments): ``--precondition BETA2`` feeds every candidate Adam-preconditioned
gradients (:func:`bench_schedules.teacher`); ``--adam-relative FLOOR`` replaces the teacher by Adam with relative
steps, candidates ``lr:tau`` (:func:`bench_schedules.adam_relative`). ``--cache DIR`` keeps and reuses tuned Adam's
loss curves (as ``unf compare --cache``; the same files).
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
from bench_schedules import adam_relative, teacher

from meta_train.compare import LR_GRIDS, _inits, _population, cached_baseline, final_loss
from meta_train.estimators import FlatProblem
from meta_train.tasks import get_task

#: the candidates evaluated for the shipped ``unf-mnist1d-snr`` weights (every one that was tried)
CANDIDATES = (
    # without self-annealing (the shipped unf-mnist1d-imitation teacher first), and with soft signs
    "0.03:300:0:1:0", "0.03:300:0:1:0.1",
    *(f"{lr}:{tau}:0.99:1:0.1" for lr in (0.01, 0.03, 0.1) for tau in (300, 1000, 3000, 1e9)),
    "0.3:300:0.99:1:0.1", "0.3:1000:0.99:1:0.1", "0.1:300:0.99:0.5:0.1", "0.1:1000:0.99:0.5:0.1",
    "0.1:1000:0.99:2:0.1", "0.1:1000:0.99:1:1",
    # self-annealing, plain normalised direction
    *(f"{lr}:{tau}:0.99:1:0" for lr in (0.03, 0.05, 0.1) for tau in (1000, 3000, 1e9)),
    "0.05:1000:0.99:0.5:0", "0.05:1000:0.99:2:0", "0.05:1000:0.999:1:0", "0.03:1000:0.999:1:0",
    "0.1:1000:0.999:1:0", "0.05:300:0.99:1:0", "0.02:1000:0.99:1:0", "0.02:3000:0.99:1:0",
)

#: relative-step candidates (``scale_floor``), with the absolute teacher of ``unf-mnist1d-snr`` for reference: the
#: grid run for the shipped ``unf-mnist1d-rel`` weights (``--relative``)
RELATIVE_CANDIDATES = ("0.03:1000:0.99:1:0", *(f"{lr}:{tau}:0.99:1:{soft}:{floor}" for soft in (0, 0.1)
                                              for floor in (0.02, 0.05) for lr in (0.05, 0.1, 0.15)
                                              for tau in (1000, 3000)))

#: the meta-training task and three members of the mlp-mnist1d-relu family (registered in meta_train.tasks)
SELECTION_TASKS = ("mlp-mnist1d", "mlp-mnist1d-w64-b64", "mlp-mnist1d-16x16-b256", "mlp-mnist1d-32x64-b128")


def _options(spec: str) -> tuple[tuple[float, float], dict]:
    """``lr:tau:snr_decay:snr_power:softness[:scale_floor]`` (0 for off) -> ((lr, tau), the other fields)."""
    lr, tau, snr, power, soft, *floor = (float(x) for x in spec.split(":"))
    options = dict(snr_decay=snr or None, snr_power=power, softness=soft or None)
    if floor and floor[0]:
        options["scale_floor"] = floor[0]
    return (lr, tau), options


def ratios(task, candidates: list[str], seeds: list[int], steps: list[int], precondition: float | None = None,
           adam_relative_floor: float | None = None, cache: str | None = None) -> dict[str, list[float]]:
    """Every candidate's final loss over tuned Adam's, per horizon (module docstring for the two diagnostics)."""
    adam = cached_baseline(task, "adam", LR_GRIDS["adam"], seeds, max(steps), progress=False, cache_dir=cache)
    best = [min(float(final_loss(adam[:, j], t).mean()) for j in range(adam.shape[1])) for t in steps]
    _, _, example = _inits(task, seeds[:1])
    problem = FlatProblem.from_task(task, example)
    populations = []  # (candidates, init, update): each population steps together
    if adam_relative_floor is not None:  # candidates are lr:tau pairs, one population
        pairs = [tuple(float(x) for x in spec.split(":")) for spec in candidates]
        populations.append((candidates, *adam_relative(pairs, len(seeds), problem, adam_relative_floor)))
    else:
        groups: dict[tuple, list[str]] = {}  # candidates sharing the non-(lr, tau) settings run as one population
        for spec in candidates:
            groups.setdefault(tuple(sorted(_options(spec)[1].items(), key=str)), []).append(spec)
        for key, specs in groups.items():
            populations.append((specs, *teacher([_options(s)[0] for s in specs], len(seeds), problem,
                                                precondition=precondition, **dict(key))))
    out = {}
    for specs, init, update in populations:
        losses = _population(task, problem, seeds, len(specs), max(steps), init, update, "teacher", False)
        losses = losses.view(len(seeds), len(specs), -1)
        for j, spec in enumerate(specs):
            out[spec] = [float(final_loss(losses[:, j], t).mean()) / b for t, b in zip(steps, best)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--candidates", nargs="*", default=None, metavar="LR:TAU:SNR:POWER:SOFT[:FLOOR]",
                        help="default: CANDIDATES (or RELATIVE_CANDIDATES with --relative)")
    parser.add_argument("--relative", action="store_true", help="the relative-step grid (RELATIVE_CANDIDATES)")
    parser.add_argument("--precondition", type=float, default=None, metavar="BETA2",
                        help="diagnostic: candidates read Adam-preconditioned gradients (module docstring)")
    parser.add_argument("--adam-relative", type=float, default=None, metavar="FLOOR",
                        help="diagnostic: Adam with relative steps (scale floor FLOOR); candidates are LR:TAU")
    parser.add_argument("--cache", default=None, help="directory to keep and reuse tuned Adam's loss curves")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", nargs="+", default=list(SELECTION_TASKS),
                        help="registered training tasks to select on (default: the four selection tasks)")
    args = parser.parse_args()
    if args.adam_relative is not None:
        if args.precondition is not None or args.relative:
            parser.error("--adam-relative replaces the teacher: it takes neither --precondition nor --relative")
        bad = [c for c in args.candidates or [] if len(c.split(":")) != 2]
        if args.candidates is None or bad:
            parser.error(f"--adam-relative needs --candidates LR:TAU ... (got {bad or 'none'})")
    if args.candidates is None:
        args.candidates = list(RELATIVE_CANDIDATES if args.relative else CANDIDATES)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    print(f"seeds 0-{args.seeds - 1}, horizons {args.steps}, {platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s)\n")
    table: dict[str, list[float]] = {c: [] for c in args.candidates}
    names = []
    for task in map(get_task, args.tasks):
        names.append(task.name)
        for spec, r in ratios(task, args.candidates, seeds, args.steps, args.precondition, args.adam_relative,
                              args.cache).items():
            table[spec] += r
        print(f"done: {task.name}", flush=True)
    cols = [f"{n} T={t}" for n in names for t in args.steps]
    print("\n| teacher lr:tau:snr_decay:snr_power:softness[:scale_floor] | " + " | ".join(cols) + " | score |")
    print("|---|" + "---|" * (len(cols) + 1))
    scores = {c: math.exp(sum(math.log(x) for x in r) / len(r)) for c, r in table.items()}
    for spec in sorted(scores, key=scores.get):
        print(f"| {spec} | " + " | ".join(f"{x:.3g}" for x in table[spec]) + f" | {scores[spec]:.3g} |")
    print(f"\nselected: {min(scores, key=scores.get)} (geometric mean of loss / tuned Adam's: "
          f"{min(scores.values()):.3g})")


if __name__ == "__main__":
    main()
