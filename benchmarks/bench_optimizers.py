"""Benchmark: full training step (forward + backward + optimizer step) with learned optimizers vs torch.optim.Adam,
measured side by side in one run.

    python benchmarks/bench_optimizers.py [--task mlp|cnn|all] [--steps 50] [--seed 0] [--device cpu|cuda]

Tasks: the UNF paper's MLP (64 -> 32 -> 10, 2.4k parameters, batch 128) and a ~1M-parameter CNN (4 conv layers,
32x32 RGB input, batch 128). Reports the median step time of each optimizer and its ratio to Adam's.
"""

from __future__ import annotations

import argparse
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


def optimizer_factories() -> dict[str, Callable[[nn.Module, torch.Tensor], torch.optim.Optimizer]]:
    return {
        "Adam": lambda m, x: torch.optim.Adam(m.parameters(), lr=1e-3),
        "SGD-momentum": lambda m, x: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        "PerParamMLP": lambda m, x: O.LearnedOptimizer(m.parameters(), O.LearnedRule(O.PerParamMLP())),
        "DeepSet": lambda m, x: O.LearnedOptimizer(m.parameters(), O.LearnedRule(O.DeepSet())),
        "UNF": lambda m, x: O.UNFOptimizer(m, x),
    }


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
               warmup: int = 3) -> tuple[float, float]:
    """Median seconds of a full training step, and median seconds of opt.step() alone (on a GPU, synchronised
    before each clock reading so that queued kernels count where they belong)."""
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
    return statistics.median(full), statistics.median(opt_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{platform.machine()}, {torch.get_num_threads()} threads")
    print(f"machine: {where}, torch {torch.__version__}")
    for name in TASKS if args.task == "all" else [args.task]:
        torch.manual_seed(args.seed)
        model, x, y = TASKS[name]()
        model, x, y = model.to(device), x.to(device), y.to(device)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        n = sum(p.numel() for p in model.parameters())
        print(f"\n{name}: {n:,} parameters, batch {x.shape[0]}, {args.steps} timed steps (median)")
        results = {}
        for opt_name, make in optimizer_factories().items():
            model.load_state_dict(init)
            results[opt_name] = time_steps(model, make(model, x), x, y, args.steps)
        base = results["Adam"][0]
        for opt_name, (full, step) in results.items():
            print(f"  {opt_name:13s} step {full * 1e3:8.2f} ms  ({full / base:5.2f}x Adam)   "
                  f"optimizer.step alone {step * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
