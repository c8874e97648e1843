"""A learned optimizer with a torch.optim.lr_scheduler: the group ``lr`` multiplies the learned step size alpha.

    python examples/lr_scheduler.py [--steps 200]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import optimizers


def main(steps: int = 200) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
    x = torch.randn(256, 8)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = optimizers.LearnedOptimizer(model.parameters(), optimizers.make_rule("mlp"), lr=1.0)
    # warm up for 10% of the steps, then cosine decay: schedulers see an ordinary torch optimizer
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=max(1, steps // 10))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    schedule = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[max(1, steps // 10)])
    lrs = []
    for step in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  lr multiplier {lrs[-1]:.3f}  loss {loss.item():.4f}")
    return lrs


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
