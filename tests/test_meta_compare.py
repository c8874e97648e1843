"""meta_train.compare: the batched populations reproduce torch.optim and LearnedOptimizer runs, the protocol
(tuning on the grid, final-loss window) is what the docs say, and `unf compare` writes its table and plot."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import optimizers as O
from meta_train.compare import WINDOW, compare, final_loss, run_baseline, run_learned
from meta_train.tasks import get_task


@pytest.fixture(scope="module")
def task():
    return get_task("mlp-digits", batch_size=16)


def _reference(task, seed, steps, make_opt):
    """One run the ordinary way: a model's parameters, a torch.optim-style optimizer, the same init and batches."""
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(task.model)
    model.load_state_dict(task.init(gen), strict=False)
    model.requires_grad_(True)
    params = dict(model.named_parameters())
    opt = make_opt(model)
    losses = []
    for _ in range(steps):
        batch = task.sample_batch(gen)
        opt.zero_grad()
        loss = task.loss(params, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return torch.tensor(losses)


@pytest.mark.parametrize("name,cls,kw", [("adam", torch.optim.Adam, {}),
                                         ("sgdm", torch.optim.SGD, {"momentum": 0.9})])
def test_baseline_populations_match_torch_optim(task, name, cls, kw):
    lrs = [3e-3, 3e-2]
    pop = run_baseline(task, name, lrs, seeds=[0, 1], steps=15, progress=False)  # (2 seeds, 2 lrs, 15)
    for s in (0, 1):
        for j, lr in enumerate(lrs):
            ref = _reference(task, s, 15, lambda m, lr=lr: cls(m.parameters(), lr=lr, **kw))
            torch.testing.assert_close(pop[s, j], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,lr", [("deepset", 1.0), ("unf", 1.0), ("deepset", 0.3)])
def test_learned_population_matches_the_optimizer_class(task, family, lr):
    from meta_train.build import build_rule

    params = task.init(torch.Generator().manual_seed(0))
    rule, _ = build_rule(family, task, params, hidden=4, layers=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.2 * torch.randn_like(p))
        rule.beta.fill_(0.05)
    pop = run_learned(task, rule, seeds=[0, 1], steps=12, progress=False, lr=lr)

    def make(model):
        if family == "deepset":
            return O.LearnedOptimizer(model.parameters(), rule, lr=lr)
        return O.UNFOptimizer(model, task.example_inputs, rule=rule, lr=lr)

    for s in (0, 1):
        torch.testing.assert_close(pop[s], _reference(task, s, 12, make), rtol=1e-4, atol=1e-5)


def test_final_loss_window_and_divergence():
    losses = torch.arange(1.0, 201.0).expand(2, 200).clone()
    assert float(final_loss(losses, 100)[0]) == pytest.approx(sum(range(100 - WINDOW + 1, 101)) / WINDOW)
    losses[1, 150] = float("nan")
    assert final_loss(losses, 200)[1] == float("inf") and torch.isfinite(final_loss(losses, 100)[1])


def test_compare_tunes_on_the_grid_and_the_cli_writes_table_and_plot(task, tmp_path):
    rule = O.make_rule("deepset", hidden=4, layers=1)
    res = compare(task, {"ds": rule}, steps=(60, 80), seeds=[0, 1], grids={"adam": (1e-3, 1e-2), "sgdm": (1e-2,)},
                  progress=False, cache_dir=tmp_path / "cache")
    adam = [r for r in res.rows if r["optimizer"] == "adam"]
    for r in adam:  # the chosen lr has the lowest mean final loss on the grid at that horizon
        means = res.grid["adam"][str(r["T"])]
        assert r["lr"] == (1e-3, 1e-2)[means.index(min(means))] and r["mean"] == pytest.approx(min(means))
    assert {r["optimizer"] for r in res.rows} == {"adam", "sgdm", "ds"} and "| ds |" in res.table()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    again = compare(task, {}, steps=(60, 80), seeds=[0, 1], grids={"adam": (1e-3, 1e-2), "sgdm": (1e-2,)},
                    progress=False, cache_dir=tmp_path / "cache")  # from the cache: identical numbers
    assert [r for r in again.rows if r["optimizer"] == "adam"] == adam
    shorter = compare(task, {}, steps=(60,), seeds=[0, 1], grids={"adam": (1e-3, 1e-2), "sgdm": (1e-2,)},
                      progress=False, cache_dir=tmp_path / "cache")  # a prefix of the cached 80-step curves
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert [r for r in shorter.rows if r["optimizer"] == "adam"] == [r for r in adam if r["T"] == 60]

    from unf.cli import main

    path = tmp_path / "ds.safetensors"
    O.save_rule(rule, path)
    rc = main(["compare", "--task", "mlp-digits", "--optimizer", f"mine={path}", "--steps", "60", "--seeds", "2",
               "--baselines", "sgdm", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    table = (tmp_path / "out" / "mlp-digits.md").read_text()
    assert "| mine |" in table and "| sgdm |" in table
    assert (tmp_path / "out" / "mlp-digits.png").stat().st_size > 1000
    data = json.loads((tmp_path / "out" / "mlp-digits.json").read_text())
    assert data["steps"] == [60] and len(data["curves"]["mine"]) == 60
    assert main(["compare", "--task", "mlp-digits", "--optimizer", "no-such-weights", "--steps", "60"]) == 2
