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


def _momenta(m: torch.Tensor, row: int, other: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 7, N) momenta with ``m`` in ``row`` and ``other`` (default: noise) in the other rows."""
    out = torch.randn(m.shape[0], 7, m.shape[1], generator=torch.Generator().manual_seed(0)) if other is None \
        else other.clone()
    out[:, row] = m
    return out


def test_teacher_update_is_normalised_momentum_with_inverse_time_decay():
    teacher = ScheduledNormalizedMomentum(lr=0.1, tau=10.0)
    seg = Segments.from_sizes([3, 2])
    m = torch.tensor([[3.0, 0.0, -4.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 2.0]])
    step = torch.tensor([0.0, 19.0])
    grad = torch.randn(2, 5)
    change = teacher.update(_momenta(m, teacher.momentum_row), grad, step, seg)
    rms = torch.tensor([[(25 / 3) ** 0.5] * 3 + [1.0] * 2, [1.0] * 3 + [2 ** 0.5] * 2])
    size = torch.tensor([0.1 / 1.1, 0.1 / 3.0])[:, None]
    torch.testing.assert_close(change, -size * m / rms)
    # every segment's update has root mean square = the step size (the scale of the gradients does not matter)
    torch.testing.assert_close(teacher.update(_momenta(1e4 * m, teacher.momentum_row), grad, step, seg), change)


def test_teacher_refinements_snr_scaling_and_soft_sign():
    seg = Segments.from_sizes([3, 2])
    m = torch.tensor([[3.0, 0.0, -4.0, 1.0, 1.0]])
    step = torch.tensor([4.0])
    plain = ScheduledNormalizedMomentum(lr=0.1, tau=10.0)
    snr = ScheduledNormalizedMomentum(lr=0.1, tau=10.0, snr_decay=0.99, snr_power=2.0)
    slow_row = 1 + MOMENTUM_DECAYS.index(0.99)
    grad = torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0]])
    slow = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])  # cosines with the gradient: 1 / sqrt(2), then 0
    momenta = _momenta(m, plain.momentum_row, _momenta(slow, slow_row))
    scale = torch.tensor([[0.5] * 3 + [0.0] * 2])  # cos ** 2 per segment
    torch.testing.assert_close(snr.update(momenta, grad, step, seg), scale * plain.update(momenta, grad, step, seg))
    # a gradient opposing the slow momentum stops the step (the cosine is clamped at 0), scale-free as before
    assert float(snr.update(momenta, -grad, step, seg).abs().max()) == 0
    torch.testing.assert_close(snr.update(1e3 * momenta, 1e-3 * grad, step, seg), snr.update(momenta, grad, step, seg))
    # soft sign: d (1 + s) / (|d| + s) of the normalised direction d; nearly a sign for small s
    soft = ScheduledNormalizedMomentum(lr=0.1, tau=10.0, softness=0.01)
    d = plain.update(momenta, grad, step, seg) / -plain.step_size(step)
    torch.testing.assert_close(soft.update(momenta, grad, step, seg),
                               -plain.step_size(step) * d * 1.01 / (d.abs() + 0.01))
    assert torch.allclose(soft.update(momenta, grad, step, seg).abs()[m != 0], plain.step_size(step), rtol=0.02)
    assert "snr_decay=0.99, snr_power=2" in snr.describe() and plain.describe() == \
        "ScheduledNormalizedMomentum(lr=0.1, tau=10)"


def test_teacher_relative_steps_scale_with_the_weights_spread():
    seg = Segments.from_sizes([3, 2])
    m = torch.tensor([[3.0, 0.0, -4.0, 1.0, 1.0]])
    step = torch.tensor([4.0])
    plain = ScheduledNormalizedMomentum(lr=0.1, tau=10.0, snr_decay=0.99)
    rel = ScheduledNormalizedMomentum(lr=0.1, tau=10.0, snr_decay=0.99, scale_floor=0.5)
    momenta = _momenta(m, plain.momentum_row, _momenta(torch.ones(1, 5), 1 + MOMENTUM_DECAYS.index(0.99)))
    grad = torch.ones(1, 5)
    w = torch.tensor([[1.0, 3.0, 5.0, 7.0, 7.0]])  # std sqrt(8/3), then 0 (floored)
    scale = torch.tensor([[(8 / 3) ** 0.5] * 3 + [0.5] * 2])
    torch.testing.assert_close(rel.update(momenta, grad, step, seg, param=w),
                               scale * plain.update(momenta, grad, step, seg))
    torch.testing.assert_close(rel.step_sizes(step, w, seg), scale * plain.step_size(step))
    assert plain.step_sizes(step, w, seg).shape == (1, 1)
    with pytest.raises(ValueError, match="needs the parameters"):
        rel.update(momenta, grad, step, seg)
    assert "scale_floor=0.5" in rel.describe()


@pytest.mark.parametrize("kwargs, message", [(dict(momentum=0.95), "one of the rule's feature decays"),
                                             (dict(scale_floor=0.0), "positive"),
                                             (dict(snr_decay=0.95), "snr_decay must be one of"),
                                             (dict(softness=0.0), "positive"), (dict(snr_power=-1.0), "positive"),
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
    torch.manual_seed(0)  # the rule's initial weights: the same whichever tests ran before
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
    torch.testing.assert_close(a.w[1], a.w[0] + teacher.update(m1, a.grad[0], a.step[0], problem.segments))


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


@pytest.mark.parametrize("family, teacher, ratio, min_cos", [
    ("deepset", ScheduledNormalizedMomentum(), 0.2, 0.9), ("unf", ScheduledNormalizedMomentum(), 0.2, 0.9),
    # the refined teacher scales each tensor's step by a cosine the rule must infer from pooled features: a tiny
    # rule fitted briefly gets part of the way (the shipped 3000-step fit goes from 0.034 to 0.0011)
    ("unf", ScheduledNormalizedMomentum(lr=0.1, tau=1000, snr_decay=0.99, softness=0.1), 0.5, 0.75)])
def test_imitation_fits_the_teacher(family, teacher, ratio, min_cos):
    task, rule, problem = _tiny(family)
    snaps = teacher_snapshots(task, problem, teacher, runs=1, horizon=100,
                              generator=torch.Generator().manual_seed(0), progress=False)
    decays = torch.tensor((teacher.momentum, *MOMENTUM_DECAYS))[:, None]
    targets = [teacher.update(decays * snaps.momenta[k] + snaps.grad[k], snaps.grad[k], snaps.step[k],
                              problem.segments) for k in range(len(snaps))]
    # the loss of a rule that does not move: the teacher's squared step relative to its nominal size
    still = float(torch.stack([t / teacher.step_size(s) for t, s in zip(targets, snaps.step)]).pow(2).mean())
    losses = imitate(rule, problem, snaps, teacher, steps=400, generator=torch.Generator().manual_seed(0),
                     batch=8, lr=3e-3, progress=False)
    assert len(losses) == 400
    assert sum(losses[-20:]) / 20 < ratio * still
    assert rule.alpha.item() == pytest.approx(1e-3) and rule.gamma0.item() == pytest.approx(teacher.momentum)
    # the fitted rule, stepping on its own, follows the teacher's direction (cosine similarity of the updates)
    cosines = []
    for k in range(0, len(snaps), 5):
        new_w, _, _ = rule.update(snaps.w[k], snaps.grad[k], O.RuleState(snaps.momenta[k], snaps.step[k]),
                                  problem.segments)
        cosines.append(float(torch.nn.functional.cosine_similarity(new_w.detach() - snaps.w[k], targets[k], dim=0)))
    assert sum(cosines) / len(cosines) > min_cos, cosines


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


def test_loop_with_relative_steps_fits_and_saves_them(tmp_path):
    cfg = MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, meta_steps=0, teacher_lr=0.1, teacher_snr_decay=0.99,
                                                         scale_floor=0.05))
    rule = meta_train(cfg, progress=False)
    assert rule.scale_floor == 0.05 and O.load_rule(tmp_path / "rule.safetensors").scale_floor == 0.05
    info = O.weights_info(tmp_path / "rule.safetensors")["info"]
    assert "scale_floor=0.05" in info["imitation"]


def test_loop_passes_the_teacher_refinements(tmp_path):
    cfg = MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, meta_steps=0, teacher_lr=0.02, teacher_tau=3000.0,
                                                         teacher_snr_decay=0.99, teacher_softness=0.5))
    meta_train(cfg, progress=False)
    info = O.weights_info(tmp_path / "rule.safetensors")["info"]
    assert "ScheduledNormalizedMomentum(lr=0.02, tau=3000, snr_decay=0.99, softness=0.5)" in info["imitation"]


@pytest.mark.parametrize("field, value, message", [
    ("teacher_snr_decay", 0.95, "field 'teacher_snr_decay' must be 0 .off. or one of the rule's momentum decays"),
    ("teacher_softness", -1.0, "field 'teacher_softness' must be 0 .off. or positive"),
    ("teacher_snr_power", 0.0, "field 'teacher_snr_power' must be positive"),
    ("imitate_beta", 0.0, "field 'imitate_beta' must be positive"),
    ("scale_floor", -0.1, "field 'scale_floor' must be 0 .off: absolute steps. or positive")])
def test_bad_teacher_refinements_name_their_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        MetaTrainConfig(run_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("family", ["deepset", "unf"])
def test_imitation_over_more_tasks(tmp_path, family):
    extra = dict(SMALL, family=family, meta_steps=0, imitate_tasks=["mlp-mnist1d"], imitate_steps=4)
    rule = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "a"), **extra), progress=False)
    info = O.weights_info(tmp_path / "a" / "rule.safetensors")["info"]
    assert info["imitation"].endswith("runs of 20 steps of each of mlp-digits, mlp-mnist1d")
    one = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "b"), **dict(extra, imitate_tasks=[])), progress=False)
    assert not torch.equal(rule.beta, one.beta)  # the second task's snapshots took part
    if family == "unf":  # the read-out covers both tasks' role keys, so the rule runs on either at full coverage
        from meta_train.build import bind_rule

        task = get_task("mlp-mnist1d")
        bound, _ = bind_rule(rule, "unf", task, task.init(torch.Generator().manual_seed(0)))
        assert bound.f.head.coverage == 1.0


def test_imitation_tasks_are_checked(tmp_path):
    with pytest.raises(ValueError, match="field 'imitate_tasks': unknown task 'nope'"):
        MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, imitate_tasks=["nope"]))
    with pytest.raises(ValueError, match="field 'imitate_tasks' needs imitate_steps > 0"):
        MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, imitate_steps=0, imitate_tasks=["mlp-mnist1d"]))


def test_imitation_starts_beta_where_the_config_says(tmp_path):
    rule = meta_train(MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, meta_steps=0, imitate_beta=3.0)),
                      progress=False)
    assert abs(rule.beta.item() - 3.0) < 0.05  # five Adam steps at lr 1e-3 from 3.0 (the default starts at 30)


def test_key_dropout_leaves_role_keys_out():
    from meta_train.imitate import role_tables

    task, rule, problem = _tiny("unf")
    assert role_tables(rule) == ["f.head.coef", "f.head.bias_coef"]
    teacher = ScheduledNormalizedMomentum()
    snaps = teacher_snapshots(task, problem, teacher, runs=1, horizon=20, generator=torch.Generator().manual_seed(0),
                              progress=False)
    before = {k: v.detach().clone() for k, v in rule.named_parameters()}

    def fit(p: float, seed: int = 0) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for k, v in rule.named_parameters():
                v.copy_(before[k])
        imitate(rule, problem, snaps, teacher, steps=5, generator=torch.Generator().manual_seed(seed), batch=4,
                progress=False, key_dropout=p)
        return {k: v.detach().clone() for k, v in rule.named_parameters()}

    # (nearly) every key left out at every step: the tables get no gradient, so Adam leaves them exactly as they
    # were while the DeepSet part is fitted
    dropped = fit(0.9999)
    assert torch.equal(dropped["f.head.coef"], before["f.head.coef"])
    assert torch.equal(dropped["f.head.bias_coef"], before["f.head.bias_coef"])
    assert not torch.equal(dropped["f.deepset.layers.0.elem.weight"], before["f.deepset.layers.0.elem.weight"])
    # some keys in, some out: the tables are fitted too; the draws come from the fit's generator (reproducible)
    half = fit(0.5)
    assert not torch.equal(half["f.head.coef"], before["f.head.coef"])
    assert all(torch.equal(half[k], v) for k, v in fit(0.5).items())
    assert any(not torch.equal(half[k], v) for k, v in fit(0.0).items())


def test_key_dropout_is_checked(tmp_path):
    task, rule, problem = _tiny("deepset")
    snaps = teacher_snapshots(task, problem, ScheduledNormalizedMomentum(), runs=1, horizon=5,
                              generator=torch.Generator().manual_seed(0), progress=False)
    with pytest.raises(ValueError, match="key_dropout needs a rule whose UNF read-out is shared by role key"):
        imitate(rule, problem, snaps, ScheduledNormalizedMomentum(), steps=1, generator=torch.Generator(),
                progress=False, key_dropout=0.5)
    with pytest.raises(ValueError, match=r"key_dropout must be in \[0, 1\)"):
        imitate(rule, problem, snaps, ScheduledNormalizedMomentum(), steps=1, generator=torch.Generator(),
                progress=False, key_dropout=1.0)
    with pytest.raises(ValueError, match=r"field 'imitate_key_dropout' must be in \[0, 1\)"):
        MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, family="unf", imitate_key_dropout=-0.1))
    with pytest.raises(ValueError, match="field 'imitate_key_dropout' applies to family 'unf' only"):
        MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, imitate_key_dropout=0.5))
    with pytest.raises(ValueError, match="field 'imitate_key_dropout' needs imitate_steps > 0"):
        MetaTrainConfig(run_dir=str(tmp_path), **dict(SMALL, family="unf", imitate_steps=0, imitate_key_dropout=0.5))


def test_loop_passes_key_dropout(tmp_path):
    base = dict(SMALL, family="unf", meta_steps=0)
    plain = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "a"), **base), progress=False)
    dropped = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "b"), **dict(base, imitate_key_dropout=0.5)),
                         progress=False)
    assert not torch.equal(plain.f.head.coef, dropped.f.head.coef)
    info = O.weights_info(tmp_path / "b" / "rule.safetensors")["info"]
    assert info["imitation"].endswith("runs of 20 steps, role keys left out with probability 0.5")


def test_imitation_error_diagnostic_adds_up():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "imitation_error.py"
    spec = importlib.util.spec_from_file_location("imitation_error", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, rule, _ = _tiny("unf")
    with torch.no_grad():
        rule.beta.fill_(30.0)  # as a fit starts it (a fresh rule's learned term is below float32 rounding of w)
        rule.f.head.coef.normal_(generator=torch.Generator().manual_seed(0))  # (a fresh read-out starts at zero)
    teacher = ScheduledNormalizedMomentum(lr=0.1, tau=1000, snr_decay=0.99, softness=0.1, scale_floor=0.05)
    r = module.entry_errors(rule, "mlp-digits", teacher, horizon=20, seed=0)
    n = float(r["counts"].sum()) * r["snapshots"]
    assert float(r["err"].sum()) / n == pytest.approx(r["mean"], rel=1e-5)
    assert r["coverage"] == 1.0 and r["entries"] == ["1.weight", "1.bias", "3.weight", "3.bias"]
    # the per-entry terms are those of a squared difference: err = rule - 2 dot + teacher
    torch.testing.assert_close(r["err"], r["rule"] - 2 * r["dot"] + r["teacher"], rtol=1e-6, atol=1e-6)
    zeroed = module.entry_errors(rule, "mlp-digits", teacher, horizon=20, seed=0, zero_tables=True)
    assert zeroed["mean"] != r["mean"]  # the read-out's tables take part unless zeroed
