"""meta_train.build: every family builds for a task, and a UNF rule warm-started from a DeepSet rule computes the
DeepSet rule's updates exactly (its UNF read-out starts at zero)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import optimizers as O
from meta_train.build import build_rule, warm_start
from meta_train.tasks import get_task


@pytest.fixture(scope="module")
def task():
    return get_task("mlp-digits", batch_size=16)


def _update(rule, problem, w, batch):
    g = torch.func.grad(problem.loss)(w, batch)
    state = O.init(w.numel())
    return functional_call(rule, dict(rule.named_parameters()), (w, g, state, problem.segments))[0]


def test_every_family_builds_and_steps(task):
    params = task.init(torch.Generator().manual_seed(0))
    w = torch.cat([p.reshape(-1) for p in params.values()])
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    for family in ("mlp", "deepset", "unf"):
        rule, problem = build_rule(family, task, params, hidden=4, layers=2)
        new = _update(rule, problem, w, batch)
        assert new.shape == w.shape and torch.isfinite(new).all() and not torch.equal(new, w)
    with pytest.raises(KeyError, match="unknown optimizer family"):
        build_rule("adam", task, params)


def test_unf_warm_started_from_deepset_matches_it(task, tmp_path):
    params = task.init(torch.Generator().manual_seed(0))
    ds, ds_problem = build_rule("deepset", task, params, hidden=4, layers=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ds.parameters():
            p.normal_(0, 0.3)
        ds.beta.fill_(0.05)
    O.save_rule(ds, tmp_path / "ds.safetensors")
    unf_rule, unf_problem = build_rule("unf", task, params, hidden=4, layers=2,
                                       init_from=tmp_path / "ds.safetensors")
    w = torch.cat([p.reshape(-1) for p in params.values()])
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    torch.testing.assert_close(_update(unf_rule, unf_problem, w, batch), _update(ds, ds_problem, w, batch))
    # a UNF rule starts from another UNF rule (same spec here): everything equal
    O.save_rule(unf_rule, tmp_path / "unf.safetensors")
    again, _ = build_rule("unf", task, params, hidden=4, layers=2)
    warm_start(again, tmp_path / "unf.safetensors")
    for k, v in unf_rule.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    with pytest.raises(ValueError, match="cannot start"):
        mlp_rule, _ = build_rule("mlp", task, params, hidden=4)
        warm_start(mlp_rule, tmp_path / "ds.safetensors")


def test_unf_meta_training_evaluates_on_a_task_with_another_spec(tmp_path):
    import csv

    from meta_train.loop import MetaTrainConfig, meta_train

    cfg = MetaTrainConfig(run_dir=str(tmp_path / "run"), task="mlp-digits", family="unf", hidden=4, particles=2,
                          truncation=3, horizon=6, meta_steps=2, checkpoint_every=1, eval_every=1,
                          eval_tasks=["mlp-digits-w128"], eval_steps=5, eval_seeds=1)
    rule = meta_train(cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "eval.csv")))
    assert [int(r["meta_step"]) for r in rows] == [0, 1, 2] and all(r["task"] == "mlp-digits-w128" for r in rows)
    # the evaluated rule is the trained one transferred by role: same keys, same coefficients
    task = get_task("mlp-digits-w128")
    other, _ = build_rule("unf", task, task.init(torch.Generator().manual_seed(0)), hidden=4)
    from meta_train.build import copy_rule

    copy_rule(other, rule)
    assert other.f.head.coverage == 1.0
    for k, v in rule.f.head.role_state().items():
        assert torch.equal(other.f.head.role_state()[k], v)
