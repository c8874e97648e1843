"""Benchmark: full training step (forward + backward + optimizer step) with learned optimizers vs torch.optim.Adam,
measured side by side in one run.

    python benchmarks/bench_optimizers.py [--task mlp|cnn|all] [--steps 50] [--rounds 5] [--seed 0] [--device cpu|cuda]
        [--relative] [--only NAME ...] [--profile NAME ...]

Tasks: the UNF paper's MLP (64 -> 32 -> 10, 2.4k parameters, batch 128) and a ~1M-parameter CNN (4 conv layers,
32x32 RGB input, batch 128). Reports the median step time of each optimizer and its ratio to Adam's; the optimizers
take turns (interleaved rounds), so a drifting machine affects all alike. ``--relative`` adds ``UNF-rel``: the UNF
optimizer with relative steps (``scale_floor = 0.05``, as the shipped ``unf-mnist1d-rel``).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import optimizers as O


def mlp_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, torch.randn(128, 64), torch.randint(0, 10, (128,))


def cnn_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(256, 10))
    return model, torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))


TASKS = {"mlp": mlp_task, "cnn": cnn_task}


def _relative(opt: O.UNFOptimizer, scale_floor: float = 0.05) -> O.UNFOptimizer:
    opt.rule.scale_floor = scale_floor
    return opt


def optimizer_factories(cuda: bool = False, relative: bool = False
                        ) -> dict[str, Callable[[nn.Module, torch.Tensor], torch.optim.Optimizer]]:
    """The optimizers compared; on a GPU each learned one five ways: the default (a CUDA graph replay of the step,
    with the fused Triton layers of :mod:`optimizers.fused`), unfused (``fused=False``: the default before them),
    stepping eagerly (``cuda_graph=False``: what the graph saves), compiled (``compile=True``, replayed, fused)
    and compiled unfused; and UNF compiled with its read-out on stored hidden activations
    (``UNFFamily.fused_readout = False``) and compiled with Inductor's ``combo_kernels`` (a lead, not a default)."""
    out = {
        "Adam": lambda m, x: torch.optim.Adam(m.parameters(), lr=1e-3),
        "SGD-momentum": lambda m, x: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    }
    learned = {"PerParamMLP": lambda m, x, **kw: O.LearnedOptimizer(m.parameters(), O.LearnedRule(O.PerParamMLP()),
                                                                     **kw),
               "DeepSet": lambda m, x, **kw: O.LearnedOptimizer(m.parameters(), O.LearnedRule(O.DeepSet()), **kw),
               "UNF": lambda m, x, **kw: O.UNFOptimizer(m, x, **kw)}
    if relative:
        learned["UNF-rel"] = lambda m, x, **kw: _relative(O.UNFOptimizer(m, x, **kw))
    variants = ({"": {}, "-unfused": {"fused": False}, "-eager": {"cuda_graph": False},
                 "-compiled": {"compile": True}, "-compiled-unfused": {"compile": True, "fused": False}}
                if cuda else {"": {}})
    for suffix, kw in variants.items():
        for name, make in learned.items():
            out[name + suffix] = lambda m, x, make=make, kw=kw: make(m, x, **kw)
    if cuda:  # the fused UNF step that keeps its hidden activations for the read-out (UNFFamily.fused_readout)
        out["UNF-compiled-hidden"] = lambda m, x: _hidden_readout(O.UNFOptimizer(m, x, compile=True))
        # a lead, not a default: compiled with Inductor's combo kernels (many small kernels launched as one)
        out["UNF-compiled-combo"] = lambda m, x: _combo_kernels(O.UNFOptimizer(m, x, compile=True), m, x)
    return out


def _hidden_readout(opt: O.UNFOptimizer) -> O.UNFOptimizer:
    opt.rule.f.fused_readout = False
    return opt


def _combo_kernels(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor) -> torch.optim.Optimizer:
    """Two steps under ``torch._inductor.config.combo_kernels = True``: the first compiles the step (and the
    second captures its graph) with that setting; the later steps reuse them."""
    from torch._inductor import config

    with config.patch(combo_kernels=True):
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
               warmup: int = 3) -> tuple[list[float], list[float]]:
    """Seconds of each full training step, and of opt.step() alone (on a GPU, synchronised before each clock
    reading so that queued kernels count where they belong)."""
    loss_fn = nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    full, opt_only = [], []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        sync()
        mid = time.perf_counter()
        opt.step()
        sync()
        end = time.perf_counter()
        if i >= warmup:
            full.append(end - start)
            opt_only.append(end - mid)
    return full, opt_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the steps are split into")
    parser.add_argument("--profile", nargs="*", default=[], metavar="OPTIMIZER",
                        help="after timing, profile 5 optimizer steps of these (e.g. UNF-eager) and print the ops "
                             "that take the most time (device time on a GPU)")
    parser.add_argument("--relative", action="store_true", help="also UNF-rel (relative steps, scale_floor 0.05)")
    parser.add_argument("--only", nargs="*", default=None, metavar="OPTIMIZER",
                        help="time only these (Adam, the baseline, always runs), e.g. UNF UNF-compiled")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{platform.machine()}, {torch.get_num_threads()} threads")
    print(f"machine: {where}, torch {torch.__version__}")
    for name in TASKS if args.task == "all" else [args.task]:
        torch.manual_seed(args.seed)
        model, x, y = TASKS[name]()
        model, x, y = model.to(device), x.to(device), y.to(device)
        n = sum(p.numel() for p in model.parameters())
        print(f"\n{name}: {n:,} parameters, batch {x.shape[0]}, {args.steps} timed steps per optimizer in "
              f"{args.rounds} interleaved rounds (medians; per-round ratio range in brackets)")
        # every optimizer trains its own copy; rounds alternate between them, so that drifts of the machine
        # (frequency, other tenants) fall on all of them alike
        runs = {}
        factories = optimizer_factories(device.type == "cuda", args.relative)
        unknown = sorted(set(args.only or ()) - set(factories))
        if unknown:
            parser.error(f"unknown optimizers {unknown}; choose from {sorted(factories)}")
        for opt_name, make in factories.items():
            if args.only is not None and opt_name != "Adam" and opt_name not in args.only:
                continue
            m = copy.deepcopy(model)
            runs[opt_name] = (m, make(m, x))
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in runs}
        per_round: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for opt_name, (m, opt) in runs.items():
                full, step = time_steps(m, opt, x, y, max(1, args.steps // args.rounds))
                times[opt_name][0].extend(full)
                times[opt_name][1].extend(step)
                per_round[opt_name].append(statistics.median(full))
        base = statistics.median(times["Adam"][0])
        for opt_name, (full, step) in times.items():
            ratios = [a / b for a, b in zip(per_round[opt_name], per_round["Adam"])]
            print(f"  {opt_name:20s} step {statistics.median(full) * 1e3:8.2f} ms  "
                  f"({statistics.median(full) / base:5.2f}x Adam [{min(ratios):.2f}-{max(ratios):.2f}])   "
                  f"optimizer.step alone {statistics.median(step) * 1e3:8.2f} ms")
        for opt_name in args.profile:
            profile_steps(*runs[opt_name], x, y, opt_name)


def profile_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    """Where one optimizer's step spends its time: the top ops of 5 profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    loss_fn = nn.CrossEntropyLoss()
    with profile(activities=activities) as prof:
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    print(f"\n  profile of {name}, 5 full steps:")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


if __name__ == "__main__":
    main()
