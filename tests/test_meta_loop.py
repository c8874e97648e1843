"""The meta-training loop: it learns, checkpoints atomically, and resumes exactly after a SIGKILL."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import optimizers as O
from meta_train.loop import MetaTrainConfig, meta_train

ARGS = ["--meta-steps", "14", "--truncation", "4", "--particles", "4", "--horizon", "8", "--checkpoint-every", "1",
        "--no-progress"]


def run(run_dir: Path, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "meta_train.loop", "--run-dir", str(run_dir), *ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-2000:]
    return proc


def checkpoint_step(path: Path) -> int:
    if not path.exists():
        return 0
    return torch.load(path, weights_only=False)["meta_step"]  # never half-written: always loads


def test_kill_and_resume_gives_the_same_meta_parameters(tmp_path):
    run(tmp_path / "straight")
    reference = O.load_rule(tmp_path / "straight" / "rule.safetensors")

    killed = tmp_path / "killed"
    proc = run(killed, wait=False)
    deadline = time.time() + 240
    while checkpoint_step(killed / "checkpoint.pt") < 5:
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint_step(killed / "checkpoint.pt")
    assert 5 <= step < 14
    run(killed)  # resumes from the checkpoint
    resumed = O.load_rule(killed / "rule.safetensors")
    for (k, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    rows = (killed / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 15 and rows[-1].startswith("14,")


@pytest.mark.parametrize("estimator", ["pes", "es", "bptt"])
def test_each_estimator_runs_and_moves_the_meta_parameters(tmp_path, estimator):
    cfg = MetaTrainConfig(run_dir=str(tmp_path), estimator=estimator, meta_steps=3, truncation=3, particles=4,
                          horizon=6, checkpoint_every=2, meta_lr=1e-2)
    rule = meta_train(cfg, progress=False)
    torch.manual_seed(cfg.seed)  # the loop's initialisation
    fresh = O.make_rule("deepset", hidden=8)
    assert any(not torch.equal(a, b) for a, b in zip(rule.state_dict().values(), fresh.state_dict().values()))
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "rule.safetensors").exists()


def test_resume_refuses_a_different_config(tmp_path):
    meta_train(MetaTrainConfig(run_dir=str(tmp_path), meta_steps=2, truncation=2, particles=2), progress=False)
    with pytest.raises(ValueError, match="different config"):
        meta_train(MetaTrainConfig(run_dir=str(tmp_path), meta_steps=2, truncation=3, particles=2), progress=False)


def test_cli_meta_train_with_toml_config(tmp_path, capsys):
    from unf.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\nmeta_steps = 2\ntruncation = 2\nparticles = 2\n')
    assert main(["meta-train", str(config), "--no-progress"]) == 0
    assert (tmp_path / "run" / "rule.safetensors").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('run_dir = "x"\nparticels = 2\n')
    assert main(["meta-train", str(bad)]) == 2
    assert "unknown field 'particels'" in capsys.readouterr().err
    bad.write_text('run_dir = "x"\nparticles = "many"\n')
    assert main(["meta-train", str(bad)]) == 2
    assert "field 'particles' must be int" in capsys.readouterr().err


def test_shipped_example_config_is_valid():
    from meta_train.loop import load_config

    cfg = load_config(Path(__file__).parent.parent / "examples" / "configs" / "mlp_digits_pes.toml")
    assert cfg.estimator == "pes" and cfg.meta_steps == 200


# ---- held-out evaluation, meta-loss options, config validation, TensorBoard, `python -m meta_train`

TINY = dict(meta_steps=4, truncation=2, particles=2, horizon=4, checkpoint_every=1, meta_lr=1e-2, hidden=4)
EVAL = dict(eval_every=2, eval_steps=10, eval_seeds=1)


def _rule_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_eval_writes_rows_and_leaves_the_meta_parameters_alone(tmp_path):
    import csv

    plain = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "plain"), **TINY), progress=False)
    evald = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "eval"), **TINY, **EVAL), progress=False)
    assert _rule_equal(plain, evald)  # evaluation draws from its own generators only
    rows = list(csv.DictReader((tmp_path / "eval" / "eval.csv").open()))
    assert [(r["meta_step"], r["task"]) for r in rows] == [(s, "mlp-digits-tanh") for s in ("0", "2", "4")]
    for r in rows:
        assert 0 < float(r["train_loss"]) < 10 and 0 < float(r["test_loss"]) < 10
    assert not (tmp_path / "plain" / "eval.csv").exists()


def test_resume_with_eval_rewrites_eval_csv_exactly(tmp_path):
    import shutil

    straight = tmp_path / "straight"
    reference = meta_train(MetaTrainConfig(run_dir=str(straight), **TINY, **EVAL), progress=False)
    run = tmp_path / "resumed"
    cfg = MetaTrainConfig(run_dir=str(run), **TINY, **EVAL)
    meta_train(cfg, progress=False, stop_after=2)
    shutil.copy(run / "checkpoint.pt", tmp_path / "step2.pt")
    meta_train(cfg, progress=False, stop_after=3)  # runs on, then "dies": its step-3 checkpoint is lost
    assert not (run / "rule.safetensors").exists()
    shutil.copy(tmp_path / "step2.pt", run / "checkpoint.pt")
    resumed = meta_train(cfg, progress=False)
    assert _rule_equal(reference, resumed)
    for name in ("eval.csv", "metrics.csv"):
        assert (run / name).read_text() == (straight / name).read_text(), name


@pytest.mark.parametrize("meta_loss", ["final", "log_mean"])
def test_meta_loss_options(tmp_path, meta_loss):
    import csv

    from meta_train.estimators import bptt, reduce_losses, unroll

    losses = torch.tensor([4.0, 2.0, 1.0])
    assert float(reduce_losses(losses, "mean")) == pytest.approx(7 / 3)
    assert float(reduce_losses(losses, "final")) == 1.0
    assert float(reduce_losses(losses, "log_mean")) == pytest.approx(float(losses.log().mean()))
    with pytest.raises(ValueError, match="meta_loss"):
        reduce_losses(losses, "max")

    cfg = dict(TINY, meta_steps=2, estimator="pes")
    meta_train(MetaTrainConfig(run_dir=str(tmp_path / "mean"), **cfg), progress=False)
    rule = meta_train(MetaTrainConfig(run_dir=str(tmp_path / meta_loss), meta_loss=meta_loss, **cfg), progress=False)
    base = [float(r["meta_loss"]) for r in csv.DictReader((tmp_path / "mean" / "metrics.csv").open())]
    other = [float(r["meta_loss"]) for r in csv.DictReader((tmp_path / meta_loss / "metrics.csv").open())]
    assert base[0] != other[0]
    if meta_loss == "log_mean":  # the mean of logs is below the log of the mean
        assert other[0] < math.log(base[0])

    # BPTT's gradient is the gradient of the chosen reduction
    from meta_train.build import build_rule
    from meta_train.tasks import get_task

    task = get_task("mlp-digits")
    gen = torch.Generator().manual_seed(0)
    params = task.init(gen)
    _, problem = build_rule("deepset", task, params, hidden=4)
    w = torch.cat([p.reshape(-1) for p in params.values()])
    m, s = torch.zeros(O.rule.N_MOMENTA, w.numel()), torch.zeros(())
    batches = [task.sample_batch(gen) for _ in range(2)]
    theta = {k: v.detach().clone() for k, v in rule.named_parameters() if k in ("raw_alpha", "beta")}
    grads, loss, _ = bptt(rule, theta, problem, w, m, s, batches, meta_loss=meta_loss)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    target = reduce_losses(unroll(rule, leaves, problem, w, m, s, batches)[3], meta_loss)
    auto = torch.autograd.grad(target, list(leaves.values()))
    assert float(loss) == pytest.approx(float(target.detach()))
    for k, g in zip(leaves, auto):
        torch.testing.assert_close(grads[k], g)


@pytest.mark.parametrize("field, value, message", [
    ("meta_loss", "max", "field 'meta_loss' must be one of mean, final, log_mean"),
    ("eval_tasks", ["mlp-digits-tanh", "nope"], "field 'eval_tasks': unknown task 'nope'"),
    ("eval_tasks", "mlp-digits-tanh", "field 'eval_tasks' must be list of str"),
    ("eval_tasks", [1, 2], "field 'eval_tasks' must be list of str"),
    ("eval_every", -1, "field 'eval_every' must be >= 0"),
    ("eval_steps", 0, "field 'eval_steps' must be positive"),
    ("eval_seeds", 1.5, "field 'eval_seeds' must be int"),
    ("particles", True, "field 'particles' must be int"),
    ("estimator", "sgd", "field 'estimator' must be one of pes, es, bptt"),
    ("task", "mlp-nothing", "field 'task' must be a registered task"),
    ("device", "tpu", "field 'device'"),
])
def test_bad_config_fields_are_named(tmp_path, field, value, message):
    from meta_train.loop import load_config

    with pytest.raises(ValueError, match=message):
        MetaTrainConfig(run_dir=str(tmp_path), **{field: value})
    toml_value = "[" + ", ".join(repr(v) if isinstance(v, int) else f'"{v}"' for v in value) + "]" \
        if isinstance(value, list) else str(value).lower() if isinstance(value, bool) \
        else f'"{value}"' if isinstance(value, str) else repr(value)
    config = tmp_path / "c.toml"
    config.write_text(f'run_dir = "{tmp_path}"\n{field} = {toml_value}\n')
    with pytest.raises(ValueError, match=f"c.toml: {message}"):
        load_config(config)


def test_eval_tasks_from_toml_and_unknown_family(tmp_path):
    from meta_train.loop import load_config

    config = tmp_path / "c.toml"
    config.write_text(f'run_dir = "{tmp_path}"\neval_every = 5\neval_tasks = ["mlp-digits-deep", "mlp-mnist1d"]\n'
                      f'sigma = 1\n')
    cfg = load_config(config)
    assert cfg.eval_tasks == ["mlp-digits-deep", "mlp-mnist1d"] and cfg.sigma == 1.0
    with pytest.raises(ValueError, match="field 'family'"):
        meta_train(MetaTrainConfig(run_dir=str(tmp_path / "x"), family="nope", **TINY), progress=False)


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    meta_train(MetaTrainConfig(run_dir=str(tmp_path), **TINY, **EVAL), progress=False)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"meta/loss", "meta/grad_norm", "eval/mlp-digits-tanh/train_loss",
            "eval/mlp-digits-tanh/test_loss"} <= tags
    assert [e.step for e in acc.Scalars("meta/loss")] == [1, 2, 3, 4]


def test_python_dash_m_meta_train(tmp_path, capsys):
    from meta_train.distributed import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "torchrun" in capsys.readouterr().out
    config = tmp_path / "c.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\nmeta_steps = 9\ntruncation = 2\nparticles = 2\n')
    assert main(["--config", str(config), "--meta-steps", "2", "--eval-tasks", "mlp-digits-deep", "--no-progress"]) == 0
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["meta_steps"] == 2 and ck["config"]["eval_tasks"] == ["mlp-digits-deep"]
    with pytest.raises(SystemExit):
        main(["--meta-steps", "2"])  # no run dir
    assert "--run-dir is required" in capsys.readouterr().err


def test_eval_task_whose_rule_does_not_fit_is_skipped_with_one_warning(tmp_path, monkeypatch):
    import csv

    import meta_train.loop as loop

    real = loop.build_rule

    def build_rule(family, task, params, hidden=8, **kwargs):  # a rule bound to its task: mlp-digits-deep's differs
        return real(family, task, params, hidden=hidden + (task.name == "mlp-digits-deep"), **kwargs)

    monkeypatch.setattr(loop, "build_rule", build_rule)
    cfg = MetaTrainConfig(run_dir=str(tmp_path), eval_tasks=["mlp-digits-deep", "mlp-digits-tanh"], **TINY, **EVAL)
    with pytest.warns(UserWarning, match="eval task 'mlp-digits-deep' skipped") as record:
        meta_train(cfg, progress=False)
    assert len([w for w in record if "skipped" in str(w.message)]) == 1
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert {r["task"] for r in rows} == {"mlp-digits-tanh"} and len(rows) == 3


def test_without_tensorboard_one_info_line_and_csv_only(tmp_path, monkeypatch, capsys):
    import meta_train.loop as loop

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(loop, "_TB_NOTICE_SHOWN", False)
    meta_train(MetaTrainConfig(run_dir=str(tmp_path / "a"), **dict(TINY, meta_steps=1)), progress=False)
    meta_train(MetaTrainConfig(run_dir=str(tmp_path / "b"), **dict(TINY, meta_steps=1)), progress=False)
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
    assert not (tmp_path / "a" / "tb").exists() and (tmp_path / "a" / "metrics.csv").exists()


def test_a_non_finite_meta_gradient_is_skipped(tmp_path, monkeypatch):
    """A truncation whose estimate is NaN (a diverged inner run) leaves the meta-parameters finite and unchanged;
    the step is logged with a non-finite grad_norm and training goes on."""
    import meta_train.estimators as E

    calls = {"n": 0}
    step = E.PES.step

    def poisoned(self, *args, **kwargs):
        grads, loss = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            grads = {k: torch.full_like(v, float("nan")) for k, v in grads.items()}
        return grads, loss

    monkeypatch.setattr(E.PES, "step", poisoned)
    seen = []
    cfg = MetaTrainConfig(run_dir=str(tmp_path), meta_steps=4, truncation=2, particles=2, horizon=20, meta_lr=1e-2)
    import meta_train.loop as L

    adam_step = torch.optim.Adam.step

    def watch(self, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in enumerate(p for g in self.param_groups for p in g["params"])})
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", watch)
    rule = L.meta_train(cfg, progress=False)
    assert len(seen) == 3  # four meta-steps, one skipped
    assert all(torch.isfinite(p).all() for p in rule.parameters())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    norms = [float(r.split(",")[2]) for r in rows]
    assert not math.isfinite(norms[1]) and all(math.isfinite(n) for k, n in enumerate(norms) if k != 1)


@pytest.mark.parametrize("estimator", ["pes", "es", "bptt"])
def test_meta_params_scalars_trains_only_the_scalars(tmp_path, estimator):
    start = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "start"), **TINY), progress=False)
    cfg = dict(TINY, estimator=estimator, init_from=str(tmp_path / "start" / "rule.safetensors"))
    only = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "s"), meta_params="scalars", **cfg), progress=False)
    both = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "a"), **cfg), progress=False)
    s0, s1, s2 = start.state_dict(), only.state_dict(), both.state_dict()
    scalars = ("raw_alpha", "beta", "raw_gamma0")
    assert all(torch.equal(s0[k], s1[k]) for k in s0 if k not in scalars)  # f as it started
    assert any(not torch.equal(s0[k], s1[k]) for k in scalars)
    assert any(not torch.equal(s0[k], s2[k]) for k in s0 if k not in scalars)  # "all" moves f
    with pytest.raises(ValueError, match="field 'meta_params' must be one of all, scalars"):
        MetaTrainConfig(run_dir=str(tmp_path), meta_params="f")


@pytest.mark.parametrize("estimator", ["pes", "bptt"])
def test_accumulate_updates_once_per_window_and_resumes_exactly(tmp_path, estimator):
    cfg = dict(TINY, estimator=estimator, meta_steps=6, accumulate=3)
    first = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "init"), **cfg), progress=False, stop_after=0)
    mid = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "mid"), **cfg), progress=False, stop_after=2)
    assert _rule_equal(first, mid)  # inside the first window: no update yet
    end = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "end"), **cfg), progress=False, stop_after=3)
    assert not _rule_equal(first, end)  # the window's average applied
    straight = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "straight"), **cfg), progress=False)
    resumed_cfg = MetaTrainConfig(run_dir=str(tmp_path / "resumed"), **cfg)
    meta_train(resumed_cfg, progress=False, stop_after=4)  # checkpoint mid-window: the partial sum is saved
    assert _rule_equal(straight, meta_train(resumed_cfg, progress=False))
    with pytest.raises(ValueError, match="field 'accumulate' must be positive"):
        MetaTrainConfig(run_dir=str(tmp_path), accumulate=0)
