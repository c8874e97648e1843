"""Compare learned optimizers with learning-rate-tuned Adam and SGD with momentum, several seeds, one table.

    unf compare --task mlp-digits --optimizer unf-mlp-digits --steps 2000 10000 --seeds 5 --out runs/compare

Protocol (what the numbers in BENCHMARKS.md mean):

- Every optimizer trains the task from the same initialisations on the same minibatch sequence per seed
  (seed ``s`` draws its init and its batches from ``torch.Generator().manual_seed(s)``).
- Baselines run every learning rate of a 7-point log grid (half-decade steps) for every seed; for each horizon
  ``T`` the learning rate with the lowest mean final loss over the seeds is chosen *on those same seeds* (this
  favours the baselines, never us). Learned optimizers run once per seed with their shipped step size (``lr=1``).
- "Final training loss at T" is the mean minibatch training loss over steps ``T - window + 1 .. T`` (window 50):
  smooth, no extra evaluation passes. A run whose loss turns NaN/Inf counts as ``inf``.
- Runs are *populations*: all (seed, learning rate) runs of one optimizer step together as one batched tensor
  program (``torch.func.vmap`` over flat parameter vectors), which is what makes a 7 x 5 grid of 10,000-step runs
  affordable on a laptop CPU. The functional Adam / SGDM here are tested against ``torch.optim``; the learned
  rule is :meth:`optimizers.LearnedRule.update`, which :class:`optimizers.LearnedOptimizer` runs too (on a CPU
  through its faster kernels, equal to float rounding: ``tests/test_small_path.py``, ``test_fast_path_*``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, vmap
from tqdm import tqdm

import optimizers as O
from optimizers.rule import RuleState

from .build import task_spec
from .estimators import FlatProblem
from .tasks import Task, get_task

__all__ = ["LR_GRIDS", "CompareResult", "compare", "run_baseline", "cached_baseline", "run_learned", "main"]

#: 7-point log grids (half-decade steps) the baselines are tuned over.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "sgdm": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
}
WINDOW = 50


# ---------------------------------------------------------------------------------------------- populations
def _inits(task: Task, seeds: Sequence[int]) -> tuple[list[torch.Generator], torch.Tensor, dict]:
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    params = [task.init(g) for g in gens]
    flat = torch.stack([torch.cat([p.reshape(-1) for p in ps.values()]) for ps in params])
    return gens, flat, params[0]


def _batches(task: Task, gens: list[torch.Generator], which: torch.Tensor) -> Any:
    per_seed = [task.sample_batch(g) for g in gens]
    return tuple(torch.stack([b[k] for b in per_seed])[which] for k in range(len(per_seed[0])))


def _population(task: Task, problem: FlatProblem, seeds: Sequence[int], runs_per_seed: int, steps: int,
                init_state: Callable[[torch.Tensor], Any], update: Callable[..., tuple[torch.Tensor, Any]],
                desc: str, progress: bool) -> torch.Tensor:
    """Train ``len(seeds) * runs_per_seed`` runs in lockstep; returns losses ``(runs, steps)`` (run = seed-major)."""
    gens, w0, _ = _inits(task, seeds)
    which = torch.arange(len(seeds), device=w0.device).repeat_interleave(runs_per_seed)
    w = w0[which].clone()
    state = init_state(w)
    grad_fn = vmap(grad_and_value(problem.loss))
    losses = torch.empty(w.shape[0], steps, device=w.device)  # on the run's device: no sync per step
    for t in tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0):
        g, loss = grad_fn(w, _batches(task, gens, which))
        losses[:, t] = loss
        w, state = update(w, g, state)
    return losses.cpu()


def _adam(lrs: torch.Tensor, betas=(0.9, 0.999), eps=1e-8, schedule: Callable[[int], Any] | None = None):
    """Functional Adam over a population (one rate per run); ``schedule(t)`` (1-based step), if given, multiplies
    the rates: a float or a (runs, 1) tensor."""
    def init(w):
        return (torch.zeros_like(w), torch.zeros_like(w), 0)

    def update(w, g, state):
        m, v, t = state
        t += 1
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        rate = lrs[:, None] if schedule is None else lrs[:, None] * schedule(t)
        step = rate / (1 - betas[0] ** t)
        denom = (v / (1 - betas[1] ** t)).sqrt() + eps
        return w - step * m / denom, (m, v, t)

    return init, update


def _sgdm(lrs: torch.Tensor, momentum=0.9):
    def init(w):
        return torch.zeros_like(w)

    def update(w, g, buf):
        buf = momentum * buf + g
        return w - lrs[:, None] * buf, buf

    return init, update


def run_baseline(task: Task, name: str, lrs: Sequence[float], seeds: Sequence[int], steps: int,
                 progress: bool = True) -> torch.Tensor:
    """Losses ``(len(seeds), len(lrs), steps)`` of ``"adam"`` / ``"sgdm"`` (torch.optim defaults, momentum 0.9)."""
    _, _, example = _inits(task, seeds[:1])
    problem = FlatProblem.from_task(task, example)
    lr_t = torch.tensor(list(lrs), dtype=torch.float32, device=task.device).repeat(len(seeds))
    init, update = {"adam": _adam, "sgdm": _sgdm}[name](lr_t)
    losses = _population(task, problem, seeds, len(lrs), steps, init, update, f"{task.name} {name}", progress)
    return losses.view(len(seeds), len(lrs), steps)


def run_learned(task: Task, rule: O.LearnedRule, seeds: Sequence[int], steps: int, desc: str = "learned",
                progress: bool = True, lr: float = 1.0) -> torch.Tensor:
    """Losses ``(len(seeds), steps)`` of a learned rule (any family; a UNF rule is transferred to the task's spec),
    run with the optimizer's ``lr`` multiplier (1: the learned step size as it is)."""
    _, _, example = _inits(task, seeds[:1])
    problem = FlatProblem.from_task(task, example)
    if isinstance(rule.f, O.UNFFamily):  # read the flat vector as this task's spec entries
        spec = task_spec(task)
        f = copy.deepcopy(rule.f) if rule.f.spec == spec else rule.f.transfer(spec)
        problem = dataclasses.replace(problem, segments=f.bind_layout(list(example),
                                                                      [p.shape for p in example.values()]))
        rule = rule.with_f(f)
    else:
        rule = copy.deepcopy(rule)  # moved to the task's device below; the caller's rule stays where it is
    rule = rule.to(task.device)
    theta = {k: v.detach() for k, v in rule.named_parameters()}
    segments = problem.segments.to(task.device)

    def one(w, g, m, s):
        new_w, st, _ = functional_call(rule, theta, (w, g, RuleState(m, s), segments, lr))
        return new_w, st.momenta, st.step

    batched = vmap(one)

    def init(w):
        return (torch.zeros(w.shape[0], O.rule.N_MOMENTA, w.shape[1], device=w.device),
                torch.zeros(w.shape[0], device=w.device))

    def update(w, g, state):
        new_w, m, s = batched(w, g, *state)
        return new_w, (m, s)

    with torch.no_grad():
        return _population(task, problem, seeds, 1, steps, init, update, f"{task.name} {desc}", progress)


def final_loss(losses: torch.Tensor, t: int, window: int = WINDOW) -> torch.Tensor:
    """Mean loss over steps ``t - window + 1 .. t`` (1-based) along the last axis; NaN/Inf -> inf."""
    seg = losses[..., max(0, t - window):t]
    out = seg.mean(-1)
    return torch.where(torch.isfinite(out), out, torch.full_like(out, math.inf))


# ---------------------------------------------------------------------------------------------- the comparison
@dataclass
class CompareResult:
    """Per optimizer: the loss curves of its chosen run per horizon and the table rows."""

    task: str
    steps: tuple[int, ...]
    seeds: tuple[int, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)  # optimizer, T, lr, mean, se, per_seed
    curves: dict[str, list[float]] = field(default_factory=dict)  # optimizer -> mean loss per step (best lr @ max T)
    grid: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # baseline -> T -> mean final loss per lr

    def table(self) -> str:
        lines = [f"task `{self.task}`, seeds {list(self.seeds)}: final training loss (mean ± se)", "",
                 "| optimizer | " + " | ".join(f"T={t}" for t in self.steps) + " |",
                 "|---|" + "---|" * len(self.steps)]
        names = list(dict.fromkeys(r["optimizer"] for r in self.rows))
        for n in names:
            cells = []
            for t in self.steps:
                r = next(r for r in self.rows if r["optimizer"] == n and r["T"] == t)
                lr = f" (lr {r['lr']:g})" if r["lr"] is not None else ""
                cells.append(f"{r['mean']:.3g} ± {r['se']:.2g}{lr}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"task": self.task, "steps": self.steps, "seeds": self.seeds, "rows": self.rows,
                           "grid": self.grid, "curves": self.curves})


def _stats(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), se


def compare(task: str | Task, learned: Mapping[str, O.LearnedRule | str | os.PathLike] | None = None,
            steps: Sequence[int] = (2000, 10000), seeds: Sequence[int] = (0, 1, 2, 3, 4),
            baselines: Sequence[str] = ("adam", "sgdm"), grids: Mapping[str, Sequence[float]] | None = None,
            progress: bool = True, cache_dir: str | os.PathLike | None = None,
            device: str | torch.device = "cpu", learned_lr: float = 1.0) -> CompareResult:
    """Train every optimizer for ``max(steps)`` steps on every seed and tabulate the final loss at each ``T``.

    ``cache_dir``: keep the baselines' loss curves there (keyed by task, grid, seeds and horizon) and reuse them,
    so comparing a new learned optimizer does not rerun the grids. ``device``: where a task given by name runs
    (inits and batches are drawn on the CPU from the same generators, so every device trains the same runs).
    ``learned_lr``: the learned optimizers' ``lr`` multiplier (1, the default, is the protocol's; another value is
    for trying a rule on a task far from its own, and is not tuned).
    """
    device = torch.device(device)
    if isinstance(task, str):
        task = get_task(task) if device.type == "cpu" else get_task(task, device=device)
    steps = tuple(sorted(int(t) for t in steps))
    if steps[0] < WINDOW:
        raise ValueError(f"horizons must be at least the averaging window ({WINDOW} steps), got {steps}")
    grids = {**LR_GRIDS, **(grids or {})}
    result = CompareResult(task.name, steps, tuple(int(s) for s in seeds))
    horizon = steps[-1]
    for name in baselines:
        if name not in grids:
            raise ValueError(f"unknown baseline {name!r}; choose from {sorted(LR_GRIDS)}")
        lrs = list(grids[name])
        losses = cached_baseline(task, name, lrs, seeds, horizon, progress, cache_dir)  # (S, L, T)
        result.grid[name] = {}
        for t in steps:
            finals = final_loss(losses, t)  # (S, L)
            means = finals.mean(0)
            best = int(torch.argmin(means))
            result.grid[name][str(t)] = [float(x) for x in means]
            mean, se = _stats(finals[:, best])
            result.rows.append({"optimizer": name, "T": t, "lr": lrs[best], "mean": mean, "se": se,
                                "per_seed": [float(x) for x in finals[:, best]]})
            if t == horizon:
                result.curves[name] = [float(x) for x in losses[:, best].mean(0)]
    for name, rule in (learned or {}).items():
        rule = O.load_rule(_weights_path(rule)) if not isinstance(rule, O.LearnedRule) else rule
        losses = run_learned(task, rule, seeds, horizon, desc=name, progress=progress, lr=learned_lr)  # (S, T)
        for t in steps:
            finals = final_loss(losses, t)
            mean, se = _stats(finals)
            result.rows.append({"optimizer": name, "T": t, "lr": None, "mean": mean, "se": se,
                                "per_seed": [float(x) for x in finals]})
        result.curves[name] = [float(x) for x in losses.mean(0)]
    return result


def cached_baseline(task: Task, name: str, lrs: Sequence[float], seeds: Sequence[int], steps: int,
                    progress: bool = True, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """:func:`run_baseline`, its loss curves kept in ``cache_dir`` (keyed by task, grid, seeds and horizon) and
    reused, also by a shorter horizon (None: no cache)."""
    key = f"{task.name}-{name}-{'_'.join(f'{x:g}' for x in lrs)}-s{'_'.join(map(str, seeds))}-T{steps}"
    return _cached(cache_dir, key, lambda: run_baseline(task, name, lrs, seeds, steps, progress))


def _cached(cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once per key; a key ending in ``-T<horizon>`` also reuses a longer run's curves (sliced)."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    prefix, _, horizon = key.rpartition("-T")
    longer = sorted((int(p.stem.rpartition("-T")[2]), p) for p in Path(cache_dir).glob(f"{prefix}-T*.pt")
                    if p.stem.rpartition("-T")[0] == prefix and p.stem.rpartition("-T")[2].isdigit()
                    and int(p.stem.rpartition("-T")[2]) >= int(horizon))
    if longer:  # constant learning rates: the first T steps of a longer run are a T-step run
        return torch.load(longer[0][1])[..., : int(horizon)]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def _weights_path(name: str | os.PathLike) -> Path:
    try:
        return O.registry._resolve(name)  # the registry's one rule: a path, or a shipped name
    except KeyError as e:
        raise ValueError(e.args[0]) from e  # shown by the CLI as a plain error, not a traceback


def plot_curves(result: CompareResult, out: str | os.PathLike) -> Path:
    """Mean training loss per step of every optimizer (best learning rate at the longest horizon), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in result.curves.items():
        c = torch.tensor(curve)
        k = max(1, len(curve) // 200)  # smooth by a moving average of ~0.5% of the run
        smooth = torch.nn.functional.avg_pool1d(c[None, None], k, stride=1).flatten() if k > 1 else c
        lr = next((r["lr"] for r in result.rows if r["optimizer"] == name and r["T"] == result.steps[-1]), None)
        label = f"{name} (tuned lr {lr:g})" if lr is not None else name
        ax.plot(range(k, len(curve) + 1), smooth.numpy(), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(f"{result.task}: {len(result.seeds)} seeds")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unf compare", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", required=True, help="registered task name (repeatable)")
    parser.add_argument("--optimizer", action="append", default=[],
                        help="shipped weights name or .safetensors path (repeatable; NAME=PATH to label it)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    parser.add_argument("--baselines", nargs="*", default=["adam", "sgdm"])
    parser.add_argument("--out", default=None, help="directory for <task>.json, <task>.md (table) and <task>.png")
    parser.add_argument("--cache", default=None, help="directory to keep and reuse the baselines' loss curves")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the populations run there)")
    parser.add_argument("--learned-lr", type=float, default=1.0,
                        help="lr multiplier of the learned optimizers (default 1: their learned step size)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    learned = {}
    for item in args.optimizer:
        label, _, path = item.partition("=") if "=" in item else (Path(item).stem, "", item)
        learned[label] = path
    out = Path(args.out) if args.out else None
    for task in args.task:
        res = compare(task, learned, steps=args.steps, seeds=range(args.seeds), baselines=args.baselines,
                      progress=not args.no_progress, cache_dir=args.cache, device=args.device,
                      learned_lr=args.learned_lr)
        print(res.table(), flush=True)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{task}.json").write_text(res.to_json())
            (out / f"{task}.md").write_text(res.table() + "\n")
            plot_curves(res, out / f"{task}.png")
    return 0
