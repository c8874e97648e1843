"""Replace torch.optim.Adam by a learned optimizer in a plain training loop: one line changes.

    python examples/replace_adam.py [--steps 300] [--device cuda]

The learned optimizer here uses the hand-set initial weights (no meta-training): it behaves like momentum SGD
with alpha = 0.1. Shipped meta-trained weights (``optimizers.available()``) load with ``optimizers.load(name, model)``.
On a GPU nothing changes either: the optimizer replays its step as a CUDA graph by itself; pass ``compile=True``
to have ``torch.compile`` fuse it first.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import optimizers


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(512, 20, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return x, y


def train(make_optimizer, steps: int, seed: int = 0, device: str = "cpu") -> float:
    torch.manual_seed(seed)
    x, y = (t.to(device) for t in make_data(seed))
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    opt = make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,)).to(device)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(loss_fn(model(x), y))


def main(steps: int = 300, device: str = "cpu") -> dict[str, float]:
    results = {
        # before:
        "Adam": train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), steps, device=device),
        # after (the only line that changes):
        "DeepSet (initial weights)": train(
            lambda m: optimizers.LearnedOptimizer(m.parameters(), optimizers.make_rule("deepset")), steps,
            device=device),
    }
    for name, loss in results.items():
        print(f"{name:28s} final training loss {loss:.4f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    main(args.steps, args.device)
