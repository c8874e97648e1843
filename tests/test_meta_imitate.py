"""Imitation warm start (meta_train/imitate.py): the teacher's update, its snapshots, the fit, the loop's stage."""

from __future__ import annotations

import pytest
import torch

import optimizers as O
from meta_train.build import build_rule
from meta_train.imitate import ScheduledNormalizedMomentum, imitate, record_steps, teacher_snapshots
from meta_train.loop import MetaTrainConfig, meta_train
from meta_train.tasks import get_task
from optimizers.features import MOMENTUM_DECAYS, Segments


def test_teacher_update_is_normalised_momentum_with_inverse_time_decay():
    teacher = ScheduledNormalizedMomentum(lr=0.1, tau=10.0)
    seg = Segments.from_sizes([3, 2])
    m = torch.tensor([[3.0, 0.0, -4.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 2.0]])
    step = torch.tensor([0.0, 19.0])
    change = teacher.update(m, step, seg)
    rms = torch.tensor([[(25 / 3) ** 0.5] * 3 + [1.0] * 2, [1.0] * 3 + [2 ** 0.5] * 2])
    size = torch.tensor([0.1 / 1.1, 0.1 / 3.0])[:, None]
    torch.testing.assert_close(change, -size * m / rms)
    # every segment's update has root mean square = the step size (the scale of the gradients does not matter)
    torch.testing.assert_close(teacher.update(1e4 * m, step, seg), change)


@pytest.mark.parametrize("kwargs, message", [(dict(momentum=0.95), "one of the rule's feature decays"),
                                             (dict(lr=0.0), "positive"), (dict(tau=-1.0), "positive")])
def test_teacher_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduledNormalizedMomentum(**kwargs)


def test_record_steps_cover_the_run():
    steps = record_steps(1000)
    assert steps[0] == 0 and steps[-1] < 1000 and steps == sorted(set(steps))
    assert {0, 1, 2, 3, 25, 500, 975} <= set(steps)


def _tiny(family="deepset"):
    task = get_task("mlp-digits")
    params = task.init(torch.Generator().manual_seed(0))
    rule, problem = build_rule(family, task, params, hidden=8)
    return task, rule, problem


def test_snapshots_are_the_teachers_states_and_reproducible():
    task, _, problem = _tiny()
    teacher = ScheduledNormalizedMomentum()
    a = teacher_snapshots(task, problem, teacher, runs=2, horizon=30, generator=torch.Generator().manual_seed(1),
                          progress=False)
    b = teacher_snapshots(task, problem, teacher, runs=2, horizon=30, generator=torch.Generator().manual_seed(1),
                          progress=False)
    assert len(a) == 2 * len(record_steps(30)) and all(torch.equal(x, y) for x, y in
                                                       zip((a.w, a.momenta, a.step), (b.w, b.momenta, b.step)))
    n = task.num_params
    assert a.w.shape == (len(a), n) and a.momenta.shape == (len(a), 7, n)
    assert float(a.step[0]) == 0 and float(a.momenta[0].abs().sum()) == 0  # a run starts with no momentum
    # consecutive snapshots (steps 0, 1): momenta at the rule's decays (gamma0 = the teacher's momentum), and the
    # parameters moved by the teacher's update
    assert float(a.step[1]) == 1
    decays = torch.tensor((teacher.momentum, *MOMENTUM_DECAYS))[:, None]
    m1 = decays * a.momenta[0] + a.grad[0]
    torch.testing.assert_close(a.momenta[1], m1)
    torch.testing.assert_close(a.w[1], a.w[0] + teacher.update(m1[0], a.step[0], problem.segments))


def test_snapshots_that_would_not_fit_are_refused_up_front():
    task, _, problem = _tiny()
    with pytest.raises(ValueError, match=r"would keep .* GiB of snapshots .*imitate_runs"):
        teacher_snapshots(task, problem, ScheduledNormalizedMomentum(), runs=2, horizon=100,
                          generator=torch.Generator().manual_seed(0), progress=False, max_bytes=1000)


def test_snapshots_with_another_base_momentum():
    task, _, problem = _tiny()
    teacher = ScheduledNormalizedMomentum()
    a = teacher_snapshots(task, problem, teacher, runs=1, horizon=5, generator=torch.Generator().manual_seed(1),
                          progress=False, gamma0=0.0)
    b = teacher_snapshots(task, problem, teacher, runs=1, horizon=5, generator=torch.Generator().manual_seed(1),
                          progress=False)
    assert torch.equal(a.momenta[1, 0], a.grad[0])  # gamma0 = 0: the base momentum is the last gradient
    assert torch.equal(a.w, b.w) and torch.equal(a.momenta[:, 1:], b.momenta[:, 1:])  # the teacher's runs alike


@pytest.mark.parametrize("family", ["deepset", "unf"])
def test_imitation_fits_the_teacher(family):
    task, rule, problem = _tiny(family)
    teacher = ScheduledNormalizedMomentum()
    snaps = teacher_snapshots(task, problem, teacher, runs=1, horizon=100,
                              generator=torch.Generator().manual_seed(0), progress=False)
    losses = imitate(rule, problem, snaps, teacher, steps=400, generator=torch.Generator().manual_seed(0),
                     batch=4, lr=3e-3, progress=False)
    assert len(losses) == 400
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:5]) / 5  # relative error well below the start's ~1
    assert rule.alpha.item() == pytest.approx(1e-3) and rule.gamma0.item() == pytest.approx(teacher.momentum)
    # the fitted rule, stepping on its own, follows the teacher's direction (cosine similarity of the updates)
    k = len(snaps) // 2
    new_w, _, _ = rule.update(snaps.w[k], snaps.grad[k], O.RuleState(snaps.momenta[k], snaps.step[k]),
                              problem.segments)
    m = teacher.momentum * snaps.momenta[k, 1 + MOMENTUM_DECAYS.index(teacher.momentum)] + snaps.grad[k]
    target = teacher.update(m, snaps.step[k], problem.segments)
    assert float(torch.nn.functional.cosine_similarity(new_w.detach() - snaps.w[k], target, dim=0)) > 0.9


SMALL = dict(task="mlp-digits", family="deepset", hidden=4, meta_steps=4, truncation=2, particles=2, horizon=4,
             checkpoint_every=1, imitate_steps=5, imitate_runs=1, imitate_horizon=20)


def test_loop_imitates_first_and_resumes_exactly(tmp_path):
    straight = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "a"), **SMALL), progress=False)
    lines = (tmp_path / "a" / "imitation.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 6
    cfg = MetaTrainConfig(run_dir=str(tmp_path / "b"), **SMALL)
    meta_train(cfg, progress=False, stop_after=2)
    resumed = meta_train(cfg, progress=False)  # resumes from the checkpoint: no second imitation
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))
    plain = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "c"), **dict(SMALL, imitate_steps=0)), progress=False)
    assert not torch.equal(plain.raw_alpha, straight.raw_alpha)


def test_imitation_with_a_task_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="field 'imitate_steps' must be 0 with 'task_family' set"):
        MetaTrainConfig(run_dir=str(tmp_path), task_family="mlp-mnist1d-relu", imitate_steps=10)


def test_imitation_only_run_saves_the_fitted_rule(tmp_path):
    cfg = MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, meta_steps=0))
    rule = meta_train(cfg, progress=False)
    saved = O.load_rule(tmp_path / "rule.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(rule.state_dict().values(), saved.state_dict().values()))
    info = O.weights_info(tmp_path / "rule.safetensors")["info"]
    assert "ScheduledNormalizedMomentum(lr=0.03, tau=300)" in info["imitation"] and info["meta_steps"] == 0
    with pytest.raises(ValueError, match="field 'meta_steps' must be positive .0 only with imitate_steps > 0"):
        MetaTrainConfig(run_dir=str(tmp_path), meta_steps=0)
