"""The UNF layers train: an invariant model predicts a property of random MLPs from their weights."""

from __future__ import annotations

import torch
from torch import nn

import unf
from unf.nn.batch import features_from_state_dicts
from unf.nn.models import UNFInvariant


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def dataset(spec, probe, n, gen):
    """Random MLPs with a random scale per tensor; target: log of the norm of their outputs on ``probe``."""
    state_dicts, targets = [], []
    for _ in range(n):
        model = Small()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(float(torch.exp(torch.randn(1, generator=gen))))
            targets.append(float(model(probe).norm().log()))
        state_dicts.append(model.state_dict())
    return features_from_state_dicts(spec, state_dicts), torch.tensor(targets)


def test_invariant_unf_predicts_output_norm_of_random_mlps():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(16, 4, generator=gen)
    spec = unf.derive_spec(Small(), probe).parameters_only()
    x_train, y_train = dataset(spec, probe, 5000, gen)
    x_test, y_test = dataset(spec, probe, 500, gen)
    mean, std = y_train.mean(), y_train.std()
    model = UNFInvariant(spec, hidden=16, layers=3, head_hidden=64)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    epochs = 40
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        order = torch.randperm(5000)
        for i in range(0, 5000, 128):
            idx = order[i : i + 128]
            pred = model({k: v[idx] for k, v in x_train.items()}).squeeze(-1)
            loss = ((pred - (y_train[idx] - mean) / std) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    with torch.no_grad():
        pred = model(x_test).squeeze(-1) * std + mean
    r2 = 1 - ((pred - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum()
    assert r2 >= 0.9, f"test R^2 {float(r2):.3f}"
