"""Diagnostic: how closely a fitted UNF rule follows its imitation teacher on a task's teacher runs, per spec entry.

    python benchmarks/imitation_error.py RULE --task TASK [--task TASK ...] [--horizon 2000] [--seed 1]
        [--teacher 0.1:1000] [--snr-decay 0.99] [--snr-power 1] [--softness 0.1] [--scale-floor 0.05] [--entries 12]

The teacher (:class:`meta_train.imitate.ScheduledNormalizedMomentum`, defaults: ``unf-mnist1d-rel``'s) trains
the task once from a fresh initialisation; on its snapshots (:func:`meta_train.imitate.record_steps`) the rule's
update is compared with the teacher's, as :func:`meta_train.imitate.imitate` measures it during the fit: the mean
squared difference relative to the teacher's step size. The rule runs with the fit's ``alpha`` and ``gamma0``
(1e-3 and the teacher's momentum), as the saved imitation-only rules have them. Printed per task: the error (all
snapshots, first and second half of the run), the same with the UNF read-out's role tables zeroed (what the rule
does where a model's spec lacks every key), the read-out's coverage of the task's terms, and the entries that carry
most of the error, with the ratio of the rule's to the teacher's update norm and their cosine.

This reads a task's teacher runs, held-out tasks included: use it to understand a rule, not to choose one.
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call, vmap

import optimizers as O
from meta_train.build import bind_rule
from meta_train.estimators import FlatProblem
from meta_train.imitate import ScheduledNormalizedMomentum, Snapshots, role_tables, teacher_snapshots
from meta_train.tasks import get_task
from optimizers.rule import RuleState


def teacher_run(rule: O.LearnedRule, task_name: str, teacher: ScheduledNormalizedMomentum, horizon: int,
                seed: int) -> tuple[O.LearnedRule, FlatProblem, Snapshots]:
    """``rule`` bound to the task's spec, the task's flat problem, and one teacher run's snapshots."""
    task = get_task(task_name)
    gen = torch.Generator().manual_seed(seed)
    bound, problem = bind_rule(rule, "unf", task, task.init(gen))
    return bound, problem, teacher_snapshots(task, problem, teacher, 1, horizon, gen, progress=False)


def entry_errors(rule: O.LearnedRule, task_name: str, teacher: ScheduledNormalizedMomentum, horizon: int,
                 seed: int, zero_tables: bool = False, chunk: int = 16,
                 run: tuple[O.LearnedRule, FlatProblem, Snapshots] | None = None) -> dict[str, torch.Tensor | float]:
    """Per-entry sums over the snapshots of the squared relative error, of the rule's and the teacher's squared
    relative updates and of their product, and the mean error over the first and second half of the run. ``run``:
    :func:`teacher_run`'s result for these arguments, to reuse one teacher run for several measurements."""
    bound, problem, snaps = run if run is not None else teacher_run(rule, task_name, teacher, horizon, seed)
    theta = {k: v.detach() for k, v in rule.named_parameters()}
    theta["raw_alpha"] = torch.tensor(1e-3)
    theta["raw_gamma0"] = torch.tensor(teacher.momentum)
    if zero_tables:
        theta.update({k: torch.zeros_like(theta[k]) for k in role_tables(rule)})
    seg = problem.segments
    step_all = vmap(lambda th, w, g, m, s: functional_call(bound, th, (w, g, RuleState(m, s), seg))[0],
                    in_dims=(None, 0, 0, 0, 0))
    decays = teacher.decays(None)
    sums = {k: torch.zeros(int(seg.counts.numel()), dtype=torch.float64) for k in ("err", "rule", "teacher", "dot")}
    per_snapshot = []
    with torch.no_grad():
        for i in range(0, len(snaps), chunk):
            w, g, m, s = (x[i : i + chunk] for x in (snaps.w, snaps.grad, snaps.momenta, snaps.step))
            size = teacher.step_sizes(s, w, seg)
            ours = (step_all(theta, w, g, m, s) - w) / size
            theirs = teacher.update(decays * m + g.unsqueeze(1), g, s, seg, param=w) / size
            err = (ours - theirs).pow(2)
            per_snapshot.append(err.mean(1))
            for key, value in (("err", err), ("rule", ours.pow(2)), ("teacher", theirs.pow(2)),
                               ("dot", ours * theirs)):
                sums[key].index_add_(0, seg.ids, value.sum(0).double())
    e = torch.cat(per_snapshot)
    half = len(e) // 2
    return {**sums, "mean": float(e.mean()), "first": float(e[:half].mean()), "second": float(e[half:].mean()),
            "snapshots": len(e), "counts": seg.counts.double(), "entries": [x.name for x in bound.f.spec.entries],
            "shapes": [tuple(x.shape) for x in bound.f.spec.entries], "coverage": bound.f.head.coverage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rule", help="a shipped name or a .safetensors path of a UNF rule")
    parser.add_argument("--task", action="append", required=True)
    parser.add_argument("--horizon", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--teacher", default="0.1:1000", metavar="LR:TAU")
    parser.add_argument("--snr-decay", type=float, default=0.99)
    parser.add_argument("--snr-power", type=float, default=1.0)
    parser.add_argument("--softness", type=float, default=0.1)
    parser.add_argument("--scale-floor", type=float, default=0.05)
    parser.add_argument("--entries", type=int, default=12, help="entries listed per task")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = O.weights_info(args.rule)["path"]
    rule = O.load_rule(path)
    if not role_tables(rule):
        parser.error(f"{args.rule} is not a UNF rule with a role-tied read-out")
    lr, tau = (float(x) for x in args.teacher.split(":"))
    teacher = ScheduledNormalizedMomentum(lr=lr, tau=tau, snr_decay=args.snr_decay or None,
                                          snr_power=args.snr_power, softness=args.softness or None,
                                          scale_floor=args.scale_floor or None)
    print(f"rule {args.rule}; teacher {teacher.describe()}; one teacher run of {args.horizon} steps per task, "
          f"seed {args.seed}")
    for name in args.task:
        run = teacher_run(rule, name, teacher, args.horizon, args.seed)  # one teacher run for both measurements
        r = entry_errors(rule, name, teacher, args.horizon, args.seed, run=run)
        z = entry_errors(rule, name, teacher, args.horizon, args.seed, zero_tables=True, run=run)
        print(f"\n{name}: coverage {r['coverage']:.2f}, {r['snapshots']} snapshots; error {r['mean']:.5f} "
              f"(first half {r['first']:.5f}, second {r['second']:.5f}); role tables zeroed: {z['mean']:.5f}")
        share = r["err"] / r["err"].sum()
        print(f"  {'entry':45s} {'shape':16s} {'share':>6s} {'error':>8s} {'|rule|/|teacher|':>17s} {'cos':>6s}")
        for k in share.argsort(descending=True)[: args.entries].tolist():
            per_elem = float(r["err"][k] / (r["counts"][k] * r["snapshots"]))
            norm = float(r["rule"][k].sqrt() / r["teacher"][k].sqrt().clamp_min(1e-30))
            cos = float(r["dot"][k] / (r["rule"][k].sqrt() * r["teacher"][k].sqrt()).clamp_min(1e-30))
            print(f"  {r['entries'][k]:45s} {str(r['shapes'][k]):16s} {float(share[k]):6.3f} {per_elem:8.4f} "
                  f"{norm:17.3g} {cos:6.3f}")


if __name__ == "__main__":
    main()
