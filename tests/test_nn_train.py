"""The layers train: an invariant UNF model predicts a property of random MLPs from their weights."""

from __future__ import annotations

import time

import torch
from torch import nn

from unf.nn import UNFInvariant, WeightFeatures
from unf.spec import WeightSpaceSpec

from .test_nn_reference import single_thread  # noqa: F401 (autouse: one thread, see there)

SPEC = WeightSpaceSpec.from_axes({"0.weight": [("h", 8), (None, 4)], "0.bias": [("h", 8)],
                                  "2.weight": [(None, 3), ("h", 8)], "2.bias": [(None, 3)]})


def _random_mlps(n: int, gen: torch.Generator) -> tuple[WeightFeatures, torch.Tensor]:
    """``n`` random 4-8-3 tanh MLPs with per-layer scales drawn log-uniformly, and their log output norm on a
    fixed probe batch (a property invariant under hidden-neuron permutations)."""
    probe = torch.randn(16, 4, generator=torch.Generator().manual_seed(123))
    s = torch.exp(torch.empty(n, 4).uniform_(-1.0, 1.0, generator=gen))  # per-net, per-tensor scales
    w1 = torch.randn(n, 8, 4, generator=gen) * s[:, :1, None] / 2
    b1 = torch.randn(n, 8, generator=gen) * s[:, 1:2] / 2
    w2 = torch.randn(n, 3, 8, generator=gen) * s[:, 2:3, None] / 8 ** 0.5
    b2 = torch.randn(n, 3, generator=gen) * s[:, 3:4] / 2
    h = torch.tanh(torch.einsum("nhi,pi->nph", w1, probe) + b1[:, None])
    out = torch.einsum("noh,nph->npo", w2, h) + b2[:, None]
    y = out.norm(dim=2).mean(dim=1).log()
    feats = WeightFeatures(SPEC, {"0.weight": w1[:, None], "0.bias": b1[:, None], "2.weight": w2[:, None],
                                  "2.bias": b2[:, None]})
    return feats, y


def test_invariant_model_learns_mlp_output_norm() -> None:
    """~30 s on one core: 20,000 random MLPs (data, not epochs, is what the model needs), 20 epochs."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_train, epochs = 20000, 20
    train_x, train_y = _random_mlps(n_train, gen)
    test_x, test_y = _random_mlps(500, gen)
    mu, sd = train_y.mean(), train_y.std()
    # the MLP's 4 inputs and 3 outputs are true fixed axes: small, so they are treated exactly
    model = UNFInvariant(SPEC, [1, 16, 16], out_features=1, head_hidden=(64,), fixed="exact")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = (n_train + 127) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        for k in range(0, n_train, 128):
            idx = order[k:k + 128]
            batch = {n: t[idx] for n, t in train_x.items()}
            loss = nn.functional.mse_loss(model(batch).squeeze(1), (train_y[idx] - mu) / sd)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = model(test_x.as_dict()).squeeze(1) * sd + mu
    r2 = 1 - float((pred - test_y).pow(2).mean() / test_y.var(unbiased=False))
    assert r2 >= 0.9, f"test R^2 {r2:.3f} after {time.perf_counter() - start:.1f}s"
